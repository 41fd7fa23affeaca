"""Run every shipped method config for N RL steps and say which ones hurt the policy.

    python scripts/check_recipes.py --steps 150                  # every configs/*.yaml method recipe
    python scripts/check_recipes.py --steps 150 clip_cov kl_cov  # some of them
    python scripts/check_recipes.py --steps 2 --out /tmp/rc -- data.val_size=16   # overrides for all
    python scripts/check_recipes.py --jobs 4                     # 4 configs at a time

Each config runs through the command line exactly as a user runs it (``fit --config``), ``--jobs`` at a
time (each then gets its share of the CPU threads unless OMP_NUM_THREADS is set), into
``--out/<name>``; a run that already finished there (its ``done.json``) is read, not rerun.
Then one row per config: validation accuracy and pass@k at the first and last validation, token entropy
at the first and last step, mean approx-KL per RL step, and a flag when the last accuracy is below the
first. The flag is a plain comparison; the accuracy's binomial standard error is printed beside it so
that a drop within noise reads as such.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_METHODS = {"default", "testbed"}  # the settings themselves, not method recipes


def method_configs(names: list[str]) -> list[Path]:
    shipped = {p.stem: p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem not in NOT_METHODS}
    unknown = [n for n in names if n not in shipped]
    if unknown:
        raise SystemExit(f"check_recipes: no configs/{unknown[0]}.yaml; shipped: {', '.join(shipped)}")
    return [shipped[n] for n in names] if names else list(shipped.values())


def first_last(series: dict[str, list[tuple[int, float]]], key: str) -> tuple[float, float]:
    pts = [v for _, v in series.get(key, []) if not math.isnan(v)]
    return (pts[0], pts[-1]) if pts else (math.nan, math.nan)


def summarise(run_dir: Path, val_size: int) -> dict[str, float | str]:
    from lightning_entropy.completion import read_marker
    from lightning_entropy.report import read_metrics

    if read_marker(run_dir) is None:
        return {"status": "failed"}
    series = read_metrics(run_dir)
    row: dict[str, float | str] = {"status": "finished"}
    row["acc0"], row["acc1"] = first_last(series, "val/acc")
    ks = sorted(int(k.split("@")[1]) for k in series if k.startswith("val/pass@"))
    for k in ks[:1] + ks[-1:]:
        row[f"pass@{k}_0"], row[f"pass@{k}_1"] = first_last(series, f"val/pass@{k}")
    row["ent0"], row["ent1"] = first_last(series, "train/entropy")
    kl = [v for _, v in series.get("train/approx_kl", []) if not math.isnan(v)]
    row["kl"] = sum(kl) / len(kl) if kl else math.nan
    p = row["acc0"]
    row["se"] = math.sqrt(p * (1 - p) / val_size) if val_size and not math.isnan(p) else math.nan
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="config names (configs/<name>.yaml); default: every method")
    ap.add_argument("--steps", type=int, default=150, help="RL steps per config (default 150)")
    ap.add_argument(
        "--out", default="runs/check_recipes", help="where the runs go (default runs/check_recipes)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="configs run at a time (default 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    overrides = argv[cut + 1 :]  # after --: key=value overrides for every run
    args = ap.parse_args(argv[:cut])
    if args.jobs < 1:
        raise SystemExit(f"check_recipes: --jobs {args.jobs} must be >= 1")
    configs = method_configs(args.names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from lightning_entropy.completion import read_marker
    from lightning_entropy.config import load_config

    todo, val_sizes = [], {}
    for cfg_path in configs:  # every config is validated and every directory checked before any run
        name = cfg_path.stem
        run_dir = out / name
        fit_args = [
            f"trainer.max_steps={args.steps}",
            f"seed={args.seed}",
            f"logging.root={out}",
            f"logging.name={name}",
            "logging.progress=false",
            "logging.plot=false",
            *overrides,
        ]
        val_sizes[name] = load_config(cfg_path, fit_args).data.val_size
        if read_marker(run_dir) is None:
            if run_dir.exists():
                raise SystemExit(f"check_recipes: {run_dir} holds an unfinished run; remove it or pick --out")
            todo.append((name, cfg_path, fit_args))
    from lightning_entropy.sweep import slot_env

    # parallel runs share the cores instead of oversubscribing them: the sweep's rule (no GPUs handed out)
    env = slot_env(0, args.jobs, dict(os.environ), os.cpu_count() or 1, gpus=0)

    def run(job: tuple[str, Path, list[str]]) -> None:
        name, cfg_path, fit_args = job
        print(f"[check_recipes] {name}: fit --config {cfg_path.relative_to(ROOT)}", flush=True)
        cmd = [sys.executable, "-m", "lightning_entropy", "fit", "--config", str(cfg_path), *fit_args]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"[check_recipes] {name} failed:\n{done.stderr[-2000:]}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run, todo))
    rows = [(p.stem, summarise(out / p.stem, val_sizes[p.stem])) for p in configs]

    keys = sorted(
        {k for _, r in rows for k in r if k.startswith("pass@")}, key=lambda k: (int(k[5:].split("_")[0]), k)
    )
    head = ["config", "acc start", "acc end", "(se)", *keys, "H start", "H end", "approx-KL/step", "flag"]
    table = []
    flagged = 0
    for name, r in rows:
        if r["status"] != "finished":
            table.append([name, *["-"] * (len(head) - 2), "FAILED"])
            flagged += 1
            continue
        lost = r["acc1"] < r["acc0"]
        flagged += lost
        cells = [f"{r['acc0']:.3f}", f"{r['acc1']:.3f}", f"{r['se']:.3f}"]
        cells += [f"{r.get(k, math.nan):.3f}" for k in keys]
        cells += [f"{r['ent0']:.3f}", f"{r['ent1']:.3f}", f"{r['kl']:.2e}"]
        table.append([name, *cells, "LOSES ACCURACY" if lost else ""])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
    print(f"{len(rows)} configs, {args.steps} steps each; {flagged} flagged")
    return 1 if flagged else 0


if __name__ == "__main__":
    raise SystemExit(main())
