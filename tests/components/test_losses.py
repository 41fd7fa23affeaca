"""Policy losses (METHODS.md §0, §3.5, §2.3, §4): hand-computed cases, gradients where the method is
about gradients, edge cases, scope invariance (1 vs 4 micro-batches, 1 vs 2 ranks) and a
registry-driven smoke test of every registered loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import lightning_entropy  # noqa: F401  (registers the built-in components)
from lightning_entropy.batch import RolloutBatch, make_agg_norm
from lightning_entropy.components.losses import (
    BAPOLoss,
    BuPOLoss,
    CEGPPOLoss,
    CISPOLoss,
    ClipCovLoss,
    COPOLoss,
    EntroPICLoss,
    ERALoss,
    ERCLoss,
    GSPOLoss,
    HAPOClipLoss,
    KLCovLoss,
    PPOLoss,
    top_fraction_mean,
)
from lightning_entropy.ops import logprobs_and_entropy, topk_logprobs
from lightning_entropy.registry import LOSSES
from tests._dist import run_two_ranks

ATOL = 1e-5


def make_batch(
    adv: list[list[float]] | torch.Tensor,
    old: list[list[float]] | torch.Tensor,
    lengths: list[int] | None = None,
    entropy: list[list[float]] | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> RolloutBatch:
    """Rows of per-token values (equal length T); ``lengths`` right-pads the response mask."""
    adv, old = torch.as_tensor(adv, dtype=torch.float32), torch.as_tensor(old, dtype=torch.float32)
    B, T = adv.shape
    lengths = lengths or [T] * B
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ent = torch.ones(B, T) if entropy is None else torch.as_tensor(entropy, dtype=torch.float32)
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.arange(B * T).reshape(B, T),
        response_mask=mask,
        group_ids=torch.arange(B) // 2,
        truncated=torch.zeros(B, dtype=torch.bool),
        rewards=torch.zeros(B),
        old_logprobs=old,
        entropy=ent,
        advantages=adv * mask,
        token_weights=weights,
    )


def random_batch(B: int = 8, T: int = 6, seed: int = 0) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
    """A batch with varied lengths, group advantages, and current log-probs / entropy off the old ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    old = -torch.rand(B, T, generator=g) * 3
    old[0, :2] = -0.01  # a few confident tokens (EntroPIC's pi > 0.95)
    ent = torch.rand(B, T, generator=g) * 2 + 0.05
    batch = make_batch(adv, old, lengths, ent)
    cur = old + 0.3 * torch.randn(B, T, generator=g)
    ent_cur = ent * (1 + 0.3 * torch.randn(B, T, generator=g)).clamp_min(0.1)
    # COPO's second advantage and blend weights (advantage: copo fills them in a run)
    batch.global_advantages = torch.randn(B, 1, generator=g).expand(B, T) * batch.response_mask
    batch.blend_weights = torch.rand(B, generator=g)
    # ERA's transform, as prepare_rollout fixes it once per rollout
    batch.logit_scale = torch.where(batch.advantages > 0, 2.0, 1.0) * batch.response_mask + (
        1 - batch.response_mask
    )
    return batch, cur, ent_cur


def run(
    loss_fn,
    cur: torch.Tensor,
    batch: RolloutBatch,
    ent_cur: torch.Tensor,
    micro: int | None = None,
    mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The module's update on one mini-batch: prepare, split, agg with pooled normalisers, backward."""
    lp = cur.clone().requires_grad_(True)
    loss_fn.prepare(batch)
    norm = make_agg_norm([batch], mode, const=float(batch.response_ids.shape[1]), reduce=True)
    total, stats, start = 0.0, [], 0
    for mb in batch.split(micro or batch.size):
        mb.agg_norm = norm
        rows = slice(start, start + mb.size)
        per_tok, st = loss_fn(lp[rows], mb, ent_cur[rows])
        total = total + mb.agg(per_tok, mode=mode)
        stats.append(st)
        start += mb.size
    total.backward()
    return total.detach(), lp.grad, stats


def per_token_grad(loss_fn, cur: torch.Tensor, batch: RolloutBatch, ent: torch.Tensor | None = None):
    """Per-token loss and d(loss_t)/d(log pi_t) (the losses are token-separable)."""
    lp = cur.clone().requires_grad_(True)
    loss, stats = loss_fn(lp, batch, batch.entropy if ent is None else ent)
    loss.sum().backward()
    return loss.detach(), lp.grad, stats


# --------------------------------------------------------------------------------------------
# PPO helpers


def test_ppo_dual_clip_by_hand():
    old = [[0.0, 0.0, 0.0, 0.0]]
    cur = torch.log(torch.tensor([[1.5, 0.5, 0.9, 5.0]]))
    batch = make_batch([[1.0, -1.0, 1.0, -1.0]], old)
    loss, grad, _ = per_token_grad(PPOLoss(eps_low=0.2, eps_high=0.2, clip_c=3.0), cur, batch)
    # A>0 r=1.5 -> -1.2 (clipped, no grad); A<0 r=0.5 -> 0.8 (clipped); A>0 r=.9 -> -.9; A<0 r=5 -> 3 (dual)
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.8, -0.9, 3.0]]), atol=ATOL)
    assert torch.allclose(grad, torch.tensor([[0.0, 0.0, -0.9, 0.0]]), atol=ATOL)


# --------------------------------------------------------------------------------------------
# CE-GPPO


def test_ce_gppo_values_and_bounded_gradients():
    r = torch.tensor([[1.5, 0.5, 1.1, 1.1, 0.5, 12.0]])
    batch = make_batch([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]], torch.zeros(1, 6))
    loss, grad, st = per_token_grad(
        CEGPPOLoss(eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0, clip_c=10.0), r.log(), batch
    )
    # high: -1*1.2*A; low: -0.5*0.8*A; inside: -A r; A>0 & r small: -A r; A<0 & r=12: dual-clip at 10
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.4, -1.1, 1.1, -0.5, 10.0]]), atol=ATOL)
    assert torch.allclose(grad, torch.tensor([[-1.2, 0.4, -1.1, 1.1, -0.5, 0.0]]), atol=ATOL)
    assert st["clip_high_frac"][0].tolist() == [1, 0, 0, 0, 0, 0]
    assert st["clip_low_frac"][0].tolist() == [0, 1, 0, 0, 0, 0]
    # the same tokens under PPO carry no gradient at all
    _, ppo_grad, _ = per_token_grad(PPOLoss(clip_c=10.0), r.log(), batch)
    assert ppo_grad[0, 0] == 0 and ppo_grad[0, 1] == 0
    # bound: |grad| <= beta (1 + eps) |A| outside the trust region, whatever the ratio
    big = torch.tensor([[40.0, 0.01]])
    _, g2, _ = per_token_grad(CEGPPOLoss(beta1=0.5), big.log(), make_batch([[3.0, -3.0]], torch.zeros(1, 2)))
    assert torch.allclose(g2, torch.tensor([[-1.2 * 3.0, 0.5 * 0.8 * 3.0]]), atol=ATOL)


