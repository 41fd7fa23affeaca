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


# ---- report.md: the law, measured vs predicted entropy change, the diagnostics ---------------------
Series = dict[str, list[tuple[int, float]]]
LAW_TARGETS = ("val/acc", "val/pass@1")
CHANGE_PREDICTORS = {
    "cov": "-Cov(log pi, A)",
    "disc": "-mean A (S - N)",
    "linear": "grad H . delta theta",
}


def law_points(series: Series, target: str) -> list[tuple[int, float, float]]:
    """(step, H, R) per validation: R = ``target`` at step s, H = the training rollout's mean token
    entropy at step s (the rollout drawn by the validated policy), else at the latest earlier step
    (the final validation comes after the last rollout)."""
    entropy = [(s, v) for s, v in series.get("train/entropy", []) if math.isfinite(v)]
    out = []
    for step, r in series.get(target, []):
        before = [v for s, v in entropy if s <= step]
        if before and math.isfinite(r):
            out.append((step, before[-1], r))
    return out


def law_fit(series: Series, target: str, fit_points: int | None = None) -> dict[str, float]:
    """R = -a exp(H) + b fitted on the first ``fit_points`` validations (all when None), METHODS §6.1;
    ``rmse_rest`` is the prediction error on the validations after them (NaN when none are left)."""
    from lightning_entropy.diagnostics.maths import entropy_law, fit_entropy_law

    pts = law_points(series, target)
    k = len(pts) if fit_points is None else min(fit_points, len(pts))
    a, b = fit_entropy_law([h for _, h, _ in pts[:k]], [r for _, _, r in pts[:k]])
    rest = [(r - entropy_law(h, a, b)) ** 2 for _, h, r in pts[k:]]
    rmse = math.sqrt(sum(rest) / len(rest)) if rest and math.isfinite(a) else math.nan
    return {
        "a": a,
        "b": b,
        "ceiling": b - a,
        "fitted_on": float(k),
        "points": float(len(pts)),
        "rmse_rest": rmse,
    }


def change_pairs(series: Series, name: str) -> list[tuple[float, float]]:
    """(predicted, measured) entropy change at every step where both were logged."""
    pred = dict(series.get(f"diag/dH_pred_{name}", []))
    return [(pred[s], m) for s, m in series.get("diag/dH_measured", []) if s in pred]


def pearson(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """(correlation, least-squares slope of the second on the first); NaN when undefined."""
    from lightning_entropy.diagnostics.maths import RunningFit

    fit = RunningFit()
    for x, y in pairs:
        fit.update(x, y)
    return fit.corr, fit.slope


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v + 0.0:.4g}"  # no "-0"


def markdown_summary(series: Series) -> list[str]:
    lines = ["| metric | first (step) | last (step) | min | max |", "|---|---|---|---|---|"]
    keys = list(SUMMARY_KEYS) + [k for k in DIAGNOSTIC_KEYS if k not in SUMMARY_KEYS]
    for k in keys:
        pts = [(s, v) for s, v in series.get(k, []) if math.isfinite(v)]
        if pts:
            vals = [v for _, v in pts]
            lines.append(
                f"| {k} | {pts[0][1]:.4f} ({pts[0][0]}) | {pts[-1][1]:.4f} ({pts[-1][0]}) "
                f"| {min(vals):.4f} | {max(vals):.4f} |"
            )
    return lines


DIAGNOSTIC_KEYS = (
    "train/answer_entropy",
    "train/distinct_answers",
    "val/answer_entropy",
    "val/distinct_answers",
    "val/support",
    "val/effective_rank",
    "diag/dH_measured",
)


