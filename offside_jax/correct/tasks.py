"""Verifiable tasks for RL self-correction: each a seeded generator of problems and a verifier
that turns a completion's text into a reward. Pure Python/numpy (no models, no data files).

Every task provides

- ``sample(rng) -> Problem`` (``rng`` a ``numpy.random.Generator``; :func:`make_problems` draws
  a deterministic list from a seed);
- ``extract(text) -> str | None``: the answer stated by a completion in canonical form, or
  ``None`` when the completion is malformed (for repetition penalties and unique-answer
  ratios);
- ``verify(text, problem) -> float``: the reward;
- ``alphabet``: every character its prompts, answers and warm-up attempts can contain (for
  character-level tokenizers);
- ``warmup_attempts(problem, rng) -> (attempt1, attempt2)``: an SFT trace whose first attempt
  is wrong with probability ``p_bug`` (a realistic mistake) and whose second attempt fixes a
  wrong first attempt with probability ``p_fix`` (else repeats it), so a warmed-up model starts
  with a buggy prior and a habit of revising that is as weak as ``p_fix`` makes it: the
  lazy corrector (minimal edits) that SCoRe finds after supervised fine-tuning, with known
  rates.

Tasks (``self_correction.md``, "Tiny verifiable tasks"):

1. :class:`CarryArithmetic`: ``a + b`` / ``a - b`` with 2-4 digits; the buggy attempt drops one
   carry (or borrow); exact-match reward.
2. :class:`CountdownMini`: reach a target <= 24 from 3-4 numbers, each used exactly once, with
   ``+ - * /`` and parentheses; reward 1 (right), 0.1 (well-formed but wrong), 0 (malformed).
3. :class:`RumorCorrection`: OFFSIDE-style records ``{question, rumor, fact}``; the answer is
   rewarded when it states the verified fact and not the rumor.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from fractions import Fraction
from typing import Any, Mapping, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task instance: the prompt text, a reference answer that verifies, task metadata."""

    prompt: str
    answer: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Task(Protocol):
    name: str

    @property
    def alphabet(self) -> str: ...

    def sample(self, rng: np.random.Generator) -> Problem: ...

    def extract(self, text: str) -> str | None: ...

    def verify(self, text: str, problem: Problem) -> float: ...

    def warmup_attempts(self, problem: Problem, rng: np.random.Generator) -> tuple[str, str]: ...


def make_problems(task: Task, n: int, seed: int) -> list[Problem]:
    """``n`` problems drawn from ``numpy.random.default_rng(seed)`` (same seed, same list)."""
    rng = np.random.default_rng(seed)
    return [task.sample(rng) for _ in range(n)]


