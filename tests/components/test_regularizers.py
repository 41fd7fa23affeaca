import math

import pytest
import torch

from lightning_entropy.batch import RolloutBatch, make_agg_norm
from lightning_entropy.components.regularizers import (
    AEPO,
    EMFT,
    EPO,
    SIREN,
    AdaptiveEntropy,
    AEnt,
    LpReg,
    StepMean,
    clamped_entropy,
    epo_phase_weight,
    first_rows,
    min_p_logprob,
    top_p_entropy,
)
from lightning_entropy.registry import REGULARIZERS

LENGTHS = [5, 3, 1, 4, 0, 5]  # an empty response (row 4) and truncated ones (length T)


def make_batch(B=6, T=5, V=7, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor((lengths or LENGTHS)[:B])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask
    return RolloutBatch(
        prompt_ids=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.randint(1, V, (B, T), generator=g) * mask,
        response_mask=mask,
        group_ids=torch.arange(B) // 2,
        truncated=lengths == T,
        rewards=torch.rand(B, generator=g),
        old_logprobs=-torch.rand(B, T, generator=g) * 3 * mask,
        entropy=torch.rand(B, T, generator=g) * mask,
        advantages=adv.contiguous(),
        token_weights=mask.float(),
        info=[{"prompt": f"p{i // 2}", "completion": str(i)} for i in range(B)],
    )


def ref_entropy(z):
    """Shannon entropy of softmax(z) over the last axis, written out."""
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    return -(logp.exp() * logp).sum(-1)


def token_mean(values, mask):
    mask = mask.float()
    return (values * mask).sum() / mask.sum()


def fake_resample(rewards_per_prompt, group_size, calls):
    """A resample(rows, temperature) stub: group_size responses per row with the given rewards."""

    def resample(rows, temperature):
        calls.append((list(rows), temperature))
        n = len(rows) * group_size
        out = make_batch(B=n, T=5, lengths=[5] * n, seed=len(calls))
        out.group_ids = torch.tensor(rows).repeat_interleave(group_size)
        out.rewards = torch.tensor([r for _ in rows for r in rewards_per_prompt], dtype=torch.float32)
        out.info = [{"prompt": "re", "completion": f"s{i}", "src": i} for i in range(n)]
        out.old_logprobs = out.entropy = out.advantages = out.token_weights = None
        return out

    return resample


# ---- registry-driven ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_runs_with_defaults_and_round_trips_state(name):
    reg = REGULARIZERS.build(name, {})
    batch = make_batch()
    batch.old_logprobs = batch.entropy = batch.advantages = batch.token_weights = None
    batch = reg.modify_rollout(batch, fake_resample([1.0, 0.0], 2, []))
    full = make_batch(B=batch.size)
    for field in ("old_logprobs", "entropy", "advantages", "token_weights"):
        setattr(batch, field, getattr(full, field))
    for step in range(3):
        reg.prepare(batch)
        logits = torch.randn(batch.size, 5, 7, requires_grad=True)
        logprobs = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        entropy = ref_entropy(logits)
        entropy = entropy if reg.needs_entropy_grad else entropy.detach()
        loss, stats = reg(logits if reg.needs_logits else None, logprobs, entropy, batch, step)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert isinstance(stats, dict)
        if loss.requires_grad:
            loss.backward()
            assert torch.isfinite(logits.grad).all()
        reg.end_step({"train/entropy": 0.5})
    state = reg.state_dict()
    fresh = REGULARIZERS.build(name, {})
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("adaptive_entropy", {"coef": 2.0}),
        ("adaptive_entropy", {"delta": -1.0}),
        ("aent", {"clamp_p": 1.0}),
        ("aent", {"entropy_low": 0.5, "entropy_high": 0.1}),
        ("siren", {"top_p": 0.0}),
        ("siren", {"mask_ratio": 0.8, "mask_ratio_upper": 0.5}),
        ("lp_reg", {"scope": "batch"}),
        ("lp_reg", {"min_p": 0.0}),
        ("aepo", {"prompt_fraction": 0.0}),
        ("epo", {"mode": "turn"}),
        ("epo", {"low_ratio": 1.5}),
        ("em_ft", {"rescale_temperature": 0.0}),
    ],
)
def test_bad_hyperparameters_fail_naming_the_parameter(name, kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0].split("_")[0]):
        REGULARIZERS.get(name)(**kwargs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("entropy_bonus", {}),
        ("adaptive_entropy", {"coef": 0.3}),
        ("aent", {}),
        ("em_ft", {}),
        ("em_ft", {"rescale_temperature": 0.5}),
        ("epo", {"start_step": 0}),
        ("lp_reg", {"neg_fraction": 0.4}),
    ],
)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_linear_regularizers_are_invariant_to_micro_batching(name, kwargs, mode):
    batch = make_batch(B=6, T=5, V=7, lengths=[5, 4, 3, 5, 2, 5])
    logits = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def run(splits):
        logprobs = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        entropy = ref_entropy(logits)
        reg = REGULARIZERS.build(name, kwargs)
        if name == "adaptive_entropy":
            reg.last_entropy = 0.0  # gate open
        if name == "epo":
            reg.history = [0.6]
        batch.agg_norm = None
        norm = make_agg_norm([batch], mode, const=5.0)
        reg.prepare(batch)
        total = 0
        for rows in splits:
            micro = batch.index(rows)
            micro.agg_norm = norm
            idx = torch.tensor(rows)
            loss, _ = reg(logits[idx], logprobs[idx], entropy[idx], micro, 0)
            total = total + loss
        return total, torch.autograd.grad(total, logits)[0]

    whole, g_whole = run([list(range(6))])
    split, g_split = run([[0, 1], [2, 3, 4], [5]])
    assert whole.abs() > 0
    assert torch.allclose(whole, split, atol=1e-7)
    assert torch.allclose(g_whole, g_split, atol=1e-7)


