"""Command line: ``python -m lightning_entropy {fit,validate,sweep,components,report} ...``."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_entropy.config import ConfigError, import_user_modules, load_config, to_yaml, validate
from lightning_entropy.preflight import check_accelerator_available

RUN_NAME_ENV = "LIGHTNING_ENTROPY_RUN_NAME"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_entropy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("fit", "train with RL (default: the embedded tiny-policy run)"),
        ("validate", "evaluate a policy on the validation prompts"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", "-c", help="YAML config merged over the embedded default")
        s.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            help="python file or module registering user components (repeatable)",
        )
        s.add_argument(
            "--resume",
            help="PATH/last.ckpt to continue a run exactly" if name == "fit" else "checkpoint to evaluate",
        )
        if name == "fit":
            s.add_argument(
                "--fork",
                action="store_true",
                help="with --resume of an older checkpoint (not the run's last.ckpt): continue from it "
                "in a new run directory (<run>-fork<step>, or logging.name=...)",
            )
        s.add_argument(
            "overrides", nargs="*", help="dot-list overrides, e.g. optim.lr=1e-4 loss.name=clip_cov"
        )
    c = sub.add_parser("components", help="list every registered component and its hyperparameters")
    c.add_argument("--import", dest="imports", action="append", default=[])
    c.add_argument("family", nargs="?", help="only this family")
    c.add_argument("--markdown", action="store_true", help="the method table (family, name, paper)")
    c.add_argument("--write", metavar="FILE", help="replace the method table between FILE's markers")
    sw = sub.add_parser("sweep", help="run an ablation grid (locally, or on SLURM through submitit)")
    sw.add_argument("sweep_file")
    sw.add_argument("--root", help="parent of the sweep directory (default: the file's `root`, else runs)")
    sw.add_argument("--dry-run", action="store_true", help="validate every run and print the commands")
    sw.add_argument(
        "--jobs", type=int, default=1, help="local launcher: runs at a time, each with its share of threads/GPUs"
    )
    r = sub.add_parser("report", help="report.md + figures of a run directory, or overlays of a sweep's runs")
    r.add_argument("run_dir", help="a run directory, or a sweep directory (its runs overlaid)")
    r.add_argument(
        "--law-fit-points", type=int, default=None,
        help="fit the entropy-performance law on the first K validations and report the error on the rest",
    )
    e = sub.add_parser("export", help="a checkpoint or run directory -> a Hugging Face model folder")
    e.add_argument("source", help="PATH.ckpt, or a run directory (its checkpoints/last.ckpt)")
    e.add_argument("out_dir", help="new folder for save_pretrained (AutoModelForCausalLM, vLLM)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "components":
            return cmd_components(args)
        if args.command == "report":
            return cmd_report(Path(args.run_dir), args.law_fit_points)
        if args.command == "export":
            return cmd_export(Path(args.source), Path(args.out_dir))
        if args.command == "sweep":
            from lightning_entropy.sweep import run_sweep

            return run_sweep(args.sweep_file, root=args.root, dry_run=args.dry_run, jobs=args.jobs)
        return cmd_fit(args, validate_only=args.command == "validate")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_components(args: Any) -> int:
    from lightning_entropy.registry import FAMILIES

    import_user_modules(args.imports)
    if args.markdown or args.write:
        return cmd_method_table(args)
    for family, reg in FAMILIES.items():
        if args.family and family != args.family:
            continue
        print(f"{family}  ({reg.doc})")
        for name in reg.names():
            cls = reg.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            if "UNVERIFIED" in (cls.__doc__ or "") and "UNVERIFIED" not in doc:
                doc += " [UNVERIFIED values: see the docstring]"
            params = ", ".join(f"{p.name}={p.default!r}" for p in reg.params(name))
            print(f"  {name:<24} {doc}")
            print(f"  {'':<24} params: {params or '-'}")
        print()
    return 0


def cmd_method_table(args: Any) -> int:
    from lightning_entropy import catalog

    items = [e for e in catalog.entries() if not args.family or e.family == args.family]
    if not args.write:
        print(catalog.markdown_table(items), end="")
        return 0
    if args.family:
        raise ConfigError("components --write renders every family; drop the family argument")
    path = Path(args.write)
    if not path.is_file():
        raise ConfigError(f"components --write: no such file {path}")
    try:
        changed = catalog.write_table(path)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    print(f"{path}: method table {'updated' if changed else 'already up to date'}")
    return 0


def cmd_report(run_dir: Path, law_fit_points: int | None = None) -> int:
    from lightning_entropy import report

    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    if law_fit_points is not None and law_fit_points < 2:
        raise ConfigError(f"report --law-fit-points={law_fit_points}: the law has two coefficients, need >= 2")
    if report.is_sweep_dir(run_dir):
        print(f"sweep report: {report.write_sweep_report(run_dir)}")
        return 0
    series = report.read_metrics(run_dir)
    print(report.summary_table(series))
    print(f"curves: {report.plot_curves(series, run_dir / 'curves.png')}")
    print(f"report: {report.write_report(run_dir, law_fit_points)}")
    return 0


def resolve_run(args: Any) -> tuple[DictConfig, Path, str | None]:
    """Config and run directory; a resumed run keeps its directory and saved config (a fork of an
    older checkpoint gets a new directory); a requeued Slurm job resumes its own run."""
    if args.resume:
        return _resolve_resume(args)
    cfg = load_config(args.config, args.overrides, args.imports)
    # DDP relaunches this command once per rank: every rank must agree on the generated name
    name = cfg.logging.name or os.environ.setdefault(RUN_NAME_ENV, default_run_name())
    run_dir = Path(cfg.logging.root) / name
    requeued = _slurm_requeued_checkpoint(run_dir)
    if requeued is not None:
        args.resume = str(requeued)
        return _resolve_resume(args)
    return cfg, run_dir, None


def default_run_name() -> str:
    """fit-<timestamp>-<random>: two runs started in the same second never share a directory. A
    Slurm job is named by its job id instead, so that a requeued job finds its run again."""
    from lightning_entropy.callbacks import slurm_job_id

    job = slurm_job_id() if os.environ.get("SLURM_JOB_ID") else None
    if job is not None:
        return f"fit-slurm{job}"
    return time.strftime("fit-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _slurm_requeued_checkpoint(run_dir: Path) -> Path | None:
    """On a requeued Slurm job (SLURM_RESTART_COUNT > 0), the run's last.ckpt to resume from."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def _resolve_resume(args: Any) -> tuple[DictConfig, Path, str | None]:
    """Checks the checkpoint before anything is built or written: it is readable and ours, its model
    matches the config's, and it is the head of its run unless --fork."""
    from lightning_entropy.checkpointing import fork_dir, model_differences, newer_checkpoint, read_meta

    ckpt = Path(args.resume)
    meta = read_meta(ckpt)
    run_dir = ckpt.parent.parent
    saved = run_dir / "config.yaml"
    if not saved.is_file() and not args.config:
        raise ConfigError(f"--resume: {saved} is missing; cannot tell how the run was configured")
    cfg = load_config(args.config or saved, args.overrides, args.imports)
    diffs = model_differences(meta.config, cfg)
    if diffs:
        raise ConfigError(f"--resume: the checkpoint's model differs from the config's: {'; '.join(diffs)}")
    if getattr(args, "command", "fit") != "fit":
        return cfg, run_dir, str(ckpt)
    why = newer_checkpoint(meta)
    if why is None:
        if getattr(args, "fork", False):
            raise ConfigError(f"--fork: {ckpt} is the head of its run; resume it without --fork")
        return cfg, run_dir, str(ckpt)
    if not getattr(args, "fork", False):
        raise ConfigError(
            f"--resume {ckpt}: an older checkpoint (RL step {meta.rl_step}); {why}. Resume "
            f"{run_dir / 'checkpoints' / 'last.ckpt'}, or add --fork to continue from step "
            f"{meta.rl_step} in a new run directory"
        )
    named = any(o.split("=", 1)[0] == "logging.name" for o in args.overrides)
    if named:
        new_dir = fork_dir(run_dir, meta.rl_step, cfg.logging.name)
    elif _env_rank() != 0 and RUN_NAME_ENV in os.environ:  # DDP: rank 0 already made (and named) it
        new_dir = run_dir.parent / os.environ[RUN_NAME_ENV]
    else:
        new_dir = fork_dir(run_dir, meta.rl_step)
        os.environ[RUN_NAME_ENV] = new_dir.name  # inherited by the ranks Lightning launches
    cfg.logging.name = new_dir.name
    return cfg, new_dir, str(ckpt)


