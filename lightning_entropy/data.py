"""Prompt datasets: built-in verifiable tasks, JSONL/Parquet/HF files, and the RL-step DataModule.

Built-in tasks are generated deterministically from a seed. Every problem has a canonical key; a
seeded hash of the key puts it on the validation side (fraction ``val_fraction``) or the training
side of the problem space, so validation and training prompts are disjoint by construction, whatever
sizes are asked for, and ``generate`` for one split never needs to know the other's size.
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

SPLITS = ("train", "validation", "warmstart")  # warmstart: SFT examples from the training side
_ENUM_LIMIT = 20_000  # spaces up to this size are listed exactly; larger ones are sampled


@dataclass
class Example:
    prompt: str
    answer: str | None  # the reference a reward verifies against; None for unsupervised data
    meta: dict[str, Any] = field(default_factory=dict)


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's hash() of str is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _split_name(split: str) -> str:
    split = {"val": "validation", "valid": "validation"}.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS} (or 'val')")
    return split


class Task(ABC):
    """A verifiable task. Subclasses draw one problem with ``sample`` and name it with ``key``;
    those whose space is small list it with ``space`` so that splits are exact, not sampled."""

    name: ClassVar[str] = ""

    def __init__(self, *, difficulty: int, val_fraction: float) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        self.difficulty = difficulty
        self.val_fraction = val_fraction

    @abstractmethod
    def sample(self, rng: random.Random) -> Example: ...

    @abstractmethod
    def describe(self) -> str:
        """The task and its parameters, for error messages."""

    def key(self, example: Example) -> str:
        """Canonical identity: two examples with one key are the same problem."""
        return example.prompt

    def space(self) -> list[Example] | None:
        return None

    def is_validation(self, key: str, seed: int) -> bool:
        return derive_seed(seed, "split", key) / 2**63 < self.val_fraction

    def _side(self, listed: list[Example], seed: int, want_val: bool) -> tuple[Example, ...]:
        # Cached: setup, warm-start and tests ask for several splits of the same listed space.
        cache = self.__dict__.setdefault("_sides", {})
        if (seed, want_val) not in cache:
            cache[seed, want_val] = tuple(
                ex for ex in listed if self.is_validation(self.key(ex), seed) == want_val
            )
        return cache[seed, want_val]

    def generate(self, split: str, n: int, seed: int) -> list[Example]:
        """``n`` distinct problems of ``split``; the same arguments always give the same list, and a
        shorter list is a prefix of a longer one."""
        split = _split_name(split)
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        want_val = split == "validation"
        rng = random.Random(derive_seed(seed, "draw", split))
        listed = self.space()
        if listed is not None:
            pool = list(self._side(listed, seed, want_val))
            if n > len(pool):
                raise ValueError(
                    f"{self.describe()}: the {split} split needs {n} distinct problems but its side of "
                    f"the space holds {len(pool)} of {len(listed)} (val_fraction={self.val_fraction}); "
                    "lower the size, change val_fraction, or raise the difficulty"
                )
            rng.shuffle(pool)
            return pool[:n]
        out, seen, draws = [], set(), 0
        while len(out) < n:
            if draws >= 100 * n + 10_000:
                raise ValueError(
                    f"{self.describe()}: the {split} split needs {n} distinct problems but only "
                    f"{len(out)} were found in {draws} draws (val_fraction={self.val_fraction}); "
                    "the problem space is too small: lower the size or raise the difficulty"
                )
            ex = self.sample(rng)
            draws += 1
            k = self.key(ex)
            if k not in seen and self.is_validation(k, seed) == want_val:
                seen.add(k)
                out.append(ex)
        return out


class ArithmeticTask(Task):
    """Sums of ``n_operands`` integers of exactly ``difficulty`` digits (1 digit: 0-9).

    Prompt ``"23+45="``, answer ``"68"``. With ``reverse_answer`` the prompt ends in ``r``
    (``"23+45=r"``) and the answer's digits are written least-significant first (``"86"``), a sign
    staying in front (-12 -> ``"-21"``), which a small char-level model learns much faster.
    ``ops`` is the set of operators drawn between operands ("+" or "+-"), evaluated left to right.
    """

    name = "arithmetic"

    def __init__(
        self,
        *,
        difficulty: int = 1,
        ops: str = "+",
        reverse_answer: bool = False,
        n_operands: int = 2,
        val_fraction: float = 0.1,
    ) -> None:
        if not 1 <= difficulty <= 4:
            raise ValueError(f"difficulty={difficulty} (digits per operand) must be in 1..4")
        if not ops or set(ops) - set("+-") or len(set(ops)) != len(ops):
            raise ValueError(f"ops={ops!r} must be distinct characters from '+-'")
        if not 2 <= n_operands <= 4:
            raise ValueError(f"n_operands={n_operands} must be in 2..4")
        super().__init__(difficulty=difficulty, val_fraction=val_fraction)
        self.ops, self.reverse_answer, self.n_operands = ops, reverse_answer, n_operands
        self.low = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        self.width = 10**difficulty - self.low

    def space_size(self) -> int:
        return self.width**self.n_operands * len(self.ops) ** (self.n_operands - 1)

    def describe(self) -> str:
        return (
            f"arithmetic(difficulty={self.difficulty}, ops={self.ops!r}, n_operands={self.n_operands}; "
            f"{self.space_size()} problems)"
        )

    def decode(self, index: int) -> Example:
        """The index-th problem of the space (mixed radix over operands, then operators)."""
        operands, ops = [], []
        for _ in range(self.n_operands):
            index, digit = divmod(index, self.width)
            operands.append(self.low + digit)
        for _ in range(self.n_operands - 1):
            index, o = divmod(index, len(self.ops))
            ops.append(self.ops[o])
        value = operands[0]
        for op, x in zip(ops, operands[1:]):
            value = value + x if op == "+" else value - x
        text = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="
        answer = str(value)
        if self.reverse_answer:
            text += "r"
            answer = ("-" if value < 0 else "") + str(abs(value))[::-1]
        return Example(text, answer, {"operands": operands, "ops": ops, "value": value})

    def sample(self, rng: random.Random) -> Example:
        return self.decode(rng.randrange(self.space_size()))

    def space(self) -> list[Example] | None:
        n = self.space_size()
        if n > _ENUM_LIMIT:
            return None
        if "_space" not in self.__dict__:
            self._space = [self.decode(i) for i in range(n)]
        return self._space


class CountdownTask(Task):
    """Reach a target with ``difficulty`` numbers (2..4) from 1..``max_number``, each used at most once.

    Prompt ``"3 5 7>22:"`` (numbers, ``>``, target, ``:``); the reference is ``"3,5,7=22"`` (numbers,
    ``=``, target), which the ``countdown`` reward parses to verify any expression. The target is built
    from a random expression tree over all the numbers with operators from ``ops`` (a subset of
    "+-*/"), kept when every intermediate result is an integer and the target is a positive integer,
    so every instance is solvable under either verifier mode. Problems are identified by the sorted
    numbers and the target.
    """

    name = "countdown"

    def __init__(
        self, *, difficulty: int = 3, max_number: int = 9, ops: str = "+-*", val_fraction: float = 0.1
    ) -> None:
        if not 2 <= difficulty <= 4:
            raise ValueError(f"difficulty={difficulty} (count of numbers) must be in 2..4")
        if not 2 <= max_number <= 99:
            raise ValueError(f"max_number={max_number} must be in 2..99")
        if not ops or set(ops) - set("+-*/") or len(set(ops)) != len(ops):
            raise ValueError(f"ops={ops!r} must be distinct characters from '+-*/'")
        super().__init__(difficulty=difficulty, val_fraction=val_fraction)
        self.max_number, self.ops = max_number, ops

    def describe(self) -> str:
        return f"countdown(difficulty={self.difficulty}, max_number={self.max_number}, ops={self.ops!r})"

    def key(self, example: Example) -> str:
        return ",".join(map(str, sorted(example.meta["numbers"]))) + f"={example.meta['target']}"

    def _expression(self, rng: random.Random, leaves: list[int]) -> tuple[str, Fraction] | None:
        if len(leaves) == 1:
            return str(leaves[0]), Fraction(leaves[0])
        cut = rng.randrange(1, len(leaves))
        left, right = self._expression(rng, leaves[:cut]), self._expression(rng, leaves[cut:])
        if left is None or right is None:
            return None
        op = rng.choice(self.ops)
        (ltext, lval), (rtext, rval) = left, right
        if op == "/" and (rval == 0 or lval % rval != 0):
            return None
        value = (
            lval + rval
            if op == "+"
            else lval - rval
            if op == "-"
            else lval * rval
            if op == "*"
            else lval / rval
        )
        # Parenthesise every sub-expression: correct whatever the precedence, and only a hint.
        ltext = ltext if len(leaves[:cut]) == 1 else f"({ltext})"
        rtext = rtext if len(leaves[cut:]) == 1 else f"({rtext})"
        return f"{ltext}{op}{rtext}", value

    def sample(self, rng: random.Random) -> Example:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.difficulty)]
            built = self._expression(rng, rng.sample(numbers, len(numbers)))
            if built is not None and built[1] > 0 and built[1].denominator == 1:
                target = int(built[1])
                prompt = " ".join(map(str, numbers)) + f">{target}:"
                reference = ",".join(map(str, numbers)) + f"={target}"
                return Example(
                    prompt, reference, {"numbers": numbers, "target": target, "solution": built[0]}
                )


TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def make_task(name: str, difficulty: int, **options: Any) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    try:
        return TASKS[name](difficulty=difficulty, **options)
    except TypeError as err:
        import inspect

        accepted = [p for p in inspect.signature(TASKS[name].__init__).parameters if p != "self"]
        raise ValueError(f"task {name!r}: {err}; accepted options: {', '.join(accepted)}") from err


# ---- prompt files ------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; use .jsonl, .json or .parquet")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON line: {err}") from err
    return records


def _read_hf(spec: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """``hf:<name>[@<config>][:<split>]`` through the optional ``datasets`` package."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{spec} needs the optional 'datasets' package: pip install 'lightning_entropy[datasets]'"
        ) from err
    name, _, hf_split = spec[3:].partition(":")
    name, _, config = name.partition("@")
    ds = datasets.load_dataset(name, config or None, split=hf_split or split)
    return ds.to_list(), f"{spec} (split {hf_split or split})"


