"""The update stage: the skipped old-policy pass, non-finite updates, overlong filtering."""

import copy
import math

import pytest
import torch

from lightning_entropy.metrics import MetricBank
from tests.test_module import make_module, make_rollout, old_policy_pass, policy_dir  # noqa: F401


def _run(m, batch):
    opt = torch.optim.SGD(m.policy.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bank = MetricBank()
    skipped = m.update_stage.run(batch, 0, m.rollout_size, m.policy, opt, sched, lambda x: x.backward(), bank)
    return skipped, {k: float(v) for k, v in bank.compute().items()}


def _fresh_rollout(m):
    """A rollout with rewards and advantages but no old-policy pass (what the stage hands over)."""
    batch = make_rollout(m)
    batch.old_logprobs = batch.entropy = None
    return batch


def test_on_policy_step_skips_the_old_pass_and_updates_identically(policy_dir):  # noqa: F811
    skip = make_module(policy_dir, "algo.mini_batch_size=null")
    full = make_module(policy_dir, "algo.mini_batch_size=null", "algo.skip_old_pass=false")
    assert skip.skips_old_pass and not full.skips_old_pass
    a = _fresh_rollout(skip)
    b = make_rollout(full)  # the same samples (seeded), with the old-policy pass
    expected_lp, expected_h = b.old_logprobs.clone(), b.entropy.clone()
    _, sa = _run(skip, a)
    _, sb = _run(full, b)
    # the skipped pass is filled from the update's forward: same pi_old, same entropy, same update
    assert torch.allclose(a.old_logprobs, expected_lp, atol=1e-5)
    assert torch.allclose(a.entropy, expected_h, atol=1e-5)
    for (n, p), q in zip(skip.policy.named_parameters(), full.policy.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert sa["train/approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert sa["train/pg_loss"] == pytest.approx(sb["train/pg_loss"], abs=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        ["algo.mini_batch_size=8"],  # two optimizer steps per rollout: the second is off-policy
        ["algo.mini_batch_size=null", "advantage.name=gtpo"],  # reads pi_old's entropy at rollout time
        ["algo.mini_batch_size=null", "selector.name=high_entropy"],
        ["algo.mini_batch_size=null", "loss.name=clip_cov"],  # pi_old statistics in `prepare`
    ],
)
def test_old_pass_is_kept_when_anything_needs_it(policy_dir, extra):  # noqa: F811
    assert not make_module(policy_dir, *extra).skips_old_pass


def test_non_finite_gradient_skips_the_optimizer_step(policy_dir):  # noqa: F811
    m = make_module(policy_dir, "algo.mini_batch_size=null", "algo.skip_old_pass=false")
    batch = make_rollout(m)
    batch.advantages = batch.advantages.clone()
    batch.advantages[0, 0] = math.nan
    before = [p.detach().clone() for p in m.policy.parameters()]
    skipped, stats = _run(m, batch)
    assert skipped == 1 and stats["train/skipped_updates"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(m.policy.parameters(), before))
    assert "train/grad_norm" not in stats


def test_overlong_filter_takes_truncated_responses_out_of_the_loss(policy_dir):  # noqa: F811
    m = make_module(policy_dir, "algo.overlong_filter=true")
    batch = make_rollout(m)
    batch.truncated = torch.zeros_like(batch.truncated)
    batch.truncated[:3] = True
    m.update_stage.accumulate_gradients(m.policy, batch, 0, lambda x: x.backward(), MetricBank())
    assert (batch.token_weights[:3] == 0).all()
    assert torch.equal(batch.token_weights[3:], batch.response_mask[3:].float())


def _grads(m, batch):
    m.policy.zero_grad()
    m.update_stage.accumulate_gradients(m.policy, batch, 0, lambda x: x.backward(), MetricBank())
    return torch.cat([p.grad.flatten() for p in m.policy.parameters() if p.grad is not None])


def test_tis_scales_each_tokens_policy_gradient_by_its_truncated_weight(policy_dir):  # noqa: F811
    """On-policy, with rollout log-probs making w = 1.5 on every token of the first 8 responses and
    w = 3 (truncated to 2) on the rest, the gradient is 1.5 x (first half's) + 2 x (second half's)."""
    none = make_module(policy_dir, "algo.mini_batch_size=null")
    tis = make_module(policy_dir, "algo.mini_batch_size=null", "algo.rollout_correction=tis")
    batch = make_rollout(none)
    w = torch.ones(batch.size, 1)
    w[:8], w[8:] = 1.5, 3.0
    batch.rollout_logprobs = (batch.old_logprobs - torch.log(w)) * batch.response_mask

    def half(rows):  # the uncorrected gradient of some rows' share of the token-mean loss
        b = copy.deepcopy(batch)
        b.advantages = b.advantages * rows[:, None]
        return _grads(none, b)

    first = torch.zeros(batch.size)
    first[:8] = 1
    expected = 1.5 * half(first) + 2.0 * half(1 - first)
    assert torch.allclose(_grads(tis, copy.deepcopy(batch)), expected, atol=1e-6)


def test_mis_drops_tokens_from_the_loss_and_its_denominator(policy_dir):  # noqa: F811
    """Responses whose ratio is outside [1/2, 2] leave the loss exactly as DAPO's overlong filter
    takes truncated responses out of it."""
    mis = make_module(policy_dir, "algo.mini_batch_size=null", "algo.rollout_correction=mis")
    dropped = make_module(policy_dir, "algo.mini_batch_size=null", "algo.overlong_filter=true")
    assert not mis.skips_old_pass  # the mask is needed before the first forward
    batch = make_rollout(mis)
    w = torch.ones(batch.size, 1)
    w[:3], w[3:5] = 2.5, 0.4  # out of [1/2, 2]
    w[5:7] = 1.9  # kept
    batch.rollout_logprobs = (batch.old_logprobs - torch.log(w)) * batch.response_mask
    reference = copy.deepcopy(batch)
    reference.truncated = torch.zeros_like(batch.truncated)
    reference.truncated[:5] = True
    bank = MetricBank()
    mis.policy.zero_grad()
    mis.update_stage.accumulate_gradients(mis.policy, batch, 0, lambda x: x.backward(), bank)
    got = torch.cat([p.grad.flatten() for p in mis.policy.parameters() if p.grad is not None])
    assert torch.allclose(got, _grads(dropped, reference), atol=1e-7)
    assert (batch.token_weights[:5] == 0).all() and torch.equal(
        batch.token_weights[5:], batch.response_mask[5:].float()
    )
    mask = batch.response_mask.float()
    kept = float(bank.compute()["train/mis_kept_frac"])
    assert kept == pytest.approx(float(mask[5:].sum() / mask.sum()))


def test_correction_without_rollout_logprobs_says_so(policy_dir):  # noqa: F811
    m = make_module(policy_dir, "algo.mini_batch_size=null", "algo.rollout_correction=mis")
    batch = make_rollout(m)
    batch.rollout_logprobs = None
    with pytest.raises(RuntimeError, match="rollout_correction=mis needs the sampler's log-probs"):
        _grads(m, batch)


@pytest.mark.parametrize(("loss", "updates", "warns"), [("ppo", 1, True), ("ppo", 2, False), ("entropic", 1, False)])
def test_a_ratio_loss_with_only_on_policy_updates_warns_that_clipping_is_inert(loss, updates, warns):
    import warnings

    from lightning_entropy.registry import LOSSES
    from lightning_entropy.update import warn_if_clipping_is_inert

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_clipping_is_inert(LOSSES.build(loss, {}, key="loss"), updates)
    assert any("clipping does nothing" in str(w.message) for w in caught) == warns
