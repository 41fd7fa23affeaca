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
    launcher: local                   # or slurm (needs the `submitit` extra)
    slurm: {partition: gpu, timeout_min: 240, gpus_per_node: 1, cpus_per_task: 8}
"""

from __future__ import annotations

import csv
import itertools
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_entropy.config import ConfigError, import_user_modules, load_config, validate

RESULT_KEYS = ("val/acc", "val/pass@1", "val/pass@8", "train/reward", "train/entropy", "train/cov_logp_adv")
SWEEP_KEYS = {"name", "base", "overrides", "seeds", "grid", "launcher", "slurm", "root", "imports"}


@dataclass
class Run:
    name: str
    overrides: list[str]


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
        spec["base"] = (
            str((path.parent / spec["base"]).resolve())
            if not Path(spec["base"]).is_absolute()
            else spec["base"]
        )
    seeds = spec.get("seeds") or [None]
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            overrides = [o for k, v in zip(keys, values) for o in _as_overrides(k, v)]
            label = "__".join(_label(k, v) for k, v in zip(keys, values))
            if seed is not None:
                overrides.append(f"seed={seed}")
                label += f"__seed{seed}"
            runs.append(Run(label, list(spec.get("overrides") or []) + overrides))
    return spec, runs


def check_runs(spec: dict[str, Any], runs: list[Run]) -> None:
    """Load and validate every run's config before anything starts (a typo fails in seconds)."""
    import_user_modules(list(spec.get("imports") or []))
    for run in runs:
        try:
            validate(load_config(spec.get("base"), run.overrides))
        except ConfigError as err:
            raise ConfigError(f"sweep run '{run.name}': {err}") from err


def fit_args(spec: dict[str, Any], run: Run, sweep_dir: Path) -> list[str]:
    args = ["fit"] + (["--config", spec["base"]] if spec.get("base") else [])
    for item in spec.get("imports") or []:
        args += ["--import", item]
    return (
        args
        + run.overrides
        + [f"logging.root={sweep_dir}", f"logging.name={run.name}", "logging.progress=false"]
    )


def launch(spec: dict[str, Any], runs: list[Run], sweep_dir: Path, dry_run: bool = False) -> list[str]:
    """Run the grid; returns the runs that failed. Finished runs (a config and a last.ckpt) are
    skipped, so an interrupted sweep is continued by launching it again."""
    todo = [r for r in runs if not (sweep_dir / r.name / "checkpoints" / "last.ckpt").is_file()]
    for r in todo:
        if (sweep_dir / r.name).exists():
            raise ConfigError(
                f"{sweep_dir / r.name} exists but has no last.ckpt (a crashed run?); "
                "move it away to rerun it, it is never overwritten"
            )
    if dry_run:
        for r in todo:
            print("python -m lightning_entropy " + " ".join(fit_args(spec, r, sweep_dir)))
        return []
    if spec.get("launcher", "local") == "slurm":
        return _launch_slurm(spec, todo, sweep_dir)
    failed = []
    for i, r in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {r.name}", flush=True)
        log = sweep_dir / f"{r.name}.log"
        with open(log, "w") as fh:
            rc = subprocess.call(
                [sys.executable, "-m", "lightning_entropy", *fit_args(spec, r, sweep_dir)],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        if rc != 0:
            failed.append(r.name)
            print(f"  failed (exit {rc}); see {log}", flush=True)
    return failed


def _launch_slurm(spec: dict[str, Any], runs: list[Run], sweep_dir: Path) -> list[str]:
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
    jobs = [executor.submit(main, fit_args(spec, r, sweep_dir)) for r in runs]
    print(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs)}")
    failed = []
    for r, j in zip(runs, jobs):
        try:
            if j.result() != 0:
                failed.append(r.name)
        except Exception as err:  # a job that crashed or was cancelled
            failed.append(r.name)
            print(f"{r.name}: {err}")
    return failed


def results_table(sweep_dir: Path, runs: list[Run]) -> tuple[list[dict[str, Any]], str]:
    """Last value of each result metric per run; written to results.csv and returned as text."""
    from lightning_entropy.report import read_metrics

    rows = []
    for r in runs:
        series = read_metrics(sweep_dir / r.name) if (sweep_dir / r.name).is_dir() else {}
        row: dict[str, Any] = {"run": r.name}
        for k in RESULT_KEYS:
            pts = series.get(k)
            row[k] = pts[-1][1] if pts else math.nan
        rows.append(row)
    with open(sweep_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["run", *RESULT_KEYS])
        w.writeheader()
        w.writerows(rows)
    head = ["run", *RESULT_KEYS]
    cells = [head] + [[row["run"]] + [f"{row[k]:.4f}" for k in RESULT_KEYS] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return rows, "\n".join(lines)


def run_sweep(path: str | Path, root: str | None = None, dry_run: bool = False) -> int:
    spec, runs = load_sweep(path)
    check_runs(spec, runs)
    sweep_dir = Path(root or spec.get("root") or "runs") / spec["name"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweep '{spec['name']}': {len(runs)} runs -> {sweep_dir}")
    failed = launch(spec, runs, sweep_dir, dry_run=dry_run)
    if dry_run:
        return 0
    _, table = results_table(sweep_dir, runs)
    print(table)
    print(f"results: {sweep_dir / 'results.csv'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return 1 if failed else 0