# --------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov: two rows of three tokens, A = +2 / -2, old log pi chosen so that
# mean(A) = 0, mean(log pi) = -4.6/6 and Cov = A (log pi - mean):
#   (0,0): 2 * (-0.1 + 4.6/6) = 1.3333   (0,1): -2.6667   (0,2): 1.3333
#   (1,0): -1.3333                       (1,1): -1.3333   (1,2): 2.6667

COV_OLD = [[-0.1, -2.1, -0.1], [-0.1, -0.1, -2.1]]
COV_ADV = [[2.0, 2.0, 2.0], [-2.0, -2.0, -2.0]]
MEAN_LP = -4.6 / 6
COV = torch.tensor(
    [
        [2 * (-0.1 - MEAN_LP), 2 * (-2.1 - MEAN_LP), 2 * (-0.1 - MEAN_LP)],
        [-2 * (-0.1 - MEAN_LP), -2 * (-0.1 - MEAN_LP), -2 * (-2.1 - MEAN_LP)],
    ]
)
CANDIDATES = (COV > 1.0) & (COV < 5.0)


def test_cov_reference_numbers():
    assert CANDIDATES.tolist() == [[True, False, True], [False, False, True]]
    assert COV[1, 2].item() == pytest.approx(2.6667, abs=1e-4)


def test_clip_cov_zeroes_random_candidates_reproducibly():
    batch = make_batch(COV_ADV, COV_OLD)
    cur = torch.tensor(COV_OLD)
    loss_fn = ClipCovLoss(clip_ratio=0.34, seed=3)  # floor(0.34 * 6) = 2 tokens
    loss_fn.prepare(batch)
    loss, grad, st = per_token_grad(loss_fn, cur, batch)
    chosen = st["cov_clipped_frac"].bool()
    assert int(chosen.sum()) == 2 and not (chosen & ~CANDIDATES).any()
    # chosen tokens: value and gradient zero; the rest: -A r with r = 1 (eps = 1 never clips here)
    expected = torch.where(chosen, torch.zeros(2, 3), -torch.tensor(COV_ADV))
    assert torch.allclose(loss, expected) and torch.allclose(grad, expected)
    # same seed and call count -> same draw; the counter is checkpointed
    again = ClipCovLoss(clip_ratio=0.34, seed=3)
    again.prepare(batch)
    assert torch.equal(again(cur, batch, batch.entropy)[1]["cov_clipped_frac"], chosen.float())
    assert loss_fn.state_dict() == {"calls": 1}
    resumed = ClipCovLoss(clip_ratio=0.34, seed=3)
    resumed.load_state_dict(loss_fn.state_dict())
    loss_fn.prepare(batch)
    resumed.prepare(batch)
    assert torch.equal(
        loss_fn(cur, batch, batch.entropy)[1]["cov_clipped_frac"],
        resumed(cur, batch, batch.entropy)[1]["cov_clipped_frac"],
    )


def test_clip_cov_takes_all_candidates_when_fewer_than_n_and_none_without():
    batch = make_batch(COV_ADV, COV_OLD)
    cur = torch.tensor(COV_OLD)
    st = ClipCovLoss(clip_ratio=1.0)(cur, batch, batch.entropy)[1]
    assert torch.equal(st["cov_clipped_frac"].bool(), CANDIDATES)
    loss, st = ClipCovLoss(cov_low=10.0, cov_high=20.0)(cur, batch, batch.entropy)
    assert st["cov_clipped_frac"].sum() == 0 and torch.allclose(loss, -torch.tensor(COV_ADV))


def test_clip_cov_micro_scope_excludes_ppo_clipped_tokens():
    batch = make_batch(COV_ADV, COV_OLD)
    cur = torch.tensor(COV_OLD)
    cur[0, 0] += math.log(1.5)  # A > 0, r = 1.5 > 1 + 0.2: already clipped by PPO
    st = ClipCovLoss(clip_ratio=1.0, eps_low=0.2, eps_high=0.2, scope="micro")(cur, batch, batch.entropy)[1]
    chosen = st["cov_clipped_frac"].bool()
    # the current log pi shifts the mean a little; (0,0) is excluded as clipped, the others stay
    assert not chosen[0, 0] and chosen[0, 2] and chosen[1, 2] and int(chosen.sum()) == 2


def test_kl_cov_top_k_with_tie_and_penalty_gradient():
    batch = make_batch(COV_ADV, COV_OLD)
    delta = torch.tensor([[0.1, -0.2, 0.3], [0.2, -0.1, -0.4]])
    cur = torch.tensor(COV_OLD) + delta
    loss_fn = KLCovLoss(kl_cov_ratio=0.34, kl_coef=0.5)  # floor(2.04) = 2
    loss_fn.prepare(batch)
    loss, grad, st = per_token_grad(loss_fn, cur, batch)
    # top-2 Cov: (1,2) = 2.667 and the tie (0,0) = (0,2) = 1.333 goes to the earlier token (0,0)
    assert st["kl_cov_frac"].bool().tolist() == [[True, False, False], [False, False, True]]
    A, r = torch.tensor(COV_ADV), delta.exp()
    pen = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert torch.allclose(loss, -A * r + 0.5 * pen * delta.abs(), atol=ATOL)
    # d/dlog pi: -A r, plus beta sign(log r) on the penalised tokens; no clipping anywhere
    assert torch.allclose(grad, -A * r + 0.5 * pen * delta.sign(), atol=ATOL)


def test_kl_cov_empty_mask_is_zero():
    batch = make_batch(COV_ADV, COV_OLD, lengths=[0, 0])
    loss, st = KLCovLoss()(torch.tensor(COV_OLD), batch, batch.entropy)
    assert st["kl_cov_frac"].sum() == 0 and torch.all(loss == 0)
    loss, st = ClipCovLoss()(torch.tensor(COV_OLD), batch, batch.entropy)
    assert st["cov_clipped_frac"].sum() == 0 and torch.all(loss == 0)


# --------------------------------------------------------------------------------------------
# BAPO


