"""Ablation grids: expand a sweep file into runs, check them all, launch them, tabulate results.

A sweep file names a base config, fixed overrides and a grid; every combination of the grid (times
every seed) is one ordinary ``fit`` run in ``<root>/<sweep name>/<run name>``::

    name: entropy_methods
    base: configs/default.yaml        # optional, relative to the sweep file
    overrides: [trainer.max_steps=50]
    seeds: [0, 1]
    grid:
      loss.name: [ppo, clip_cov, kl_cov]
      regularizer: [{name: none}, {name: entropy_bonus, coef: 0.001}]
      # or whole recipes: `config: [../grpo.yaml, ../clip_cov.yaml]` (files relative to the sweep
      # file; each replaces `base` for its runs and is labelled by its stem)
    launcher: local                   # or slurm (needs the `submitit` extra)
    slurm: {partition: gpu, timeout_min: 240, gpus_per_node: 1, cpus_per_task: 8}

A run is finished only when its ``done.json`` exists (``completion.py``); launching the sweep again
skips finished runs, resumes the others from ``last.ckpt`` and starts the rest. Results, the
per-point table and the overlay figure are in ``sweep_results.py``.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_entropy.completion import read_marker
from lightning_entropy.config import ConfigError, import_user_modules, load_config, validate

SLURM_RESULT_GRACE_S = 20  # seconds a job may be out of squeue before its missing result counts as lost
SWEEP_KEYS = {"name", "base", "overrides", "seeds", "grid", "launcher", "slurm", "root", "imports"}


@dataclass
class Run:
    name: str  # run directory under the sweep directory
    overrides: list[str]
    point: str = ""  # the grid point (the name without its seed): seeds of one point are averaged
    seed: int | None = None
    values: dict[str, Any] = field(default_factory=dict)  # grid key -> value, for error messages
    config: str | None = None  # the run's config file (the grid's `config` value, else the base)


def _as_overrides(key: str, value: Any) -> list[str]:
    """A grid value becomes dot-list overrides; a dict value sets a whole section (name first)."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0] != "name")
        return [f"{key}.{k}={_fmt(v)}" for k, v in items]
    return [f"{key}={_fmt(value)}"]


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _label(key: str, value: Any) -> str:
    if key == "config":
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", Path(value).stem)
    short = key.split(".")[-1]
    if isinstance(value, dict):
        text = "-".join(f"{k}{v}" if k != "name" else str(v) for k, v in value.items())
    else:
        text = f"{short}{value}" if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def load_sweep(path: str | Path) -> tuple[dict[str, Any], list[Run]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # YAML syntax errors carry the line number
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map config keys to non-empty lists of values")
    if spec.get("launcher", "local") not in ("local", "slurm"):
        raise ConfigError(f"{path}: launcher '{spec['launcher']}' is not one of local, slurm")
    spec.setdefault("name", path.stem)
    if spec.get("base"):
        spec["base"] = str(_relative_to(path, spec["base"]))
    if "config" in grid:
        if any(not isinstance(v, str) for v in grid["config"]):
            raise ConfigError(f"{path}: grid 'config' must list config file paths, got {grid['config']}")
        grid["config"] = [str(_relative_to(path, v)) for v in grid["config"]]
        missing = [v for v in grid["config"] if not Path(v).is_file()]
        if missing:
            raise ConfigError(f"{path}: grid 'config': file not found: {missing[0]}")
    seeds = spec.get("seeds") or [None]
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = "__".join(_label(k, v) for k, v in zip(keys, values))
        chosen = dict(zip(keys, values))
        for seed in seeds:
            overrides = [o for k, v in chosen.items() if k != "config" for o in _as_overrides(k, v)]
            label = point
            if seed is not None:
                overrides.append(f"seed={seed}")
                label += f"__seed{seed}"
            runs.append(
                Run(
                    label,
                    list(spec.get("overrides") or []) + overrides,
                    point,
                    seed,
                    dict(chosen),
                    chosen.get("config", spec.get("base")),
                )
            )
    _refuse_collisions(path, runs)
    return spec, runs


def _relative_to(sweep_file: Path, item: str) -> Path:
    return Path(item) if Path(item).is_absolute() else (sweep_file.parent / item).resolve()


def _refuse_collisions(path: Path, runs: list[Run]) -> None:
    """Two grid values that the run name cannot tell apart ('a b', 'a_b') would share one directory."""
    seen: dict[str, Run] = {}
    for r in runs:
        other = seen.setdefault(r.name, r)
        if other is not r:
            a = {**other.values, "seed": other.seed}
            b = {**r.values, "seed": r.seed}
            diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]) or "identical values"
            raise ConfigError(
                f"{path}: grid values ({diff}) map to the same run directory '{r.name}'; "
                "make them differ in letters, digits or _.=-"
            )


