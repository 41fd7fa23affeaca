"""Every RNG stream of the process, saved into and restored from checkpoints; one stream per rank.

Each rank samples from its own stream, seeded from (seed, rank) when the run starts, and a
checkpoint holds every rank's state (gathered), so that ranks whose responses end at different
lengths (and so draw different amounts of randomness) each resume exactly where they stopped.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """RNG streams as tensors and plain Python values, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = rng["python"]
    random.setstate((version, tuple(py_state), gauss))
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- one sampling stream per rank ------------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s stream: rank 0 keeps the run's seed (a 1-device run draws what it
    always drew); rank r > 0 gets a seed hashed from (seed, r), so no two ranks, and no rank of
    another seed, share a stream."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank)]).generate_state(1)[0])


def seed_rank_stream(seed: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` with :func:`rank_seed`."""
    s = rank_seed(seed, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def gathered_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (collective under torch.distributed)."""
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rank_rng(states: list[dict[str, Any]], rank: int, seed: int, step: int) -> bool:
    """Restore this rank's own saved state; a rank the checkpoint has none for (it was written by
    fewer ranks) starts a fresh stream from (seed, rank, step). Returns whether the state was saved."""
    if rank < len(states):
        set_rng_state(states[rank])
        return True
    seed_rank_stream(int(seed) * 1_000_003 + step, rank)
    return False