def test_bapo_bound_search_by_hand():
    # P(c_high) = 2 min(1.5, c_high); N(c_low) = max(0.5, c_low) + max(1.0, c_low) = c_low + 1
    r = torch.tensor([[1.5, 0.5, 1.0]])
    batch = make_batch([[2.0, -1.0, -1.0]], torch.zeros(1, 3))
    fn = BAPOLoss(target=1.6, scope="micro")
    loss, _, st = per_token_grad(fn, r.log(), batch)
    # start 2.4/1.6 = 1.5 < 1.6; c_low -> 0.8 makes it 2.4/1.8; c_high stops at the first value with
    # 2 c_high / 1.8 >= 1.6, i.e. 1.45
    assert st["c_low"].item() == pytest.approx(0.8) and st["c_high"].item() == pytest.approx(1.45)
    assert st["ratio_pn"].item() == pytest.approx(2 * 1.45 / 1.8, rel=1e-6)
    # dual-clip PPO with clamp(r, 0.8, 1.45): -2*1.45, max(-(-1)*0.5, 0.8) = 0.8, 1.0
    assert torch.allclose(loss, torch.tensor([[-2.9, 0.8, 1.0]]), atol=ATOL)


def test_bapo_unreachable_target_goes_to_maxima_and_no_negatives_is_inf():
    r = torch.tensor([[1.5, 0.5, 1.0]])
    st = BAPOLoss(target=5.0, scope="micro")(
        r.log(), make_batch([[2.0, -1.0, -1.0]], torch.zeros(1, 3)), None
    )[1]
    assert (st["c_low"].item(), st["c_high"].item()) == (pytest.approx(0.8), pytest.approx(2.0))
    assert st["ratio_pn"].item() == pytest.approx(3.0 / 1.8, rel=1e-6)
    st = BAPOLoss(scope="micro")(r.log(), make_batch([[1.0, 0.0, 0.0]], torch.zeros(1, 3)), None)[1]
    assert math.isinf(st["ratio_pn"].item())
    assert (st["c_low"].item(), st["c_high"].item()) == (pytest.approx(0.6), pytest.approx(1.2))


def test_bapo_minibatch_scope_uses_old_policy_ratio():
    # in prepare r = 1, so P/N = sum A+ / sum |A-| = 2 / 2 = 1 < 1.6 -> both bounds go to the maxima
    batch = make_batch([[2.0, -1.0, -1.0]], torch.zeros(1, 3))
    fn = BAPOLoss(target=1.6)
    fn.prepare(batch)
    st = fn(torch.tensor([[1.5, 0.5, 1.0]]).log(), batch, None)[1]
    assert (st["c_low"].item(), st["c_high"].item(), st["ratio_pn"].item()) == (
        pytest.approx(0.8),
        pytest.approx(2.0),
        pytest.approx(1.0),
    )


# --------------------------------------------------------------------------------------------
# ERC


@pytest.mark.parametrize("base", ["ppo", "gppo"])
def test_erc_detaches_out_of_band_tokens_but_keeps_value(base):
    r = torch.tensor([[1.1, 1.1, 1.1, 0.5]])
    batch = make_batch([[1.0, 1.0, 1.0, -1.0]], torch.zeros(1, 4), entropy=[[1.0, 1.0, 1.0, 1.0]])
    h_cur = torch.tensor([[1.0, 1.5, 0.5, 1.0]])  # ratios 1.0 (kept), 1.5 and 0.5 (detached), 1.0
    loss, grad, st = per_token_grad(ERCLoss(base=base), r.log(), batch, h_cur)
    # A < 0, r = 0.5: the PPO clip value and the GPPO (beta1 = 1) value are both 0.8
    assert torch.allclose(loss, torch.tensor([[-1.1, -1.1, -1.1, 0.8]]), atol=ATOL)
    last_grad = 0.0 if base == "ppo" else 0.8  # GPPO keeps (1 - eps) |A| on the clipped token
    assert torch.allclose(grad, torch.tensor([[-1.1, 0.0, 0.0, last_grad]]), atol=ATOL)
    assert st["erc_detached_frac"][0].tolist() == [0, 1, 1, 0]


# --------------------------------------------------------------------------------------------
# GSPO


def test_gspo_sequence_ratio_and_straight_through_gradient():
    delta = torch.tensor([[0.3, 0.0, -0.6, 9.0]])  # last token is padding: it must not enter s_i
    batch = make_batch([[2.0, 2.0, 2.0, 2.0]], torch.zeros(1, 4), lengths=[3])
    s = math.exp((0.3 + 0.0 - 0.6) / 3)
    loss, grad, st = per_token_grad(GSPOLoss(eps_low=1.0, eps_high=1.0), delta, batch)
    assert torch.allclose(loss[0, :3], torch.full((3,), -2.0 * s), atol=ATOL)
    assert torch.allclose(grad[0, :3], torch.full((3,), -2.0 * s), atol=ATOL)  # s_i * grad log pi, times -A
    assert GSPOLoss.agg_override == "seq-mean-token-mean"
    # with the paper's tiny range the (s < 1) A > 0 sequence is inside, an s > 1 one is clipped
    up = torch.tensor([[0.3, 0.3, 0.3, 0.0]])
    loss, grad, st = per_token_grad(GSPOLoss(), up, batch)
    assert torch.allclose(loss[0, :3], torch.full((3,), -2.0 * (1 + 4e-4)), atol=ATOL)
    assert torch.all(grad[0, :3] == 0) and torch.all(st["clip_frac"][0, :3] == 1)


# --------------------------------------------------------------------------------------------
# CISPO


def test_cispo_detached_clipped_weight_times_log_prob():
    r = torch.tensor([[2.0, 10.0, 0.1, 1.0]])
    old = torch.full((1, 4), -1.0)
    batch = make_batch([[1.0, 1.0, 1.0, -2.0]], old)
    cur = old + r.log()
    loss, grad, st = per_token_grad(CISPOLoss(), cur, batch)
    w = torch.tensor([[2.0, 5.0, 0.1, 1.0]])  # clip(r, 0, 5): no lower bound
    A = torch.tensor([[1.0, 1.0, 1.0, -2.0]])
    assert torch.allclose(loss, -w * A * cur, atol=ATOL)
    assert torch.allclose(grad, -w * A, atol=ATOL)  # every token keeps a gradient
    assert st["is_clip_frac"][0].tolist() == [0, 1, 0, 0]
    _, grad, _ = per_token_grad(CISPOLoss(eps_low_is=0.2, eps_high_is=0.28), cur, batch)
    assert torch.allclose(grad, -torch.tensor([[1.28, 1.28, 0.8, 1.0]]) * A, atol=ATOL)


# --------------------------------------------------------------------------------------------
# EntroPIC


