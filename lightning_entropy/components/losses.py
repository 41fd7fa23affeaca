"""Policy losses / clippers: per-token surrogate loss [B, T] (METHODS.md §0, §4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import PolicyLoss
from lightning_entropy.registry import register


def importance_ratio(logprobs: Tensor, old_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """r = exp(clamp(log pi - log pi_old, -20, 20)) and the clamped log-ratio (verl)."""
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    return torch.exp(log_ratio), log_ratio


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, clip_c: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), then min(., -c A) for A < 0 (dual-clip)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "clip_low_frac": ((ratio < 1.0 - eps_low) & (adv < 0)).float(),
        "clip_high_frac": ((ratio > 1.0 + eps_high) & (adv > 0)).float(),
    }
    if clip_c is not None:
        bound = -adv * clip_c
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
        stats["clip_dual_frac"] = dual.float()
    return loss, stats


@register("loss", "ppo")
class PPOLoss(PolicyLoss):
    """PPO clipped surrogate, arXiv 1707.06347, with clip-higher (DAPO, arXiv 2503.14476) and
    dual-clip (arXiv 1912.09729): L = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); for A < 0
    L = min(L, -c A). ``clip_c: null`` turns dual-clip off; verl's default c is 3.0.
    """

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0) -> None:
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")
        if clip_c is not None and clip_c <= 1.0:
            raise ValueError(f"clip_c must be > 1 (dual-clip bound), got {clip_c}")
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c

    def __call__(self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs)
        return clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, self.clip_c)