def check_runs(spec: dict[str, Any], runs: list[Run]) -> None:
    """Load and validate every run's config before anything starts (a typo fails in seconds)."""
    import_user_modules(list(spec.get("imports") or []))
    for run in runs:
        try:
            validate(load_config(run.config, run.overrides))
        except ConfigError as err:
            raise ConfigError(f"sweep run '{run.name}': {err}") from err


def fit_args(spec: dict[str, Any], run: Run, sweep_dir: Path) -> list[str]:
    """The ``fit`` arguments that start ``run``, or continue it when it left a ``last.ckpt``."""
    ckpt = sweep_dir / run.name / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        # the run's saved config.yaml (imports included) is the config; the grid is not re-applied
        return ["fit", "--resume", str(ckpt), "logging.progress=false"]
    args = ["fit"] + (["--config", run.config] if run.config else [])
    for item in spec.get("imports") or []:
        args += ["--import", item]
    return (
        args
        + run.overrides
        + [f"logging.root={sweep_dir}", f"logging.name={run.name}", "logging.progress=false"]
    )


def run_state(sweep_dir: Path, run: Run) -> str:
    """finished (done.json), resume (a last.ckpt, no marker), stale (a directory, no checkpoint), new."""
    run_dir = sweep_dir / run.name
    if read_marker(run_dir) is not None:
        return "finished"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "resume"
    return "stale" if run_dir.exists() else "new"


def launch(
    spec: dict[str, Any], runs: list[Run], sweep_dir: Path, dry_run: bool = False, jobs: int = 1
) -> list[str]:
    """Run every unfinished run; returns the names of those that did not finish.

    Launching a sweep again continues it: finished runs (a ``done.json``) are skipped, runs with a
    ``last.ckpt`` resume from it, and a run that died before its first checkpoint starts over (its
    directory is moved to ``.stale/``, never deleted).
    """
    states = {r.name: run_state(sweep_dir, r) for r in runs}
    todo = [r for r in runs if states[r.name] != "finished"]
    if spec.get("launcher", "local") == "slurm":
        _refuse_active_jobs(spec, todo)
    counts = {s: sum(v == s for v in states.values()) for s in ("finished", "resume", "stale", "new")}
    print("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), flush=True)
    for r in todo:
        if states[r.name] != "stale":
            continue
        if dry_run:
            print(f"# {sweep_dir / r.name} has no checkpoint: would be moved to .stale/ and started over")
            continue
        moved = sweep_dir / ".stale" / f"{r.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        moved.parent.mkdir(exist_ok=True)
        os.replace(sweep_dir / r.name, moved)
        print(f"  {r.name}: died before its first checkpoint; moved to {moved}, starting over", flush=True)
    if dry_run:
        for r in todo:
            print(shlex.join(["python", "-m", "lightning_entropy", *fit_args(spec, r, sweep_dir)]))
        return []
    if spec.get("launcher", "local") == "slurm":
        _launch_slurm(spec, todo, sweep_dir)
    else:
        _launch_local(spec, todo, sweep_dir, jobs)
    # the marker, not the exit code, says whether a run finished (an early stop exits 0 without one)
    failed = [r.name for r in todo if read_marker(sweep_dir / r.name) is None]
    return failed


def slot_env(slot: int, jobs: int, env: dict[str, str], cpus: int, gpus: int) -> dict[str, str]:
    """The environment of the runs in job slot ``slot`` of ``jobs``: with several slots, each gets its
    share of the CPU threads and, when there are enough GPUs, GPUs of its own (round robin), unless the
    caller already set OMP_NUM_THREADS / CUDA_VISIBLE_DEVICES."""
    env = dict(env)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cpus // jobs))
    if jobs > 1 and gpus >= jobs and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(gpus) if g % jobs == slot)
    return env


def _launch_local(spec: dict[str, Any], runs: list[Run], sweep_dir: Path, jobs: int = 1) -> None:
    import queue
    from concurrent.futures import ThreadPoolExecutor

    gpus = 0
    if jobs > 1:
        import torch

        gpus = torch.cuda.device_count()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def run(i: int, r: Run) -> None:
        slot = slots.get()  # a free slot: its threads and devices are this run's until it ends
        try:
            args = fit_args(spec, r, sweep_dir)
            print(f"[{i + 1}/{len(runs)}] {r.name}{' (resuming)' if '--resume' in args else ''}", flush=True)
            log = sweep_dir / f"{r.name}.log"
            with open(log, "a") as fh:  # a resumed run appends to the log of its first attempt
                rc = subprocess.call(
                    [sys.executable, "-m", "lightning_entropy", *args],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=slot_env(slot, jobs, dict(os.environ), os.cpu_count() or 1, gpus),
                )
            if rc != 0:
                print(f"  {r.name} failed (exit {rc}); see {log}", flush=True)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, range(len(runs)), runs))


