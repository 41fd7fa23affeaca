"""Benchmark chunked vs naive token log-prob + entropy (forward + backward) at Qwen's vocabulary.

    python scripts/bench_ops.py                      # 512 rows x V=151,936, bf16 logits, CPU (~1.5 min)
    python scripts/bench_ops.py --rows 512 --dtype fp32 --chunk-sizes 1024,256,64

Each variant runs in a fresh subprocess, so no variant inherits another's allocator state.
Memory is measured two ways:

* ``alloc``: peak bytes of live torch tensors during one forward+backward, above what was alive
  before it. On CPU this comes from ``torch.profiler`` with ``profile_memory=True``, which records
  every allocation and free of the CPU allocator; the running sum of their sizes in time order is
  the live-bytes curve. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the bytes before.
* ``rss``: growth of the process's peak resident set (``resource.getrusage`` ru_maxrss) over the
  forward+backward steps; it includes allocator overhead that ``alloc`` does not see.

Time is the wall time of one forward+backward (after a warm-up on a few rows). The loss is
``logp.sum()`` (mode ``logp``; the entropy is still computed, detached) or
``logp.sum() + entropy.sum()`` (mode ``logp+entropy``: an entropy bonus differentiates it).
``--hidden-dim D`` adds the from-hidden-states path (LM head [V, D], ``--hidden-dtype``, fp32 by
default because CPUs without bf16 matmul units take minutes) against ``linear`` + naive.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _alloc_peak_cpu(step) -> int:  # noqa: ANN001
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from lightning_entropy.ops import (
        logprobs_and_entropy,
        logprobs_and_entropy_from_hidden,
        naive_logprobs_and_entropy,
    )

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.hidden_dtype if args.hidden_dim else args.dtype])
    n, v = args.rows, args.vocab
    targets = torch.randint(0, v, (1, n), device=dev)
    entropy_grad = args.mode == "logp+entropy"
    if args.hidden_dim:
        hidden = torch.randn(1, n, args.hidden_dim, device=dev, dtype=dtype, requires_grad=True)
        weight = (
            torch.randn(v, args.hidden_dim, device=dev, dtype=dtype) / args.hidden_dim**0.5
        ).requires_grad_()
        leaves = [hidden, weight]
    else:
        logits = (torch.randn(1, n, v, device=dev, dtype=dtype) * 2).requires_grad_()
        leaves = [logits]

    def step(rows: int = n) -> None:
        tgt = targets[:, :rows]
        if args.hidden_dim and args.variant == "naive":
            z = torch.nn.functional.linear(hidden[:, :rows], weight)
            lp, h = naive_logprobs_and_entropy(z, tgt, entropy_grad=entropy_grad)
        elif args.hidden_dim:
            lp, h = logprobs_and_entropy_from_hidden(
                hidden[:, :rows], weight, tgt, chunk_size=args.chunk_size, entropy_grad=entropy_grad
            )
        elif args.variant == "naive":
            lp, h = naive_logprobs_and_entropy(logits[:, :rows], tgt, entropy_grad=entropy_grad)
        else:
            lp, h = logprobs_and_entropy(
                logits[:, :rows], tgt, chunk_size=args.chunk_size, entropy_grad=entropy_grad
            )
        loss = lp.sum() + (h.sum() if entropy_grad else 0.0)
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(rows=8)  # warm-up on a few rows: lazy library initialisation stays out of time and RSS
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # ru_maxrss is KiB on Linux
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        alloc = torch.cuda.max_memory_allocated() - base
    else:
        alloc = _alloc_peak_cpu(step)
    return {"alloc": alloc, "rss": rss, "seconds": seconds}


def run_variant(args: argparse.Namespace, variant: str, mode: str, chunk: int, hidden_dim: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--variant",
        variant,
        "--mode",
        mode,
        "--chunk-size",
        str(chunk),
    ]
    cmd += [
        "--rows",
        str(args.rows),
        "--vocab",
        str(args.vocab),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]
    cmd += ["--hidden-dim", str(hidden_dim), "--hidden-dtype", args.hidden_dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="B*T rows (default 512)")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (default Qwen2.5's 151,936)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits / hidden dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-sizes", default="1024,128", help="comma-separated chunk sizes (rows)")
    p.add_argument("--modes", default="logp,logp+entropy", help="comma-separated: logp, logp+entropy")
    p.add_argument("--hidden-dim", type=int, default=0, help="D of the from-hidden benchmark (0: skip it)")
    p.add_argument(
        "--hidden-dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="hidden/LM-head dtype (CPUs lack fast bf16 matmul)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="logp", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    modes = args.modes.split(",")
    fp32_full = args.rows * args.vocab * 4 / 2**20
    how = "torch.profiler allocation events" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(
        f"rows={args.rows} vocab={args.vocab} dtype={args.dtype} device={args.device}; one fp32 [rows, V] = {fp32_full:.0f} MiB"
    )
    print(f"alloc = peak live torch bytes during forward+backward ({how}); rss = peak RSS growth")
    print(
        f"hidden path: D={args.hidden_dim}, {args.hidden_dtype}"
        if args.hidden_dim
        else "hidden path: skipped"
    )
    paths = [("logits", 0)] + ([("hidden", args.hidden_dim)] if args.hidden_dim else [])
    print(f"{'path':<8}{'mode':<14}{'variant':<14}{'time s':>8}{'alloc MiB':>11}{'rss MiB':>10}")
    for path, hdim in paths:
        for mode in modes:
            naive = run_variant(args, "naive", mode, 0, hdim)
            rows = [("naive", naive)] + [
                (f"chunk={c}", run_variant(args, "chunked", mode, c, hdim)) for c in chunks
            ]
            for name, r in rows:
                print(
                    f"{path:<8}{mode:<14}{name:<14}{r['seconds']:>8.2f}{r['alloc'] / 2**20:>11.0f}{r['rss'] / 2**20:>10.0f}"
                )
            for name, r in rows[1:]:
                print(
                    f"  ratio naive/{name}: alloc {naive['alloc'] / max(r['alloc'], 1):.2f}x, "
                    f"rss {naive['rss'] / max(r['rss'], 1):.2f}x, time {naive['seconds'] / r['seconds']:.2f}x"
                )


if __name__ == "__main__":
    main()
