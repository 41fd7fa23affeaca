"""The RL-step DataModule over prompts from a built-in task (``tasks.py``) or files
(``records.py``): one global batch of prompts per RL step, sharded over ranks, resumable."""

from __future__ import annotations

import random
import sys
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_entropy.prompts import DataError, PromptFormat, encode_prompt, messages_of
from lightning_entropy.records import load_examples, records_to_examples
from lightning_entropy.tasks import (
    TASKS,
    ArithmeticTask,
    CountdownTask,
    Example,
    Task,
    derive_seed,
    make_task,
)

__all__ = [  # the data API in one place (tasks and file records live in their own modules)
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "Example",
    "PromptDataModule",
    "build_datamodule",
    "derive_seed",
    "load_examples",
    "make_task",
    "records_to_examples",
]
# ---- DataModule --------------------------------------------------------------------------------


def _keep(batch: Any) -> Any:
    """Collate that leaves a ready batch as is (a module-level function, so it pickles)."""
    return batch


class _StepStream(IterableDataset):
    """Infinite stream of this rank's RL-step batches, from the DataModule's current position."""

    def __init__(self, dm: PromptDataModule, rank: int, world: int) -> None:
        self.dm, self.rank, self.world = dm, rank, world

    def __iter__(self):
        k = self.dm.position
        while True:
            yield self.dm.step_batch(k, self.rank, self.world)
            k += 1


class _Batches(IterableDataset):
    # Iterable, not map-style, so Lightning never wraps it in a DistributedSampler (we shard ourselves).
    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _own_generator(seed: int) -> torch.Generator:
    # Creating a DataLoader iterator draws a base seed; from the global RNG that draw would shift the
    # sampling stream whenever an iterator is (re)created, e.g. on resume or for each validation.
    return torch.Generator().manual_seed(seed)


