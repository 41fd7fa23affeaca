"""Policy losses / clippers: per-token surrogate loss [B, T] (METHODS.md §0, §4).

The module aggregates the returned per-token loss with ``batch.agg`` (the selector's weights, pooled
normalisers). Losses that take a statistic over the batch have ``scope``: ``minibatch`` (default)
computes it once in ``prepare(minibatch)`` over the whole mini-batch and every rank, so splitting
into micro-batches or ranks changes nothing; ``micro`` reproduces the official codes, which take it
inside the loss over each micro-batch's current forward pass. ``prepare`` sees only the old policy,
so minibatch-scope statistics that the official code takes on the current policy use the old-policy
values instead (identical at the first update of each rollout; each docstring says which).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import PolicyView, RolloutBatch, make_agg_norm
from lightning_entropy.components.base import PolicyLoss
from lightning_entropy.components.common import all_reduce_sum, global_masked_mean, masked_mean, promoted
from lightning_entropy.components.selectors import (
    check_scope,
    gather_valid,
    scatter_valid,
    token_count,
    top_k_mask,
)
from lightning_entropy.registry import register

Eps = float | Tensor


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from sampled tokens (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    # k3 = exp(ref - logp) - (ref - logp) - 1, clamped like verl for stability
    return (torch.exp(-log_ratio) + log_ratio - 1).clamp(-10, 10)


def importance_ratio(
    logprobs: Tensor, old_logprobs: Tensor, clamp: float | None = 20.0
) -> tuple[Tensor, Tensor]:
    """r = exp(clamp(log pi - log pi_old, -clamp, clamp)) and the (clamped) log-ratio.

    verl's vanilla loss clamps at 20, and so do the losses built on it here (ppo, bapo, erc, cispo,
    entropic). Clip-Cov, KL-Cov, CE-GPPO and HAPO do not clamp in their official code: those losses
    take ``log_ratio_clamp`` (default None, no clamp)."""
    log_ratio = logprobs - old_logprobs
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(log_ratio), log_ratio


def check_log_ratio_clamp(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or null, got {value!r}")
    return value


def dual_clip(loss: Tensor, adv: Tensor, clip_c: float | None, stats: dict[str, Tensor]) -> Tensor:
    """For A < 0 bound the loss by -c A (arXiv 1912.09729); ``None`` turns it off."""
    if clip_c is None:
        return loss
    bound = -adv * clip_c
    stats["clip_dual_frac"] = ((adv < 0) & (loss > bound)).float()
    return torch.where(adv < 0, torch.minimum(loss, bound), loss)


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: Eps, eps_high: Eps, clip_c: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), then min(., -c A) for A < 0 (dual-clip).

    ``eps_low``/``eps_high`` may be per-token tensors (HAPO's adaptive clipping)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "clip_low_frac": ((ratio < 1.0 - eps_low) & (adv < 0)).float(),
        "clip_high_frac": ((ratio > 1.0 + eps_high) & (adv > 0)).float(),
    }
    return dual_clip(loss, adv, clip_c, stats), stats


def gppo_surrogate(
    ratio: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float,
    beta1: float,
    beta2: float,
    clip_c: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE-GPPO: where PPO would clip (r < 1-eps_low, A < 0; r > 1+eps_high, A > 0) the value is the
    clipped one times beta but the gradient stays beta (1 -+ eps) A grad log pi; elsewhere -A r."""
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    carrier = ratio / ratio.detach()  # value 1, gradient grad log pi
    loss = torch.where(
        low,
        -beta1 * (1.0 - eps_low) * carrier * adv,
        torch.where(high, -beta2 * (1.0 + eps_high) * carrier * adv, -adv * ratio),
    )
    stats = {"clip_low_frac": low.float(), "clip_high_frac": high.float()}
    return dual_clip(loss, adv, clip_c, stats), stats


def check_clip(
    eps_low: float, eps_high: float, clip_c: float | None, names: tuple[str, str] = ("eps_low", "eps_high")
) -> None:
    if not 0.0 <= eps_low <= 1.0:
        raise ValueError(f"{names[0]} must be in [0, 1], got {eps_low!r}")
    if eps_high < 0:
        raise ValueError(f"{names[1]} must be >= 0, got {eps_high!r}")
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1 (dual-clip bound) or null, got {clip_c!r}")


def valid_tokens(batch: RolloutBatch) -> Tensor:
    """Tokens that carry the loss: selected by the selector and inside the response."""
    return (batch.weights > 0) & batch.response_mask.bool()


def agg_sums(values: Tensor, mask: Tensor, pooled: bool) -> list[float]:
    """Sufficient statistics of ``agg`` over ``mask`` (summed over ranks when ``pooled``)."""
    v = promoted(values.detach())  # float64 statistics stay float64
    m = mask.to(v.dtype)
    v = torch.where(m > 0, v, torch.zeros_like(v)) * m
    s = torch.stack(
        [
            v.sum(),
            m.sum(),
            (v.sum(-1) / m.sum(-1).clamp_min(1e-12)).sum(),
            (m.sum(-1) > 0).to(v.dtype).sum(),
            v.new_tensor(float(m.shape[0])),
        ]
    )
    return (all_reduce_sum(s) if pooled else s).tolist()


def agg_from_sums(s: list[float], mode: str, const: float) -> float:
    """The value ``batch.agg`` gives for a whole mini-batch with sums ``s`` (see ``agg_sums``)."""
    if mode == "token-mean":
        return s[0] / max(s[1], 1e-12)
    if mode == "seq-mean-token-mean":
        return s[2] / max(s[3], 1e-12)
    if mode == "seq-mean-token-sum":
        return s[0] / max(s[3], 1e-12)
    return s[0] / max(s[4] * const, 1e-12)


