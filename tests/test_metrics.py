"""Metrics against hand computations, 2-rank pooling by merging states, and a real 2-rank gloo run."""

import math

import pytest
import torch
import torch.distributed as dist

from lightning_entropy.metrics import (
    Covariance,
    PassAtK,
    RewardStd,
    ScalarMean,
    TokenMean,
    TokenQuantiles,
    ZeroVarianceGroups,
    pass_at_k,
)
from tests._dist import run_two_ranks


def _merged(cls, kwargs, updates_a, updates_b):
    """Two 'ranks' updated with their halves, then their states merged into the first."""
    a, b = cls(**kwargs), cls(**kwargs)
    for args in updates_a:
        a.update(*args)
    for args in updates_b:
        b.update(*args)
    a.merge_state(b)
    return a.compute()


def _single(cls, kwargs, updates):
    m = cls(**kwargs)
    for args in updates:
        m.update(*args)
    return m.compute()


def _close(x, y, tol=1e-9):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        return all(_close(x[k], y[k], tol) for k in x)
    return abs(float(x) - float(y)) <= tol


# ---- TokenMean / ScalarMean -------------------------------------------------------------------


def test_token_mean_by_hand():
    m = TokenMean()
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m.update(values, mask)  # the NaN sits under weight 0 and is ignored
    assert m.compute().item() == pytest.approx(7 / 3)
    m.update(torch.tensor([10.0]), torch.tensor([0.5]))  # fractional weight: (7 + 5) / 3.5
    assert m.compute().item() == pytest.approx(12 / 3.5)


def test_token_mean_pools_tokens_not_rank_averages():
    # rank A: 3 tokens of mean 1; rank B: 1 token of 5 -> pooled (3 + 5) / 4 = 2, not (1 + 5) / 2
    a = [(torch.ones(1, 3), torch.ones(1, 3))]
    b = [(torch.tensor([[5.0, 9.0]]), torch.tensor([[1.0, 0.0]]))]
    pooled = _merged(TokenMean, {}, a, b)
    assert pooled.item() == pytest.approx(2.0)
    assert _close(pooled, _single(TokenMean, {}, a + b))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_token_mean_empty_is_zero():
    m = TokenMean()
    assert m.compute().item() == 0.0
    m.update(torch.ones(2, 3), torch.zeros(2, 3))
    assert m.compute().item() == 0.0


def test_scalar_mean():
    m = ScalarMean()
    m.update(torch.tensor([0.0, 1.0, 1.0]))
    m.update(torch.tensor([1.0]))
    assert m.compute().item() == pytest.approx(0.75)
    lengths_a, lengths_b = [(torch.tensor([3.0, 5.0]),)], [(torch.tensor([10.0]),)]
    assert _merged(ScalarMean, {}, lengths_a, lengths_b).item() == pytest.approx(6.0)


# ---- TokenQuantiles ---------------------------------------------------------------------------


def test_quantiles_by_hand():
    values = torch.cat([torch.arange(1.0, 11.0), torch.tensor([100.0, -100.0])])
    mask = torch.cat([torch.ones(10), torch.zeros(2)])  # the outliers are not selected
    m = TokenQuantiles()
    m.update(values, mask)
    q = m.compute()
    # linear interpolation at position q * (n - 1) of the sorted 1..10
    assert set(q) == {"p10", "p50", "p90"}
    assert q["p10"].item() == pytest.approx(1.9) and q["p50"].item() == pytest.approx(5.5)
    assert q["p90"].item() == pytest.approx(9.1)


def test_quantiles_match_torch_quantile_and_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (7, 13), generator=g).float()  # many ties
    w = (torch.rand(7, 13, generator=g) > 0.3).float()
    m = TokenQuantiles(quantiles=(0.0, 0.25, 0.5, 0.999, 1.0))
    m.update(x, w)
    q = m.compute()
    assert list(q) == ["p0", "p25", "p50", "p99.9", "p100"]
    ref = torch.quantile(x[w > 0], torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0]))
    assert torch.allclose(torch.stack(list(q.values())), ref, atol=1e-6)
    m = TokenQuantiles()
    m.update(torch.tensor([2.0, 2.0, 2.0, 5.0]))
    assert m.compute()["p50"].item() == 2.0


