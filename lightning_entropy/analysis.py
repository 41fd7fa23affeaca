"""Runs and sweeps as tidy tables for notebooks.

    from lightning_entropy.analysis import load_run, load_sweep
    df = load_run("runs/fit-...")        # one row per (step, metric): run, step, metric, value, + config
    df[df.metric == "train/entropy"].plot(x="step", y="value")
    sw = load_sweep("runs/entropy_methods")  # every run of a sweep, with point and seed columns

Every logged metric (training and validation, merged over resumed versions) is a row; the run's
resolved config is flattened into columns named by their dotted keys (``optim.lr``, ``loss.name``),
so grouping by any config key is one ``groupby``. Returns a pandas DataFrame when pandas is
installed, else a dict of equal-length column lists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning_entropy.report import read_metrics

SEED_SUFFIX = re.compile(r"__seed(-?\d+)$")


def _config_columns(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:  # lists become their text so a column holds one hashable kind
            out[prefix[:-1]] = str(node) if isinstance(node, (list, dict)) else node

    walk(tree, "")
    return out


def _rows(run_dir: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    config = _config_columns(run_dir)
    rows = []
    for metric, points in sorted(read_metrics(run_dir).items()):
        for step, value in points:
            rows.append(
                {"run": run_dir.name, **extra, "step": step, "metric": metric, "value": value, **config}
            )
    return rows


def _table(rows: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return {c: [r.get(c) for r in rows] for c in columns}
    return pd.DataFrame(rows)


def _check_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not any(run_dir.glob("logs/version_*/metrics.csv")):
        raise FileNotFoundError(f"{run_dir}: no logs/version_*/metrics.csv (not a run directory of `fit`)")


def load_run(run_dir: str | Path) -> Any:
    """Every metric of one run: columns run, step, metric, value, then the config keys."""
    run_dir = Path(run_dir)
    _check_run(run_dir)
    return _table(_rows(run_dir, {}))


def sweep_runs(sweep_dir: str | Path) -> list[tuple[Path, str, int | None]]:
    """(run directory, grid point, seed) of every run under a sweep directory; the point is the run's
    name without its ``__seed<k>`` suffix, as ``sweep`` names runs."""
    out = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        if any(d.glob("logs/version_*/metrics.csv")):
            m = SEED_SUFFIX.search(d.name)
            out.append((d, d.name[: m.start()] if m else d.name, int(m.group(1)) if m else None))
    return out


def load_sweep(sweep_dir: str | Path) -> Any:
    """Every metric of every run of a sweep: ``load_run``'s columns plus ``point`` and ``seed``."""
    sweep_dir = Path(sweep_dir)
    runs = sweep_runs(sweep_dir) if sweep_dir.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no run directories with metrics (not a sweep directory)")
    return _table([r for d, point, seed in runs for r in _rows(d, {"point": point, "seed": seed})])
