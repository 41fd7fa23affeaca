"""Cost of the diagnostics: mean RL step time with every diagnostic off vs all on every 10 steps.

    python scripts/bench_diagnostics.py [--reps 3] [--steps 20] [--every 10]

The default config (the built-in tiny policy, 32 prompts x 8 samples; the policy is built once and
cached), ``--steps`` RL steps per run after ``--warm`` unmeasured ones, with a validation every 10
steps so the validation-time diagnostics (effective rank, logit lens, answers, pass@k) are paid too.
Runs alternate off / on ``--reps`` times so machine noise hits both alike. The step time is the mean
over every measured step of train-batch time plus the validation time spread over the steps (the
diagnostics run on 1 step in ``--every``, so a mean, not a median, is what they cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OFF = [
    "diagnostics.answers=false",
    "diagnostics.pass_at_all_k=false",
    "diagnostics.entropy_law=false",
    "diagnostics.entropy_change=false",
    "diagnostics.effective_rank=false",
    "diagnostics.logit_lens=false",
]


def on(every: int) -> list[str]:
    return [
        "diagnostics.answers=true",
        "diagnostics.pass_at_all_k=true",
        "diagnostics.entropy_law=true",
        "diagnostics.entropy_change=true",
        "diagnostics.entropy_change_linear=true",
        "diagnostics.effective_rank=true",
        "diagnostics.logit_lens=true",
        *(f"diagnostics.{k}_every={every}" for k in ("entropy_change", "effective_rank", "logit_lens")),
    ]


DRIVER = r"""
import json, sys, time
import lightning as L, torch
from lightning_entropy.__main__ import prepare_data, prepare_policy
from lightning_entropy.config import load_config
from lightning_entropy.data import build_datamodule
from lightning_entropy.module import RLVRModule

warm, steps = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config(None, sys.argv[3:])
torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))

class Clock(L.Callback):
    def __init__(self):
        self.train, self.val, self.n = [], 0.0, 0
    def on_train_batch_start(self, *a):
        self.t0 = time.perf_counter()
    def on_train_batch_end(self, *a):
        self.train.append(time.perf_counter() - self.t0)
    def on_validation_start(self, *a):
        self.v0 = time.perf_counter()
    def on_validation_end(self, *a):
        if len(self.train) > warm:
            self.val += time.perf_counter() - self.v0

dm = build_datamodule(cfg)
prepare_data(cfg, dm)
policy = prepare_policy(cfg, dm)
L.seed_everything(0, verbose=False)
module = RLVRModule(cfg, policy)
clock = Clock()
trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=(warm + steps) * module.updates_per_step,
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, val_check_interval=cfg.logging.val_every, check_val_every_n_epoch=None,
    callbacks=[clock], use_distributed_sampler=False)
trainer.fit(module, datamodule=dm)
measured = clock.train[warm:]
print("RESULT " + json.dumps({"step": (sum(measured) + clock.val) / len(measured), "train": measured}))
"""


def run(overrides: list[str], warm: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-c", DRIVER, str(warm), str(steps), "logging.val_every=10", *overrides]
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"bench run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="measured RL steps per run (a multiple of --every)")
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    print(
        f"default config; {args.reps} interleaved reps x {args.steps} steps; diagnostics every {args.every}"
    )
    off, on_, ratios = [], [], []
    for _ in range(args.reps):
        a = run(OFF, args.warm, args.steps)["step"]
        b = run(on(args.every), args.warm, args.steps)["step"]
        off.append(a)
        on_.append(b)
        ratios.append(b / a)
        print(f"  pair: off {a:.3f} s/step, on {b:.3f} s/step -> {b / a:.3f}x", flush=True)
    m_off, m_on = statistics.mean(off), statistics.mean(on_)
    print(
        f"mean step: off {m_off:.3f} s, all on every {args.every}: {m_on:.3f} s -> {m_on / m_off:.3f}x "
        f"(+{(m_on / m_off - 1) * 100:.1f}%); per-pair median {statistics.median(ratios):.3f}x"
    )


if __name__ == "__main__":
    main()
