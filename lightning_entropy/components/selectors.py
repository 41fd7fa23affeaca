"""Token selectors: which response tokens carry the policy loss, and with what weight (METHODS.md §2).

A selector's ``__call__`` sees a whole mini-batch (this rank's rows) and the old policy's entropy;
its statistics (top-k, normalisers) are pooled over every rank, so 2 ranks x N prompts select what
1 rank x 2N prompts selects. With ``scope: micro`` the module calls ``micro(micro_batch, entropy_cur)``
instead, which reproduces the official codes' per-micro-batch statistics from the current forward.
Exact-count selections break ties by global token position (row-major over valid tokens, ranks in
order), so they are deterministic and independent of how the batch is split.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import TokenSelector
from lightning_entropy.components.common import (
    all_gather_cat,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    rank_offset,
)
from lightning_entropy.registry import register

SCOPES = ("minibatch", "micro")
# selectors whose statistic the official code takes over the training batch, before mini-batching
ROLLOUT_SCOPES = ("step", "minibatch")


def check_scope(scope: str, scopes: tuple[str, ...] = SCOPES) -> str:
    if scope not in scopes:
        raise ValueError(f"scope must be one of {scopes}, got {scope!r}")
    return scope


def check_fraction(name: str, value: float, low_open: bool = True) -> float:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return value


def token_count(fraction: float, n: int, rounding: str) -> int:
    """ceil/floor of ``fraction * n`` without float noise (0.2 * 15 is 3.0000000000000004)."""
    x = round(fraction * n, 6)
    return math.ceil(x) if rounding == "ceil" else math.floor(x)


def gather_valid(values: Tensor, mask: Tensor, pooled: bool) -> tuple[Tensor, int]:
    """Values at valid tokens in row-major order, concatenated over ranks when ``pooled``, and the
    position of this rank's first token in that vector."""
    local = values.detach()[mask.bool()]
    if not pooled:
        return local, 0
    return all_gather_cat(local), rank_offset(local.numel(), values.device)


def scatter_valid(flat: Tensor, offset: int, mask: Tensor) -> Tensor:
    """Inverse of ``gather_valid``: this rank's slice of a pooled vector back onto [B, T] (0 elsewhere)."""
    m = mask.bool()
    out = torch.zeros(m.shape, dtype=flat.dtype, device=mask.device)
    out[m] = flat[offset : offset + int(m.sum())].to(mask.device)
    return out


def top_k_mask(values: Tensor, k: int, largest: bool = True) -> Tensor:
    """Exactly min(k, N) entries of a 1-D tensor; a stable sort gives ties to the lower position."""
    order = torch.sort(values, descending=largest, stable=True).indices
    out = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    out[order[:k]] = True
    return out


def record_selection(
    metrics: dict[str, Any], kept: Tensor, entropy: Tensor, mask: Tensor, pooled: bool
) -> None:
    """kept_frac and the mean entropy of kept vs dropped tokens, pooled like the selection."""
    m = mask.float()
    k = kept.float() * m
    stats = torch.stack([k.sum(), m.sum(), (entropy * k).sum(), (entropy * (m - k)).sum()]).float()
    if pooled:
        stats = all_reduce_sum(stats)
    n_kept, n = stats[0], stats[1]
    metrics["kept_frac"] = n_kept / n.clamp_min(1)
    metrics["kept_entropy"] = stats[2] / n_kept.clamp_min(1)
    metrics["dropped_entropy"] = stats[3] / (n - n_kept).clamp_min(1)


@register("selector", "all")
class AllTokens(TokenSelector):
    """Every response token with weight 1 (the standard policy gradient)."""

    needs_old_pass = False

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return batch.response_mask.float()