def _launch_slurm(spec: dict[str, Any], runs: list[Run], sweep_dir: Path) -> None:
    try:
        import submitit
    except ImportError as err:
        raise ConfigError("launcher: slurm needs submitit: pip install 'lightning_entropy[slurm]'") from err
    from lightning_entropy.__main__ import main

    executor = submitit.AutoExecutor(folder=str(sweep_dir / "slurm"))
    executor.update_parameters(
        **{
            f"slurm_{k}"
            if k not in ("timeout_min", "gpus_per_node", "cpus_per_task", "nodes", "tasks_per_node", "mem_gb")
            else k: v
            for k, v in (spec.get("slurm") or {}).items()
        }
    )
    jobs = []
    for r in runs:
        # the job name shows in squeue which run a job is (and lets a user scancel one run)
        executor.update_parameters(name=_job_name(spec, r))
        jobs.append(executor.submit(main, fit_args(spec, r, sweep_dir)))
    for r, j in zip(runs, jobs):
        print(f"  submitted {r.name}: job {j.job_id}", flush=True)
    pending = dict(zip(jobs, runs))
    left_queue: dict[Any, float] = {}
    while pending:
        for j, r in list(pending.items()):
            if j.done():
                del pending[j]
                try:
                    rc = j.result()
                    if rc != 0:
                        print(f"  {r.name}: exit {rc}; see {j.paths.stdout}", flush=True)
                except Exception as err:  # a job that crashed or was cancelled
                    print(f"  {r.name}: {str(err).strip().splitlines()[0]}", flush=True)
            elif executor.cluster == "slurm" and not _in_slurm_queue(j.job_id):
                # submitit learns that a job ended without a result from sacct, which a cluster without
                # accounting storage refuses: it would wait forever on a job killed by scancel or
                # SIGKILL. squeue says the job is gone; a short grace lets a result file still appear.
                if time.time() - left_queue.setdefault(j, time.time()) > SLURM_RESULT_GRACE_S:
                    del pending[j]
                    print(f"  {r.name}: job {j.job_id} left the queue without a result; see {j.paths.stderr}")
        time.sleep(1)


def _job_name(spec: dict[str, Any], run: Run) -> str:
    return f"{spec['name']}:{run.name}"


def _refuse_active_jobs(spec: dict[str, Any], runs: list[Run]) -> None:
    """A relaunch while a run's job is still queued or running would start a second process on the
    same run directory (or move it away as stale); Slurm knows the job by its name."""
    try:
        out = subprocess.run(
            ["squeue", "--me", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return  # no squeue here: submitit will say that there is no Slurm
    active = {}  # job name -> job id
    for line in out.stdout.splitlines():
        job_id, _, name = line.strip().partition(" ")
        active[name] = job_id
    for r in runs:
        if _job_name(spec, r) in active:
            raise ConfigError(
                f"run '{r.name}' is still queued or running as Slurm job {active[_job_name(spec, r)]}; "
                "wait for it or scancel it before launching the sweep again"
            )


def _in_slurm_queue(job_id: str) -> bool:
    # pending, running or completing; squeue exits 1 for an id it has already forgotten
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def run_sweep(path: str | Path, root: str | None = None, dry_run: bool = False, jobs: int = 1) -> int:
    from lightning_entropy.sweep_results import overlay_figure, results_by_point, results_table

    if jobs < 1:
        raise ConfigError(f"sweep --jobs {jobs}: must be >= 1")
    spec, runs = load_sweep(path)
    if jobs > 1 and spec.get("launcher", "local") != "local":
        raise ConfigError(f"{path}: --jobs {jobs} applies to the local launcher; Slurm runs every job at once")
    check_runs(spec, runs)
    sweep_dir = Path(root or spec.get("root") or "runs") / spec["name"]
    if not dry_run:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweep '{spec['name']}': {len(runs)} runs -> {sweep_dir}")
    failed = launch(spec, runs, sweep_dir, dry_run=dry_run, jobs=jobs)
    if dry_run:
        return 0
    print(results_table(sweep_dir, runs))
    print(results_by_point(sweep_dir, runs))
    print(f"results: {sweep_dir / 'results.csv'}, {sweep_dir / 'results_by_point.csv'}")
    print(f"figure: {overlay_figure(sweep_dir, runs)}")
    if failed:
        print(f"{len(failed)} run(s) did not finish (launch the sweep again to resume): {', '.join(failed)}")
    return 1 if failed else 0
