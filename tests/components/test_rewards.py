"""Rewards: every expected value below is worked out by hand from the rule in the docstring."""

from __future__ import annotations

import copy
import pickle
import threading
import time

import pytest
import torch

from lightning_entropy.components.rewards import (
    CountdownReward,
    ExactMatchReward,
    MathVerifyReward,
    parse_countdown_reference,
)
from lightning_entropy.registry import REWARDS, RegistryError


def _reasons(infos):
    return [i["reason"] for i in infos]


# ---- exact_match ---------------------------------------------------------------------------------


def test_exact_match_hand_cases():
    completions = ["68", " 68 \n", "86", "", "68", "   ", "\uff16\uff18", None]
    references = ["68", "68", "68", "68", None, "5", "68", "68"]
    r, infos = ExactMatchReward()([""] * 8, completions, references)
    assert r.dtype == torch.float32 and r.shape == (8,)
    assert r.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert _reasons(infos) == [
        None,
        None,
        "wrong answer",
        "empty answer",
        "no reference",
        "empty answer",
        "wrong answer",
        "empty answer",
    ]
    assert [i["correct"] for i in infos] == [True, True] + [False] * 6
    assert infos[1]["extracted"] == "68" and infos[3]["extracted"] is None


def test_exact_match_strip_chars_and_values():
    plain = ExactMatchReward()
    dotted = ExactMatchReward(strip_chars=".", correct_reward=2.0, wrong_reward=-1.0)
    comps, refs = ["68.", " 68 . ", "6.8"], ["68", "68", "68"]
    assert plain([""] * 3, comps, refs)[0].tolist() == [0.0, 0.0, 0.0]
    # "68." -> "68"; " 68 . " -> "68 ." -> "68 " -> "68"; the inner dot of "6.8" stays.
    assert dotted([""] * 3, comps, refs)[0].tolist() == [2.0, 2.0, -1.0]


def test_exact_match_validation():
    with pytest.raises(ValueError, match="correct_reward=0.0"):
        ExactMatchReward(correct_reward=0.0, wrong_reward=0.0)
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        ExactMatchReward()(["", ""], ["1", "2"], ["1"])


# ---- countdown -----------------------------------------------------------------------------------

REF = "3,5,7=22"


@pytest.mark.parametrize(
    "completion, reward, reason, well_formed",
    [
        ("3*5+7", 1.0, None, True),
        ("7+5*3", 1.0, None, True),
        (" (3*5)+7 ", 1.0, None, True),
        ("((3*5))+(7)", 1.0, None, True),
        ("3*5+8", 0.1, "number not available: [8]", True),
        ("3*3+7", 0.1, "number reused: [3]", True),
        ("3*5+7*1", 0.1, "number not available: [1]", True),
        ("5*3", 0.1, "wrong value: 15", True),
        ("7-5-3", 0.1, "wrong value: -1", True),
        ("7/(5-5)", 0.1, "number reused: [5]", True),
        ("3**5", 0.0, "unsupported operator", False),
        ("15//7", 0.0, "unsupported operator", False),
        ("-3+5*7", 0.0, "unary operator", False),
        ("3*5+7=22", 0.0, "step 1 is not 'a<op>b=c'", False),
        ("\uff13*5+7", 0.0, "invalid characters or too long", False),
        ("\u2603", 0.0, "invalid characters or too long", False),
        ("1_0+12", 0.0, "invalid characters or too long", False),
        ("3.0*5+7", 0.0, "invalid characters or too long", False),
        ("abs(3)", 0.0, "invalid characters or too long", False),
        ("3*(5+7", 0.0, "unparsable", False),
        ("3 5 7", 0.0, "unparsable", False),
        ("07+15", 0.0, "unparsable", False),
        ("()", 0.0, "unsupported syntax: Tuple", False),
        ("", 0.0, "empty answer", False),
        ("   ", 0.0, "empty answer", False),
    ],
)
def test_countdown_hand_cases(completion, reward, reason, well_formed):
    r, infos = CountdownReward(format_reward=0.1)([""], [completion], [REF])
    assert r.tolist() == [pytest.approx(reward)]
    assert infos[0]["reason"] == reason
    assert infos[0]["well_formed"] is well_formed
    assert infos[0]["correct"] is (reason is None)


