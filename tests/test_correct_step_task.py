"""Step-format tasks behind the task interface."""
import numpy as np
import pytest

from offside_jax.correct import lemma, mistakes
from offside_jax.correct import steps as st
from offside_jax.correct.chars import CharTokenizer
from offside_jax.correct.step_task import StepTask
from offside_jax.correct.tasks import (
    CarryArithmetic,
    CountdownMini,
    Problem,
    make_problems,
)


@pytest.mark.parametrize("base", [CarryArithmetic(), CountdownMini()], ids=lambda t: t.name)
def test_alphabet_covers_every_record(base):
    task = StepTask(base)
    tok = CharTokenizer(task.alphabet)
    problems = make_problems(base, 20, seed=0)
    rng = np.random.default_rng(0)
    records = lemma.lemma_records(base, problems, rng) + mistakes.mistake_tuning_records(base, problems, rng)
    records += lemma.lemma_records(base, problems[:3], rng, lemma.LemmaConfig(prompt_template=lemma.LEMMA_PROMPT))
    for r in records:
        tok.encode(r.prompt + r.target)  # raises on a character outside the alphabet


def test_verify_reads_the_last_answer_line():
    task = StepTask(CarryArithmetic())
    p = Problem("478+256=", "734", {"a": 478, "b": 256, "op": "+", "carry_columns": (0, 1)})
    assert task.verify(st.reference_solution(task.task, p).text, p) == 1.0
    assert task.verify("8+6+0=14 write 4 carry 1\nanswer 724", p) == 0.0
    assert task.verify("answer 724\nWait a second. Is everything correct? Let me double-check.\nanswer 734", p) == 1.0
    assert task.verify("8+6+0=14 write 4 carry 1", p) == 0.0 and task.extract("no answer") is None
    assert task.extract("answer 0734") is None and task.extract("answer 734") == "734"
    countdown = StepTask(CountdownMini())
    q = Problem("2 3 4 to 10:", "(2*3)+4", {"numbers": (2, 3, 4), "target": 10})
    assert countdown.verify("answer (2*3)*4", q) == pytest.approx(0.1)  # well-formed but wrong


def test_warmup_attempts_are_step_solutions_with_the_task_rates():
    rng = np.random.default_rng(0)
    buggy = StepTask(CarryArithmetic(p_bug=1.0, p_fix=1.0))
    clean = StepTask(CarryArithmetic(p_bug=0.0))
    for p in make_problems(buggy.task, 20, seed=5):
        first, second = buggy.warmup_attempts(p, rng)
        assert buggy.verify(second, p) == 1.0
        assert buggy.verify(first, p) == (0.0 if lemma.candidate_injections(buggy.task, p) else 1.0)
        assert clean.warmup_attempts(p, rng) == (st.reference_solution(clean.task, p).text,) * 2