class _EntropyRank(TokenSelector):
    largest: bool = True

    def __init__(self, *, rho: float = 0.2, scope: str = "minibatch") -> None:
        self.rho = check_fraction("rho", rho)
        self.scope = check_scope(scope)

    def _select(self, entropy: Tensor, mask: Tensor, pooled: bool) -> Tensor:
        vals, offset = gather_valid(entropy.float(), mask, pooled)
        kept = top_k_mask(vals, max(1, token_count(self.rho, vals.numel(), "ceil")), self.largest)
        out = scatter_valid(kept, offset, mask)
        record_selection(self.metrics, out, entropy.float(), mask, pooled)
        return out.float()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return self._select(batch.entropy, batch.response_mask, pooled=True)

    def micro(self, batch: RolloutBatch, entropy: Tensor, logprobs: Tensor | None = None) -> Tensor:
        return self._select(entropy, batch.response_mask, pooled=False)


@register("selector", "high_entropy")
class HighEntropyTokens(_EntropyRank):
    """Top-rho high-entropy "forking" tokens, arXiv 2506.01939 ("Beyond the 80/20 Rule").

    keep the k = max(1, ceil(rho * N_valid)) highest-entropy valid tokens (weight 1), exactly k even
    with ties (ties go to the earlier global position; the official ``torch.topk`` breaks them
    arbitrarily). ``scope: minibatch`` ranks the old policy's entropy over the whole mini-batch and
    all ranks (the paper's "batch"); ``micro`` ranks the current entropy within each micro-batch
    (official ``get_global_entropy_top_mask``). Default rho = 0.2.
    """


@register("selector", "low_entropy")
class LowEntropyTokens(_EntropyRank):
    """Contrast ablation of arXiv 2506.01939: keep the k = max(1, ceil(rho * N_valid)) LOWEST-entropy
    valid tokens (ties to the earlier position). Same scopes as ``high_entropy``; default rho = 0.2."""

    largest = False


@register("selector", "random_tokens")
class RandomTokens(TokenSelector):
    """Control ablation for entropy-based selection (arXiv 2506.01939 compares against random tokens):
    keep k = max(1, ceil(rho * N_valid)) valid tokens uniformly at random.

    The generator is seeded from ``seed`` and the call count (checkpointed), so a run reproduces and a
    resumed run continues the same sequence; every rank draws the same pooled keys, so the choice is
    invariant to the number of ranks.
    """

    def __init__(self, *, rho: float = 0.2, seed: int = 0, scope: str = "minibatch") -> None:
        self.rho = check_fraction("rho", rho)
        self.seed = int(seed)
        self.scope = check_scope(scope)
        self.calls = 0

    def _select(self, entropy: Tensor, mask: Tensor, pooled: bool) -> Tensor:
        n_local = torch.tensor(float(mask.bool().sum()), device=mask.device)
        n = int((all_reduce_sum(n_local) if pooled else n_local).item())
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        keys = torch.rand(n, generator=gen)
        kept = top_k_mask(keys, max(1, token_count(self.rho, n, "ceil")))
        out = scatter_valid(kept, rank_offset(int(n_local.item()), mask.device) if pooled else 0, mask)
        record_selection(self.metrics, out, entropy.float(), mask, pooled)
        return out.float()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return self._select(batch.entropy, batch.response_mask, pooled=True)

    def micro(self, batch: RolloutBatch, entropy: Tensor, logprobs: Tensor | None = None) -> Tensor:
        return self._select(entropy, batch.response_mask, pooled=False)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


