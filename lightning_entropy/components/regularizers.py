"""Entropy regularizers and controllers added to the policy loss (METHODS.md §3).

Controllers measure what they control themselves (detached sums over every micro-batch of the RL
step, summed across ranks in ``end_step``), so they do not depend on the module's logging keys and
2 ranks x N prompts update the coefficient exactly like 1 rank x 2N prompts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_entropy import ops
from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import EntropyRegularizer
from lightning_entropy.components.common import (
    all_gather_cat,
    all_reduce_max,
    all_reduce_sum,
    group_mean_std,
    promoted,
    rank_offset,
    world_size,
)
from lightning_entropy.registry import register


class StepMean:
    """Weighted mean of a detached statistic over one RL step, pooled over micro-batches and ranks."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None
        self.device = torch.device("cpu")

    def add(self, values: Tensor, weights: Tensor) -> None:
        self.device = values.device
        with torch.no_grad():
            v = promoted(values.detach())  # float64 statistics stay float64
            w = weights.to(v.dtype)
            v = torch.where(w > 0, v, torch.zeros_like(v))
            s = torch.stack([(v * w).sum(), w.sum()])
            self.sums = s if self.sums is None else self.sums + s

    def pop(self) -> float | None:
        """The step's mean (None when nothing was measured anywhere); resets. Collective call."""
        # a rank that measured nothing this step still joins the reduction, on its last device
        s = all_reduce_sum(self.sums if self.sums is not None else torch.zeros(2, device=self.device))
        self.sums = None
        return float(s[0] / s[1]) if float(s[1]) > 0 else None