def records_to_examples(
    records: list[dict[str, Any]], source: str, prompt_key: str, answer_key: str | None
) -> list[Example]:
    """Records -> Examples; a missing key names the source, the key and the keys that exist."""
    if not records:
        raise ValueError(f"{source}: no records")
    for key, what in ((prompt_key, "prompt_key"), (answer_key, "answer_key")):
        if key is not None and key not in records[0]:
            raise ValueError(
                f"{source}: {what}={key!r} is not a field; the first record has {sorted(records[0])}"
            )
    out = []
    for row, rec in enumerate(records):
        missing = [k for k in (prompt_key, answer_key) if k is not None and k not in rec]
        if missing:
            raise ValueError(f"{source}: record {row} lacks {missing}; it has {sorted(rec)}")
        answer = rec[answer_key] if answer_key is not None else None
        meta = {k: v for k, v in rec.items() if k not in (prompt_key, answer_key)}
        out.append(
            Example(str(rec[prompt_key]), None if answer is None else str(answer), {"row": row, **meta})
        )
    return out


def load_examples(
    source: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    difficulty: int = 1,
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    **task_options: Any,
) -> list[Example]:
    """Examples from a built-in task name (needs ``n``), a ``.jsonl``/``.json``/``.parquet`` file, or
    ``hf:<name>[@<config>][:<split>]``. Files keep their order and are cut to the first ``n``."""
    if source in TASKS:
        if n is None:
            raise ValueError(f"task {source!r} is generated: pass n, the number of examples")
        return make_task(source, difficulty, **task_options).generate(split, n, seed)
    if task_options:
        raise ValueError(f"task options {sorted(task_options)} only apply to built-in tasks, not {source}")
    if source.startswith("hf:"):
        records, label = _read_hf(source, _split_name(split) if split != "warmstart" else "train")
    else:
        records, label = _read_records(Path(source)), source
    examples = records_to_examples(records, label, prompt_key, answer_key)
    return examples if n is None else examples[:n]


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
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.prompts_per_step, self.val_batch_size, self.seed = prompts_per_step, val_batch_size, seed
        self.rank, self.world = rank, world_size
        self.position = 0
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self._perms: dict[int, list[int]] = {}

    # ---- building -------------------------------------------------------------------------
    def _load(self, source: str, split: str) -> list[Example]:
        return load_examples(source, split, prompt_key=self.prompt_key, answer_key=self.answer_key)

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        if self.task is not None:
            self.val_examples = self.task.generate("validation", self.val_size, self.seed)
            self.train_examples = self.task.generate("train", self.train_size, self.seed)
            return
        examples = self._load(self.path, "train")
        if self.val_path is not None:
            val = self._load(self.val_path, "validation")[: self.val_size]
        else:
            if self.val_size >= len(examples):
                raise ValueError(
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
            raise ValueError(f"{self.path}: no training examples left after holding out validation prompts")
        self.val_examples, self.train_examples = val, train[: self.train_size]

    def warmstart_examples(self, n: int) -> list[Example]:
        """Supervised warm-start pairs: the task's training side (never a validation problem)."""
        if self.task is not None:
            return self.task.generate("warmstart", n, self.seed)
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
        prompts_per_step=d.prompts_per_step,
        val_batch_size=d.val_batch_size,
        seed=d.seed,
        **options,
    )
