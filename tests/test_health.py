"""Health warnings: each once, with the value that triggered it; a clean stop on repeated skips."""

import pytest

from lightning_entropy.health import HealthMonitor, RunHealthError


def _monitor(**kw):
    said = []
    return HealthMonitor(warn=said.append, **kw), said


def test_entropy_collapse_and_kl_spike_warn_once_with_the_value():
    h, said = _monitor(entropy_min=0.01, approx_kl_max=0.5)
    h.check(0, {"train/entropy": 0.2, "train/approx_kl": 0.01}, updates=1)
    assert said == []
    h.check(1, {"train/entropy": 0.004, "train/approx_kl": 0.9}, updates=1)
    h.check(2, {"train/entropy": 0.0, "train/approx_kl": 2.0}, updates=1)
    assert len(said) == 2
    assert "0.004 nats at step 1" in said[0] and "health.entropy_min=0.01" in said[0]
    assert "approx-KL(pi_old || pi) 0.9 at step 1" in said[1]


def test_entropy_explosion_only_when_a_bound_is_set():
    h, said = _monitor(entropy_max=None)
    h.check(0, {"train/entropy": 9.0}, updates=1)
    assert said == []
    h, said = _monitor(entropy_max=5.0)
    h.check(3, {"train/entropy": 9.0}, updates=1)
    assert "exploding" in said[0] and "9 nats at step 3" in said[0]


def test_zero_advantages_for_n_steps_in_a_row():
    h, said = _monitor(zero_adv_steps=3)
    for step, z in enumerate([1.0, 1.0, 0.5, 1.0, 1.0]):
        h.check(step, {"adv/zero_frac": z}, updates=1)
    assert said == []  # the run of zero steps was broken at step 2
    h.check(5, {"adv/zero_frac": 1.0}, updates=1)
    assert len(said) == 1 and "for 3 steps (up to step 5)" in said[0]


def test_consecutive_all_skipped_steps_stop_the_run_and_state_resumes():
    h, _ = _monitor(max_skipped_steps=2)
    h.check(0, {"train/skipped_updates": 2.0}, updates=2)
    h.check(1, {"train/skipped_updates": 1.0}, updates=2)  # one of two updates ran: not a skipped step
    h.check(2, {"train/skipped_updates": 2.0}, updates=2)
    fresh, _ = _monitor(max_skipped_steps=2)
    fresh.load_state_dict(h.state_dict())
    with pytest.raises(RunHealthError, match="last 2 steps"):
        fresh.check(3, {"train/skipped_updates": 2.0}, updates=2)