@register("selector", "window_entropy")
class WindowEntropyTokens(TokenSelector):
    """High window-entropy (HWE) tokens, ARES arXiv 2510.08457: keep token t when the mean entropy of
    the FOLLOWING ``window`` valid tokens, mean(H_{t+1..t+w}), is >= ``threshold`` (tokens without a
    full window are never kept). Defaults w = 4, threshold 1.5 (ARES rollout config).

    Differences from ARES, which uses this count for a reward rather than to select tokens: H here is
    the full-vocabulary entropy of ``batch.entropy`` (ARES estimates it from vLLM's top-10 log-probs
    plus a tail bucket, which reads lower on flat distributions), and ARES's curated trigger-string
    list is not shipped: by default every token is a candidate, or pass ``token_ids`` to restrict the
    triggers to those ids (ARES matches the decoded top-1 token, not the sampled one). No batch
    statistic is taken; ``scope`` picks the old (minibatch) or current (micro) entropy.
    """

    def __init__(
        self,
        *,
        window: int = 4,
        threshold: float = 1.5,
        token_ids: Sequence[int] | None = None,
        scope: str = "minibatch",
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 (entropy in nats), got {threshold!r}")
        self.window, self.threshold = int(window), float(threshold)
        self.token_ids = None if token_ids is None else [int(t) for t in token_ids]
        self.scope = check_scope(scope)

    def _select(self, batch: RolloutBatch, entropy: Tensor) -> Tensor:
        m = batch.response_mask.float()
        h = torch.where(m > 0, entropy.float(), torch.zeros_like(m))
        zero = torch.zeros_like(m[:, :1])
        cs_h, cs_m = torch.cat([zero, h.cumsum(-1)], -1), torch.cat([zero, m.cumsum(-1)], -1)
        w, T = self.window, m.shape[1]
        # window of t is t+1..t+w: cumsum[t+w+1] - cumsum[t+1], defined for t + w < T
        win_h = torch.zeros_like(m)
        win_n = torch.zeros_like(m)
        if T > w:
            win_h[:, : T - w] = cs_h[:, w + 1 :] - cs_h[:, 1 : T - w + 1]
            win_n[:, : T - w] = cs_m[:, w + 1 :] - cs_m[:, 1 : T - w + 1]
        kept = (m > 0) & (win_n == w) & (win_h / w >= self.threshold)
        if self.token_ids is not None:
            ids = torch.tensor(self.token_ids, dtype=batch.response_ids.dtype, device=m.device)
            kept &= torch.isin(batch.response_ids, ids)
        record_selection(
            self.metrics, kept, entropy.float(), batch.response_mask, pooled=self.scope == "minibatch"
        )
        return kept.float()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return self._select(batch, batch.entropy)

    def micro(self, batch: RolloutBatch, entropy: Tensor, logprobs: Tensor | None = None) -> Tensor:
        return self._select(batch, entropy)


@register("selector", "steer")
class STEERWeights(TokenSelector):
    """STEER token reweighting, arXiv 2510.10150 (official ``compute_token_weights``).

    Omega_t = A_t / pi_old(o_t) * pi(o_t)(1 - pi(o_t))(log pi(o_t) + H_old,t), the first-order entropy
    change; exponential (default): lambda_t = clamp(exp(-k|Omega_t|), w_min, 1) with
    k = -ln(w_min) / max(max|Omega|, 0.02); linear: lambda_t = w_max - (|Omega_t| - min)/(max - min)
    (w_max - w_min), clamped, midpoint when max == min. Defaults follow the main script (exponential,
    w_min 0.8); the linear script uses [0.8, 1.2], the code's fallback [0.95, 1.05].

    pi is the current policy in the official code: ``scope: micro`` (official) takes it from the
    micro-batch's forward pass and the max/min |Omega| over that micro-batch; ``scope: minibatch``
    weighs the whole mini-batch over all ranks before the first forward, so it uses pi_old (identical
    at the first update of a rollout, an approximation at later ones). H is the old-policy entropy in
    both scopes, as in the official code. Token-mean divides by the token count, as the official code.
    """

    def __init__(
        self, *, mode: str = "exponential", w_min: float = 0.8, w_max: float = 1.0, scope: str = "minibatch"
    ) -> None:
        if mode not in ("exponential", "linear"):
            raise ValueError(f"mode must be 'exponential' or 'linear', got {mode!r}")
        if not 0.0 < w_min <= 1.0:
            raise ValueError(f"w_min must be in (0, 1], got {w_min!r}")
        if w_max < w_min:
            raise ValueError(f"w_max must be >= w_min ({w_min}), got {w_max!r}")
        self.mode, self.w_min, self.w_max = mode, float(w_min), float(w_max)
        self.scope = check_scope(scope)

    def _weights(self, batch: RolloutBatch, pooled: bool, logprobs: Tensor | None = None) -> Tensor:
        mask = batch.response_mask.bool()
        with torch.no_grad():
            current = batch.old_logprobs if logprobs is None else logprobs.detach()
            pi = current.float().exp().clamp(1e-8, 1 - 1e-8)
            pi_old = batch.old_logprobs.float().exp().clamp(1e-8, 1.0)
            omega = batch.advantages.float() / pi_old * pi * (1 - pi) * (pi.log() + batch.entropy.float())
            omega = torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega)).abs()
            n = torch.tensor(float(mask.sum()), device=mask.device)
            big = torch.tensor(float("inf"), device=mask.device)
            hi = torch.where(mask, omega, -big).max() if mask.any() else -big
            lo = torch.where(mask, omega, big).min() if mask.any() else big
            if pooled:
                n, hi, lo = all_reduce_sum(n), all_reduce_max(hi), all_reduce_min(lo)
            if n.item() == 0:
                return torch.zeros_like(omega)
            if self.mode == "exponential":
                k = -math.log(self.w_min) / hi.clamp_min(0.02)
                w = torch.exp(-k * omega).clamp(self.w_min, 1.0)
            elif hi > lo:
                w = (self.w_max - (omega - lo) / (hi - lo) * (self.w_max - self.w_min)).clamp(
                    self.w_min, self.w_max
                )
            else:
                w = torch.full_like(omega, (self.w_min + self.w_max) / 2)
            w = w * mask.float()
        self.metrics["omega_abs"] = omega
        self.metrics["weight"] = w
        self.metrics["weight_min"] = torch.where(mask, w, torch.full_like(w, float("inf"))).min()
        return w

    def __call__(self, batch: RolloutBatch) -> Tensor:
        return self._weights(batch, pooled=True)

    def micro(self, batch: RolloutBatch, entropy: Tensor, logprobs: Tensor | None = None) -> Tensor:
        return self._weights(batch, pooled=False, logprobs=logprobs)


