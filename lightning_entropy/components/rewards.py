"""Sequence rewards: (prompts, completions, references) -> (rewards[B] float32, per-sample infos).

Verifiable rewards score each completion against its reference. Every info dict carries at least
``correct`` (bool) and ``reason`` (None when correct, else why the reward was withheld), so the
module can log failure causes. String checks are inherently per sample; there is no tensor maths.
"""

from __future__ import annotations

import ast
import logging
import multiprocessing
import re
import signal
import time
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_entropy.components.base import Reward
from lightning_entropy.registry import register

Info = dict[str, Any]


def _check_lengths(completions: list[str], references: list[str | None]) -> None:
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references")


def _finish(values: list[float], infos: list[Info]) -> tuple[Tensor, list[Info]]:
    return torch.tensor(values, dtype=torch.float32), infos


@register("reward", "exact_match")
class ExactMatchReward(Reward):
    """r = correct_reward if norm(completion) == norm(reference) else wrong_reward.

    norm() strips whitespace, then the characters of ``strip_chars`` (e.g. "." for a trailing full
    stop) from both ends, then whitespace again. Suits the built-in arithmetic task, whose references
    are exactly the expected answer string. No paper: the standard rule-based outcome reward.
    """

    def __init__(
        self, *, correct_reward: float = 1.0, wrong_reward: float = 0.0, strip_chars: str = ""
    ) -> None:
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward={correct_reward} must exceed wrong_reward={wrong_reward}")
        self.correct_reward = correct_reward
        self.wrong_reward = wrong_reward
        self.strip_chars = strip_chars

    def normalise(self, text: str) -> str:
        text = text.strip()
        return text.strip(self.strip_chars).strip() if self.strip_chars else text

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        _check_lengths(completions, references)
        values, infos = [], []
        for completion, reference in zip(completions, references):
            answer = self.normalise(completion or "") or None
            if reference is None:
                reason = "no reference"
            elif answer is None:
                reason = "empty answer"
            else:
                reason = None if answer == self.normalise(reference) else "wrong answer"
            values.append(self.correct_reward if reason is None else self.wrong_reward)
            infos.append({"extracted": answer, "correct": reason is None, "reason": reason})
        return _finish(values, infos)


def parse_countdown_reference(reference: str) -> tuple[list[int], int]:
    """``"3,5,7=22"`` -> ([3, 5, 7], 22): the encoding written by the countdown task in data.py."""
    match = re.fullmatch(r"\s*(\d+(?:\s*,\s*\d+)*)\s*=\s*(-?\d+)\s*", reference)
    if match is None:
        raise ValueError(f"malformed countdown reference {reference!r}; expected 'n1,n2,...=target'")
    return [int(x) for x in match.group(1).split(",")], int(match.group(2))


