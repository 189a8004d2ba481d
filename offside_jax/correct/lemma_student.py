"""LEMMA on a student's own wrong solutions: the teacher's labels by rule, and their connections.

In the paper a teacher (GPT-4o) labels each wrong student sample with its first wrong step
and its error type (``prompts/error_step_few_shot.md``, ``prompts/error_type.md``), the
labelled samples become Fix & Continue and Fresh & Restart trajectories, and the per-question
error distribution says which types to inject (§3.3). On the verifiable tasks the step
checker finds the first wrong step and the wrong step itself tells the type:

- carry arithmetic: the wrong step equals the one some injected error writes at that
  position (the column format is deterministic, so the prefixes agree);
- Countdown-mini: a wrong goal line is ``wrong_target``; a combination whose result is
  another operator's is ``wrong_operator``, one off by at most two ``arithmetic_slip``;

anything else is ``unclassified`` (code NO, nonsensical output). Fix & Continue resumes from
the student's own prefix: on carry arithmetic with the reference from the wrong step on; on
Countdown with the wrong combination recomputed and a search for the rest from the numbers the
student holds (none found: only Fresh & Restart is made).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from offside_jax.correct import lemma
from offside_jax.correct import steps as st
from offside_jax.correct.records import SFTRecord
from offside_jax.correct.tasks import CarryArithmetic, CountdownMini, Problem, Task

UNCLASSIFIED = "unclassified"


@dataclasses.dataclass(frozen=True)
class MistakeLabel:
    first_wrong: int
    error: str  # a key of the task's taxonomy, or UNCLASSIFIED
    code: str  # the paper's category; "NO" for unclassified


def _countdown_error(problem: Problem, steps: Sequence[str], k: int) -> str:
    numbers = problem.meta["numbers"]
    if k == 0:
        other_goal = steps[0].startswith("goal ") and steps[0].endswith(" from " + " ".join(map(str, numbers)))
        return "wrong_target" if other_goal else UNCLASSIFIED
    parsed = st.parse_combination(steps[k]) if k < len(steps) else None
    if parsed is None:
        return UNCLASSIFIED
    x, op, y, z = parsed
    true = st.apply(op, x, y)
    if any(st.apply(other, x, y) == z for other in "+-*/" if other != op):
        return "wrong_operator"
    if true is not None and 0 < abs(true - z) <= 2:
        return "arithmetic_slip"
    return UNCLASSIFIED


def label_mistake(task: Task, problem: Problem, text: str) -> MistakeLabel | None:
    """The first wrong step and error type of a step-format solution; ``None`` when it is right."""
    steps = tuple(text.splitlines())
    k = st.first_wrong_step(task, problem, steps)
    if k is None:
        return None
    if isinstance(task, CarryArithmetic):
        same = [c.error for c in lemma.candidate_injections(task, problem)
                if c.first_wrong == k and k < len(steps) and c.solution.steps[k] == steps[k]]
        error = same[0] if same else UNCLASSIFIED
    elif isinstance(task, CountdownMini):
        error = _countdown_error(problem, steps, k)
    else:
        raise TypeError(f"no mistake labels for task {getattr(task, 'name', task)!r}")
    code = "NO" if error == UNCLASSIFIED else lemma.error_taxonomy(task)[error].code
    return MistakeLabel(k, error, code)


def error_distribution(labels: Sequence[MistakeLabel | None]) -> dict[str, float]:
    """Share of each classified error type among the labelled mistakes (the paper samples the
    types to inject from this, per question)."""
    counts = Counter(label.error for label in labels if label is not None and label.error != UNCLASSIFIED)
    total = sum(counts.values())
    return {error: n / total for error, n in sorted(counts.items())} if total else {}


def sample_by_distribution(task: Task, problem: Problem, distribution: Mapping[str, float], n: int,
                           rng: np.random.Generator) -> list[lemma.Injection]:
    """``n`` injections whose types are drawn from ``distribution`` (renormalised over the types
    this problem admits); a type drawn twice gives two different sites where it has them."""
    candidates = lemma.candidate_injections(task, problem)
    types = [t for t in distribution if distribution[t] > 0 and any(c.error == t for c in candidates)]
    if not types:
        return []
    weights = np.array([distribution[t] for t in types], np.float64)
    drawn = Counter(rng.choice(len(types), size=n, p=weights / weights.sum()).tolist())
    out = []
    for i, count in sorted(drawn.items()):
        of_type = [c for c in candidates if c.error == types[i]]
        out += [of_type[j] for j in sorted(rng.permutation(len(of_type))[:count].tolist())]
    return out


def _countdown_fix(problem: Problem, steps: Sequence[str], k: int) -> tuple[str, ...] | None:
    """The lines that fix step ``k`` of a student's Countdown solution and finish it."""
    numbers, target = problem.meta["numbers"], problem.meta["target"]
    reference = st.countdown_reference(problem)
    if k == 0:
        return reference.steps
    items: list[tuple[st.Tree, Fraction]] = [(n, Fraction(n)) for n in numbers]

    def take(value: Fraction) -> st.Tree | None:
        for i, (tree, v) in enumerate(items):
            if v == value:
                del items[i]
                return tree
        return None

    for step in steps[1:k + 1]:
        parsed = st.parse_combination(step)
        if parsed is None:
            return None
        x, op, y, _ = parsed
        left, right = take(x), take(y)
        if left is None or right is None:
            return None
        z = st.apply(op, x, y)
        if z is None:
            return None
        items.append(((left, op, right), z))
    found = next(st.search(items, target), None)
    if found is None:
        return None
    final, continuation = found
    x, op, y, _ = st.parse_combination(steps[k])
    fixed = st.combination(x, op, y, st.apply(op, x, y))
    return (fixed,) + tuple(st.combination(*c) for c in continuation) + (st.ANSWER_PREFIX + st.tree_text(final),)