def entropic_batch(h: float = 0.5) -> tuple[RolloutBatch, torch.Tensor]:
    old = [[-0.01, -1.0], [-0.01, -0.01]]  # pi > 0.95 at (0,0), (1,0), (1,1)
    return make_batch([[1.0, 1.0], [-2.0, -2.0]], old, entropy=[[h, h], [h, h]]), torch.tensor(old)


@pytest.mark.parametrize("micro", [None, 1])
def test_entropic_loss_by_hand_token_mean(micro):
    batch, cur = entropic_batch(0.5)
    fn = EntroPICLoss(target_entropy=0.1, kp=1.0, ki=0.01)
    total, grad, _ = run(fn, cur, batch, batch.entropy, micro=micro)
    # alpha = 1 * (0.5 - 0.1) = 0.4; PPO token-mean (-1 -1 +2 +2)/4 = 0.5;
    # high-prob term: mean over the 3 confident tokens of -r|A| = -5/3, times alpha
    assert fn.alpha == pytest.approx(0.4) and fn.integral == pytest.approx(0.4)
    assert total.item() == pytest.approx(0.5 + 0.4 * (-5 / 3), abs=1e-5)
    # d/dlog pi: PPO -A r / 4 everywhere, plus alpha (-r|A|) / 3 on the confident tokens
    expected = torch.tensor([[-1 / 4 - 0.4 / 3, -1 / 4], [2 / 4 - 0.4 * 2 / 3, 2 / 4 - 0.4 * 2 / 3]])
    assert torch.allclose(grad, expected, atol=ATOL)


def test_entropic_seq_mean_token_mean_and_controller_sequence():
    batch, cur = entropic_batch(0.5)
    fn = EntroPICLoss()
    total, _, _ = run(fn, cur, batch, batch.entropy, micro=1, mode="seq-mean-token-mean")
    # PPO rows: (-1 -1)/2, (2 + 2)/2 -> 0.5; term rows: -1/1, (-2 -2)/2 -> -1.5, times alpha 0.4
    assert total.item() == pytest.approx(0.5 + 0.4 * -1.5, abs=1e-5)
    # second mini-batch with H = 0.3: alpha = 0.2 + 0.01 * 0.4 (integral before the update)
    batch2, cur2 = entropic_batch(0.3)
    run(fn, cur2, batch2, batch2.entropy)
    assert fn.alpha == pytest.approx(0.2 + 0.004) and fn.integral == pytest.approx(0.6)
    resumed = EntroPICLoss()
    resumed.load_state_dict(fn.state_dict())
    batch3, cur3 = entropic_batch(5.0)  # large error saturates alpha at 1
    for f in (fn, resumed):
        run(f, cur3, batch3, batch3.entropy)
    assert fn.alpha == resumed.alpha == 1.0 and fn.integral == pytest.approx(resumed.integral)


def test_entropic_micro_scope_uses_current_entropy_per_micro_batch():
    batch, cur = entropic_batch(0.5)
    fn = EntroPICLoss(scope="micro")
    ent_cur = torch.tensor([[0.3, 0.3], [0.7, 0.7]])
    run(fn, cur, batch, ent_cur, micro=1)
    # micro 1: e = 0.2, alpha 0.2, I = 0.1; micro 2: e = 0.6, alpha = 0.6 + 0.001, I = 0.1 + 0.3
    assert fn.alpha == pytest.approx(0.601) and fn.integral == pytest.approx(0.4)


def test_entropic_without_confident_tokens_is_ppo():
    old = [[-1.0, -2.0]]
    batch = make_batch([[1.0, -1.0]], old, entropy=[[0.2, 0.2]])
    cur = torch.tensor(old) + 0.1
    total, _, _ = run(EntroPICLoss(), cur, batch, batch.entropy)
    ref, _, _ = run(PPOLoss(), cur, batch, batch.entropy)
    assert total.item() == pytest.approx(ref.item(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# HAPO: log H = [-2, -1, 0, 1, 2]; pivot 0.8 -> index round(3.2) = 3 -> m = 1;
# h = [-3, -2, -1, 0, 1] / sqrt(3) (RMS sqrt(15/5)); h_hat = [-1, -2/3, -1/3, 0, 1] (intended) or
# [1, 2/3, 1/3, 0, 1] (official sign quirk)

HAPO_ENT = [[math.exp(-2), math.exp(-1), 1.0, math.e, math.exp(2)]]


@pytest.mark.parametrize("scope", ["minibatch", "micro"])
def test_hapo_h_hat_and_redistribution_by_hand(scope):
    batch = make_batch([[1.0] * 5], torch.zeros(1, 5), entropy=HAPO_ENT)
    fn = HAPOClipLoss(scope=scope)
    fn.prepare(batch)
    ent_arg = torch.tensor(HAPO_ENT) if scope == "micro" else torch.ones(1, 5)  # micro reads the argument
    loss, grad, st = per_token_grad(fn, torch.zeros(1, 5), batch, ent_arg)
    assert torch.allclose(st["h_hat"], torch.tensor([[-1.0, -2 / 3, -1 / 3, 0.0, 1.0]]), atol=ATOL)
    # r = 1 is inside every neutral zone: low-entropy tokens get A (1 + h_hat), the high one keeps A
    assert torch.allclose(loss, -torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0, 1.0]]), atol=ATOL)
    assert torch.allclose(st["eps_low_eff"], 0.2 * torch.tensor([[2.0, 5 / 3, 4 / 3, 1.0, 1.0]]), atol=ATOL)
    assert torch.allclose(st["eps_high_eff"], torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.4]]), atol=ATOL)


def test_hapo_code_sign_quirk_and_asymmetric_clip():
    batch = make_batch([[1.0] * 5], torch.zeros(1, 5), entropy=HAPO_ENT)
    st = HAPOClipLoss(code_sign_quirk=True)(torch.zeros(1, 5), batch, None)[1]
    assert torch.allclose(st["h_hat"], torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0, 1.0]]), atol=ATOL)
    # A < 0 and r = 0.7 on the lowest-entropy token: PPO (eps 0.2) clips it, HAPO widens eps_low to
    # 0.4; r is outside that token's neutral zone (0.8, 1.1) so it keeps the plain A
    neg = make_batch([[-1.0] * 5], torch.zeros(1, 5), entropy=HAPO_ENT)
    cur = torch.tensor([[math.log(0.7), 0.0, 0.0, 0.0, 0.0]])
    loss, grad, _ = per_token_grad(HAPOClipLoss(), cur, neg)
    assert loss[0, 0].item() == pytest.approx(0.7) and grad[0, 0].item() == pytest.approx(0.7)
    _, ppo_grad, _ = per_token_grad(PPOLoss(), cur, neg)
    assert ppo_grad[0, 0] == 0


