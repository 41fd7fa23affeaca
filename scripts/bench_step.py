"""RL step time and its phases, this checkout against a baseline git revision, interleaved.

    python scripts/bench_step.py [--baseline f88e330] [--reps 3] [--steps 4]

Settings (each a fresh random policy, so every response runs to the token limit):
  tiny   the built-in tiny policy's shape (1.8M parameters, 98-token vocabulary), 8 prompts x 8
         samples, 32 new tokens, one update per rollout (the setting of the restructure issue)
  v152k  a 2-layer Qwen2 with a 151,936-token vocabulary, 4 prompts x 8 samples, 16 new tokens
Each (setting, variant) runs in its own process, alternating baseline / current ``--reps`` times so
machine noise hits both alike; step times are the medians over every measured step. The phase
breakdown comes from the ``time/*`` metrics the current code logs (the baseline logs none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "tiny": dict(
        model=dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=576, vocab=None),
        overrides=["data.prompts_per_step=8", "sampler.group_size=8", "sampler.max_new_tokens=32"],
    ),
    "v152k": dict(
        model=dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=768, vocab=151936),
        overrides=["data.prompts_per_step=4", "sampler.group_size=8", "sampler.max_new_tokens=16"],
    ),
}
COMMON = ["algo.mini_batch_size=null", "data.val_size=8", "logging.val_every=1000", "logging.progress=false"]


def build_policy(out: Path, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, vocab: int | None) -> None:
    from lightning_entropy.models import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    if vocab:  # pad the character vocabulary with placeholder tokens so every sampled id decodes
        tok.add_tokens([f"<x{i}>" for i in range(vocab - len(tok))])
    model = build_tiny_model(
        len(tok), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        intermediate_size=intermediate_size, max_positions=64, seed=0,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


DRIVER = r"""
import json, sys, time
import lightning as L, torch
from lightning_entropy.config import load_config
from lightning_entropy.data import build_datamodule
from lightning_entropy.module import RLVRModule

policy, warm, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(None, sys.argv[4:])
torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))

class Clock(L.Callback):
    def __init__(self):
        self.times, self.phases = [], []
    def on_train_batch_start(self, *a):
        self.t0 = time.perf_counter()
    def on_train_batch_end(self, trainer, pl_module, *a):
        self.times.append(time.perf_counter() - self.t0)
        stats = getattr(pl_module, "last_step_stats", {})
        self.phases.append({k: v for k, v in stats.items() if k.startswith("time/")})

L.seed_everything(0, verbose=False)
dm = build_datamodule(cfg)
module = RLVRModule(cfg, policy)
clock = Clock()
trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=(warm + steps) * module.updates_per_step,
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, val_check_interval=10**6, check_val_every_n_epoch=None,
    callbacks=[clock], use_distributed_sampler=False)
trainer.fit(module, datamodule=dm)
print("RESULT " + json.dumps({"times": clock.times[warm:], "phases": clock.phases[warm:]}))
"""


def run(src: Path, policy: Path, setting: str, warm: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-c", DRIVER, str(policy), str(warm), str(steps), *COMMON, *SETTINGS[setting]["overrides"]]
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=src)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"{src} {setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="f88e330", help="git revision to compare against")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "lightning_entropy"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        print(f"baseline {args.baseline} vs current checkout; {args.reps} interleaved reps x {args.steps} steps")
        for setting in args.settings:
            policy = Path(tmp) / setting
            build_policy(policy, **SETTINGS[setting]["model"])
            res: dict[str, list] = {"baseline": [], "current": []}
            phases: list[dict] = []
            pair_ratios = []
            for _ in range(args.reps):
                base_t = run(base, policy, setting, args.warm, args.steps)["times"]
                cur = run(ROOT, policy, setting, args.warm, args.steps)
                res["baseline"] += base_t
                res["current"] += cur["times"]
                phases += cur["phases"]
                pair_ratios.append(statistics.median(base_t) / statistics.median(cur["times"]))
            b, c = statistics.median(res["baseline"]), statistics.median(res["current"])
            print(f"\n[{setting}] step median: baseline {b:.3f} s, current {c:.3f} s -> {b / c:.2f}x faster")
            print(f"  per interleaved pair: {', '.join(f'{r:.2f}x' for r in pair_ratios)}")
            keys = sorted({k for p in phases for k in p})
            for k in keys:
                v = statistics.median(p[k] for p in phases if k in p)
                share = f"  ({v / statistics.median(p['time/step'] for p in phases):.0%} of the step)" if k not in ("time/step", "time/tokens_per_s") else ""
                print(f"  {k:<18} {v:10.3f}{share}")


if __name__ == "__main__":
    main()
