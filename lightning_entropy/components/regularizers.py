"""Entropy regularizers and controllers added to the policy loss (METHODS.md §3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import EntropyRegularizer
from lightning_entropy.registry import register


@register("regularizer", "none")
class NoRegularizer(EntropyRegularizer):
    """No entropy term."""

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        return logprobs.new_zeros(()), {}


@register("regularizer", "entropy_bonus")
class EntropyBonus(EntropyRegularizer):
    """Plain entropy bonus (verl ``entropy_coeff``): L = -coef * agg(H_cur, response_mask).

    Differentiates through the current policy's full-vocabulary entropy. METHODS.md §3.1: older
    recipes used 1e-3; 0.01 tends to make entropy explode.
    """

    needs_entropy_grad = True

    def __init__(self, *, coef: float = 1e-3) -> None:
        self.coef = coef

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        loss = -self.coef * batch.agg(entropy, kind="response")
        return loss, {"coef": torch.tensor(self.coef)}