def test_hapo_pivot_uses_round_half_even_like_the_official_code():
    # 6 tokens, pivot 0.5: index round(2.5) = 2 (Python), not 3
    ent = [[math.exp(v) for v in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)]]
    batch = make_batch([[1.0] * 6], torch.zeros(1, 6), entropy=ent)
    st = HAPOClipLoss(entropy_pivot=0.5)(torch.zeros(1, 6), batch, None)[1]
    assert st["h_hat"][0, 2].item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# validation, registry smoke test, scope invariance


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (PPOLoss, {"clip_c": 1.0}),
        (ClipCovLoss, {"clip_ratio": 0.0}),
        (ClipCovLoss, {"scope": "global"}),
        (KLCovLoss, {"kl_cov_ratio": 2.0}),
        (CEGPPOLoss, {"beta1": -1.0}),
        (BAPOLoss, {"c_low": 0.9, "c_low_max": 0.8}),
        (ERCLoss, {"beta_low": 1.1}),
        (ERCLoss, {"base": "dapo"}),
        (GSPOLoss, {"eps_low": -1.0}),
        (CISPOLoss, {"eps_low_is": 2.0}),
        (EntroPICLoss, {"high_prob": 1.0}),
        (HAPOClipLoss, {"entropy_pivot": 1.5}),
    ],
)
def test_bad_hyperparameters_name_the_parameter(cls, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(**kwargs)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_runs_with_defaults(name):
    batch, cur, ent_cur = random_batch()
    batch.old_logprobs = torch.where(batch.response_mask > 0, batch.old_logprobs, torch.full_like(cur, -50.0))
    fn = LOSSES.build(name)
    total, grad, stats = run(fn, cur, batch, ent_cur, micro=3)
    per_tok = torch.cat(
        [fn(cur[i : i + 3], mb, ent_cur[i : i + 3])[0] for i, mb in zip(range(0, 8, 3), batch.split(3))]
    )
    assert per_tok.shape == batch.response_mask.shape
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    pad = batch.response_mask == 0
    assert torch.all(per_tok[pad] == 0) and torch.all(grad[pad] == 0)
    for st in stats:
        for v in st.values():
            assert torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all() or name == "bapo"


@pytest.mark.parametrize("name", LOSSES.names())
def test_all_advantages_zero_gives_no_policy_gradient(name):
    batch, cur, ent_cur = random_batch(seed=4)
    batch.advantages = torch.zeros_like(batch.advantages)
    batch.global_advantages = torch.zeros_like(batch.advantages)
    total, grad, _ = run(LOSSES.build(name), cur, batch, ent_cur)
    if name != "kl_cov":
        assert total.item() == 0 and torch.all(grad == 0)
        return
    # KL-Cov: every Cov is 0, so the top-k are the first k valid tokens (ties by position), and their
    # |log r| penalty is all that remains
    valid = batch.response_mask.bool()
    k = max(1, math.floor(2e-3 * int(valid.sum())))
    first = torch.zeros(int(valid.sum()), dtype=torch.bool)
    first[:k] = True
    pen = torch.zeros_like(cur, dtype=torch.bool)
    pen[valid] = first
    delta = cur - batch.old_logprobs
    assert total.item() == pytest.approx(float(delta[pen].abs().sum() / valid.sum()), abs=1e-6)
    assert torch.allclose(grad, pen.float() * delta.sign() / valid.sum())


SCOPED = [
    (ClipCovLoss, {"clip_ratio": 0.2, "cov_low": -5.0, "cov_high": 5.0, "eps_low": 0.2, "eps_high": 0.2}),
    (KLCovLoss, {"kl_cov_ratio": 0.2}),
    (BAPOLoss, {"target": 1.5}),
    (EntroPICLoss, {}),
    (HAPOClipLoss, {}),
    (PPOLoss, {}),
    (CEGPPOLoss, {}),
    (ERCLoss, {}),
    (GSPOLoss, {"eps_low": 0.1, "eps_high": 0.1}),
    (CISPOLoss, {}),
]

STAT_KEYS = {ClipCovLoss: "cov_clipped_frac", KLCovLoss: "kl_cov_frac", HAPOClipLoss: "h_hat"}


@pytest.mark.parametrize(("cls", "kwargs"), SCOPED, ids=[c.__name__ for c, _ in SCOPED])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_minibatch_scope_is_invariant_to_micro_batching(cls, kwargs, mode):
    batch, cur, ent_cur = random_batch(seed=1)
    fn1, fn4 = cls(**kwargs), cls(**kwargs)
    t1, g1, s1 = run(fn1, cur, batch, ent_cur, micro=None, mode=mode)
    t4, g4, s4 = run(fn4, cur, batch, ent_cur, micro=2, mode=mode)
    assert t1.item() == pytest.approx(t4.item(), abs=1e-6)
    assert torch.allclose(g1, g4, atol=1e-7)
    if cls in STAT_KEYS:
        key = STAT_KEYS[cls]
        assert torch.equal(s1[0][key], torch.cat([s[key] for s in s4]))
    assert fn1.state_dict() == fn4.state_dict()


def test_micro_scope_depends_on_the_split():
    batch, cur, ent_cur = random_batch(seed=1)
    kw = {"kl_cov_ratio": 0.2, "scope": "micro"}
    _, g1, _ = run(KLCovLoss(**kw), cur, batch, ent_cur, micro=None)
    _, g4, _ = run(KLCovLoss(**kw), cur, batch, ent_cur, micro=2)
    assert not torch.allclose(g1, g4)


def test_prepared_loss_rejects_a_foreign_micro_batch():
    batch, cur, ent_cur = random_batch(seed=1)
    other, _, _ = random_batch(seed=2)
    fn = KLCovLoss()
    fn.prepare(batch)
    with pytest.raises(ValueError, match="prepare"):
        fn(cur, other, ent_cur)


# --------------------------------------------------------------------------------------------
# 1 vs 2 ranks (gloo, CPU)

DIST_CASES = SCOPED[:5]


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch, cur, ent_cur = random_batch(seed=1)
        half = batch.size // world
        rows = list(range(rank * half, (rank + 1) * half))
        local = batch.index(rows)
        grads = []
        for cls, kwargs in DIST_CASES:
            fn = cls(**kwargs)
            lp = cur[rows].clone().requires_grad_(True)
            fn.prepare(local)
            norm = make_agg_norm([local], "token-mean", const=float(batch.response_ids.shape[1]), reduce=True)
            total, start = 0.0, 0
            for mb in local.split(2):
                mb.agg_norm = norm
                sl = slice(start, start + mb.size)
                total = total + mb.agg(fn(lp[sl], mb, ent_cur[rows][sl])[0])
                start += mb.size
            total.backward()
            full = torch.zeros_like(cur)
            full[rows] = lp.grad
            dist.all_reduce(full)  # DDP averages over ranks; agg already scaled by the world size
            grads.append(full / world)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank(tmp_path):
    out = str(tmp_path / "grads.pt")
    run_two_ranks(_dist_worker, out)
    grads = torch.load(out)
    batch, cur, ent_cur = random_batch(seed=1)
    for (cls, kwargs), g2 in zip(DIST_CASES, grads):
        _, g1, _ = run(cls(**kwargs), cur, batch, ent_cur, micro=4)
        assert torch.allclose(g1, g2, atol=1e-5), cls.__name__


# --------------------------------------------------------------------------------------------
# issue 11: log-ratio clamp only where the official code clamps; float64 statistics stay float64


def _one_far_token(adv: float = 0.0) -> tuple[RolloutBatch, torch.Tensor]:
    """Eight tokens; the first has log r = 25 and the largest covariance (A and log pi both extreme)."""
    advs = [[adv] + [0.0] * 7]
    batch = make_batch(advs, torch.full((1, 8), -30.0))
    cur = torch.full((1, 8), -30.0)
    cur[0, 0] = -5.0  # log r = 25
    return batch, cur


def test_kl_cov_does_not_clamp_the_log_ratio_like_the_code():
    # A = 0 everywhere except the first token (tiny, so Cov picks it): the loss is |log r| = 25 on it,
    # token-mean over 8 tokens 25/8 = 3.125 (the code); a +-20 clamp gave 20/8 = 2.5
    batch, cur = _one_far_token(adv=1e-12)
    fn = KLCovLoss(kl_cov_ratio=1 / 8, scope="micro")
    total, _, _ = run(fn, cur, batch, batch.entropy)
    assert total.item() == pytest.approx(25 / 8 - 1e-12 * math.exp(25) / 8, rel=1e-5)
    assert total.item() == pytest.approx(3.125 - 0.0090, abs=1e-3)
    clamped, _, _ = run(
        KLCovLoss(kl_cov_ratio=1 / 8, scope="micro", log_ratio_clamp=20.0), cur, batch, batch.entropy
    )
    assert clamped.item() == pytest.approx(20 / 8 - 1e-12 * math.exp(20) / 8, rel=1e-5)


@pytest.mark.parametrize(
    ("cls", "kwargs", "clamps"),
    [
        (PPOLoss, {"clip_c": None, "eps_high": 1e12}, True),
        (BAPOLoss, {"c_high": 1e12, "c_high_max": 1e12}, True),
        (ClipCovLoss, {"eps_high": 1e12}, False),
        (CEGPPOLoss, {"eps_high": 1e12}, False),
        (HAPOClipLoss, {"eps_high": 1e12, "adaptive_clip": False, "adaptive_advantage": False}, False),
    ],
)
def test_log_ratio_clamp_only_where_the_official_code_clamps(cls, kwargs, clamps):
    # A = 1 on the far token with the upper clip out of the way: the loss value is -r = -exp(log r)
    batch, cur = _one_far_token(adv=1.0)
    loss, _, _ = per_token_grad(cls(**kwargs), cur, batch)
    expected = -math.exp(20.0 if clamps else 25.0)
    assert loss[0, 0].item() == pytest.approx(expected, rel=1e-5)
    toggled = cls(**kwargs, log_ratio_clamp=None if clamps else 20.0)
    loss, _, _ = per_token_grad(toggled, cur, batch)
    assert loss[0, 0].item() == pytest.approx(-math.exp(25.0 if clamps else 20.0), rel=1e-5)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        cls(log_ratio_clamp=0.0)


def test_float64_statistics_are_not_downcast():
    from lightning_entropy.components.losses import agg_sums, centred_cov

    d = torch.tensor([[1.0, -1.0, 2.0, -2.0]], dtype=torch.float64) * 1e-9
    batch = make_batch([[0.0] * 4], torch.zeros(1, 4))
    batch.advantages = 1.0 + d  # float32 would see four equal advantages: Cov = 0
    valid = batch.response_mask.bool()
    cov = centred_cov(batch, -2.0 + d, valid, pooled=False)
    assert cov.dtype == torch.float64
    assert torch.allclose(cov, d * d, rtol=1e-6, atol=0)
    sums = agg_sums(0.1 + d, batch.response_mask, pooled=False)
    assert sums[0] == pytest.approx(0.4, abs=1e-15)  # float32 gives 0.4000000059604645


def test_hapo_h_hat_and_adaptive_eps_keep_float64():
    # entropies e^(k 1e-9): float32 rounds them all to 1 (h_hat 0); float64 resolves them
    ent = torch.exp(torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]], dtype=torch.float64) * 1e-9)
    batch = make_batch([[1.0] * 5], torch.zeros(1, 5))
    batch.entropy = ent
    st = HAPOClipLoss(entropy_pivot=0.5)(torch.zeros(1, 5, dtype=torch.float64), batch, None)[1]
    assert st["h_hat"].dtype == torch.float64
    assert torch.allclose(
        st["h_hat"], torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]], dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(st["eps_low_eff"][0, :2], torch.tensor([0.4, 0.3], dtype=torch.float64), atol=1e-7)