def test_step_mean_pools_token_weighted_over_calls():
    m = StepMean()
    m.add(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    m.add(torch.tensor([[4.0, float("nan")]]), torch.tensor([[1.0, 0.0]]))
    assert m.pop() == pytest.approx((1 + 2 + 4) / 3)
    assert m.pop() is None  # reset, nothing measured


# ---- adaptive_entropy (Skywork-OR1 / TRL) -------------------------------------------------------


def test_adaptive_entropy_gate_and_coefficient_steps():
    batch = make_batch()
    mask = batch.response_mask
    reg = AdaptiveEntropy(coef=0.1, target=0.5, delta=0.05, coef_max=0.18)
    low = torch.full((6, 5), 0.3, requires_grad=True)
    loss, _ = reg(None, low, low, batch, 0)
    assert loss.item() == 0.0  # gate closed before the first measurement
    reg.end_step({})
    assert reg.coef == pytest.approx(0.15) and reg.last_entropy == pytest.approx(0.3)
    loss, stats = reg(None, low, low, batch, 1)
    assert loss.item() == pytest.approx(-0.15 * 0.3)
    (g,) = torch.autograd.grad(loss, low)
    assert torch.allclose(g, -0.15 * mask / mask.sum())
    assert stats["applied_coef"] == pytest.approx(0.15)
    reg.end_step({})
    assert reg.coef == pytest.approx(0.18)  # 0.20 clipped to coef_max
    high = torch.full((6, 5), 0.9)
    reg(None, high, high, batch, 2)
    reg.end_step({})
    assert reg.coef == pytest.approx(0.13) and reg.applied() == 0.0  # entropy above target: gate shut


def test_adaptive_entropy_resume_continues_exactly():
    batch = make_batch()
    seq = [0.1, 0.7, 0.2, 0.2, 0.9, 0.1]
    a = AdaptiveEntropy(coef=0.0, target=0.4, delta=0.01)
    b = None
    for i, h in enumerate(seq):
        e = torch.full((6, 5), h)
        a(None, e, e, batch, i)
        a.end_step({})
        if i == 2:
            b = AdaptiveEntropy(coef=0.0, target=0.4, delta=0.01)
            b.load_state_dict(a.state_dict())
        elif b is not None:
            b(None, e, e, batch, i)
            b.end_step({})
    assert b.state_dict() == a.state_dict()
    assert a.coef == pytest.approx(0.01 - 0.01 + 0.01 + 0.01 - 0.01 + 0.01)


# ---- AEnt ---------------------------------------------------------------------------------------


def test_clamped_entropy_drops_lowest_logits_and_renormalises():
    z = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 0.0, 1.0, 2.0]]], requires_grad=True)
    h = clamped_entropy(z, 0.4)  # floor(0.4 * 5) = 2 dropped
    p = torch.tensor([math.e**2, math.e**3, math.e**4])
    p = p / p.sum()
    expected = -(p * p.log()).sum()
    assert torch.allclose(h, expected.expand(1, 2), atol=1e-6)
    h.sum().backward()
    dropped = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]], dtype=torch.bool)
    assert (z.grad[dropped] == 0).all() and (z.grad[~dropped] != 0).all()


