import math

import pytest
import torch

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.rewards import extract_answer, groups_from_prompts
from lightning_entropy.registry import REWARDS

UNSUPERVISED = [n for n in REWARDS.names() if getattr(REWARDS.get(n), "unsupervised", False)]


def make_batch(completions, group_ids, entropy=None, lengths=None, T=4):
    B = len(completions)
    lengths = torch.tensor(lengths if lengths is not None else [T] * B)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    g = torch.Generator().manual_seed(0)
    return RolloutBatch(
        prompt_ids=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.ones(B, T, dtype=torch.long) * mask,
        response_mask=mask,
        group_ids=torch.tensor(group_ids),
        truncated=lengths == T,
        old_logprobs=-torch.rand(B, T, generator=g) * mask,
        entropy=(entropy if entropy is not None else torch.rand(B, T, generator=g)) * mask,
        info=[{"prompt": f"q{gid}", "completion": c} for c, gid in zip(completions, group_ids)],
    )


def score(reward, completions, group_ids, **kw):
    """Score through the module's path (score_batch) when the reward has one, else through __call__."""
    if reward.needs_policy_stats:
        return reward.score_batch(make_batch(completions, group_ids, **kw))
    return reward([f"q{g}" for g in group_ids], completions, [None] * len(completions))


# ---- registry-driven ---------------------------------------------------------------------------


def test_the_unsupervised_rewards_are_registered():
    assert {"rent", "em_rl", "empo", "majority_vote", "constant"} <= set(UNSUPERVISED)


@pytest.mark.parametrize("name", UNSUPERVISED)
def test_every_unsupervised_reward_scores_a_random_batch_without_references(name):
    reward = REWARDS.build(name, {})
    completions = ["12", "\\boxed{7}", "", "x = 3", "12", "no digits", "4", "4"]
    rewards, infos = score(reward, completions, [0, 0, 0, 0, 1, 1, 1, 1], lengths=[4, 2, 0, 3, 1, 4, 4, 2])
    assert rewards.shape == (8,) and rewards.dtype == torch.float32
    assert torch.isfinite(rewards).all() and len(infos) == 8
    assert REWARDS.get(name).unsupervised


# ---- answer extraction and grouping --------------------------------------------------------------


@pytest.mark.parametrize(
    "text,how,expected",
    [
        ("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}", "auto", "x^{2}"),
        ("\\boxed{3", "boxed", None),  # unclosed
        ("the sum is 12, not 13.5", "number", "13.5"),
        ("the sum is 12, not 13.5", "auto", "13.5"),
        ("  forty   two ", "auto", "forty two"),
        ("  forty   two ", "number", None),
        ("", "text", None),
        ("", "none", ""),
        ("3/4 of it", "number", "3/4"),
        ("-5", "auto", "-5"),
    ],
)
def test_extract_answer(text, how, expected):
    assert extract_answer(text, how) == expected


def test_groups_from_prompts_are_runs_of_identical_prompts():
    assert groups_from_prompts(["a", "a", "b", "b", "b", "a"]) == [0, 0, 1, 1, 1, 2]
    assert groups_from_prompts([]) == []


# ---- EMPO ---------------------------------------------------------------------------------------


def test_empo_cluster_shares_and_semantic_entropy():
    reward = REWARDS.build("empo", {})
    rewards, infos = score(reward, ["5", "x 5", "7", ""], [0, 0, 0, 0])
    # clusters {5, 5}, {7}, {missing}: SE = -(1/2 log 1/2 + 2 * 1/4 log 1/4) < log 4
    se = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert rewards.tolist() == pytest.approx([0.5, 0.5, 0.25, 0.0])
    assert infos[0]["semantic_entropy"] == pytest.approx(se)
    assert infos[3]["extracted"] is None


def test_empo_edge_cases():
    reward = REWARDS.build("empo", {})
    distinct, _ = score(reward, ["1", "2", "3", "4"], [0, 0, 0, 0])
    assert distinct.tolist() == [0.0] * 4  # SE = log G
    same, _ = score(reward, ["9", "9", "9"], [0, 0, 0])
    assert same.tolist() == [1.0] * 3
    single, _ = score(reward, ["9"], [0])
    assert single.tolist() == [0.0]  # a group of one: SE = 0 = log 1
    empty, _ = score(reward, ["", " ", ""], [0, 0, 0])
    assert empty.tolist() == [0.0] * 3  # missing answers cluster together but earn nothing


def test_empo_groups_by_group_id_in_score_batch_and_by_prompt_in_call():
    reward = REWARDS.build("empo", {})
    via_ids = reward.score_batch(make_batch(["1", "2", "1", "3"], [0, 1, 0, 1]))[0]
    assert via_ids.tolist() == [1.0, 0.0, 1.0, 0.0]  # group 1 ({2}, {3}) is all-distinct
    via_prompts = reward(["a", "a", "b", "b"], ["1", "1", "2", "3"], [None] * 4)[0]
    assert via_prompts.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_empo_math_verify_equivalence():
    reward = REWARDS.build("empo", {"equivalence": "math_verify"})
    rewards, infos = score(reward, ["\\boxed{\\frac{1}{2}}", "0.5", "1/2", "3"], [0, 0, 0, 0])
    assert rewards.tolist() == pytest.approx([0.75, 0.75, 0.75, 0.25])
    exact, _ = score(REWARDS.build("empo", {}), ["\\boxed{\\frac{1}{2}}", "0.5", "1/2", "3"], [0] * 4)
    assert exact.tolist() == [0.0] * 4


