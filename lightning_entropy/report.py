"""Run summaries: read a run directory's metrics, print a table, draw entropy/reward/accuracy curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

SUMMARY_KEYS = (
    "val/acc",
    "val/pass@1",
    "val/pass@8",
    "train/reward",
    "train/entropy",
    "train/entropy_p90",
    "train/cov_logp_adv",
    "train/response_len",
    "adv/zero_frac",
    "train/approx_kl",
)


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series per metric, keyed by RL step, merged over resumed runs (a later version wins a step)."""
    files = sorted(
        Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    series: dict[str, dict[int, float]] = {}
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                step = row.get("rl_step") or row.get("step")
                if step in (None, ""):
                    continue
                for k, v in row.items():
                    if k in ("step", "rl_step", "epoch") or v in (None, ""):
                        continue
                    series.setdefault(k, {})[int(float(step))] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}


def summary_table(series: dict[str, list[tuple[int, float]]]) -> str:
    rows = [("metric", "first (step)", "last (step)", "min", "max")]
    for k in SUMMARY_KEYS:
        pts = [(s, v) for s, v in series.get(k, []) if not math.isnan(v)]
        if not pts:
            continue
        vals = [v for _, v in pts]
        rows.append(
            (
                k,
                f"{pts[0][1]:.4f} ({pts[0][0]})",
                f"{pts[-1][1]:.4f} ({pts[-1][0]})",
                f"{min(vals):.4f}",
                f"{max(vals):.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(series: dict[str, list[tuple[int, float]]], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            "Token entropy (nats)",
            ["train/entropy", "train/entropy_p10", "train/entropy_p90", "train/entropy_selected"],
        ),
        ("Reward", ["train/reward"]),
        ("Validation", ["val/acc"] + sorted(k for k in series if k.startswith("val/pass@"))),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = series.get(k)
            if pts:
                ax.plot(
                    [s for s, _ in pts],
                    [v for _, v in pts],
                    marker="o" if len(pts) < 30 else None,
                    markersize=3,
                    label=k.split("/", 1)[1],
                )
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
