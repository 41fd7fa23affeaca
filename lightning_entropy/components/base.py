"""Protocol base classes of the six component families.

Components are pure tensor code: they never read the trainer or the config. Hyperparameters are
keyword arguments of ``__init__`` (the config layer reads that signature); per-step numbers that a
component wants logged go into ``self.metrics`` during the call and are logged under the family's
prefix. Stateful components override ``state_dict`` / ``load_state_dict`` so checkpoints resume them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_entropy.batch import PolicyView, RolloutBatch


class Component(ABC):
    registry_name: ClassVar[str] = ""
    # Optional RolloutBatch fields this component reads; the module fills them only when asked:
    # "ref_logprobs", "self_certainty", "sampled_logits", "paired_rewards", "discriminator_baseline".
    requires: ClassVar[frozenset[str]] = frozenset()
    # Reads pi_old's log-probs or entropy before the update's first forward (at rollout time, in
    # ``prepare`` or in mini-batch selection). Only when no component does, an on-policy step skips
    # the old-policy pass and takes them from the update's forward; so the default is True.
    needs_old_pass: ClassVar[bool] = True

    @property
    def metrics(self) -> dict[str, Any]:
        """Numbers to log for the current call; created lazily so subclasses need no super().__init__."""
        if "_metrics" not in self.__dict__:
            self.__dict__["_metrics"] = {}
        return self.__dict__["_metrics"]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state {sorted(state)}")

    def end_step(self, summary: dict[str, float]) -> None:
        """Called once after each RL step's update with that step's logged means (e.g. "entropy")."""

    def prepare_rollout(self, batch: RolloutBatch) -> None:
        """Called once per rollout (this rank's rows) after the advantages, before any update, on the
        selector and the loss: rollout-wide statistics (Clip_B's scope: step), or a loss's logit
        transform and pi_old under it (ERA's ``batch.logit_scale``)."""


class Sampler(Component):
    needs_old_pass: ClassVar[bool] = False

    @abstractmethod
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[str], group_size: int, **overrides: Any
    ) -> RolloutBatch:
        """``overrides``: ``temperature``, ``max_new_tokens``, and ``independent=True`` (validation's
        pass@k) for i.i.d. responses from samplers whose responses share structure (tree rollouts)."""

    def check_group_size(self, group_size: int) -> None:
        """Raise ValueError when this sampler cannot draw ``group_size`` responses per prompt (config
        validation calls it before any model loads)."""

    def observe(self, batch: RolloutBatch) -> None:
        """Called once per RL step, after the update, with the step's rollout (pi_old's entropy and
        log-probs filled in): samplers that adapt to the previous step's statistics read it here."""

    def after_update(self, model: torch.nn.Module, step: int) -> None:
        """Called after the updates of RL step ``step`` with the updated policy: a sampler that keeps
        its own copy of the weights (an inference engine) loads them here."""

    def close(self) -> None:
        """Called when the fit (or validation) ends: release an engine and what it holds."""


class Reward(Component):
    # Rewards that score from the policy's own statistics (entropy, ...) set this and implement
    # ``score_batch``; the module then calls it after the old-policy recompute.
    needs_policy_stats: ClassVar[bool] = False
    needs_old_pass: ClassVar[bool] = False  # policy-stat rewards are scored after the pass anyway

    @abstractmethod
    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[dict[str, Any]]]: ...

    def score_batch(self, batch: RolloutBatch) -> tuple[Tensor, list[dict[str, Any]]]:
        raise TypeError(f"{type(self).__name__} scores text only; it has no score_batch")


class AdvantageEstimator(Component):
    # RolloutBatch fields of ``batch.ESTIMATOR_FIELDS`` this estimator writes during its call, besides
    # the advantages it returns (COPO: a global advantage and blend weights for its loss).
    provides: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def __call__(self, batch: RolloutBatch) -> Tensor: ...


class TokenSelector(Component):
    # "minibatch": statistics pooled over the whole mini-batch (all micro-batches and ranks);
    # "micro": the official codes' per-micro-batch statistics from the current forward pass;
    # "step": over the whole rollout of every rank, fixed in ``prepare_rollout`` (batch.step_weights).
    scope: str = "minibatch"

    @abstractmethod
    def __call__(self, batch: RolloutBatch) -> Tensor: ...

    def micro(self, batch: RolloutBatch, entropy: Tensor, logprobs: Tensor | None = None) -> Tensor:
        """Weights for one micro-batch from the current policy's (detached) entropy and log-probs of
        the sampled tokens; called instead of ``__call__`` when scope=micro."""
        return self(batch)


class PolicyLoss(Component):
    # Losses whose effect depends on the importance ratio differing from 1 warn when every update
    # is on-policy (one epoch, one mini-batch).
    ratio_dependent: ClassVar[bool] = True
    # Force an aggregation mode (GSPO: seq-mean-token-mean); None keeps ``loss.agg``.
    agg_override: ClassVar[str | None] = None
    # Logit multipliers s (z' = s z) at which the old-policy pass also computes log pi_old
    # (``batch.scaled_old_logprobs``), for a loss that picks one per token in ``prepare_rollout``.
    logit_scales: ClassVar[tuple[float, ...]] = ()

    def policy_view(self) -> PolicyView | None:
        """The distribution this loss trains at the current step (BuPO's layer policy, ERA's top-k),
        or None for the full model's; the old-policy pass and the update both evaluate it."""
        return None

    def prepare(self, batch: RolloutBatch) -> None:
        """Mini-batch-scope statistics, computed once before the micro-batch loop."""

    @property
    def needs_old_pass(self) -> bool:  # type: ignore[override]
        # the loss call itself gets pi_old filled in; only `prepare` runs before any forward
        return type(self).prepare is not PolicyLoss.prepare

    @abstractmethod
    def __call__(
        self, logprobs: Tensor, batch: RolloutBatch, entropy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]: ...


class EntropyRegularizer(Component):
    needs_logits: ClassVar[bool] = False  # reads the micro-batch's full next-token logits
    needs_entropy_grad: ClassVar[bool] = False  # differentiates through the full-vocabulary entropy

    def modify_rollout(self, batch: RolloutBatch, resample: Any) -> RolloutBatch:
        """Hook for methods that change the rollout itself (AEPO), called after rewards are scored
        and before the old-policy recompute. ``resample(rows, temperature)`` draws ``group_size``
        fresh responses for the prompts of ``rows`` (indices of one response per group) with the
        current policy at that temperature and returns a scored RolloutBatch."""
        return batch

    def prepare(self, batch: RolloutBatch) -> None:
        """Mini-batch-scope statistics, computed once before the micro-batch loop."""

    @property
    def needs_old_pass(self) -> bool:  # type: ignore[override]
        return type(self).prepare is not EntropyRegularizer.prepare

    @abstractmethod
    def __call__(
        self, logits: Tensor | None, logprobs: Tensor, entropy: Tensor, batch: RolloutBatch, step: int
    ) -> tuple[Tensor, dict[str, Any]]: ...
