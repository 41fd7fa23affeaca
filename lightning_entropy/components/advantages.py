"""Advantage estimators: sequence rewards -> per-token advantages [B, T] (METHODS.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import AdvantageEstimator
from lightning_entropy.components.common import broadcast_to_tokens, group_count, group_mean_std
from lightning_entropy.registry import register


@register("advantage", "grpo")
class GRPOAdvantage(AdvantageEstimator):
    """GRPO group baseline, arXiv 2402.03300: A_i = (r_i - mean_g r) / (std_g r + eps).

    ``norm_std=False`` drops the division (r_i - mean_g r). std is unbiased (torch.std); a group of
    one gets mean 0, std 1 (verl), so its advantage is the raw reward.
    """

    def __init__(self, *, eps: float = 1e-6, norm_std: bool = True) -> None:
        self.eps = eps
        self.norm_std = norm_std

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mean, std = group_mean_std(batch.rewards, batch.group_ids)
        adv = batch.rewards.float() - mean
        if self.norm_std:
            adv = adv / (std + self.eps)
        return broadcast_to_tokens(adv, batch.response_mask)


@register("advantage", "dr_grpo")
class DrGRPOAdvantage(AdvantageEstimator):
    """Dr. GRPO, arXiv 2503.20783: A_i = r_i - mean_g r (no std).

    Pair with ``loss.agg: seq-mean-token-sum-norm`` (a constant normaliser, no 1/|o_i|).
    """

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mean, _ = group_mean_std(batch.rewards, batch.group_ids)
        return broadcast_to_tokens(batch.rewards.float() - mean, batch.response_mask)


@register("advantage", "rloo")
class RLOOAdvantage(AdvantageEstimator):
    """RLOO leave-one-out baseline, arXiv 2402.14740: A_i = r_i - mean_{j != i} r_j = G/(G-1)(r_i - mean_g r).

    A group of one keeps its raw reward (verl).
    """

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.float()
        n = group_count(batch.group_ids)
        mean, _ = group_mean_std(r, batch.group_ids)
        adv = torch.where(n > 1, (r - mean) * n / (n - 1).clamp_min(1), r)
        return broadcast_to_tokens(adv, batch.response_mask)