def entropy_discriminator(batch: RolloutBatch) -> Tensor:
    """S_t = p_t (H_t + log p_t) of the old policy (p_t = pi_old(o_t)), float64 (METHODS §6.3, §8.2)."""
    lp = batch.old_logprobs.double()
    return lp.exp() * (batch.entropy.double() + lp)


def pooled_mean_std(x: Tensor, mask: Tensor) -> tuple[float, float]:
    """Mean and population std of ``x`` over the valid tokens of every rank (0, 0 when there are none)."""
    m = mask.to(x.dtype)
    s = all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]))
    mean = s[0] / s[1].clamp_min(1.0)
    var = all_reduce_sum(((x - mean) ** 2 * m).sum()) / s[1].clamp_min(1.0)
    return float(mean), float(var.sqrt())


def _record_clip(metrics: dict[str, Any], keep: Tensor, batch: RolloutBatch) -> None:
    mask = batch.response_mask.bool()
    record_selection(metrics, keep, batch.entropy.float(), mask, pooled=True)
    neg = (batch.advantages < 0) & mask
    n = all_reduce_sum(torch.stack([(neg & ~keep).sum(), neg.sum()]).double())
    metrics["clipped_neg_frac"] = n[0] / n[1].clamp_min(1)


class _RolloutScoped(TokenSelector):
    """A selector whose official statistic spans the whole training batch: ``scope: step`` (default)
    fixes the weights once per rollout over every rank's rows; ``minibatch`` per mini-batch."""

    def prepare_rollout(self, batch: RolloutBatch) -> None:
        if self.scope == "step":
            batch.step_weights = self.select(batch)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        if self.scope == "step" and batch.step_weights is not None:
            return batch.step_weights
        return self.select(batch)

    @abstractmethod
    def select(self, batch: RolloutBatch) -> Tensor: ...