def write_report(run_dir: str | Path, fit_points: int | None = None) -> Path:
    """``RUN_DIR/report.md`` and its figures (``report_*.png``) from the run's logged metrics."""
    from lightning_entropy import report_figures as F

    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    fits = {t: law_fit(series, t, fit_points) for t in LAW_TARGETS}
    md = [f"# Report: {run_dir.name}", "", "## Summary", "", *markdown_summary(series), ""]
    md += ["## Entropy-performance law R = -a exp(H) + b (arXiv 2505.22617)", ""]
    md += ["| target | a | b | ceiling b - a | fitted on | RMSE on the rest |", "|---|---|---|---|---|---|"]
    for t, f in fits.items():
        md.append(
            f"| {t} | {_fmt(f['a'])} | {_fmt(f['b'])} | {_fmt(f['ceiling'])} | "
            f"{int(f['fitted_on'])} of {int(f['points'])} validations | {_fmt(f['rmse_rest'])} |"
        )
    md += ["", "## Measured vs predicted entropy change (same tokens before and after each step)", ""]
    md += [
        "| predictor | steps | correlation | slope (measured per unit of predicted) |",
        "|---|---|---|---|",
    ]
    for name, label in CHANGE_PREDICTORS.items():
        pairs = change_pairs(series, name)
        corr, slope = pearson(pairs)
        md.append(f"| {label} | {len(pairs)} | {_fmt(corr)} | {_fmt(slope)} |")
    if not change_pairs(series, "cov"):
        md += ["", "(not measured: run with `diagnostics.entropy_change=true`)"]
    figures = [
        ("Token entropy with its 10-90% band", F.entropy_dynamics(series, run_dir / "report_entropy.png")),
        (
            "Measured vs predicted entropy change",
            F.entropy_change(series, run_dir / "report_entropy_change.png"),
        ),
        ("Accuracy vs entropy and the fitted law", F.law(series, fits, run_dir / "report_law.png")),
        ("pass@k over training", F.pass_at_k(series, run_dir / "report_pass_at_k.png")),
        ("Answers and support", F.answers(series, run_dir / "report_answers.png")),
        (
            "Hidden states: logit-lens entropy per layer, effective rank",
            F.hidden(series, run_dir / "report_hidden.png"),
        ),
    ]
    md += ["", "## Figures", ""]
    md += [f"### {title}\n\n![{title}]({path.name})\n" for title, path in figures if path is not None]
    out = run_dir / "report.md"
    out.write_text("\n".join(md) + "\n")
    return out


# ---- report SWEEP_DIR: grid points as lines, seeds as bands, mean ± std ---------------------------
SWEEP_KEYS = (
    "train/entropy",
    "train/reward",
    "val/acc",
    "val/pass@1",
    "train/answer_entropy",
    "val/support",
    "diag/dH_measured",
    "train/cov_logp_adv",
)


def is_sweep_dir(path: str | Path) -> bool:
    from lightning_entropy.analysis import sweep_runs

    path = Path(path)
    return path.is_dir() and not (path / "logs").is_dir() and bool(sweep_runs(path))


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """``SWEEP_DIR/report.md`` + ``report_overlay.png`` over the finished runs (a ``done.json``)."""
    from lightning_entropy import report_figures as F
    from lightning_entropy.analysis import sweep_runs
    from lightning_entropy.sweep import Run
    from lightning_entropy.sweep_results import _mean_std, point_curves, run_rows

    sweep_dir = Path(sweep_dir)
    runs = [Run(d.name, [], point, seed) for d, point, seed in sweep_runs(sweep_dir)]
    curves = {k: c for k in SWEEP_KEYS if (c := point_curves(sweep_dir, runs, k))}
    finals: dict[str, list[dict[str, float]]] = {}
    for r, row in zip(runs, run_rows(sweep_dir, runs)):
        if row["status"] == "finished":
            finals.setdefault(r.point, []).append(read_marker_metrics(sweep_dir / r.name))
    keys = [k for k in SWEEP_KEYS if any(k in m for ms in finals.values() for m in ms)]
    md = [f"# Sweep report: {sweep_dir.name}", "", "Final values, mean ± sample std over finished seeds.", ""]
    md += ["| grid point | seeds done | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for point in dict.fromkeys(r.point for r in runs):
        ms = finals.get(point, [])
        cells = []
        for k in keys:
            mean, std = _mean_std([m[k] for m in ms if k in m])
            cells.append("-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}"))
        done = f"{len(ms)}/{sum(r.point == point for r in runs)}"
        md.append(f"| {point} | {done} | " + " | ".join(cells) + " |")
    if curves:
        fig = F.sweep_overlay(curves, sweep_dir / "report_overlay.png")
        md += ["", f"![metrics over training, one line per grid point]({fig.name})"]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(md) + "\n")
    return out


def read_marker_metrics(run_dir: Path) -> dict[str, float]:
    from lightning_entropy.completion import read_marker

    marker = read_marker(run_dir)
    return {k: v for k, v in (marker or {}).get("metrics", {}).items() if math.isfinite(v)}