def entropy_of(logits: Tensor) -> Tensor:
    """Differentiable entropy (nats) [B, T] of softmax(logits); -inf entries are excluded (renormalised)."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return ops.logprobs_and_entropy(logits, targets, entropy_grad=True)[1]


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _resp(batch: RolloutBatch) -> Tensor:
    return batch.response_mask.to(torch.float32)


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


@register("regularizer", "adaptive_entropy")
class AdaptiveEntropy(EntropyRegularizer):
    """Skywork-OR1 adaptive entropy control (arXiv 2505.22312), as TRL's ``use_adaptive_entropy``.

    L = -a_k * agg(H_cur), a_k = c_k * 1[e_{k-1} <= target]; after step k:
    c_{k+1} = clip(c_k + delta if e_k <= target else c_k - delta, coef_min, coef_max), where e_k is
    the step's mean current-policy token entropy. The gate uses the previous step's entropy like TRL;
    before the first measurement it is closed (with the default c_0 = 0 nothing is applied either way).
    Defaults: TRL's GRPOConfig (entropy_target 0.2 nats, entropy_coef_delta 0.005, bounds [0, 1],
    entropy_coef 0); that they are the paper's exact values is [UNVERIFIED].
    """

    needs_entropy_grad = True

    def __init__(
        self,
        *,
        coef: float = 0.0,
        target: float = 0.2,
        delta: float = 0.005,
        coef_min: float = 0.0,
        coef_max: float = 1.0,
    ) -> None:
        _check(
            0 <= coef_min <= coef_max, "coef_min/coef_max", (coef_min, coef_max), "0 <= coef_min <= coef_max"
        )
        _check(
            coef_min <= coef <= coef_max, "coef", coef, f"in [coef_min, coef_max] = [{coef_min}, {coef_max}]"
        )
        _check(delta >= 0, "delta", delta, ">= 0")
        _check(target >= 0, "target", target, ">= 0")
        self.coef, self.target, self.delta = coef, target, delta
        self.coef_min, self.coef_max = coef_min, coef_max
        self.last_entropy: float | None = None
        self._measure = StepMean()

    def applied(self) -> float:
        gate = self.last_entropy is not None and self.last_entropy <= self.target
        return self.coef if gate else 0.0

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        self._measure.add(entropy, _resp(batch))
        loss = -self.applied() * batch.agg(entropy, kind="response")
        self.metrics.update(coef=self.coef, applied_coef=self.applied())
        return loss, dict(self.metrics)

    def end_step(self, summary: dict[str, float]) -> None:
        e = self._measure.pop()
        if e is None:
            return
        c = self.coef + self.delta if e <= self.target else self.coef - self.delta
        self.coef = min(max(c, self.coef_min), self.coef_max)
        self.last_entropy = e

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef, self.last_entropy = float(state["coef"]), state["last_entropy"]


def clamped_entropy(logits: Tensor, clamp_p: float) -> Tensor:
    """AEnt's clamped entropy [B, T]: drop the floor(p V) lowest logits per position, renormalise.

    Exactly floor(p V) entries go, chosen without grad; ties at the cut are broken by position (the
    lower index goes first; the official ``topk`` breaks them arbitrarily). Gradients reach only
    the kept logits.
    """
    n_drop = int(logits.shape[-1] * clamp_p)
    if n_drop == 0:
        return entropy_of(logits)
    with torch.no_grad():
        cut = logits.kthvalue(n_drop, dim=-1, keepdim=True).values
        dropped = logits <= cut
        excess = dropped.sum(-1, keepdim=True) - n_drop
        if bool((excess > 0).any()):  # ties at the cut: keep the last `excess` of them
            tie = logits == cut
            rank = tie.cumsum(-1, dtype=torch.int32)
            dropped &= ~(tie & (rank > rank[..., -1:] - excess))
    return entropy_of(logits.masked_fill(dropped, float("-inf")))


@register("regularizer", "aent")
class AEnt(EntropyRegularizer):
    """AEnt, arXiv 2509.03493: L = -lam * agg(H_clamp) with clamped entropy (see ``clamped_entropy``).

    Once per step, after the step's update: lam <- clip(lam - lr * [min(0, H - low) +
    max(0, H - high) + reg * (lam - lam_0)], coef_min, coef_max), H the step's token-mean clamped
    entropy of the current policy. Warm-up as AReaL ``recipe/AEnt`` (``global_step > warmup_steps``
    with ``global_step`` counting from 0): the first update follows RL step warmup_steps + 2 (step 31
    with the default 29, counting from 1). Defaults: AReaL README (lam_0 2e-4, p 0.3, band
    [0.05, 0.23], lr 1e-3, box [1e-5, 3e-3], warm-up 29, reg 0); the verl README uses the box
    [4e-5, 0.1].
    """

    needs_logits = True

    def __init__(
        self,
        *,
        coef: float = 2e-4,
        clamp_p: float = 0.3,
        entropy_low: float = 0.05,
        entropy_high: float = 0.23,
        coef_lr: float = 1e-3,
        coef_min: float = 1e-5,
        coef_max: float = 3e-3,
        coef_reg: float = 0.0,
        warmup_steps: int = 29,
        adaptive: bool = True,
    ) -> None:
        _check(0 <= clamp_p < 1, "clamp_p", clamp_p, "in [0, 1)")
        _check(
            entropy_low <= entropy_high, "entropy_low/entropy_high", (entropy_low, entropy_high), "ordered"
        )
        _check(
            0 <= coef_min <= coef_max, "coef_min/coef_max", (coef_min, coef_max), "0 <= coef_min <= coef_max"
        )
        _check(coef_lr >= 0 and coef_reg >= 0, "coef_lr/coef_reg", (coef_lr, coef_reg), ">= 0")
        _check(warmup_steps >= 0, "warmup_steps", warmup_steps, ">= 0")
        self.coef = self.coef_init = coef
        self.clamp_p, self.low, self.high = clamp_p, entropy_low, entropy_high
        self.lr, self.coef_min, self.coef_max, self.reg = coef_lr, coef_min, coef_max, coef_reg
        self.warmup_steps, self.adaptive = warmup_steps, adaptive
        self.steps = 0
        self._measure = StepMean()

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        h = clamped_entropy(logits, self.clamp_p)
        self._measure.add(h, _resp(batch))
        self.metrics.update(coef=self.coef, clamped_entropy=h.detach())
        return -self.coef * batch.agg(h, kind="response"), dict(self.metrics)

    def end_step(self, summary: dict[str, float]) -> None:
        h = self._measure.pop()
        global_step = self.steps  # the step just finished, counted from 0 (AReaL's global_step)
        self.steps += 1
        if not self.adaptive or h is None or global_step <= self.warmup_steps:
            return
        grad = min(0.0, h - self.low) + max(0.0, h - self.high) + self.reg * (self.coef - self.coef_init)
        self.coef = min(max(self.coef - self.lr * grad, self.coef_min), self.coef_max)

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef, self.steps = float(state["coef"]), int(state["steps"])


def top_p_entropy(logits: Tensor, top_p: float, top_k: int, include_crossing: bool = False) -> Tensor:
    """SIREN's nucleus entropy [B, T]: entropy of the renormalised top-p set within the top-k logits.

    Cumulative probabilities use the full-vocabulary softmax. As in the official
    ``efficient_top_p_sampling`` the nucleus is the prefix whose cumulative probability stays < p, so
    the token that crosses p is excluded and a top token with p_1 >= p leaves an empty nucleus
    (entropy 0, no gradient); ``include_crossing`` keeps the crossing token (the usual top-p set).
    Membership is fixed without grad; gradients reach only the nucleus logits.
    """
    z, _ = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    with torch.no_grad():
        p = torch.exp(z - torch.logsumexp(logits, -1, keepdim=True))
        cum = p.cumsum(-1)
        member = (cum - p if include_crossing else cum) < top_p
        nonempty = member[..., 0].clone()
        member[..., 0] = True  # a finite entry per row for the maths; empty rows are zeroed below
    h = entropy_of(z.masked_fill(~member, float("-inf")))
    return torch.where(nonempty, h, torch.zeros_like(h))


@register("regularizer", "siren")
class SIREN(EntropyRegularizer):
    """SIREN, arXiv 2509.25133: L = coef * (H_hat - H_anchor)^2.

    H_hat = seq-mean-token-mean of the top-p entropy (``top_p_entropy``) over each sequence's tokens
    above its ``mask_ratio``-quantile (``torch.nanquantile`` per row; with ``mask_ratio_upper`` only
    tokens in (q_lo, q_hi], which the official ``mask_by_quantile`` accepts but ignores). The anchor
    is H_hat over every micro-batch of the first RL step, from the current logits (the official code
    uses that step's old-policy pass; they agree until the step's first optimizer update), then fixed
    and checkpointed; the penalty is 0 during that step. A square of a mean cannot be
    split: like the official code the square is taken per micro-batch, weighted by its share of the
    mini-batch's sequences (exact when a mini-batch is one micro-batch). H_hat is the mean over every
    response with at least one token; a response that keeps no token (a confident one, whose top-p
    entropies are all 0, or one too short to pass its own quantile) counts as 0 in that mean, as in
    the official ``agg_loss`` (which does not drop it). Rows without response tokens are left out
    (the official rollouts have none). Defaults: ``exp_scripts/siren.sh`` (coef 0.005, p 0.8, k 10000,
    ratio 0.8).
    """

    needs_logits = True

    def __init__(
        self,
        *,
        coef: float = 0.005,
        top_p: float = 0.8,
        top_k: int = 10000,
        mask_ratio: float = 0.8,
        mask_ratio_upper: float | None = None,
        include_crossing: bool = False,
    ) -> None:
        _check(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
        _check(top_k >= 1, "top_k", top_k, ">= 1")
        _check(0 <= mask_ratio < 1, "mask_ratio", mask_ratio, "in [0, 1)")
        upper_ok = mask_ratio_upper is None or mask_ratio < mask_ratio_upper <= 1
        _check(upper_ok, "mask_ratio_upper", mask_ratio_upper, "None or in (mask_ratio, 1]")
        self.coef, self.top_p, self.top_k, self.include_crossing = coef, top_p, top_k, include_crossing
        self.lo, self.hi = mask_ratio, mask_ratio_upper
        self.anchor: float | None = None
        self._measure = StepMean()

    def peak_mask(self, h: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            x = promoted(h.detach()).masked_fill(~mask, float("nan"))
            keep = mask & (h > torch.nanquantile(x, self.lo, dim=-1, keepdim=True))
            if self.hi is not None:
                keep &= h <= torch.nanquantile(x, self.hi, dim=-1, keepdim=True)
        return keep

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        resp = batch.response_mask.bool()
        h = top_p_entropy(logits, self.top_p, self.top_k, self.include_crossing)
        keep = self.peak_mask(h, resp).float()
        rows = resp.any(-1)  # every response with tokens; one that keeps none contributes 0
        per_seq = (torch.where(keep > 0, h, torch.zeros_like(h)) * keep).sum(-1) / keep.sum(-1).clamp_min(1)
        h_hat = per_seq.sum() / rows.sum().clamp_min(1)
        self.metrics.update(topp_entropy=h.detach(), kept_frac=keep, h_hat=float(h_hat.detach()))
        if self.anchor is None:
            self._measure.add(per_seq, rows.float())
            return h.new_zeros(()), dict(self.metrics)
        norm = batch.agg_norm
        n_rows = float(resp.any(-1).sum())
        share = n_rows / max(norm.seqs["response"], 1e-12) * norm.world_size if norm is not None else 1.0
        self.metrics["anchor"] = self.anchor
        return self.coef * share * (h_hat - self.anchor) ** 2, dict(self.metrics)

    def end_step(self, summary: dict[str, float]) -> None:
        if self.anchor is None:
            self.anchor = self._measure.pop()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = state["anchor"]


def min_p_logprob(logits: Tensor, ids: Tensor, min_p: float, floor: float = -1e4) -> Tensor:
    """log pi_proxy(ids) [B, T] of the min-p filtered distribution (p < min_p * max p dropped, the
    rest renormalised); a dropped token gets ``floor`` like the official -1e4 logit. No grad."""
    with torch.no_grad():
        cut = logits.amax(-1, keepdim=True) + math.log(min_p)
        lse = torch.logsumexp(logits.masked_fill(logits < cut, float("-inf")), -1)
        z = logits.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
        return torch.where(z >= cut.squeeze(-1), z - lse, torch.full_like(z, floor))


@register("regularizer", "lp_reg")
class LpReg(EntropyRegularizer):
    """Lp-Reg, arXiv 2510.03222: L = coef * agg(KL_k3(pi_proxy || pi_theta) on qualifying tokens).

    KL_k3 = exp(d) - d - 1, d = log pi_proxy - log pi_theta, clamped to [-10, 10]; a token qualifies
    when A < 0, it is among the k = max(1, floor(neg_fraction * N-)) lowest-probability negative
    tokens (applied only if k > 1) and log pi_theta < log pi_proxy. The proxy is the min-p
    (``min_p`` * max p) filtered policy at the sampling temperature. The official code takes it from
    the old policy; here it is recomputed from the current logits, detached: exact at the first
    update of a step, later it follows the current policy. The official loss also drops the clip for
    qualifying tokens; with its clip range [0, 10] the PPO term of an A < 0 token is already -A r, so
    only the KL is added here (pair with loss ``ppo`` eps_low 1.0, eps_high 9.0, clip_c null).
    ``scope: minibatch`` ranks negative tokens by old log-prob over the mini-batch and all ranks;
    ``scope: micro`` ranks by current log-prob within the micro-batch (the official behaviour).
    The positive-advantage branch (rho+ = 0 by default) is not implemented.
    """

    needs_logits = True

    def __init__(
        self, *, coef: float = 1.0, min_p: float = 0.02, neg_fraction: float = 0.01, scope: str = "minibatch"
    ) -> None:
        _check(0 < min_p <= 1, "min_p", min_p, "in (0, 1]")
        _check(0 < neg_fraction <= 1, "neg_fraction", neg_fraction, "in (0, 1]")
        _check(scope in ("minibatch", "micro"), "scope", scope, "'minibatch' or 'micro'")
        self.coef, self.min_p, self.neg_fraction, self.scope = coef, min_p, neg_fraction, scope
        self._cut: Tensor | None = None

    def threshold(self, logprobs: Tensor, neg: Tensor, gather: bool) -> Tensor | None:
        """The k-th lowest log-prob among negative tokens, or None when k <= 1."""
        vals = promoted(logprobs.detach()[neg])
        vals = all_gather_cat(vals) if gather else vals
        k = max(1, int(self.neg_fraction * vals.numel()))
        return vals.kthvalue(k).values if k > 1 else None

    def prepare(self, batch: RolloutBatch) -> None:
        if self.scope == "minibatch":
            neg = (batch.advantages < 0) & (batch.weights > 0)
            self._cut = self.threshold(batch.old_logprobs, neg, gather=True)

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        neg = (batch.advantages < 0) & (batch.weights > 0)
        if self.scope == "micro":
            cut, rank_by = self.threshold(logprobs, neg, gather=False), logprobs.detach()
        else:
            cut, rank_by = self._cut, batch.old_logprobs
        lp_proxy = min_p_logprob(logits, batch.response_ids, self.min_p)
        low = rank_by <= cut if cut is not None else torch.zeros_like(neg)
        qual = neg & low & (logprobs.detach() < lp_proxy)
        d = torch.where(qual, lp_proxy - logprobs, torch.zeros_like(logprobs))
        kl = (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
        self.metrics.update(
            qualified_frac=qual.float(), kl=torch.where(qual, kl, torch.zeros_like(kl)).detach()
        )
        return self.coef * batch.agg(kl, kind="selected"), dict(self.metrics)


def first_rows(group_ids: Tensor) -> list[int]:
    """Index of the first response of every group, in order of appearance."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    pos = torch.arange(group_ids.numel(), device=group_ids.device)
    first = torch.full((int(inverse.max()) + 1,), group_ids.numel(), device=group_ids.device, dtype=pos.dtype)
    return first.scatter_reduce(0, inverse, pos, reduce="amin").sort().values.tolist()