class _PreparedRows:
    """The minibatch-scope state computed in ``prepare``, handed to the mini-batch's micro-batches in
    ``split`` order: a [B, T] tensor is sliced to the micro-batch's rows, anything else is shared.
    Rows are matched on ``old_logprobs``, so a micro-batch from another mini-batch fails loudly."""

    def __init__(self, values: Any, batch: RolloutBatch) -> None:
        self.values, self.key, self.pos = values, batch.old_logprobs.detach(), 0

    def take(self, batch: RolloutBatch) -> Any:
        n, key = batch.size, batch.old_logprobs.detach()
        for start in (self.pos, 0):  # 0: the same mini-batch again (another epoch without prepare)
            part = self.key[start : start + n]
            if part.shape == key.shape and torch.equal(part, key):
                self.pos = start + n
                return self.values[start : start + n] if isinstance(self.values, Tensor) else self.values
        raise ValueError(
            "micro-batch is not the next slice of the mini-batch given to prepare(); call prepare(minibatch) "
            "and then the loss on minibatch.split(size) in order"
        )


class _ScopedLoss(PolicyLoss):
    """A loss with a batch statistic: ``minibatch_state`` is computed once per mini-batch in
    ``prepare`` (scope minibatch) and looked up per micro-batch."""

    scope: str = "minibatch"
    _rows: _PreparedRows | None = None

    @abstractmethod
    def minibatch_state(self, batch: RolloutBatch) -> Any:
        """The batch statistic of this loss over ``batch`` (pooled over ranks)."""

    def prepare(self, batch: RolloutBatch) -> None:
        self._rows = _PreparedRows(self.minibatch_state(batch), batch) if self.scope == "minibatch" else None

    def state_for(self, batch: RolloutBatch) -> Any:
        """This micro-batch's part of the prepared state; without ``prepare`` the batch is its own
        mini-batch."""
        return self.minibatch_state(batch) if self._rows is None else self._rows.take(batch)


def centred_cov(batch: RolloutBatch, logprobs: Tensor, valid: Tensor, pooled: bool) -> Tensor:
    """Cov_t = (A_t - mean A)(log pi_t - mean log pi), means over the valid tokens (detached)."""
    adv, lp = promoted(batch.advantages), promoted(logprobs.detach())
    mean = global_masked_mean if pooled else masked_mean
    return (adv - mean(adv, valid)) * (lp - mean(lp, valid))


@register("loss", "ppo")
class PPOLoss(PolicyLoss):
    """PPO clipped surrogate, arXiv 1707.06347, with clip-higher (DAPO, arXiv 2503.14476) and
    dual-clip (arXiv 1912.09729): L = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); for A < 0
    L = min(L, -c A). ``clip_c: null`` turns dual-clip off; verl's default c is 3.0. log r is clamped
    to +-``log_ratio_clamp`` (20, verl ``compute_policy_loss_vanilla``; null: no clamp).
    """

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_c: float | None = 3.0,
        log_ratio_clamp: float | None = 20.0,
    ) -> None:
        check_clip(eps_low, eps_high, clip_c)
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        return clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, self.clip_c)


@register("loss", "copo")
class COPOLoss(PolicyLoss):
    """COPO blended loss, arXiv 2508.04138 (official ``compute_policy_loss_with_global``): per token
    L = w_i L_ppo(A_loc) + (1 - w_i) g L_ppo(A_glob), both the dual-clip PPO loss with the same ratio
    and clip range, A_loc = ``batch.advantages``, A_glob = ``batch.global_advantages`` and w_i =
    ``batch.blend_weights`` from ``advantage: copo``. g = ``global_coef`` (the code's
    ``global_loss_coef``, used by its only-soft-with-coef mode; 1 otherwise). Defaults: run_copo.sh
    eps 0.2/0.2; clip_c is not set there, so verl's 3.0. The script aggregates seq-mean-token-mean.
    """

    requires = frozenset({"global_advantages", "blend_weights"})

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_c: float | None = 3.0,
        global_coef: float = 1.0,
        log_ratio_clamp: float | None = 20.0,
    ) -> None:
        check_clip(eps_low, eps_high, clip_c)
        if global_coef < 0:
            raise ValueError(f"global_coef must be >= 0, got {global_coef!r}")
        self.eps_low, self.eps_high, self.clip_c, self.global_coef = eps_low, eps_high, clip_c, global_coef
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        if batch.global_advantages is None or batch.blend_weights is None:
            raise ValueError(
                "loss 'copo' reads batch.global_advantages / blend_weights: use advantage 'copo'"
            )
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        local, stats = clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, self.clip_c)
        glob, _ = clipped_surrogate(ratio, batch.global_advantages, self.eps_low, self.eps_high, self.clip_c)
        w = batch.blend_weights.to(local.dtype)[:, None]
        stats["local_weight"] = w.expand_as(local)
        return w * local + (1 - w) * self.global_coef * glob, stats