def test_clamped_entropy_edge_cases():
    z = torch.tensor([[[1.0, 1.0, 1.0, 5.0, 6.0]]], requires_grad=True)
    # ties at the cut: exactly floor(0.2 * 5) = 1 of them goes (the first), {1, 1, 5, 6} remain
    p = torch.softmax(torch.tensor([1.0, 1.0, 5.0, 6.0]), 0)
    h = clamped_entropy(z, 0.2)
    assert h.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    h.backward()
    assert z.grad[0, 0, 0] == 0 and (z.grad[0, 0, 1:] != 0).all()
    uniform = torch.zeros(2, 3, 8)  # all tied: 6 of 8 go, entropy log 2
    assert torch.allclose(clamped_entropy(uniform, 0.75), torch.full((2, 3), math.log(2)))
    assert clamped_entropy(z, 0.0).item() == pytest.approx(ref_entropy(z).item(), abs=1e-6)
    assert clamped_entropy(z, 0.1).item() == pytest.approx(ref_entropy(z).item(), abs=1e-6)  # floor(0.5) = 0


def test_aent_loss_and_adaptive_coefficient():
    batch = make_batch(B=2, T=3, lengths=[3, 2])
    z = torch.zeros(2, 3, 4)  # uniform: clamped entropy with p = 0.5 is log 2 everywhere
    reg = AEnt(
        coef=0.1,
        clamp_p=0.5,
        entropy_low=0.8,
        entropy_high=1.0,
        coef_lr=1.0,
        coef_min=0.0,
        coef_max=1.0,
        warmup_steps=2,
    )
    loss, stats = reg(z, None, None, batch, 0)
    assert loss.item() == pytest.approx(-0.1 * math.log(2), abs=1e-6)
    for step in range(3):  # warm-up: AReaL updates only when global_step (from 0) > 2
        reg(z, None, None, batch, step)
        reg.end_step({})
        assert reg.coef == 0.1
    reg(z, None, None, batch, 3)
    reg.end_step({})
    assert reg.coef == pytest.approx(0.1 - (math.log(2) - 0.8), abs=1e-6)  # below the band: coef rises
    z_warm = torch.zeros(2, 3, 6)  # clamped entropy log 3 > 1.0: coef falls
    reg(z_warm, None, None, batch, 2)
    reg.end_step({})
    assert reg.coef == pytest.approx(0.1 - (math.log(2) - 0.8) - (math.log(3) - 1.0), abs=1e-6)
    reg.coef = 0.05
    reg(torch.zeros(2, 3, 16), None, None, batch, 3)  # log 8: 0.05 - 1.08 < 0
    reg.end_step({})
    assert reg.coef == 0.0  # clipped to coef_min


def test_aent_first_update_after_step_31_with_the_default_warm_up():
    # AReaL recipe/AEnt: `if adaptive_coeff and global_step > warmup_steps`, global_step from 0
    reg = AEnt(coef_lr=1.0, coef_min=0.0, coef_max=1.0)  # warmup_steps 29
    batch = make_batch(B=2, T=3, lengths=[3, 2])
    z = torch.zeros(2, 3, 10)  # clamped entropy log 7 > 0.23: the coefficient falls once updated
    coefs = []
    for step in range(32):
        reg(z, None, None, batch, step)
        reg.end_step({})
        coefs.append(reg.coef)
    assert coefs[:30] == [2e-4] * 30  # steps 1..30 (global_step 0..29)
    assert coefs[30] == 0.0  # step 31 (global_step 30): 2e-4 - (log 7 - 0.23), clipped to coef_min
    fresh = AEnt()
    fresh.load_state_dict({"coef": 2e-4, "steps": 30})
    fresh(z, None, None, batch, 30)
    fresh.end_step({})
    assert fresh.coef == 1e-5  # resumed at global_step 30: updates (default lr 1e-3 -> the box floor)


def test_aent_pools_entropy_over_micro_batches_and_regularises_toward_initial_coef():
    reg = AEnt(
        coef=0.2,
        clamp_p=0.0,
        entropy_low=0.0,
        entropy_high=10.0,
        coef_lr=0.5,
        coef_reg=2.0,
        coef_min=0.0,
        coef_max=1.0,
        warmup_steps=0,
    )
    reg.coef = 0.6
    one = make_batch(B=1, T=3, lengths=[3])
    two = make_batch(B=1, T=3, lengths=[1])
    reg(torch.zeros(1, 3, 2), None, None, one, 0)  # 3 tokens at log 2
    reg(torch.zeros(1, 3, 4), None, None, two, 0)  # 1 token at log 4
    assert reg._measure.pop() == pytest.approx((3 * math.log(2) + math.log(4)) / 4)
    reg.end_step({})  # nothing measured this step: only the step count advances
    assert reg.coef == 0.6 and reg.steps == 1
    reg(torch.zeros(1, 3, 2), None, None, one, 1)
    reg.end_step({})
    assert reg.coef == pytest.approx(0.6 - 0.5 * 2.0 * (0.6 - 0.2))


# ---- SIREN --------------------------------------------------------------------------------------


