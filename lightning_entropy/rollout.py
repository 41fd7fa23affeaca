"""The rollout stage of an RL step: sample, score, old-policy statistics, advantages.

Also the validation pass (greedy accuracy and pass@k), which samples and scores the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.rewards import call_reward
from lightning_entropy.forward import OLD_PASS_EXTRAS, PolicyForward
from lightning_entropy.metrics import MetricBank, PhaseTimer, ScalarMean, TokenQuantiles


class RolloutStage:
    """Prompts -> a scored RolloutBatch with pi_old statistics and advantages.

    ``components`` is keyed by config section. The old-policy pass is skipped when ``skip_old_pass``
    (every update of the step is on-policy and no component reads pi_old before the update): the
    first training forward then supplies the same log-probs and entropy.
    """

    def __init__(
        self,
        components: dict[str, Any],
        tokenizer: Any,
        forward: PolicyForward,
        group_size: int,
        skip_old_pass: bool,
        uses_ref: bool,
        strict_rewards: bool = False,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 10,
        overlong: tuple[int, int, float] | None = None,
    ) -> None:
        self.c = components
        self.tokenizer = tokenizer
        self.forward = forward
        self.group_size = group_size
        self.skip_old_pass = skip_old_pass
        self.uses_ref = uses_ref
        self.strict_rewards = strict_rewards
        self.dynamic_sampling, self.max_rounds = dynamic_sampling, max_sampling_rounds
        self.overlong = overlong  # (max_new_tokens, buffer, penalty factor)
        self.needs = set().union(*(c.requires for c in components.values()))

    # ---- sampling and scoring ----------------------------------------------------------------
    def sample(
        self, policy: torch.nn.Module, examples: list[Any], group_offset: int, timer: PhaseTimer,
        temperature: float | None = None,
    ) -> RolloutBatch:
        """``group_size`` responses per example, scored by a text reward (if the reward is one)."""
        kw = {} if temperature is None else {"temperature": temperature}
        with timer("generate"):
            batch = self.c["sampler"].generate(
                policy, self.tokenizer, [e.prompt for e in examples], self.group_size, **kw
            )
        batch.group_ids = batch.group_ids + group_offset
        refs = [examples[i // self.group_size].answer for i in range(batch.size)]
        reward = self.c["reward"]
        if reward.needs_policy_stats:
            for i, r in enumerate(refs):
                batch.info[i]["reference"] = r
        else:
            with timer("score"):
                score(batch, refs, reward, self.strict_rewards)
            if self.overlong is not None:
                penalty = overlong_penalty(batch.lengths, *self.overlong)
                batch.rewards = batch.rewards + penalty
                for i, p in enumerate(penalty.tolist()):
                    batch.info[i]["overlong_penalty"] = p
        return batch

    def informative(
        self,
        policy: torch.nn.Module,
        batch: RolloutBatch,
        extra_examples: Any,
        timer: PhaseTimer,
        lookup: dict[int, Any],
    ) -> RolloutBatch:
        """DAPO's dynamic sampling: keep only groups whose rewards differ, drawing
        ``extra_examples(round, n)`` prompts until the batch has as many groups as it started
        with or ``max_sampling_rounds`` generations ran; then fill up with the dropped groups, so
        every rank ends with the same number of groups (their advantages are 0, as without it).
        ``lookup`` (group id -> example) gains the extra prompts' groups."""
        want = int(torch.unique(batch.group_ids).numel())
        kept, spare = _split_groups(batch)
        rounds, next_id = 1, int(batch.group_ids.max()) + 1
        while len(kept) < want and rounds < self.max_rounds:
            examples = extra_examples(rounds, want)
            more = self.sample(policy, examples, next_id, timer)
            lookup.update({next_id + i: e for i, e in enumerate(examples)})
            next_id = int(more.group_ids.max()) + 1
            k, sp = _split_groups(more)
            kept, spare, rounds = kept + k, spare + sp, rounds + 1
        dropped = len(spare)
        groups = (kept + spare)[:want]
        self.c["sampler"].metrics.update(
            sampling_rounds=float(rounds), dropped_groups=float(dropped), filled_groups=float(max(0, want - len(kept)))
        )
        return RolloutBatch.cat(groups, pad_id=self.tokenizer.pad_token_id or 0)

    def __call__(
        self,
        policy: torch.nn.Module,
        ref_policy: torch.nn.Module | None,
        examples: list[Any],
        group_offset: int,
        timer: PhaseTimer,
        extra_examples: Any = None,
    ) -> RolloutBatch:
        """``extra_examples(round, n)`` gives more prompts for dynamic sampling."""
        batch = self.sample(policy, examples, group_offset, timer)
        lookup = {group_offset + i: e for i, e in enumerate(examples)}  # group id -> its example
        if self.dynamic_sampling:
            batch = self.informative(policy, batch, extra_examples, timer, lookup)

        def resample(rows: list[int], temperature: float) -> RolloutBatch:
            picked = [lookup[int(batch.group_ids[r])] for r in rows]
            out = self.sample(policy, picked, 0, timer, temperature=temperature)
            rows_t = torch.tensor(rows, device=out.group_ids.device)
            out.group_ids = batch.group_ids[rows_t].repeat_interleave(self.group_size)
            return out

        batch = self.c["regularizer"].modify_rollout(batch, resample)
        batch.policy_view = self.c["loss"].policy_view()  # BuPO's layer policy, ERA's top-k, or None
        with timer("old_pass"):
            self.forward.old_policy_pass(
                policy,
                batch,
                ref_policy=ref_policy if self.uses_ref else None,
                extras=frozenset(self.needs & OLD_PASS_EXTRAS),
                policy_stats=not self.skip_old_pass,
                logit_scales=self.c["loss"].logit_scales,
            )
        reward = self.c["reward"]
        if reward.needs_policy_stats:
            with timer("score"):
                rewards, infos = reward.score_batch(batch)
            batch.rewards = rewards.to(batch.response_ids.device, torch.float32)
            for i, extra in enumerate(infos):
                batch.info[i].update(extra)
        if "paired_rewards" in self.needs:  # AAPO: a second, index-paired sample's reward
            batch.paired_rewards = self.sample(policy, examples, 0, timer).rewards
        adv = self.c["advantage"](batch) * batch.response_mask
        if batch.advantage_override is not None:  # rows whose advantage a regularizer fixed (AEPO)
            o = batch.advantage_override.to(adv.dtype)
            fixed = ~torch.isnan(o)
            adv = torch.where(fixed[:, None], o[:, None] * batch.response_mask, adv)
        batch.advantages = adv
        for section in ("selector", "loss"):
            self.c[section].prepare_rollout(batch)
        return batch


