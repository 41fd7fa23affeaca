"""Token selectors: which response tokens carry the policy loss, and with what weight (METHODS.md §2)."""

from __future__ import annotations

from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import TokenSelector
from lightning_entropy.registry import register


@register("selector", "all")
class AllTokens(TokenSelector):
    """Every response token with weight 1 (the standard policy gradient)."""

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return batch.response_mask.float()
