"""Sharded strategies on CUDA: 2 RL steps each of DDP, FSDP (FSDP1), FSDP2 and DeepSpeed ZeRO-3 in
bf16 on a locally built ~100M-parameter policy; prints step time and peak GPU memory per strategy.

    python scripts/gpu_check_strategies.py [--devices N] [--strategies ddp fsdp fsdp2 deepspeed_stage_3]

Nothing is downloaded: the policy is a randomly initialised Qwen2 (hidden 768, 12 layers, 12 heads,
MLP 3072, the built-in character tokenizer: ~100M parameters) saved with ``save_pretrained`` into a
temporary folder. Each strategy runs ``python -m lightning_entropy fit`` in its own process (a
clean CUDA context, so peak memory is that strategy's own), ``trainer.precision=bf16-true`` with
``model.dtype=bfloat16``, on every visible GPU unless ``--devices``. A small plugin (``--import``)
writes each rank's ``torch.cuda.max_memory_allocated()`` at exit. Step time is the logged
``time/step`` (mean over ranks) of the second step (the first one pays for CUDA warm-up); both are
printed. A strategy that fails is reported with the last line of its error and the script goes on;
the exit code is 1 if any failed. Called by ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["ddp", "fsdp", "fsdp2", "deepspeed_stage_3"]
POLICY = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_positions=512)
FIT = [
    "model.dtype=bfloat16",
    "trainer.precision=bf16-true",
    "trainer.accelerator=gpu",
    "trainer.max_steps=2",
    "data.task=arithmetic",
    "data.train_size=512",
    "data.val_size=8",
    "data.prompts_per_step=8",
    "sampler.group_size=8",
    "sampler.max_new_tokens=64",
    "algo.mini_batch_size=32",
    "logging.val_every=1000",
    "logging.ckpt_every=1000",
    "logging.progress=false",
    "logging.plot=false",
]
PEAK_PLUGIN = '''
"""Each rank writes its peak CUDA memory at exit (loaded with --import by gpu_check_strategies.py)."""
import atexit, json, os
import torch

def _write_peak():
    if torch.cuda.is_available():
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = str(dist.get_rank())
        else:
            rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
        peak = torch.cuda.max_memory_allocated() / 2**30
        out = os.path.join(os.environ["LE_PEAK_DIR"], f"rank{rank}.json")
        with open(out, "w") as fh:
            json.dump({"peak_gib": peak}, fh)

atexit.register(_write_peak)
'''


def build_policy(out: Path) -> int:
    """A random ~100M Qwen2 with the built-in tokenizer, saved as a Hugging Face folder."""
    sys.path.insert(0, str(ROOT))
    from lightning_entropy.models import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=0, **POLICY)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run_strategy(strategy: str, policy: Path, devices: int, work: Path) -> dict:
    peak_dir = work / f"peak-{strategy}"
    peak_dir.mkdir()
    plugin = work / "peak_plugin.py"
    cmd = [
        sys.executable, "-m", "lightning_entropy", "fit", "--import", str(plugin), *FIT,
        f"model.name_or_path={policy}", f"trainer.devices={devices}", f"trainer.strategy={strategy}",
        f"logging.root={work}", f"logging.name=run-{strategy}",
    ]  # fmt: skip
    env = {**os.environ, "LE_PEAK_DIR": str(peak_dir), "PYTHONPATH": str(ROOT)}
    env.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    start = time.time()
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    result: dict = {"strategy": strategy, "wall_s": time.time() - start, "ok": out.returncode == 0}
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        result["error"] = lines[-1] if lines else f"exit code {out.returncode}"
        (work / f"stderr-{strategy}.txt").write_text(out.stderr)
        return result
    from lightning_entropy.report import read_metrics

    steps = [v for _, v in read_metrics(work / f"run-{strategy}")["time/step"]]
    peaks = [json.loads(p.read_text())["peak_gib"] for p in sorted(peak_dir.glob("rank*.json"))]
    result.update(step_s=steps, peak_gib=max(peaks) if peaks else None, ranks_reporting=len(peaks))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=None, help="GPUs per run (default: all visible)")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--keep", help="keep runs and logs in this folder instead of a temporary one")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check_strategies: no CUDA GPU visible; nothing run", file=sys.stderr)
        return 2
    devices = args.devices or torch.cuda.device_count()
    work = Path(args.keep or tempfile.mkdtemp(prefix="le-gpu-strategies-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "peak_plugin.py").write_text(PEAK_PLUGIN)
    n = build_policy(work / "policy")
    print(
        f"policy: {n / 1e6:.0f}M parameters, bf16; {devices} x {torch.cuda.get_device_name(0)}; runs in {work}"
    )
    print(f"{'strategy':<20} {'step 1 s':>9} {'step 2 s':>9} {'peak GiB':>9}  status")
    failed = 0
    for strategy in args.strategies:
        r = run_strategy(strategy, work / "policy", devices, work)
        if r["ok"]:
            s = r["step_s"] + [float("nan")] * (2 - len(r["step_s"]))
            peak = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'?':>9}"
            print(f"{strategy:<20} {s[0]:9.2f} {s[1]:9.2f} {peak}  ok ({r['ranks_reporting']} ranks)")
        else:
            failed += 1
            print(f"{strategy:<20} {'-':>9} {'-':>9} {'-':>9}  FAILED: {r['error']}")
        print(json.dumps(r), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
