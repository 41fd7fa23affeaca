"""Pure tensor maths of the entropy-dynamics diagnostics (METHODS §6); no trainer, no config.

Entropy is in nats. Every function takes explicit masks so padding never enters a statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_F64 = torch.float64


def discriminator_terms(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(H_t, log p_t, S_t, N_t) per position of ``logits`` [..., V] and ``targets`` [...].

    S_t = p_t (H_t + log p_t) is the entropy discriminator of arXiv 2602.03392 (METHODS §6.3): a
    logit step z_k += eps changes the entropy by -eps S_k to first order. N_t = E_{v~pi_t}[S_v] =
    sum_v p_v^2 (H_t + log p_v) is its vocabulary baseline (Clip_V, METHODS §8.2): the softmax
    policy-gradient step z += eps A (onehot(t) - p) changes the entropy by -eps A (S_t - N_t).
    Rows are processed ``chunk_size`` at a time so a large vocabulary never holds [B*T, V] in fp32;
    the maths runs in fp32, or fp64 for fp64 logits.
    """
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shape = targets.shape
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    outs: list[list[Tensor]] = [[], [], [], []]
    for i in range(0, tgt.numel(), chunk_size):
        logp_v = torch.log_softmax(flat[i : i + chunk_size].to(work) / temperature, -1)
        p_v = logp_v.exp()
        h = -(p_v * logp_v.clamp_min(-1e4)).sum(-1)
        lp = logp_v.gather(1, tgt[i : i + chunk_size, None]).squeeze(1)
        s = lp.exp() * (h + lp)
        n = (p_v * p_v * (h[:, None] + logp_v.clamp_min(-1e4))).sum(-1)
        for acc, x in zip(outs, (h, lp, s, n)):
            acc.append(x)
    return tuple(torch.cat(x).reshape(shape) for x in outs)  # type: ignore[return-value]


def predicted_change_discriminator(advantages: Tensor, s: Tensor, n: Tensor) -> Tensor:
    """Per-token first-order entropy change of one softmax policy-gradient step, per unit step:
    -A_t (S_t - N_t) (arXiv 2602.03392; the logit change of A log p_t is A (onehot - p))."""
    return -advantages * (s - n)


class RunningFit:
    """Pearson correlation and least-squares slope (with intercept) of y on x over every pair seen,
    from running sums (float64), checkpointed through ``state_dict``. Undefined values are NaN."""

    _KEYS = ("n", "sx", "sy", "sxx", "syy", "sxy")

    def __init__(self) -> None:
        self.n = self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0

    def update(self, x: float, y: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        self.n += 1
        self.sx, self.sy = self.sx + x, self.sy + y
        self.sxx, self.syy, self.sxy = self.sxx + x * x, self.syy + y * y, self.sxy + x * y

    def _centred(self) -> tuple[float, float, float]:
        n = max(self.n, 1.0)
        return self.sxx - self.sx**2 / n, self.syy - self.sy**2 / n, self.sxy - self.sx * self.sy / n

    @property
    def corr(self) -> float:
        vx, vy, cxy = self._centred()
        return cxy / math.sqrt(vx * vy) if self.n >= 2 and vx > 0 and vy > 0 else math.nan

    @property
    def slope(self) -> float:
        vx, _, cxy = self._centred()
        return cxy / vx if self.n >= 2 and vx > 0 else math.nan

    def state_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self._KEYS}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k in self._KEYS:
            setattr(self, k, float(state.get(k, 0.0)))


def fit_entropy_law(entropy: Sequence[float], perf: Sequence[float]) -> tuple[float, float]:
    """(a, b) of R = -a exp(H) + b by least squares on x = exp(H) (arXiv 2505.22617, METHODS §6.1);
    the predicted ceiling at H = 0 is b - a. NaN for fewer than two distinct entropies."""
    x = [math.exp(h) for h in entropy]
    n = len(x)
    if n < 2 or len(perf) != n:
        return math.nan, math.nan
    mx, my = math.fsum(x) / n, math.fsum(perf) / n
    vx = math.fsum((xi - mx) ** 2 for xi in x)
    if vx <= 1e-12 * max(1.0, mx * mx):
        return math.nan, math.nan
    slope = math.fsum((xi - mx) * (yi - my) for xi, yi in zip(x, perf)) / vx
    return -slope, my - slope * mx


def entropy_law(entropy: float, a: float, b: float) -> float:
    return -a * math.exp(entropy) + b


def effective_rank(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Roy-Vetterli effective rank exp(-sum_i q_i log q_i), q = sigma / sum(sigma), of each matrix
    [..., N, d] (METHODS §6.4, arXiv 2509.23808); rows with mask 0 are zeroed, which only adds zero
    singular values. A zero matrix has effective rank 0."""
    x = x.to(_F64)
    if mask is not None:
        x = x * mask.to(_F64)[..., None]
    sigma = torch.linalg.svdvals(x)
    total = sigma.sum(-1, keepdim=True)
    q = sigma / total.clamp_min(1e-300)
    ent = -(q * q.clamp_min(1e-300).log()).sum(-1)
    return torch.where(total.squeeze(-1) > 0, ent.exp(), torch.zeros_like(ent))


def answer_clusters(answers: Sequence[str | None], group_ids: Sequence[int]) -> dict[int, list[int]]:
    """Cluster sizes per group: answers equal as stripped strings share a cluster; a missing answer
    (None or empty) is a cluster of its own kind, as EMPO clusters empty answers (METHODS §6.5)."""
    counts: dict[int, dict[str | None, int]] = {}
    for a, g in zip(answers, group_ids):
        key = a.strip() if isinstance(a, str) and a.strip() else None
        per = counts.setdefault(int(g), {})
        per[key] = per.get(key, 0) + 1
    return {g: list(c.values()) for g, c in counts.items()}


def answer_entropy(sizes: Sequence[int]) -> float:
    """SE = -sum_c p_c log p_c with p_c = |c| / G (nats, in [0, log G])."""
    total = sum(sizes)
    return -math.fsum(s / total * math.log(s / total) for s in sizes if s > 0) if total else 0.0


def support(correct: Tensor, group_ids: Tensor) -> Tensor:
    """Per group: 1.0 when at least one of its samples is correct (the policy's support, as the
    share of problems solved by any of n samples in arXiv 2507.14843), groups in sorted id order."""
    uniq, idx = torch.unique(group_ids, return_inverse=True)
    hit = torch.zeros(uniq.numel(), dtype=_F64, device=correct.device)
    return hit.scatter_reduce_(0, idx.to(correct.device), correct.to(_F64), "amax")


def lens_entropy(
    hidden: Tensor, head_weight: Tensor, temperature: float = 1.0, norm: torch.nn.Module | None = None
) -> Tensor:
    """Entropy [..., N] of the logit-lens policy softmax(W_U h / T) of hidden states [..., N, d]
    (BuPO, arXiv 2512.19673: ``norm=None`` as in its training path; the final norm is an option)."""
    h = norm(hidden) if norm is not None else hidden
    logp = torch.log_softmax((h @ head_weight.T).to(torch.float32) / temperature, -1)
    return -(logp.exp() * logp.clamp_min(-1e4)).sum(-1)