@register("regularizer", "aepo")
class AEPO(EntropyRegularizer):
    """AEPO, arXiv 2510.08141: a REINFORCE term on temperature-adjusted samples steers entropy.

    Each step the first ``prompt_fraction`` of this rank's prompts are re-sampled at ``temp_high`` if
    the previous step's mean current-policy entropy H <= ``entropy_target`` else at ``temp_low``;
    samples with group-normalised advantage > ``adv_threshold`` are kept, and the first
    k = min(ceil(n_reinforce / world_size), #kept) of them (halved when H > target) replace the first
    k rows of the batch with advantage 1 (``batch.advantage_override``, applied after the estimator)
    and fresh group ids, so they leave the remaining groups' statistics alone (the
    official code scored those groups before the swap). H starts at 0 like the official trainer.

    H is what the official controller reads, ``actor/entropy_loss``: by default
    (``entropy_estimate="sampled"``) the token-mean of -log pi(o_t) over the sampled tokens of the
    step's updates (current policy), a one-sample estimate of the entropy; ``"exact"`` uses the
    full-vocabulary entropy of the same forward passes instead. The two differ (1.648 vs 1.528 in a
    small case); the script's ``entropy_target`` was set against the sampled estimate.
    Defaults: ``examples/qwen-math-7b-AEPO.sh`` (target 0.5, T 1.2 / 0.8, 60 samples); the commit
    07f16ff4 of the official trainer re-samples every prompt, METHODS.md's reading the first quarter.
    """

    def __init__(
        self,
        *,
        entropy_target: float = 0.5,
        temp_high: float = 1.2,
        temp_low: float = 0.8,
        n_reinforce: int = 60,
        prompt_fraction: float = 0.25,
        adv_threshold: float = 0.05,
        eps: float = 1e-6,
        entropy_estimate: str = "sampled",
    ) -> None:
        _check(temp_high > 0 and temp_low > 0, "temp_high/temp_low", (temp_high, temp_low), "> 0")
        _check(
            entropy_estimate in ("sampled", "exact"),
            "entropy_estimate",
            entropy_estimate,
            "'sampled' or 'exact'",
        )
        self.entropy_estimate = entropy_estimate
        _check(n_reinforce >= 0, "n_reinforce", n_reinforce, ">= 0")
        _check(0 < prompt_fraction <= 1, "prompt_fraction", prompt_fraction, "in (0, 1]")
        self.target, self.t_high, self.t_low = entropy_target, temp_high, temp_low
        self.n_reinforce, self.fraction = n_reinforce, prompt_fraction
        self.threshold, self.eps = adv_threshold, eps
        self.prev_entropy = 0.0
        self._measure = StepMean()
        self._rollout_stats: dict[str, float] = {}

    def modify_rollout(self, batch: RolloutBatch, resample: Any) -> RolloutBatch:
        hot = self.prev_entropy <= self.target
        temperature = self.t_high if hot else self.t_low
        gid = batch.group_ids
        first = first_rows(gid)
        rows = first[: max(1, int(len(first) * self.fraction))]
        extra = resample(rows, temperature)
        if extra.rewards is None:
            raise ValueError("aepo needs scored re-samples; use a text reward (needs_policy_stats=False)")
        mean, std = group_mean_std(extra.rewards, extra.group_ids)
        kept = torch.nonzero((extra.rewards.float() - mean) / (std + self.eps) > self.threshold).flatten()
        k = min(math.ceil(self.n_reinforce / world_size()), kept.numel(), batch.size)
        k = k if hot else k // 2
        # fresh ids above every rank's ids; collective calls run on every rank, even with k = 0
        base = int(all_reduce_max(gid.max()).item()) + 1 + rank_offset(k, gid.device)
        self._rollout_stats = {
            "temperature": temperature,
            "replaced": float(k),
            "kept": float(kept.numel()),
            "prev_entropy": self.prev_entropy,
        }
        self.metrics.update(self._rollout_stats)
        if k == 0:
            return batch
        picked = extra.index(kept[:k])
        picked.group_ids = torch.arange(base, base + k, device=gid.device, dtype=gid.dtype)
        picked.info = [{**i, "aepo_reinforce": True} for i in picked.info]
        picked.advantage_override = torch.ones(k, device=gid.device)
        rest = batch.index(list(range(k, batch.size)))
        rest.advantage_override = torch.full((rest.size,), math.nan, device=gid.device)
        pads = batch.response_ids[batch.response_mask == 0]
        pad_id = int(pads[0]) if pads.numel() else 0
        return RolloutBatch.cat([picked, rest], pad_id=pad_id)

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        h = -logprobs if self.entropy_estimate == "sampled" else entropy
        self._measure.add(h, _resp(batch))
        self.metrics.update(self._rollout_stats)
        return logprobs.new_zeros(()), dict(self.metrics)

    def end_step(self, summary: dict[str, float]) -> None:
        h = self._measure.pop()
        if h is not None:
            self.prev_entropy = h

    def state_dict(self) -> dict[str, Any]:
        return {"prev_entropy": self.prev_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_entropy = float(state["prev_entropy"])


def epo_phase_weight(step: int, max_steps: int, lambda_slow: float = 2.0, lambda_fast: float = 3.0) -> float:
    """EPO's smoothing weight: 1 -> 0.8 over the first half of ``max_steps``, then 0.8 -> 0.8 e^-lambda_fast."""
    if max_steps <= 0:
        return 1.0
    step, half = max(0, min(step, max_steps)), max_steps // 2
    if step <= half:
        return 1.0 if half == 0 else 1.0 - 0.2 * (1.0 - math.exp(-lambda_slow * step / half))
    return 0.8 * math.exp(-lambda_fast * (step - half) / (max_steps - half))


@register("regularizer", "epo")
class EPO(EntropyRegularizer):
    """EPO entropy smoothing, arXiv 2509.22576: L = -coef * (agg(H) - smooth_coef * w(step) * agg(pen)).

    pen compares each token's current entropy (``mode: seq``: its sequence's mean) with the band
    [low_ratio, high_ratio] x H_hist, H_hist the mean rollout entropy of the previous steps (the last
    ``window`` steps when set). ``differentiable: true`` (the paper's intent, default) uses the hinge
    out_of_band * dist(H, band); ``false`` reproduces the released code, a constant ``out_of_band``
    outside the band that carries no gradient. w is the code's phase weight over ``max_steps``
    (``phase_weights: false`` -> 1). The code gates smoothing on the agent turn index (>= half the
    episode's turns); single-turn responses have no turns, so here it starts at RL step
    ``start_step`` (None -> max_steps // 2, METHODS.md's "after half of the max steps").
    [UNVERIFIED] defaults: coef 1e-3 (the repo's smoke test), smooth_coef 1.0.
    """

    needs_entropy_grad = True

    def __init__(
        self,
        *,
        coef: float = 1e-3,
        smooth_coef: float = 1.0,
        low_ratio: float = 0.8,
        high_ratio: float = 1.2,
        out_of_band: float = 0.1,
        mode: str = "token",
        differentiable: bool = True,
        max_steps: int = 150,
        start_step: int | None = None,
        phase_weights: bool = True,
        lambda_slow: float = 2.0,
        lambda_fast: float = 3.0,
        window: int | None = None,
    ) -> None:
        _check(
            0 <= low_ratio <= 1 <= high_ratio,
            "low_ratio/high_ratio",
            (low_ratio, high_ratio),
            "0 <= low <= 1 <= high",
        )
        _check(mode in ("token", "seq"), "mode", mode, "'token' or 'seq'")
        _check(max_steps >= 0, "max_steps", max_steps, ">= 0")
        _check(window is None or window >= 1, "window", window, "None or >= 1")
        self.coef, self.smooth_coef, self.pen = coef, smooth_coef, out_of_band
        self.low, self.high, self.mode, self.differentiable = low_ratio, high_ratio, mode, differentiable
        self.max_steps, self.phase_weights = max_steps, phase_weights
        self.start_step = max_steps // 2 if start_step is None else start_step
        self.lambdas, self.window = (lambda_slow, lambda_fast), window
        self.history: list[float] = []
        self._measure = StepMean()

    def historical_entropy(self) -> float | None:
        h = self.history[-self.window :] if self.window else self.history
        return sum(h) / len(h) if h else None

    def penalty(self, entropy: Tensor, batch: RolloutBatch, hist: float) -> Tensor:
        resp = _resp(batch)
        h = entropy
        if self.mode == "seq":
            h = ((entropy * resp).sum(-1) / resp.sum(-1).clamp_min(1)).unsqueeze(-1).expand_as(entropy)
        lo, hi = self.low * hist, self.high * hist
        if self.differentiable:
            return self.pen * (torch.relu(lo - h) + torch.relu(h - hi))
        return torch.where((h > lo) & (h < hi), 0.0, self.pen).to(entropy.dtype).detach()

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        self._measure.add(batch.entropy, _resp(batch))
        hist, smooth = self.historical_entropy(), entropy.new_zeros(())
        w = epo_phase_weight(step, self.max_steps, *self.lambdas) if self.phase_weights else 1.0
        active = hist is not None and step >= self.start_step
        if active:
            pen = self.penalty(entropy, batch, hist)
            smooth = batch.agg(pen, kind="response")
            self.metrics.update(penalty=pen.detach(), historical_entropy=hist)
        self.metrics.update(phase_weight=w, smoothing_on=float(active))
        loss = -self.coef * (batch.agg(entropy, kind="response") - self.smooth_coef * w * smooth)
        return loss, dict(self.metrics)

    def end_step(self, summary: dict[str, float]) -> None:
        h = self._measure.pop()
        if h is not None:
            self.history.append(h)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(h) for h in state["history"]]


