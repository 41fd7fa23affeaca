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
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_entropy.prompts import DataError, PromptFormat, encode_prompt, messages_of, plain_text

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

FILE_TYPES = (".jsonl", ".json", ".parquet", ".pq", ".arrow")
Record = tuple[str, dict[str, Any]]  # (where: "file:line" or "file row i", the record)


def _json_records(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
        return [(f"{path} item {i}", r) for i, r in enumerate(rows)]
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON line: {err}") from err
    return records


def _arrow_rows(path: Path, table: Any) -> list[Record]:
    return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]


def _read_arrow_stream(path: Path) -> Any:
    import pyarrow as pa

    # datasets' save_to_disk writes Arrow IPC streams; older versions wrote files
    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return _arrow_rows(path, pq.read_table(path))
        if suffix == ".arrow":
            return _arrow_rows(path, _read_arrow_stream(path))
    except DataError:
        raise
    except Exception as err:  # pyarrow's errors are long; the first line says what is wrong
        raise DataError(
            f"{path}: cannot read: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if suffix not in (".jsonl", ".json"):
        raise DataError(
            f"{path}: unsupported prompt file type {suffix!r}; use .jsonl, .json, .parquet, a folder of "
            "them, or a datasets save_to_disk folder"
        )
    return _json_records(path)


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    """A ``datasets`` ``save_to_disk`` folder (a Dataset, or a DatasetDict of splits), read with pyarrow
    alone so that the optional ``datasets`` package is not needed."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise DataError(f"{path}: a DatasetDict without split {split!r}; its splits: {', '.join(splits)}")
        path = path / split
    state = json.loads((path / "state.json").read_text())
    records: list[Record] = []
    for f in state["_data_files"]:
        records += _read_file(path / f["filename"])
    return records


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _read_records(path: Path, split: str = "train") -> list[Record]:
    """Records of a file, a ``save_to_disk`` folder, or a folder of shards (read in name order)."""
    if is_saved_dataset(path):
        return _read_saved_dataset(path, split)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES)
        if not shards:
            raise DataError(
                f"{path}: a folder with no {'/'.join(FILE_TYPES)} files and no save_to_disk dataset"
            )
        kinds = {".pq" if p.suffix.lower() == ".parquet" else p.suffix.lower() for p in shards}
        if len(kinds) > 1:
            raise DataError(f"{path}: mixes shard types {sorted(kinds)}; keep one type per folder")
        return [rec for p in shards for rec in _read_file(p)]
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return _read_file(path)


def _read_hf(spec: str, split: str) -> tuple[list[Record], str]:
    """``hf:<name>[@<config>][:<split>]`` through the optional ``datasets`` package. Only the first
    colon ends the name, so a split may carry a slice (``train[:100]``)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{spec} needs the optional 'datasets' package: pip install 'lightning_entropy[datasets]'"
        ) from err
    name, _, hf_split = spec[3:].partition(":")
    name, _, config = name.partition("@")
    label = f"{spec} (split {hf_split or split})"
    ds = datasets.load_dataset(name, config or None, split=hf_split or split)
    return [(f"{label} row {i}", r) for i, r in enumerate(ds.to_list())], label


_MISSING = object()


def get_path(record: dict[str, Any], key: str) -> Any:
    """``record[key]``, where a dotted key walks nested records (``reward_model.ground_truth``); an
    exact key that contains dots wins."""
    if key in record:
        return record[key]
    value: Any = record
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _keys_hint(record: dict[str, Any]) -> str:
    """The record's keys, nested ones dotted, for an error message."""
    out = []
    for k, v in record.items():
        out += [f"{k}.{kk}" for kk in v] if isinstance(v, dict) and v else [k]
    return str(sorted(out))


def _answer_text(value: Any, where: str, key: str, pattern: re.Pattern[str] | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        inner = f" with keys {sorted(value)}" if isinstance(value, dict) else ""
        raise DataError(
            f"{where}: answer_key '{key}' is a {type(value).__name__}{inner}, not an answer; point "
            f"data.answer_key at a field inside it (e.g. {key}.{next(iter(value), 'field')})"
        )
    text = str(value)
    if pattern is not None:
        found = pattern.search(text)
        if found is None:
            raise DataError(
                f"{where}: data.answer_regex {pattern.pattern!r} does not match answer_key '{key}' "
                f"value {text[:80]!r}"
            )
        text = (found.group(1) if pattern.groups else found.group(0)).strip()
    return text


def records_to_examples(
    records: list[Record],
    source: str,
    prompt_key: str,
    answer_key: str | None,
    answer_regex: str | None = None,
) -> list[Example]:
    """Records -> Examples. A prompt is a string or a list of ``{role, content}`` chat messages (kept in
    ``meta["messages"]``; ``prompt`` is their plain text until formatting). Every error names the
    file and line (or row), the key and what the record has."""
    if not records:
        raise DataError(f"{source}: no records")
    try:
        pattern = re.compile(answer_regex) if answer_regex is not None else None
    except re.error as err:
        raise DataError(f"data.answer_regex={answer_regex!r}: not a regular expression: {err}") from err
    out = []
    for row, (where, rec) in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a record (a JSON object), got {type(rec).__name__}")
        for key, what in ((prompt_key, "prompt_key"), (answer_key, "answer_key")):
            if key is not None and get_path(rec, key) is _MISSING:
                raise DataError(f"{where}: no field '{key}' (data.{what}); the record has {_keys_hint(rec)}")
        value = get_path(rec, prompt_key)
        messages = messages_of(value)
        if messages is None and not isinstance(value, str):
            raise DataError(
                f"{where}: prompt_key '{prompt_key}' is a {type(value).__name__}; expected a string or a "
                "list of {role, content} chat messages"
            )
        answer = (
            None
            if answer_key is None
            else _answer_text(get_path(rec, answer_key), where, answer_key, pattern)
        )
        top = {prompt_key.split(".")[0], (answer_key or "").split(".")[0]}
        meta = {k: v for k, v in rec.items() if k not in top}
        meta["row"], meta["where"] = row, where
        if messages is not None:
            meta["messages"] = messages
        out.append(Example(plain_text(messages) if messages else value, answer, meta))
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
    answer_regex: str | None = None,
    file_split: str | None = None,
    **task_options: Any,
) -> list[Example]:
    """Examples from a built-in task name (needs ``n``), a ``.jsonl``/``.json``/``.parquet`` file, a
    folder of such shards, a ``datasets`` ``save_to_disk`` folder (``file_split`` picks the split of a
    DatasetDict, default ``split``), or ``hf:<name>[@<config>][:<split>]``. Files keep their order
    and are cut to the first ``n``."""
    if source in TASKS:
        if n is None:
            raise ValueError(f"task {source!r} is generated: pass n, the number of examples")
        return make_task(source, difficulty, **task_options).generate(split, n, seed)
    if task_options:
        raise ValueError(f"task options {sorted(task_options)} only apply to built-in tasks, not {source}")
    wanted = file_split or (_split_name(split) if split != "warmstart" else "train")
    if source.startswith("hf:"):
        records, label = _read_hf(source, wanted)
    else:
        records, label = _read_records(Path(source), wanted), source
    examples = records_to_examples(records, label, prompt_key, answer_key, answer_regex)
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
            return self.format_examples(self.task.generate("warmstart", n, self.seed), "warmstart")
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