def test_bapo_pn_sums_keep_float64():
    # P = 1, N = 1 + 1e-12: P/N < 1 in float64 (search to the maxima); float32 sees P/N = 1 (no search)
    adv = torch.tensor([[1.0, -(1.0 + 1e-12)]], dtype=torch.float64)
    batch = make_batch([[0.0, 0.0]], torch.zeros(1, 2))
    batch.advantages = adv
    fn = BAPOLoss(eps=1e-300, scope="micro")
    _, st = fn(torch.zeros(1, 2, dtype=torch.float64), batch, batch.entropy)
    assert st["c_low"].item() == pytest.approx(0.8) and st["c_high"].item() == pytest.approx(2.0)


def test_entropic_controller_entropy_keeps_float64():
    batch = make_batch([[1.0, -1.0]], torch.zeros(1, 2))
    batch.entropy = torch.full((1, 2), 0.1 + 1e-9, dtype=torch.float64)
    fn = EntroPICLoss(target_entropy=0.1, kp=1.0, ki=0.0)
    fn.prepare(batch)
    fn(torch.zeros(1, 2, dtype=torch.float64), batch, batch.entropy)
    assert fn.alpha == pytest.approx(1e-9, rel=1e-6)  # float32 entropy gives 1.49e-9


# ---- rollout/training mismatch and its correction ---------------------------------------------


