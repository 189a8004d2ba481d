"""Step-by-step solutions of the verifiable tasks, with checkers that find the first wrong step.

The tasks of :mod:`offside_jax.correct.tasks` answer with a bare result (an integer, an
expression). Learning from mistakes needs *reasoning steps* — an error sits at one step, a
prefix is cut after it, a fix continues from it — so each task gets one deterministic step
format here, one step per line, the last line always ``answer <final answer>``:

Carry arithmetic, column by column from the units, the incoming carry (borrow) always written::

    478+256=            8+6+0=14 write 4 carry 1
                        7+5+1=13 write 3 carry 1
                        4+2+1=7 write 7 carry 0
                        answer 734

  (subtraction: ``2-7-0=-5 write 5 borrow 1``: a negative column value borrows ten).

Countdown-mini, the goal restated, then one combination per line in post-order (left subtree
first), then the expression::

    2 3 4 to 10:        goal 10 from 2 3 4
                        2*3=6
                        6+4=10
                        answer (2*3)+4

Renderers take *faults* (a dropped carry, a skipped column, a slipped value) and continue
consistently from them, the way a student who made the mistake would; the checkers do not
know about faults and judge steps on their own (carry arithmetic: against the one correct
column sequence; Countdown: every combination must use available numbers and be exact).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction

from offside_jax.correct.tasks import CarryArithmetic, CountdownMini, Problem, Task

ANSWER_PREFIX = "answer "


@dataclasses.dataclass(frozen=True)
class Solution:
    """A step-by-step solution; ``steps[-1]`` is the ``answer ...`` line."""

    steps: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.steps)

    @property
    def answer(self) -> str | None:
        return final_answer(self.text)


def final_answer(text: str) -> str | None:
    """What the last ``answer ...`` line states (``None`` when there is none)."""
    found = [line[len(ANSWER_PREFIX):].strip() for line in text.splitlines() if line.startswith(ANSWER_PREFIX)]
    return found[-1] if found else None


def first_difference(steps: Sequence[str], reference: Sequence[str]) -> int | None:
    """Index of the first step that differs from ``reference`` (a missing or extra step counts
    at its position); ``None`` when they are equal."""
    for i, (got, want) in enumerate(zip(steps, reference)):
        if got != want:
            return i
    return None if len(steps) == len(reference) else min(len(steps), len(reference))


# -- carry arithmetic -------------------------------------------------------------------------------


def _digit(n: int, i: int) -> int:
    return n // 10**i % 10


def column_solution(
    a: int,
    b: int,
    op: str,
    *,
    carry_in: Mapping[int, int] | None = None,
    value_offset: Mapping[int, int] | None = None,
    skip: int | None = None,
) -> tuple[Solution, int]:
    """Column-by-column ``a op b`` and the number its written digits make.

    Faults, each continued consistently: ``carry_in[i]`` replaces the carry (borrow) that
    column ``i`` receives (a dropped carry out of column ``i - 1`` is ``carry_in={i: 0}``);
    ``value_offset[i]`` adds to column ``i``'s value (a slip); ``skip`` omits column ``skip``
    altogether (its carry passes on to the next column, its digit is never written).
    """
    if op not in "+-" or len(op) != 1:
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    carry_in, value_offset = dict(carry_in or {}), dict(value_offset or {})
    columns = max(len(str(a)), len(str(b)))
    steps, digits, carry = [], [], 0
    for i in range(columns):
        carry = carry_in.get(i, carry)
        if i == skip:
            continue
        x, y = _digit(a, i), _digit(b, i)
        if op == "+":
            value = x + y + carry + value_offset.get(i, 0)
            steps.append(f"{x}+{y}+{carry}={value} write {value % 10} carry {value // 10}")
            carry = value // 10
        else:
            value = x - y - carry + value_offset.get(i, 0)
            steps.append(f"{x}-{y}-{carry}={value} write {value % 10} borrow {int(value < 0)}")
            carry = int(value < 0)
        digits.append(value % 10)
    carry = carry_in.get(columns, carry)  # the carry out of the last column (a dropped final carry)
    # A final carry is the leading digit; a final borrow (a < b) leaves the digits as they are.
    result = sum(d * 10**k for k, d in enumerate(digits)) + (carry * 10 ** len(digits) if op == "+" else 0)
    return Solution(tuple(steps) + (f"{ANSWER_PREFIX}{result}",)), result


def column_value(step: str) -> int:
    """The value a column step computes (``7+5+1=13 write 3 carry 1`` -> 13)."""
    return int(step.split("=")[1].split()[0])


def carry_reference(problem: Problem) -> Solution:
    m = problem.meta
    return column_solution(m["a"], m["b"], m["op"])[0]


def carry_first_wrong_step(problem: Problem, steps: Sequence[str]) -> int | None:
    """The column format is deterministic: the first step that differs from the correct one."""
    return first_difference(steps, carry_reference(problem).steps)


# -- Countdown-mini ---------------------------------------------------------------------------------

Tree = int | tuple["Tree", str, "Tree"]

_EXPR_TOKEN = re.compile(r"\d+|[-+*/()]")
_COMBINATION = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def apply(op: str, x: Fraction, y: Fraction) -> Fraction | None:
    """``x op y`` exactly; ``None`` for a division by zero."""
    if op == "/":
        return None if y == 0 else x / y
    return {"+": x + y, "-": x - y, "*": x * y}[op]


def parse_tree(text: str) -> Tree:
    """The tree of a fully parenthesised expression whose outermost parentheses are dropped,
    the form :class:`~offside_jax.correct.tasks.CountdownMini` writes (``(2*3)+4``)."""
    tokens = _EXPR_TOKEN.findall(text.replace(" ", ""))
    if "".join(tokens) != text.replace(" ", ""):
        raise ValueError(f"{text!r} is not an arithmetic expression")
    pos = 0

    def operand() -> Tree:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            node = binary()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError(f"{text!r}: missing ')'")
            pos += 1
            return node
        if not tok.isdigit():
            raise ValueError(f"{text!r}: unexpected {tok!r}")
        return int(tok)

    def binary() -> Tree:
        nonlocal pos
        left = operand()
        if pos < len(tokens) and tokens[pos] in "+-*/":
            op = tokens[pos]
            pos += 1
            return (left, op, operand())
        return left

    tree = binary()
    if pos != len(tokens):
        raise ValueError(f"{text!r}: not fully parenthesised at {tokens[pos]!r}")
    return tree


def tree_text(tree: Tree, top: bool = True) -> str:
    if isinstance(tree, int):
        return str(tree)
    left, op, right = tree
    inner = f"{tree_text(left, False)}{op}{tree_text(right, False)}"
    return inner if top else f"({inner})"


def tree_value(tree: Tree) -> Fraction | None:
    if isinstance(tree, int):
        return Fraction(tree)
    left, op, right = tree
    x, y = tree_value(left), tree_value(right)
    return None if x is None or y is None else apply(op, x, y)


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else str(v)


def combination(x: Fraction, op: str, y: Fraction, z: Fraction) -> str:
    return f"{_fmt(x)}{op}{_fmt(y)}={_fmt(z)}"


def tree_combinations(tree: Tree) -> list[tuple[Fraction, str, Fraction, Fraction]]:
    """``(x, op, y, x op y)`` of every inner node, post-order, left subtree first."""
    out: list[tuple[Fraction, str, Fraction, Fraction]] = []

    def walk(t: Tree) -> Fraction:
        if isinstance(t, int):
            return Fraction(t)
        left, op, right = t
        x, y = walk(left), walk(right)
        z = apply(op, x, y)
        out.append((x, op, y, z))
        return z

    walk(tree)
    return out


def parse_combination(step: str) -> tuple[Fraction, str, Fraction, Fraction] | None:
    """``(x, op, y, z)`` of a combination line ``x op y = z``; ``None`` for any other line."""
    m = _COMBINATION.match(step)
    return None if m is None else (Fraction(int(m[1])), m[2], Fraction(int(m[3])), Fraction(int(m[4])))


def goal_line(numbers: Sequence[int], target: int) -> str:
    return f"goal {target} from {' '.join(map(str, numbers))}"


def countdown_solution(tree: Tree, numbers: Sequence[int], target: int) -> Solution:
    """Goal, the combinations of ``tree`` in post-order, the expression."""
    steps = [goal_line(numbers, target)] + [combination(*c) for c in tree_combinations(tree)]
    return Solution(tuple(steps) + (ANSWER_PREFIX + tree_text(tree),))


def countdown_reference(problem: Problem) -> Solution:
    return countdown_solution(parse_tree(problem.answer), problem.meta["numbers"], problem.meta["target"])


def _moves(items: Sequence[tuple[Tree, Fraction]]) -> Iterator[tuple[int, int, str, Fraction]]:
    """Combinations the generator itself can make: ``-`` only to a positive result, ``/`` only
    exact and not by 1; ``+``/``*`` once per unordered pair."""
    for i, j in itertools.permutations(range(len(items)), 2):
        x, y = items[i][1], items[j][1]
        for op in "+-*/":
            if op in "+*" and i > j:
                continue
            if op == "-" and not x > y:
                continue
            if op == "/" and not (y > 1 and (x / y).denominator == 1):
                continue
            yield i, j, op, apply(op, x, y)


def search(items: Sequence[tuple[Tree, Fraction]], target: int) -> Iterator[tuple[Tree, list[tuple[Fraction, str, Fraction, Fraction]]]]:
    """Depth-first, deterministic: every way to combine ``items`` (``(tree, value)``, the value
    as the solver believes it) into one item of value ``target``; yields the final tree and
    the combinations made, in order."""
    if len(items) == 1:
        if items[0][1] == target:
            yield items[0][0], []
        return
    for i, j, op, z in _moves(items):
        rest = [it for k, it in enumerate(items) if k not in (i, j)]
        step = (items[i][1], op, items[j][1], z)
        for tree, steps in search(rest + [((items[i][0], op, items[j][0]), z)], target):
            yield tree, [step] + steps


def countdown_trees(numbers: Sequence[int], target: int, limit: int = 64) -> list[Tree]:
    """Up to ``limit`` distinct correct expression trees, sorted by their text."""
    seen: dict[str, Tree] = {}
    for tree, _ in search([(n, Fraction(n)) for n in numbers], target):
        seen.setdefault(tree_text(tree), tree)
        if len(seen) >= limit:
            break
    return [seen[k] for k in sorted(seen)]


def countdown_first_wrong_step(task: CountdownMini, problem: Problem, steps: Sequence[str]) -> int | None:
    """Judge each step on its own: the goal must restate the problem; a combination must take
    two numbers still available and compute exactly; the last step must state an expression
    the task verifies as right. A missing answer counts at the end."""
    numbers, target = problem.meta["numbers"], problem.meta["target"]
    available = [Fraction(n) for n in numbers]
    for i, step in enumerate(steps):
        if i == 0:
            if step != goal_line(numbers, target):
                return 0
            continue
        if step.startswith(ANSWER_PREFIX):
            right = task.verify(step[len(ANSWER_PREFIX):], problem) == task.correct_reward
            return None if right and i == len(steps) - 1 else i
        parsed = parse_combination(step)
        if parsed is None:
            return i
        x, op, y, z = parsed
        if x not in available:
            return i
        available.remove(x)
        if y not in available or apply(op, x, y) != z:
            return i
        available.remove(y)
        available.append(z)
    return len(steps)


# -- dispatch ---------------------------------------------------------------------------------------


def reference_solution(task: Task, problem: Problem) -> Solution:
    """The correct step-by-step solution of ``problem`` in ``task``'s step format."""
    if isinstance(task, CarryArithmetic):
        return carry_reference(problem)
    if isinstance(task, CountdownMini):
        return countdown_reference(problem)
    raise TypeError(f"no step format for task {getattr(task, 'name', task)!r} (carry_arithmetic, countdown_mini)")


def first_wrong_step(task: Task, problem: Problem, steps: Sequence[str]) -> int | None:
    """Index of the first wrong step, ``None`` for a correct solution."""
    if isinstance(task, CarryArithmetic):
        return carry_first_wrong_step(problem, steps)
    if isinstance(task, CountdownMini):
        return countdown_first_wrong_step(task, problem, steps)
    raise TypeError(f"no step format for task {getattr(task, 'name', task)!r} (carry_arithmetic, countdown_mini)")


def solves(task: Task, problem: Problem, text: str) -> bool:
    """Whether a step-format text ends with an answer the task verifies as fully right."""
    answer = final_answer(text)
    if answer is None:
        return False
    full = getattr(task, "correct_reward", 1.0)
    return task.verify(answer, problem) >= full