def score(batch: RolloutBatch, references: list[str | None], reward: Any, strict: bool = False) -> None:
    """Text rewards for every response. A reward that raises on a sample, or returns NaN/inf for it,
    scores that sample 0 with the reason recorded and counted (``rollout/errors``,
    ``rollout/nonfinite_rewards``), or stops the run when ``strict``."""
    prompts = [i["prompt"] for i in batch.info]
    completions = [i["completion"] for i in batch.info]
    rewards, infos = call_reward(reward, prompts, completions, references, strict=strict)
    rewards = torch.as_tensor(rewards).to(batch.response_ids.device, torch.float32)
    bad = ~torch.isfinite(rewards)
    if bad.any():
        i = int(bad.nonzero()[0])
        if strict:
            raise RuntimeError(
                f"reward '{reward.registry_name}' returned {rewards[i].item()} for sample {i} "
                f"(prompt {prompts[i]!r}, completion {completions[i]!r}); reward.strict=true stops here"
            )
        for j in bad.nonzero().flatten().tolist():
            infos[j] = {**infos[j], "reward_error": f"non-finite reward {rewards[j].item()}"}
        rewards = torch.where(bad, torch.zeros_like(rewards), rewards)
    reward.metrics["nonfinite_rewards"] = float(bad.sum())
    batch.rewards = rewards
    for i, extra in enumerate(infos):
        batch.info[i].update(extra, reference=references[i])


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13; verl's ``overlong_buffer``):
    min(-(L - (L_max - L_cache)) / L_cache * factor, 0), i.e. 0 up to L_max - L_cache, falling
    linearly to -factor at L_max."""
    exceed = lengths.to(torch.float32) - (max_len - buffer)
    return torch.clamp(-exceed / buffer * factor, max=0.0)


def _split_groups(batch: RolloutBatch) -> tuple[list[RolloutBatch], list[RolloutBatch]]:
    """The batch's groups, as (groups whose scores differ, groups whose scores are all equal); the
    score is the reward before the overlong penalty (DAPO filters on accuracy, not length)."""
    ids = batch.group_ids
    shaped = torch.tensor([i.get("overlong_penalty", 0.0) for i in batch.info], device=ids.device)
    scores = batch.rewards - shaped
    kept, spare = [], []
    for g in torch.unique_consecutive(ids).tolist():
        rows = (ids == g).nonzero().flatten()
        r = scores[rows]
        (kept if bool((r != r[0]).any()) else spare).append(batch.index(rows))
    return kept, spare


def correct(batch: RolloutBatch) -> Tensor:
    """Per-response correctness: the reward's own verdict where it gives one, else reward > 0."""
    return torch.tensor(
        [bool(i.get("correct", r > 0)) for i, r in zip(batch.info, batch.rewards.tolist())],
        dtype=torch.float32,
    )


# the reward validation scores with when training's needs the policy or no reference answer
TASK_REWARDS = {"arithmetic": "exact_match", "countdown": "countdown"}


