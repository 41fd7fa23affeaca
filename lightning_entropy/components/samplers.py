"""Samplers: prompts -> RolloutBatch of ``group_size`` responses per prompt."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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


class SampledLogprobs:
    """The last logits processor of ``generate``: it sees each step's processed scores (temperature,
    top-k, top-p applied), keeps that step's log-softmax until the next step shows which token was
    drawn from it, and keeps only the drawn token's log-prob, so one [B, V] tensor is alive at a time
    (``output_scores`` would keep all T of them)."""

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.taken.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, response_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of ``response_ids``; the last token's from the last kept distribution."""
        T = response_ids.shape[1]
        taken = self.taken[:T]
        if len(taken) < T and self.prev is not None:
            taken.append(self.prev.gather(1, response_ids[:, len(taken) : len(taken) + 1]).squeeze(1))
        out = (
            torch.stack(taken, 1)
            if taken
            else response_ids.new_zeros(response_ids.shape, dtype=torch.float32)
        )
        # a row that finished earlier gets pads its processors may have masked to -inf: not sampled
        return torch.nan_to_num(out, neginf=0.0)


@register("sampler", "hf")
class HFSampler(Sampler):
    """Batched ``model.generate`` with KV cache: ``group_size`` samples per prompt.

    ``top_k: 0`` and ``top_p: 1.0`` disable those filters; ``temperature: 0`` means greedy.
    Generation runs in eval mode (no dropout) and restores the previous mode. A response ends at
    the first EOS of the tokenizer or of the model's ``generation_config``, at any of
    ``stop_token_ids``, or after the token that completes any of the ``stop`` strings (kept in the
    response, like EOS). Every other sampling setting is pinned to neutral (no repetition penalty,
    min-p, ...), whatever the model's generation_config says, so responses are drawn from exactly
    the distribution whose log-probs the update uses. ``rollout_logprobs`` are the log-probs of the
    sampled tokens under that processed distribution (greedy: the unscaled softmax).
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

        device = next(model.parameters()).device
        ids, mask = encode_prompts(tokenizer, prompts)
        prompt_ids = ids.to(device).repeat_interleave(group_size, 0)
        prompt_mask = mask.to(device).repeat_interleave(group_size, 0)
        response_ids, response_mask, truncated = self.sample(
            model,
            tokenizer,
            prompt_ids,
            prompt_mask,
            overrides.get("temperature", self.temperature),
            overrides.get("max_new_tokens", self.max_new_tokens),
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
            rollout_logprobs=self.rollout_logprobs,
            info=info,
        )

    def logits_processors(self, temperature: float) -> tuple[float, list[LogitsProcessor]]:
        """Hook for per-token sampling rules: (the temperature ``generate`` applies itself, processors
        run on the raw logits before it and before top-k/top-p). Plain sampling: (temperature, [])."""
        return temperature, []

    def sample(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        temperature: float,
        max_new_tokens: int,
        extra_processors: list[LogitsProcessor] = (),
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One response per left-padded input row: (response ids padded with the pad id, response
        mask, truncated). ``extra_processors`` see the raw logits first (e.g. entropy recorders)."""
        stops = stop_ids(model, tokenizer, self.stop_token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        greedy = temperature == 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
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
        # temperature, top-k and top-p run as our own processors, after the per-token rules and before
        # the recorder of the sampled tokens' log-probs; generate() then adds none of its own (neutral
        # values; min_p=0 masks nothing)
        recorder = SampledLogprobs()
        processors = list(extra_processors)
        if not greedy:
            temperature, own = self.logits_processors(temperature)
            processors += own
            processors += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
            processors += [TopKLogitsWarper(self.top_k)] if self.top_k else []
            processors += [TopPLogitsWarper(self.top_p)] if self.top_p < 1.0 else []
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
        kwargs["logits_processor"] = LogitsProcessorList([*processors, recorder])
        if self.stop:
            kwargs.update(stop_strings=self.stop, tokenizer=tokenizer)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        finally:
            model.train(was_training)
        response_ids = out[:, prompt_ids.shape[1] :]
        sampled_lp = recorder.result(response_ids)
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
        self.rollout_logprobs = sampled_lp * response_mask  # generate() puts them in the RolloutBatch
        return response_ids, response_mask, truncated


# ---- entropy-aware sampling ------------------------------------------------------------------


def next_token_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last dimension, in float32."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)


class TokenEntropyProcessor(LogitsProcessor):
    """Per decode step: the entropy of each row's next-token distribution at ``scale`` (kept in
    ``entropies``, one [B] per step), and, given ``rule`` (entropy [B] -> temperature [B]), the
    logits divided by that row's temperature (kept in ``temperatures``). Vectorised over rows and
    vocabulary; the decode loop of ``generate`` is the only loop."""

    def __init__(self, rule: Callable[[Tensor], Tensor] | None = None, scale: float = 1.0) -> None:
        self.rule, self.scale = rule, scale
        self.entropies: list[Tensor] = []
        self.temperatures: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        h = next_token_entropy(scores / self.scale)
        self.entropies.append(h)
        if self.rule is None:
            return scores
        t = self.rule(h)
        self.temperatures.append(t)
        return scores / t[:, None].to(scores.dtype)

    @staticmethod
    def stacked(values: list[Tensor], width: int) -> Tensor:
        """[B, width] from the per-step values (generate may stop before ``width`` steps)."""
        x = torch.stack(values, dim=1) if values else torch.zeros(0, 0)
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))