def top_fraction_mean(values: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Per row, the mean of its k = max(1, floor(fraction L)) largest valid values (L valid tokens;
    0 for an empty row) [B]."""
    lengths = mask.sum(-1)
    k = torch.floor(lengths.double() * fraction + 1e-9).long().clamp_min(1)
    ordered = torch.sort(torch.where(mask.bool(), promoted(values), -math.inf), -1, descending=True).values
    ordered = torch.where(torch.isfinite(ordered), ordered, torch.zeros_like(ordered))
    top = ordered.cumsum(-1).gather(-1, (k - 1).clamp(max=values.shape[-1] - 1)[:, None]).squeeze(-1)
    return torch.where(lengths > 0, top / k, torch.zeros_like(top))


@register("loss", "era")
class ERALoss(PolicyLoss):
    """ERA, Entropy Regularizing Activation (LLM variant), arXiv 2510.08549 (official
    nothingbutbut/era ``dp_actor``): on tokens with A_t > 0 the logits become z' = k z when the
    response entropy H_resp < omega_low and z / k when H_resp > omega_high (else z), in the
    old-policy pass and the training pass alike, so the ratio compares like with like; then dual-clip
    PPO. H_resp = mean of the max(1, floor(0.2 L)) largest token entropies of the response.

    Defaults: ``era_k`` 2, omega 0.45 / 3.0, eps 1.0 / 1.0 (ratio in [0, 2]) and clip_c 10 from
    qwen_7b_era_topk.sh. ``adv_scale`` (qwen_7b_era_topk_scale.sh, the project page) also sets
    A' = A / k in the low case and k A in the high case. H_resp comes from the old-policy pass (the
    official code takes it in each pass; identical at the first update of a rollout). ``topk: 20``
    is the scripts' bundled trick (``logprobs_from_logits_topk``: log pi over the top-20 logits
    renormalised, -1e4 outside them, in both passes); off by default so that it is ablated apart.
    """

    ratio_dependent = False  # the transformed log-probs change the gradient even at r = 1
    needs_old_pass = True  # pi_old under the transform, and H_resp, before the first forward

    def __init__(
        self,
        *,
        era_k: float = 2.0,
        omega_low: float = 0.45,
        omega_high: float = 3.0,
        top_fraction: float = 0.2,
        adv_scale: bool = False,
        topk: int | None = None,
        eps_low: float = 1.0,
        eps_high: float = 1.0,
        clip_c: float | None = 10.0,
        log_ratio_clamp: float | None = 20.0,
    ) -> None:
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or null, got {topk!r}")
        if not era_k > 1:
            raise ValueError(f"era_k must be > 1, got {era_k!r}")
        if not 0 <= omega_low <= omega_high:
            raise ValueError(f"need 0 <= omega_low <= omega_high, got {omega_low!r}, {omega_high!r}")
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
        check_clip(eps_low, eps_high, clip_c)
        self.era_k, self.omega_low, self.omega_high = float(era_k), omega_low, omega_high
        self.top_fraction, self.adv_scale = top_fraction, adv_scale
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        self.logit_scales = (self.era_k, 1.0 / self.era_k)
        self.view = None if topk is None else PolicyView(topk=int(topk))

    def policy_view(self) -> PolicyView | None:
        return self.view

    def prepare_rollout(self, batch: RolloutBatch) -> None:
        mask = batch.response_mask.bool()
        h = top_fraction_mean(batch.entropy, batch.response_mask, self.top_fraction)
        k = self.era_k
        row = torch.where(h < self.omega_low, k, torch.where(h > self.omega_high, 1 / k, 1.0))
        scale = torch.where(mask & (batch.advantages > 0), row[:, None], torch.ones_like(batch.advantages))
        lp = batch.scaled_old_logprobs  # at z' = k z and z / k
        if lp is None:
            raise ValueError("loss 'era' needs batch.scaled_old_logprobs from the old-policy pass")
        batch.old_logprobs = torch.where(
            scale == k, lp[..., 0], torch.where(scale == 1 / k, lp[..., 1], batch.old_logprobs)
        )
        batch.logit_scale = scale.to(torch.float32)
        # shares of the rollout's response tokens, pooled over ranks (logged once, at the first micro-batch)
        n = all_reduce_sum(
            torch.stack([(mask & (scale > 1)).sum(), (mask & (scale < 1)).sum(), mask.sum()]).double()
        )
        rows = all_reduce_sum(torch.stack([h.sum(), (batch.response_mask.sum(-1) > 0).sum()]).double())
        self.metrics.update(
            sharpened_frac=n[0] / n[2].clamp_min(1),
            flattened_frac=n[1] / n[2].clamp_min(1),
            response_entropy=rows[0] / rows[1].clamp_min(1),
        )

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        if batch.logit_scale is None:
            raise ValueError(
                "loss 'era' needs batch.logit_scale: call prepare_rollout(batch) after the advantages"
            )
        adv = batch.advantages / batch.logit_scale if self.adv_scale else batch.advantages
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        loss, stats = clipped_surrogate(ratio, adv, self.eps_low, self.eps_high, self.clip_c)
        stats["logit_scale"] = batch.logit_scale
        return loss, stats


@register("loss", "bupo")
class BuPOLoss(PolicyLoss):
    """BuPO, Bottom-up Policy Optimization, arXiv 2512.19673 (official Trae1ounG/BuPO ``dp_actor``):
    for the first ``bottom_up_steps`` RL steps (S_iter) the old-policy pass and the update's log-probs
    come from decoder layer k's internal policy pi^(k) = softmax(W_U h^(k) / T) (the LM head on the
    residual stream after layer ``layer``, 0-based = HF hidden_states[k + 1]; rollouts still come from
    the full model), so only layers <= k (and the head and embeddings) learn; afterwards the full policy.
    The loss is dual-clip PPO throughout (eps 0.2/0.2, clip_c 10).

    Defaults: k = 5 (Qwen3 script; the Llama script uses 26, the config default 30), S_iter = 30. The
    training path applies no final norm (the code's); ``final_norm: true`` applies it (the
    visualisation script's option). While pi^(k) trains, the logged rollout entropy is pi^(k)'s.
    The step count is checkpointed.
    """

    def __init__(
        self,
        *,
        layer: int = 5,
        bottom_up_steps: int = 30,
        final_norm: bool = False,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_c: float | None = 10.0,
        log_ratio_clamp: float | None = 20.0,
    ) -> None:
        if layer < 0:
            raise ValueError(f"layer must be a 0-based decoder layer index >= 0, got {layer!r}")
        if bottom_up_steps < 0:
            raise ValueError(f"bottom_up_steps must be >= 0, got {bottom_up_steps!r}")
        check_clip(eps_low, eps_high, clip_c)
        self.view = PolicyView(layer=int(layer), final_norm=bool(final_norm))
        self.bottom_up_steps = int(bottom_up_steps)
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        self.steps = 0  # RL steps completed

    def policy_view(self) -> PolicyView | None:
        return self.view if self.steps < self.bottom_up_steps else None

    def end_step(self, summary: dict[str, float]) -> None:
        self.steps += 1

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        loss, stats = clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, self.clip_c)
        stats["internal_policy"] = torch.tensor(float(batch.policy_view is not None))
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


@register("loss", "clip_cov")
class ClipCovLoss(_ScopedLoss):
    """Clip-Cov, arXiv 2505.22617 (official ``compute_policy_loss_clip_cov``).

    Cov_t = (A_t - mean A)(log pi_t - mean log pi) over valid tokens; among tokens not already clipped
    by PPO with cov_low < Cov_t < cov_high, n = max(1, floor(clip_ratio * N_valid)) are drawn
    uniformly at random and their loss is zeroed (value and gradient); the rest use
    max(-A r, -A clip(r)) without dual-clip. Defaults follow the scripts: clip_ratio 2e-4, bounds
    (1, 5), eps_low = eps_high = 1.0. The draw is seeded from ``seed`` and the call count
    (checkpointed). ``scope: minibatch`` selects once per mini-batch from the old policy's log pi
    (no token is PPO-clipped there: r = 1); ``micro`` selects per micro-batch from the current one.
    The official code does not clamp log r (``log_ratio_clamp`` null); a number clamps it like verl.
    """

    ratio_dependent = False  # detaching the chosen tokens acts even when every update is on-policy

    def __init__(
        self,
        *,
        clip_ratio: float = 2e-4,
        cov_low: float = 1.0,
        cov_high: float = 5.0,
        eps_low: float = 1.0,
        eps_high: float = 1.0,
        seed: int = 0,
        scope: str = "minibatch",
        log_ratio_clamp: float | None = None,
    ) -> None:
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
        if cov_low >= cov_high:
            raise ValueError(f"cov_low must be < cov_high, got cov_low={cov_low!r}, cov_high={cov_high!r}")
        check_clip(eps_low, eps_high, None)
        self.clip_ratio, self.cov_low, self.cov_high = clip_ratio, cov_low, cov_high
        self.eps_low, self.eps_high, self.seed = eps_low, eps_high, int(seed)
        self.scope = check_scope(scope)
        self.calls = 0

    def minibatch_state(self, batch: RolloutBatch) -> Tensor:
        lp = batch.old_logprobs
        return self._choose(batch, lp, torch.ones_like(lp), pooled=True)

    def _choose(self, batch: RolloutBatch, logprobs: Tensor, ratio: Tensor, pooled: bool) -> Tensor:
        valid = valid_tokens(batch)
        adv = batch.advantages
        cov = centred_cov(batch, logprobs, valid, pooled)
        clipped = -adv * ratio.detach().clamp(1 - self.eps_low, 1 + self.eps_high) > -adv * ratio.detach()
        cand = valid & ~clipped & (cov > self.cov_low) & (cov < self.cov_high)
        flags, offset = gather_valid(cand.float(), valid, pooled)
        idx = flags.nonzero().squeeze(-1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        n_clip = max(1, token_count(self.clip_ratio, flags.numel(), "floor"))
        chosen = torch.zeros_like(flags)
        chosen[idx[torch.randperm(idx.numel(), generator=gen)[:n_clip].to(idx.device)]] = 1.0
        return scatter_valid(chosen, offset, valid) > 0

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        micro = self.scope == "micro"
        chosen = self._choose(batch, logprobs, ratio, False) if micro else self.state_for(batch)
        loss, stats = clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, None)
        stats["cov_clipped_frac"] = chosen.float()
        return torch.where(chosen, torch.zeros_like(loss), loss), stats

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


@register("loss", "kl_cov")
class KLCovLoss(_ScopedLoss):
    """KL-Cov, arXiv 2505.22617 (official ``compute_policy_loss_kl_cov``): the top-k tokens by
    Cov_t = (A_t - mean A)(log pi_t - mean log pi), k = max(1, floor(kl_cov_ratio * N_valid)), get
    L = -A r + kl_coef |log r|; all others L = -A r. No PPO clipping on any token.

    kl_cov_ratio defaults to 2e-3, the paper's 7B recipe (``k_percent=0.2`` percent); the 32B recipe
    and verl's ``kl_cov_ratio`` default use 2e-4. kl_coef 1. Ties go to the earlier token. Scope
    ``minibatch`` ranks the old policy's log pi over the whole mini-batch; ``micro`` the current one
    per micro-batch (official). The official code does not clamp log r, in the ratio nor in the
    |log r| penalty (``log_ratio_clamp`` null); a number clamps both like verl.
    """

    def __init__(
        self,
        *,
        kl_cov_ratio: float = 2e-3,
        kl_coef: float = 1.0,
        scope: str = "minibatch",
        log_ratio_clamp: float | None = None,
    ) -> None:
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        if not 0.0 < kl_cov_ratio <= 1.0:
            raise ValueError(f"kl_cov_ratio must be in (0, 1], got {kl_cov_ratio!r}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
        self.kl_cov_ratio, self.kl_coef = kl_cov_ratio, kl_coef
        self.scope = check_scope(scope)

    def minibatch_state(self, batch: RolloutBatch) -> Tensor:
        lp = batch.old_logprobs
        return self._choose(batch, lp, torch.ones_like(lp), pooled=True)

    def _choose(self, batch: RolloutBatch, logprobs: Tensor, ratio: Tensor, pooled: bool) -> Tensor:
        valid = valid_tokens(batch)
        vals, offset = gather_valid(centred_cov(batch, logprobs, valid, pooled), valid, pooled)
        k = max(1, token_count(self.kl_cov_ratio, vals.numel(), "floor"))
        return scatter_valid(top_k_mask(vals, k).float(), offset, valid) > 0

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, log_ratio = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        micro = self.scope == "micro"
        chosen = self._choose(batch, logprobs, ratio, False) if micro else self.state_for(batch)
        penalty = torch.where(chosen, self.kl_coef * log_ratio.abs(), torch.zeros_like(log_ratio))
        return -batch.advantages * ratio + penalty, {"kl_cov_frac": chosen.float()}


@register("loss", "ce_gppo")
class CEGPPOLoss(PolicyLoss):
    """CE-GPPO gradient-preserving clipping, arXiv 2509.20712 (``compute_gppo_loss_general_beta``).

    low (r < 1-eps_low, A < 0): L = -beta1 (1-eps_low) r/sg(r) A; high (r > 1+eps_high, A > 0):
    L = -beta2 (1+eps_high) r/sg(r) A; otherwise -r A; then dual-clip for A < 0. Out-of-region
    gradients are bounded, beta (1 -+ eps) |A| grad log pi, instead of zero. beta1 = 0.5 is the 1.5B
    script (7B script 0.75, function default 0.25); beta2 1, eps 0.2/0.2, clip_c 10 (scripts). The
    official code does not clamp log r (``log_ratio_clamp`` null); a number clamps it like verl.
    """

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        beta1: float = 0.5,
        beta2: float = 1.0,
        clip_c: float | None = 10.0,
        log_ratio_clamp: float | None = None,
    ) -> None:
        check_clip(eps_low, eps_high, clip_c)
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        if beta1 < 0 or beta2 < 0:
            raise ValueError(f"beta1/beta2 must be >= 0, got beta1={beta1!r}, beta2={beta2!r}")
        self.eps_low, self.eps_high, self.beta1, self.beta2, self.clip_c = (
            eps_low,
            eps_high,
            beta1,
            beta2,
            clip_c,
        )

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        return gppo_surrogate(
            ratio, batch.advantages, self.eps_low, self.eps_high, self.beta1, self.beta2, self.clip_c
        )


def _bound_grid(start: float, maximum: float, step: float) -> list[float]:
    """The values BAPO's search visits: start, start+step, ... capped at maximum (same float sums)."""
    vals = [start]
    while step > 0 and vals[-1] < maximum:
        vals.append(min(vals[-1] + step, maximum))
    return vals


@register("loss", "bapo")
class BAPOLoss(_ScopedLoss):
    """BAPO adaptive clipping, arXiv 2510.18927 (official ``recipe/bapo/policy_loss.py``).

    Ratio bounds [c_low, c_high] (not epsilons). P = sum_{A>=0} min(r, c_high) A, N = sum_{A<0}
    max(r, c_low) |A| (token weights applied, summed over ranks); while P/N < target raise c_low by
    c_low_step up to c_low_max, then c_high likewise; L = dual-clip PPO with clamp(r, c_low, c_high).
    Defaults: the recipe yaml (target 1.0, c_low 0.6 -> 0.8, c_high 1.2 -> 2.0, steps 0.05, eps
    1e-8) and verl's clip_c 3.0; the example script uses target 0.5, c_low 0.8 -> 0.95, c_high step
    0.1, the README [0.6, 0.9] / [1.2, 3.0] and calls 0.5 a "contribution" (P/(P+N), i.e. P/N = 1).
    In the code's value-based P/N raising c_low raises N, so the first loop cannot help.

    ``scope: micro`` (official) searches on the current ratio of each micro-batch, all-reduced over
    ranks. ``minibatch`` searches once in ``prepare`` on the old policy, where r = 1: the bounds
    then depend only on the advantage balance sum A+ / sum |A-| (start bounds if it meets the
    target, else the maxima). Prefer ``micro`` to reproduce the method. log r is clamped to
    +-``log_ratio_clamp`` (20, as the recipe's loss; null: no clamp).
    """

    def __init__(
        self,
        *,
        target: float = 1.0,
        c_low: float = 0.6,
        c_low_max: float = 0.8,
        c_low_step: float = 0.05,
        c_high: float = 1.2,
        c_high_max: float = 2.0,
        c_high_step: float = 0.05,
        eps: float = 1e-8,
        clip_c: float | None = 3.0,
        scope: str = "minibatch",
        log_ratio_clamp: float | None = 20.0,
    ) -> None:
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        if not 0.0 <= c_low <= c_low_max <= 1.0:
            raise ValueError(
                f"need 0 <= c_low <= c_low_max <= 1, got c_low={c_low!r}, c_low_max={c_low_max!r}"
            )
        if not 1.0 <= c_high <= c_high_max:
            raise ValueError(
                f"need 1 <= c_high <= c_high_max, got c_high={c_high!r}, c_high_max={c_high_max!r}"
            )
        if c_low_step < 0 or c_high_step < 0 or target < 0 or eps <= 0:
            raise ValueError(
                f"c_low_step, c_high_step, target must be >= 0 and eps > 0, got {c_low_step!r}, "
                f"{c_high_step!r}, {target!r}, {eps!r}"
            )
        check_clip(0.0, 0.0, clip_c)
        self.target, self.eps, self.clip_c = target, eps, clip_c
        self.lows = _bound_grid(c_low, c_low_max, c_low_step)
        self.highs = _bound_grid(c_high, c_high_max, c_high_step)
        self.scope = check_scope(scope)

    def _search(self, batch: RolloutBatch, ratio: Tensor) -> tuple[float, float, float]:
        w = batch.weights * batch.response_mask.float()
        adv, r = promoted(batch.advantages), promoted(ratio.detach())
        pos, neg = adv.clamp_min(0) * w, (-adv).clamp_min(0) * w
        sums = [(torch.minimum(r, r.new_tensor(c)) * pos).sum() for c in self.highs]
        sums += [(torch.maximum(r, r.new_tensor(c)) * neg).sum() for c in self.lows]
        s = all_reduce_sum(torch.stack(sums)).tolist()
        p_sums, n_sums = s[: len(self.highs)], s[len(self.highs) :]

        def pn(p: float, n: float) -> float:
            return math.inf if n <= 0 else p / (n + self.eps)

        i = 0
        while pn(p_sums[0], n_sums[i]) < self.target and i + 1 < len(self.lows):
            i += 1
        j = 0
        while pn(p_sums[j], n_sums[i]) < self.target and j + 1 < len(self.highs):
            j += 1
        return self.lows[i], self.highs[j], pn(p_sums[j], n_sums[i])

    def minibatch_state(self, batch: RolloutBatch) -> tuple[float, float, float]:
        return self._search(batch, torch.ones_like(batch.old_logprobs))

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        micro = self.scope == "micro"
        c_low, c_high, ratio_pn = self._search(batch, ratio) if micro else self.state_for(batch)
        loss, stats = clipped_surrogate(ratio, batch.advantages, 1.0 - c_low, c_high - 1.0, self.clip_c)
        stats.update(c_low=torch.tensor(c_low), c_high=torch.tensor(c_high), ratio_pn=torch.tensor(ratio_pn))
        return loss, stats


@register("loss", "erc")
class ERCLoss(PolicyLoss):
    """Entropy Ratio Clipping, arXiv 2512.05591 (official ``grpo_erc`` / ``gppo_erc``).

    rho_t = (H_cur,t + 1e-8) / (H_old,t + 1e-8); tokens with rho_t outside (beta_low, beta_high)
    keep their loss value but are detached (no gradient) and stay in the normaliser. The base loss
    is dual-clip PPO (``base: ppo``, grpo_erc) or CE-GPPO with beta1 = beta2 = 1 (``gppo``,
    gppo_erc). Per token, as in the code (the abstract calls it "global"). Defaults per METHODS.md:
    beta (0.8, 1.2), eps 0.2/0.2, clip_c 10; the released run scripts use beta (0.95, 1.05) and,
    with grpo_erc, eps_high 0.28.
    """

    def __init__(
        self,
        *,
        beta_low: float = 0.8,
        beta_high: float = 1.2,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_c: float | None = 10.0,
        base: str = "ppo",
    ) -> None:
        if not 0.0 <= beta_low < 1.0 < beta_high:
            raise ValueError(
                f"need 0 <= beta_low < 1 < beta_high, got beta_low={beta_low!r}, beta_high={beta_high!r}"
            )
        if base not in ("ppo", "gppo"):
            raise ValueError(f"base must be 'ppo' or 'gppo', got {base!r}")
        check_clip(eps_low, eps_high, clip_c)
        self.beta_low, self.beta_high, self.base = beta_low, beta_high, base
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs)
        adv = batch.advantages
        if self.base == "ppo":
            loss, stats = clipped_surrogate(ratio, adv, self.eps_low, self.eps_high, self.clip_c)
        else:
            loss, stats = gppo_surrogate(ratio, adv, self.eps_low, self.eps_high, 1.0, 1.0, self.clip_c)
        rho = (entropy.detach() + 1e-8) / (batch.entropy + 1e-8)
        keep = (rho > self.beta_low) & (rho < self.beta_high)
        stats["erc_detached_frac"] = (~keep).float()
        stats["entropy_ratio"] = rho
        return torch.where(keep, loss, loss.detach()), stats


