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
    ClipBTokens,
    ClipVTokens,
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
    batch = make_batch(ent, lengths, adv, old)
    batch.discriminator_baseline = torch.rand(B, T, generator=g) * batch.response_mask  # Clip_V's N_t
    return batch


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
        (ClipBTokens, {"mu": 0.0}),
        (ClipVTokens, {"mu": -1.0}),
        (ClipVTokens, {"max_frac": 0.0}),
        (ClipBTokens, {"scope": "micro"}),
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
    assert sel.scope in ("minibatch", "micro", "step")


@pytest.mark.parametrize(
    "name", ["high_entropy", "low_entropy", "random_tokens", "window_entropy", "steer", "clip_b", "clip_v"]
)
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
    (ClipBTokens, {"mu": 1.0}),
    (ClipVTokens, {"mu": 1.0, "max_frac": 0.05}),
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


# --------------------------------------------------------------------------------------------
# Clip_B / Clip_V (arXiv 2602.03392): S_t = p_t (H_t + log p_t), hand-computed thresholds


def clip_batch(n_valid: int, lengths: list[int], outliers: dict, adv: list[list[float]]) -> RolloutBatch:
    """Rows of width 8 where every valid token has p = 1, H = 0 (S = 0) except ``outliers``:
    {(row, col): log p} with H = 0, so S = p log p there."""
    B = len(lengths)
    old = torch.zeros(B, 8)
    for (r, c), lp in outliers.items():
        old[r, c] = lp
    batch = make_batch([[0.0] * 8 for _ in range(B)], lengths, adv, old.tolist())
    assert int(batch.response_mask.sum()) == n_valid
    return batch