class PromptDataModule(L.LightningDataModule):
    """RL-step batches of prompts: batch k is ``{"index": k, "examples": [...], "group_offset": int}``,
    this rank's contiguous share of the k-th global batch of ``prompts_per_step`` prompts.

    The global prompt sequence concatenates per-epoch permutations of the train set (each seeded by
    (seed, epoch)), so batch k is a pure function of (seed, k) and resuming needs only ``position``.
    ``group_offset`` is the global index of the rank's first prompt in that sequence: group ids built
    as group_offset + i never collide across ranks or steps. ``path`` (a file or hf: source), when
    set, replaces the built-in ``task``; without ``val_path`` the validation set is carved out of it.
    ``rank``/``world_size`` override the trainer's (tests, custom launchers).
    """

    def __init__(
        self,
        *,
        task: str | None = "arithmetic",
        path: str | None = None,
        val_path: str | None = None,
        difficulty: int = 2,
        train_size: int | None = 5000,
        val_size: int = 128,
        prompt_key: str = "prompt",
        answer_key: str | None = "answer",
        answer_regex: str | None = None,
        split: str = "train",
        val_split: str = "test",
        prompt_format: PromptFormat | None = None,
        prompts_per_step: int = 16,
        val_batch_size: int = 64,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        **task_options: Any,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("prompts_per_step", prompts_per_step, 1),
            ("val_batch_size", val_batch_size, 1),
            ("val_size", val_size, 0),
        ):
            if value < low:
                raise ValueError(f"{name}={value} must be >= {low}")
        if train_size is not None and train_size < 1:
            raise ValueError(f"train_size={train_size} must be >= 1 (or None: the whole file)")
        if path is None:
            if task is None:
                raise ValueError("set task (a built-in task) or path (a prompt file or hf: dataset)")
            if train_size is None:
                raise ValueError(f"train_size=None only applies to files; task {task!r} needs a size")
            self.task: Task | None = make_task(task, difficulty, **task_options)
        else:
            self.task = None
            if task_options:
                raise ValueError(f"task options {sorted(task_options)} do not apply to path={path!r}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: set both, with 0 <= rank < world_size")
        self.path, self.val_path = path, val_path
        self.train_size, self.val_size = train_size, val_size
        self.prompt_key, self.answer_key, self.answer_regex = prompt_key, answer_key, answer_regex
        self.split, self.val_split = split, val_split
        self.prompt_format = prompt_format or PromptFormat()
        self.tokenizer: Any = None  # attached by ``prepare``: formatting and the length filter need it
        self.max_prompt_tokens: int | None = None
        self.long_prompts = "drop"
        self.dropped: dict[str, int] = {}
        self.prompts_per_step, self.val_batch_size, self.seed = prompts_per_step, val_batch_size, seed
        self.rank, self.world = rank, world_size
        self.position = 0
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self._perms: dict[int, list[int]] = {}

    # ---- building -------------------------------------------------------------------------
    def _load(self, source: str, split: str) -> list[Example]:
        return load_examples(
            source,
            split,
            prompt_key=self.prompt_key,
            answer_key=self.answer_key,
            answer_regex=self.answer_regex,
            file_split=self.split if split == "train" else self.val_split,
        )

    def prepare(
        self, tokenizer: Any, max_prompt_tokens: int | None = None, long_prompts: str = "drop"
    ) -> None:
        """Attach the policy's tokenizer, then load, format and length-filter every prompt now (the
        CLI calls this before it creates the run directory, so data errors cost seconds and leave
        nothing behind). Prompts longer than ``max_prompt_tokens`` are dropped and counted
        (``long_prompts="drop"``) or fail naming the first one (``"error"``), never truncated."""
        if long_prompts not in ("drop", "error"):
            raise DataError(f"data.long_prompts={long_prompts!r} must be drop or error")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise DataError(f"data.max_prompt_tokens={max_prompt_tokens} must be >= 1")
        self.tokenizer, self.max_prompt_tokens, self.long_prompts = tokenizer, max_prompt_tokens, long_prompts
        self.train_examples, self.val_examples = [], []
        self.setup()

    def format_examples(self, examples: list[Example], split: str) -> list[Example]:
        """Examples with their final prompt text (template, system prompt, chat template), without the
        prompts over the token limit; a no-op until ``prepare`` attached a tokenizer."""
        if self.tokenizer is None:
            return examples
        fmt, out, too_long = self.prompt_format, [], []
        for ex in examples:
            messages = ex.meta.get("messages") or messages_of(ex.prompt)
            text = (
                ex.prompt
                if fmt.is_identity and messages is None
                else fmt.render(ex.prompt, messages, self.tokenizer)
            )
            n_tokens = len(encode_prompt(self.tokenizer, text))
            if self.max_prompt_tokens is not None and n_tokens > self.max_prompt_tokens:
                if self.long_prompts == "error":
                    where = ex.meta.get("where") or f"{self.task.describe()} {split} problem {ex.prompt!r}"
                    raise DataError(
                        f"{where}: a {n_tokens}-token prompt, over data.max_prompt_tokens="
                        f"{self.max_prompt_tokens} (set data.long_prompts=drop to skip such prompts)"
                    )
                too_long.append(n_tokens)
                continue
            out.append(
                Example(text, ex.answer, {**ex.meta, "raw_prompt": ex.prompt}) if text != ex.prompt else ex
            )
        self.dropped[split] = len(too_long)
        if too_long:
            print(
                f"data: dropped {len(too_long)} of {len(examples)} {split} prompts longer than "
                f"data.max_prompt_tokens={self.max_prompt_tokens} tokens (longest {max(too_long)})",
                file=sys.stderr,
            )
        if examples and not out:
            raise DataError(
                f"{self.path or split}: every {split} prompt is longer than data.max_prompt_tokens="
                f"{self.max_prompt_tokens} tokens; raise it (the model's context allows more?) or shorten the prompts"
            )
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        if self.task is not None:
            self.val_examples = self.format_examples(
                self.task.generate("validation", self.val_size, self.seed), "validation"
            )
            self.train_examples = self.format_examples(
                self.task.generate("train", self.train_size, self.seed), "train"
            )
            return
        examples = self._load(self.path, "train")
        if self.val_path is not None:
            val = self._load(self.val_path, "validation")[: self.val_size]
        else:
            if self.val_size >= len(examples):
                raise DataError(
                    f"{self.path} has {len(examples)} examples: too few to carve val_size={self.val_size} "
                    "and keep a training set; lower val_size or pass val_path"
                )
            order = list(range(len(examples)))
            random.Random(derive_seed(self.seed, "carve")).shuffle(order)
            val = [examples[i] for i in order[: self.val_size]]
            examples = [examples[i] for i in sorted(order[self.val_size :])]
        held_out = {ex.prompt for ex in val}  # a duplicated prompt must not leak into training
        train = [ex for ex in examples if ex.prompt not in held_out]
        if not train:
            raise DataError(f"{self.path}: no training examples left after holding out validation prompts")
        self.val_examples = self.format_examples(val, "validation")
        self.train_examples = self.format_examples(train[: self.train_size], "train")

    def warmstart_examples(self, n: int) -> list[Example]:
        """Supervised warm-start pairs: the task's training side (never a validation problem), formatted
        like the RL prompts."""
        if self.task is not None:
            return self.format_examples(self.task.warmstart(n, self.seed), "warmstart")
        self.setup()
        return self.train_examples[:n]

    # ---- the step stream ------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        if self.world is not None:
            return self.rank, self.world
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a batch spans at most two epochs; keep memory flat
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(len(self.train_examples), generator=gen).tolist()
        return self._perms[epoch]

    def step_batch(self, k: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        """Rank ``rank``'s share of global batch ``k`` (a pure function of seed and k)."""
        if self.prompts_per_step % world:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} is not divisible by world size {world}"
            )
        self.setup()
        share = self.prompts_per_step // world
        start = k * self.prompts_per_step + rank * share
        n = len(self.train_examples)
        examples = [
            self.train_examples[self._epoch_order(p // n)[p % n]] for p in range(start, start + share)
        ]
        return {"index": k, "examples": examples, "group_offset": start}

    def extra_examples(self, step: int, round_: int, n: int, rank: int = 0) -> list[Example]:
        """``n`` more training prompts for dynamic sampling, drawn without replacement by a stream
        of their own (seed, step, round, rank), so a resumed run draws exactly the same ones."""
        self.setup()
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "extra", step, round_, rank))
        picked = torch.randperm(len(self.train_examples), generator=gen)[:n].tolist()
        return [self.train_examples[i] for i in picked]

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        if self.prompts_per_step % world:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} is not divisible by world size {world}"
            )
        self.setup()
        return DataLoader(
            _StepStream(self, rank, world),
            batch_size=None,
            num_workers=0,
            collate_fn=_keep,
            generator=_own_generator(self.seed),
        )

    def val_batches(self, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
        """This rank's contiguous shard of the validation set, in batches of ``val_batch_size``."""
        self.setup()
        n = len(self.val_examples)
        lo, hi = rank * n // world, (rank + 1) * n // world
        return [
            {
                "index": i,
                "examples": self.val_examples[s : min(s + self.val_batch_size, hi)],
                "group_offset": s,
            }
            for i, s in enumerate(range(lo, hi, self.val_batch_size))
        ]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            _Batches(self.val_batches(*self.rank_world())),
            batch_size=None,
            num_workers=0,
            collate_fn=_keep,
            generator=_own_generator(self.seed),
        )

    # ---- resume ---------------------------------------------------------------------------
    def mark_consumed(self, k: int) -> None:
        """Called by the module after training on batch k: a resumed run starts at k + 1."""
        self.position = int(k) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def build_datamodule(cfg: Any) -> PromptDataModule:
    """The CLI's adapter from the resolved config (``cfg.data``, with its own seed) to plain kwargs."""
    from omegaconf import OmegaConf

    d = cfg.data
    options = OmegaConf.to_container(d.options, resolve=True) if OmegaConf.is_config(d.options) else d.options
    options = dict(options or {})
    return PromptDataModule(
        task=None if d.path is not None else d.task,
        path=d.path,
        val_path=d.val_path,
        difficulty=d.difficulty,
        train_size=d.train_size,
        val_size=d.val_size,
        prompt_key=d.prompt_key,
        answer_key=d.answer_key,
        answer_regex=d.get("answer_regex"),
        split=d.get("split", "train"),
        val_split=d.get("val_split", "test"),
        prompt_format=prompt_format(cfg),
        prompts_per_step=d.prompts_per_step,
        val_batch_size=d.val_batch_size,
        seed=d.seed,
        **options,
    )


def prompt_format(cfg: Any) -> PromptFormat:
    d = cfg.data
    return PromptFormat(
        template=d.get("template"),
        chat_template=d.get("chat_template", "auto"),
        system_prompt=d.get("system_prompt"),
    )