class _Rejected(Exception):
    """A well-formed expression that cannot be evaluated under the rules; ``str(self)`` is the reason."""


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def _is_int_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _countdown_eval(node: ast.AST, integer_intermediates: bool) -> Fraction:
    """Exact value of a validated tree of integer literals and + - * /; raises _Rejected."""
    if _is_int_literal(node):
        return Fraction(node.value)
    left = _countdown_eval(node.left, integer_intermediates)
    right = _countdown_eval(node.right, integer_intermediates)
    if isinstance(node.op, ast.Div):
        if right == 0:
            raise _Rejected("division by zero")
        value = left / right
    else:
        value = {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
    if integer_intermediates and value.denominator != 1:
        raise _Rejected("non-integer intermediate result")
    return value


def _literals(node: ast.AST) -> list[int]:
    return [n.value for n in ast.walk(node) if _is_int_literal(n)]


_STEP = re.compile(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*")


@register("reward", "countdown")
class CountdownReward(Reward):
    """Countdown: r = correct_reward iff the completion is an expression over the given numbers (each
    at most as often as given; all of them when ``use_all``) that evaluates exactly to the target, or
    the same computation written out in steps ``"5*3=15,15+7=22"`` with every stated result right.

    Reference format ``"3,5,7=22"`` (data.py). Only digits, + - * / (true division), parentheses and
    spaces are accepted; unary minus, ``**`` and ``//`` are rejected. Evaluation is exact (Fraction), so
    fractional intermediate results are allowed unless ``integer_intermediates``. A well-formed but
    wrong expression (wrong numbers, wrong value, division by zero) earns ``format_reward``.
    The Countdown task of TinyZero (a reproduction of DeepSeek-R1-Zero, arXiv 2501.12948), whose
    reward differs from these defaults: it requires every number exactly once (``use_all=True``) and
    gives 0.1 for a well-formed wrong answer (``format_reward=0.1``).
    """

    def __init__(
        self,
        *,
        correct_reward: float = 1.0,
        format_reward: float = 0.0,
        wrong_reward: float = 0.0,
        use_all: bool = False,
        integer_intermediates: bool = False,
        max_length: int = 256,
    ) -> None:
        if not wrong_reward <= format_reward < correct_reward:
            raise ValueError(
                f"need wrong_reward <= format_reward < correct_reward, got wrong_reward={wrong_reward}, "
                f"format_reward={format_reward}, correct_reward={correct_reward}"
            )
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1")
        self.correct_reward = correct_reward
        self.format_reward = format_reward
        self.wrong_reward = wrong_reward
        self.use_all = use_all
        self.integer_intermediates = integer_intermediates
        self.max_length = max_length

    def judge_steps(
        self, text: str, numbers: list[int], target: int
    ) -> tuple[bool, str | None, Fraction | None]:
        """Written-out steps ``"5*3=15,15+7=22"``: each step combines two numbers still available (given
        or produced by an earlier step), states its result correctly, and makes that result available;
        the last result must be the target (and with ``use_all`` every given number consumed)."""
        parts = text.split(",")
        if len(parts) > max(len(numbers) - 1, 1) or len(text) > self.max_length:
            return False, "too many steps or too long", None
        pool, value = Counter(numbers), None
        for k, part in enumerate(parts, 1):
            m = _STEP.fullmatch(part)
            if m is None:
                return False, f"step {k} is not 'a<op>b=c'", None
            a, op, b, stated = int(m[1]), m[2], int(m[3]), int(m[4])
            need = Counter([a, b])
            if need - pool:
                return True, f"step {k}: {sorted((need - pool).elements())} not available", None
            if op == "/" and b == 0:
                return True, f"step {k}: division by zero", None
            exact = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b) if b else None}[op]
            if exact != stated:
                return True, f"step {k}: {a}{op}{b} is {exact}, not {stated}", None
            pool = pool - need + Counter([stated])
            value = Fraction(stated)
        if self.use_all and sum(pool.values()) != 1:
            return True, f"numbers unused: {sorted((pool - Counter([stated])).elements())}", value
        return True, None if value == target else f"wrong value: {value}", value

    def judge(self, expr: str, numbers: list[int], target: int) -> tuple[bool, str | None, Fraction | None]:
        """(well_formed, reason or None when correct, exact value when it could be computed)."""
        if "=" in expr:
            return self.judge_steps(expr, numbers, target)
        # The character whitelist runs before ast so that names, calls, floats, underscores in
        # literals ("1_0") and non-ASCII digits never reach the parser.
        if len(expr) > self.max_length or not re.fullmatch(r"[0-9+\-*/() ]+", expr):
            return False, "invalid characters or too long", None
        try:
            tree = ast.parse(expr, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False, "unparsable", None
        for node in ast.walk(tree):
            if isinstance(node, ast.UnaryOp):
                return False, "unary operator", None
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS:
                return False, "unsupported operator", None
            if not isinstance(node, (ast.BinOp, ast.operator)) and not _is_int_literal(node):
                return False, f"unsupported syntax: {type(node).__name__}", None
        used, given = Counter(_literals(tree)), Counter(numbers)
        extra = sorted((used - given).elements())
        if extra:
            kind = "number reused" if all(n in given for n in extra) else "number not available"
            return True, f"{kind}: {extra}", None
        if self.use_all and used != given:
            return True, f"numbers unused: {sorted((given - used).elements())}", None
        try:
            value = _countdown_eval(tree, self.integer_intermediates)
        except _Rejected as err:
            return True, str(err), None
        return True, None if value == target else f"wrong value: {value}", value

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        _check_lengths(completions, references)
        values, infos = [], []
        for completion, reference in zip(completions, references):
            expr = (completion or "").strip()
            if reference is None or not expr:
                reason = "no reference" if reference is None else "empty answer"
                well_formed, value = False, None
            else:
                well_formed, reason, value = self.judge(expr, *parse_countdown_reference(reference))
            correct = reason is None
            values.append(
                self.correct_reward if correct else self.format_reward if well_formed else self.wrong_reward
            )
            infos.append(
                {
                    "extracted": expr or None,
                    "correct": correct,
                    "reason": reason,
                    "well_formed": well_formed,
                    "value": None if value is None else str(value),
                }
            )
        self.metrics["well_formed"] = sum(i["well_formed"] for i in infos) / max(len(infos), 1)
        return _finish(values, infos)


@lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> list[Any]:
    from math_verify import parse

    # A bare reference ("\frac{1}{2}", "x^2+1") has no delimiters that math-verify's LaTeX
    # extraction looks for; wrapping it in $...$ makes it parse as one expression.
    text = reference if ("\\boxed" in reference or "$" in reference) else f"${reference}$"
    return parse(text, parsing_timeout=None)


def _math_verify_check(completion: str, reference: str) -> tuple[bool, str | None, str | None]:
    """(correct, extracted answer, reason); runs inside the worker process."""
    from math_verify import parse, verify

    gold = _parse_reference(reference)
    if not gold:
        return False, None, "unparsable reference"
    pred = parse(completion, parsing_timeout=None)
    if not pred:
        return False, None, "no answer found"
    extracted = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    correct = bool(verify(gold, pred, timeout_seconds=None))
    return correct, extracted, None if correct else "wrong answer"


@lru_cache(maxsize=1)
def _warm_math_verify() -> None:
    """Import math-verify and run one comparison: its first call compiles grammars and fills caches
    (a second or more on a busy machine), which a forked worker then inherits."""
    import math_verify  # noqa: F401

    log = logging.getLogger("math_verify")
    level = log.level
    log.setLevel(logging.ERROR)  # its "timeout is disabled" notices: the pool enforces deadlines
    try:
        _math_verify_check("\\boxed{\\frac{1}{2}}", "0.5")
    except Exception:  # warming is best effort; a real failure shows on a real sample
        pass
    finally:
        log.setLevel(level)


def _math_verify_worker(conn: Any, check: Any = _math_verify_check) -> None:
    """Worker loop. math-verify's own timeouts use SIGALRM (main thread only); they are disabled
    here and the parent enforces the deadline by killing this process instead."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # a forked worker inherits the trainer's SIGTERM handler, which would ignore the parent's terminate();
    # Ctrl-C reaches the whole process group: the parent decides, the worker must not die noisily
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _warm_math_verify()  # before the handshake, so that first-use costs do not eat a sample's deadline
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            conn.send(check(*job))
        except Exception as err:  # a verifier bug must cost one sample, not the run
            conn.send((False, None, f"error: {type(err).__name__}"))


@register("reward", "math_verify")
class MathVerifyReward(Reward):
    """r = correct_reward iff math-verify finds the completion's final answer (\\boxed{...}, "answer
    is ...", else the last expression) equivalent to the reference, else wrong_reward.

    Samples are scored in a pool of ``workers`` processes. Each sample has a ``timeout_s`` deadline
    and the whole call (one RL step's rollout) a ``deadline_s`` one: math-verify's signal-based
    timeouts only work in the main thread, so a hung comparison (e.g. ``10^{10^{10^{10}}}``) is
    killed with its worker instead and the worker restarted; at the step deadline every sample not
    yet scored gets wrong_reward. Both are reason "timeout", counted in the logged ``timeouts``.
    ``start_method`` picks the multiprocessing context ("fork" is cheapest; "spawn" is safest).
    Verifier: huggingface/Math-Verify (used by open-r1); no paper.
    """

    _check = staticmethod(_math_verify_check)  # what a worker runs per sample (tests inject a slow one)

    def __init__(
        self,
        *,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        timeout_s: float = 5.0,
        deadline_s: float = 60.0,
        workers: int = 4,
        start_method: str = "fork",
    ) -> None:
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward={correct_reward} must exceed wrong_reward={wrong_reward}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s={deadline_s} must be > 0")
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"workers={workers!r} must be an integer >= 1")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method={start_method!r} is not available here; "
                f"choose from {multiprocessing.get_all_start_methods()}"
            )
        self.correct_reward = correct_reward
        self.wrong_reward = wrong_reward
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.workers = workers
        self.start_method = start_method
        self._pool: list[tuple[Any, Any] | None] = [None] * workers

    def _start(self, slot: int) -> tuple[Any, Any]:
        if self.start_method == "fork":
            _warm_math_verify()  # once per process: a forked worker then restarts warm and instantly

        ctx = multiprocessing.get_context(self.start_method)
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_math_verify_worker, args=(child_conn, type(self)._check), daemon=True)
        proc.start()
        child_conn.close()
        # Importing sympy can take seconds under "spawn"; that must not count as a sample's timeout.
        if not conn.poll(120.0) or conn.recv() != "ready":
            proc.kill()
            raise RuntimeError("math_verify worker failed to start within 120 s")
        self._pool[slot] = (proc, conn)
        return proc, conn

    def _stop(self, slot: int) -> None:
        worker = self._pool[slot]
        if worker is not None:
            proc, conn = worker
            self._pool[slot] = None
            proc.kill()
            proc.join()
            conn.close()

    def close(self) -> None:
        """Stop the worker processes (a later call starts fresh ones)."""
        for slot in range(len(self._pool)):
            self._stop(slot)

    def _worker(self, slot: int) -> tuple[Any, Any]:
        worker = self._pool[slot]
        if worker is None or not worker[0].is_alive():
            self._stop(slot)
            worker = self._start(slot)
        return worker

    def check_all(self, jobs: list[tuple[str, str]]) -> list[tuple[bool, str | None, str | None]]:
        """(correct, extracted, reason) per job, scored in the pool within both deadlines."""
        from multiprocessing.connection import wait

        results: list[tuple[bool, str | None, str | None] | None] = [None] * len(jobs)
        todo = list(range(len(jobs)))[::-1]  # popped from the end: in order
        busy: dict[int, tuple[int, float]] = {}  # slot -> (job, started)
        deadline = time.monotonic() + self.deadline_s
        while todo or busy:
            for slot in range(self.workers):
                if todo and slot not in busy:
                    job = todo.pop()
                    try:
                        self._worker(slot)[1].send(jobs[job])
                        busy[slot] = (job, time.monotonic())
                    except (EOFError, OSError):
                        self._stop(slot)
                        results[job] = (False, None, "verifier crashed")
            if not busy:
                continue
            now = time.monotonic()
            until = min(deadline, *(t + self.timeout_s for _, t in busy.values()))
            conns = {self._pool[slot][1]: slot for slot in busy}
            for conn in wait(list(conns), timeout=max(0.0, until - now)):
                slot = conns[conn]
                job, _ = busy.pop(slot)
                try:
                    results[job] = conn.recv()
                except (EOFError, OSError):  # the worker died mid-sample (out of memory, a signal)
                    self._stop(slot)
                    results[job] = (False, None, "verifier crashed")
            now = time.monotonic()
            for slot, (job, started) in list(busy.items()):
                if now >= started + self.timeout_s or now >= deadline:
                    busy.pop(slot)
                    self._stop(slot)
                    results[job] = (False, None, "timeout")
            if now >= deadline:
                for job in todo:
                    results[job] = (False, None, "timeout")
                todo = []
        return results  # type: ignore[return-value]

    def check(self, completion: str, reference: str) -> tuple[bool, str | None, str | None]:
        """(correct, extracted, reason) for one sample, within the deadline."""
        return self.check_all([(completion, reference)])[0]

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        _check_lengths(completions, references)
        outcomes: list[tuple[bool, str | None, str | None] | None] = []
        jobs, where = [], []
        for i, (completion, reference) in enumerate(zip(completions, references)):
            if reference is None:
                outcomes.append((False, None, "no reference"))
            elif not (completion or "").strip():
                outcomes.append((False, None, "empty answer"))
            else:
                outcomes.append(None)
                jobs.append((completion, reference))
                where.append(i)
        for i, outcome in zip(where, self.check_all(jobs)):
            outcomes[i] = outcome
        values, infos = [], []
        for correct, extracted, reason in outcomes:
            values.append(self.correct_reward if correct else self.wrong_reward)
            infos.append({"extracted": extracted, "correct": correct, "reason": reason})
        self.metrics["timeouts"] = float(sum(i["reason"] == "timeout" for i in infos))
        return _finish(values, infos)

    def __getstate__(self) -> dict[str, Any]:
        # A live process cannot be pickled or deep-copied; the copy starts its own on first use.
        return {**self.__dict__, "_pool": [None] * self.workers}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down multiprocessing already
            pass


# ---- Unsupervised rewards: no ground truth (METHODS.md §3.9) ---------------------------------------
# They score from the policy's own statistics or from the group's answers, so they implement
# ``score_batch`` (called after the old-policy pass, with batch.group_ids and info["completion"]);
# ``unsupervised`` tells the module to validate with the task's verifiable reward instead.
import math  # noqa: E402
from abc import abstractmethod  # noqa: E402

from lightning_entropy.batch import RolloutBatch  # noqa: E402

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
EXTRACTORS = ("auto", "boxed", "number", "text", "none")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip() or None
    return None


def extract_answer(text: str | None, how: str = "auto") -> str | None:
    """Final answer of a completion, or None: "boxed" (last \\boxed{...}), "number" (last number),
    "text" (the stripped completion), "auto" (boxed, else number, else text), "none" (always the text,
    empty included: never a format failure)."""
    text = text or ""
    if how == "none":
        return text.strip()
    found = _last_boxed(text) if how in ("auto", "boxed") else None
    if found is None and how in ("auto", "number"):
        numbers = _NUMBER.findall(text)
        found = numbers[-1] if numbers else None
    if found is None and how in ("auto", "text"):
        found = " ".join(text.split()) or None
    return found


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def groups_from_prompts(prompts: list[str]) -> list[int]:
    """Group ids for __call__, which gets no batch: a group is a run of consecutive, identical prompts
    (the sampler emits the group_size responses of a prompt next to each other)."""
    ids: list[int] = []
    for i, p in enumerate(prompts):
        ids.append(0 if i == 0 else ids[-1] + (p != prompts[i - 1]))
    return ids


class _AnswerVote(Reward):
    """Shared machinery of rewards that compare the answers within a group."""

    needs_policy_stats = True
    unsupervised = True

    def __init__(self, extractor: str, equivalence: str) -> None:
        _check_choice("extractor", extractor, EXTRACTORS[:-1])
        _check_choice("equivalence", equivalence, ("exact", "math_verify"))
        self.extractor, self.equivalence = extractor, equivalence
        self._verifier: MathVerifyReward | None = None

    def same(self, a: str, b: str) -> bool:
        if a == b or self.equivalence == "exact":
            return a == b
        if self._verifier is None:
            self._verifier = MathVerifyReward()
        wrap = lambda s: s if "$" in s or "\\boxed" in s else f"${s}$"  # noqa: E731
        return self._verifier.check(wrap(a), b)[0]

    def clusters(self, answers: list[str | None]) -> list[int]:
        """Greedy clustering (EMPO's get_semantic_ids_by_rule); missing answers share one cluster."""
        ids = [-1] * len(answers)
        for i, a in enumerate(answers):
            if ids[i] >= 0:
                continue
            ids[i] = max(ids) + 1
            for j in range(i + 1, len(answers)):
                b = answers[j]
                both_missing = a is None and b is None
                if ids[j] < 0 and (both_missing or None not in (a, b) and self.same(a, b)):
                    ids[j] = ids[i]
        return ids

    def score_groups(self, completions: list[str], groups: list[int]) -> tuple[Tensor, list[Info]]:
        answers = [extract_answer(c, self.extractor) for c in completions]
        values, infos = [0.0] * len(completions), [{} for _ in completions]
        for g in dict.fromkeys(groups):
            rows = [i for i, x in enumerate(groups) if x == g]
            group_values, group_infos = self.score_group([answers[i] for i in rows])
            for i, v, info in zip(rows, group_values, group_infos):
                values[i], infos[i] = v, {"extracted": answers[i], **info}
        self.metrics["answer_rate"] = sum(a is not None for a in answers) / max(len(answers), 1)
        if self._verifier is not None:
            # no worker outlives a call: a forked worker inherits the trainer's SIGTERM handler and
            # would ignore the interpreter-exit termination, hanging the exit
            self._verifier.close()
        return _finish(values, infos)

    @abstractmethod
    def score_group(self, answers: list[str | None]) -> tuple[list[float], list[Info]]:
        """Rewards and infos of one group's extracted answers (None: no answer)."""

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        return self.score_groups(completions, groups_from_prompts(prompts))

    def score_batch(self, batch: RolloutBatch) -> tuple[Tensor, list[Info]]:
        return self.score_groups([i["completion"] for i in batch.info], batch.group_ids.tolist())


@register("reward", "empo")
class EMPOReward(_AnswerVote):
    """EMPO semantic-cluster reward, arXiv 2504.05812: r_i = |c(i)| / G, the share of i's answer cluster.

    Clusters are built greedily within each group (``equivalence``: exact string match of the
    extracted answers, or ``math_verify``); responses with no extractable answer share one cluster,
    count in the semantic entropy SE = -sum_c p_c log p_c and get 0. If SE >= log G (every answer
    distinct; also any group of one) the whole group gets 0. Use with GRPO advantages.
    """

    def __init__(self, *, extractor: str = "auto", equivalence: str = "exact") -> None:
        super().__init__(extractor, equivalence)

    def score_group(self, answers: list[str | None]) -> tuple[list[float], list[Info]]:
        ids = self.clusters(answers)
        share = [ids.count(c) / len(ids) for c in ids]
        se = sum(ids.count(c) / len(ids) * math.log(len(ids) / ids.count(c)) for c in set(ids))
        confident = se < math.log(len(ids)) - 1e-9
        values = [s if confident and a is not None else 0.0 for s, a in zip(share, answers)]
        return values, [{"cluster": c, "semantic_entropy": se} for c in ids]


@register("reward", "majority_vote")
class MajorityVoteReward(_AnswerVote):
    """Majority-vote pseudo-label (TTRL-style, arXiv 2504.16084): r_i = 1 if i's answer is equivalent to
    the group's most frequent answer, else 0; no ground truth.

    Responses without an extractable answer do not vote and get 0; a group with no answer gets 0.
    Ties go to the tied answer that appears first in the group (``Counter.most_common`` order); a
    group of one votes for itself.
    """

    def __init__(self, *, extractor: str = "auto", equivalence: str = "exact") -> None:
        super().__init__(extractor, equivalence)

    def score_group(self, answers: list[str | None]) -> tuple[list[float], list[Info]]:
        ids = self.clusters(answers)
        votes = Counter(c for c, a in zip(ids, answers) if a is not None)
        if not votes:
            return [0.0] * len(answers), [{"majority": None} for _ in answers]
        top = votes.most_common(1)[0][0]
        label = answers[ids.index(top)]
        values = [float(c == top and a is not None) for c, a in zip(ids, answers)]
        return values, [{"majority": label, "vote_share": votes[top] / len(answers)}] * len(ids)


class _PolicyStatReward(Reward):
    """Rewards computed from the old-policy recompute (batch.entropy / old_logprobs)."""

    needs_policy_stats = True
    unsupervised = True

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        raise TypeError(
            f"reward '{self.registry_name}' scores from the policy's own token statistics: the module "
            "calls score_batch(batch) after the old-policy pass; it cannot score text alone"
        )


@register("reward", "rent")
class RENTReward(_PolicyStatReward):
    """RENT, arXiv 2505.22660: r_i = -mean_t H_t over the whole response (old-policy entropies).

    A format failure (``extractor`` finds no answer in info["completion"], e.g. an empty or, with
    "boxed", an unboxed completion) replaces the mean entropy by ``entropy_base`` (7.0, code default),
    so r = -7; ``extractor: none`` never fails. Use with GRPO advantages (rent-rl ``entropy.yaml``).
    """

    def __init__(self, *, entropy_base: float = 7.0, extractor: str = "auto") -> None:
        _check_choice("extractor", extractor, EXTRACTORS)
        self.entropy_base, self.extractor = entropy_base, extractor

    def score_batch(self, batch: RolloutBatch) -> tuple[Tensor, list[Info]]:
        mask = batch.response_mask.float()
        mean_h = (batch.entropy.float() * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        ok = [extract_answer(i.get("completion"), self.extractor) is not None for i in batch.info]
        ok_t = torch.tensor(ok, dtype=torch.bool, device=mean_h.device)
        rewards = -torch.where(ok_t, mean_h, torch.full_like(mean_h, self.entropy_base))
        self.metrics["format_ok"] = sum(ok) / max(len(ok), 1)
        infos = [{"mean_entropy": float(h), "format_ok": o} for h, o in zip(mean_h, ok)]
        return rewards.cpu(), infos


@register("reward", "em_rl")
class EMRLReward(_PolicyStatReward):
    """EM-RL, arXiv 2505.15134 [UNVERIFIED]: reward = negative entropy of the response.

    ``variant: token`` r_i = -sum_t H_t (token-level, old-policy entropies); ``trajectory``
    r_i = sum_t log pi_old(o_t) = log pi(y), the one-sample estimate of the trajectory entropy's negative.
    """

    def __init__(self, *, variant: str = "token") -> None:
        _check_choice("variant", variant, ("token", "trajectory"))
        self.variant = variant

    def score_batch(self, batch: RolloutBatch) -> tuple[Tensor, list[Info]]:
        mask = batch.response_mask.float()
        values = -batch.entropy.float() if self.variant == "token" else batch.old_logprobs.float()
        rewards = (torch.where(mask > 0, values, torch.zeros_like(values)) * mask).sum(-1)
        return rewards.cpu(), [{} for _ in range(batch.size)]


@register("reward", "constant")
class ConstantReward(Reward):
    """r = value for every response: group-relative advantages are exactly 0, so the policy-gradient
    term vanishes and the regularizer (e.g. ``em_ft``) is the whole objective (one-shot EM)."""

    unsupervised = True

    def __init__(self, *, value: float = 0.0) -> None:
        self.value = value

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        return _finish([self.value] * len(completions), [{} for _ in completions])


# ---- Format rewards, weighted combinations, and rewards that fail ---------------------------------


@register("reward", "format")
class FormatReward(Reward):
    """r = correct_reward iff the completion has the requested shape, else wrong_reward: with ``think``,
    one ``<think>...</think>`` block followed by a non-empty answer (``think_in_prompt``: the prompt
    already opened ``<think>``, as in R1-Zero templates, so the completion only closes it); with
    ``boxed``, a ``\\boxed{...}`` in the answer part. Combine it with an accuracy reward through
    ``combined`` (DeepSeek-R1, arXiv 2501.12948, rewards accuracy and format separately).
    """

    def __init__(
        self,
        *,
        think: bool = True,
        boxed: bool = False,
        think_in_prompt: bool = False,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
    ) -> None:
        if not (think or boxed):
            raise ValueError("set think and/or boxed: a format reward must check something")
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward={correct_reward} must exceed wrong_reward={wrong_reward}")
        self.think, self.boxed, self.think_in_prompt = think, boxed, think_in_prompt
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward

    def reason(self, completion: str) -> str | None:
        """Why the completion misses the format, or None."""
        answer = completion
        if self.think:
            opener = "" if self.think_in_prompt else r"\s*<think>"
            match = re.fullmatch(opener + r"(.*?)</think>(.*)", completion, flags=re.DOTALL)
            if match is None or "<think>" in match.group(1) or "</think>" in match.group(2):
                return "no single <think>...</think> block"
            answer = match.group(2)
            if not answer.strip():
                return "nothing after </think>"
        if self.boxed and _last_boxed(answer) is None:
            return "no \\boxed{...} answer"
        return None

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        _check_lengths(completions, references)
        reasons = [self.reason(c or "") for c in completions]
        values = [self.correct_reward if r is None else self.wrong_reward for r in reasons]
        return _finish(values, [{"format_ok": r is None, "format_reason": r} for r in reasons])


def call_reward(
    reward: Reward,
    prompts: list[str],
    completions: list[str],
    references: list[str | None],
    *,
    strict: bool = False,
) -> tuple[Tensor, list[Info]]:
    """``reward(prompts, completions, references)``, where a reward that raises costs only the samples it
    raises on: the batch is rescored one sample at a time and each failing sample gets 0 with
    ``reason = "error: <type>: <message>"``; ``reward.metrics["errors"]`` counts them. ``strict``
    re-raises instead (a bug in a reward should stop a debugging run)."""
    try:
        return reward(prompts, completions, references)
    except Exception:
        if strict:
            raise
    values, infos, errors = [], [], 0
    for p, c, r in zip(prompts, completions, references):
        try:
            v, info = reward([p], [c], [r])
            values.append(float(v[0]))
            infos.append(info[0])
        except Exception as err:  # one bad sample (or a reward bug) must not end a long run
            errors += 1
            message = " ".join(str(err).split())[:200]
            values.append(0.0)
            infos.append({"correct": False, "reason": f"error: {type(err).__name__}: {message}"})
    reward.metrics["errors"] = float(errors)
    return _finish(values, infos)


@register("reward", "combined")
class CombinedReward(Reward):
    """r = sum_i weight_i * r_i over several rewards, each built through the registry:
    ``rewards: [{name: math_verify, weight: 1.0}, {name: format, weight: 0.2, boxed: true}]``.

    Each part is logged separately (``rollout/<name>``: its mean before weighting) and stored per
    sample (``info["reward/<name>"]``). ``correct`` comes from the first part that reports it (put the
    accuracy reward first). A part that raises on a sample scores that sample 0 and is counted in
    ``rollout/errors``, unless ``strict``. Parts that score from policy statistics cannot be combined.
    Without ``rewards``: math_verify (weight 1) + format with a boxed answer (weight 0.1).
    """

    # rewards=None: accuracy plus a small bonus for a boxed answer, the usual math setting
    DEFAULT_PARTS: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "math_verify", "weight": 1.0},
        {"name": "format", "weight": 0.1, "think": False, "boxed": True},
    )

    def __init__(self, *, rewards: list[dict[str, Any]] | None = None, strict: bool = False) -> None:
        from lightning_entropy.registry import REWARDS

        if rewards is None:
            rewards = [dict(p) for p in self.DEFAULT_PARTS]
        if not rewards:
            raise ValueError("rewards must list at least one {name: ..., weight: ...}")
        self.parts: list[tuple[str, float, Reward]] = []
        self.strict = strict
        for i, spec in enumerate(rewards):
            spec = dict(spec)
            if "name" not in spec:
                raise ValueError(f"rewards[{i}] has no name; registered: {', '.join(REWARDS.names())}")
            name, weight = spec.pop("name"), float(spec.pop("weight", 1.0))
            if name == "combined":
                raise ValueError(f"rewards[{i}]: a combined reward cannot contain another")
            part = REWARDS.build(name, spec, key=f"reward.rewards[{i}]")
            if part.needs_policy_stats:
                raise ValueError(
                    f"rewards[{i}]: '{name}' scores from policy statistics and cannot be combined"
                )
            label = name if name not in [n for n, _, _ in self.parts] else f"{name}_{i}"
            self.parts.append((label, weight, part))

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> tuple[Tensor, list[Info]]:
        _check_lengths(completions, references)
        total = torch.zeros(len(completions), dtype=torch.float32)
        infos: list[Info] = [{} for _ in completions]
        errors = 0.0
        for label, weight, part in self.parts:
            values, part_infos = call_reward(part, prompts, completions, references, strict=self.strict)
            values = values.float().cpu()
            total += weight * values
            self.metrics[label] = float(values.mean()) if len(values) else 0.0
            for k, v in part.metrics.items():
                if k == "errors":
                    errors += float(v)
                else:
                    self.metrics[f"{label}_{k}"] = v
            part.metrics.clear()
            for info, part_info, v in zip(infos, part_infos, values.tolist()):
                info[f"reward/{label}"] = v
                for k, x in part_info.items():
                    info.setdefault(k, x)  # the first part's correct/reason/extracted win
        self.metrics["errors"] = errors
        return total, infos

    def close(self) -> None:
        for _, _, part in self.parts:
            if hasattr(part, "close"):
                part.close()