# ---- majority vote ------------------------------------------------------------------------------


def test_majority_vote():
    reward = REWARDS.build("majority_vote", {})
    rewards, infos = score(reward, ["5", "5", "7", ""], [0, 0, 0, 0])
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert infos[2]["majority"] == "5" and infos[2]["vote_share"] == 0.5
    tie, infos = score(reward, ["7", "5", "5", "7"], [0, 0, 0, 0])
    assert tie.tolist() == [1.0, 0.0, 0.0, 1.0]  # tie: the answer seen first wins
    none, _ = score(reward, ["", "", ""], [0, 0, 0])
    assert none.tolist() == [0.0] * 3
    assert score(reward, ["8"], [0])[0].tolist() == [1.0]
    distinct, _ = score(reward, ["1", "2", "3"], [0, 0, 0])
    assert distinct.tolist() == [1.0, 0.0, 0.0]


# ---- RENT and EM-RL -----------------------------------------------------------------------------


def test_rent_negative_mean_response_entropy_with_format_fallback():
    entropy = torch.tensor([[0.4, 0.2, 0.6, 9.0], [1.0, 3.0, 9.0, 9.0], [0.5, 0.5, 0.5, 0.5]])
    batch = make_batch(["12", "\\boxed{1}", ""], [0, 0, 0], entropy=entropy, lengths=[3, 2, 4])
    rewards, infos = REWARDS.build("rent", {}).score_batch(batch)
    assert rewards.tolist() == pytest.approx([-0.4, -2.0, -7.0])  # no answer in "" -> entropy_base
    assert [i["format_ok"] for i in infos] == [True, True, False]
    boxed, _ = REWARDS.build("rent", {"extractor": "boxed", "entropy_base": 5.0}).score_batch(batch)
    assert boxed.tolist() == pytest.approx([-5.0, -2.0, -5.0])
    never, _ = REWARDS.build("rent", {"extractor": "none"}).score_batch(batch)
    assert never.tolist() == pytest.approx([-0.4, -2.0, -0.5])


def test_rent_needs_the_policy_statistics():
    reward = REWARDS.build("rent", {})
    assert reward.needs_policy_stats
    with pytest.raises(TypeError, match="score_batch"):
        reward(["q"], ["1"], [None])


def test_em_rl_token_and_trajectory_variants():
    batch = make_batch(["a", "b"], [0, 0], lengths=[4, 1])
    mask = batch.response_mask.float()
    token, _ = REWARDS.build("em_rl", {}).score_batch(batch)
    assert torch.allclose(token, -(batch.entropy * mask).sum(-1))
    assert token[1].item() == pytest.approx(-batch.entropy[1, 0].item())
    traj, _ = REWARDS.build("em_rl", {"variant": "trajectory"}).score_batch(batch)
    assert torch.allclose(traj, (batch.old_logprobs * mask).sum(-1))
    empty = make_batch(["", ""], [0, 0], lengths=[0, 0])
    assert REWARDS.build("em_rl", {}).score_batch(empty)[0].tolist() == [0.0, 0.0]


def test_constant_reward_makes_group_advantages_zero():
    from lightning_entropy.components.advantages import GRPOAdvantage

    batch = make_batch(["1", "2", "3", "4"], [0, 0, 1, 1])
    batch.rewards, _ = REWARDS.build("constant", {"value": 0.5})(["q"] * 4, ["1", "2", "3", "4"], [None] * 4)
    assert batch.rewards.tolist() == [0.5] * 4
    assert GRPOAdvantage()(batch).abs().sum() == 0


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("rent", {"extractor": "latex"}),
        ("empo", {"equivalence": "fuzzy"}),
        ("majority_vote", {"extractor": "none"}),
        ("em_rl", {"variant": "sequence"}),
    ],
)
def test_bad_hyperparameters_fail_naming_the_parameter(name, kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        REWARDS.get(name)(**kwargs)


def test_em_configs_follow_the_paper():
    # arXiv 2505.15134 (METHODS.md §8.5): EM-RL is REINFORCE with an RLOO baseline; EM-FT averages the
    # token entropy per response, then over responses (seq-mean-token-mean)
    from pathlib import Path

    from lightning_entropy.config import load_config, validate

    root = Path(__file__).resolve().parents[2] / "configs"
    rl = load_config(root / "em_rl.yaml")
    validate(rl)
    assert rl.reward.name == "em_rl" and rl.advantage.name == "rloo"
    # one on-policy update per step: PPO's ratio is exactly 1, its loss the REINFORCE -A log pi
    assert rl.loss.name == "ppo" and rl.algo.ppo_epochs == 1 and rl.algo.mini_batch_size is None
    ft = load_config(root / "em_ft.yaml")
    validate(ft)
    assert ft.regularizer.name == "em_ft" and ft.loss.agg == "seq-mean-token-mean"