def nucleus_entropy(probs, top_p, top_k=None, include_crossing=False):
    """Top-p entropy of one distribution, by the definition in the SIREN code (python loop)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[: top_k or len(probs)]
    kept, cum = [], 0.0
    for i in order:
        before = cum
        cum += probs[i]
        if (before if include_crossing else cum) < top_p:
            kept.append(probs[i])
    s = sum(kept)
    return -sum(p / s * math.log(p / s) for p in kept) if kept else 0.0


def test_top_p_entropy_matches_the_definition_and_edge_cases():
    probs = [[0.5, 0.25, 0.15, 0.1], [0.1, 0.9 * 0.9, 0.9 * 0.05, 0.9 * 0.05], [0.05, 0.1, 0.55, 0.3]]
    z = torch.tensor(probs).log().unsqueeze(0)
    for crossing in (False, True):
        for top_k in (10, 2):
            h = top_p_entropy(z, 0.8, top_k, crossing)[0]
            expected = [nucleus_entropy(p, 0.8, top_k, crossing) for p in probs]
            assert torch.allclose(h, torch.tensor(expected), atol=1e-5)
    two = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert top_p_entropy(z, 0.8, 10)[0, 0].item() == pytest.approx(two, abs=1e-5)
    assert top_p_entropy(z, 0.8, 10)[0, 1].item() == 0.0  # top token 0.81 >= p: empty nucleus


def test_top_p_entropy_gradient_only_through_the_nucleus():
    z = torch.tensor([[[0.5, 0.25, 0.15, 0.1], [0.81, 0.1, 0.045, 0.045]]]).log().requires_grad_(True)
    top_p_entropy(z, 0.8, 3).sum().backward()
    g = z.grad[0]
    assert (g[0, :2] != 0).all() and (g[0, 2:] == 0).all()
    assert (g[1] == 0).all()  # empty nucleus: no gradient anywhere


def test_siren_peak_mask_per_sequence_quantile():
    reg = SIREN(mask_ratio=0.8)
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.3, 0.1, 0.2, 9.0, 9.0], [0.7, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    keep = reg.peak_mask(h, mask)
    # linear interpolation: row 0 q = 0.4 + 0.2 * 0.1 = 0.42; row 1 q = 0.2 + 0.6 * 0.1 = 0.26;
    # a single valid token equals its own quantile, so nothing is kept
    assert keep.tolist() == [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    band = SIREN(mask_ratio=0.25, mask_ratio_upper=0.75).peak_mask(h[:1], mask[:1])
    assert band.tolist() == [[0, 0, 1, 1, 0]]  # (0.2, 0.4]


def siren_h_hat(z, mask, reg):
    """H_hat by hand: nucleus entropies, per-row quantile mask, mean over rows with response tokens
    (a row that keeps no token counts 0, as the official agg_loss)."""
    probs = torch.softmax(z, -1).tolist()
    rows = []
    for b in range(z.shape[0]):
        hs = [nucleus_entropy(probs[b][t], reg.top_p) for t in range(z.shape[1]) if mask[b, t]]
        if not hs:
            continue
        s = sorted(hs)
        pos = reg.lo * (len(s) - 1)
        q = s[int(pos)] + (pos - int(pos)) * (s[min(int(pos) + 1, len(s) - 1)] - s[int(pos)])
        kept = [x for x in hs if x > q]
        rows.append(sum(kept) / len(kept) if kept else 0.0)
    return sum(rows) / len(rows)


def test_siren_anchor_from_first_step_then_squared_penalty():
    batch = make_batch(B=4, T=6, lengths=[6, 5, 1, 6])
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 6, 9, generator=g) * 2
    z1 = torch.randn(4, 6, 9, generator=g) * 2
    reg = SIREN(coef=0.5, top_p=0.9, mask_ratio=0.5)
    mask = batch.response_mask.bool()
    loss, _ = reg(z0, None, None, batch, 0)
    assert loss.item() == 0.0 and reg.anchor is None  # measuring the anchor
    reg.end_step({})
    anchor = siren_h_hat(z0, mask, reg)
    assert reg.anchor == pytest.approx(anchor, abs=1e-5)
    z1.requires_grad_(True)
    loss, stats = reg(z1, None, None, batch, 1)
    assert loss.item() == pytest.approx(0.5 * (siren_h_hat(z1, mask, reg) - anchor) ** 2, abs=1e-6)
    assert stats["anchor"] == reg.anchor
    loss.backward()
    assert z1.grad.abs().sum() > 0
    reg.end_step({})
    assert reg.anchor == pytest.approx(anchor, abs=1e-5)  # fixed after the first step
    fresh = SIREN(coef=0.5, top_p=0.9, mask_ratio=0.5)
    fresh.load_state_dict(reg.state_dict())
    assert fresh(z1, None, None, batch, 2)[0].item() == pytest.approx(loss.item())


def test_siren_confident_response_counts_as_zero_in_the_mean():
    # three responses; the third is confident (top token p = 0.9 >= top_p 0.8 at every position: empty
    # nucleus, top-p entropy 0) and keeps no token. Official agg_loss: H_hat = (h0 + h1 + 0) / 3.
    probs = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1], [0.3, 0.3, 0.3, 0.1], [0.6, 0.2, 0.1, 0.1]]
    confident = [0.9, 0.05, 0.03, 0.02]
    z = torch.tensor([probs, probs[::-1], [confident] * 4]).log()
    batch = make_batch(B=3, T=4, lengths=[4, 4, 4])
    reg = SIREN(top_p=0.8, mask_ratio=0.5)
    reg(z, None, None, batch, 0)
    h = [[nucleus_entropy(p, 0.8) for p in row] for row in (probs, probs[::-1])]
    # each of the first two rows keeps its top half (above the linear median): the same two values
    kept = sorted(h[0])[2:]
    assert sorted(h[1])[2:] == kept
    expected = 2 * (sum(kept) / 2) / 3
    assert reg.metrics["h_hat"] == pytest.approx(expected, abs=1e-6)
    assert reg.metrics["h_hat"] == pytest.approx(siren_h_hat(z, batch.response_mask.bool(), reg), abs=1e-6)
    reg.end_step({})
    assert reg.anchor == pytest.approx(expected, abs=1e-6)  # not (h0 + h1) / 2 = 1.5 x larger


def test_siren_micro_batch_weight_is_its_share_of_sequences():
    batch = make_batch(B=4, T=6, lengths=[6, 5, 0, 6])
    z = torch.randn(4, 6, 9, generator=torch.Generator().manual_seed(2)) * 2
    reg = SIREN(coef=1.0, top_p=0.9, mask_ratio=0.5)
    reg.anchor = 0.1
    batch.agg_norm = make_agg_norm([batch], "token-mean", const=6.0)  # 3 sequences with tokens
    micro = batch.index([0, 2])
    micro.agg_norm = batch.agg_norm
    loss, _ = reg(z[[0, 2]], None, None, micro, 1)
    h_hat = siren_h_hat(z[[0, 2]], micro.response_mask.bool(), reg)
    assert loss.item() == pytest.approx(1 / 3 * (h_hat - 0.1) ** 2, abs=1e-6)


# ---- Lp-Reg -------------------------------------------------------------------------------------


def test_min_p_proxy_logprob():
    z = torch.tensor([[[0.6, 0.3, 0.09, 0.01]]]).log()
    lp = min_p_logprob(z.expand(1, 4, 4), torch.tensor([[0, 1, 2, 3]]), min_p=0.1)  # cut 0.06
    expected = [math.log(0.6 / 0.99), math.log(0.3 / 0.99), math.log(0.09 / 0.99), -1e4]
    assert torch.allclose(lp, torch.tensor([expected]), atol=1e-5)


def lp_case():
    """4 rows x 3 tokens; the sampled token is id 0 everywhere, the tail id 3 is filtered (p = 0.001)."""
    B, T = 4, 3
    p_tok = torch.tensor([[0.30, 0.50, 0.70], [0.20, 0.60, 0.10], [0.40, 0.45, 0.35], [0.25, 0.90, 0.80]])
    rest = 1 - p_tok - 0.001
    probs = torch.stack([p_tok, rest * 0.6, rest * 0.4, torch.full_like(p_tok, 0.001)], -1)
    batch = make_batch(B=B, T=T, lengths=[3, 3, 3, 3])
    batch.response_ids = torch.zeros(B, T, dtype=torch.long)
    batch.advantages = torch.tensor([[-1.0] * 3, [-0.5] * 3, [2.0] * 3, [-1.0] * 3])
    batch.token_weights = batch.response_mask.float()
    return probs.log(), p_tok.log(), batch


def test_lp_reg_kl_only_on_qualifying_tokens_micro_scope():
    logits, lp_tok, batch = lp_case()
    logprobs = lp_tok.clone().requires_grad_(True)
    reg = LpReg(coef=2.0, min_p=0.01, neg_fraction=0.5, scope="micro")
    loss, stats = reg(logits, logprobs, None, batch, 0)
    # 9 negative tokens -> k = floor(4.5) = 4 lowest: p = 0.10, 0.20, 0.25, 0.30
    qual = torch.zeros(4, 3, dtype=torch.bool)
    qual[1, 2] = qual[1, 0] = qual[3, 0] = qual[0, 0] = True
    probs = logits.exp()
    kept_mass = 1 - probs[..., 3]  # the filtered tail (p = 0.001 < 0.01 * max p)
    d = torch.log(probs[..., 0] / kept_mass) - lp_tok
    kl = (d.exp() - d - 1).clamp(-10, 10)
    expected = 2.0 * (kl * qual).sum() / 12
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (g,) = torch.autograd.grad(loss, logprobs)
    assert (g[~qual] == 0).all() and (g[qual] != 0).all()
    assert stats["qualified_frac"].sum().item() == 4


def test_lp_reg_no_regularisation_without_enough_negative_tokens():
    logits, lp_tok, batch = lp_case()
    reg = LpReg(min_p=0.01, neg_fraction=0.2, scope="micro")  # k = floor(1.8) = 1: not applied
    assert reg(logits, lp_tok, None, batch, 0)[0].item() == 0.0
    batch.advantages = batch.advantages.abs()  # no negative token at all
    for scope in ("micro", "minibatch"):
        reg = LpReg(min_p=0.01, neg_fraction=0.5, scope=scope)
        reg.prepare(batch)
        assert reg(logits, lp_tok, None, batch, 0)[0].item() == 0.0


def test_lp_reg_filtered_tokens_never_qualify():
    logits, lp_tok, batch = lp_case()
    batch.response_ids = torch.full((4, 3), 3)  # the sampled token is the filtered tail
    lp = torch.full((4, 3), math.log(0.001))
    loss, stats = LpReg(min_p=0.01, neg_fraction=1.0, scope="micro")(logits, lp, None, batch, 0)
    assert loss.item() == 0.0 and stats["qualified_frac"].sum() == 0


def test_lp_reg_minibatch_scope_ranks_by_old_logprobs_over_the_minibatch():
    logits, lp_tok, batch = lp_case()
    batch.old_logprobs = lp_tok.flip(0)  # a different ranking than the current log-probs
    reg = LpReg(coef=1.0, min_p=0.01, neg_fraction=0.5, scope="minibatch")
    reg.prepare(batch)
    old = batch.old_logprobs
    neg = batch.advantages < 0
    cut = old[neg].sort().values[3]  # k = 4 lowest old log-probs among the negative tokens
    qual = neg & (old <= cut) & (lp_tok < min_p_logprob(logits, batch.response_ids, 0.01))
    loss, _ = reg(logits, lp_tok, None, batch, 0)
    probs = logits.exp()
    d = torch.log(probs[..., 0] / (1 - probs[..., 3])) - lp_tok
    assert loss.item() == pytest.approx(((d.exp() - d - 1) * qual).sum().item() / 12, rel=1e-5)
    assert qual.sum() == 4


# ---- AEPO ---------------------------------------------------------------------------------------


def test_first_rows_in_order_of_appearance():
    assert first_rows(torch.tensor([4, 4, 1, 1, 1, 9])) == [0, 2, 5]


def test_aepo_replaces_first_rows_with_positive_resamples():
    batch = make_batch(B=8, T=5, lengths=[5] * 8)
    batch.group_ids = torch.tensor([3, 3, 5, 5, 7, 7, 9, 9])
    batch.old_logprobs = batch.entropy = batch.advantages = batch.token_weights = None
    calls = []
    reg = AEPO(n_reinforce=60, prompt_fraction=0.5)
    out = reg.modify_rollout(batch, fake_resample([1.0, 0.0, 1.0, 0.0], 4, calls))
    assert calls == [([0, 2], 1.2)]  # first half of the 4 prompts, hot temperature (H starts at 0)
    # per re-sampled prompt: adv = (r - 0.5) / std = +-0.866 -> rows 0, 2 of each group kept
    assert out.size == 8
    assert [i.get("src") for i in out.info[:4]] == [0, 2, 4, 6]
    assert out.advantage_override[:4].tolist() == [1.0] * 4 and out.advantage_override[4:].isnan().all()
    assert out.group_ids[:4].tolist() == [10, 11, 12, 13]  # fresh ids above every existing id
    assert out.info[4:] == batch.info[4:] and out.group_ids[4:].tolist() == [7, 7, 9, 9]
    assert torch.equal(out.response_ids[4:], batch.response_ids[4:])
    assert reg(None, torch.zeros(8, 5), torch.zeros(8, 5), out, 0)[1]["replaced"] == 4.0


def test_aepo_cold_step_halves_and_caps():
    batch = make_batch(B=8, T=5, lengths=[5] * 8)
    batch.group_ids = torch.arange(8) // 2
    reg = AEPO(n_reinforce=3, entropy_target=0.5, prompt_fraction=1.0)
    reg(None, torch.full((8, 5), -0.9), torch.full((8, 5), 0.2), make_batch(B=8, T=5, lengths=[5] * 8), 0)
    reg.end_step({})
    assert reg.prev_entropy == pytest.approx(0.9)  # -mean log pi of the sampled tokens
    calls = []
    out = reg.modify_rollout(batch, fake_resample([1.0, 0.0], 2, calls))
    assert calls[0][1] == 0.8  # entropy above target: low temperature
    # 4 kept (one per prompt), capped at n_reinforce = 3, halved -> 1
    assert int((~out.advantage_override.isnan()).sum()) == 1
    fresh = AEPO()
    fresh.load_state_dict(reg.state_dict())
    assert fresh.prev_entropy == reg.prev_entropy


def test_aepo_controller_reads_the_sampled_token_estimate():
    # official actor/entropy_loss: token-mean of -log pi(o_t); exact entropy as an option
    batch = make_batch(B=3, T=4, lengths=[4, 2, 0])  # ragged, with an empty response
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-3.0, -0.2, -9.0, -9.0], [-9.0] * 4])
    entropy = torch.tensor([[1.0, 1.2, 0.8, 0.6], [2.0, 0.4, 5.0, 5.0], [5.0] * 4])
    sampled, exact = AEPO(), AEPO(entropy_estimate="exact")
    for half in (slice(0, 2), slice(2, 3)):  # two micro-batches, pooled token-weighted
        micro = batch.index(list(range(3))[half])
        sampled(None, logprobs[half], entropy[half], micro, 0)
        exact(None, logprobs[half], entropy[half], micro, 0)
    sampled.end_step({})
    exact.end_step({})
    assert sampled.prev_entropy == pytest.approx((1.0 + 2.0 + 0.5 + 0.1 + 3.0 + 0.2) / 6)
    assert exact.prev_entropy == pytest.approx((1.0 + 1.2 + 0.8 + 0.6 + 2.0 + 0.4) / 6)
    with pytest.raises(ValueError, match="entropy_estimate"):
        AEPO(entropy_estimate="full")


def test_aepo_no_positive_samples_leaves_the_batch_alone():
    batch = make_batch(B=4, T=5, lengths=[5] * 4)
    out = AEPO().modify_rollout(batch, fake_resample([1.0, 1.0], 2, []))  # all-equal rewards: adv 0
    assert out is batch


# ---- EPO ----------------------------------------------------------------------------------------


def test_epo_phase_weight_schedule():
    assert epo_phase_weight(0, 150) == 1.0
    assert epo_phase_weight(75, 150) == pytest.approx(1 - 0.2 * (1 - math.exp(-2)))
    assert epo_phase_weight(100, 150) == pytest.approx(0.8 * math.exp(-3 * 25 / 75))
    assert epo_phase_weight(150, 150) == pytest.approx(0.8 * math.exp(-3))
    assert epo_phase_weight(500, 150) == pytest.approx(0.8 * math.exp(-3))


@pytest.mark.parametrize("differentiable", [True, False])
def test_epo_band_penalty_token_mode(differentiable):
    batch = make_batch(B=1, T=4, lengths=[4])
    batch.entropy = torch.ones(1, 4)  # rollout entropy mean 1.0 -> history [1.0]
    reg = EPO(coef=0.5, smooth_coef=2.0, start_step=0, phase_weights=False, differentiable=differentiable)
    h = torch.tensor([[0.5, 1.0, 1.5, 1.1]], requires_grad=True)
    loss, _ = reg(None, None, h, batch, 0)
    assert loss.item() == pytest.approx(-0.5 * h.mean().item())  # no history yet: plain bonus
    reg.end_step({})
    assert reg.history == [1.0]
    loss, stats = reg(None, None, h, batch, 1)
    pen = [0.1 * 0.3, 0.0, 0.1 * 0.3, 0.0] if differentiable else [0.1, 0.0, 0.1, 0.0]
    assert stats["penalty"].flatten().tolist() == pytest.approx(pen)
    assert loss.item() == pytest.approx(-0.5 * (h.mean().item() - 2.0 * sum(pen) / 4))
    (g,) = torch.autograd.grad(loss, h)
    slope = torch.tensor([[-0.1, 0.0, 0.1, 0.0]]) if differentiable else torch.zeros(1, 4)
    assert torch.allclose(g, -0.5 * (torch.ones(1, 4) / 4 - 2.0 * slope / 4))


def test_epo_seq_mode_window_and_start_step():
    batch = make_batch(B=2, T=3, lengths=[3, 1])
    reg = EPO(coef=1.0, smooth_coef=1.0, mode="seq", max_steps=10, window=2)  # start_step 5
    reg.history = [9.0, 1.0, 1.0]
    assert reg.historical_entropy() == 1.0
    h = torch.tensor([[0.5, 0.5, 0.8], [3.0, 7.0, 7.0]])  # seq means 0.6 and 3.0 (row 1 masks 2 tokens)
    loss4, _ = reg(None, None, h, batch, 4)
    assert loss4.item() == pytest.approx(-token_mean(h, batch.response_mask).item())  # before start_step
    loss6, stats = reg(None, None, h, batch, 6)
    pen = torch.tensor([[0.02] * 3, [0.18] * 3]) * batch.response_mask
    assert torch.allclose(stats["penalty"] * batch.response_mask, pen)
    w = epo_phase_weight(6, 10)
    expected = -(token_mean(h, batch.response_mask) - w * token_mean(pen, batch.response_mask))
    assert loss6.item() == pytest.approx(expected.item())


# ---- EM-FT --------------------------------------------------------------------------------------


def test_em_ft_minimises_token_entropy():
    batch = make_batch()
    z = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(5), requires_grad=True)
    reg = EMFT(coef=0.7)
    assert not reg.needs_logits and reg.needs_entropy_grad
    loss, _ = reg(None, None, ref_entropy(z), batch, 0)
    assert loss.item() == pytest.approx(
        0.7 * token_mean(ref_entropy(z), batch.response_mask).item(), rel=1e-6
    )
    hot = EMFT(rescale_temperature=0.5)
    assert hot.needs_logits and not hot.needs_entropy_grad
    loss, _ = hot(z, None, None, batch, 0)
    expected = token_mean(ref_entropy(z / 0.5), batch.response_mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (g,) = torch.autograd.grad(loss, z)
    (g_ref,) = torch.autograd.grad(expected, z)
    assert torch.allclose(g, g_ref, atol=1e-6)


# ---- cross-rank invariance: 2 ranks x N prompts == 1 rank x 2N prompts --------------------------

DIST_CASES = [
    ("adaptive_entropy", {"coef": 0.1, "target": 5.0}),
    ("aent", {"warmup_steps": 0, "coef_lr": 0.01, "coef_max": 1.0, "entropy_low": 2.0, "entropy_high": 3.0}),
    ("siren", {"mask_ratio": 0.5}),
    ("lp_reg", {"neg_fraction": 0.3}),
    ("epo", {"start_step": 0}),
    ("aepo", {}),
    ("em_ft", {}),
]


def _dist_inputs():
    batch = make_batch(B=8, T=5, V=7, lengths=[5, 4, 3, 5, 2, 5, 1, 4], seed=11)
    batch.group_ids = torch.arange(8) // 2
    logits = torch.randn(8, 5, 7, generator=torch.Generator().manual_seed(12)) * 2
    return batch, logits


def _run_case(name, kwargs, batch, logits, reduce):
    """Two RL steps on ``batch``; returns each step's loss and the final state."""
    reg = REGULARIZERS.build(name, kwargs)
    losses = []
    for step in range(2):
        batch.agg_norm = make_agg_norm([batch], "token-mean", const=5.0, reduce=reduce)
        reg.prepare(batch)
        z = logits.clone().requires_grad_(True)
        logprobs = torch.log_softmax(z, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        loss, _ = reg(z, logprobs, ref_entropy(z), batch, step)
        losses.append(loss.item())
        reg.end_step({})
    return losses, reg.state_dict()


def _dist_worker(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}/rdv", rank=rank, world_size=2)
    full, logits = _dist_inputs()
    rows = list(range(4)) if rank == 0 else list(range(4, 8))
    out = {name: _run_case(name, kwargs, full.index(rows), logits[rows], True) for name, kwargs in DIST_CASES}
    reinforce = AEPO(n_reinforce=4, prompt_fraction=1.0)
    mixed = reinforce.modify_rollout(full.index(rows), fake_resample([1.0, 0.0], 2, []))
    out["aepo_ids"] = mixed.group_ids.tolist()
    torch.save(out, f"{path}/rank{rank}.pt")
    dist.destroy_process_group()


def test_controllers_and_losses_are_taken_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_dist_worker, args=(str(tmp_path),), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full, logits = _dist_inputs()
    for name, kwargs in DIST_CASES:
        losses, state = _run_case(name, kwargs, full.index(list(range(8))), logits, False)
        for part in parts:
            for key, value in state.items():
                assert part[name][1][key] == pytest.approx(value, rel=1e-5), (name, key)
        if name != "siren":  # SIREN squares each micro-batch's mean, like the official code
            # each rank's loss carries the world size: DDP's gradient average gives the full loss
            for step in range(2):
                mean = (parts[0][name][0][step] + parts[1][name][0][step]) / 2
                assert mean == pytest.approx(losses[step], rel=1e-5, abs=1e-9), (name, step)
    ids = parts[0]["aepo_ids"][:2] + parts[1]["aepo_ids"][:2]
    assert ids == [4, 5, 6, 7]  # fresh ids above every rank's, distinct across ranks