def _mismatch_case():
    """Four response tokens and one pad; pi_train / pi_rollout = 1.5, 3, 1/3, 0.6 (and 9 on the pad)."""
    train = torch.log(torch.tensor([[0.6, 0.9, 0.1, 0.3, 0.9]]))
    rollout = torch.log(torch.tensor([[0.4, 0.3, 0.3, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return train, rollout, mask


def test_rollout_mismatch_by_hand():
    from lightning_entropy.components.losses import rollout_mismatch

    m = rollout_mismatch(*_mismatch_case())
    w = torch.tensor([1.5, 3.0, 1 / 3, 0.6])
    k3 = w - 1 - torch.log(w)  # 0.094535, 0.901388, 0.431946, 0.110826
    assert torch.allclose(m["k3"][0, :4], k3, atol=1e-5)
    assert torch.allclose(m["abs_diff"][0, :4], torch.log(w).abs(), atol=1e-6)
    assert m["far"][0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # outside [1/2, 2]; the pad never counts
    assert m["k3"][0, 4] == 0 and m["abs_diff"][0, 4] == 0


def test_rollout_correction_weights_by_hand():
    from lightning_entropy.components.losses import rollout_correction_weights

    train, rollout, mask = _mismatch_case()
    tis = rollout_correction_weights(train, rollout, mask, "tis", 2.0)
    assert torch.allclose(tis, torch.tensor([[1.5, 2.0, 1 / 3, 0.6, 0.0]]), atol=1e-6)  # min(w, 2)
    mis = rollout_correction_weights(train, rollout, mask, "mis", 2.0)
    assert mis.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]  # kept iff 1/2 <= w <= 2
    mis4 = rollout_correction_weights(train, rollout, mask, "mis", 4.0)
    assert mis4.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]  # [1/4, 4] keeps 1/3 and 3
    assert not tis.requires_grad


def test_rollout_correction_edge_cases():
    from lightning_entropy.components.losses import rollout_correction_weights, rollout_mismatch

    lp = torch.log(torch.tensor([[0.2, 0.7, 0.9]]))
    mask = torch.ones(1, 3)
    # identical engines: every weight 1, no mismatch
    assert torch.allclose(rollout_correction_weights(lp, lp, mask, "tis", 2.0), torch.ones(1, 3))
    # w = C = 1 is kept
    assert rollout_correction_weights(lp, lp, mask, "mis", 1.0).tolist() == [[1.0, 1.0, 1.0]]
    assert rollout_mismatch(lp, lp, mask)["k3"].abs().max() == 0
    # an empty mask: all zeros, no NaN
    empty = torch.zeros(1, 3)
    for mode in ("tis", "mis"):
        assert rollout_correction_weights(lp, lp - 50, empty, mode, 2.0).tolist() == [[0.0, 0.0, 0.0]]
    # a token the engine gave almost no probability: the weight stays finite (log-ratio clamped at 20)
    far = rollout_correction_weights(lp, lp - 100, mask, "tis", 1e12)
    assert torch.isfinite(far).all() and torch.allclose(far, torch.full((1, 3), math.exp(20)), rtol=1e-5)
    with pytest.raises(ValueError, match="not one of tis, mis"):
        rollout_correction_weights(lp, lp, mask, "none", 2.0)


# --------------------------------------------------------------------------------------------
# COPO (arXiv 2508.04138): w L_ppo(A_loc) + (1 - w) L_ppo(A_glob)


def test_copo_blend_by_hand_and_gradient():
    # r = 1.5 everywhere (old log p = 0, current log 1.5), eps 0.2, clip_c 3.
    # A_loc = 1: max(-1.5, -1.2) = -1.2, clipped (no gradient). A_glob = -0.5: max(0.75, 0.6) = 0.75,
    # below the dual bound 1.5, gradient -A r = 0.75. w = 0.25: L = 0.25 (-1.2) + 0.75 (0.75) = 0.2625,
    # dL/dlog pi = 0.75 * 0.75 = 0.5625. Row 1 (w = 1) is plain PPO: A_loc = -2 -> 3.0, gradient 3.0.
    batch = make_batch([[1.0, 1.0], [-2.0, -2.0]], [[0.0, 0.0], [0.0, 0.0]], lengths=[2, 1])
    batch.global_advantages = torch.tensor([[-0.5, -0.5], [7.0, 0.0]])
    batch.blend_weights = torch.tensor([0.25, 1.0])
    cur = torch.full((2, 2), math.log(1.5))
    loss, grad, stats = per_token_grad(COPOLoss(), cur, batch)
    assert torch.allclose(loss[0], torch.tensor([0.2625, 0.2625]), atol=1e-6)
    assert torch.allclose(grad[0], torch.tensor([0.5625, 0.5625]), atol=1e-6)
    assert loss[1, 0].item() == pytest.approx(3.0) and grad[1, 0].item() == pytest.approx(3.0)
    ppo, _, _ = per_token_grad(PPOLoss(), cur, batch)
    assert torch.equal(loss[1], ppo[1])
    # global_coef scales the global part only: 0.25 (-1.2) + 0.75 * 2 * 0.75 = 0.825
    loss2, _, _ = per_token_grad(COPOLoss(global_coef=2.0), cur, batch)
    assert loss2[0, 0].item() == pytest.approx(0.825)


def test_copo_loss_without_copo_advantages_says_so():
    batch = make_batch([[1.0]], [[0.0]])
    with pytest.raises(ValueError, match="advantage 'copo'"):
        COPOLoss()(torch.zeros(1, 1), batch, batch.entropy)


# --------------------------------------------------------------------------------------------
# ERA (arXiv 2510.08549): z' = k z / z / k on A > 0 tokens by response entropy, old pass included


def test_era_scaled_logits_on_a_three_token_vocabulary_by_hand():
    # p = (1/2, 1/4, 1/4). k z: p' ~ (1/4, 1/16, 1/16) = (2/3, 1/6, 1/6); z / k: p' ~ (sqrt(1/2), 1/2, 1/2)
    z = torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(1, 3, 3).contiguous()
    tgt = torch.zeros(1, 3, dtype=torch.long)
    lp, h = logprobs_and_entropy(z, tgt, temperature=1 / torch.tensor([[2.0, 0.5, 1.0]]))
    sharp = [2 / 3, 1 / 6, 1 / 6]
    flat = [x / (math.sqrt(0.5) + 1.0) for x in (math.sqrt(0.5), 0.5, 0.5)]
    ent = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    assert lp[0].tolist() == pytest.approx([math.log(2 / 3), math.log(flat[0]), math.log(0.5)], abs=1e-6)
    assert h[0].tolist() == pytest.approx([ent(sharp), ent(flat), 1.5 * math.log(2)], abs=1e-6)


def test_era_response_entropy_is_the_mean_of_the_top_fifth():
    ent = torch.tensor(
        [[3.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 2.0], [1.0, 0.2, 0.5, 9.0] + [9.0] * 6, [9.0] * 10]
    )
    mask = (torch.arange(10)[None] < torch.tensor([[10], [3], [0]])).long()
    # L = 10: k = 2 -> (3 + 2)/2; L = 3: k = max(1, floor(0.6)) = 1 -> 1.0; empty row -> 0
    assert top_fraction_mean(ent, mask, 0.2).tolist() == [2.5, 1.0, 0.0]


def era_batch() -> RolloutBatch:
    # row 0: H_resp 0.2 < 0.45 (sharpen), row 1: H_resp 4 > 3 (flatten), row 2: 1.0 (unchanged)
    adv = [[1.0, -1.0], [2.0, 2.0], [1.0, 1.0]]
    batch = make_batch(
        adv, [[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]], entropy=[[0.2, 0.1], [4.0, 1.0], [1.0, 0.5]]
    )
    batch.scaled_old_logprobs = torch.stack([batch.old_logprobs - 0.5, batch.old_logprobs - 0.25], -1)
    return batch


def test_era_prepare_rollout_picks_the_scale_and_old_log_probs_by_hand():
    batch = era_batch()
    loss = ERALoss()
    assert loss.logit_scales == (2.0, 0.5)  # the old pass computes log pi_old at k z and z / k
    loss.prepare_rollout(batch)
    # two tokens per row: k = max(1, floor(0.4)) = 1, H_resp = the row's largest entropy (0.2, 4, 1);
    # only A > 0 tokens are transformed
    assert batch.logit_scale.tolist() == [[2.0, 1.0], [0.5, 0.5], [1.0, 1.0]]
    assert batch.old_logprobs.tolist() == [[-1.5, -1.0], [-2.25, -2.25], [-3.0, -3.0]]
    # ratio 1 (current = old under the transform): the loss is -A, the gradient -A per token
    loss_t, grad, stats = per_token_grad(loss, batch.old_logprobs.clone(), batch)
    assert loss_t.tolist() == [[-1.0, 1.0], [-2.0, -2.0], [-1.0, -1.0]]
    assert grad.tolist() == [[-1.0, 1.0], [-2.0, -2.0], [-1.0, -1.0]]
    # adv_scale: A' = A / k when sharpened, k A when flattened
    scaled = ERALoss(adv_scale=True)
    b2 = era_batch()
    scaled.prepare_rollout(b2)
    assert per_token_grad(scaled, b2.old_logprobs.clone(), b2)[0].tolist() == [
        [-0.5, 1.0],
        [-4.0, -4.0],
        [-1.0, -1.0],
    ]
    # dual-clip with eps 1 / 1 and c = 10: r = e^3 > 2 on an A < 0 token -> -A r = 20.1 capped at 10
    b3 = era_batch()
    ERALoss().prepare_rollout(b3)
    cur = b3.old_logprobs.clone()
    cur[0, 1] += 3.0
    assert per_token_grad(ERALoss(), cur, b3)[0][0, 1].item() == pytest.approx(10.0)


def test_topk_log_probs_by_hand():
    # logits (3, 2, 1, 0), k = 2: the top-2 set {0, 1}, log p = z - log(e^3 + e^2); outside: -1e4
    z = torch.tensor([[[3.0, 2.0, 1.0, 0.0]] * 3]).requires_grad_()
    tgt = torch.tensor([[0, 1, 2]])
    lse = math.log(math.exp(3) + math.exp(2))
    lp = topk_logprobs(z, tgt, 2)
    assert lp[0].tolist() == pytest.approx([3 - lse, 2 - lse, -1e4], abs=1e-6)
    # per-token temperature 0.5 (ERA's k z with k = 2): z / 0.5 over the same top-2 set
    lp2 = topk_logprobs(z, tgt, 2, temperature=torch.full((1, 3), 0.5))
    lse2 = math.log(math.exp(6) + math.exp(4))
    assert lp2[0, :2].tolist() == pytest.approx([6 - lse2, 4 - lse2], abs=1e-6)
    # the gradient of a top-k log-prob: onehot - softmax over the top-k only; none outside
    lp.sum().backward()
    p0, p1 = math.exp(3 - lse), math.exp(2 - lse)
    assert z.grad[0, 0].tolist() == pytest.approx([1 - p0, -p1, 0, 0], abs=1e-6)
    assert z.grad[0, 2].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_era_topk_option_is_a_policy_view():
    assert ERALoss().policy_view() is None  # off by default: ablated apart from ERA itself
    assert ERALoss(topk=20).policy_view().topk == 20
    with pytest.raises(ValueError, match="topk"):
        ERALoss(topk=0)


def test_era_needs_its_rollout_preparation():
    batch = era_batch()
    with pytest.raises(ValueError, match="prepare_rollout"):
        ERALoss()(batch.old_logprobs, batch, batch.entropy)
    batch.scaled_old_logprobs = None
    with pytest.raises(ValueError, match="scaled_old_logprobs"):
        ERALoss().prepare_rollout(batch)


# --------------------------------------------------------------------------------------------
# BuPO (arXiv 2512.19673): layer k's internal policy for the first S_iter steps, then the full one


def test_bupo_trains_the_layer_policy_for_s_iter_steps_then_the_full_model():
    loss = BuPOLoss(layer=1, bottom_up_steps=2)
    views = []
    for _ in range(3):
        views.append(loss.policy_view())
        loss.end_step({})
    assert [v is not None for v in views] == [True, True, False]
    assert views[0].layer == 1 and views[0].final_norm is False  # the official training path: no norm
    assert BuPOLoss(final_norm=True).policy_view().final_norm
    assert BuPOLoss(bottom_up_steps=0).policy_view() is None  # plain GRPO from the start
    resumed = BuPOLoss(layer=1, bottom_up_steps=2)
    resumed.load_state_dict(loss.state_dict())
    assert resumed.steps == 3 and resumed.policy_view() is None
    # the surrogate is dual-clip PPO (eps 0.2/0.2, c = 10), whichever policy gave the log-probs
    batch, cur, ent = random_batch(seed=2)
    got, grad, _ = per_token_grad(BuPOLoss(), cur, batch)
    want, grad0, _ = per_token_grad(PPOLoss(clip_c=10.0), cur, batch)
    assert torch.equal(got, want) and torch.equal(grad, grad0)