def test_quantiles_pooled_over_ranks():
    g = torch.Generator().manual_seed(1)
    a = [(torch.randn(3, 8, generator=g), (torch.rand(3, 8, generator=g) > 0.5).float())]
    b = [(torch.randn(2, 5, generator=g) + 3, torch.ones(2, 5)), (torch.randn(4), torch.zeros(4))]
    merged = _merged(TokenQuantiles, {}, a, b)
    assert _close(merged, _single(TokenQuantiles, {}, a + b), 1e-6)
    # and it is the quantile of the pooled tokens, which no average of per-rank quantiles gives
    pooled = torch.cat([a[0][0][a[0][1] > 0], b[0][0].flatten()])
    assert merged["p50"].item() == pytest.approx(torch.quantile(pooled, 0.5).item(), abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_quantiles_empty_are_zero():
    m = TokenQuantiles()
    assert all(v.item() == 0.0 for v in m.compute().values())
    m.update(torch.randn(3, 4), torch.zeros(3, 4))
    assert all(v.item() == 0.0 for v in m.compute().values())


@pytest.mark.parametrize("bad", [(), (0.5, 1.5), (-0.1,), (0.5, 0.5)])
def test_quantiles_reject_bad_values(bad):
    with pytest.raises(ValueError, match="quantiles"):
        TokenQuantiles(quantiles=bad)


# ---- Covariance -------------------------------------------------------------------------------


def test_covariance_by_hand():
    # x = (1, 2, 3), y = (2, 4, 7): means 2 and 13/3; mean of products of deviations
    # ((-1)(-7/3) + 0 + (1)(8/3)) / 3 = 5/3
    m = Covariance()
    m.update(
        torch.tensor([[1.0, 2.0, 3.0, 50.0]]),
        torch.tensor([[2.0, 4.0, 7.0, -9.0]]),
        torch.tensor([[1, 1, 1, 0]]),
    )
    assert m.compute().item() == pytest.approx(5 / 3)


def test_covariance_matches_centred_formula_and_pools_ranks():
    g = torch.Generator().manual_seed(2)
    x1, y1, m1 = (
        torch.randn(4, 6, generator=g) - 1,
        torch.randn(4, 6, generator=g),
        torch.rand(4, 6, generator=g) > 0.4,
    )
    x2, y2, m2 = (
        torch.randn(3, 9, generator=g),
        torch.randn(3, 9, generator=g) + 2,
        torch.rand(3, 9, generator=g) > 0.4,
    )
    merged = _merged(Covariance, {}, [(x1, y1, m1)], [(x2, y2, m2)])
    xs = torch.cat([x1[m1], x2[m2]]).double()
    ys = torch.cat([y1[m1], y2[m2]]).double()
    ref = ((xs - xs.mean()) * (ys - ys.mean())).mean()  # centring over all valid tokens, pooled
    assert merged.item() == pytest.approx(ref.item(), abs=1e-12)
    # the mean of the two per-rank covariances is a different number: pooling matters
    per_rank = [
        ((x[m] - x[m].mean()) * (y[m] - y[m].mean())).mean() for x, y, m in ((x1, y1, m1), (x2, y2, m2))
    ]
    assert abs(sum(per_rank).item() / 2 - ref.item()) > 1e-3


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_covariance_empty_and_single_token():
    m = Covariance()
    assert m.compute().item() == 0.0
    m.update(torch.tensor([3.0]), torch.tensor([4.0]))
    assert m.compute().item() == pytest.approx(0.0, abs=1e-12)


# ---- ZeroVarianceGroups -----------------------------------------------------------------------


def test_zero_variance_groups_by_hand():
    m = ZeroVarianceGroups()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5])
    groups = torch.tensor([5, 3, 5, 3, 5, 3, 9])  # interleaved ids
    # group 5: (1, 1, 1) equal; group 3: (0, 0, 0) equal; group 9: a single response (std 0)
    m.update(rewards, groups)
    assert m.compute().item() == pytest.approx(1.0)
    m.update(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))  # one mixed, one equal
    assert m.compute().item() == pytest.approx(4 / 5)