def _check_rates(p_bug: float, p_fix: float) -> None:
    for name, value in (("p_bug", p_bug), ("p_fix", p_fix)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def lazy_second_attempt(first: str, right: str, p_fix: float, rng: np.random.Generator) -> str:
    """The warm-up's second attempt: ``right`` when the first attempt is right; after a wrong
    one, ``right`` with probability ``p_fix``, else the first attempt repeated. Draws from
    ``rng`` only when ``p_fix < 1`` and the first attempt is wrong (so ``p_fix = 1`` traces do
    not depend on it)."""
    if first == right or p_fix >= 1.0 or rng.random() < p_fix:
        return right
    return first


# -- 1. carry arithmetic ----------------------------------------------------------------------------

_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


def carry_columns(a: int, b: int) -> list[int]:
    """Columns (0 = units) whose digit sum, with the incoming carry, produces a carry out."""
    cols, carry, i = [], 0, 0
    while a or b or carry:
        s = a % 10 + b % 10 + carry
        carry = int(s >= 10)
        if carry:
            cols.append(i)
        a, b, i = a // 10, b // 10, i + 1
    return cols


def borrow_columns(a: int, b: int) -> list[int]:
    """Columns (0 = units) of ``a - b`` (``a >= b``) that borrow from the next column."""
    cols, borrow, i = [], 0, 0
    while b or borrow:
        d = a % 10 - b % 10 - borrow
        borrow = int(d < 0)
        if borrow:
            cols.append(i)
        a, b, i = a // 10, b // 10, i + 1
    return cols


def dropped_carry(a: int, b: int, op: str, column: int) -> int:
    """The result with the carry (``+``) or borrow (``-``) out of ``column`` forgotten.

    Forgetting a carry out of column ``i`` removes one unit of ``10^(i+1)`` from the sum (the
    later columns then carry as usual), so the buggy sum is ``a + b - 10^(i+1)``; forgetting a
    borrow leaves the next column one too high: ``a - b + 10^(i+1)``.
    """
    return a + b - 10 ** (column + 1) if op == "+" else a - b + 10 ** (column + 1)


@dataclasses.dataclass(frozen=True)
class CarryArithmetic:
    """``a op b =`` with ``a, b`` of ``min_digits..max_digits`` digits; subtraction keeps
    ``a >= b`` (no negative results). The completion is the bare integer."""

    min_digits: int = 2
    max_digits: int = 4
    ops: str = "+-"
    p_bug: float = 0.3
    p_fix: float = 1.0
    name: str = "carry_arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"ops must be a non-empty combination of '+' and '-', got {self.ops!r}")
        _check_rates(self.p_bug, self.p_fix)

    @property
    def alphabet(self) -> str:
        return "0123456789=" + self.ops

    def _number(self, rng: np.random.Generator) -> int:
        digits = int(rng.integers(self.min_digits, self.max_digits + 1))
        return int(rng.integers(10 ** (digits - 1), 10**digits))

    def sample(self, rng: np.random.Generator) -> Problem:
        a, b = self._number(rng), self._number(rng)
        op = self.ops[int(rng.integers(len(self.ops)))]
        if op == "-" and a < b:
            a, b = b, a
        result = a + b if op == "+" else a - b
        cols = carry_columns(a, b) if op == "+" else borrow_columns(a, b)
        return Problem(f"{a}{op}{b}=", str(result), {"a": a, "b": b, "op": op, "carry_columns": tuple(cols)})

    def extract(self, text: str) -> str | None:
        """The integer written (surrounding whitespace ignored), ``None`` for anything else
        (signs, spaces inside, leading zeros, letters)."""
        s = text.strip()
        return s if _INTEGER.fullmatch(s) else None

    def verify(self, text: str, problem: Problem) -> float:
        return float(self.extract(text) == problem.answer)

    def warmup_attempts(self, problem: Problem, rng: np.random.Generator) -> tuple[str, str]:
        cols = problem.meta["carry_columns"]
        if cols and rng.random() < self.p_bug:
            col = int(cols[int(rng.integers(len(cols)))])
            first = str(dropped_carry(problem.meta["a"], problem.meta["b"], problem.meta["op"], col))
        else:
            first = problem.answer
        return first, lazy_second_attempt(first, problem.answer, self.p_fix, rng)


# -- 2. Countdown-mini ------------------------------------------------------------------------------


class ExpressionError(ValueError):
    """Text outside the expression grammar."""


_TOKEN = re.compile(r"\s*(?:([0-9]+)|(.))")


def _tokens(text: str) -> list[str]:
    out = []
    for number, symbol in _TOKEN.findall(text):
        if number:
            out.append(number)
        elif symbol.strip():
            if symbol not in "+-*/()":
                raise ExpressionError(f"character {symbol!r} is not in the grammar")
            out.append(symbol)
    return out


def parse_expression(text: str) -> tuple[Fraction | None, list[int]]:
    """Parse ``expr := term (('+'|'-') term)*``, ``term := factor (('*'|'/') factor)*``,
    ``factor := integer | '(' expr ')'`` (no unary minus, nothing else: never ``eval``).

    Returns the exact value (``None`` after a division by zero) and the integers used, in
    order. Raises :class:`ExpressionError` for text outside the grammar.
    """
    tokens = _tokens(text)
    if not tokens:
        raise ExpressionError("empty expression")
    pos = 0
    numbers: list[int] = []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        tok = peek()
        if tok is None:
            raise ExpressionError("unexpected end of expression")
        pos += 1
        return tok

    def factor() -> Fraction | None:
        tok = take()
        if tok == "(":
            value = expr()
            if take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if tok.isdigit():
            if len(tok) > 1 and tok[0] == "0":
                raise ExpressionError(f"number {tok!r} has a leading zero")
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")

    def term() -> Fraction | None:
        value = factor()
        while peek() in ("*", "/"):
            op, right = take(), factor()
            if value is None or right is None:
                value = None
            elif op == "*":
                value = value * right
            else:
                value = None if right == 0 else value / right
        return value

    def expr() -> Fraction | None:
        value = term()
        while peek() in ("+", "-"):
            op, right = take(), term()
            value = None if value is None or right is None else (value + right if op == "+" else value - right)
        return value

    value = expr()
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r} after a complete expression")
    return value, numbers