@register("selector", "clip_b")
class ClipBTokens(_RolloutScoped):
    """Clip_B entropy-discriminator clipping (batch baseline), arXiv 2602.03392 (Trinity-RFT
    ``ClipBAdvantageFn``): S_t = p_t (H_t + log p_t) from the old policy; with mean and population
    std of S over the valid tokens, a token with A_t < 0 is dropped iff S_t - mean(S) < -mu std(S);
    A_t >= 0 is always kept; std < 1e-12 keeps everything. mu = 2.5 (clipb.yaml).

    Dropped tokens get weight 0, so they also leave the token-mean denominator (the official code
    zeroes response_mask). ``scope: step`` (default) takes the statistics over the whole rollout of
    every rank, as the official advantage function does before mini-batching; ``minibatch`` over
    each mini-batch. The official p_t comes from the rollout engine's log-probs, here from the
    recomputed pi_old (equal on-policy).
    """

    def __init__(self, *, mu: float = 2.5, scope: str = "step") -> None:
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu!r}")
        self.mu = float(mu)
        self.scope = check_scope(scope, ROLLOUT_SCOPES)

    def select(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask.bool()
        s = entropy_discriminator(batch)
        mean, std = pooled_mean_std(s, mask)
        keep = mask.clone()
        if std >= 1e-12:
            keep &= (batch.advantages >= 0) | (s - mean >= -self.mu * std)
        _record_clip(self.metrics, keep, batch)
        self.metrics["s_mean"], self.metrics["s_std"] = mean, std
        return keep.float()


@register("selector", "clip_v")
class ClipVTokens(_RolloutScoped):
    """Clip_V entropy-discriminator clipping (vocabulary baseline), arXiv 2602.03392 (Trinity-RFT
    ``ClipVAdvantageFn``, ``compute_N_from_logits``): D_t = N_t - S_t with S_t = p_t (H_t + log p_t)
    and N_t = E_{v~pi_old}[S_v] = H_t sum_v p_v^2 + sum_v p_v^2 log p_v (full vocabulary, old pass).
    A token with A_t > 0 is kept; one with A_t <= 0 is kept iff D_t <= mu std(D) (population std over
    the valid tokens, NOT centred on mean D, as in the code); std < 1e-12 keeps everything. If more
    than ``max_frac`` of the valid tokens would go and more than K = max(1, floor(max_frac N_valid))
    of them have A_t < 0, only the K A_t < 0 tokens with the largest D go (ties: earlier position),
    while zero-advantage tokens that fail the test still go (the code's behaviour).
    Defaults mu = 8.5 (clipv.yaml / default_args; the constructor default is 2.0), max_frac = 1e-4.

    Dropped tokens leave the token-mean denominator. ``scope: step`` (default) takes the statistics
    and the cap over the whole rollout of every rank (the official training batch); ``minibatch``
    over each mini-batch.
    """

    requires = frozenset({"discriminator_baseline"})

    def __init__(self, *, mu: float = 8.5, max_frac: float = 1e-4, scope: str = "step") -> None:
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu!r}")
        self.mu, self.max_frac = float(mu), check_fraction("max_frac", max_frac)
        self.scope = check_scope(scope, ROLLOUT_SCOPES)

    def select(self, batch: RolloutBatch) -> Tensor:
        if batch.discriminator_baseline is None:
            raise ValueError(
                "clip_v reads batch.discriminator_baseline, which the old-policy pass did not fill"
            )
        mask = batch.response_mask.bool()
        d = batch.discriminator_baseline.double() - entropy_discriminator(batch)
        _, std = pooled_mean_std(d, mask)
        keep = mask.clone()
        if std >= 1e-12:
            adv = batch.advantages
            keep_neg = d <= self.mu * std
            keep = mask & ((adv > 0) | keep_neg)
            neg_out = mask & (adv < 0) & ~keep_neg
            counts = all_reduce_sum(torch.stack([(mask & ~keep).sum(), mask.sum(), neg_out.sum()]).double())
            cap = max(1, math.floor(self.max_frac * float(counts[1])))
            if float(counts[0]) > self.max_frac * float(counts[1]) and float(counts[2]) > cap:
                vals, offset = gather_valid(torch.where(neg_out, d, -math.inf), mask, pooled=True)
                out = scatter_valid(top_k_mask(vals, cap), offset, mask)
                keep = (keep | neg_out) & ~out
        _record_clip(self.metrics, keep, batch)
        self.metrics["d_std"] = std
        return keep.float()
