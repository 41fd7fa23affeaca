"""Test plugin (loaded with --import): exact_match that signals its own process mid-step.

While scoring training rollout number $LE_TEST_SIGNAL_AT (a call with ``train_batch`` completions;
validation calls have another size) it sends itself $LE_TEST_SIGNAL (e.g. SIGTERM): the signal
arrives in the middle of an RL step, as a real one would.
"""

import os
import signal

from lightning_entropy import register
from lightning_entropy.components.rewards import ExactMatchReward


@register("reward", "signal_at_step", override=True)
class SignalAtStep(ExactMatchReward):
    """exact_match; sends $LE_TEST_SIGNAL to itself while scoring training rollout $LE_TEST_SIGNAL_AT."""

    def __init__(self, *, train_batch: int = 16) -> None:
        super().__init__()
        self.train_batch = train_batch
        self.calls = 0

    def __call__(self, prompts, completions, references):
        if len(completions) == self.train_batch:
            self.calls += 1
            if os.environ.get("LE_TEST_SIGNAL") and self.calls == int(os.environ["LE_TEST_SIGNAL_AT"]):
                os.kill(os.getpid(), getattr(signal, os.environ["LE_TEST_SIGNAL"]))
        return super().__call__(prompts, completions, references)
