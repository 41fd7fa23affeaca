"""torchmetrics ``Metric`` subclasses for entropy and rollout statistics.

Every state is a sum (or a concatenation) reduced across ranks with ``dist_reduce_fx="sum"``
("cat" for raw values), and ``compute`` divides pooled sums: never an average of per-rank
averages, so 2 ranks x N prompts report what 1 rank x 2N prompts would. Sum states are float64
because ``Covariance`` and ``RewardStd`` subtract raw moments. A metric that has seen nothing
returns 0 (not NaN), so a step with an empty selection logs a finite number.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.data import dim_zero_sum

_F64 = torch.float64


def _zero() -> Tensor:
    return torch.tensor(0.0, dtype=_F64)


def _weights(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return torch.ones_like(values, dtype=_F64)
    if weights.shape != values.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != values shape {tuple(values.shape)}")
    return weights.to(_F64)


class TokenMean(Metric):
    """Weighted mean sum(w * x) / sum(w) pooled over updates and ranks (e.g. token-mean entropy).

    ``update(values, weights)`` with any matching shapes ([B, T] with the response mask, or [N]);
    ``weights=None`` weighs every element 1. Values where the weight is 0 are ignored even if NaN.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.add_state("total", default=_zero(), dist_reduce_fx="sum")
        self.add_state("weight", default=_zero(), dist_reduce_fx="sum")

    def update(self, values: Tensor, weights: Tensor | None = None) -> None:
        w = _weights(values, weights)
        x = torch.where(w != 0, values.detach().to(_F64), torch.zeros_like(w))
        self.total += (x * w).sum()
        self.weight += w.sum()

    def compute(self) -> Tensor:
        return torch.where(
            self.weight != 0, self.total / torch.where(self.weight != 0, self.weight, 1.0), 0.0
        )


class SumRatio(TokenMean):
    """sum(totals) / sum(counts), both pooled: for values that arrive as parts of one number, e.g. a
    micro-batch's share of a mini-batch loss (total = the share, count = 1 per mini-batch)."""

    def update(self, total: Tensor | float, count: Tensor | float = 1.0) -> None:  # type: ignore[override]
        self.total += torch.as_tensor(total, dtype=_F64, device=self.device).detach()
        self.weight += float(count)


class ScalarMean(TokenMean):
    """Mean of per-sample values [B] (reward, response length, truncation as 0/1), pooled like TokenMean."""


