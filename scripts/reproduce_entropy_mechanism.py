"""Reproduce the figures of "The Entropy Mechanism of RL for Reasoning LMs" (arXiv 2505.22617) on the
built-in testbed: GRPO against Clip-Cov, KL-Cov, an entropy bonus, 80/20 high-entropy tokens and QAE.

    python scripts/reproduce_entropy_mechanism.py                 # run the sweep (skips finished runs), draw
    python scripts/reproduce_entropy_mechanism.py --plot-only     # draw from the runs already there
    python scripts/reproduce_entropy_mechanism.py --jobs 8        # 8 runs at a time (threads/GPUs shared out)
    python scripts/reproduce_entropy_mechanism.py --sweep S.yaml --root runs -- trainer.max_steps=50

The runs are the sweep ``configs/sweeps/entropy_mechanism.yaml`` (every method recipe x 3 seeds, each an
ordinary ``fit`` of a shipped config), launched through ``python -m lightning_entropy sweep``, so a
relaunch resumes unfinished runs and Slurm works as for any sweep. The script then writes, into the
sweep directory:

- ``entropy_mechanism.png``: token entropy vs step; greedy accuracy vs step; pass@1 and pass@k (largest
  k) vs step; accuracy vs entropy with R = -a*exp(H) + b fitted on GRPO's points (the paper's law);
  mean over seeds with a band of +- one standard deviation.
- ``entropy_mechanism.md``: per method, entropy, accuracy, pass@1 and pass@k at the end (mean +- std
  over seeds), and the fitted a, b and ceiling b - a of each method's own points.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = ROOT / "configs" / "sweeps" / "entropy_mechanism.yaml"


def fit_law(entropy: np.ndarray, reward: np.ndarray) -> tuple[float, float]:
    """(a, b) of R = -a*exp(H) + b: the package's fit (diagnostics.maths), the one `report` uses."""
    from lightning_entropy.diagnostics.maths import fit_entropy_law

    return fit_entropy_law([float(h) for h in entropy], [float(r) for r in reward])


def load_runs(sweep_file: Path, root: Path) -> dict[str, list[dict[str, list[tuple[int, float]]]]]:
    """Method (grid point) -> the metric series of each finished seed."""
    from lightning_entropy.completion import read_marker
    from lightning_entropy.report import read_metrics
    from lightning_entropy.sweep import load_sweep

    spec, runs = load_sweep(sweep_file)
    sweep_dir = root / spec["name"]
    out: dict[str, list[dict[str, list[tuple[int, float]]]]] = {}
    for r in runs:
        if read_marker(sweep_dir / r.name) is not None:
            out.setdefault(r.point, []).append(read_metrics(sweep_dir / r.name))
    return out


