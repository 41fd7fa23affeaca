"""Shared maths for components: masked reductions, group statistics, cross-rank reductions.

Every statistic "over the batch" goes through ``all_reduce_sum`` / ``all_gather_cat`` so that
2 ranks x N prompts see exactly what 1 rank x 2N prompts sees. Outside torch.distributed both are
identities.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor; no autograd through the reduction)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_min(x: Tensor) -> Tensor:
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of per-rank length over ranks, in rank order (detached)."""
    x = x.detach().reshape(-1)
    if not is_distributed():
        return x.clone()
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def rank_offset(n_local: int, device: torch.device | None = None) -> int:
    """Number of elements held by lower ranks (to locate this rank's slice in an all-gather)."""
    if not is_distributed():
        return 0
    sizes = all_gather_cat(torch.tensor([n_local], device=device))
    return int(sizes[: dist.get_rank()].sum().item())


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` > 0 (mask used as weights); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    return (
        masked_sum(x, mask, dim) / mask.sum(dim).clamp_min(1e-12)
        if dim is not None
        else (masked_sum(x, mask) / mask.sum().clamp_min(1e-12))
    )


def global_masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over all ranks' tokens (detached)."""
    mask = mask.to(x.dtype)
    stats = all_reduce_sum(torch.stack([masked_sum(x.detach(), mask), mask.sum()]))
    return stats[0] / stats[1].clamp_min(1e-12)


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense 0..G-1 index per element (in order of first appearance) and the number of groups."""
    uniq, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return inverse, int(uniq.numel())


def sort_in_groups(keys: Tensor, gidx: Tensor) -> Tensor:
    """Permutation sorting by group, then ascending key; ties keep batch order (stable sorts)."""
    order = torch.sort(keys, stable=True).indices
    return order[torch.sort(gidx[order], stable=True).indices]


def rank_in_group(keys: Tensor, gidx: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank of each element inside its group by ascending key, the sorting permutation, group sizes."""
    order = sort_in_groups(keys, gidx)
    counts = torch.bincount(gidx, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(gidx)
    rank[order] = torch.arange(gidx.numel(), device=gidx.device) - starts[gidx[order]]
    return rank, order, counts


def group_sum(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per-element sum of ``values`` over its group ([B] -> [B])."""
    idx, n = group_index(group_ids)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, idx, values)
    return sums[idx]


def group_count(group_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return group_sum(torch.ones(group_ids.shape, dtype=dtype, device=group_ids.device), group_ids)


def group_min_max(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element group minimum and maximum ([B] -> [B], [B])."""
    idx, n = group_index(group_ids)
    lo = torch.full((n,), math.inf, dtype=values.dtype, device=values.device)
    hi = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    lo = lo.scatter_reduce(0, idx, values, "amin")
    hi = hi.scatter_reduce(0, idx, values, "amax")
    return lo[idx], hi[idx]


def promoted(x: Tensor) -> Tensor:
    """``x`` as a float of at least float32 precision: float64 stays float64 (never ``.float()``)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def group_mean_std(values: Tensor, group_ids: Tensor, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Per-element group mean and standard deviation in float64, vectorised over groups.

    Groups of size 1 follow verl: mean 0 and std 1, so the advantage is the raw reward.
    ``unbiased`` uses Bessel's correction like ``torch.std``. A group whose values are all equal gets
    exactly that value as its mean and std 0, so r - mean is exactly 0 for any reward (0.9, 1/3, ...)
    and METHODS.md §0's all-equal groups give exactly zero advantage.
    """
    values = values.double()
    n = group_count(group_ids, dtype=torch.float64)
    mean = group_sum(values, group_ids) / n
    lo, hi = group_min_max(values, group_ids)
    equal = lo == hi
    mean = torch.where(equal, lo, mean)
    sq = group_sum((values - mean) ** 2, group_ids)
    denom = (n - 1).clamp_min(1) if unbiased else n
    std = torch.where(equal, torch.zeros_like(sq), (sq / denom).sqrt())
    single = n <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean, std


def broadcast_to_tokens(seq_values: Tensor, response_mask: Tensor) -> Tensor:
    """[B] per-sequence values -> [B, T] on response tokens, 0 elsewhere."""
    return seq_values.to(torch.float32).unsqueeze(-1) * response_mask.to(torch.float32)