class _TokenTemperatureSampler(HFSampler):
    """An ``hf`` sampler whose temperature is set per token from the next-token entropy H of the
    raw logits (temperature 1, before top-k/top-p). Training log-probs stay at ``temperature`` (or
    ``algo.temperature``): the rollout is off-policy by design, as in the papers."""

    @abstractmethod
    def rule(self, entropy: Tensor, temperature: float) -> Tensor:
        """Per-row temperatures [B] from the raw next-token entropies [B] at base ``temperature``."""

    def logits_processors(self, temperature: float) -> tuple[float, list[LogitsProcessor]]:
        self._last = TokenEntropyProcessor(rule=lambda h: self.rule(h, temperature))
        return 1.0, [self._last]  # the processor applies the whole temperature

    def sample(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        self._last = None
        ids, mask, truncated = super().sample(*args, **kwargs)
        if self._last is not None and self._last.temperatures:
            t = self._last.stacked(self._last.temperatures, mask.shape[1])
            m = mask.bool()
            self.metrics["temperature_mean"] = float(t[m].mean()) if m.any() else 0.0
            self.metrics["temperature_min"] = float(t[m].min()) if m.any() else 0.0
        return ids, mask, truncated


@register("sampler", "edt")
class EDTSampler(_TokenTemperatureSampler):
    """EDT, entropy-based dynamic temperature, arXiv 2403.14541 [3RD; theta UNVERIFIED] (METHODS §5.1,
    §8.7): T_t = T0 * n_base^(theta / H_t) per token, H_t the entropy of the raw next-token distribution.

    T0 is ``temperature``. n_base = 0.8 is the paper's fixed value [3RD summary; UNVERIFIED from the
    paper itself]; T0 and theta are tuned per task in the paper and their values were not found:
    theta = 1.5 (and T0 = 1.0) come from a third-party implementation. With n_base < 1, T_t <= T0 and
    T_t -> 0 as H_t -> 0; ``min_temperature`` (this framework's guard, not the paper's) keeps
    T_t >= 0.01, which samples greedily in effect. ``temperature: 0`` is plain greedy decoding.
    """

    def __init__(
        self,
        *,
        n_base: float = 0.8,
        theta: float = 1.5,
        min_temperature: float = 0.01,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 16,
        stop_token_ids: list[int] | None = None,
        stop: list[str] | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, stop=stop,
        )  # fmt: skip
        if not 0 < n_base <= 1 or theta < 0 or min_temperature <= 0:
            raise ValueError(
                f"need 0 < n_base <= 1, theta >= 0, min_temperature > 0; got {n_base}, {theta}, {min_temperature}"
            )
        self.n_base, self.theta, self.min_temperature = n_base, theta, min_temperature

    def rule(self, entropy: Tensor, temperature: float) -> Tensor:
        # log space: H = 0 gives theta / 1e-12 * log(n_base) = -huge -> T = 0 -> the floor
        log_t = math.log(temperature) + self.theta / entropy.clamp_min(1e-12) * math.log(self.n_base)
        return torch.exp(log_t).clamp_min(self.min_temperature)


@register("sampler", "hapo_temp")
class HAPOTempSampler(_TokenTemperatureSampler):
    """HAPO adaptive temperature, arXiv 2509.16591 (METHODS §5.2; starriver030515/HAPO@7671dde,
    ``vllm/v1/sample/sampler.py``): T_t = T (1 + tau h_t), h_t = clamp(scale((log max(H_t, 1e-6) - m)
    / (s + 1e-6)), -1, 1), H_t the entropy of the raw logits.

    m (the ``entropy_pivot`` quantile of log H), s (RMS about m) and the positive / negative scales
    come from the previous RL step's token entropies of pi_old (HAPO's ``norm_entropys``, taken from
    the old-log-prob pass over the whole batch and all ranks). The first step, with no statistics,
    samples at T. Intended map: h / max(h+) above the pivot, h / |min h| below, so low-entropy
    tokens are cooled. ``code_sign_quirk=True`` reproduces the code, whose negative scale 1 / min h
    makes every h >= 0 (every token is heated). Defaults: the qwen3_8b script (tau 0.05, pivot 0.8, T 1).
    """

    def __init__(
        self,
        *,
        tau: float = 0.05,
        entropy_pivot: float = 0.8,
        code_sign_quirk: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 16,
        stop_token_ids: list[int] | None = None,
        stop: list[str] | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, stop=stop,
        )  # fmt: skip
        if tau < 0 or not 0.0 <= entropy_pivot <= 1.0:
            raise ValueError(f"need tau >= 0 and entropy_pivot in [0, 1]; got {tau}, {entropy_pivot}")
        self.tau, self.entropy_pivot, self.code_sign_quirk = tau, entropy_pivot, code_sign_quirk
        self.stats: tuple[float, float, float, float] | None = None  # (m, s, max h+, min h-)

    def observe(self, batch: RolloutBatch) -> None:
        from lightning_entropy.components.losses import entropy_norm_stats

        self.stats = entropy_norm_stats(batch.entropy, batch.response_mask, self.entropy_pivot, pooled=True)

    def rule(self, entropy: Tensor, temperature: float) -> Tensor:
        if self.stats is None:
            return torch.full_like(entropy, temperature)
        m, s, pos_max, neg_min = self.stats
        h = (torch.log(entropy.clamp_min(1e-6)) - m) / (s + 1e-6)
        neg_scale = 1.0 / neg_min if self.code_sign_quirk else -1.0 / neg_min
        h_hat = torch.where(h > 0, h / pos_max, h * neg_scale).clamp(-1.0, 1.0)
        return temperature * (1.0 + self.tau * h_hat)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": None if self.stats is None else list(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stats = state.get("stats")
        self.stats = None if stats is None else tuple(float(x) for x in stats)


# ---- tree rollouts ---------------------------------------------------------------------------


def fork_positions(entropy: Tensor, mask: Tensor, forks: int) -> Tensor:
    """[R, forks]: each row's ``forks`` highest-entropy response positions, highest first; ties go to
    the earlier position. A row with fewer tokens than ``forks`` repeats its top position."""
    score = torch.where(mask.bool(), entropy.float(), -math.inf)
    score = torch.nn.functional.pad(score, (0, max(0, forks - score.shape[1])), value=-math.inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :forks]
    valid = torch.gather(score, 1, order) > -math.inf
    return torch.where(valid, order, order[:, :1])


def branch_inputs(
    prompt_ids: Tensor, prompt_mask: Tensor, root_ids: Tensor, forks: Tensor, branches: int, pad: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs of every branch: ``branches`` per fork of each root, in root-major, fork-major order.
    Returns (root row of each branch, its fork t, left-padded prompt + root[:t] ids, their mask)."""
    per_root = forks.shape[1] * branches
    r = torch.arange(root_ids.shape[0], device=root_ids.device).repeat_interleave(per_root)
    t = forks.repeat_interleave(branches, dim=1).reshape(-1)
    prefix = torch.arange(root_ids.shape[1], device=root_ids.device)[None] < t[:, None]
    keep = torch.cat([prompt_mask[r].bool(), prefix], 1).long()
    # a stable sort of the keep flags moves each row's kept tokens right, in order: left padding
    order = torch.sort(keep, dim=1, stable=True).indices
    mask = torch.gather(keep, 1, order)
    ids = torch.where(mask.bool(), torch.gather(torch.cat([prompt_ids[r], root_ids[r]], 1), 1, order), pad)
    width = max(int(mask.sum(1).max()), 1)
    return r, t, ids[:, -width:], mask[:, -width:]


def splice(
    prefix_ids: Tensor, t: Tensor, cont_ids: Tensor, cont_len: Tensor, pad: int
) -> tuple[Tensor, Tensor]:
    """Leaves = prefix_ids[:t] followed by cont_ids[:cont_len], right-padded: (ids, mask)."""
    length = t + cont_len
    pos = torch.arange(max(int(length.max()), 1), device=t.device)[None]
    from_cont = torch.gather(cont_ids, 1, (pos - t[:, None]).clamp(0, cont_ids.shape[1] - 1))
    from_prefix = _pad_right(prefix_ids, max(pos.shape[1], prefix_ids.shape[1]), pad)[:, : pos.shape[1]]
    mask = (pos < length[:, None]).long()
    ids = torch.where(pos < t[:, None], from_prefix, from_cont)
    return torch.where(mask.bool(), ids, pad), mask


def tree_order(n_roots: int, per_root: int, device: torch.device | None = None) -> Tensor:
    """Row order of [roots; branches (root-major)] that puts each root before its own branches."""
    roots = torch.arange(n_roots, device=device)[:, None]
    branches = n_roots + roots * per_root + torch.arange(per_root, device=device)
    return torch.cat([roots, branches], 1).reshape(-1)


@register("sampler", "etmr")
class ETMRSampler(HFSampler):
    """ETTRL's entropy-fork tree rollout (ETMR), arXiv 2508.11356 (METHODS §8.3) [3RD, no code]:
    per prompt, M = group_size / (1 + branches * forks) trees, each one full sample whose ``forks``
    highest-entropy positions t are forks; at each, ``branches`` new responses keep the shared prefix
    o_<t and resample from t to the end (budget max_new_tokens). All M (1 + B N) leaves of a
    prompt (roots included) are one group, so the reward's majority vote and the advantage see them
    together. Notes' setting: M 12, N 2, B 2 (60 leaves at ~60 % of flat sampling's tokens).

    Fork entropy: the sampling distribution's (logits / ``temperature``, before top-k/top-p), from
    the decode loop. Not in the notes, so choices here: forks do not branch recursively, any response
    position may fork (the last ones included), a root shorter than ``forks`` repeats its top fork.
    Logged: ``generated_tokens`` (root tokens + the branches' new tokens), ``flat_tokens`` (the
    leaves' lengths: what sampling as many responses independently generates) and ``token_ratio``.
    ``independent=True`` (validation) and greedy decoding draw flat samples instead.
    """

    def __init__(
        self,
        *,
        forks: int = 2,
        branches: int = 2,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 16,
        stop_token_ids: list[int] | None = None,
        stop: list[str] | None = None,
    ) -> None:
        super().__init__(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, stop=stop,
        )  # fmt: skip
        if forks < 1 or branches < 1:
            raise ValueError(f"forks and branches must be >= 1, got {forks}, {branches}")
        self.forks, self.branches = forks, branches

    @property
    def leaves_per_tree(self) -> int:
        return 1 + self.branches * self.forks

    def check_group_size(self, group_size: int) -> None:
        if group_size % self.leaves_per_tree:
            raise ValueError(
                f"a tree has 1 + branches x forks = {self.leaves_per_tree} leaves and group_size must be "
                f"a multiple of it (trees per prompt = group_size / {self.leaves_per_tree})"
            )

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[str], group_size: int, **overrides: Any
    ) -> RolloutBatch:
        temperature = overrides.get("temperature", self.temperature)
        if overrides.get("independent") or temperature == 0:
            return super().generate(model, tokenizer, prompts, group_size, **overrides)
        self.check_group_size(group_size)
        self._recorder = TokenEntropyProcessor(scale=temperature)
        try:  # the roots: M flat samples per prompt, recording each decode step's entropy
            roots = super().generate(
                model, tokenizer, prompts, group_size // self.leaves_per_tree, **overrides
            )
            entropy = self._recorder.stacked(self._recorder.entropies, roots.response_ids.shape[1])
        finally:
            self._recorder = None
        max_new = overrides.get("max_new_tokens", self.max_new_tokens)
        return self.grow(model, tokenizer, roots, entropy, temperature, max_new)

    def logits_processors(self, temperature: float) -> tuple[float, list[LogitsProcessor]]:
        temperature, own = super().logits_processors(temperature)
        return temperature, own + ([self._recorder] if getattr(self, "_recorder", None) else [])

    def grow(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        roots: RolloutBatch,
        entropy: Tensor,
        temperature: float,
        max_new: int,
    ) -> RolloutBatch:
        """Branch every root at its top-entropy positions; returns each root followed by its branches."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids(model, tokenizer)[0]
        forks = fork_positions(entropy, roots.response_mask, self.forks)
        r, t, in_ids, in_mask = branch_inputs(
            roots.prompt_ids, roots.prompt_mask, roots.response_ids, forks, self.branches, pad
        )
        budget = max_new - t
        cont_ids, cont_mask, cont_trunc = self.sample(
            model, tokenizer, in_ids, in_mask, temperature, int(budget.max())
        )
        # a branch sampled past its own budget (the batch runs to the largest) ends at the budget
        cont_len = torch.minimum(cont_mask.sum(1), budget)
        truncated = cont_trunc | (cont_mask.sum(1) > budget)
        ids, mask = splice(roots.response_ids[r], t, cont_ids, cont_len, pad)
        if self.stop:  # a stop string may begin in the prefix and end in the continuation
            for row, length in enumerate(mask.sum(1).tolist()):
                n = _stop_string_end(tokenizer, ids[row, :length].tolist(), self.stop)
                if n is not None:
                    mask[row, n:] = 0
                    truncated[row] = False
            ids = torch.where(mask.bool(), ids, pad)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        trees = roots.size // int(torch.unique(roots.group_ids).numel())
        for i, info in enumerate(roots.info):
            info.update(tree=i % trees, fork_at=-1)
        info = [
            {**roots.info[i], "completion": c, "fork_at": f} for i, c, f in zip(r.tolist(), texts, t.tolist())
        ]
        branches = RolloutBatch(
            prompt_ids=roots.prompt_ids[r],
            prompt_mask=roots.prompt_mask[r],
            response_ids=ids,
            response_mask=mask,
            group_ids=roots.group_ids[r],
            truncated=truncated,
            info=info,
        )
        generated = roots.lengths.sum() + (mask.sum(1) - t).clamp_min(0).sum()
        # a branch is a root's prefix spliced to a continuation: its rollout log-probs are not
        # assembled, so etmr reports no mismatch and cannot take algo.rollout_correction
        roots.rollout_logprobs = None
        leaves = RolloutBatch.cat([roots, branches], pad_id=pad).index(
            tree_order(roots.size, r.numel() // roots.size)
        )
        flat = leaves.lengths.sum()
        self.metrics.update(
            generated_tokens=float(generated),
            flat_tokens=float(flat),
            token_ratio=float(generated / flat.clamp_min(1)),
        )
        return leaves


def _pad_right(x: Tensor, width: int, value: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


@register("sampler", "vllm")
class VLLMSampler(HFSampler):
    """A colocated vLLM engine per rank (in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), built
    from the policy on the first ``generate`` (the start of the fit) and loaded with its weights in
    memory after every ``sync_every`` RL steps' updates (``lightning_entropy/engine.py``).

    The sampling keys, stop rules and pinned-neutral settings are the ``hf`` sampler's (vLLM ignores
    the model's generation_config here, ``generation_config="vllm"``). ``rollout_logprobs`` are vLLM's
    ``processed_logprobs``: after temperature, top-k and top-p. Each sample is one request whose seed
    mixes a draw from torch's global generator (seeded by ``seed``, advanced every step,
    checkpointed, forked per validation) with the rank, the prompt's index and the sample's index:
    a run is reproducible and resumes exactly
    (with ``sync_every`` > 1 a resumed engine starts from the current weights). ``enforce_eager``
    null = eager on CPU, CUDA graphs on GPU; ``kv_cache_gib`` sets the KV cache size outright
    (on CPU the default takes half the free memory); ``enable_sleep_mode`` (GPU) frees the engine's
    weights and KV cache between generations. Entropy is not vLLM's to report: the training model
    computes it over the full vocabulary in the old-policy pass.
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
        sync_every: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        enable_sleep_mode: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            stop=stop,
        )
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1 RL step, got {sync_every}")
        if tensor_parallel_size != 1:
            # a TP group shares one engine across processes: the weights would have to travel to
            # the engine's workers instead of being loaded in this process
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size}: only 1 is supported (one in-process engine "
                "per rank); scale generation with more ranks (trainer.devices)"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto (the policy's), float32, bfloat16 or float16, got {dtype!r}"
            )
        self.sync_every = sync_every
        self.enable_sleep_mode = enable_sleep_mode
        self.engine_kwargs: dict[str, Any] = dict(
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            dtype=dtype,
            enforce_eager=enforce_eager,
            enable_sleep_mode=enable_sleep_mode,
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
        )
        self.engine: Any = None
        self.asleep = False

    def build(self, model: torch.nn.Module, tokenizer: Any) -> None:
        from lightning_entropy.engine import build_engine

        kw = dict(self.engine_kwargs)
        param = next(model.parameters())
        if kw["dtype"] == "auto":
            kw["dtype"] = str(param.dtype).removeprefix("torch.")
        if kw["enforce_eager"] is None:
            kw["enforce_eager"] = param.device.type != "cuda"
        if self.enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("sampler.enable_sleep_mode=true frees GPU memory and needs a CUDA device")
        if param.device.type == "cuda" and param.device.index not in (None, 0):
            # vLLM's in-process executor puts its worker on cuda:<index of its "device"> = cuda:0
            raise ValueError(
                f"sampler 'vllm' on {param.device}: the in-process vLLM engine always takes cuda:0, so one "
                "engine per GPU is not supported yet; run one GPU per node, or sampler.name=hf"
            )
        from lightning_entropy.rng import rng_state, set_rng_state

        state = rng_state()  # vLLM seeds every global generator at start; the run's streams go on
        self.engine = build_engine(model, tokenizer, seed=0, **kw)
        set_rng_state(state)

    def wake(self) -> None:
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[str], group_size: int, **overrides: Any
    ) -> RolloutBatch:
        from vllm import SamplingParams

        from lightning_entropy.components.common import is_distributed
        from lightning_entropy.engine import unwrap
        from lightning_entropy.prompts import encode_prompts
        from lightning_entropy.tasks import derive_seed

        # `independent` (flat samples, asked by validation) is what vLLM always draws
        unknown = set(overrides) - {"temperature", "max_new_tokens", "independent"}
        if unknown:
            raise ValueError(
                f"sampler 'vllm' cannot apply {sorted(unknown)}; it takes temperature and max_new_tokens"
            )
        if self.engine is None:
            self.build(model, tokenizer)
        self.wake()
        device = next(model.parameters()).device
        ids, mask = encode_prompts(tokenizer, prompts)
        if not bool(mask.any(-1).all()):
            raise ValueError("sampler 'vllm' got an empty prompt (no tokens); vLLM needs at least one")
        stops = stop_ids(unwrap(model), tokenizer, self.stop_token_ids)
        temperature = overrides.get("temperature", self.temperature)
        base = int(torch.randint(0, 2**62, (1,)))  # the global generator: seeded, checkpointed
        rank = torch.distributed.get_rank() if is_distributed() else 0  # no collective: ranks may
        # generate different numbers of times (dynamic sampling)
        common = dict(
            temperature=temperature,
            top_p=self.top_p if temperature > 0 else 1.0,
            top_k=self.top_k if temperature > 0 else 0,
            max_tokens=overrides.get("max_new_tokens", self.max_new_tokens),
            stop_token_ids=stops,
            stop=self.stop or None,
            include_stop_str_in_output=True,
            logprobs=0,
            detokenize=bool(self.stop),
        )
        # one request per sample (vLLM refuses n > 1 when greedy); the prefix cache shares the prompt
        params = [
            SamplingParams(seed=derive_seed(base, rank, i, j) >> 2, **common)
            for i in range(len(prompts))
            for j in range(group_size)
        ]
        requests = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
        requests = [r for r in requests for _ in range(group_size)]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        if self.enable_sleep_mode:
            self.engine.sleep(level=1)
            self.asleep = True
        samples = [c for out in outputs for c in out.outputs]
        T = max(1, max(len(c.token_ids) for c in samples))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        response_ids = torch.full((len(samples), T), pad, dtype=torch.long)
        rollout_logprobs = torch.zeros((len(samples), T), dtype=torch.float32)
        response_mask = torch.zeros((len(samples), T), dtype=torch.long)
        for row, c in enumerate(samples):
            n = len(c.token_ids)
            response_ids[row, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            rollout_logprobs[row, :n] = torch.tensor(
                [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            )
            response_mask[row, :n] = 1
        truncated = torch.tensor([c.finish_reason == "length" for c in samples], dtype=torch.bool)
        texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return RolloutBatch(
            prompt_ids=ids.to(device).repeat_interleave(group_size, 0),
            prompt_mask=mask.to(device).repeat_interleave(group_size, 0),
            response_ids=response_ids.to(device),
            response_mask=response_mask.to(device),
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            truncated=truncated.to(device),
            rollout_logprobs=rollout_logprobs.to(device),
            info=[{"prompt": prompts[i // group_size], "completion": texts[i]} for i in range(len(texts))],
        )

    def close(self) -> None:
        from lightning_entropy.engine import close_engine

        if self.engine is not None:
            close_engine(self.engine)
            self.engine, self.asleep = None, False

    def after_update(self, model: torch.nn.Module, step: int) -> None:
        from lightning_entropy.engine import load_weights

        if self.engine is not None and (step + 1) % self.sync_every == 0:
            self.wake()
            load_weights(self.engine, model)
