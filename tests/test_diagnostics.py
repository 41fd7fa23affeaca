"""Entropy-dynamics diagnostics against hand-computed cases (METHODS §6)."""

import math

import pytest
import torch

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.config import ConfigError, load_config, validate
from lightning_entropy.diagnostics import (
    Diagnostics,
    RunningFit,
    answer_clusters,
    answer_entropy,
    discriminator_terms,
    effective_rank,
    fit_entropy_law,
    predicted_change_discriminator,
    support,
)
from lightning_entropy.forward import PolicyForward
from lightning_entropy.metrics import MetricBank, PassAtK


def _entropy(z):
    """Shannon entropy (nats) of softmax(z), written out with math."""
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(q * math.log(q) for q in p), p


# ---- the entropy change of one update, 3-token vocabulary ---------------------------------------
def test_single_logit_step_changes_entropy_by_minus_eps_s():
    z, eps = [1.0, 0.0, -1.0], 1e-4
    h, p = _entropy(z)
    for k in range(3):
        s_k = p[k] * (h + math.log(p[k]))  # the entropy discriminator S_k
        moved = list(z)
        moved[k] += eps
        dh = _entropy(moved)[0] - h
        assert dh == pytest.approx(-eps * s_k, rel=1e-3)
    # the most likely token has S > 0 (pushing it up lowers entropy), the least likely S < 0
    assert p[0] * (h + math.log(p[0])) > 0 > p[2] * (h + math.log(p[2]))


@pytest.mark.parametrize("token,adv", [(0, 1.0), (0, -1.0), (2, 1.0), (2, -1.0)])
def test_policy_gradient_step_on_bare_logits_matches_the_first_order_prediction(token, adv):
    """A 3-token policy whose parameters are its logits: one plain gradient step on -A log p_token.
    The exact entropy change has the sign and, to first order, the size of -lr A (S_t - N_t)."""
    z0, lr = [1.0, 0.0, -1.0], 1e-3
    logits = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
    (-adv * torch.log_softmax(logits, -1)[token]).backward()
    with torch.no_grad():
        z1 = (logits - lr * logits.grad).tolist()
    measured = _entropy(z1)[0] - _entropy(z0)[0]

    h, p = _entropy(z0)
    s = p[token] * (h + math.log(p[token]))
    n = sum(q * q * (h + math.log(q)) for q in p)  # E_{v ~ pi}[S_v]
    by_hand = -lr * adv * (s - n)
    _, _, s_t, n_t = discriminator_terms(torch.tensor([z0]), torch.tensor([token]))
    predicted = lr * predicted_change_discriminator(torch.tensor([adv]), s_t, n_t).item()
    assert predicted == pytest.approx(by_hand, rel=1e-5)
    assert math.copysign(1, measured) == math.copysign(1, predicted)
    assert measured == pytest.approx(predicted, rel=1e-2)
    # rewarding the likely token (or penalising the unlikely one) lowers entropy
    assert (measured < 0) == ((token == 0) == (adv > 0))