def cmd_fit(args: Any, validate_only: bool = False) -> int:
    args.command = getattr(args, "command", "validate" if validate_only else "fit")
    cfg, run_dir, ckpt = resolve_run(args)
    fresh = not ckpt or getattr(args, "fork", False)  # a new run directory
    base = Path(args.config).parent if args.config else None
    import_user_modules(list(cfg.imports), base=base)
    validate(cfg)
    check_accelerator_available(cfg)
    if fresh and not validate_only and _env_rank() == 0:
        if run_dir.exists():
            raise ConfigError(
                f"run directory {run_dir} already exists; never overwritten: choose another "
                f"logging.name, or continue it with --resume {run_dir}/checkpoints/last.ckpt"
            )
    # everything above is cheap; the model, data and trainer come only after the checks pass
    _quiet_known_warnings()
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_entropy.data import build_datamodule
    from lightning_entropy.module import RLVRModule

    datamodule = build_datamodule(cfg)
    prepare_data(cfg, datamodule)  # reads, formats and measures every prompt: still nothing written
    is_rank0 = _env_rank() == 0
    created = fresh and not validate_only and is_rank0
    if not validate_only and is_rank0:
        run_dir.mkdir(parents=True, exist_ok=not fresh)
        (
            run_dir / ("config.yaml" if fresh else f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        ).write_text(to_yaml(cfg))
        if ckpt and fresh:
            (run_dir / "forked_from.txt").write_text(f"{Path(ckpt).resolve()}\n")
    progress: dict[str, Any] = {}
    try:
        return _run(cfg, run_dir, ckpt, validate_only, datamodule, ModelCheckpoint, RLVRModule, progress)
    except BaseException:
        # a run that fails before its first RL step leaves nothing that blocks rerunning it
        module = progress.get("module")
        if created and getattr(module, "rl_step", 0) == 0 and not _has_steps(run_dir):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _has_steps(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())


def _run(
    cfg: DictConfig,
    run_dir: Path,
    ckpt: str | None,
    validate_only: bool,
    datamodule: Any,
    ModelCheckpoint: Any,
    RLVRModule: Any,
    progress: dict[str, Any],
) -> int:
    import lightning as L

    from lightning_entropy.callbacks import GracefulStop
    from lightning_entropy.checkpointing import AtomicCheckpointIO
    from lightning_entropy.export import POLICY_CONFIG, save_policy_config
    from lightning_entropy.loggers import SampleTable, build_loggers
    from lightning_entropy.strategies import build_strategy, refresh_last_checkpoint

    policy_path = prepare_policy(cfg, datamodule)
    if not validate_only and _env_rank() == 0 and not (run_dir / POLICY_CONFIG).exists():
        save_policy_config(policy_path, run_dir / POLICY_CONFIG)  # lets `export` rebuild the architecture
    # seeded after the (cached or fresh) tiny-policy build so both paths start the same stream
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = progress["module"] = RLVRModule(cfg, policy_path)
    t = cfg.trainer
    # validate only reads: no run directory, logs or checkpoints of its own
    loggers: list[Any] = [] if validate_only else build_loggers(cfg, run_dir)
    per_step = module.updates_per_step
    ckpt_cb = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="optstep{step}",
        save_last=True,
        every_n_train_steps=cfg.logging.ckpt_every * per_step,
        save_top_k=-1,
        auto_insert_metric_name=False,
        enable_version_counter=False,  # one last.ckpt per run directory, never last-v1.ckpt
    )
    stopper = GracefulStop(run_dir / "checkpoints")
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy),
        precision=t.precision,
        max_steps=t.max_steps * per_step,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=[]
        if validate_only
        else [stopper, ckpt_cb, SampleTable(run_dir, cfg.logging.samples_every, cfg.logging.samples_n)],
        plugins=[AtomicCheckpointIO()],
        val_check_interval=cfg.logging.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=cfg.logging.progress,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )
    if validate_only:
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt)
        if trainer.is_global_zero:
            print("\n".join(f"{k:<12} {v:.4f}" for k, v in module.last_validation.items()))
        return 0
    start = time.time()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    finally:
        if _env_rank() == 0:
            os.environ.pop(RUN_NAME_ENV, None)
    if stopper.stopped is not None:
        if trainer.is_global_zero:
            print(stopper.report(module.rl_step), file=sys.stderr)
        return 128 + int(stopper.stopped)
    refresh_last_checkpoint(trainer, t.strategy, run_dir / "checkpoints")  # final/ is exported from it
    if trainer.is_global_zero:
        _save_final(t.strategy, module, run_dir)
        print(
            f"\nRun finished in {time.time() - start:.0f}s: {run_dir} (trained policy: {run_dir / 'final'})"
        )
        if cfg.logging.plot:
            cmd_report(run_dir)
    from lightning_entropy.completion import mark_finished  # done.json: the sweep's proof of a finished run

    mark_finished(run_dir, trainer)  # last: final/ and the report are out
    return 0