@register("loss", "gspo")
class GSPOLoss(PolicyLoss):
    """GSPO sequence-level ratio, arXiv 2507.18071 (verl ``gspo``).

    s_i = exp(mean_t(log pi - log pi_old)) over the response; the token ratio
    s_it = sg(s_i) pi/sg(pi) has value s_i and gradient s_i grad log pi (log clamped at 10);
    L = max(-A s_it, -A clip(s_it, 1-eps_low, 1+eps_high)), aggregated seq-mean-token-mean. The
    paper's eps (3e-4, 4e-4) are [UNVERIFIED] (METHODS.md §4.7).
    """

    agg_override = "seq-mean-token-mean"

    def __init__(self, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> None:
        check_clip(eps_low, eps_high, None)
        self.eps_low, self.eps_high = eps_low, eps_high

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        m = batch.response_mask.float()
        seq = ((logprobs - batch.old_logprobs) * m).sum(-1) / m.sum(-1).clamp_min(1)
        log_s = (logprobs - logprobs.detach() + seq.detach().unsqueeze(-1)).clamp(max=10.0)
        s = torch.exp(log_s)
        adv = batch.advantages
        unclipped, clipped = -adv * s, -adv * s.clamp(1 - self.eps_low, 1 + self.eps_high)
        stats = {"clip_frac": (clipped > unclipped).float(), "seq_ratio": s.detach()}
        return torch.maximum(unclipped, clipped), stats


@register("loss", "cispo")
class CISPOLoss(PolicyLoss):
    """CISPO, MiniMax-M1 arXiv 2506.13585: L = -sg(clip(r, 1-eps_low_is, 1+eps_high_is)) A log pi,
    a REINFORCE loss with a clipped, detached IS weight, so no token loses its gradient.

    MiniMax-M1 sets no lower bound (eps_low_is large) and tunes only the upper one; eps_low_is = 1.0
    (lower bound 0) and eps_high_is = 4.0 (upper bound 5) follow TRL's ``loss_type='cispo'``
    (``clamp(r, max=epsilon_high)``, recommended 5.0 after ScaleRL arXiv 2510.13786). verl's
    ``cispo`` instead reuses the PPO clip ratios (e.g. 0.2/0.28). The paper's own eps_high value is
    [UNVERIFIED].
    """

    def __init__(self, *, eps_low_is: float = 1.0, eps_high_is: float = 4.0) -> None:
        check_clip(eps_low_is, eps_high_is, None, names=("eps_low_is", "eps_high_is"))
        self.eps_low_is, self.eps_high_is = eps_low_is, eps_high_is

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs)
        lo, hi = 1.0 - self.eps_low_is, 1.0 + self.eps_high_is
        weight = ratio.clamp(lo, hi).detach()
        return -weight * batch.advantages * logprobs, {"is_clip_frac": ((ratio < lo) | (ratio > hi)).float()}


