"""Test plugin (loaded with --import): the hf sampler, recording every training rollout per rank.

Each training rollout's response ids and mask are appended to ``$LE_TEST_RECORD/rank<r>.jsonl``
(validation passes its own temperature and is not recorded). On rank 0, training rollout number
``$LE_TEST_SIGNAL_AT`` sends the process ``$LE_TEST_SIGNAL`` (e.g. SIGTERM): a kill that lands in
the middle of an RL step at a known step, without timing races.
"""

import json
import os
import signal
from pathlib import Path

import torch.distributed as dist

from lightning_entropy import register
from lightning_entropy.components.samplers import HFSampler


@register("sampler", "hf_recorded", override=True)
class RecordedHF(HFSampler):
    """hf; records this rank's training rollouts and can signal itself at one of them."""

    calls = 0

    def generate(self, model, tokenizer, prompts, group_size, **overrides):
        batch = super().generate(model, tokenizer, prompts, group_size, **overrides)
        if "temperature" in overrides:
            return batch
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.calls += 1
        out = Path(os.environ["LE_TEST_RECORD"]) / f"rank{rank}.jsonl"
        with open(out, "a") as fh:
            row = {"ids": batch.response_ids.tolist(), "mask": batch.response_mask.tolist()}
            fh.write(json.dumps(row) + "\n")
        if (
            rank == 0
            and os.environ.get("LE_TEST_SIGNAL")
            and self.calls == int(os.environ["LE_TEST_SIGNAL_AT"])
        ):
            os.kill(os.getpid(), getattr(signal, os.environ["LE_TEST_SIGNAL"]))
        return batch
