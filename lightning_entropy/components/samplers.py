"""Samplers: prompts -> RolloutBatch of ``group_size`` responses per prompt."""

from __future__ import annotations

from typing import Any

import torch

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import Sampler
from lightning_entropy.registry import register


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_id: int | list[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real tokens (up to and including the first stop id) and the truncated flag (no stop id).
    ``eos_id`` is one id or several (a tokenizer's EOS plus the ``generation_config``'s extra ones)."""
    ids = torch.as_tensor(eos_id if not isinstance(eos_id, int) else [eos_id], device=response_ids.device)
    is_eos = torch.isin(response_ids, ids)
    # tokens strictly after the first EOS are padding; cumsum counts EOS seen before each position
    seen_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    mask = (seen_before == 0).long()
    truncated = ~is_eos.any(dim=-1)
    return mask, truncated


def stop_ids(model: torch.nn.Module, tokenizer: Any, extra: list[int] = ()) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, the generation_config's EOS ids (Llama-3
    Instruct stops on <|eot_id|>, which is not the tokenizer's EOS) and ``extra``."""
    found: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None), list(extra)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in found:
                found.append(int(i))
    if not found:
        raise ValueError("no stop token: the tokenizer has no eos_token_id; set sampler.stop_token_ids")
    return found


def _stop_string_end(tokenizer: Any, ids: list[int], stops: list[str]) -> int | None:
    """Length of the shortest prefix of ``ids`` whose text contains a stop string (binary search:
    containment only grows with the prefix), or None."""

    def hit(n: int) -> bool:
        text = tokenizer.decode(ids[:n], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


@register("sampler", "hf")
class HFSampler(Sampler):
    """Batched ``model.generate`` with KV cache: ``group_size`` samples per prompt.

    ``top_k: 0`` and ``top_p: 1.0`` disable those filters; ``temperature: 0`` means greedy.
    Generation runs in eval mode (no dropout) and restores the previous mode. A response ends at
    the first EOS of the tokenizer or of the model's ``generation_config``, at any of
    ``stop_token_ids``, or after the token that completes any of the ``stop`` strings (kept in the
    response, like EOS). Every other sampling setting is pinned to neutral (no repetition penalty,
    min-p, ...), whatever the model's generation_config says, so responses are drawn from exactly
    the distribution whose log-probs the update uses.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 16,
        stop_token_ids: list[int] | None = None,
        stop: list[str] | None = None,
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or max_new_tokens < 1:
            raise ValueError(f"top_k must be >= 0 and max_new_tokens >= 1, got {top_k}, {max_new_tokens}")
        if stop_token_ids is not None and not all(isinstance(i, int) and i >= 0 for i in stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {stop_token_ids}")
        if stop is not None and (isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop)):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = (
            temperature,
            top_p,
            top_k,
            max_new_tokens,
        )
        self.stop_token_ids = list(stop_token_ids or [])
        self.stop = list(stop or [])

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[str], group_size: int, **overrides: Any
    ) -> RolloutBatch:
        from lightning_entropy.prompts import encode_prompts

        temperature = overrides.get("temperature", self.temperature)
        device = next(model.parameters()).device
        ids, mask = encode_prompts(tokenizer, prompts)
        prompt_ids = ids.to(device).repeat_interleave(group_size, 0)
        prompt_mask = mask.to(device).repeat_interleave(group_size, 0)
        stops = stop_ids(model, tokenizer, self.stop_token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        greedy = temperature == 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=overrides.get("max_new_tokens", self.max_new_tokens),
            do_sample=not greedy,
            pad_token_id=pad,
            eos_token_id=stops,
            use_cache=True,
            # a model's generation_config fills every setting left unset here (Qwen-Instruct ships
            # repetition_penalty=1.05): pin them so the sampling distribution is the trained one
            repetition_penalty=1.0,
            min_new_tokens=0,
            no_repeat_ngram_size=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
        if not greedy:
            kwargs.update(temperature=temperature, top_p=self.top_p, top_k=self.top_k, min_p=0.0)
        if self.stop:
            kwargs.update(stop_strings=self.stop, tokenizer=tokenizer)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        finally:
            model.train(was_training)
        response_ids = out[:, prompt_ids.shape[1] :]
        response_mask, truncated = response_mask_from_ids(response_ids, stops)
        if self.stop:
            # a stop string ends the response after the token that completes it; generate() pads a
            # row it stopped that way, and a pad that is also an EOS id must not count as sampled
            lengths = response_mask.sum(-1).tolist()
            for row, length in enumerate(lengths):
                n = _stop_string_end(tokenizer, response_ids[row, :length].tolist(), self.stop)
                if n is not None:
                    response_mask[row, n:] = 0
                    truncated[row] = False
        response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad))
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