def test_clip_b_threshold_by_hand_and_the_shrinking_denominator():
    # 8 valid tokens: seven S = 0 and one S = -c (c = 1/e: p = 1/e, log p = -1).
    # mean = -c/8, population var = (7 (c/8)^2 + (7c/8)^2) / 8 = 7 c^2 / 64, std = c sqrt(7) / 8,
    # so the outlier's z / std = (-7c/8) / (c sqrt(7)/8) = -sqrt(7) = -2.6458, whatever c.
    adv = [[-1.0] * 8, [1.0] * 8]
    batch = clip_batch(8, [5, 3], {(0, 2): -1.0}, adv)
    c = math.exp(-1.0)
    w = ClipBTokens(mu=2.5)(batch)  # -2.6458 < -2.5: the A < 0 outlier goes
    assert w.tolist() == [[1, 1, 0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    sel = ClipBTokens(mu=2.7)  # -2.6458 >= -2.7: kept
    assert sel(batch).tolist() == batch.response_mask.float().tolist()
    assert sel.metrics["s_mean"] == pytest.approx(-c / 8)
    assert sel.metrics["s_std"] == pytest.approx(c * math.sqrt(7) / 8)
    # the same outlier with A > 0 always stays
    flipped = clip_batch(8, [5, 3], {(0, 2): -1.0}, [[1.0] * 8, [-1.0] * 8])
    assert ClipBTokens(mu=2.5)(flipped).tolist() == flipped.response_mask.float().tolist()
    # token-mean denominator: 7 kept tokens, not 8; a seq-mean drops nothing here (no row empties)
    batch.token_weights = w
    norm = make_agg_norm([batch], "token-mean", const=8.0)
    assert norm.tokens == {"selected": 7.0, "response": 8.0}
    ones = torch.ones(2, 8)
    assert batch.agg(ones).item() == pytest.approx(1.0)  # sum over 7 kept / 7
    assert ClipBTokens(mu=2.5).metrics == {}


def test_clip_b_row_emptied_leaves_the_sequence_count():
    # one valid token in row 1 is the A < 0 outlier: its row leaves seq-mean's count (2 -> 1)
    adv = [[1.0] * 8, [-1.0] * 8]
    batch = clip_batch(8, [7, 1], {(1, 0): -1.0}, adv)
    batch.token_weights = ClipBTokens(mu=2.5)(batch)
    assert batch.token_weights[1].sum() == 0
    norm = make_agg_norm([batch], "seq-mean-token-mean", const=8.0)
    assert norm.seqs == {"selected": 1.0, "response": 2.0} and norm.tokens["selected"] == 7.0


def test_clip_b_and_clip_v_keep_everything_when_s_is_constant_or_empty():
    equal = clip_batch(8, [5, 3], {}, [[-1.0] * 8, [-1.0] * 8])  # S = 0 everywhere: std 0
    equal.discriminator_baseline = torch.full((2, 8), 0.9) * equal.response_mask  # D = 0.9, std 0
    for sel in (ClipBTokens(), ClipVTokens(mu=0.1, max_frac=1.0)):
        assert sel(equal).tolist() == equal.response_mask.float().tolist()
    empty = clip_batch(0, [0, 0], {}, [[-1.0] * 8, [-1.0] * 8])
    empty.discriminator_baseline = torch.zeros(2, 8)
    for sel in (ClipBTokens(), ClipVTokens()):
        w = sel(empty)
        assert w.sum() == 0 and sel.metrics["kept_frac"] == 0


def test_clip_v_uncentred_threshold_zero_advantage_and_cap_by_hand():
    # S = 0 on every valid token, so D = N. 16 valid tokens: N = 0 on 13, and 20 (A < 0), 30 (A < 0),
    # 25 (A = 0). mean D = 75/16 = 4.6875; population var = (13 * 4.6875^2 + 15.3125^2 + 25.3125^2
    # + 20.3125^2) / 16 = 1573.4375 / 16 = 98.33984375, std = 9.9166. mu = 2: threshold 2 std = 19.83
    # (NOT mean + 2 std), so 20, 25 and 30 all fail.
    batch = clip_batch(16, [8, 8], {}, [[1.0] * 8, [-1.0] * 8])
    batch.advantages[1, 2] = 0.0
    batch.discriminator_baseline = torch.zeros(2, 8)
    batch.discriminator_baseline[1, :3] = torch.tensor([20.0, 30.0, 25.0])
    sel = ClipVTokens(mu=2.0, max_frac=0.5)  # 3/16 clipped <= 0.5: no cap
    assert sel(batch)[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert sel.metrics["d_std"] == pytest.approx(math.sqrt(98.33984375))
    assert sel.metrics["kept_frac"].item() == pytest.approx(13 / 16)
    assert sel.metrics["clipped_neg_frac"].item() == pytest.approx(2 / 7)  # row 1 has 7 A < 0 tokens
    # cap: 3/16 > 0.1 and 2 A < 0 violators > K = max(1, floor(0.1 * 16)) = 1: only the largest D (30)
    # of the A < 0 ones goes; the A = 0 violator still goes (as in the official code)
    assert ClipVTokens(mu=2.0, max_frac=0.1)(batch)[1].tolist() == [1, 0, 0, 1, 1, 1, 1, 1]
    # mu = 3: threshold 29.75 -> only 30 goes
    assert ClipVTokens(mu=3.0, max_frac=1.0)(batch)[1].tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    # row 0 (A > 0) is never touched
    assert ClipVTokens(mu=2.0, max_frac=0.1)(batch)[0].tolist() == [1] * 8


def test_clip_v_needs_the_old_pass_baseline():
    batch = clip_batch(8, [4, 4], {}, [[-1.0] * 8, [-1.0] * 8])
    assert "discriminator_baseline" in ClipVTokens.requires
    with pytest.raises(ValueError, match="discriminator_baseline"):
        ClipVTokens()(batch)


def test_clip_b_step_scope_fixes_the_rollout_statistics_for_every_mini_batch():
    # over the whole rollout (8 valid tokens) the outlier's z / std is -sqrt(7) = -2.65 < -2.5: dropped.
    # Row 0 alone (5 tokens: four S = 0, one S = -c): mean -c/5, population std 2c/5, z / std = -2:
    # a per-mini-batch statistic would keep it.
    batch = clip_batch(8, [5, 3], {(0, 2): -1.0}, [[-1.0] * 8, [-1.0] * 8])
    step = ClipBTokens(mu=2.5)  # scope: step (default), as the official advantage function
    assert step.scope == "step"
    step.prepare_rollout(batch)
    assert batch.step_weights[0].tolist() == [1, 1, 0, 1, 1, 0, 0, 0]
    mini = batch.index([0])  # what the update hands the selector: the mini-batch's rows
    assert step(mini).tolist() == [[1, 1, 0, 1, 1, 0, 0, 0]]
    assert ClipBTokens(mu=2.5, scope="minibatch")(mini).tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    # minibatch scope never writes the rollout's weights
    fresh = clip_batch(8, [5, 3], {(0, 2): -1.0}, [[-1.0] * 8, [-1.0] * 8])
    ClipVTokens(scope="minibatch").prepare_rollout(fresh)
    assert fresh.step_weights is None