def _submask_factor(batch: RolloutBatch, sub: Tensor, tokens_sub: float, seqs_sub: float) -> Tensor:
    """Per-row factor k with ``batch.agg(k * x)`` == the agg of ``x`` over the weights ``sub`` (a
    subset of the selected weights) with normalisers ``tokens_sub`` / ``seqs_sub``."""
    w = batch.weights
    norm = batch.agg_norm or make_agg_norm([batch], "token-mean", const=float(w.shape[-1]))
    zero = torch.zeros(w.shape[0], 1, device=w.device)
    if norm.mode == "token-mean":
        return zero + (norm.tokens["selected"] / tokens_sub if tokens_sub > 0 else 0.0)
    if norm.mode == "seq-mean-token-sum-norm":
        return zero + 1.0
    per_seq = norm.seqs["selected"] / seqs_sub if seqs_sub > 0 else 0.0
    if norm.mode == "seq-mean-token-sum":
        return zero + per_seq
    rows = sub.sum(-1, keepdim=True)
    return torch.where(rows > 0, w.sum(-1, keepdim=True) / rows.clamp_min(1e-12), zero) * per_seq


@register("loss", "entropic")
class EntroPICLoss(_ScopedLoss):
    """EntroPIC, arXiv 2511.15248 (official ``compute_policy_loss_entropic`` + ``dp_actor``).

    PI control of positive/negative weights: e = H - H_tgt, alpha = clip(kp e + ki I, -1, 1) with I
    the integral before this update, then I += e (micro/mini share). L = dual-clip PPO
    + alpha agg(-r |A|) over high-probability tokens (pi > high_prob, current policy). The integral
    is checkpointed. Defaults: H_tgt 0.1, kp 1, ki 0.01, high_prob 0.95 (script / function); the
    PPO eps 0.2/0.2 and clip_c 3.0 (verl actor defaults) are [UNVERIFIED] for EntroPIC's runs.

    ``scope: micro`` (official): H = agg(entropy_cur) over each micro-batch, one controller update
    per micro-batch. ``minibatch``: H = agg of the old policy's entropy over the whole mini-batch and
    all ranks (``prepare``), one update per mini-batch; the high-probability term is normalised by the
    mini-batch count of old-policy high-probability tokens (identical at the first update).
    """

    ratio_dependent = False  # the alpha-weighted term has gradient -alpha |A| grad log pi even at r = 1

    def __init__(
        self,
        *,
        target_entropy: float = 0.1,
        kp: float = 1.0,
        ki: float = 0.01,
        high_prob: float = 0.95,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_c: float | None = 3.0,
        scope: str = "minibatch",
    ) -> None:
        if target_entropy < 0:
            raise ValueError(f"target_entropy must be >= 0, got {target_entropy!r}")
        if kp < 0 or ki < 0:
            raise ValueError(f"kp/ki must be >= 0, got kp={kp!r}, ki={ki!r}")
        if not 0.0 < high_prob < 1.0:
            raise ValueError(f"high_prob must be in (0, 1), got {high_prob!r}")
        check_clip(eps_low, eps_high, clip_c)
        self.target_entropy, self.kp, self.ki, self.log_tau = target_entropy, kp, ki, math.log(high_prob)
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c
        self.scope = check_scope(scope)
        self.integral, self.alpha = 0.0, 0.0
        self._controlled: Any = None
        self._mini_rows = 0

    def _control(self, entropy: float, share: float) -> None:
        e = entropy - self.target_entropy
        self.alpha = float(min(1.0, max(-1.0, self.kp * e + self.ki * self.integral)))
        self.integral += e * share

    def _high_prob(self, batch: RolloutBatch, logprobs: Tensor) -> Tensor:
        return ((logprobs.detach() > self.log_tau) & valid_tokens(batch)).float()

    def minibatch_state(self, batch: RolloutBatch) -> dict[str, list[float]]:
        sub = batch.weights * self._high_prob(batch, batch.old_logprobs)
        hp = all_reduce_sum(torch.stack([sub.sum(), (sub.sum(-1) > 0).float().sum()])).tolist()
        return {"entropy": agg_sums(batch.entropy, batch.response_mask, pooled=True), "high_prob": hp}

    def prepare(self, batch: RolloutBatch) -> None:
        self._mini_rows = batch.size
        super().prepare(batch)

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        norm = batch.agg_norm
        mode, const = (norm.mode, norm.const) if norm else ("token-mean", float(entropy.shape[-1]))
        hp = self._high_prob(batch, logprobs)
        sub = batch.weights * hp
        if self.scope == "micro":
            mini = max(self._mini_rows, batch.size)
            self._control(
                agg_from_sums(agg_sums(entropy, batch.response_mask, False), mode, const), batch.size / mini
            )
            # the official per-micro-batch normaliser, rescaled to this micro-batch's share of the update
            scale = (norm.world_size if norm else 1) * mini / batch.size
            tokens_hp, seqs_hp = float(sub.sum()) * scale, float((sub.sum(-1) > 0).sum()) * scale
        else:
            state = self.state_for(batch)
            if state is not self._controlled:  # one controller update per mini-batch
                self._control(agg_from_sums(state["entropy"], mode, const), 1.0)
                self._controlled = state
            tokens_hp, seqs_hp = state["high_prob"]
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs)
        adv = batch.advantages
        loss, stats = clipped_surrogate(ratio, adv, self.eps_low, self.eps_high, self.clip_c)
        k = _submask_factor(batch, sub, tokens_hp, seqs_hp)
        loss = loss + self.alpha * (-ratio * adv.abs()) * hp * k
        stats.update(high_prob_frac=hp, alpha=torch.tensor(self.alpha), integral=torch.tensor(self.integral))
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        return {"integral": self.integral, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral, self.alpha = float(state["integral"]), float(state["alpha"])


def entropy_norm_stats(
    entropy: Tensor, mask: Tensor, pivot: float, pooled: bool
) -> tuple[float, float, float, float]:
    """HAPO ``compute_entropy_h`` statistics over valid tokens: pivot m = nearest rho-quantile of
    log H, RMS of (log H - m), and the largest / most negative normalised value."""
    e, _ = gather_valid(torch.log(promoted(entropy.detach()).clamp_min(1e-8)), mask, pooled)
    if e.numel() == 0:
        return 0.0, 1.0, 1e-8, -1e-8
    m = torch.sort(e).values[round(pivot * (e.numel() - 1))]  # Python round, like the official code
    h = e - m
    std = h.pow(2).mean().clamp_min(1e-8).sqrt()
    h = h / std
    return (
        float(m),
        float(std),
        float(h.clamp_min(0).max().clamp_min(1e-8)),
        float(h.clamp_max(0).min().clamp_max(-1e-8)),
    )


@register("loss", "hapo_clip")
class HAPOClipLoss(_ScopedLoss):
    """HAPO asymmetric adaptive clipping + differential advantage redistribution, arXiv 2509.16591
    (official ``compute_entropy_h``, ``ada_clip``, ``ada_advantage``).

    h = (log H - m)/RMS with m the ``entropy_pivot`` quantile; h_hat = h/max(h+) for h > 0 and
    h/|min h| for h <= 0, in [-1, 1]. Clipping: eps_low' = eps_low (1 - alpha h_hat) where h_hat <= 0,
    eps_high' = eps_high (1 + alpha h_hat) where h_hat > 0. Advantage: A_ent = A (1 + beta h_hat);
    inside the neutral zone (1 - eps_low'/2, 1 + eps_high'/2) high-entropy tokens keep A and
    low-entropy ones get A_ent, outside the reverse. Then dual-clip PPO. Defaults: the qwen3_8b
    script (pivot 0.8, alpha 1, beta 1, eps 0.2/0.2, clip_c 10).

    ``code_sign_quirk=True`` reproduces the official code, which divides negative h by min h (a
    negative number), so every token gets h_hat >= 0 and is treated as high-entropy.
    ``scope: minibatch`` takes the statistics over the whole mini-batch and all ranks from the old
    policy's entropy; ``micro`` from the current entropy of each micro-batch (official). The official
    code does not clamp log r (``log_ratio_clamp`` null); a number clamps it like verl.
    """

    ratio_dependent = False  # at r = 1 low-entropy tokens already get the reshaped advantage

    def __init__(
        self,
        *,
        entropy_pivot: float = 0.8,
        clip_alpha: float = 1.0,
        adv_beta: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_c: float | None = 10.0,
        adaptive_clip: bool = True,
        adaptive_advantage: bool = True,
        code_sign_quirk: bool = False,
        scope: str = "minibatch",
        log_ratio_clamp: float | None = None,
    ) -> None:
        self.log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
        if not 0.0 <= entropy_pivot <= 1.0:
            raise ValueError(f"entropy_pivot must be in [0, 1], got {entropy_pivot!r}")
        if clip_alpha < 0 or adv_beta < 0:
            raise ValueError(f"clip_alpha/adv_beta must be >= 0, got {clip_alpha!r}, {adv_beta!r}")
        check_clip(eps_low, eps_high, clip_c)
        self.entropy_pivot, self.clip_alpha, self.adv_beta = entropy_pivot, clip_alpha, adv_beta
        self.eps_low, self.eps_high, self.clip_c = eps_low, eps_high, clip_c
        self.adaptive_clip, self.adaptive_advantage, self.code_sign_quirk = (
            adaptive_clip,
            adaptive_advantage,
            code_sign_quirk,
        )
        self.scope = check_scope(scope)

    def minibatch_state(self, batch: RolloutBatch) -> tuple[float, float, float, float]:
        return entropy_norm_stats(batch.entropy, batch.response_mask, self.entropy_pivot, pooled=True)

    def h_hat(self, entropy: Tensor, stats: tuple[float, float, float, float]) -> Tensor:
        m, std, pos_max, neg_min = stats
        h = (torch.log(promoted(entropy.detach()).clamp_min(1e-8)) - m) / std
        neg_scale = 1.0 / neg_min if self.code_sign_quirk else -1.0 / neg_min
        return torch.where(h > 0, h / pos_max, h * neg_scale)

    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        if self.scope == "micro":
            hh = self.h_hat(
                entropy, entropy_norm_stats(entropy, batch.response_mask, self.entropy_pivot, False)
            )
        else:
            hh = self.h_hat(batch.entropy, self.state_for(batch))
        ratio, _ = importance_ratio(logprobs, batch.old_logprobs, self.log_ratio_clamp)
        eps_low = torch.full_like(hh, self.eps_low)
        eps_high = torch.full_like(hh, self.eps_high)
        if self.adaptive_clip:
            eps_low = torch.where(hh <= 0, eps_low * (1 - self.clip_alpha * hh), eps_low)
            eps_high = torch.where(hh > 0, eps_high * (1 + self.clip_alpha * hh), eps_high)
        adv = batch.advantages
        if self.adaptive_advantage:
            neutral = (ratio.detach() > 1 - eps_low / 2) & (ratio.detach() < 1 + eps_high / 2)
            adv_ent = adv * (1 + self.adv_beta * hh)
            # high entropy: A inside the neutral zone, A_ent outside; low entropy: the reverse
            adv = torch.where((hh > 0) == neutral, adv, adv_ent)
        loss, out = clipped_surrogate(ratio, adv, eps_low, eps_high, self.clip_c)
        out.update(h_hat=hh, low_entropy_frac=(hh <= 0).float(), eps_low_eff=eps_low, eps_high_eff=eps_high)
        return loss, out


# ---- rollout/training mismatch (a separate inference engine samples the rollout) -------------------

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
# ratios pi_train / pi_rollout outside [1/2, 2] count as "far" in the mismatch metrics
MISMATCH_RATIO_BAND = 2.0


def rollout_log_ratio(train_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log(pi_train / pi_rollout) per response token, 0 outside ``mask``, clamped to [-20, 20] like
    verl's rollout correction (``SAFETY_BOUND``) so that exp() stays finite."""
    lr = (train_logprobs - rollout_logprobs).clamp(-20.0, 20.0)
    return torch.where(mask > 0, lr, torch.zeros_like(lr))


def rollout_mismatch(train_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-token diagnostics of how far the sampling engine's log-probs are from the training model's
    on the sampled tokens: ``k3`` = r - 1 - log r with r = pi_train / pi_rollout (an estimate of
    KL(pi_rollout || pi_train) from rollout samples, verl's ``rollout_corr/k3_kl``), ``abs_diff`` =
    |log pi_train - log pi_rollout| and ``far`` = 1 where r is outside [1/2, 2]."""
    lr = rollout_log_ratio(train_logprobs, rollout_logprobs, mask)
    return {
        "k3": torch.exp(lr) - 1 - lr,
        "abs_diff": lr.abs(),
        "far": (lr.abs() > math.log(MISMATCH_RATIO_BAND)).float(),
    }


def rollout_correction_weights(
    train_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, mode: str, cap: float
) -> Tensor:
    """Per-token weights against the rollout/training mismatch (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; verl ``rollout_corr_helper.py`` @0b4e2a81,
    token level), with w = pi_train / pi_rollout (pi_train = the training model's pi_old):

    * ``tis``: min(w, C), multiplying the policy-gradient loss of each token (verl
      ``compute_rollout_correction_weights``; TRL's ``token_truncate``);
    * ``mis``: 1 where 1/C <= w <= C else 0, taking the token out of the loss and of its token-mean
      denominator (verl ``compute_rollout_rejection_mask``, rollout_rs="token", lower bound 1/C).

    Weights are detached and 0 outside ``mask``. Default C = 2 (verl's rollout_is_threshold and
    rollout_rs_threshold; TRL's first ``vllm_importance_sampling_cap``; its current default is 3 with
    sequence-level masking)."""
    if mode not in ("tis", "mis"):
        raise ValueError(f"rollout correction mode '{mode}' is not one of tis, mis")
    w = torch.exp(rollout_log_ratio(train_logprobs, rollout_logprobs, mask)).detach()
    if mode == "tis":
        out = w.clamp(max=cap)
    else:
        out = ((w >= 1.0 / cap) & (w <= cap)).to(w.dtype)
    return out * (mask > 0)
