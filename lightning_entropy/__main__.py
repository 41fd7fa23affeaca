"""Command line: ``python -m lightning_entropy {fit,validate,sweep,components,report} ...``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_entropy.config import ConfigError, import_user_modules, load_config, to_yaml, validate

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
        s.add_argument(
            "overrides", nargs="*", help="dot-list overrides, e.g. optim.lr=1e-4 loss.name=clip_cov"
        )
    c = sub.add_parser("components", help="list every registered component and its hyperparameters")
    c.add_argument("--import", dest="imports", action="append", default=[])
    c.add_argument("family", nargs="?", help="only this family")
    sw = sub.add_parser("sweep", help="run an ablation grid (locally, or on SLURM through submitit)")
    sw.add_argument("sweep_file")
    sw.add_argument("--root", help="parent of the sweep directory (default: the file's `root`, else runs)")
    sw.add_argument("--dry-run", action="store_true", help="validate every run and print the commands")
    r = sub.add_parser("report", help="summary table and curves of a run directory")
    r.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "components":
            return cmd_components(args)
        if args.command == "report":
            return cmd_report(Path(args.run_dir))
        if args.command == "sweep":
            from lightning_entropy.sweep import run_sweep

            return run_sweep(args.sweep_file, root=args.root, dry_run=args.dry_run)
        return cmd_fit(args, validate_only=args.command == "validate")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_components(args: Any) -> int:
    from lightning_entropy.registry import FAMILIES

    import_user_modules(args.imports)
    for family, reg in FAMILIES.items():
        if args.family and family != args.family:
            continue
        print(f"{family}  ({reg.doc})")
        for name in reg.names():
            cls = reg.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            params = ", ".join(f"{p.name}={p.default!r}" for p in reg.params(name))
            print(f"  {name:<24} {doc}")
            print(f"  {'':<24} params: {params or '-'}")
        print()
    return 0


def cmd_report(run_dir: Path) -> int:
    from lightning_entropy.report import plot_curves, read_metrics, summary_table

    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    series = read_metrics(run_dir)
    print(summary_table(series))
    print(f"curves: {plot_curves(series, run_dir / 'curves.png')}")
    return 0


def resolve_run(args: Any) -> tuple[DictConfig, Path, str | None]:
    """Config and run directory; a resumed run keeps its directory and saved config."""
    if args.resume:
        ckpt = Path(args.resume)
        if not ckpt.is_file():
            raise ConfigError(f"--resume: checkpoint not found: {ckpt}")
        run_dir = ckpt.parent.parent
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} is missing; cannot tell how the run was configured")
        cfg = load_config(args.config or saved, args.overrides, args.imports)
        return cfg, run_dir, str(ckpt)
    cfg = load_config(args.config, args.overrides, args.imports)
    # DDP relaunches this command once per rank: every rank must agree on the generated name
    name = cfg.logging.name or os.environ.setdefault(RUN_NAME_ENV, time.strftime("fit-%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.logging.root) / name
    return cfg, run_dir, None


def cmd_fit(args: Any, validate_only: bool = False) -> int:
    cfg, run_dir, ckpt = resolve_run(args)
    base = Path(args.config).parent if args.config else None
    import_user_modules(list(cfg.imports), base=base)
    validate(cfg)
    if not ckpt and not validate_only and _env_rank() == 0:
        if run_dir.exists():
            raise ConfigError(
                f"run directory {run_dir} already exists; never overwritten: choose another "
                "logging.name, or continue it with --resume {run_dir}/checkpoints/last.ckpt"
            )
    # everything above is cheap; the model, data and trainer come only after the checks pass
    _quiet_known_warnings()
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_entropy.data import build_datamodule
    from lightning_entropy.module import RLVRModule

    is_rank0 = _env_rank() == 0
    if not validate_only and is_rank0:
        run_dir.mkdir(parents=True, exist_ok=bool(ckpt))
        (
            run_dir / ("config.yaml" if not ckpt else f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        ).write_text(to_yaml(cfg))
    datamodule = build_datamodule(cfg)
    policy_path = prepare_policy(cfg, datamodule)
    # seeded after the (cached or fresh) tiny-policy build so both paths start the same stream
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = RLVRModule(cfg, policy_path)
    t = cfg.trainer
    # validate only reads: no run directory, logs or checkpoints of its own
    loggers: list[Any] = [] if validate_only else [CSVLogger(str(run_dir), name="logs")]
    if cfg.logging.tensorboard and not validate_only:
        loggers.append(TensorBoardLogger(str(run_dir), name="tb"))
    per_step = module.updates_per_step
    ckpt_cb = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="optstep{step}",
        save_last=True,
        every_n_train_steps=cfg.logging.ckpt_every * per_step,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps * per_step,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=[] if validate_only else [ckpt_cb],
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
    from lightning_entropy.completion import mark_finished  # done.json: the sweep's proof of a finished run

    mark_finished(run_dir, trainer)
    if trainer.is_global_zero:
        print(f"\nRun finished in {time.time() - start:.0f}s: {run_dir}")
        if cfg.logging.plot:
            cmd_report(run_dir)
    return 0


def prepare_policy(cfg: DictConfig, datamodule: Any) -> str:
    from lightning_entropy.models import BUILTIN_PREFIX, ensure_builtin

    name = cfg.model.name_or_path
    if not name.startswith(BUILTIN_PREFIX):
        return name
    tiny = OmegaConf.to_container(cfg.model.tiny, resolve=True)
    data_spec = {
        "task": cfg.data.task,
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
