"""ETMR tree rollouts against flat sampling of the same number of responses, on one tiny policy.

    python scripts/bench_etmr.py                            # 8 prompts x 10 responses, 32 new tokens
    python scripts/bench_etmr.py --group-size 60 --max-new-tokens 64 --forks 2 --branches 2

Prints, per repeat, the tokens ETMR generated over the leaves' total length (``token_ratio``: what
flat sampling of as many responses generates; the ETTRL notes report ~0.6 at N = B = 2 with forks
spread over the response) and the wall-time ratio ETMR / flat. The hf sampler re-encodes each
branch's prompt + prefix (a prefill, no KV-cache sharing across branches) and samples the branches
in a second ``generate`` call, so the wall-time ratio can exceed the token ratio; a backend with
prefix caching (vLLM) is where the token saving becomes time. The policy is a random-init
Qwen2-architecture model with the char tokenizer (EOS is rare, so most responses run to the limit).
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_entropy.components.samplers import ETMRSampler, HFSampler
from lightning_entropy.models import build_char_tokenizer, build_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--forks", type=int, default=2)
    p.add_argument("--branches", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tok = build_char_tokenizer()
    model = build_tiny_model(
        len(tok), hidden_size=args.hidden_size, num_layers=4, num_heads=4,
        intermediate_size=4 * args.hidden_size, max_positions=128, seed=0,
    )  # fmt: skip
    prompts = [f"{i}+{i + 7}=" for i in range(args.prompts)]
    flat = HFSampler(max_new_tokens=args.max_new_tokens)
    tree = ETMRSampler(forks=args.forks, branches=args.branches, max_new_tokens=args.max_new_tokens)
    tree.check_group_size(args.group_size)
    for rep in range(args.repeats):
        torch.manual_seed(rep)
        t0 = time.perf_counter()
        a = flat.generate(model, tok, prompts, args.group_size)
        t1 = time.perf_counter()
        b = tree.generate(model, tok, prompts, args.group_size)
        t2 = time.perf_counter()
        m = tree.metrics
        print(
            f"repeat {rep}: flat {a.size} responses {int(a.lengths.sum())} tokens {t1 - t0:.2f}s | "
            f"etmr {b.size} leaves, generated {m['generated_tokens']:.0f} of {m['flat_tokens']:.0f} "
            f"(token_ratio {m['token_ratio']:.3f}) {t2 - t1:.2f}s | time ratio etmr/flat {(t2 - t1) / (t1 - t0):.2f}"
        )


if __name__ == "__main__":
    main()
