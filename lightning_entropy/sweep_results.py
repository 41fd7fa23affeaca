"""A sweep's results: one row per run, mean ± std over seeds per grid point, an overlay figure.

Only finished runs (a ``done.json``, see ``completion.py``) contribute numbers; a run without one is
listed as unfinished with empty cells, never with its partial metrics standing in for final ones.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_entropy.completion import read_marker

if TYPE_CHECKING:
    from lightning_entropy.sweep import Run

RESULT_KEYS = ("val/acc", "val/pass@1", "val/pass@8", "train/reward", "train/entropy", "train/cov_logp_adv")
OVERLAY_KEYS = ("train/entropy", "train/reward", "val/acc")


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (n-1); NaN propagates (statistics.stdev raises on it)."""
    if not vals:
        return None, None
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    cells = [head, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_rows(sweep_dir: Path, runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run: status, the step it finished at, and its final metrics (None if unfinished)."""
    rows = []
    for r in runs:
        marker = read_marker(sweep_dir / r.name)
        row: dict[str, Any] = {
            "run": r.name,
            "status": "finished" if marker else "unfinished",
            "rl_steps": marker["rl_steps"] if marker else None,
        }
        for k in RESULT_KEYS:
            row[k] = marker["metrics"].get(k, math.nan) if marker else None
        rows.append(row)
    return rows


def results_table(sweep_dir: Path, runs: list[Run]) -> str:
    """Write ``results.csv`` (empty cells for unfinished runs) and return it as text."""
    rows = run_rows(sweep_dir, runs)
    fields = ["run", "status", "rl_steps", *RESULT_KEYS]
    with open(sweep_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows([{k: "" if row[k] is None else row[k] for k in fields} for row in rows])
    return _text_table(
        fields,
        [
            [row["run"], row["status"], str(row["rl_steps"] or "-")] + [_cell(row[k]) for k in RESULT_KEYS]
            for row in rows
        ],
    )


def point_rows(sweep_dir: Path, runs: list[Run]) -> list[dict[str, Any]]:
    """Per grid point: finished seeds out of all, and mean and sample std (n-1) over the finished seeds.

    A point with no finished seed has no mean; one with a single finished seed has no std.
    """
    by_point: dict[str, list[dict[str, Any]]] = {}
    for r, row in zip(runs, run_rows(sweep_dir, runs)):
        by_point.setdefault(r.point, []).append(row)
    out = []
    for point, rows in by_point.items():
        done = [row for row in rows if row["status"] == "finished"]
        res: dict[str, Any] = {"point": point, "finished": len(done), "seeds": len(rows)}
        for k in RESULT_KEYS:
            res[f"{k}_mean"], res[f"{k}_std"] = _mean_std([row[k] for row in done])
        out.append(res)
    return out


def results_by_point(sweep_dir: Path, runs: list[Run]) -> str:
    """Write ``results_by_point.csv`` and return it as text (``mean ± std``)."""
    rows = point_rows(sweep_dir, runs)
    fields = ["point", "finished", "seeds"] + [f"{k}_{s}" for k in RESULT_KEYS for s in ("mean", "std")]
    with open(sweep_dir / "results_by_point.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows([{k: "" if row[k] is None else row[k] for k in fields} for row in rows])

    def pm(row: dict[str, Any], k: str) -> str:
        mean, std = row[f"{k}_mean"], row[f"{k}_std"]
        return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")

    return _text_table(
        ["point", "seeds done", *RESULT_KEYS],
        [
            [row["point"], f"{row['finished']}/{row['seeds']}"] + [pm(row, k) for k in RESULT_KEYS]
            for row in rows
        ],
    )


def point_curves(
    sweep_dir: Path, runs: list[Run], key: str
) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per grid point, ``key`` against RL step over its finished seeds: (steps, mean, std).

    Only steps that every finished seed logged are kept, so a band never mixes different seed counts;
    std is the sample std (0 with one seed). Points with no finished seed, or no value, are left out.
    """
    from lightning_entropy.report import read_metrics

    per_point: dict[str, list[dict[int, float]]] = {}
    for r in runs:
        if read_marker(sweep_dir / r.name) is None:
            continue
        series = dict(read_metrics(sweep_dir / r.name).get(key, []))
        per_point.setdefault(r.point, []).append(series)
    out = {}
    for point, seeds in per_point.items():
        steps = sorted(set.intersection(*(set(s) for s in seeds)))
        if not steps:
            continue
        stats = [_mean_std([s[t] for s in seeds]) for t in steps]
        out[point] = (steps, [m for m, _ in stats], [s or 0.0 for _, s in stats])
    return out


def overlay_figure(sweep_dir: Path, runs: list[Run], keys: tuple[str, ...] = OVERLAY_KEYS) -> Path:
    """``overlay.png``: one panel per metric, one line per grid point (mean over seeds, ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for point, (steps, mean, std) in point_curves(sweep_dir, runs, key).items():
            (line,) = ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, markersize=3, label=point)
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = sweep_dir / "overlay.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