@register("regularizer", "em_ft")
class EMFT(EntropyRegularizer):
    """Entropy minimisation on the model's own samples: L = coef * agg(H(softmax(z / rescale_temperature))).

    EM-FT, arXiv 2505.15134 [UNVERIFIED training formula: mean token entropy of own samples], and
    one-shot EM, arXiv 2505.20282 (mean token entropy of softmax(z / 0.5)). z are the logits at the
    sampling temperature, so ``rescale_temperature: 1.0`` (default) is the module's entropy and
    sampler.temperature 0.5 gives one-shot EM's H(softmax(z_raw / 0.5)); another value divides once
    more (effective temperature T_sample * rescale_temperature) and needs the logits. Unlike the
    one-shot EM code (its mask is shifted by one position) every response position counts.
    Pair with a constant reward so the policy-gradient term vanishes.
    """

    needs_entropy_grad = True

    def __init__(self, *, coef: float = 1.0, rescale_temperature: float = 1.0) -> None:
        _check(rescale_temperature > 0, "rescale_temperature", rescale_temperature, "> 0")
        self.coef, self.rescale = coef, rescale_temperature
        if rescale_temperature != 1.0:
            self.needs_logits, self.needs_entropy_grad = True, False

    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]:
        h = entropy if self.rescale == 1.0 else entropy_of(logits / self.rescale)
        self.metrics["em_entropy"] = h.detach()
        return self.coef * batch.agg(h, kind="response"), dict(self.metrics)