@pytest.mark.parametrize(
    "completion, reward, reason, well_formed",
    [
        ("3*5=15,15+7=22", 1.0, None, True),
        ("5*3=15,7+15=22", 1.0, None, True),
        (" 5 * 3 = 15 , 15 + 7 = 22 ", 1.0, None, True),
        ("7-3=4,4*5=20", 0.1, "wrong value: 20", True),  # right arithmetic, wrong target
        ("3*5=16,16+7=23", 0.1, "step 1: 3*5 is 15, not 16", True),  # a wrong intermediate result
        ("3*5=15,15+7=23", 0.1, "step 2: 15+7 is 22, not 23", True),
        ("3*3=9,9+13=22", 0.1, "step 1: [3] not available", True),  # 3 used twice
        ("3*5=15,15+15=30", 0.1, "step 2: [15] not available", True),  # a result used twice
        ("7+15=22", 0.1, "step 1: [15] not available", True),  # a result before it is made
        ("5-7=-2,3*5=15", 0.1, "step 2: [5] not available", True),
        ("7/5=1,1+3=4", 0.1, "step 1: 7/5 is 7/5, not 1", True),  # inexact division is wrong
        ("3*5=15", 0.1, "wrong value: 15", True),
        ("3*5=15,15+7=22,1+1=2", 0.0, "too many steps or too long", False),
        ("3*5=15,15+7", 0.0, "step 2 is not 'a<op>b=c'", False),
        ("3*5=15;15+7=22", 0.0, "step 1 is not 'a<op>b=c'", False),
        ("=", 0.0, "step 1 is not 'a<op>b=c'", False),
    ],
)
def test_countdown_steps_hand_cases(completion, reward, reason, well_formed):
    r, infos = CountdownReward(format_reward=0.1)([""], [completion], [REF])
    assert r.tolist() == [pytest.approx(reward)]
    assert infos[0]["reason"] == reason
    assert infos[0]["well_formed"] is well_formed


def test_countdown_steps_use_all_counts_what_is_left_in_the_pool():
    strict = CountdownReward(use_all=True)
    r, infos = strict([""] * 3, ["3*5=15", "5+7=12,12+3=15", "3*5=15,15+7=22"], ["3,5,7=15", "3,5,7=15", REF])
    assert r.tolist() == [0.0, 1.0, 1.0]
    assert infos[0]["reason"] == "numbers unused: [7]"
    # without use_all, a subset of the numbers that reaches the target is a solution (classic Countdown)
    assert CountdownReward()([""], ["3*5=15"], ["3,5,7=15"])[0].tolist() == [1.0]


def test_countdown_default_gives_zero_to_every_wrong_answer():
    r, infos = CountdownReward()([""] * 4, ["3*5+7", "3*5+8", "garbage", "3*5+7"], [REF, REF, REF, None])
    assert r.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert _reasons(infos) == [
        None,
        "number not available: [8]",
        "invalid characters or too long",
        "no reference",
    ]
    assert infos[0]["value"] == "22"


def test_countdown_metrics_well_formed_fraction():
    reward = CountdownReward()
    reward([""] * 4, ["3*5+7", "3*5+8", "garbage", "3*5+7"], [REF, REF, REF, None])
    # well formed: the correct answer and "3*5+8"; not the garbage nor the unreferenced one.
    assert reward.metrics["well_formed"] == pytest.approx(2 / 4)


def test_countdown_division_by_zero_and_duplicates():
    r, infos = CountdownReward(format_reward=0.5)([""] * 3, ["2/(4-4)", "4+4", "4*2"], ["4,4,2=8"] * 3)
    # 2/(4-4) uses each 4 once (allowed twice) then divides by zero; 4+4 and 4*2 both reach 8.
    assert r.tolist() == [0.5, 1.0, 1.0]
    assert _reasons(infos) == ["division by zero", None, None]


def test_countdown_use_all():
    comps = ["3*5+7", "3*5", "3*5+7+7"]
    refs = [REF, "3,5,7=15", REF]
    r, infos = CountdownReward(use_all=True, format_reward=0.2)([""] * 3, comps, refs)
    assert r.tolist() == pytest.approx([1.0, 0.2, 0.2])
    assert _reasons(infos) == [None, "numbers unused: [7]", "number reused: [7]"]
    assert CountdownReward()([""], ["3*5"], ["3,5,7=15"])[0].tolist() == [1.0]