@dataclasses.dataclass(frozen=True)
class CountdownMini:
    """Make ``target`` (1..``max_target``) from ``min_numbers..max_numbers`` numbers in
    ``1..max_number``, each used exactly once, with ``+ - * /`` and parentheses."""

    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 9
    max_target: int = 24
    p_bug: float = 0.3
    p_fix: float = 1.0
    correct_reward: float = 1.0
    format_reward: float = 0.1
    name: str = "countdown_mini"

    def __post_init__(self):
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, {self.max_numbers}")
        _check_rates(self.p_bug, self.p_fix)

    @property
    def alphabet(self) -> str:
        return "0123456789 to:+-*/()"

    def _solution(self, numbers: list[int], rng: np.random.Generator) -> tuple[str, Fraction]:
        """A random expression tree over ``numbers`` (shuffled); divisions only when exact."""
        items = [(str(n), Fraction(n)) for n in rng.permutation(numbers).tolist()]
        while len(items) > 1:
            i = int(rng.integers(len(items) - 1))
            (ls, lv), (rs, rv) = items[i], items[i + 1]
            ops = ["+", "*"] + (["-"] if lv > rv else []) + (["/"] if rv != 0 and (lv / rv).denominator == 1 and rv != 1 else [])
            op = ops[int(rng.integers(len(ops)))]
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else lv}[op]
            items[i : i + 2] = [(f"({ls}{op}{rs})", value)]
        text, value = items[0]
        return (text[1:-1] if text.startswith("(") and len(numbers) > 1 else text), value

    def sample(self, rng: np.random.Generator) -> Problem:
        while True:
            k = int(rng.integers(self.min_numbers, self.max_numbers + 1))
            numbers = sorted(int(x) for x in rng.integers(1, self.max_number + 1, size=k))
            text, value = self._solution(numbers, rng)
            if value.denominator == 1 and 1 <= value <= self.max_target:
                target = int(value)
                prompt = f"{' '.join(map(str, numbers))} to {target}:"
                return Problem(prompt, text, {"numbers": tuple(numbers), "target": target})

    def extract(self, text: str) -> str | None:
        """The expression without spaces, ``None`` outside the grammar."""
        try:
            parse_expression(text)
        except ExpressionError:
            return None
        return re.sub(r"\s+", "", text)

    def verify(self, text: str, problem: Problem) -> float:
        """1 if the expression uses exactly the given numbers and equals the target; 0.1 if it
        is well-formed but wrong (other numbers, other value, division by zero); else 0."""
        try:
            value, used = parse_expression(text)
        except ExpressionError:
            return 0.0
        right = sorted(used) == sorted(problem.meta["numbers"]) and value is not None and value == problem.meta["target"]
        return self.correct_reward if right else self.format_reward

    def warmup_attempts(self, problem: Problem, rng: np.random.Generator) -> tuple[str, str]:
        """The buggy first attempt swaps one operator of the solution for one that misses."""
        if rng.random() < self.p_bug:
            positions = [i for i, ch in enumerate(problem.answer) if ch in "+-*/"]
            for i in rng.permutation(positions).tolist():
                for op in rng.permutation(list("+-*/")).tolist():
                    candidate = problem.answer[:i] + op + problem.answer[i + 1 :]
                    if self.verify(candidate, problem) == self.format_reward:
                        return candidate, lazy_second_attempt(candidate, problem.answer, self.p_fix, rng)
        return problem.answer, problem.answer