def band(
    seeds: list[dict[str, list[tuple[int, float]]]], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps every seed logged ``key`` at, the mean and the std over seeds there."""
    per_seed = [dict(s.get(key, [])) for s in seeds]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    values = np.array([[d[t] for t in steps] for d in per_seed], dtype=float).reshape(
        len(per_seed), len(steps)
    )
    std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(steps))
    return np.array(steps), values.mean(axis=0), std


def entropy_at(seeds: list[dict[str, list[tuple[int, float]]]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(training entropy, metric) pairs at every step where the metric was logged, over all seeds."""
    hs, rs = [], []
    for s in seeds:
        ent = dict(s.get("train/entropy", []))
        for step, value in s.get(key, []):
            near = [t for t in ent if t <= step]
            if near and not math.isnan(value):
                hs.append(ent[max(near)])
                rs.append(value)
    return np.array(hs), np.array(rs)


def largest_k(methods: dict[str, list[dict[str, list[tuple[int, float]]]]]) -> str | None:
    ks = {
        int(k.split("@")[1])
        for seeds in methods.values()
        for s in seeds
        for k in s
        if k.startswith("val/pass@")
    }
    return f"val/pass@{max(ks)}" if ks else None


def draw(methods: dict[str, list[dict[str, list[tuple[int, float]]]]], baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passk = largest_k(methods)
    panels = [
        ("train/entropy", "token entropy (nats)", "Entropy"),
        ("val/acc", "greedy accuracy", "Validation accuracy"),
        ("val/pass@1", "pass@1", "pass@1"),
        (
            passk,
            passk.split("/")[1] if passk else "",
            f"{passk.split('/')[1] if passk else 'pass@k'} (largest k)",
        ),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(26, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, (name, seeds) in enumerate(methods.items()):
            if key is None:
                continue
            steps, mean, std = band(seeds, key)
            if not len(steps):
                continue
            c = colors[i % len(colors)]
            ax.plot(steps, mean, color=c, label=f"{name} (n={len(seeds)})")
            ax.fill_between(steps, mean - std, mean + std, color=c, alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel="RL step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    ax = axes[4]
    for i, (name, seeds) in enumerate(methods.items()):
        h, r = entropy_at(seeds, "val/acc")
        ax.scatter(h, r, s=12, color=colors[i % len(colors)], label=name)
    if baseline in methods:
        h, r = entropy_at(methods[baseline], "val/acc")
        if len(h) >= 2:
            a, b = fit_law(h, r)
            grid = np.linspace(0.0, max(h.max(), 1e-3) * 1.05, 100)
            ax.plot(
                grid,
                -a * np.exp(grid) + b,
                "k--",
                label=f"{baseline}: R=-{a:.3f}e^H+{b:.3f} (H=0: {b - a:.3f})",
            )
    ax.set(title="Accuracy vs entropy, fitted law", xlabel="token entropy (nats)", ylabel="greedy accuracy")
    ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    axes[4].legend(fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(methods: dict[str, list[dict[str, list[tuple[int, float]]]]]) -> str:
    passk = largest_k(methods)
    keys = ["train/entropy", "val/acc", "val/pass@1"] + ([passk] if passk else [])

    def cell(seeds: list[dict[str, list[tuple[int, float]]]], key: str, at: int) -> str:
        vals = [s[key][at][1] for s in seeds if s.get(key)]
        if not vals:
            return "-"
        sd = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
        return f"{np.mean(vals):.3f}{sd}"

    head = (
        ["method", "seeds"]
        + [f"{k.split('/')[1]} start" for k in keys[:1]]
        + [f"{k.split('/')[1]} end" for k in keys]
    )
    head += ["law a", "law b", "ceiling b-a"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, seeds in methods.items():
        row = [name, str(len(seeds)), cell(seeds, keys[0], 0)] + [cell(seeds, k, -1) for k in keys]
        h, r = entropy_at(seeds, "val/acc")
        if len(h) >= 3 and np.ptp(h) > 0:
            a, b = fit_law(h, r)
            row += [f"{a:.3f}", f"{b:.3f}", f"{b - a:.3f}"]
        else:
            row += ["-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def with_overrides(sweep_file: Path, overrides: list[str], root: Path) -> Path:
    """A copy of the sweep file with more fixed overrides (paths made absolute), beside its runs."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(sweep_file))
    here = sweep_file.resolve().parent
    if spec.get("base"):
        spec["base"] = str((here / spec["base"]).resolve())
    if "config" in spec.get("grid", {}):
        spec["grid"]["config"] = [str((here / c).resolve()) for c in spec["grid"]["config"]]
    spec["overrides"] = list(spec.get("overrides") or []) + overrides
    # its own sweep directory: finished runs of other settings must not stand in for these
    tag = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    spec["name"] = f"{spec.get('name', sweep_file.stem)}-{tag}"
    out = root / f"{spec['name']}.sweep.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(OmegaConf.to_yaml(OmegaConf.create(spec)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(DEFAULT_SWEEP), help="the sweep file (default: the shipped one)")
    ap.add_argument("--root", default="runs", help="where sweeps go (default runs/)")
    ap.add_argument("--plot-only", action="store_true", help="draw from finished runs, start nothing")
    ap.add_argument("--baseline", default="grpo", help="the grid point the law is fitted on (default grpo)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (the sweep's --jobs; default 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    overrides = argv[cut + 1 :]  # after --: key=value overrides for every run
    args = ap.parse_args(argv[:cut])
    sweep_file, root = Path(args.sweep), Path(args.root)
    if overrides:
        sweep_file = with_overrides(sweep_file, overrides, root)
    if not args.plot_only:
        cmd = [sys.executable, "-m", "lightning_entropy", "sweep", str(sweep_file), "--root", str(root)]
        cmd += ["--jobs", str(args.jobs)]
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            print(
                f"reproduce: the sweep exited with {done.returncode}; drawing what finished", file=sys.stderr
            )
    from lightning_entropy.sweep import load_sweep

    spec, _ = load_sweep(sweep_file)
    methods = load_runs(sweep_file, root)
    if not methods:
        print(f"reproduce: no finished runs under {root / spec['name']}", file=sys.stderr)
        return 1
    out = root / spec["name"]
    draw(methods, args.baseline, out / "entropy_mechanism.png")
    text = table(methods)
    (out / "entropy_mechanism.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'entropy_mechanism.png'} and {out / 'entropy_mechanism.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