def test_discriminator_terms_by_hand_and_chunked():
    z = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])  # a uniform row: S = N = p (log3 - log3) = 0
    h, lp, s, n = discriminator_terms(z, torch.tensor([[1, 2]]), temperature=2.0, chunk_size=1)
    h0, p0 = _entropy([1.0, 0.0, -0.5])  # temperature 2 halves the logits
    assert h[0, 0].item() == pytest.approx(h0, abs=1e-6)
    assert lp[0, 0].item() == pytest.approx(math.log(p0[1]), abs=1e-6)
    assert s[0, 0].item() == pytest.approx(p0[1] * (h0 + math.log(p0[1])), abs=1e-6)
    assert n[0, 0].item() == pytest.approx(sum(q * q * (h0 + math.log(q)) for q in p0), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(math.log(3), abs=1e-6)
    assert s[0, 1].item() == pytest.approx(0.0, abs=1e-6) and n[0, 1].item() == pytest.approx(0.0, abs=1e-6)


# ---- running fit, the entropy-performance law ---------------------------------------------------
def test_running_fit_correlation_and_slope():
    fit = RunningFit()
    assert math.isnan(fit.corr) and math.isnan(fit.slope)
    for x, y in [(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]:
        fit.update(x, y)
    assert fit.corr == pytest.approx(1.0) and fit.slope == pytest.approx(2.0)
    fit.update(4.0, 0.0)  # x = 1..4, y = 3, 5, 7, 0: cov = -1/4 * ..., written out below
    xs, ys = [1, 2, 3, 4], [3, 5, 7, 0]
    mx, my = 2.5, 3.75
    cxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    vx, vy = sum((a - mx) ** 2 for a in xs), sum((b - my) ** 2 for b in ys)
    assert fit.slope == pytest.approx(cxy / vx) and fit.corr == pytest.approx(cxy / math.sqrt(vx * vy))
    fit.update(float("nan"), 1.0)  # skipped
    again = RunningFit()
    again.load_state_dict(fit.state_dict())
    assert again.n == 4 and again.corr == pytest.approx(fit.corr)


def test_law_fit_recovers_known_coefficients():
    a, b = 0.3, 0.9
    hs = [0.2 + 0.1 * i for i in range(12)]
    a_hat, b_hat = fit_entropy_law(hs, [-a * math.exp(h) + b for h in hs])
    assert a_hat == pytest.approx(a, rel=1e-9) and b_hat == pytest.approx(b, rel=1e-9)
    assert b_hat - a_hat == pytest.approx(0.6)  # the ceiling at H = 0
    # noisy points: least squares on exp(H) by hand
    noise = [0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.015, 0.005, 0.0, -0.005, 0.01, -0.01]
    rs = [-a * math.exp(h) + b + e for h, e in zip(hs, noise)]
    x = [math.exp(h) for h in hs]
    mx, my = sum(x) / 12, sum(rs) / 12
    slope = sum((xi - mx) * (r - my) for xi, r in zip(x, rs)) / sum((xi - mx) ** 2 for xi in x)
    a_n, b_n = fit_entropy_law(hs, rs)
    assert a_n == pytest.approx(-slope) and b_n == pytest.approx(my - slope * mx)
    assert abs(a_n - a) < 0.05
    # one point, or every entropy equal: no fit
    assert all(math.isnan(v) for v in fit_entropy_law([0.5], [0.4]))
    assert all(math.isnan(v) for v in fit_entropy_law([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))


# ---- effective rank ---------------------------------------------------------------------------
def test_effective_rank_of_known_singular_values():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    x = u[:, :4] @ torch.diag(sigma) @ v.T
    q = [0.5, 1 / 3, 1 / 6]
    expected = math.exp(-sum(qi * math.log(qi) for qi in q))
    assert effective_rank(x).item() == pytest.approx(expected, rel=1e-9)
    # padding rows masked out change nothing; the identity has full effective rank; zeros have 0
    padded = torch.cat([x, torch.full((2, 4), 7.0, dtype=torch.float64)])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0])
    assert effective_rank(padded, mask).item() == pytest.approx(expected, rel=1e-9)
    batch = torch.stack([torch.eye(3), torch.zeros(3, 3)])
    assert effective_rank(batch).tolist() == pytest.approx([3.0, 0.0])


# ---- beyond tokens: answers, pass@k, support ----------------------------------------------------
def test_answer_entropy_and_distinct_answers_on_hand_made_groups():
    answers = ["12", " 12", "7", None, "5", "5", "5", "5", "", None, "3", "4"]
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    sizes = answer_clusters(answers, groups)
    assert sorted(sizes[0]) == [1, 1, 2] and sizes[1] == [4] and sorted(sizes[2]) == [1, 1, 2]
    assert answer_entropy(sizes[0]) == pytest.approx(1.5 * math.log(2))  # -(1/2 ln 1/2 + 2 * 1/4 ln 1/4)
    assert answer_entropy(sizes[1]) == 0.0  # all equal
    assert answer_entropy([1, 1, 1, 1]) == pytest.approx(math.log(4))  # all distinct: log G


def test_pass_at_every_k_and_support():
    diag = Diagnostics(load_config(None, []).diagnostics, PolicyForward())
    ks = diag.pass_ks([1, 4], 4)
    assert ks == [1, 2, 3, 4]
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    groups = torch.arange(4).repeat_interleave(4)
    m = PassAtK(ks=ks)
    m.update(correct, groups)
    got = {k: v.item() for k, v in m.compute().items()}
    # per problem: c=1 -> k/4; c=2 -> 1/2, 1 - 1/6, 1, 1; c=0 -> 0; c=4 -> 1
    expected = {
        1: (0.25 + 0.5 + 0 + 1) / 4,
        2: (0.5 + 5 / 6 + 0 + 1) / 4,
        3: (0.75 + 1 + 0 + 1) / 4,
        4: 3 / 4,
    }
    for k, v in expected.items():
        assert got[f"pass@{k}"] == pytest.approx(v)
    assert support(correct.float(), groups).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert got["pass@4"] == pytest.approx(support(correct.float(), groups).mean().item())


# ---- the runner on a tiny model: same tokens before and after, logit lens, effective rank -------
def _tiny_policy():
    from lightning_entropy.models import build_tiny_model

    return build_tiny_model(
        12, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=32, seed=0
    ).double()


def _batch(B=4, P=3, T=5):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0  # a short response
    return RolloutBatch(
        prompt_ids=torch.randint(3, 12, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.randint(3, 12, (B, T), generator=g) * mask,
        response_mask=mask,
        group_ids=torch.tensor([0, 0, 1, 1]),
        truncated=torch.zeros(B, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]),
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * mask,
        info=[{"extracted": a} for a in ("1", "2", "3", "3")],
    )


def _diag(**kw):
    over = [f"diagnostics.{k}={v}" for k, v in kw.items()]
    return Diagnostics(load_config(None, over).diagnostics, PolicyForward(temperature=1.0))


def test_entropy_change_is_measured_on_the_same_tokens_and_predicted_by_hand():
    from lightning_entropy.forward import _response_positions, model_inputs

    policy, b = _tiny_policy(), _batch()
    diag, bank = _diag(entropy_change=True, entropy_change_every=2), MetricBank()
    diag.before_update(policy, b, step=1)  # not due
    assert diag._before is None
    diag.before_update(policy, b, step=2)

    def stats():
        logits = policy(**model_inputs(b), logits_to_keep=_response_positions(b)).logits
        logp = torch.log_softmax(logits, -1)
        return logits, logp.gather(-1, b.response_ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    m = b.response_mask.double()
    logits0, lp0, h0 = stats()
    params = list(policy.parameters())
    g = torch.autograd.grad((h0 * m).sum(), params)  # d sum_t H_t / d theta, by autograd here
    logits0, lp0, h0 = logits0.detach(), lp0.detach(), h0.detach()
    gen = torch.Generator().manual_seed(3)
    steps = [1e-5 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    with torch.no_grad():
        for p, d in zip(params, steps):  # any parameter change: the measurement must follow it
            p.add_(d)
        _, _, h1 = stats()
    diag.after_update(policy, b, bank)
    out = {k: v.item() for k, v in bank.compute().items()}
    measured = ((h1 - h0) * m).sum().item() / m.sum().item()
    assert out["diag/dH_measured"] == pytest.approx(measured, rel=1e-6)
    # the linearised change g . delta theta (token-mean), and it is the first-order size of the change
    linear = sum((gi * d).sum().item() for gi, d in zip(g, steps)) / m.sum().item()
    assert out["diag/dH_pred_linear"] == pytest.approx(linear, rel=1e-4)
    assert out["diag/dH_pred_linear"] == pytest.approx(measured, rel=1e-2)
    # -Cov(log p, A) over the valid tokens, centred over all of them
    x, y = lp0[m > 0], b.advantages.double()[m > 0]
    cov = ((x - x.mean()) * (y - y.mean())).mean().item()
    assert out["diag/dH_pred_cov"] == pytest.approx(-cov, rel=1e-6)
    p = torch.softmax(logits0, -1)
    pt = lp0.exp()
    n = (p * p * (h0[..., None] + p.log())).sum(-1)
    disc = -b.advantages * (pt * (h0 + lp0) - n)
    assert out["diag/dH_pred_disc"] == pytest.approx((disc * m).sum().item() / m.sum().item(), rel=1e-6)
    assert diag._before is None  # nothing is kept between steps
    # the token-level correlation of each token's change with its own -A_t (S_t - N_t)
    dh, d = (h1 - h0)[m > 0], disc[m > 0]
    corr = ((dh - dh.mean()) * (d - d.mean())).mean() / (dh.std(unbiased=False) * d.std(unbiased=False))
    assert diag.step_values(2, out)["diag/token_corr_disc"] == pytest.approx(corr.item(), rel=1e-6)
    assert not any(k.startswith("diag/_tok") for k in out)


def test_logit_lens_and_effective_rank_on_a_tiny_model_by_hand():
    from lightning_entropy import ops
    from lightning_entropy.forward import _response_positions, model_inputs

    policy, b = _tiny_policy(), _batch()
    P = b.prompt_ids.shape[1]
    with torch.no_grad():
        out = policy(**model_inputs(b), output_hidden_states=True)
    hs, pos, m = out.hidden_states, _response_positions(b), b.response_mask.double()
    w = policy.get_output_embeddings().weight

    def lens(h):
        logp = torch.log_softmax(h[:, pos] @ w.T, -1)
        return ((-(logp.exp() * logp).sum(-1)) * m).sum().item() / m.sum().item()

    for norm in (False, True):
        diag = _diag(logit_lens=True, effective_rank=True, logit_lens_norm=norm, hidden_samples="null")
        bank = MetricBank()
        diag.on_validation(policy, b, torch.tensor([1.0, 0, 0, 0]), 0, bank)
        got = {k: v.item() for k, v in bank.compute().items()}
        # hidden_states[1] is the first decoder layer's output, before the final norm
        h1 = policy.get_decoder().norm(hs[1]) if norm else hs[1]
        assert got["val/lens_entropy_layer1"] == pytest.approx(lens(h1), rel=1e-6)
        if norm:  # the last layer through the final norm is the policy itself
            ent = ops.naive_logprobs_and_entropy(out.logits[:, pos], b.response_ids)[1]
            assert got["val/lens_entropy_layer2"] == pytest.approx(
                (ent * m).sum().item() / m.sum().item(), rel=1e-6
            )
        # effective rank of each response's last hidden states (its valid tokens only), averaged
        ers = []
        for i in range(b.size):
            rows = hs[-1][i, P:][b.response_mask[i] > 0]
            q = torch.linalg.svdvals(rows)
            q = q / q.sum()
            ers.append(math.exp(-(q * q.log()).sum().item()))
        assert got["val/effective_rank"] == pytest.approx(sum(ers) / len(ers), rel=1e-6)
        assert got["val/support"] == pytest.approx(0.5)  # group 0 has a correct sample, group 1 none
        assert got["val/distinct_answers"] == pytest.approx(1.5)  # {1, 2} and {3}
        assert got["val/answer_entropy"] == pytest.approx(math.log(2) / 2)
    # the default reads one sample per prompt: rows 0 and 2, the first of each group
    bank = MetricBank()
    _diag(effective_rank=True).on_validation(policy, b, torch.tensor([1.0, 0, 0, 0]), 0, bank)
    assert bank.compute()["val/effective_rank"].item() == pytest.approx((ers[0] + ers[2]) / 2, rel=1e-6)


def test_law_is_fitted_when_the_validated_steps_entropy_is_known():
    diag = _diag()
    assert diag.step_values(0, {"train/entropy": 1.0}) == {}  # no validation yet
    a, b = 0.2, 0.8
    for step, h in [(0, 0.9), (5, 0.6), (10, 0.3)]:
        diag.validation_values(step, {"val/acc": -a * math.exp(h) + b, "val/pass@1": 0.5})
        out = diag.step_values(step, {"train/entropy": h})
    assert out["law/points"] == 3
    assert out["law/acc_a"] == pytest.approx(a) and out["law/acc_ceiling"] == pytest.approx(b - a)
    assert out["law/pass@1_a"] == pytest.approx(0.0, abs=1e-12)  # a flat target: a = 0, b = 0.5
    again = _diag()
    again.load_state_dict(diag.state_dict())
    assert again.law_points == diag.law_points


def test_diagnostics_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="diagnostics.entropy_change_every"):
        validate(load_config(None, ["diagnostics.entropy_change_every=0"]))
    with pytest.raises(ConfigError, match="diagnostics.entropy_change_rows: must be >= 1"):
        validate(load_config(None, ["diagnostics.entropy_change_rows=0"]))
    with pytest.raises(ConfigError, match="diagnostics.hidden_samples: must be >= 1"):
        validate(load_config(None, ["diagnostics.hidden_samples=0"]))
    with pytest.raises(ConfigError, match="diagnostics"):
        load_config(None, ["diagnostics.entropy_chnage=true"])


@pytest.mark.parametrize("rows", [1, 2])  # 1 row is rounded up to its whole group
def test_entropy_change_rows_measure_the_first_groups_only(rows):
    from lightning_entropy import ops
    from lightning_entropy.forward import _response_positions, model_inputs

    policy, b = _tiny_policy(), _batch()
    diag, bank = _diag(entropy_change=True, entropy_change_rows=rows, entropy_change_linear=False), MetricBank()
    diag.before_update(policy, b, step=0)
    diag.after_update(policy, b, bank)  # nothing changed: the measured change is exactly 0
    out = {k: v.item() for k, v in bank.compute().items()}
    with torch.no_grad():
        logits = policy(**model_inputs(b), logits_to_keep=_response_positions(b)).logits
    h = ops.naive_logprobs_and_entropy(logits, b.response_ids)[1][:2]
    m = b.response_mask[:2].double()
    assert out["diag/entropy_before"] == pytest.approx(((h * m).sum() / m.sum()).item(), rel=1e-6)
    assert out["diag/dH_measured"] == 0.0 and "diag/dH_pred_linear" not in out
