"""The rollout stage: reward hygiene, DAPO's overlong shaping and dynamic sampling."""

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.base import Reward, Sampler
from lightning_entropy.forward import PolicyForward
from lightning_entropy.metrics import PhaseTimer
from lightning_entropy.rollout import RolloutStage, _split_groups, overlong_penalty


class ScriptedSampler(Sampler):
    """Each call returns responses whose completion text is the next scripted reward."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def generate(self, model, tokenizer, prompts, group_size, **kw):
        self.calls += 1
        B = len(prompts) * group_size
        rewards = [self.script.pop(0) for _ in range(B)]
        return RolloutBatch(
            prompt_ids=torch.ones(B, 2, dtype=torch.long),
            prompt_mask=torch.ones(B, 2, dtype=torch.long),
            response_ids=torch.ones(B, 3, dtype=torch.long),
            response_mask=torch.ones(B, 3, dtype=torch.long),
            group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
            truncated=torch.zeros(B, dtype=torch.bool),
            info=[{"prompt": prompts[i // group_size], "completion": str(r)} for i, r in enumerate(rewards)],
        )


class TextReward(Reward):
    registry_name = "text"

    def __call__(self, prompts, completions, references):
        return torch.tensor([float(c) for c in completions]), [{} for _ in completions]


def _stage(script, **kw):
    comps = {"sampler": ScriptedSampler(script), "reward": TextReward()}
    tok = SimpleNamespace(pad_token_id=0)
    return RolloutStage(comps, tok, PolicyForward(), group_size=2, skip_old_pass=True, uses_ref=False, **kw)


def _examples(n):
    return [SimpleNamespace(prompt=f"p{i}", answer=None) for i in range(n)]


def test_overlong_penalty_by_hand():
    # L_max 20, L_cache 4: no penalty up to 16, then -1/4 per token, -1 at 20 (x factor)
    lengths = torch.tensor([3, 16, 17, 18, 20])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, 20, 4, factor=0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]


def test_non_finite_reward_scores_zero_and_is_counted_or_stops_the_run():
    stage = _stage([1.0, math.nan, math.inf, 0.5])
    batch = stage.sample(None, _examples(2), 0, PhaseTimer())
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 0.5]
    assert batch.info[1]["reward_error"] == "non-finite reward nan"
    assert stage.c["reward"].metrics["nonfinite_rewards"] == 2.0
    strict = _stage([1.0, math.nan], strict_rewards=True)
    with pytest.raises(RuntimeError, match=r"reward 'text' returned nan for sample 1 \(prompt 'p0'"):
        strict.sample(None, _examples(1), 0, PhaseTimer())


def test_dynamic_sampling_keeps_informative_groups_and_draws_more():
    # first round: groups (1,1) (0,1) (0,0) -> one informative; second round two more prompts:
    # (1,0) informative, (1,1) not -> two of three wanted; third round: (0,1) -> done
    script = [1, 1, 0, 1, 0, 0] + [1, 0, 1, 1, 1, 1] + [0, 1, 0, 0, 0, 0]
    stage = _stage(script, dynamic_sampling=True, max_sampling_rounds=5)
    drawn = []

    def extra(round_, n):
        drawn.append((round_, n))
        return _examples(n)

    timer = PhaseTimer()
    first = _examples(3)
    batch = stage.sample(None, first, 0, timer)
    lookup = dict(enumerate(first))  # what the stage starts from: group id -> example
    out = stage.informative(None, batch, extra, timer, lookup)
    assert drawn == [(1, 3), (2, 3)]
    assert out.size == 6 and out.rewards.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert torch.unique(out.group_ids).numel() == 3  # ids stay distinct across rounds
    assert set(out.group_ids.tolist()) <= set(lookup)  # every kept group maps back to its prompt
    m = stage.c["sampler"].metrics
    assert m["sampling_rounds"] == 3.0 and m["filled_groups"] == 0.0


def test_dynamic_sampling_fills_with_uninformative_groups_at_the_round_cap():
    script = [1, 1, 0, 1] + [0, 0, 1, 1]
    stage = _stage(script, dynamic_sampling=True, max_sampling_rounds=2)
    timer = PhaseTimer()
    batch = stage.sample(None, _examples(2), 0, timer)
    out = stage.informative(None, batch, lambda r, n: _examples(n), timer, {})
    # one informative group (0,1), filled with the first dropped group (1,1): same size on every rank
    assert out.size == 4 and out.rewards.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert stage.c["sampler"].metrics["filled_groups"] == 1.0


def test_dynamic_sampling_filters_on_the_score_before_the_overlong_penalty():
    # both responses correct (1, 1) but of different lengths: still an all-equal group for DAPO
    stage = _stage([1.0, 1.0, 0.0, 1.0], overlong=(3, 1, 1.0))
    batch = stage.sample(None, _examples(2), 0, PhaseTimer())
    assert batch.rewards.tolist() == [0.0, 0.0, -1.0, 0.0]  # every response is 3 tokens: -1 each
    kept, spare = _split_groups(batch)
    assert len(kept) == 1 and len(spare) == 1
