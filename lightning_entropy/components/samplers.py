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
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

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
        # the warpers run as our own processors, before the one that records the sampled tokens'
        # log-probs; generate() adds none of its own (neutral values), min_p=0 masks nothing
        recorder = SampledLogprobs()
        processors = []
        if not greedy:
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
            processors = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
            processors += [TopKLogitsWarper(self.top_k)] if self.top_k else []
            processors += [TopPLogitsWarper(self.top_p)] if self.top_p < 1.0 else []
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
        rollout_logprobs = sampled_lp * response_mask
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
            rollout_logprobs=rollout_logprobs,
            info=info,
        )


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

        unknown = set(overrides) - {"temperature", "max_new_tokens"}
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
