"""LEMMA (learning from errors, arXiv 2503.17439) as a data builder, adapted to verifiable tasks.

LEMMA trains on error-corrective trajectories ``tau_b^sub ⊕ RP ⊕ tau_g``: a flawed solution
cut right after its first wrong step, a reflection (transition) phrase, then either the fixed
step and a correct continuation (*Fix & Continue*) or a fresh correct solution (*Fresh &
Restart*). The paper has a teacher model label and inject errors; on carry arithmetic and
Countdown-mini the errors are injected *programmatically* into the correct step-by-step
solutions of :mod:`offside_jax.correct.steps` (our adaptation; no teacher):

- an error-type taxonomy per task, each type tagged with the paper's code (Tab. 1: CA
  calculation, MS missing step, QM question misinterpretation, FC formula confusion);
- each injection continues consistently from the mistake to a wrong final answer, as the
  "careless student" of ``prompts/inject_error.md`` does; injections that still reach the right
  answer are dropped (``inject_error.py``:141-148);
- the prefix ends exactly at the first wrong step, found by the task's step checker (which
  knows nothing of the injection), the wrong step included (``prompts/correct.md``: "the first
  error step also needs to be output as it is");
- both connections once per error (paper §3.4), and a trajectory whose final answer does not
  verify is dropped (the paper's last filter).

The 13 transition phrases are those listed verbatim in ``prompts/correct.md`` and
``prompts/connect.md``; one is drawn per trajectory (a single phrase would invite template
overfitting). The text after it is ours (the teacher writes it freely in the paper): Fix &
Continue goes straight on with the fixed step; Fresh & Restart adds :data:`RESTART_LINE`
and a whole correct solution, another correct one when the task has several (Countdown),
else the reference (as ``connect.py`` falls back to the ground truth).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

from offside_jax.correct import steps as st
from offside_jax.correct.records import SFTRecord
from offside_jax.correct.tasks import CarryArithmetic, CountdownMini, Problem, Task

TRANSITION_PHRASES = (
    "But, wait, let's pause and examine this more carefully.",
    "Wait a second, let's ensure this is right. Calculating carefully:",
    "Hmm, I want to verify this calculation. Let's go through it:",
    "Wait, this doesn't seem right. Let's pause and consider this:",
    "Let's pause and consider what we know so far.",
    "This didn't seem right. Wait, let's correct that.",
    "Wait, something seems off. Let's pause and consider what we know so far.",
    "Let's pause and consider if we've set up everything correctly.",
    "Wait a second. Is everything correct? Let me double-check.",
    "Wait, maybe there's something wrong. Let's pause and reconsider.",
    "The result looks strange, is everything correct? Let me double-check.",
    "Does this make sense? Let's rethink this.",
    "Could I have missed something? Let's pause and consider what we know so far.",
)
RESTART_LINE = "Let me start over from the beginning."  # ours: the paper's teacher writes this freely
FIX_AND_CONTINUE = "fix_and_continue"
FRESH_AND_RESTART = "fresh_and_restart"
CONNECTIONS = (FIX_AND_CONTINUE, FRESH_AND_RESTART)
# The README's SFT prompt; the default below is the bare task prompt, which tiny character-level
# models learn faster and which plain SFT baselines share.
LEMMA_PROMPT = "### Instruction:\n{prompt}\n\n### Response: Let's think step by step.\n"
PLAIN_PROMPT = "{prompt}\n"


@dataclasses.dataclass(frozen=True)
class ErrorType:
    code: str  # the paper's category (Tab. 1)
    description: str


CARRY_ERRORS = {
    "dropped_carry": ErrorType("CA", "the carry (borrow) out of a column is not added to the next column"),
    "digit_slip": ErrorType("CA", "one column's value is off by one"),
    "skipped_column": ErrorType("MS", "one column is skipped: its digit is never written"),
    "wrong_operation": ErrorType("QM", "the other operation is computed (+ for -, - for +)"),
}
COUNTDOWN_ERRORS = {
    "wrong_target": ErrorType("QM", "the target is misread; the numbers are combined to a nearby target"),
    "arithmetic_slip": ErrorType("CA", "one combination's result is off by one or two; later steps build on it"),
    "wrong_operator": ErrorType("FC", "one combination computes another operator than the one written"),
}


def error_taxonomy(task: Task) -> dict[str, ErrorType]:
    if isinstance(task, CarryArithmetic):
        return CARRY_ERRORS
    if isinstance(task, CountdownMini):
        return COUNTDOWN_ERRORS
    raise TypeError(f"no error taxonomy for task {getattr(task, 'name', task)!r}")


@dataclasses.dataclass(frozen=True)
class Injection:
    """One injected error: the whole wrong solution and where it first goes wrong."""

    error: str  # a key of the task's taxonomy
    site: tuple  # where the error was put (column, step, value ...), for the record
    solution: st.Solution
    first_wrong: int  # index into ``solution.steps``, from the task's checker
    reference: st.Solution

    @property
    def prefix(self) -> tuple[str, ...]:
        """``tau_b^sub``: the steps through the first wrong one."""
        return self.solution.steps[: self.first_wrong + 1]


# -- candidate errors per task (each a whole wrong solution, continued consistently) -----------------


def _carry_candidates(problem: Problem) -> list[tuple[str, tuple, st.Solution]]:
    a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
    columns = max(len(str(a)), len(str(b)))
    out = []
    for col in problem.meta["carry_columns"]:
        out.append(("dropped_carry", (col,), st.column_solution(a, b, op, carry_in={col + 1: 0})[0]))
    reference_steps = st.column_solution(a, b, op)[0].steps
    for col in range(columns):
        value = st.column_value(reference_steps[col])
        for delta in (-1, 1):
            lo, hi = (0, 19) if op == "+" else (-10, 9)  # values a carry (borrow) of one can express
            if lo <= value + delta <= hi:
                out.append(("digit_slip", (col, delta), st.column_solution(a, b, op, value_offset={col: delta})[0]))
        out.append(("skipped_column", (col,), st.column_solution(a, b, op, skip=col)[0]))
    other = "-" if op == "+" else "+"
    if other == "+" or a >= b:
        wrong = st.column_solution(a, b, other)[0]
        out.append(("wrong_operation", (other,), wrong))
    return out


def _frontier_after(tree: st.Tree, n_steps: int) -> tuple[list[tuple[st.Tree, Fraction]], int]:
    """The items (subtree, value) a solver holds after the first ``n_steps`` post-order
    combinations of ``tree`` (numbers not yet used, results not yet used) and the index of the
    item the last of those combinations made."""
    items: list[tuple[st.Tree, Fraction]] = []
    done, last = 0, -1

    def walk(t: st.Tree) -> None:
        nonlocal done, last
        if isinstance(t, int):
            items.append((t, Fraction(t)))
            return
        left, op, right = t
        walk(left)
        walk(right)
        if done < n_steps:  # post-order: both children are single items at the end by now
            (lt, lv), (rt, rv) = items[-2], items[-1]
            items[-2:] = [((lt, op, rt), st.apply(op, lv, rv))]
            done, last = done + 1, len(items) - 1

    walk(tree)
    return items, last


def _countdown_candidates(problem: Problem) -> list[tuple[str, tuple, st.Solution]]:
    numbers, target = problem.meta["numbers"], problem.meta["target"]
    tree = st.parse_tree(problem.answer)
    reference = st.countdown_solution(tree, numbers, target)
    out = []
    for wrong_target in sorted({target + d for d in (-3, -2, -1, 1, 2, 3)} - {target}):
        trees = st.countdown_trees(numbers, wrong_target, limit=1) if wrong_target >= 1 else []
        if trees:
            solution = st.countdown_solution(trees[0], numbers, wrong_target)
            out.append(("wrong_target", (wrong_target,), solution))
    combos = st.tree_combinations(tree)
    for j, (x, op, y, z) in enumerate(combos):
        slips = [("arithmetic_slip", (j, int(z + d)), z + d) for d in (-2, -1, 1, 2)]
        slips += [("wrong_operator", (j, other), st.apply(other, x, y)) for other in "+-*/" if other != op]
        for error, site, believed in slips:
            if believed is None or believed == z or believed < 1 or believed.denominator != 1:
                continue
            # The solver holds the slipped result as ``believed`` and finishes from there,
            # combining what is left so that, by its own arithmetic, the target comes out.
            items, slipped = _frontier_after(tree, j + 1)
            items[slipped] = (items[slipped][0], believed)
            found = next(st.search(items, target), None)
            if found is None:
                continue
            final, continuation = found
            steps = reference.steps[: j + 1] + (st.combination(x, op, y, believed),)
            steps += tuple(st.combination(*c) for c in continuation)
            out.append((error, site, st.Solution(steps + (st.ANSWER_PREFIX + st.tree_text(final),))))
    return out


def candidate_injections(task: Task, problem: Problem) -> list[Injection]:
    """Every error of the taxonomy at every site where it applies, kept only when the final
    answer is wrong and the prefix before the first wrong step is the reference's (so Fix &
    Continue can resume the reference there)."""
    if isinstance(task, CarryArithmetic):
        candidates = _carry_candidates(problem)
    elif isinstance(task, CountdownMini):
        candidates = _countdown_candidates(problem)
    else:
        raise TypeError(f"no error injection for task {getattr(task, 'name', task)!r}")
    reference = st.reference_solution(task, problem)
    out = []
    for error, site, solution in candidates:
        if st.solves(task, problem, solution.text):
            continue  # reached the right answer anyway: dropped, as LEMMA does
        k = st.first_wrong_step(task, problem, solution.steps)
        if k is None or k >= len(reference.steps) or solution.steps[:k] != reference.steps[:k]:
            continue
        out.append(Injection(error, site, solution, k, reference))
    return out


def sample_injections(task: Task, problem: Problem, rng: np.random.Generator, *, per_type: int = 1,
                      types: Sequence[str] | None = None) -> list[Injection]:
    """Up to ``per_type`` injections of each error type (the released code makes 5 of each of
    6 types; the paper samples types from the student's error distribution)."""
    taxonomy = error_taxonomy(task)
    unknown = set(types or ()) - set(taxonomy)
    if unknown:
        raise ValueError(f"unknown error types {sorted(unknown)} for {task.name}; known: {sorted(taxonomy)}")
    candidates = candidate_injections(task, problem)
    out = []
    for error in types or taxonomy:
        of_type = [c for c in candidates if c.error == error]
        for i in sorted(rng.permutation(len(of_type))[:per_type].tolist()):
            out.append(of_type[i])
    return out


# -- the two connections ----------------------------------------------------------------------------


def alternative_solutions(task: Task, problem: Problem) -> list[st.Solution]:
    """Correct solutions other than the reference (Countdown: other expressions); the
    reference alone when there is none."""
    reference = st.reference_solution(task, problem)
    if isinstance(task, CountdownMini):
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        others = [st.countdown_solution(t, numbers, target) for t in st.countdown_trees(numbers, target)]
        others = [s for s in others if s.steps != reference.steps]
        if others:
            return others
    return [reference]


def fix_and_continue(injection: Injection, phrase: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(prefix lines, corrective lines)``: the reflection phrase, the fixed step and the
    reference from there on (the prefix equals the reference before the wrong step)."""
    return injection.prefix, (phrase,) + injection.reference.steps[injection.first_wrong:]


def fresh_and_restart(injection: Injection, phrase: str, alternative: st.Solution) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(prefix lines, corrective lines)``: the reflection phrase, :data:`RESTART_LINE` and a
    whole correct solution."""
    return injection.prefix, (phrase, RESTART_LINE) + alternative.steps


@dataclasses.dataclass(frozen=True)
class LemmaConfig:
    per_type: int = 1  # injections per error type and problem
    types: tuple[str, ...] | None = None  # error types to inject (None: the whole taxonomy)
    connections: tuple[str, ...] = CONNECTIONS
    phrases: tuple[str, ...] = TRANSITION_PHRASES
    prompt_template: str = PLAIN_PROMPT  # or LEMMA_PROMPT
    # The paper trains on the whole trajectory, mistake included; False keeps the erroneous
    # prefix as context only (loss on the reflection and the correction).
    train_on_mistake: bool = True

    def __post_init__(self):
        bad = set(self.connections) - set(CONNECTIONS)
        if bad or not self.connections:
            raise ValueError(f"connections must be a non-empty subset of {CONNECTIONS}, got {self.connections}")
        if not self.phrases:
            raise ValueError("at least one transition phrase is needed")


def lemma_records(task: Task, problems: Sequence[Problem], rng: np.random.Generator,
                  config: LemmaConfig = LemmaConfig(), on_drop: Callable[[str], None] | None = None) -> list[SFTRecord]:
    """Error-corrective SFT records: for each problem, each sampled injection, each connection,
    ``prompt`` -> ``prefix ⊕ phrase ⊕ correction``; trajectories whose final answer does not
    verify are dropped (``on_drop`` hears why)."""
    taxonomy = error_taxonomy(task)
    records = []
    for index, problem in enumerate(problems):
        alternatives = alternative_solutions(task, problem)
        for injection in sample_injections(task, problem, rng, per_type=config.per_type, types=config.types):
            for connection in config.connections:
                phrase = config.phrases[int(rng.integers(len(config.phrases)))]
                if connection == FIX_AND_CONTINUE:
                    prefix, fix = fix_and_continue(injection, phrase)
                else:
                    prefix, fix = fresh_and_restart(injection, phrase, alternatives[int(rng.integers(len(alternatives)))])
                mistake, correction = "\n".join(prefix) + "\n", "\n".join(fix)
                if not st.solves(task, problem, mistake + correction):
                    if on_drop is not None:
                        on_drop(f"problem {index}: {injection.error} with {connection} does not end right")
                    continue
                records.append(SFTRecord(
                    config.prompt_template.format(prompt=problem.prompt),
                    ((mistake, config.train_on_mistake), (correction, True)),
                    {"problem": index, "error": injection.error, "code": taxonomy[injection.error].code,
                     "site": list(injection.site), "first_wrong": injection.first_wrong, "connection": connection},
                ))
    return records


def reference_records(task: Task, problems: Sequence[Problem], prompt_template: str = PLAIN_PROMPT) -> list[SFTRecord]:
    """Plain SFT on the correct step-by-step solutions (the baseline LEMMA is compared with)."""
    return [SFTRecord.plain(prompt_template.format(prompt=p.prompt), st.reference_solution(task, p).text, problem=i)
            for i, p in enumerate(problems)]


def record_counts(records: Sequence[SFTRecord]) -> dict[str, dict[str, int]]:
    """Trajectories per error type and per connection (the data statistics LEMMA reports)."""
    by_error = Counter(r.meta.get("error", "?") for r in records)
    by_connection = Counter(r.meta.get("connection", "?") for r in records)
    return {"error": dict(sorted(by_error.items())), "connection": dict(sorted(by_connection.items())), "total": {"records": len(records)}}