def validation_reward(reward: Any, name: str | None, task: str) -> Any:
    """The training reward, unless ``logging.val_reward`` names another or the training reward
    cannot judge a reference answer alone (it reads the policy, or it is unsupervised)."""
    from lightning_entropy.registry import REWARDS

    if not name and not (reward.needs_policy_stats or getattr(reward, "unsupervised", False)):
        return reward
    return REWARDS.build(name or TASK_REWARDS.get(task, "math_verify"), {}, key="logging.val_reward")


@torch.no_grad()
def evaluate(
    sampler: Any,
    policy: torch.nn.Module,
    tokenizer: Any,
    examples: list[Any],
    reward: Any,
    samples: int,
    temperature: float,
    bank: MetricBank,
    pass_k: Any,
) -> tuple[RolloutBatch, Tensor]:
    """Greedy accuracy (``val/acc``) and unbiased pass@k over ``samples`` draws per prompt; returns
    the drawn samples and their correctness (for the validation diagnostics)."""
    prompts = [e.prompt for e in examples]
    refs = [e.answer for e in examples]
    greedy = sampler.generate(policy, tokenizer, prompts, 1, temperature=0.0)
    score(greedy, refs, reward)
    bank.update("val/acc", correct(greedy), kind=ScalarMean)
    drawn = sampler.generate(policy, tokenizer, prompts, samples, temperature=temperature, independent=True)
    score(drawn, [refs[i // samples] for i in range(drawn.size)], reward)
    hits = correct(drawn)
    bank.update("val/", hits.bool(), drawn.group_ids.cpu(), kind=pass_k)
    return drawn, hits


def record_rollout(bank: MetricBank, batch: RolloutBatch, components: dict[str, Any]) -> None:
    """The rollout's statistics: reward, lengths, token entropy and its quantiles, Cov(log pi, A),
    advantages, and every component's rollout-time metrics."""
    from lightning_entropy.metrics import Covariance, RewardStd, TokenMean, ZeroVarianceGroups

    mask = batch.response_mask.float()
    r = batch.rewards.float()
    bank.update("train/reward", r, kind=ScalarMean)
    bank.update("train/reward_std", r, kind=RewardStd)
    bank.update("train/response_len", batch.lengths.float(), kind=ScalarMean)
    bank.update("train/truncated_frac", batch.truncated.float(), kind=ScalarMean)
    bank.update("train/entropy", batch.entropy, mask, kind=TokenMean)
    bank.update("train/entropy_", batch.entropy, mask, kind=TokenQuantiles)  # -> train/entropy_p10 ...
    bank.update("train/cov_logp_adv", batch.old_logprobs, batch.advantages, mask, kind=Covariance)
    bank.update("train/zero_var_groups", r, batch.group_ids, kind=ZeroVarianceGroups)
    if batch.rollout_logprobs is not None:  # the sampler's log-probs against the training model's
        record_mismatch(bank, batch)
    adv = batch.advantages
    bank.update("adv/mean", adv, mask)
    bank.update("adv/std", adv[mask > 0], kind=RewardStd)
    bank.update("adv/zero_token_frac", (adv == 0).float(), mask)
    bank.update("adv/pos_frac", (adv > 0).float(), mask)
    # responses with A = 0 throughout (all-equal groups, or QAE's gate)
    bank.update("adv/zero_frac", ((adv == 0) | (mask == 0)).all(-1).float(), kind=ScalarMean)
    seq_adv = (adv * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    bank.update("adv/seq_abs_mean", seq_adv.abs(), kind=ScalarMean)
    sources = (
        (f"adv/{components['advantage'].registry_name}/", components["advantage"]),
        ("rollout/", components["reward"]),
        ("rollout/", components["sampler"]),
        ("regularizer/rollout_", components["regularizer"]),  # set by modify_rollout
    )
    for prefix, comp in sources:
        for k, v in comp.metrics.items():
            bank.tokens(prefix + k, v, mask)
        comp.metrics.clear()


def record_mismatch(bank: MetricBank, batch: RolloutBatch) -> None:
    """Rollout vs training log-probs of the sampled tokens: ``rollout/mismatch_k3`` (token-mean k3
    estimate of KL(pi_rollout || pi_train)), ``rollout/mismatch_max_abs`` (largest |log-prob
    difference|, max over ranks) and ``rollout/mismatch_far_frac`` (share of tokens whose ratio
    pi_train / pi_rollout is outside [1/2, 2])."""
    from torchmetrics.aggregation import MaxMetric

    from lightning_entropy.components.losses import rollout_mismatch

    mask = batch.response_mask.float()
    m = rollout_mismatch(batch.old_logprobs, batch.rollout_logprobs, mask)
    bank.update("rollout/mismatch_k3", m["k3"], mask)
    bank.update("rollout/mismatch_max_abs", m["abs_diff"].max().reshape(1), kind=MaxMetric)
    bank.update("rollout/mismatch_far_frac", m["far"], mask)
