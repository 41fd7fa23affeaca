"""Token selectors (METHODS.md §2): hand-computed selections including ties and float-noise counts,
edge cases, reproducible randomness, 1 vs 2 ranks (gloo) and a registry-driven smoke test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import lightning_entropy  # noqa: F401  (registers the built-in components)
from lightning_entropy.batch import RolloutBatch, make_agg_norm
from lightning_entropy.components.losses import PPOLoss
from lightning_entropy.components.selectors import (
    HighEntropyTokens,
    LowEntropyTokens,
    RandomTokens,
    STEERWeights,
    WindowEntropyTokens,
    token_count,
)
from lightning_entropy.registry import SELECTORS
from tests._dist import run_two_ranks

PAD = 9.0  # a loud padding value that must never be selected


def make_batch(
    entropy: list[list[float]],
    lengths: list[int],
    adv: list[list[float]] | None = None,
    old: list[list[float]] | None = None,
    ids: list[list[int]] | None = None,
) -> RolloutBatch:
    ent = torch.tensor(entropy, dtype=torch.float32)
    B, T = ent.shape
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.tensor(ids) if ids else torch.arange(B * T).reshape(B, T),
        response_mask=mask,
        group_ids=torch.arange(B) // 2,
        truncated=torch.zeros(B, dtype=torch.bool),
        rewards=torch.zeros(B),
        old_logprobs=torch.tensor(old) if old else -torch.ones(B, T),
        entropy=ent,
        advantages=(torch.tensor(adv) if adv else torch.ones(B, T)) * mask,
    )


def random_batch(B: int = 8, T: int = 7, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    ent = (torch.rand(B, T, generator=g) * 3).tolist()
    adv = torch.randn(B, 1, generator=g).expand(B, T).tolist()
    old = (-torch.rand(B, T, generator=g) * 4).tolist()
    return make_batch(ent, lengths, adv, old)


# 7 valid tokens; 2.0 appears three times: (0,1), (0,3), (1,1)
TIES = make_batch([[0.5, 2.0, 1.0, 2.0], [1.5, 2.0, 0.1, PAD]], lengths=[4, 3])


def test_high_entropy_top_k_with_ties_by_hand():
    sel = HighEntropyTokens(rho=0.2)
    w = sel(TIES)  # k = ceil(0.2 * 7) = 2: the two earliest of the three tied 2.0s
    assert w.tolist() == [[0, 1, 0, 1], [0, 0, 0, 0]]
    assert sel.metrics["kept_frac"].item() == pytest.approx(2 / 7)
    assert sel.metrics["kept_entropy"].item() == pytest.approx(2.0)
    assert sel.metrics["dropped_entropy"].item() == pytest.approx((0.5 + 1.0 + 1.5 + 2.0 + 0.1) / 5)
    w = HighEntropyTokens(rho=0.5)(TIES)  # k = ceil(3.5) = 4: all three 2.0s and 1.5
    assert w.tolist() == [[0, 1, 0, 1], [1, 1, 0, 0]]


def test_low_entropy_is_the_contrast():
    assert LowEntropyTokens(rho=0.2)(TIES).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]  # 0.5 and 0.1
    ties = make_batch([[0.3, 0.3, 0.3, 2.0]], lengths=[4])
    assert LowEntropyTokens(rho=0.5)(ties).tolist() == [[1, 1, 0, 0]]


def test_counts_without_float_noise_and_at_least_one():
    assert 0.28 * 25 > 7 and 0.29 * 100 < 29  # 7.000000000000001, 28.999999999999996
    assert token_count(0.28, 25, "ceil") == 7 and token_count(0.29, 100, "floor") == 29
    row = make_batch([[float(i) for i in range(25)]], lengths=[25])
    assert HighEntropyTokens(rho=0.28)(row).sum() == 7
    one = make_batch([[0.4, 0.2, PAD]], lengths=[2])
    assert HighEntropyTokens(rho=0.01)(one).tolist() == [[1, 0, 0]]  # max(1, ceil(0.02))


@pytest.mark.parametrize(
    "cls", [HighEntropyTokens, LowEntropyTokens, RandomTokens, WindowEntropyTokens, STEERWeights]
)
def test_empty_mask_selects_nothing(cls):
    empty = make_batch([[1.0, 2.0], [3.0, 4.0]], lengths=[0, 0])
    sel = cls()
    assert torch.all(sel(empty) == 0) and torch.all(sel.micro(empty, empty.entropy) == 0)


def test_micro_scope_ranks_the_current_entropy_of_the_micro_batch():
    sel = HighEntropyTokens(rho=0.2, scope="micro")
    cur = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.5, 0.0]])
    assert sel.micro(TIES, cur).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    # each micro-batch on its own keeps max(1, ceil(0.2 n)) tokens: the split changes the selection
    parts = [sel.micro(mb, cur[i : i + 1]) for i, mb in enumerate(TIES.split(1))]
    assert torch.cat(parts).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    assert HighEntropyTokens(rho=0.5, scope="micro").micro(TIES.split(1)[1], cur[1:]).sum() == 2


def test_random_tokens_exact_count_seeded_and_resumable():
    batch = random_batch(seed=3)
    n = int(batch.response_mask.sum())
    sel = RandomTokens(rho=0.3, seed=7)
    w = sel(batch)
    k = max(1, math.ceil(round(0.3 * n, 6)))
    assert int(w.sum()) == k and torch.all(w[batch.response_mask == 0] == 0)
    # the same draw written out: uniform keys from the (seed, call) generator, k largest
    keys = torch.rand(n, generator=torch.Generator().manual_seed(7 * 1_000_003 + 0))
    expected = torch.zeros(n)
    expected[torch.argsort(keys, descending=True)[:k]] = 1
    assert torch.equal(w[batch.response_mask.bool()], expected)
    state = sel.state_dict()
    second = sel(batch)
    assert state == {"calls": 1} and not torch.equal(second, w) and int(second.sum()) == k
    resumed = RandomTokens(rho=0.3, seed=7)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(batch), second)


def test_window_entropy_following_window_by_hand():
    ent = [[0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 0.0], [2.0, 2.0, 2.0, PAD, PAD, PAD, PAD]]
    batch = make_batch(ent, lengths=[7, 3])
    w = WindowEntropyTokens(window=2, threshold=1.5)(batch)
    # row 0: means of (t+1, t+2) = 2, 1.5 (kept: >=), 1, 2, 1.5, no window, no window
    # row 1: t=0 -> (2 + 2)/2; t=1 would need the padded t=3, so no full window
    assert w.tolist() == [[1, 1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]]
    ids = [[5, 6, 5, 6, 5, 6, 5], [5, 5, 5, 5, 5, 5, 5]]
    batch = make_batch(ent, lengths=[7, 3], ids=ids)
    w = WindowEntropyTokens(window=2, threshold=1.5, token_ids=[6])(batch)
    assert w.tolist() == [[0, 1, 0, 1, 0, 0, 0], [0] * 7]
    short = make_batch([[3.0, 3.0, 3.0, 3.0]], lengths=[4])
    assert WindowEntropyTokens()(short).sum() == 0  # w = 4 needs 5 tokens


def test_window_entropy_micro_reads_the_current_entropy():
    batch = make_batch([[0.0, 0.0, 0.0]], lengths=[3])
    cur = torch.tensor([[0.0, 2.0, 2.0]])
    assert WindowEntropyTokens(window=2, threshold=1.5, scope="micro").micro(batch, cur).tolist() == [
        [1, 0, 0]
    ]


# STEER: pi = pi_old = (0.5, 0.9, 0.2), H = (1, 0.5, 2), A = 1 -> Omega = (1 - pi)(log pi + H)
STEER_OLD = [[math.log(0.5), math.log(0.9), math.log(0.2)]]
OMEGA = [0.5 * (math.log(0.5) + 1.0), 0.1 * (math.log(0.9) + 0.5), 0.8 * (math.log(0.2) + 2.0)]


def test_steer_exponential_by_hand():
    batch = make_batch([[1.0, 0.5, 2.0]], lengths=[3], old=STEER_OLD)
    sel = STEERWeights()
    w = sel(batch)
    k = -math.log(0.8) / max(OMEGA)
    expected = [max(0.8, min(1.0, math.exp(-k * o))) for o in OMEGA]
    assert w[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert w[0, 2].item() == pytest.approx(0.8)  # the largest |Omega| gets w_min


def test_steer_linear_and_degenerate_cases():
    batch = make_batch([[1.0, 0.5, 2.0]], lengths=[3], old=STEER_OLD)
    w = STEERWeights(mode="linear", w_min=0.8, w_max=1.2)(batch)
    lo, hi = min(OMEGA), max(OMEGA)
    expected = [1.2 - (o - lo) / (hi - lo) * 0.4 for o in OMEGA]
    assert w[0].tolist() == pytest.approx(expected, abs=1e-6)
    # all advantages zero: Omega = 0 everywhere; exponential gives 1, linear the midpoint
    zero = make_batch([[1.0, 0.5, 2.0]], lengths=[3], adv=[[0.0, 0.0, 0.0]], old=STEER_OLD)
    assert STEERWeights()(zero).tolist() == [[1.0, 1.0, 1.0]]
    assert STEERWeights(mode="linear", w_max=1.2)(zero)[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # max |Omega| below 0.02 uses the 0.02 floor: k = -ln 0.8 / 0.02
    tiny = make_batch([[1.0, 0.5, 2.0]], lengths=[3], adv=[[0.01, 0.01, 0.01]], old=STEER_OLD)
    k = -math.log(0.8) / 0.02
    assert STEERWeights()(tiny)[0].tolist() == pytest.approx(
        [math.exp(-k * 0.01 * o) for o in OMEGA], abs=1e-6
    )


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (HighEntropyTokens, {"rho": 0.0}),
        (LowEntropyTokens, {"rho": 1.5}),
        (RandomTokens, {"scope": "batch"}),
        (WindowEntropyTokens, {"window": 0}),
        (WindowEntropyTokens, {"threshold": -1.0}),
        (STEERWeights, {"mode": "cubic"}),
        (STEERWeights, {"w_min": 0.0}),
        (STEERWeights, {"w_max": 0.5}),
    ],
)
def test_bad_hyperparameters_name_the_parameter(cls, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(**kwargs)


@pytest.mark.parametrize("name", SELECTORS.names())
def test_every_selector_runs_with_defaults(name):
    batch = random_batch()
    sel = SELECTORS.build(name)
    for w in (sel(batch), sel.micro(batch, batch.entropy * 1.1)):
        assert w.shape == batch.response_mask.shape and torch.isfinite(w).all()
        assert torch.all(w >= 0) and torch.all(w[batch.response_mask == 0] == 0)
    assert sel.scope in ("minibatch", "micro")


@pytest.mark.parametrize("name", ["high_entropy", "low_entropy", "random_tokens", "window_entropy", "steer"])
def test_selection_then_micro_batches_give_the_same_gradient(name):
    batch = random_batch(seed=5)
    batch.token_weights = SELECTORS.build(name)(batch) * batch.response_mask
    cur = batch.old_logprobs + 0.2
    grads = []
    for micro in (batch.size, 2):
        lp = cur.clone().requires_grad_(True)
        norm = make_agg_norm([batch], "token-mean", const=7.0)
        total, start = 0.0, 0
        for mb in batch.split(micro):
            mb.agg_norm = norm
            total = total + mb.agg(PPOLoss()(lp[start : start + mb.size], mb, mb.entropy)[0])
            start += mb.size
        total.backward()
        grads.append(lp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


# --------------------------------------------------------------------------------------------
# 1 vs 2 ranks (gloo, CPU)

DIST = [
    (HighEntropyTokens, {"rho": 0.3}),
    (LowEntropyTokens, {"rho": 0.3}),
    (RandomTokens, {"rho": 0.3, "seed": 4}),
    (STEERWeights, {"mode": "linear", "w_max": 1.2}),
    (STEERWeights, {}),
]


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch = random_batch(seed=11)
        half = batch.size // world
        local = batch.index(list(range(rank * half, (rank + 1) * half)))
        results = []
        for cls, kwargs in DIST:
            sel = cls(**kwargs)
            w = sel(local)
            parts = [torch.zeros_like(w) for _ in range(world)]
            dist.all_gather(parts, w)
            results.append((torch.cat(parts), float(sel.metrics.get("kept_frac", torch.tensor(0.0)))))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_select_what_one_rank_selects(tmp_path):
    out = str(tmp_path / "sel.pt")
    run_two_ranks(_dist_worker, out)
    results = torch.load(out)
    batch = random_batch(seed=11)
    for (cls, kwargs), (w2, kept2) in zip(DIST, results):
        sel = cls(**kwargs)
        w1 = sel(batch)
        assert torch.allclose(w1, w2, atol=1e-6), cls.__name__
        assert kept2 == pytest.approx(float(sel.metrics.get("kept_frac", torch.tensor(0.0))))


def test_steer_micro_scope_uses_the_current_policy_probability():
    """Official STEER: pi is the current policy; Omega = A / pi_old * pi (1 - pi)(log pi + H_old)."""
    batch = random_batch(seed=3)
    cur = batch.old_logprobs + 0.3 * torch.randn_like(batch.old_logprobs)
    sel = STEERWeights(scope="micro")
    got = sel.micro(batch, batch.entropy, cur)
    mask = batch.response_mask.bool()
    pi, pi_old = cur.exp().clamp(1e-8, 1 - 1e-8), batch.old_logprobs.exp().clamp(1e-8, 1.0)
    omega = (batch.advantages / pi_old * pi * (1 - pi) * (pi.log() + batch.entropy)).abs()
    k = -math.log(0.8) / max(float(omega[mask].max()), 0.02)
    expected = torch.exp(-k * omega).clamp(0.8, 1.0) * mask
    assert torch.allclose(got, expected, atol=1e-6)
    # without current log-probs (minibatch scope) pi falls back to pi_old, which differs here
    assert not torch.allclose(sel.micro(batch, batch.entropy), expected, atol=1e-4)
