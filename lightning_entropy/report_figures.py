"""The figures of ``report``: one function per figure, each returning its path (None when the run
logged nothing it could draw). Axes carry units; legends sit where they hide no curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Series = dict[str, list[tuple[int, float]]]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _xy(series: Series, key: str) -> tuple[list[int], list[float]]:
    pts = [(s, v) for s, v in series.get(key, []) if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def _save(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out


def _line(ax: Any, series: Series, key: str, label: str | None = None, **kw: Any) -> bool:
    x, y = _xy(series, key)
    if not x:
        return False
    ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label or key, **kw)
    return True


def _finish(ax: Any, title: str, ylabel: str, xlabel: str = "RL step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.6)


def entropy_dynamics(series: Series, out: Path) -> Path | None:
    x, mean = _xy(series, "train/entropy")
    if not x:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = dict(series.get("train/entropy_p10", [])), dict(series.get("train/entropy_p90", []))
    band = [s for s in x if s in lo and s in hi]
    if band:
        ax.fill_between(band, [lo[s] for s in band], [hi[s] for s in band], alpha=0.2, label="p10-p90")
    ax.plot(x, mean, label="mean (token-mean)")
    _line(ax, series, "train/entropy_p50", "median", linestyle="--")
    _line(ax, series, "train/entropy_selected", "selected tokens", linestyle=":")
    _finish(ax, "Token entropy of the training rollouts", "entropy (nats)")
    return _save(fig, out)


def entropy_change(series: Series, out: Path) -> Path | None:
    from lightning_entropy.report import CHANGE_PREDICTORS, change_pairs, pearson

    panels = [(n, lab, change_pairs(series, n)) for n, lab in CHANGE_PREDICTORS.items()]
    if not any(p for _, _, p in panels):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (_, label, pairs) in zip(axes[0], panels):
        if pairs:
            xs, ys = [p for p, _ in pairs], [m for _, m in pairs]
            ax.scatter(xs, ys, s=18, alpha=0.8, label="one RL step")
            corr, slope = pearson(pairs)
            if math.isfinite(slope):
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                lo, hi = min(xs), max(xs)
                ax.plot(
                    [lo, hi],
                    [my + slope * (lo - mx), my + slope * (hi - mx)],
                    color="C1",
                    label=f"fit: slope {slope:.3g}, r = {corr:.2f}",
                )
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.axvline(0, color="grey", linewidth=0.5)
        _finish(
            ax,
            f"Measured vs predicted ({label})",
            "measured mean dH per step (nats)",
            f"predicted {label} (nats per unit step)",
        )
    return _save(fig, out)


def law(series: Series, fits: dict[str, dict[str, float]], out: Path) -> Path | None:
    from lightning_entropy.diagnostics.maths import entropy_law
    from lightning_entropy.report import law_points

    targets = [t for t in fits if law_points(series, t)]
    if not targets:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
    for ax, t in zip(axes[0], targets):
        pts, f = law_points(series, t), fits[t]
        k = int(f["fitted_on"])
        ax.scatter(
            [h for _, h, _ in pts[:k]], [r for _, _, r in pts[:k]], label="validations (fitted)", zorder=3
        )
        if pts[k:]:
            ax.scatter(
                [h for _, h, _ in pts[k:]],
                [r for _, _, r in pts[k:]],
                marker="x",
                label=f"held out (RMSE {f['rmse_rest']:.3g})",
                zorder=3,
            )
        if math.isfinite(f["a"]):
            hs = [h for _, h, _ in pts]
            grid = [min(hs) * (1 - i / 50) + max(hs) * i / 50 for i in range(51)]
            grid = [0.0] + grid if min(hs) > 0 else grid
            ax.plot(
                grid,
                [entropy_law(h, f["a"], f["b"]) for h in grid],
                color="C2",
                label=f"R = -{f['a']:.3g} exp(H) + {f['b']:.3g}",
            )
            ax.axhline(f["ceiling"], color="C3", linestyle="--", label=f"ceiling b - a = {f['ceiling']:.3g}")
        _finish(ax, f"{t} vs training entropy", t.split("/")[1], "mean token entropy of the rollout (nats)")
    return _save(fig, out)


def pass_at_k(series: Series, out: Path) -> Path | None:
    ks = sorted(int(k.split("@")[1]) for k in series if k.startswith("val/pass@"))
    if not ks:
        return None
    steps = sorted({s for k in ks for s, _ in series[f"val/pass@{k}"]})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for i, step in enumerate(steps):
        vals = [(k, dict(series[f"val/pass@{k}"]).get(step)) for k in ks]
        vals = [(k, v) for k, v in vals if v is not None]
        ax.plot(
            [k for k, _ in vals],
            [v for _, v in vals],
            marker="o",
            markersize=3,
            color=cmap(i / max(1, len(steps) - 1)),
            label=f"step {step}",
        )
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.02)
    _finish(ax, "Unbiased pass@k at each validation", "pass@k (fraction of problems)", "k (samples)")
    if len(steps) > 8:  # a legend of many steps would cover the curves: a colour bar instead
        ax.get_legend().remove()
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(steps[0], steps[-1]))
        fig.colorbar(sm, ax=ax, label="RL step")
    return _save(fig, out)


def answers(series: Series, out: Path) -> Path | None:
    panels = [
        ("Answer entropy per group", "answer entropy (nats)", ["train/answer_entropy", "val/answer_entropy"]),
        (
            "Distinct answers per group",
            "distinct answers",
            ["train/distinct_answers", "val/distinct_answers"],
        ),
        ("Support: problems solved by any of n samples", "fraction of problems", ["val/support", "val/acc"]),
    ]
    if not any(series.get(k) for _, _, keys in panels for k in keys):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, (title, ylabel, keys) in zip(axes, panels):
        for k in keys:
            _line(ax, series, k)
        _finish(ax, title, ylabel)
    return _save(fig, out)


def hidden(series: Series, out: Path) -> Path | None:
    layers = sorted(
        (int(k.rsplit("layer", 1)[1]), k) for k in series if k.startswith("val/lens_entropy_layer")
    )
    if not layers and not series.get("val/effective_rank"):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    steps = sorted({s for _, k in layers for s, _ in series[k]})
    cmap = plt.get_cmap("viridis")
    for i, step in enumerate(steps):
        pts = [(n, dict(series[k]).get(step)) for n, k in layers]
        pts = [(n, v) for n, v in pts if v is not None]
        axes[0].plot(
            [n for n, _ in pts],
            [v for _, v in pts],
            marker="o",
            markersize=3,
            color=cmap(i / max(1, len(steps) - 1)),
            label=f"step {step}",
        )
    if layers:
        axes[0].set_xticks([n for n, _ in layers])
    _finish(axes[0], "Logit-lens entropy of each layer's policy", "entropy (nats)", "decoder layer")
    _line(axes[1], series, "val/effective_rank", "effective rank")
    _finish(axes[1], "Effective rank of responses' last hidden states", "effective rank (dimensions)")
    return _save(fig, out)


def sweep_overlay(
    curves: dict[str, dict[str, tuple[list[int], list[float], list[float]]]], out: Path
) -> Path:
    """One panel per metric, one line per grid point (mean over seeds) with a +-std band; a single
    legend below the panels so that no curve is hidden."""
    plt = _plt()
    keys = list(curves)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    colors: dict[str, Any] = {}
    for ax, key in zip(axes.flat, keys):
        for point, (steps, mean, std) in curves[key].items():
            color = colors.setdefault(point, f"C{len(colors) % 10}")
            ax.plot(
                steps, mean, color=color, marker="o" if len(steps) < 30 else None, markersize=3, label=point
            )
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=color,
                alpha=0.2,
                linewidth=0,
            )
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=p) for p, c in colors.items()]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(4, max(1, len(handles))),
        fontsize=8,
        title="grid point (line: mean over seeds, band: ± std)",
    )
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(handles) / 4), 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