class TokenQuantiles(Metric):
    """Quantiles of token values (e.g. entropy) among tokens with weight > 0, pooled over updates and ranks.

    ``compute`` returns ``{"p10": ..., "p50": ..., "p90": ...}`` (names from ``quantiles``) with
    linear interpolation between order statistics (``torch.quantile``'s default), unweighted.
    With no token seen every quantile is 0 (documented choice, so logs stay finite).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, *, quantiles: Sequence[float] = (0.1, 0.5, 0.9), **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        qs = [float(q) for q in quantiles]
        if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {list(quantiles)}")
        self.names = [f"p{q * 100:g}" for q in qs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"quantiles has duplicates: {list(quantiles)}")
        self.quantiles = qs
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor, weights: Tensor | None = None) -> None:
        keep = _weights(values, weights) > 0
        self.values.append(values.detach().float()[keep])

    def compute(self) -> dict[str, Tensor]:
        x = dim_zero_cat(self.values) if len(self.values) else torch.zeros(0, device=self.device)
        if x.numel() == 0:
            return {name: torch.zeros((), device=x.device) for name in self.names}
        # Sort + interpolate by hand: torch.quantile refuses inputs above 2**24 elements.
        x = x.sort().values
        pos = torch.tensor(self.quantiles, dtype=_F64, device=x.device) * (x.numel() - 1)
        lo, hi = pos.floor().long(), pos.ceil().long()
        q = x[lo].to(_F64) + (x[hi].to(_F64) - x[lo].to(_F64)) * (pos - lo)
        return {name: q[i].float() for i, name in enumerate(self.names)}


class Covariance(Metric):
    """Cov(log pi, A) over valid tokens, METHODS §6.2 (arXiv 2505.22617): E[xy] - E[x]E[y].

    Equal to mean_t (x_t - mean x)(y_t - mean y) over all valid tokens pooled across updates and
    ranks (the population covariance; centring is over the whole pool, not per prompt). ``update(x,
    y, mask)`` counts tokens with mask > 0 once each.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        for name in ("sum_x", "sum_y", "sum_xy", "n"):
            self.add_state(name, default=_zero(), dist_reduce_fx="sum")

    def update(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> None:
        if x.shape != y.shape:
            raise ValueError(f"x shape {tuple(x.shape)} != y shape {tuple(y.shape)}")
        keep = _weights(x, mask) > 0
        xs, ys = x.detach().to(_F64)[keep], y.detach().to(_F64)[keep]
        self.sum_x += xs.sum()
        self.sum_y += ys.sum()
        self.sum_xy += (xs * ys).sum()
        self.n += keep.sum()

    def compute(self) -> Tensor:
        n = self.n.clamp_min(1.0)
        return self.sum_xy / n - (self.sum_x / n) * (self.sum_y / n)


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-group (count, sum, max, min) of ``values`` [B], groups in sorted id order."""
    uniq, idx = torch.unique(group_ids, return_inverse=True)
    g, v = uniq.numel(), values.detach().to(_F64)
    count = torch.zeros(g, dtype=_F64, device=v.device).index_add_(0, idx, torch.ones_like(v))
    total = torch.zeros(g, dtype=_F64, device=v.device).index_add_(0, idx, v)
    vmax = torch.full((g,), -math.inf, dtype=_F64, device=v.device).scatter_reduce_(0, idx, v, "amax")
    vmin = torch.full((g,), math.inf, dtype=_F64, device=v.device).scatter_reduce_(0, idx, v, "amin")
    return count, total, vmax, vmin


class ZeroVarianceGroups(Metric):
    """Fraction of groups whose rewards are all equal (max - min <= atol): no GRPO signal.

    ``update(rewards [B], group_ids [B])``; each update must hold whole groups (groups never
    straddle ranks or updates). A group of one counts as zero-variance (its std is 0, as in DAPO's
    dynamic-sampling filter).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, *, atol: float = 0.0, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.atol = float(atol)
        self.add_state("zero", default=_zero(), dist_reduce_fx="sum")
        self.add_state("groups", default=_zero(), dist_reduce_fx="sum")

    def update(self, rewards: Tensor, group_ids: Tensor) -> None:
        if rewards.numel() == 0:
            return
        _, _, vmax, vmin = _group_stats(rewards, group_ids)
        self.zero += ((vmax - vmin) <= self.atol).sum()
        self.groups += vmax.numel()

    def compute(self) -> Tensor:
        return self.zero / self.groups.clamp_min(1.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., arXiv 2107.03374): 1 - C(n-c, k) / C(n, k).

    Computed in the stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1 when n - c < k.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or n < k:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _pass_at_k_tensor(n: Tensor, c: Tensor, k: int) -> Tensor:
    """Vectorised product form: log prod_{i=n-c+1}^{n} (1 - k/i) = L(n) - L(n-c), L(m) = sum_{i=k+1}^{m} log(1 - k/i)."""
    m = int(n.max())
    i = torch.arange(k + 1, m + 1, dtype=_F64, device=n.device)
    L = torch.cat([torch.zeros(k + 1, dtype=_F64, device=n.device), torch.log1p(-k / i).cumsum(0)])
    fail = n - c >= k
    log_prod = L[n] - L[torch.where(fail, n - c, n)]
    return torch.where(fail, 1.0 - log_prod.exp(), torch.ones_like(log_prod))


class PassAtK(Metric):
    """Mean over problems of unbiased pass@k (arXiv 2107.03374) for each k, METHODS §6.6.

    ``update(correct [B] bool, group_ids [B])``: a group is one problem's n samples (whole groups per
    update). ``compute`` -> ``{"pass@1": ..., "pass@4": ...}``; 0 for each k before any problem.
    A group with fewer than k samples raises ValueError (pass@k is undefined for n < k).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, *, ks: Sequence[int] = (1,), **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        ks = [int(k) for k in ks]
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"ks must be distinct integers >= 1, got {ks}")
        self.ks = ks
        self.add_state("total", default=torch.zeros(len(ks), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("problems", default=_zero(), dist_reduce_fx="sum")

    def update(self, correct: Tensor, group_ids: Tensor) -> None:
        if correct.numel() == 0:
            return
        count, hits, _, _ = _group_stats(correct.bool(), group_ids)
        n, c = count.long(), hits.long()
        if int(n.min()) < max(self.ks):
            raise ValueError(
                f"pass@{max(self.ks)} needs >= {max(self.ks)} samples per problem, got {int(n.min())}"
            )
        self.total += torch.stack([_pass_at_k_tensor(n, c, k).sum() for k in self.ks])
        self.problems += n.numel()

    def compute(self) -> dict[str, Tensor]:
        mean = self.total / self.problems.clamp_min(1.0)
        return {f"pass@{k}": mean[i] for i, k in enumerate(self.ks)}


class RewardStd(Metric):
    """Population std of all rewards seen (sqrt(E[r^2] - E[r]^2)) from pooled sum, sum of squares, count."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        for name in ("total", "total_sq", "n"):
            self.add_state(name, default=_zero(), dist_reduce_fx="sum")

    def update(self, rewards: Tensor) -> None:
        r = rewards.detach().to(_F64).reshape(-1)
        self.total += r.sum()
        self.total_sq += (r * r).sum()
        self.n += r.numel()

    def compute(self) -> Tensor:
        n = self.n.clamp_min(1.0)
        return (self.total_sq / n - (self.total / n) ** 2).clamp_min(0.0).sqrt()


class MetricBank:
    """Every number logged in a step, as named torchmetrics ``Metric``s pooled over micro-batches,
    mini-batches and ranks: the one way statistics are gathered.

    ``update(key, *args, kind=TokenMean)`` creates the metric on first use. ``compute()`` agrees on
    the union of keys over ranks (a component may report a key on one rank only), sums every
    sum-reduced state of every metric in a single all-reduce, computes, and resets. Metrics with
    other states (quantiles concatenate their values) sync through torchmetrics.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.updated: set[str] = set()  # keys updated since the last compute

    def update(self, key: str, *args: Any, kind: Callable[..., Metric] | None = None) -> None:
        m = self.metrics.get(key)
        if m is None:
            m = self.metrics[key] = _new_metric(kind or TokenMean)
            if args and isinstance(args[0], Tensor):
                m.to(args[0].device)
        m.update(*args)
        self.updated.add(key)

    def tokens(self, key: str, values: Any, mask: Tensor) -> None:
        """A component statistic: a [B, T] tensor averaged over the masked tokens, else one value."""
        if isinstance(values, Tensor) and values.dim() >= 2 and values.shape == mask.shape:
            self.update(key, values.detach(), mask)
        else:
            v = values.detach().float().mean() if isinstance(values, Tensor) else float(values)
            self.update(key, v, 1.0, kind=SumRatio)

    def compute(self, device: torch.device | None = None) -> dict[str, Tensor]:
        from lightning_entropy.components.common import all_reduce_sum, is_distributed

        if is_distributed():
            import torch.distributed as dist

            mine = {k: type(self.metrics[k]).__name__ for k in self.updated}
            gathered: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, mine)
            for other in gathered:
                for k, name in other.items():
                    self.updated.add(k)
                    if k not in self.metrics:
                        self.metrics[k] = _new_metric(_KIND_BY_NAME[name])
        keys = sorted(self.updated)
        self.updated = set()
        summed = [(k, s) for k in keys for s in _sum_states(self.metrics[k])]
        if summed:
            parts = [getattr(self.metrics[k], s) for k, s in summed]
            flat = torch.cat([p.detach().to("cpu", _F64).reshape(-1) for p in parts])
            flat = all_reduce_sum(flat.to(device) if device is not None else flat).cpu()
            for (k, s), old, v in zip(summed, parts, flat.split([p.numel() for p in parts])):
                setattr(self.metrics[k], s, v.to(old.device, old.dtype).reshape(old.shape))
        out: dict[str, Tensor] = {}
        with warnings.catch_warnings():  # a key another rank reported was never updated here
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            for k in keys:
                m = self.metrics[k]
                if not _only_sum_states(m):
                    m.sync()
                value = m.compute()
                if isinstance(value, dict):  # "train/entropy_" -> train/entropy_p10; "val/" -> val/pass@4
                    out.update({f"{k}{sub}": v for sub, v in value.items()})
                else:
                    out[k] = value
                m.reset()
        return out


def _new_metric(kind: Callable[..., Metric]) -> Metric:
    if isinstance(kind, type):
        _KIND_BY_NAME.setdefault(kind.__name__, kind)
    # the bank syncs the sum states itself, in one collective
    return kind(sync_on_compute=False)


def _sum_states(m: Metric) -> list[str]:
    return [
        s for s, fx in m._reductions.items() if fx is dim_zero_sum and isinstance(getattr(m, s), Tensor)
    ] if _only_sum_states(m) else []


def _only_sum_states(m: Metric) -> bool:
    return all(fx is dim_zero_sum for fx in m._reductions.values())


_KIND_BY_NAME: dict[str, type[Metric]] = {}


class PhaseTimer:
    """Wall-clock seconds per phase of one RL step (``with timer("generate"): ...``), summed over
    repeated entries; CUDA work is synchronised at the edges so the time lands in its phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _sync_cuda()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync_cuda()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