def test_countdown_non_integer_intermediates():
    # (2/3)*6 = 4 exactly, through the intermediate 2/3; 6/(3/2) = 4 through 3/2.
    comps, refs = ["(2/3)*6", "6/(3/2)", "6*2/3"], ["3,6,2=4"] * 3
    assert CountdownReward()([""] * 3, comps, refs)[0].tolist() == [1.0, 1.0, 1.0]
    r, infos = CountdownReward(integer_intermediates=True, format_reward=0.1)([""] * 3, comps, refs)
    # 6*2/3 parses as (6*2)/3 = 12/3: every intermediate is an integer.
    assert r.tolist() == pytest.approx([0.1, 0.1, 1.0])
    assert _reasons(infos)[:2] == ["non-integer intermediate result"] * 2
    # A value that is not an integer never equals an integer target.
    r, infos = CountdownReward()([""], ["7/2"], ["7,2=3"])
    assert r.tolist() == [0.0] and infos[0]["reason"] == "wrong value: 7/2"


def test_countdown_deep_nesting_is_rejected_not_crashing():
    deep = "(" * 1000 + "3" + ")" * 1000
    r, infos = CountdownReward()([""], [deep], [REF])
    assert r.tolist() == [0.0] and infos[0]["reason"] == "invalid characters or too long"
    r, infos = CountdownReward(max_length=5000)([""], [deep], [REF])
    assert r.tolist() == [0.0] and infos[0]["reason"] == "unparsable"


def test_countdown_reference_parsing_and_validation():
    assert parse_countdown_reference("3,5,7=22") == ([3, 5, 7], 22)
    assert parse_countdown_reference(" 12 , 4 = 3 ") == ([12, 4], 3)
    with pytest.raises(ValueError, match="malformed countdown reference"):
        CountdownReward()([""], ["3"], ["3 5 7>22:"])
    with pytest.raises(ValueError, match="format_reward=1.0"):
        CountdownReward(format_reward=1.0)
    with pytest.raises(ValueError, match="max_length=0"):
        CountdownReward(max_length=0)


# ---- math_verify ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_reward():
    reward = MathVerifyReward(timeout_s=2.0)
    yield reward
    reward.close()


def test_math_verify_hand_cases(math_reward):
    cases = [
        ("\\boxed{\\frac{1}{2}}", "1/2", True, None),
        ("The answer is 0.5", "\\frac{1}{2}", True, None),
        ("we get 7 and \\boxed{9} and 11", "9", True, None),  # \boxed wins over the last number
        ("first 5 then 8", "8", True, None),  # else the last number
        ("42", "43", False, "wrong answer"),
        ("", "1", False, "empty answer"),
        ("7", None, False, "no reference"),
        ("garbage \u2603 text", "3", False, "no answer found"),
        ("\\boxed{3}", "", False, "unparsable reference"),
        ("\\boxed{3}", "\u2603", False, "wrong answer"),  # kept as a string: never equals a number
    ]
    r, infos = math_reward([""] * len(cases), [c[0] for c in cases], [c[1] for c in cases])
    assert r.tolist() == [1.0 if c[2] else 0.0 for c in cases]
    assert [i["correct"] for i in infos] == [c[2] for c in cases]
    assert _reasons(infos) == [c[3] for c in cases]
    assert infos[2]["extracted"] == "9" and infos[3]["extracted"] == "8"


def test_math_verify_timeout_scores_zero_and_recovers():
    reward = MathVerifyReward(timeout_s=0.5, correct_reward=1.0, wrong_reward=-0.5)
    try:
        # Comparing 1 with 10^(10^(10^10)) runs for minutes inside sympy without math-verify's alarm.
        comps = ["\\boxed{3}", "\\boxed{10^{10^{10^{10}}}}", "\\boxed{3}"]
        r, infos = reward([""] * 3, comps, ["3", "1", "3"])
        assert r.tolist() == [1.0, -0.5, 1.0]
        assert _reasons(infos) == [None, "timeout", None]
        assert reward.metrics["timeouts"] == 1.0
    finally:
        reward.close()


