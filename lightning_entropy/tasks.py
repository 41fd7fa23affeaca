"""Built-in verifiable tasks, generated deterministically from a seed.

Every problem has a canonical key; a seeded hash of the key puts it on the validation side (fraction
``val_fraction``) or the training side of the problem space, so validation and training prompts are
disjoint by construction, whatever sizes are asked for, and ``generate`` for one split never needs to
know the other's size.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

SPLITS = ("train", "validation", "warmstart")  # warmstart: SFT examples from the training side
_ENUM_LIMIT = 20_000  # spaces up to this size are listed exactly; larger ones are sampled


@dataclass
class Example:
    prompt: str
    answer: str | None  # the reference a reward verifies against; None for unsupervised data
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def demonstration(self) -> str | None:
        """What a supervised warm-start imitates: a worked solution where the task writes one (the
        countdown reference ``"3,5,7=22"`` is not a solution), else the reference answer."""
        return self.meta.get("demonstration", self.answer)


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

    def __init__(self, *, difficulty: int, val_fraction: float, warmstart_fraction: float = 0.0) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        if not 0.0 <= warmstart_fraction < 1.0:
            raise ValueError(f"warmstart_fraction={warmstart_fraction} must be in [0, 1)")
        self.warmstart_fraction = warmstart_fraction
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

    def warmstart(self, n: int, seed: int) -> list[Example]:
        """The warm-start's (prompt, demonstration) pairs for ``n`` problems of the warm-start split:
        one demonstration each, unless a task can write several."""
        return self.generate("warmstart", n, seed)

    def is_validation(self, key: str, seed: int) -> bool:
        return derive_seed(seed, "split", key) / 2**63 < self.val_fraction

    def in_split(self, split: str, key: str, seed: int) -> bool:
        """Validation is a seeded-hash share ``val_fraction`` of the space. With ``warmstart_fraction``
        > 0, that share of the rest is kept for the warm-start and never drawn for training, so RL
        starts on problems the warm-started policy has not memorised; with 0, the warm-start draws
        from the training side."""
        if self.is_validation(key, seed):
            return split == "validation"
        if split == "validation":
            return False
        if self.warmstart_fraction == 0.0:
            return True
        reserved = derive_seed(seed, "warmstart", key) / 2**63 < self.warmstart_fraction
        return reserved == (split == "warmstart")

    def _side(self, listed: list[Example], seed: int, split: str) -> tuple[Example, ...]:
        # Cached: setup, warm-start and tests ask for several splits of the same listed space.
        cache = self.__dict__.setdefault("_sides", {})
        if (seed, split) not in cache:
            cache[seed, split] = tuple(ex for ex in listed if self.in_split(split, self.key(ex), seed))
        return cache[seed, split]

    def generate(self, split: str, n: int, seed: int) -> list[Example]:
        """``n`` distinct problems of ``split``; the same arguments always give the same list, and a
        shorter list is a prefix of a longer one."""
        split = _split_name(split)
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        rng = random.Random(derive_seed(seed, "draw", split))
        listed = self.space()
        if listed is not None:
            pool = list(self._side(listed, seed, split))
            if n > len(pool):
                raise ValueError(
                    f"{self.describe()}: the {split} split needs {n} distinct problems but its side of "
                    f"the space holds {len(pool)} of {len(listed)} (val_fraction={self.val_fraction}, "
                    f"warmstart_fraction={self.warmstart_fraction}); lower the size, change the fractions, or raise "
                    "the difficulty"
                )
            rng.shuffle(pool)
            return pool[:n]
        out, seen, draws = [], set(), 0
        while len(out) < n:
            if draws >= 100 * n + 10_000:
                raise ValueError(
                    f"{self.describe()}: the {split} split needs {n} distinct problems but only "
                    f"{len(out)} were found in {draws} draws (val_fraction={self.val_fraction}, "
                    f"warmstart_fraction={self.warmstart_fraction}); "
                    "the problem space is too small: lower the size or raise the difficulty"
                )
            ex = self.sample(rng)
            draws += 1
            k = self.key(ex)
            if k not in seen and self.in_split(split, k, seed):
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
        warmstart_fraction: float = 0.0,
    ) -> None:
        if not 1 <= difficulty <= 4:
            raise ValueError(f"difficulty={difficulty} (digits per operand) must be in 1..4")
        if not ops or set(ops) - set("+-") or len(set(ops)) != len(ops):
            raise ValueError(f"ops={ops!r} must be distinct characters from '+-'")
        if not 2 <= n_operands <= 4:
            raise ValueError(f"n_operands={n_operands} must be in 2..4")
        super().__init__(difficulty=difficulty, val_fraction=val_fraction, warmstart_fraction=warmstart_fraction)
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
    ``=``, target), which the ``countdown`` reward parses to verify any solution. The target is built
    from a random expression tree over all the numbers with operators from ``ops`` (a subset of
    "+-*/"), kept when every intermediate result is an integer and the target is a positive integer,
    so every instance is solvable under either verifier mode. Problems are identified by the sorted
    numbers and the target.

    The tree is the example's demonstration (what a warm-start imitates): an expression ``"(5*3)+7"``,
    or with ``steps`` its evaluation written out, one operation per step, ``"5*3=15,15+7=22"`` (then
    every intermediate result is also non-negative). Steps make a response of tens of characters whose
    intermediate results are checked, a small stand-in for a written-out reasoning chain.
    """

    name = "countdown"

    def __init__(
        self,
        *,
        difficulty: int = 3,
        max_number: int = 9,
        ops: str = "+-*",
        steps: bool = False,
        demonstrations: int = 1,
        val_fraction: float = 0.1,
        warmstart_fraction: float = 0.0,
    ) -> None:
        if isinstance(demonstrations, bool) or not isinstance(demonstrations, int) or demonstrations < 0:
            raise ValueError(f"demonstrations={demonstrations!r} must be an integer >= 0 (0: every solution)")
        if not 2 <= difficulty <= 4:
            raise ValueError(f"difficulty={difficulty} (count of numbers) must be in 2..4")
        if not 2 <= max_number <= 99:
            raise ValueError(f"max_number={max_number} must be in 2..99")
        if not ops or set(ops) - set("+-*/") or len(set(ops)) != len(ops):
            raise ValueError(f"ops={ops!r} must be distinct characters from '+-*/'")
        super().__init__(difficulty=difficulty, val_fraction=val_fraction, warmstart_fraction=warmstart_fraction)
        self.max_number, self.ops, self.steps = max_number, ops, steps
        self.demonstrations = demonstrations

    def describe(self) -> str:
        return (
            f"countdown(difficulty={self.difficulty}, max_number={self.max_number}, ops={self.ops!r}, "
            f"steps={self.steps}, demonstrations={self.demonstrations})"
        )

    def _combine(self, a: Fraction, b: Fraction, op: str) -> Fraction | None:
        """a op b under the task's rules (inexact division, and a negative step, are not allowed): None
        if not allowed. Targets are built and solutions enumerated with it."""
        if op == "/" and (b == 0 or a % b != 0):
            return None
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        return None if self.steps and value < 0 else value

    def solutions(self, numbers: list[int], target: int) -> list[str]:
        """Every distinct demonstration that reaches ``target`` from all of ``numbers``: each order of
        combining two available numbers (operands in either order) with each allowed operator, written
        in the demonstration's form (steps, or a parenthesised expression). Sorted."""
        start = tuple(sorted((Fraction(x), str(x)) for x in numbers))
        # steps name an intermediate by its value alone, so every problem shares sub-problems with the
        # others (a warm-start set of thousands is enumerated in about a second); expressions differ by
        # their text, and share only within one problem
        memo = self.__dict__.setdefault("_memo", {}) if self.steps else {}
        return sorted(self._reductions(start, memo).get(Fraction(target), ()))

    def _reductions(
        self, items: tuple[tuple[Fraction, str], ...], memo: dict[Any, dict[Fraction, set[str]]]
    ) -> dict[Fraction, set[str]]:
        """Final value -> every demonstration that reduces ``items`` (sorted (value, text) pairs) to it."""
        if len(items) == 1:
            return {items[0][0]: {"" if self.steps else items[0][1]}}
        if items in memo:
            return memo[items]
        out: dict[Fraction, set[str]] = {}
        for i, (a, atext) in enumerate(items):
            for j, (b, btext) in enumerate(items):
                if i == j:
                    continue
                rest = [x for k, x in enumerate(items) if k not in (i, j)]
                for op in self.ops:
                    value = self._combine(a, b, op)
                    if value is None:
                        continue
                    # parenthesise every sub-expression, as the task's own demonstrations do
                    text = str(value) if self.steps else f"{_wrap(atext)}{op}{_wrap(btext)}"
                    step = f"{a}{op}{b}={value}"
                    for final, tails in self._reductions(tuple(sorted([*rest, (value, text)])), memo).items():
                        done = {f"{step},{t}" if t else step for t in tails} if self.steps else tails
                        out.setdefault(final, set()).update(done)
        memo[items] = out
        return out

    def warmstart(self, n: int, seed: int) -> list[Example]:
        """``demonstrations`` distinct solutions of each warm-start problem, drawn at random from all of
        them (0: all), as separate pairs: a policy warm-started on one solution per problem memorises
        it and starts nearly deterministic; one that has seen several keeps mass on several paths."""
        problems = self.generate("warmstart", n, seed)
        if self.demonstrations == 1:
            return problems
        out = []
        for ex in problems:
            found = self.solutions(ex.meta["numbers"], ex.meta["target"])
            if self.demonstrations:
                rng = random.Random(derive_seed(seed, "demonstrations", self.key(ex)))
                found = rng.sample(found, min(self.demonstrations, len(found)))
            out += [Example(ex.prompt, ex.answer, {**ex.meta, "demonstration": d}) for d in found]
        return out

    def key(self, example: Example) -> str:
        return ",".join(map(str, sorted(example.meta["numbers"]))) + f"={example.meta['target']}"

    def _expression(
        self, rng: random.Random, leaves: list[int], steps: list[str]
    ) -> tuple[str, Fraction] | None:
        """(text, value) of a random tree over ``leaves``; appends its operations to ``steps`` in
        evaluation order. None when an operation is not allowed (inexact division; a negative result
        with ``steps``)."""
        if len(leaves) == 1:
            return str(leaves[0]), Fraction(leaves[0])
        cut = rng.randrange(1, len(leaves))
        left = self._expression(rng, leaves[:cut], steps)
        right = self._expression(rng, leaves[cut:], steps)
        if left is None or right is None:
            return None
        op = rng.choice(self.ops)
        (ltext, lval), (rtext, rval) = left, right
        value = self._combine(lval, rval, op)
        if value is None:
            return None
        steps.append(f"{lval}{op}{rval}={value}")
        # Parenthesise every sub-expression: correct whatever the precedence, and only a hint.
        ltext = ltext if len(leaves[:cut]) == 1 else f"({ltext})"
        rtext = rtext if len(leaves[cut:]) == 1 else f"({rtext})"
        return f"{ltext}{op}{rtext}", value

    def sample(self, rng: random.Random) -> Example:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.difficulty)]
            steps: list[str] = []
            built = self._expression(rng, rng.sample(numbers, len(numbers)), steps)
            if built is not None and built[1] > 0 and built[1].denominator == 1:
                target = int(built[1])
                prompt = " ".join(map(str, numbers)) + f">{target}:"
                reference = ",".join(map(str, numbers)) + f"={target}"
                meta = {"numbers": numbers, "target": target, "solution": built[0]}
                meta["demonstration"] = ",".join(steps) if self.steps else built[0]
                return Example(prompt, reference, meta)


def _wrap(text: str) -> str:
    return text if text.isdigit() else f"({text})"


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