# -- 3. rumor self-correction on OFFSIDE records --------------------------------------------------------


def normalize_text(text: str) -> str:
    """Casefolded, accents removed, punctuation to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def mentions(text: str, phrase: str) -> bool:
    """Whole-word, normalised containment (``"Real Madrid"`` is in ``"joins real madrid."``,
    ``"Inter"`` is not in ``"internal"``)."""
    p = normalize_text(phrase)
    return bool(p) and f" {p} " in f" {normalize_text(text)} "


def rumor_record_from_offside(record: Mapping[str, Any]) -> dict[str, str] | None:
    """``{question, rumor, fact}`` from an OFFSIDE-format record given as a plain dict
    (``question``, ``answer`` stating the rumor, ``corrected_answer`` the verified fact);
    ``None`` when the record has no correction (not a rumor)."""
    if record.get("is_rumor") is False:
        return None
    fact = record.get("corrected_answer")
    if not fact or not record.get("question") or not record.get("answer"):
        return None
    return {"question": str(record["question"]), "rumor": str(record["answer"]), "fact": str(fact)}


@dataclasses.dataclass(frozen=True)
class RumorCorrection:
    """Rumor self-correction: turn 1 asks e.g. a player's club; the reward goes to answers that
    state the verified fact and not the rumor (after the correction instruction, turn 2).

    ``records`` are plain dicts with ``question``, ``rumor`` and ``fact`` (names set by
    ``fields``); see :func:`rumor_record_from_offside` for OFFSIDE records.
    """

    records: tuple[Mapping[str, str], ...]
    fields: tuple[str, str, str] = ("question", "rumor", "fact")
    p_bug: float = 0.5
    p_fix: float = 1.0
    name: str = "rumor_correction"

    def __post_init__(self):
        if not self.records:
            raise ValueError("RumorCorrection needs at least one record")
        _check_rates(self.p_bug, self.p_fix)
        for i, record in enumerate(self.records):
            missing = [f for f in self.fields if not isinstance(record.get(f), str) or not record.get(f).strip()]
            if missing:
                raise ValueError(f"record {i} lacks non-empty text field(s) {missing}; it has {sorted(record)}")
            q, rumor, fact = (record[f] for f in self.fields)
            if normalize_text(rumor) == normalize_text(fact):
                raise ValueError(f"record {i}: the rumor and the fact are the same answer ({fact!r})")

    @property
    def alphabet(self) -> str:
        return "".join(sorted({ch for record in self.records for f in self.fields for ch in record[f]}))

    def problem(self, index: int) -> Problem:
        q, rumor, fact = (self.records[index][f] for f in self.fields)
        return Problem(q, fact, {"rumor": rumor, "index": index})

    def sample(self, rng: np.random.Generator) -> Problem:
        return self.problem(int(rng.integers(len(self.records))))

    def extract(self, text: str) -> str | None:
        s = normalize_text(text)
        return s or None

    def verify(self, text: str, problem: Problem) -> float:
        """1 when the text mentions the fact and, with the fact's mentions removed, not the
        rumor (so a fact that contains the rumor's words still passes); else 0."""
        if not mentions(text, problem.answer):
            return 0.0
        rest = f" {normalize_text(text)} ".replace(f" {normalize_text(problem.answer)} ", " ")
        return 0.0 if mentions(rest, problem.meta["rumor"]) else 1.0

    def warmup_attempts(self, problem: Problem, rng: np.random.Generator) -> tuple[str, str]:
        first = problem.meta["rumor"] if rng.random() < self.p_bug else problem.answer
        return first, lazy_second_attempt(first, problem.answer, self.p_fix, rng)


TASKS = {"carry_arithmetic": CarryArithmetic, "countdown_mini": CountdownMini, "rumor_correction": RumorCorrection}
