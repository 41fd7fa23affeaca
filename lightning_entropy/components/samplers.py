"""Samplers: prompts -> RolloutBatch of ``group_size`` responses per prompt."""

from __future__ import annotations

from typing import Any

import torch

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import Sampler
from lightning_entropy.registry import register


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real tokens (up to and including the first EOS) and the truncated flag (no EOS)."""
    is_eos = response_ids == eos_id
    # tokens strictly after the first EOS are padding; cumsum counts EOS seen before each position
    seen_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    mask = (seen_before == 0).long()
    truncated = ~is_eos.any(dim=-1)
    return mask, truncated


@register("sampler", "hf")
class HFSampler(Sampler):
    """Batched ``model.generate`` with KV cache: ``group_size`` samples per prompt.

    ``top_k: 0`` and ``top_p: 1.0`` disable those filters; ``temperature: 0`` means greedy.
    Generation runs in eval mode (no dropout) and restores the previous mode.
    """

    def __init__(
        self, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 16
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or max_new_tokens < 1:
            raise ValueError(f"top_k must be >= 0 and max_new_tokens >= 1, got {top_k}, {max_new_tokens}")
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = (
            temperature,
            top_p,
            top_k,
            max_new_tokens,
        )

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[str], group_size: int, **overrides: Any
    ) -> RolloutBatch:
        temperature = overrides.get("temperature", self.temperature)
        device = next(model.parameters()).device
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_ids = enc["input_ids"].to(device).repeat_interleave(group_size, 0)
        prompt_mask = enc["attention_mask"].to(device).repeat_interleave(group_size, 0)
        greedy = temperature == 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=overrides.get("max_new_tokens", self.max_new_tokens),
            do_sample=not greedy,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        if not greedy:
            kwargs.update(temperature=temperature, top_p=self.top_p, top_k=self.top_k)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        finally:
            model.train(was_training)
        response_ids = out[:, prompt_ids.shape[1] :]
        response_mask, truncated = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
        response_ids = torch.where(
            response_mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id)
        )
        group_ids = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
        texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        info = [{"prompt": prompts[i // group_size], "completion": texts[i]} for i in range(len(texts))]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            group_ids=group_ids,
            truncated=truncated,
            info=info,
        )