def fix_lines(task: Task, problem: Problem, steps: Sequence[str], k: int) -> tuple[str, ...] | None:
    """The corrected step ``k`` and a correct finish from the student's prefix, or ``None``."""
    if isinstance(task, CarryArithmetic):
        reference = st.carry_reference(problem)
        return reference.steps[k:] if tuple(steps[:k]) == reference.steps[:k] else None
    if isinstance(task, CountdownMini):
        return _countdown_fix(problem, steps, k)
    raise TypeError(f"no step format for task {getattr(task, 'name', task)!r}")


def student_records(task: Task, problems: Sequence[Problem], samples: Sequence[Sequence[str]], rng: np.random.Generator,
                    config: lemma.LemmaConfig | None = None) -> list[SFTRecord]:
    """Trajectories from the wrong ones of a student's samples (``samples[i]`` answers
    ``problems[i]``): cut after the first wrong step, then each connection of ``config``;
    right samples and trajectories that do not end right are skipped."""
    if len(samples) != len(problems):
        raise ValueError(f"{len(samples)} sample lists for {len(problems)} problems")
    config = config or lemma.LemmaConfig()
    records = []
    for index, (problem, texts) in enumerate(zip(problems, samples)):
        alternatives = lemma.alternative_solutions(task, problem)
        for text in texts:
            label = label_mistake(task, problem, text)
            if label is None or label.first_wrong >= len(text.splitlines()):
                continue  # right, or wrong only by stopping short: nothing to cut after
            prefix = tuple(text.splitlines())[: label.first_wrong + 1]
            for connection in config.connections:
                phrase = config.phrases[int(rng.integers(len(config.phrases)))]
                if connection == lemma.FIX_AND_CONTINUE:
                    fix = fix_lines(task, problem, text.splitlines(), label.first_wrong)
                    if fix is None:
                        continue
                    correction = (phrase,) + fix
                else:
                    correction = (phrase, lemma.RESTART_LINE) + alternatives[int(rng.integers(len(alternatives)))].steps
                mistake = "\n".join(prefix) + "\n"
                if not st.solves(task, problem, mistake + "\n".join(correction)):
                    continue
                records.append(SFTRecord(
                    config.prompt_template.format(prompt=problem.prompt),
                    ((mistake, config.train_on_mistake), ("\n".join(correction), True)),
                    {"problem": index, "error": label.error, "code": label.code, "first_wrong": label.first_wrong,
                     "connection": connection, "source": "student"},
                ))
    return records