def test_math_verify_runs_off_the_main_thread(math_reward):
    # math-verify's own SIGALRM timeouts raise ValueError outside the main thread; ours must not.
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=math_reward([""], ["\\boxed{4}"], ["4"])))
    worker.start()
    worker.join(60)
    assert out["r"][0].tolist() == [1.0]


def test_math_verify_copies_without_the_worker(math_reward):
    math_reward([""], ["1"], ["1"])
    clone = copy.deepcopy(math_reward)
    assert clone._pool == [None] * clone.workers
    assert pickle.loads(pickle.dumps(math_reward))._pool == [None] * math_reward.workers
    assert clone([""], ["\\boxed{2}"], ["2"])[0].tolist() == [1.0]
    clone.close()


def test_math_verify_validation():
    with pytest.raises(ValueError, match="timeout_s=0"):
        MathVerifyReward(timeout_s=0)
    with pytest.raises(ValueError, match="start_method='threads'"):
        MathVerifyReward(start_method="threads")
    with pytest.raises(ValueError, match="correct_reward=0.0"):
        MathVerifyReward(correct_reward=0.0)
    with pytest.raises(ValueError, match="deadline_s=0"):
        MathVerifyReward(deadline_s=0)
    with pytest.raises(ValueError, match="workers=0"):
        MathVerifyReward(workers=0)


def _sleepy_check(completion: str, reference: str) -> tuple[bool, str | None, str | None]:
    """A deliberately slow verifier: sleeps `completion` seconds, then calls it correct."""
    time.sleep(float(completion))
    return True, completion, None


class _SleepyReward(MathVerifyReward):
    _check = staticmethod(_sleepy_check)


def test_math_verify_pool_scores_in_parallel():
    reward = _SleepyReward(workers=4, timeout_s=20.0, deadline_s=60.0)
    try:
        reward([""], ["0"], ["x"])  # start the workers outside the timed part
        start = time.monotonic()
        r, infos = reward([""] * 4, ["1.0"] * 4, ["x"] * 4)
        elapsed = time.monotonic() - start
        assert r.tolist() == [1.0] * 4 and reward.metrics["timeouts"] == 0.0
        assert elapsed < 3.0, f"4 x 1 s on 4 workers took {elapsed:.1f}s: not in parallel"
    finally:
        reward.close()


def test_math_verify_step_deadline_scores_the_rest_zero_and_counts_them():
    # 8 samples of 1 s on 2 workers need 4 s; the 1.5 s step deadline lets the first 2 finish
    reward = _SleepyReward(workers=2, timeout_s=20.0, deadline_s=1.5, wrong_reward=-1.0)
    try:
        reward([""], ["0"], ["x"])
        start = time.monotonic()
        r, infos = reward([""] * 8, ["1.0"] * 8, ["x"] * 8)
        elapsed = time.monotonic() - start
        assert elapsed < 3.5, f"the step deadline was not enforced ({elapsed:.1f}s)"
        assert r.tolist() == [1.0, 1.0] + [-1.0] * 6
        assert _reasons(infos) == [None, None] + ["timeout"] * 6
        assert reward.metrics["timeouts"] == 6.0
        # the pool recovers: killed workers are restarted for the next step
        r, infos = reward([""] * 2, ["0.1"] * 2, ["x"] * 2)
        assert r.tolist() == [1.0, 1.0]
    finally:
        reward.close()


def test_math_verify_sample_timeout_in_the_pool_frees_the_worker():
    reward = _SleepyReward(workers=2, timeout_s=0.5, deadline_s=30.0)
    try:
        r, infos = reward([""] * 4, ["30", "0.1", "0.1", "0.1"], ["x"] * 4)
        assert _reasons(infos) == ["timeout", None, None, None]
        assert r.tolist() == [0.0, 1.0, 1.0, 1.0]
    finally:
        reward.close()


# ---- registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["exact_match", "countdown", "math_verify"])
def test_registered_and_buildable(name):
    reward = REWARDS.build(name)
    r, infos = reward(["p"], ["1"], ["1"] if name != "countdown" else ["1,2=1"])
    assert r.tolist() == [1.0] and infos[0]["correct"] is True
    getattr(reward, "close", lambda: None)()


def test_registry_rejects_a_mistyped_hyperparameter():
    with pytest.raises(RegistryError, match="Did you mean 'timeout_s'"):
        REWARDS.build("math_verify", {"timeout": 1.0})