def test_zero_variance_groups_atol_and_merge():
    r, gid = torch.tensor([0.5, 0.5 + 1e-6, 0.2, 0.9]), torch.tensor([0, 0, 1, 1])
    assert _single(ZeroVarianceGroups, {}, [(r, gid)]).item() == 0.0
    assert _single(ZeroVarianceGroups, {"atol": 1e-5}, [(r, gid)]).item() == pytest.approx(0.5)
    a = [(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]))]
    b = [(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([2, 2, 2]))]
    merged = _merged(ZeroVarianceGroups, {}, a, b)
    assert merged.item() == pytest.approx(2 / 3)  # not the mean of per-rank fractions (1/2 + 1) / 2
    assert _close(merged, _single(ZeroVarianceGroups, {}, a + b))


def test_zero_variance_groups_empty_and_validation():
    m = ZeroVarianceGroups()
    m.update(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert m.compute().item() == 0.0
    with pytest.raises(ValueError, match="atol"):
        ZeroVarianceGroups(atol=-1.0)


# ---- pass@k -----------------------------------------------------------------------------------


def _comb_pass(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_comb_pass(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(200, 3, 100) == pytest.approx(_comb_pass(200, 3, 100), abs=1e-12)
    assert pass_at_k(10, 8, 5) == 1.0  # n - c < k


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 0)


def test_pass_at_k_metric_by_hand():
    # problem A: 1 of 4 correct; B: 0 of 4; C: 4 of 4
    correct = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    m = PassAtK(ks=[1, 2, 4])
    m.update(correct, groups)
    out = m.compute()
    assert list(out) == ["pass@1", "pass@2", "pass@4"]
    assert out["pass@1"].item() == pytest.approx((1 / 4 + 0 + 1) / 3)
    assert out["pass@2"].item() == pytest.approx((1 - 3 / 6 + 0 + 1) / 3)
    assert out["pass@4"].item() == pytest.approx((1 + 0 + 1) / 3)


def test_pass_at_k_metric_uneven_groups_and_merge():
    g = torch.Generator().manual_seed(3)
    sizes = [3, 5, 8, 4, 6]
    correct = [torch.rand(s, generator=g) > 0.6 for s in sizes]
    ids = [torch.full((s,), i) for i, s in enumerate(sizes)]
    a = [(torch.cat(correct[:2]), torch.cat(ids[:2]))]
    b = [(torch.cat(correct[2:]), torch.cat(ids[2:]))]
    merged = _merged(PassAtK, {"ks": [1, 3]}, a, b)
    for k in (1, 3):
        ref = sum(_comb_pass(s, int(c.sum()), k) for s, c in zip(sizes, correct)) / len(sizes)
        assert merged[f"pass@{k}"].item() == pytest.approx(ref, abs=1e-12)
    assert _close(merged, _single(PassAtK, {"ks": [1, 3]}, a + b), 1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_pass_at_k_metric_errors_and_empty():
    m = PassAtK(ks=[1, 4])
    assert m.compute()["pass@4"].item() == 0.0
    with pytest.raises(ValueError, match="pass@4"):
        m.update(torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="ks"):
        PassAtK(ks=[0])
    with pytest.raises(ValueError, match="ks"):
        PassAtK(ks=[2, 2])


# ---- RewardStd --------------------------------------------------------------------------------


def test_reward_std_by_hand_and_merge():
    m = RewardStd()
    m.update(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert m.compute().item() == pytest.approx(math.sqrt(0.75 - 0.75**2))  # population std
    g = torch.Generator().manual_seed(4)
    a, b = [(torch.randn(5, generator=g),)], [(torch.randn(9, generator=g) + 4,)]
    merged = _merged(RewardStd, {}, a, b)
    ref = torch.cat([a[0][0], b[0][0]]).double().std(unbiased=False)
    assert merged.item() == pytest.approx(ref.item(), abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_reward_std_degenerate():
    m = RewardStd()
    assert m.compute().item() == 0.0
    m.update(torch.tensor([0.3]))
    assert m.compute().item() == pytest.approx(0.0, abs=1e-12)
    m = RewardStd()
    m.update(torch.full((6,), 0.1))  # all equal: rounding must not give sqrt of a negative
    assert m.compute().item() == pytest.approx(0.0, abs=1e-7) and not math.isnan(m.compute().item())


# ---- a real 2-rank reduction (gloo, CPU) ------------------------------------------------------


def _rank_data(rank):
    g = torch.Generator().manual_seed(10 + rank)
    n = 5 if rank == 0 else 9  # uneven token counts per rank
    ent, adv, lp = (
        torch.rand(2, n, generator=g) * 3,
        torch.randn(2, n, generator=g),
        -torch.rand(2, n, generator=g),
    )
    mask = (torch.rand(2, n, generator=g) > 0.3).float()
    # rank 0: two mixed groups; rank 1: one all-correct group and one mixed
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0] if rank == 0 else [1.0, 1, 1, 1, 0, 1, 0, 0])
    groups = torch.arange(8) // 4 + 2 * rank
    return ent, mask, lp, adv, rewards, groups


def _all_metrics():
    return [
        TokenMean(),
        TokenQuantiles(),
        Covariance(),
        ZeroVarianceGroups(),
        PassAtK(ks=[1, 2]),
        RewardStd(),
    ]


def _update_all(metrics, data):
    ent, mask, lp, adv, rewards, groups = data
    tm, tq, cov, zv, pk, rs = metrics
    tm.update(ent, mask)
    tq.update(ent, mask)
    cov.update(lp, adv, mask)
    zv.update(rewards, groups)
    pk.update(rewards.bool(), groups)
    rs.update(rewards)


def _dist_worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metrics = _all_metrics()
        _update_all(metrics, _rank_data(rank))
        results = [m.compute() for m in metrics]  # torchmetrics syncs the states across ranks here
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    out = str(tmp_path / "metrics.pt")
    run_two_ranks(_dist_worker, out)
    two = torch.load(out)
    single = _all_metrics()
    for rank in range(2):
        _update_all(single, _rank_data(rank))
    rank0_only = _all_metrics()
    _update_all(rank0_only, _rank_data(0))
    for m, m0, r2 in zip(single, rank0_only, two):
        assert _close(m.compute(), r2, 1e-6), type(m).__name__
        assert not _close(m0.compute(), r2, 1e-6), type(m).__name__  # the states were really synced


def _bank_feed(bank, part):
    from lightning_entropy.metrics import Covariance, SumRatio, TokenQuantiles

    x, y, m = part
    bank.update("h", x, m)
    bank.update("h_", x, m, kind=TokenQuantiles)
    bank.update("cov", x, y, m, kind=Covariance)
    bank.update("loss", x.sum(), 1.0, kind=SumRatio)


def _bank_parts():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    m = (torch.rand(6, 5, generator=g) > 0.3).float()
    return (x[:2], y[:2], m[:2]), (x[2:], y[2:], m[2:])  # ranks hold different token counts


def _bank_worker(rank, world, port, out):
    from lightning_entropy.metrics import MetricBank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bank = MetricBank()
        _bank_feed(bank, _bank_parts()[rank])
        if rank == 1:
            bank.update("only_rank1", torch.tensor([4.0]))  # the other rank never saw this key
        got = {k: float(v) for k, v in bank.compute().items()}
        if rank == 0:
            torch.save(got, out)
    finally:
        dist.destroy_process_group()


def test_metric_bank_pools_ranks_like_one_process(tmp_path):
    from lightning_entropy.metrics import MetricBank

    single = MetricBank()
    for part in _bank_parts():
        _bank_feed(single, part)
    expected = {k: float(v) for k, v in single.compute().items()}
    assert set(expected) == {"h", "h_p10", "h_p50", "h_p90", "cov", "loss"}
    x, _, m = (torch.cat(t) for t in zip(*_bank_parts()))
    assert expected["h"] == pytest.approx(float((x * m).sum() / m.sum()), rel=1e-6)
    assert expected["loss"] == pytest.approx(float(x.sum()) / 2, rel=1e-6)  # one count per part
    out = str(tmp_path / "bank.pt")
    run_two_ranks(_bank_worker, out)
    got = torch.load(out)
    assert got.pop("only_rank1") == pytest.approx(4.0)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert single.compute() == {}  # compute resets the bank for the next step