def cmd_export(source: Path, out: Path) -> int:
    from lightning_entropy.export import ExportError, export_checkpoint

    try:
        path = export_checkpoint(source, out)
    except ExportError as err:
        raise ConfigError(str(err)) from err
    print(f"exported {source} -> {path} (AutoModelForCausalLM.from_pretrained('{path}'))")
    return 0


def _save_final(strategy: Any, module: Any, run_dir: Path) -> None:
    """final/: the policy itself, or under a sharded strategy the full-state last.ckpt exported (a
    DeepSpeed checkpoint is a folder of shards: `export` cannot read it)."""
    import shutil

    from lightning_entropy.export import export_checkpoint, save_policy
    from lightning_entropy.strategies import full_checkpoint, is_sharded

    last = run_dir / "checkpoints" / "last.ckpt"
    if not is_sharded(strategy):
        save_policy(module.policy, module.tokenizer, run_dir / "final")
    elif full_checkpoint(last):
        shutil.rmtree(run_dir / "final", ignore_errors=True)  # as save_policy replaces an older final/
        export_checkpoint(last, run_dir / "final")
    else:
        print(f"final/ not written under strategy {strategy}: {last} is not one file", file=sys.stderr)


def prepare_data(cfg: DictConfig, datamodule: Any) -> None:
    """Load, format and length-filter every prompt with the policy's tokenizer (no model weights), so
    bad files, keys and prompts fail in seconds, naming file, line and key, before anything is written."""
    from lightning_entropy.models import BUILTIN_PREFIX, build_char_tokenizer, context_length, load_tokenizer
    from lightning_entropy.prompts import DataError

    name = cfg.model.name_or_path
    try:
        if name.startswith(BUILTIN_PREFIX):
            tokenizer, context = build_char_tokenizer(), int(cfg.model.tiny.max_positions)
        else:
            tokenizer, context = load_tokenizer(name), context_length(name)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.name_or_path={name}: cannot load its tokenizer/config: {first}") from err
    limit = cfg.data.max_prompt_tokens
    if limit is None and context is not None:
        limit = context - int(cfg.sampler.get("max_new_tokens", 0) or 0)
        if limit < 1:
            raise ConfigError(
                f"sampler.max_new_tokens={cfg.sampler.max_new_tokens} leaves no room for a prompt in the "
                f"model's {context}-token context"
            )
    try:
        datamodule.prepare(tokenizer, limit, cfg.data.long_prompts)
    except (DataError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err


def prepare_policy(cfg: DictConfig, datamodule: Any) -> str:
    from lightning_entropy.models import BUILTIN_PREFIX, ensure_builtin

    name = cfg.model.name_or_path
    if not name.startswith(BUILTIN_PREFIX):
        return os.path.expanduser(name)  # "~/models/x" is a path (from_pretrained does not expand it)
    tiny = OmegaConf.to_container(cfg.model.tiny, resolve=True)
    data_spec = {  # for reading only: the cache key is a digest of the warm-start examples themselves
        "task": cfg.data.task if cfg.data.path is None else None,
        "path": cfg.data.path,
        "difficulty": cfg.data.difficulty,
        "options": OmegaConf.to_container(cfg.data.options, resolve=True),
        "seed": cfg.data.seed,
    }
    return str(
        ensure_builtin(
            name,
            tiny,
            data_spec,
            lambda: datamodule.warmstart_examples(tiny["warmstart_examples"]),
            progress=cfg.logging.progress,
        )
    )


def _quiet_known_warnings() -> None:
    """Silence library notices that say nothing about this run (ours stay visible)."""
    import warnings

    for pattern in (
        ".*no pre-optimization state was saved.*",
        ".*`IterableDataset` has `__len__` defined.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*litlogger.*",
        ".*The dirpath has changed from.*",  # a --fork continues in a new directory by design
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _env_rank() -> int:
    # RANK/LOCAL_RANK: set for processes that Lightning (or torchrun) launched; SLURM_PROCID: the task
    # index when srun launched one process per device (Lightning's SLURMEnvironment), before any RANK
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


if __name__ == "__main__":
    sys.exit(main())
