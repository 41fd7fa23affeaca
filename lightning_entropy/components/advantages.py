"""Advantage estimators: sequence rewards -> per-token advantages [B, T] (METHODS.md §1)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import AdvantageEstimator
from lightning_entropy.components.common import (
    all_gather_cat,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    broadcast_to_tokens,
    group_count,
    group_index,
    group_mean_std,
    group_min_max,
    group_sum,
    masked_mean,
    masked_sum,
    rank_in_group,
    rank_offset,
)
from lightning_entropy.registry import register


@register("advantage", "grpo")
class GRPOAdvantage(AdvantageEstimator):
    """GRPO group baseline, arXiv 2402.03300: A_i = (r_i - mean_g r) / (std_g r + eps).

    ``norm_std=False`` drops the division (r_i - mean_g r). std is unbiased (torch.std); a group of
    one gets mean 0, std 1 (verl), so its advantage is the raw reward.
    """

    needs_old_pass = False

    def __init__(self, *, eps: float = 1e-6, norm_std: bool = True) -> None:
        self.eps = eps
        self.norm_std = norm_std

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mean, std = group_mean_std(batch.rewards, batch.group_ids)
        adv = batch.rewards.double() - mean
        if self.norm_std:
            adv = adv / (std + self.eps)
        return broadcast_to_tokens(adv, batch.response_mask)


@register("advantage", "dr_grpo")
class DrGRPOAdvantage(AdvantageEstimator):
    """Dr. GRPO, arXiv 2503.20783: A_i = r_i - mean_g r (no std).

    Pair with ``loss.agg: seq-mean-token-sum-norm`` (a constant normaliser, no 1/|o_i|).
    """

    needs_old_pass = False

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mean, _ = group_mean_std(batch.rewards, batch.group_ids)
        return broadcast_to_tokens(batch.rewards.double() - mean, batch.response_mask)


@register("advantage", "rloo")
class RLOOAdvantage(AdvantageEstimator):
    """RLOO leave-one-out baseline, arXiv 2402.14740: A_i = r_i - mean_{j != i} r_j = G/(G-1)(r_i - mean_g r).

    A group of one keeps its raw reward (verl).
    """

    needs_old_pass = False

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        n = group_count(batch.group_ids, dtype=torch.float64)
        mean, _ = group_mean_std(r, batch.group_ids)
        adv = torch.where(n > 1, (r - mean) * n / (n - 1).clamp_min(1), r)
        return broadcast_to_tokens(adv, batch.response_mask)


# ---- shared helpers ---------------------------------------------------------------------------


def _need(batch: RolloutBatch, *fields: str) -> None:
    for f in fields:
        if getattr(batch, f) is None:
            raise ValueError(f"this advantage estimator reads batch.{f}, which is None")


def _group_quantile(values: Tensor, gidx: Tensor, n_groups: int, q: float, interpolation: str) -> Tensor:
    """Per-group q-quantile [G]. ``linear`` is torch.quantile's default; ``lower`` is the lower
    empirical quantile inf{x : F(x) >= q} (not torch's 'lower', which indexes floor(q (n-1)))."""
    _, order, counts = rank_in_group(values, gidx, n_groups)
    v, n = values[order].double(), counts.double()
    starts = (torch.cumsum(counts, 0) - counts).double()
    if interpolation == "linear":
        pos = q * (n - 1)
        lo = pos.floor()
        hi = torch.minimum(lo + 1, n - 1)
        a, b = v[(starts + lo).long()], v[(starts + hi).long()]
        return a + (pos - lo) * (b - a)
    k = (torch.ceil(q * n - 1e-9) - 1).clamp_min(0)  # tolerance: 0.28 * 25 = 7.000000000000001
    return v[(starts + torch.minimum(k, n - 1)).long()]


def _keyed_stats(
    values: Tensor, keys: Tensor, n_keys: int, weight: Tensor, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted mean and std of ``values`` per key (float64), returned per element, with each key's
    total weight. A key whose weighted values are all equal gets exactly that value and std 0."""
    v, w = values.double(), weight.double()
    zeros = torch.zeros(n_keys, dtype=torch.float64, device=v.device)
    tot = zeros.index_add(0, keys, w)
    mean = zeros.index_add(0, keys, w * v) / tot.clamp_min(1e-12)
    lo = torch.full_like(zeros, math.inf).scatter_reduce(0, keys, torch.where(w > 0, v, math.inf), "amin")
    hi = torch.full_like(zeros, -math.inf).scatter_reduce(0, keys, torch.where(w > 0, v, -math.inf), "amax")
    equal = lo == hi
    mean = torch.where(equal, lo, mean)
    sq = zeros.index_add(0, keys, w * (v - mean[keys]) ** 2)
    std = (sq / ((tot - 1).clamp_min(1) if unbiased else tot.clamp_min(1e-12))).sqrt()
    std = torch.where(equal, 0.0, std)
    return mean[keys], std[keys], tot[keys]


def _per_position_sum(x: Tensor, gidx: Tensor, n_groups: int) -> Tensor:
    """[B, T] -> [B, T]: sum over the responses of each row's group at the same position."""
    return torch.zeros(n_groups, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, gidx, x)[gidx]


def _global_mean(x: Tensor) -> Tensor:
    stats = all_reduce_sum(torch.stack([x.double().sum(), torch.tensor(float(x.numel()), device=x.device)]))
    return stats[0] / stats[1].clamp_min(1)


def _build_base(base: str, base_kwargs: dict[str, Any] | None) -> AdvantageEstimator:
    from lightning_entropy.registry import ADVANTAGES

    return ADVANTAGES.build(base, dict(base_kwargs or {}), key="advantage.base")


class _Composed(AdvantageEstimator):
    """An estimator that reshapes the advantages of a ``base`` estimator built by name."""

    base: AdvantageEstimator

    def _base_advantages(self, batch: RolloutBatch) -> Tensor:
        adv = self.base(batch)
        self.metrics.update({f"base_{k}": v for k, v in self.base.metrics.items()})
        return adv

    def state_dict(self) -> dict[str, Any]:
        state = self.base.state_dict()
        return {"base": state} if state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extra = set(state) - {"base"}
        if extra:
            raise ValueError(f"{type(self).__name__}: unexpected state keys {sorted(extra)}")
        self.base.load_state_dict(state.get("base", {}))


# ---- quantile / conditional baselines -------------------------------------------------------


@register("advantage", "qae")
class QAEAdvantage(AdvantageEstimator):
    """QAE, arXiv 2509.22611: A_i = (r_i - Quantile_K{r_g}) / (std_g r + eps); GRPO with the group
    mean replaced by its K-quantile. K outside (0, 1) falls back to the mean (exactly GRPO).

    ``interpolation="lower"`` is the lower empirical quantile inf{x: F(x) >= K}, the paper's two-regime
    gate for binary rewards (success rate p <= 1-K: b=0, only successes move; p > 1-K: b=1, only
    failures move). The official README code calls ``torch.quantile`` (``"linear"``), which can give a
    fractional baseline near p = 1-K (G=8, K=0.4, three zeros: b=0.8). A group of one keeps its raw
    reward (verl). Logs ``zero_frac``, the share of responses with zero advantage (all ranks).
    """

    def __init__(
        self, *, k: float = 0.4, interpolation: str = "lower", norm_std: bool = True, eps: float = 1e-6
    ) -> None:
        if interpolation not in ("lower", "linear"):
            raise ValueError(f"interpolation must be 'lower' or 'linear', got {interpolation!r}")
        if not math.isfinite(k):
            raise ValueError(f"k must be finite, got {k}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.k, self.interpolation, self.norm_std, self.eps = k, interpolation, norm_std, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        mean, std = group_mean_std(r, batch.group_ids)
        if 0.0 < self.k < 1.0:
            gidx, n_groups = group_index(batch.group_ids)
            quant = _group_quantile(r, gidx, n_groups, self.k, self.interpolation)[gidx]
            mean = torch.where(group_count(batch.group_ids) > 1, quant, mean)
        adv = r - mean
        if self.norm_std:
            adv = adv / (std + self.eps)
        zeros = all_reduce_sum(torch.stack([(adv == 0).sum().float(), adv.new_tensor(float(adv.numel()))]))
        self.metrics["zero_frac"] = zeros[0] / zeros[1].clamp_min(1)
        return broadcast_to_tokens(adv, batch.response_mask)


@register("advantage", "canon")
class CANONAdvantage(AdvantageEstimator):
    """CANON, arXiv 2509.23962: split each group by a metric (stable ascending sort; low set L = first
    floor(n/2), high set H = the rest) and mix inter- and intra-set comparisons (entropy metric):
    H: A = lam (r - alpha mu_L + beta) + (1-lam)(r - mu_H);  L: A = lam (alpha r - mu_H - beta) + (1-lam)(r - mu_L).
    ``metric="length"`` puts alpha on r in H and on mu_H in L (code ``dr_length_on_mean``).

    The entropy metric is the masked mean of ``batch.entropy`` (old policy) per response. A group of one
    has mu_L = mu_H = 0. Dr.-GRPO style: no std; A is divided by ``max_response_length``, which the
    config should set to ``sampler.max_new_tokens`` with ``loss.agg: seq-mean-token-sum`` (None: no
    division; then use ``seq-mean-token-sum-norm``). ``anneal`` replaces lam by a function of the batch
    mean reward m (all ranks): ``inter_first`` lam = 1 - m (inter-group first, later intra); the code at
    biuboomc/CANON@7d6f814 ``..._annel`` weights the inter term by m (``intra_first``). The code's
    anneal variant fixes alpha=1, beta=0; here alpha and beta still apply.
    """

    def __init__(
        self,
        *,
        metric: str = "entropy",
        lam: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.0,
        anneal: bool = False,
        anneal_schedule: str = "inter_first",
        max_response_length: int | None = None,
    ) -> None:
        if metric not in ("entropy", "length"):
            raise ValueError(f"metric must be 'entropy' or 'length', got {metric!r}")
        if anneal_schedule not in ("inter_first", "intra_first"):
            raise ValueError(
                f"anneal_schedule must be 'inter_first' or 'intra_first', got {anneal_schedule!r}"
            )
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if max_response_length is not None and max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1 or None, got {max_response_length}")
        self.metric, self.lam, self.alpha, self.beta = metric, lam, alpha, beta
        self.anneal, self.anneal_schedule = anneal, anneal_schedule
        self.max_response_length = max_response_length

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        mask = batch.response_mask.float()
        if self.metric == "entropy":
            _need(batch, "entropy")
            m = masked_mean(batch.entropy.float(), mask, dim=-1)
        else:
            m = mask.sum(-1)
        gidx, n_groups = group_index(batch.group_ids)
        rank, _, counts = rank_in_group(m, gidx, n_groups)
        n = counts[gidx]
        high = rank >= n // 2
        n_high = group_sum(high.double(), batch.group_ids)
        mu_high = group_sum(torch.where(high, r, 0.0), batch.group_ids) / n_high.clamp_min(1)
        mu_low = group_sum(torch.where(high, 0.0, r), batch.group_ids) / (n - n_high).clamp_min(1)
        mu_high = torch.where(n > 1, mu_high, 0.0)
        own, other = torch.where(high, mu_high, mu_low), torch.where(high, mu_low, mu_high)
        alpha_on_r = high if self.metric == "length" else ~high
        inter = torch.where(alpha_on_r, self.alpha * r - other, r - self.alpha * other)
        inter = inter + torch.where(high, self.beta, -self.beta)
        lam = r.new_tensor(self.lam)
        if self.anneal:
            mean_r = _global_mean(r)
            lam = 1.0 - mean_r if self.anneal_schedule == "inter_first" else mean_r
        adv = lam * inter + (1.0 - lam) * (r - own)
        if self.max_response_length is not None:
            adv = adv / self.max_response_length
        self.metrics["lambda"] = lam.float()
        return broadcast_to_tokens(adv, batch.response_mask)


# ---- entropy-shaped rewards and advantages --------------------------------------------------


@register("advantage", "gtpo")
class GTPOAdvantage(AdvantageEstimator):
    """GTPO, arXiv 2508.04349 (token level; formulas from a third-party paper-faithful reimplementation,
    no official code). Per group and position t, over responses still active at t (d_t successes O+,
    h_t failures O-; success = r > ``success_threshold``), with detached old-policy entropy H:
    O+: r~ = alpha1 r_i + alpha2 d_t H_it / sum_O+ H_kt;  O-: r~ = -alpha1 - alpha2 h_t (1/H_jt) / sum_O- (1/H_kt).
    A = (r~ - mean) / (std + std_eps) over the group's O+ tokens and O- tokens separately (population std);
    ``norm="joint"`` pools all the group's tokens instead (not in the paper; separate normalisation
    centres each set, so the outcome enters only through the entropy shares). ``eps`` guards H = 0.
    """

    def __init__(
        self,
        *,
        alpha1: float = 1.0,
        alpha2: float = 0.1,
        success_threshold: float = 0.5,
        norm: str = "separate",
        eps: float = 1e-8,
        std_eps: float = 1e-6,
    ) -> None:
        if norm not in ("separate", "joint"):
            raise ValueError(f"norm must be 'separate' or 'joint', got {norm!r}")
        if eps <= 0 or std_eps < 0:
            raise ValueError(f"eps must be > 0 and std_eps >= 0, got eps={eps}, std_eps={std_eps}")
        self.alpha1, self.alpha2, self.threshold = alpha1, alpha2, success_threshold
        self.norm, self.eps, self.std_eps = norm, eps, std_eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        _need(batch, "entropy")
        gidx, n_groups = group_index(batch.group_ids)
        mask = batch.response_mask.bool()
        # float64: equal shaped rewards must normalise to ~0, not to float32 rounding noise / std_eps
        r, h = batch.rewards.double(), batch.entropy.detach().double().clamp_min(0)
        success = r > self.threshold
        pos, neg = mask & success[:, None], mask & ~success[:, None]
        h_pos = torch.where(pos, h, 0.0)
        share_pos = h_pos / _per_position_sum(h_pos, gidx, n_groups).clamp_min(self.eps)
        inv_neg = torch.where(neg, 1.0 / (h + self.eps), 0.0)
        share_neg = inv_neg / _per_position_sum(inv_neg, gidx, n_groups).clamp_min(self.eps)
        d_t = _per_position_sum(pos.double(), gidx, n_groups)
        h_t = _per_position_sum(neg.double(), gidx, n_groups)
        shaped = torch.where(
            pos,
            self.alpha1 * r[:, None] + self.alpha2 * share_pos * d_t,
            -self.alpha1 - self.alpha2 * share_neg * h_t,
        )
        keys = gidx * 2 + success.long() if self.norm == "separate" else gidx
        keys = keys[:, None].expand_as(shaped).reshape(-1)
        mean, std, _ = _keyed_stats(shaped.reshape(-1), keys, 2 * n_groups, mask.reshape(-1), unbiased=False)
        adv = (shaped.reshape(-1) - mean) / (std + self.std_eps)
        return (adv.view_as(shaped) * mask).float()


@register("advantage", "grpo_s")
class GRPOSAdvantage(AdvantageEstimator):
    """GRPO-S, arXiv 2508.04349 (sequence level). RECONSTRUCTED BY ANALOGY with GTPO, [UNVERIFIED]: the
    abstract only says each sequence gets an entropy-weighted reward from its mean token entropy.
    With Hbar_i = masked mean of the old-policy entropy, over a group's non-empty responses:
    O+: r^ = beta1 r_i + beta2 |O+| Hbar_i / sum_O+ Hbar_k;  O-: r^ = -beta1 - beta2 |O-| (1/Hbar_j) / sum_O- (1/Hbar_k),
    then A = (r^ - mean_g r^) / (std_g r^ + std_eps) over the group (unbiased std, as GRPO; a group of one
    keeps r^). ``norm="separate"`` normalises O+ and O- apart instead (population std, as GTPO).
    """

    def __init__(
        self,
        *,
        beta1: float = 1.0,
        beta2: float = 0.1,
        success_threshold: float = 0.5,
        norm: str = "joint",
        eps: float = 1e-8,
        std_eps: float = 1e-6,
    ) -> None:
        if norm not in ("separate", "joint"):
            raise ValueError(f"norm must be 'separate' or 'joint', got {norm!r}")
        if eps <= 0 or std_eps < 0:
            raise ValueError(f"eps must be > 0 and std_eps >= 0, got eps={eps}, std_eps={std_eps}")
        self.beta1, self.beta2, self.threshold = beta1, beta2, success_threshold
        self.norm, self.eps, self.std_eps = norm, eps, std_eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        _need(batch, "entropy")
        gidx, n_groups = group_index(batch.group_ids)
        mask = batch.response_mask.float()
        r = batch.rewards.double()
        h = masked_mean(batch.entropy.detach().double().clamp_min(0), mask.double(), dim=-1)
        valid = mask.sum(-1) > 0  # an empty response carries no entropy and must not skew the shares
        success = r > self.threshold
        pos, neg = (valid & success).double(), (valid & ~success).double()
        share_pos = h * pos / group_sum(h * pos, batch.group_ids).clamp_min(self.eps)
        inv = neg / (h + self.eps)
        share_neg = inv / group_sum(inv, batch.group_ids).clamp_min(self.eps)
        shaped = torch.where(
            success,
            self.beta1 * r + self.beta2 * share_pos * group_sum(pos, batch.group_ids),
            -self.beta1 - self.beta2 * share_neg * group_sum(neg, batch.group_ids),
        )
        if self.norm == "separate":
            keys = gidx * 2 + success.long()
            mean, std, _ = _keyed_stats(shaped, keys, 2 * n_groups, valid.double(), unbiased=False)
        else:
            mean, std, tot = _keyed_stats(shaped, gidx, n_groups, valid.double(), unbiased=True)
            mean, std = torch.where(tot > 1, mean, 0.0), torch.where(tot > 1, std, 1.0)
        adv = (shaped - mean) / (std + self.std_eps)
        return broadcast_to_tokens(adv.float(), batch.response_mask)


@register("advantage", "entropy_adv")
class EntropyAdvantage(_Composed):
    """Entropy advantage term, arXiv 2506.14758: A'_t = A_t + min(alpha H_t.detach(), |A_t| / kappa).

    The clip keeps |psi| <= |A|/kappa, so kappa > 1 never flips A's sign, and zero-advantage groups get
    nothing. ``base`` names the estimator giving A (built through the registry with ``base_kwargs``).
    METHODS asks for the current policy's detached entropy; at advantage time only ``batch.entropy``
    (old policy, equal to the current one at the first update of each rollout) exists, so that is used.
    alpha=0.4 (SIREN reimplementation); kappa=2 is [UNVERIFIED] (the SIREN baseline uses 1).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.4,
        kappa: float = 2.0,
        base: str = "grpo",
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        self.alpha, self.kappa = alpha, kappa
        self.base = _build_base(base, base_kwargs)
        self.requires = self.base.requires

    def __call__(self, batch: RolloutBatch) -> Tensor:
        _need(batch, "entropy")
        adv = self._base_advantages(batch)
        mask = batch.response_mask.float()
        psi = torch.minimum(self.alpha * batch.entropy.detach().float(), adv.abs() / self.kappa) * mask
        self.metrics["psi"] = psi
        return adv + psi


@register("advantage", "mapo")
class MAPOAdvantage(AdvantageEstimator):
    """MAPO, arXiv 2509.18849: A = lam_g (r - mu)/(sigma + eps) + (1 - lam_g)(r - mu)/(mu + eps),
    lam_g = 4 p_g (1 - p_g) with p_g the share of rewards equal to 1.0 in the group (binary rewards).

    Certain groups (p near 0 or 1) lean on the percent deviation (r - mu)/mu. Groups are found by
    ``group_ids``, not by the code's contiguous ``repeat_interleave``; a group of one keeps its raw
    reward (the code asserts G > 1; verl's convention).
    """

    def __init__(self, *, eps: float = 1e-6) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        n = group_count(batch.group_ids, dtype=torch.float64)
        mean, std = group_mean_std(r, batch.group_ids)
        p = group_sum((r == 1.0).double(), batch.group_ids) / n
        lam = 4.0 * p * (1.0 - p)
        adv = lam * (r - mean) / (std + self.eps) + (1.0 - lam) * (r - mean) / (mean + self.eps)
        return broadcast_to_tokens(torch.where(n > 1, adv, r), batch.response_mask)


@register("advantage", "aapo")
class AAPOAdvantage(AdvantageEstimator):
    """AAPO advantage momentum, arXiv 2505.14264: A_i = (r_i - mean_g r)/(std_g r + eps) + clip(r_i - r'_i, -clip_low, clip_high).

    r' = ``batch.paired_rewards``: the reward of a second sample for the same prompt, index-paired with
    sample i, which the module draws from the current rollout policy with the same sampler settings
    (the official non-vLLM path draws it from ``ref_model``). The momentum term keeps a signal in
    all-equal groups. AAPO's loss is plain REINFORCE, -sum_t log pi(o_t) A / sum mask (token-mean), with
    no ratio and no clip: pair it with a ratio-free loss, or with ``ppo`` at one epoch over one
    mini-batch, where the ratio is 1 and the clip inactive. Clip bounds are the code's constants; a
    group of one has mean 0, std 1 (verl).
    """

    requires = frozenset({"paired_rewards"})

    def __init__(
        self, *, scale_rewards: bool = True, eps: float = 1e-4, clip_low: float = 0.2, clip_high: float = 0.28
    ) -> None:
        if clip_low < 0 or clip_high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.scale_rewards, self.eps, self.clip_low, self.clip_high = scale_rewards, eps, clip_low, clip_high

    def __call__(self, batch: RolloutBatch) -> Tensor:
        _need(batch, "paired_rewards")
        r = batch.rewards.double()
        mean, std = group_mean_std(r, batch.group_ids)
        adv = r - mean
        if self.scale_rewards:
            adv = adv / (std + self.eps)
        momentum = (r - batch.paired_rewards.double()).clamp(-self.clip_low, self.clip_high)
        self.metrics["momentum"] = _global_mean(momentum).float()
        return broadcast_to_tokens(adv + momentum, batch.response_mask)


@register("advantage", "ucas")
class UCASAdvantage(AdvantageEstimator):
    """UCAS, arXiv 2510.10649: A_t = A_i m_i - gamma lhat_t, floored at 0 when A_i m_i > 0, where
    A_i is GRPO's, m_i = exp(-beta_pos C^_i) if A_i > 0 else exp(beta_neg C^_i), C^_i the group z-score
    of C_i = sum_t self_certainty_t, and lhat_t the min-max of the sampled token's raw logit over all
    valid tokens of the batch (all ranks; 0.5 when max == min).

    Constants are the code's (xvolcano02/UCAS@b122ff2). ``norm_std=False`` is the code's Dr. variant
    (no std for A nor C). Deviation: a group of one gets C^ = 0 (the code's mean-0/std-1 convention
    would exponentiate a raw certainty sum). Zero-advantage groups still get the -gamma lhat penalty.
    """

    requires = frozenset({"self_certainty", "sampled_logits"})

    def __init__(
        self,
        *,
        beta_pos: float = 0.25,
        beta_neg: float = 0.35,
        gamma: float = 0.05,
        norm_std: bool = True,
        eps: float = 1e-6,
    ) -> None:
        if beta_pos < 0 or beta_neg < 0 or gamma < 0:
            raise ValueError(f"beta_pos, beta_neg, gamma must be >= 0, got {beta_pos}, {beta_neg}, {gamma}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.beta_pos, self.beta_neg, self.gamma = beta_pos, beta_neg, gamma
        self.norm_std, self.eps = norm_std, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        _need(batch, "self_certainty", "sampled_logits")
        mask = batch.response_mask.float()
        r = batch.rewards.double()
        c = masked_sum(batch.self_certainty.double(), mask.double(), dim=-1)
        r_mean, r_std = group_mean_std(r, batch.group_ids)
        c_mean, c_std = group_mean_std(c, batch.group_ids)
        adv, c_hat = r - r_mean, c - c_mean
        if self.norm_std:
            adv, c_hat = adv / (r_std + self.eps), c_hat / (c_std + self.eps)
        c_hat = torch.where(group_count(batch.group_ids) > 1, c_hat, 0.0)
        mod = torch.where(adv > 0, torch.exp(-self.beta_pos * c_hat), torch.exp(self.beta_neg * c_hat))
        logits, valid = batch.sampled_logits.float(), mask > 0
        lo = all_reduce_min(torch.where(valid, logits, math.inf).min())
        hi = all_reduce_max(torch.where(valid, logits, -math.inf).max())
        if torch.isfinite(hi) and not torch.isclose(hi, lo):
            l_hat = (logits - lo) / (hi - lo + self.eps)
        else:
            l_hat = torch.full_like(logits, 0.5)
        scaled = (adv * mod)[:, None]
        raw = scaled - self.gamma * l_hat
        self.metrics["modulation"] = _global_mean(mod).float()
        return (torch.where(scaled > 0, raw.clamp_min(0), raw) * mask).float()


@register("advantage", "egsw")
class EGSWAdvantage(_Composed):
    """EGSW, arXiv 2503.22456: A'_it = w_it A_it, w_it = softmax over the group's sequences active at t
    of (A_it + alpha H_it) / temperature (step-wise); ``mode="trajectory"`` uses each sequence's mean
    advantage and mean entropy instead. A comes from the ``base`` estimator (GRPO in the paper).

    Formula from a third-party summary; no code. The paper's alpha and P were tuned and not found:
    alpha=0.1 and temperature=1.0 are this framework's choices, not the paper's. Weights are detached
    constants, padding takes no part in the softmax (both assumptions). ``rescale`` multiplies w by the
    number of sequences in the softmax so uniform weights leave A unchanged (also a choice).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        temperature: float = 1.0,
        mode: str = "step",
        rescale: bool = True,
        base: str = "grpo",
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("step", "trajectory"):
            raise ValueError(f"mode must be 'step' or 'trajectory', got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.mode, self.rescale = alpha, temperature, mode, rescale
        self.base = _build_base(base, base_kwargs)
        self.requires = self.base.requires

    def __call__(self, batch: RolloutBatch) -> Tensor:
        _need(batch, "entropy")
        adv = self._base_advantages(batch)
        mask = batch.response_mask.float()
        gidx, n_groups = group_index(batch.group_ids)
        a, h, active = adv.detach(), batch.entropy.detach().float(), mask > 0
        if self.mode == "trajectory":
            a, h = masked_mean(a, mask, dim=-1)[:, None], masked_mean(h, mask, dim=-1)[:, None]
            active = active.any(-1, keepdim=True)
        logits = torch.where(active, (a + self.alpha * h) / self.temperature, -math.inf)
        peak = torch.full((n_groups, logits.shape[1]), -math.inf, device=logits.device)
        peak = peak.scatter_reduce(0, gidx[:, None].expand_as(logits), logits, "amax")[gidx]
        w = torch.where(active, torch.exp(logits - torch.where(active, peak, 0.0)), 0.0)
        w = w / _per_position_sum(w, gidx, n_groups).clamp_min(1e-30)
        if self.rescale:
            w = w * _per_position_sum(active.float(), gidx, n_groups)
        self.metrics["weight_max"] = all_reduce_max(w.max() if w.numel() else w.new_zeros(()))
        return adv * w * mask


# ---- risk-sensitive and best-of baselines ---------------------------------------------------


def _bundle_papers(
    r: Tensor, group_ids: Tensor, bundle_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """RiskPO papers: per response its paper id and whether it is in one; per paper its score and bundle.

    Bundle b holds groups b*bundle_size .. (sorted ids); paper k takes each question's k-th response in
    batch order, for k below the bundle's smallest group size.
    """
    qidx, n_q = group_index(group_ids)
    k, _, sizes = rank_in_group(torch.arange(r.numel(), device=r.device).float(), qidx, n_q)
    n_b = -(-n_q // bundle_size)
    question_bundle = torch.arange(n_q, device=r.device) // bundle_size
    papers = sizes.new_full((n_b,), int(sizes.max())).scatter_reduce(0, question_bundle, sizes, "amin")
    bundle = question_bundle[qidx]
    in_paper = k < papers[bundle]
    paper_id = torch.where(in_paper, (torch.cumsum(papers, 0) - papers)[bundle] + k, 0)
    scores = r.new_zeros(int(papers.sum())).index_add(0, paper_id, torch.where(in_paper, r, 0.0))
    paper_bundle = torch.repeat_interleave(torch.arange(n_b, device=r.device), papers)
    return paper_id, in_paper, scores, paper_bundle, n_b


@register("advantage", "riskpo")
class RiskPOAdvantage(AdvantageEstimator):
    """RiskPO, arXiv 2510.00911: Mixed Value-at-Risk over bundled questions. Bundles are ``bundle_size``
    consecutive groups by sorted group id (over all ranks); paper k of a bundle takes the k-th response
    (batch order) of each of its questions, k < the bundle's smallest group; its score S_k = sum of rewards.
    g = [(S-q_a)+ - (S-q_b)+ + (q_a-q_b)] / (beta-alpha+eps), c = -(q_a-S)+ / (alpha+eps),
    A_paper = (w_mix c + g)/(w_mix + 1) / (std_bundle(S) + eps), copied to the paper's responses by
    ``credit``: uniform; std (/ the question's reward std, 1 when <= 1e-3); score (x0.5 if r > 0 else x1.5).
    Responses beyond the smallest group of their bundle get 0; a one-paper bundle has q_a = q_b = S, std 1.

    ``quantile_mode="batch"`` (default): q from each bundle's papers (torch.quantile, linear). This is
    what the official runs compute: the script sets tracking on, but the trainer stores the tracked
    quantile only after the advantages are computed, on a batch it rebuilds every step, so the tracked
    value never reaches the advantage. ``"track"`` feeds running estimates into the advantage instead,
    updated after each call by one SGD step of size ``lr_q`` (the code's value 0.1),
    q <- q + lr_q (level - mean[S < q]) over all papers; the first call uses the bundle quantiles and
    then sets the estimates to the batch quantiles (code warm-up).

    Zero-std guard: a bundle whose paper scores are all equal (std 0) is divided by 1, not by eps.
    In batch mode its numerator is exactly 0 anyway; with tracked quantiles it is not (a bundle where
    every response is wrong got |A| ~ 5e6), so the guard keeps the tracked signal at its raw scale.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        beta: float = 0.9,
        bundle_size: int = 5,
        w_mix: float = 1.5,
        credit: str = "std",
        quantile_mode: str = "batch",
        lr_q: float = 0.1,
        norm_std: bool = True,
        eps: float = 1e-6,
    ) -> None:
        if not 0.0 < alpha < beta < 1.0:
            raise ValueError(f"need 0 < alpha < beta < 1, got alpha={alpha}, beta={beta}")
        if bundle_size < 1:
            raise ValueError(f"bundle_size must be >= 1, got {bundle_size}")
        if w_mix < 0:
            raise ValueError(f"w_mix must be >= 0, got {w_mix}")
        if credit not in ("uniform", "std", "score"):
            raise ValueError(f"credit must be 'uniform', 'std' or 'score', got {credit!r}")
        if quantile_mode not in ("track", "batch"):
            raise ValueError(f"quantile_mode must be 'track' or 'batch', got {quantile_mode!r}")
        if lr_q <= 0:
            raise ValueError(f"lr_q must be > 0, got {lr_q}")
        self.alpha, self.beta, self.bundle_size, self.w_mix = alpha, beta, bundle_size, w_mix
        self.credit, self.quantile_mode, self.lr_q = credit, quantile_mode, lr_q
        self.norm_std, self.eps = norm_std, eps
        self.q_track: list[float] | None = None  # running (q_alpha, q_beta)

    def state_dict(self) -> dict[str, Any]:
        return {"q_track": None if self.q_track is None else list(self.q_track)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = state.get("q_track")
        self.q_track = None if q is None else [float(v) for v in q]

    def __call__(self, batch: RolloutBatch) -> Tensor:
        # Bundles may straddle ranks: gather every reward and compute the whole batch's answer on each rank.
        r_all, g_all = all_gather_cat(batch.rewards.double()), all_gather_cat(batch.group_ids)
        paper_id, in_paper, scores, paper_bundle, n_b = _bundle_papers(r_all, g_all, self.bundle_size)
        _, bundle_std = group_mean_std(scores, paper_bundle)
        bundle_std = torch.where(bundle_std > 0, bundle_std, 1.0)  # all-equal bundle: no division by eps
        if self.quantile_mode == "track" and self.q_track is not None:
            q_a = torch.full_like(scores, self.q_track[0])
            q_b = torch.full_like(scores, self.q_track[1])
        else:
            q_a = _group_quantile(scores, paper_bundle, n_b, self.alpha, "linear")[paper_bundle]
            q_b = _group_quantile(scores, paper_bundle, n_b, self.beta, "linear")[paper_bundle]
        g = (scores - q_a).clamp_min(0) - (scores - q_b).clamp_min(0) + (q_a - q_b)
        g = g / (self.beta - self.alpha + self.eps)
        c = -(q_a - scores).clamp_min(0) / (self.alpha + self.eps)
        a_paper = (self.w_mix * c + g) / (self.w_mix + 1.0)
        if self.norm_std:
            a_paper = a_paper / (bundle_std + self.eps)
        adv = a_paper[paper_id]
        if self.credit == "std":
            _, q_std = group_mean_std(r_all, g_all)
            adv = adv / (torch.where(q_std > 1e-3, q_std, 1.0) + self.eps)
        elif self.credit == "score":
            adv = adv * torch.where(r_all > 0, 0.5, 1.5)
        adv = torch.where(in_paper, adv, 0.0)
        if self.quantile_mode == "track":
            self._track(scores)
        self.metrics["q_alpha"], self.metrics["q_beta"] = q_a.mean().float(), q_b.mean().float()
        start = rank_offset(batch.size, batch.rewards.device)
        return broadcast_to_tokens(adv[start : start + batch.size], batch.response_mask)

    def _track(self, scores: Tensor) -> None:
        levels = torch.tensor([self.alpha, self.beta], dtype=torch.float64)
        s = scores.detach().double().cpu()
        if self.q_track is None:
            self.q_track = torch.quantile(s, levels).tolist()
            return
        q = torch.tensor(self.q_track, dtype=torch.float64)
        below = (s[None, :] < q[:, None]).double().mean(-1)
        self.q_track = (q + self.lr_q * (levels - below)).tolist()


def _comb(n: int, k: int) -> int:
    """Binomial coefficient, 0 outside 0 <= k <= n (scipy's ``comb`` convention)."""
    return math.comb(n, k) if 0 <= k <= n else 0


def passk_analytic(n: int, c: int, k: int, eps: float = 1e-6) -> tuple[float, float]:
    """Pass@k Training's analytic advantages (A_pos, A_neg) for a group of n responses, c correct.

    rho = 1 - C(n-c, k)/C(n, k), sigma = sqrt(rho (1 - rho)); A_pos = (1 - rho)/(sigma + eps),
    A_neg = (1 - rho - C(n-c-1, k-1)/C(n-1, k-1))/(sigma + eps). Requires 1 <= k <= n.
    """
    rho = 1.0 - _comb(n - c, k) / _comb(n, k)
    sigma = math.sqrt(max(rho * (1.0 - rho), 0.0))
    a_pos = (1.0 - rho) / (sigma + eps)
    a_neg = (1.0 - rho - _comb(n - c - 1, k - 1) / _comb(n - 1, k - 1)) / (sigma + eps)
    return a_pos, a_neg


@register("advantage", "passk")
class PassKAdvantage(AdvantageEstimator):
    """Pass@k advantages, two published forms.

    ``variant="analytic"`` (default): "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation", arXiv 2508.10751, code RUCAIBox/Passk_Training ``code/passk_adv.py: calc_adv``.
    For a group of n responses with c correct (r > ``success_threshold``):
    rho = 1 - C(n-c, k)/C(n, k), sigma = sqrt(rho (1 - rho)),
    A_pos = (1 - rho)/(sigma + eps),  A_neg = (1 - rho - C(n-c-1, k-1)/C(n-1, k-1))/(sigma + eps).
    When fewer than k responses are wrong, every k-subset passes (rho = 1) and the group gets 0; an
    all-wrong group gets 0. The code maps only rewards exactly 1 and 0 and leaves any other value
    unchanged as its advantage; here partial credit is binarised at ``success_threshold`` (identical
    for binary rewards). A group smaller than k uses k = n (pass@k needs n >= k).

    ``variant="verl"``: verl ``compute_grpo_passk_outcome_advantage`` (after arXiv 2503.19595): the
    group's best response (first in batch order on ties) gets r_max - r_second, divided by the
    group's unbiased std + eps when ``norm_std`` (verl's default ``norm_adv_by_std_in_grpo``); every
    other response gets 0. verl rejects groups of one; here a group of one keeps its raw reward
    (METHODS.md §0's convention).

    METHODS.md has no pass@k entry; the default is the analytic form because it is the cited paper's
    own method and code (verl's is a different paper's best-of-n baseline). k = 4 is this framework's
    choice ([UNVERIFIED] as the paper's main setting); eps = 1e-6 is the code's constant.
    """

    def __init__(
        self,
        *,
        variant: str = "analytic",
        k: int = 4,
        success_threshold: float = 0.5,
        norm_std: bool = True,
        eps: float = 1e-6,
    ) -> None:
        if variant not in ("analytic", "verl"):
            raise ValueError(f"variant must be 'analytic' or 'verl', got {variant!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.variant, self.k, self.threshold, self.norm_std, self.eps = (
            variant,
            k,
            success_threshold,
            norm_std,
            eps,
        )

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        gidx, n_groups = group_index(batch.group_ids)
        if self.variant == "analytic":
            adv = self._analytic(r, gidx, n_groups)
        else:
            adv = self._verl(r, batch.group_ids, gidx, n_groups)
        return broadcast_to_tokens(adv, batch.response_mask)

    def _analytic(self, r: Tensor, gidx: Tensor, n_groups: int) -> Tensor:
        success = r > self.threshold
        counts = torch.bincount(gidx, minlength=n_groups).tolist()
        correct = torch.bincount(gidx, weights=success.double(), minlength=n_groups).round().long().tolist()
        table = [passk_analytic(n, c, min(self.k, n), self.eps) for n, c in zip(counts, correct)]
        a = r.new_tensor(table)  # [G, 2]: (A_pos, A_neg)
        return torch.where(success, a[gidx, 0], a[gidx, 1])

    def _verl(self, r: Tensor, group_ids: Tensor, gidx: Tensor, n_groups: int) -> Tensor:
        rank, order, counts = rank_in_group(-r, gidx, n_groups)  # rank 0: the first best response
        starts = torch.cumsum(counts, 0) - counts
        best = r[order[starts]]
        second = r[order[torch.minimum(starts + 1, starts + counts - 1)]]
        gap = (best - second)[gidx]
        if self.norm_std:
            _, std = group_mean_std(r, group_ids)
            gap = gap / (std + self.eps)
        adv = torch.where(rank == 0, gap, torch.zeros_like(r))
        return torch.where(counts[gidx] > 1, adv, r)


@register("advantage", "opo")
class OPOAdvantage(AdvantageEstimator):
    """OPO length-weighted optimal baseline, arXiv 2505.23585: b_g = sum_j |o_j| r_j / sum_j |o_j|,
    A_i = r_i - b_g. A group of one gets b = 0 (verl ``compute_opo_outcome_advantage``); a group whose
    responses are all empty falls back to the plain mean.
    """

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        gidx, n_groups = group_index(batch.group_ids)
        base, _, tot = _keyed_stats(r, gidx, n_groups, batch.lengths.double(), unbiased=False)
        mean, _ = group_mean_std(r, batch.group_ids)
        base = torch.where(tot > 0, base, mean)
        base = torch.where(group_count(batch.group_ids) > 1, base, 0.0)
        return broadcast_to_tokens(r - base, batch.response_mask)


@register("advantage", "reinforce_pp_baseline")
class ReinforcePPBaselineAdvantage(AdvantageEstimator):
    """REINFORCE++-baseline, arXiv 2501.03262: x_i = r_i - mean_g r (a group of one: r_i), broadcast to
    tokens, then whitened over every valid token of the batch on all ranks: (x - mu) / sqrt(var + eps)
    with the unbiased token variance (verl ``masked_whiten``).
    """

    def __init__(self, *, eps: float = 1e-8) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask.double()
        mean, _ = group_mean_std(batch.rewards, batch.group_ids)
        x = (batch.rewards.double() - mean)[:, None] * mask
        s1 = all_reduce_sum(torch.stack([x.sum(), mask.sum()]))
        n = s1[1]
        mu = s1[0] / n.clamp_min(1)
        var = all_reduce_sum(((x - mu) ** 2 * mask).sum()) / n.clamp_min(1)
        var = var * n / (n - 1) if n > 1 else var
        return ((x - mu) * torch.rsqrt(var + self.eps) * mask).float()


@register("advantage", "hapo_token")
class HAPOTokenAdvantage(AdvantageEstimator):
    """HAPO token-level group average, arXiv 2509.16591: A_i = (r_i - mu_g) / (sigma_g + eps) with mu_g,
    sigma_g the mean and population std of the reward over all valid tokens of the group (length
    weighted). If any response of the group has |A_i| >= ``fallback`` the whole group takes GRPO's
    advantage instead. A group of one gets 0 (mu = r, as in the code); a group without tokens falls
    back to GRPO.

    Default: the intended test, over responses with tokens only. ``code_padding_quirk=True``
    reproduces the official ``compute_hapo_outcome_advantage`` (starriver030515/HAPO@7671dde), which
    normalises the masked score tensor r_i * mask and so also tests every padding position, whose
    value is (0 - mu_g)/(sigma_g + eps): any group with a response shorter than the padded width T
    falls back when |mu_g| >= fallback (sigma_g + eps), i.e. most groups with near-1 partial-credit
    rewards. T is this batch's padded response width (the code's: the padded rollout length).
    """

    def __init__(
        self,
        *,
        eps: float = 1e-6,
        norm_std: bool = True,
        fallback: float = 5.0,
        code_padding_quirk: bool = False,
    ) -> None:
        if eps <= 0 or fallback <= 0:
            raise ValueError(f"eps and fallback must be > 0, got eps={eps}, fallback={fallback}")
        self.eps, self.norm_std, self.fallback = eps, norm_std, fallback
        self.code_padding_quirk = code_padding_quirk

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        gidx, n_groups = group_index(batch.group_ids)
        lengths = batch.lengths.double()
        mean, std, tot = _keyed_stats(r, gidx, n_groups, lengths, unbiased=False)
        g_mean, g_std = group_mean_std(r, batch.group_ids)
        adv, grpo, pad = r - mean, r - g_mean, -mean
        if self.norm_std:
            adv, grpo, pad = adv / (std + self.eps), grpo / (g_std + self.eps), pad / (std + self.eps)
        too_big = (adv.abs() >= self.fallback) & (lengths > 0)
        if self.code_padding_quirk:
            too_big |= (pad.abs() >= self.fallback) & (lengths < batch.response_mask.shape[1])
        fall = (group_sum(too_big.double(), batch.group_ids) > 0) | (tot == 0)
        return broadcast_to_tokens(torch.where(fall, grpo, adv), batch.response_mask)


# ---- consistency-aware blends --------------------------------------------------------------------

COPO_MODES = (
    "soft-with-zero",
    "only-soft",
    "soft-with-forced",
    "only-forced",
    "only-zero",
    "only-global",
    "no-global",
)


def answer_entropy_bits(answers: list[str], group_ids: Tensor) -> Tensor:
    """Per response, H_q = -sum_c p_c log2 p_c over the exact-string answer clusters of its group [B]."""
    from collections import Counter

    keys = group_ids.tolist()
    out = torch.zeros(len(answers), dtype=torch.float64)
    for g in dict.fromkeys(keys):
        rows = [i for i, k in enumerate(keys) if k == g]
        counts = torch.tensor(list(Counter(answers[i] for i in rows).values()), dtype=torch.float64)
        p = counts / counts.sum()
        out[rows] = float(-(p * torch.log2(p)).sum())
    return out.to(group_ids.device)


@register("advantage", "copo")
class COPOAdvantage(AdvantageEstimator):
    """COPO consistency-aware advantages, arXiv 2508.04138 (official hijih/copo-code
    ``compute_grpo_outcome_advantage_with_global``); pair with ``loss: copo``.

    Local: GRPO, A_loc = (r_i - mean_q r)/(std_q r + eps). Global: g_q = acc_q c_q (acc_q the group's
    mean reward; c_q = 1 - lam H_q, lam = (1 - 1/n)/log2 n, with ``entropy_coef``, else 1), then
    A_glob = (g_q - mean g)/(std g + eps) over every prompt of the step (all ranks; unbiased std; 0
    when all g are equal or there is one prompt), the same for every response of q. H_q (bits) is
    the entropy of q's exact-string answer clusters ("" when none): ``extractor: reward`` takes the
    reward's ``extracted`` answer (the official code's reward-function answer); auto / boxed /
    number / text extract it from the completion (Countdown: ``number``, its final result).
    Blend weight on the local loss w = sigmoid(k (H_q - b)), gated by ``mode``: soft-with-zero
    (w 1[r_i != 0], the script's), only-soft, soft-with-forced (w 1[A_loc != 0]), only-forced,
    only-zero, only-global (w = 0), no-global (w = 1). Defaults: run_copo.sh (k 5, b 1,
    entropy_coef false); the function defaults are k 1, b 0.5.
    """

    provides = frozenset({"global_advantages", "blend_weights"})
    needs_old_pass = False

    def __init__(
        self,
        *,
        k: float = 5.0,
        b: float = 1.0,
        mode: str = "soft-with-zero",
        entropy_coef: bool = False,
        extractor: str = "reward",
        eps: float = 1e-6,
    ) -> None:
        from lightning_entropy.components.rewards import EXTRACTORS

        if extractor not in ("reward", *EXTRACTORS[:-1]):
            raise ValueError(
                f"extractor must be one of reward, {', '.join(EXTRACTORS[:-1])}, got {extractor!r}"
            )
        self.extractor = extractor
        if mode not in COPO_MODES:
            raise ValueError(f"mode must be one of {', '.join(COPO_MODES)}, got {mode!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.k, self.b, self.mode, self.entropy_coef, self.eps = float(k), float(b), mode, entropy_coef, eps

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.double()
        mean, std = group_mean_std(r, batch.group_ids)
        local = (r - mean) / (std + self.eps)
        answers = [self.answer(i) for i in (batch.info or [{}] * batch.size)]
        h = answer_entropy_bits(answers, batch.group_ids)
        n = group_count(batch.group_ids, dtype=torch.float64)
        g = group_sum(r, batch.group_ids) / n
        if self.entropy_coef:
            lam = torch.where(n > 1, (1 - 1 / n) / torch.log2(n.clamp_min(2)), torch.zeros_like(n))
            g = g * (1 - lam * h)
        # one value per prompt: the first response of each group on this rank, then every rank's
        gidx, n_groups = group_index(batch.group_ids)
        first = torch.full((n_groups,), r.numel(), device=r.device).scatter_reduce(
            0, gidx, torch.arange(r.numel(), device=r.device), "amin"
        )
        g_all = all_gather_cat(g[first])
        if g_all.numel() > 1 and bool((g_all != g_all[0]).any()):
            glob = (g - g_all.mean()) / (g_all.std() + self.eps)
        else:
            glob = torch.zeros_like(g)
        w = torch.sigmoid(self.k * (h - self.b))
        gate = {
            "soft-with-zero": w * (r != 0),
            "only-soft": w,
            "soft-with-forced": w * (local != 0),
            "only-forced": (local != 0).double(),
            "only-zero": (r != 0).double(),
            "only-global": torch.zeros_like(w),
            "no-global": torch.ones_like(w),
        }[self.mode]
        batch.global_advantages = broadcast_to_tokens(glob, batch.response_mask)
        batch.blend_weights = gate.float()
        self.metrics.update(answer_entropy=h.float(), blend_weight=gate.float(), global_adv=glob.float())
        return broadcast_to_tokens(local, batch.response_mask)

    def answer(self, info: dict[str, Any]) -> str:
        from lightning_entropy.components.rewards import extract_answer

        if self.extractor == "reward":
            return info.get("extracted") or ""
        return extract_answer(info.get("completion"), self.extractor) or ""


@register("advantage", "ear")
class EARAdvantage(_Composed):
    """ETTRL's entropy-based advantage reshaping (EAR), arXiv 2508.11356 (METHODS §8.3) [3RD, no code].

    Adv-Res (``mode="res"``): A'_i = Y_i A_i, Y_i = 2 - H_i / mean_g H, with H_i response i's mean token
    entropy (pi_old) and the mean over its group's responses that have tokens: confident responses are
    amplified, uncertain ones damped. Adv-Clip (``mode="clip"``): A' = clip(A, -beta, beta), beta=2
    (reported worse than Adv-Res). A comes from the ``base`` estimator (GRPO by default).
    Y_i < 0 (H_i > 2 mean_g H) flips A's sign; the notes mention no clamp, so none is the default and
    ``y_min`` (e.g. 0) is the guard Y_i >= y_min. A group with zero entropy throughout keeps Y = 1.
    """

    def __init__(
        self,
        *,
        mode: str = "res",
        y_min: float | None = None,
        beta: float = 2.0,
        base: str = "grpo",
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("res", "clip"):
            raise ValueError(f"mode must be 'res' (Adv-Res) or 'clip' (Adv-Clip), got {mode!r}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.mode, self.y_min, self.beta = mode, y_min, beta
        self.base = _build_base(base, base_kwargs)
        self.requires = self.base.requires

    def __call__(self, batch: RolloutBatch) -> Tensor:
        adv = self._base_advantages(batch)
        mask = batch.response_mask.float()
        if self.mode == "clip":
            return adv.clamp(-self.beta, self.beta) * mask
        _need(batch, "entropy")
        h = masked_mean(batch.entropy.detach().double(), mask.double(), dim=-1)
        has = (mask.sum(-1) > 0).double()
        avg = group_sum(h * has, batch.group_ids) / group_sum(has, batch.group_ids).clamp_min(1)
        # an all-equal group gets Y exactly 1 (h / avg of equal floats need not be exactly 1)
        lo, hi = group_min_max(torch.where(has > 0, h, avg), batch.group_ids)
        y = torch.where((lo == hi) | (avg <= 0), 1.0, 2.0 - h / avg.clamp_min(1e-30))
        self.metrics["sign_flip_frac"] = ((y < 0).float()[:, None] * mask).float()
        if self.y_min is not None:
            y = y.clamp_min(self.y_min)
        self.metrics["y"] = (y[:, None] * mask).float()
        return (adv * y[:, None].to(adv.dtype)) * mask
