"""LEMMA data builder: step formats, error injection, the two connections, SFT records."""
from fractions import Fraction

import numpy as np
import pytest

from offside_jax.correct import lemma
from offside_jax.correct import steps as st
from offside_jax.correct.chars import CharTokenizer
from offside_jax.correct.records import sft_batch
from offside_jax.correct.tasks import (
    CarryArithmetic,
    CountdownMini,
    Problem,
    dropped_carry,
    make_problems,
)

CARRY, COUNTDOWN = CarryArithmetic(), CountdownMini()


def carry_problem(a, b, op, carry_columns):
    return Problem(f"{a}{op}{b}=", str(a + b if op == "+" else a - b), {"a": a, "b": b, "op": op, "carry_columns": carry_columns})


def countdown_problem(numbers, target, answer):
    return Problem(f"{' '.join(map(str, numbers))} to {target}:", answer, {"numbers": numbers, "target": target})


# -- step formats, by hand -------------------------------------------------------------------------


def test_column_format_by_hand():
    assert st.column_solution(478, 256, "+")[0].steps == (
        "8+6+0=14 write 4 carry 1", "7+5+1=13 write 3 carry 1", "4+2+1=7 write 7 carry 0", "answer 734")
    assert st.column_solution(52, 17, "-")[0].steps == ("2-7-0=-5 write 5 borrow 1", "5-1-1=3 write 3 borrow 0", "answer 35")
    assert st.column_solution(78, 56, "+")[0].steps[-1] == "answer 134"  # the final carry is the leading digit


def test_countdown_format_by_hand():
    p = countdown_problem((2, 3, 4), 10, "(2*3)+4")
    assert st.reference_solution(COUNTDOWN, p).steps == ("goal 10 from 2 3 4", "2*3=6", "6+4=10", "answer (2*3)+4")
    assert st.parse_tree("5-(3-(6/3))") == (5, "-", (3, "-", (6, "/", 3)))
    assert st.tree_value(st.parse_tree("5-(3-(6/3))")) == Fraction(4)


@pytest.mark.parametrize("task", [CARRY, COUNTDOWN], ids=lambda t: t.name)
def test_reference_solutions_are_right_and_pass_the_checker(task):
    for p in make_problems(task, 150, seed=1):
        solution = st.reference_solution(task, p)
        assert st.first_wrong_step(task, p, solution.steps) is None
        assert task.verify(solution.answer, p) == 1.0


def test_countdown_checker_finds_each_kind_of_wrong_step():
    p = countdown_problem((2, 3, 4), 10, "(2*3)+4")

    def check(*steps):
        return st.first_wrong_step(COUNTDOWN, p, steps)

    assert check("goal 11 from 2 3 4", "2*3=6", "6+4=10", "answer (2*3)+4") == 0  # misread goal
    assert check("goal 10 from 2 3 4", "2*3=7", "7+3=10", "answer (2*3)+3") == 1  # slip
    assert check("goal 10 from 2 3 4", "2*3=6", "6+6=12", "answer (2*3)+6") == 2  # 6 is used up
    assert check("goal 10 from 2 3 4", "2*3=6", "6+4=10") == 3  # no answer line
    assert check("goal 10 from 2 3 4", "2*3=6", "6+4=10", "answer (2*3)*4") == 3  # answer not the steps'


# -- injections, by hand ---------------------------------------------------------------------------


def _by_site(injections, error):
    return {inj.site: inj for inj in injections if inj.error == error}


def test_dropped_carry_by_hand():
    p = carry_problem(478, 256, "+", (0, 1))
    dropped = _by_site(lemma.candidate_injections(CARRY, p), "dropped_carry")
    inj = dropped[(0,)]
    assert inj.solution.steps == ("8+6+0=14 write 4 carry 1", "7+5+0=12 write 2 carry 1", "4+2+1=7 write 7 carry 0", "answer 724")
    assert inj.first_wrong == 1
    assert inj.prefix == ("8+6+0=14 write 4 carry 1", "7+5+0=12 write 2 carry 1")
    # the same mistake as the task's own buggy attempts
    for col, inj in dropped.items():
        assert inj.solution.answer == str(dropped_carry(478, 256, "+", col[0]))


def test_dropped_final_carry_is_wrong_at_the_answer_line():
    inj = _by_site(lemma.candidate_injections(CARRY, carry_problem(78, 56, "+", (0, 1))), "dropped_carry")[(1,)]
    assert inj.solution.steps[-1] == "answer 34" and inj.first_wrong == 2


def test_skipped_column_by_hand_and_right_answers_dropped():
    inj = _by_site(lemma.candidate_injections(CARRY, carry_problem(478, 256, "+", (0, 1))), "skipped_column")[(1,)]
    assert inj.solution.steps == ("8+6+0=14 write 4 carry 1", "4+2+1=7 write 7 carry 0", "answer 74")
    assert inj.first_wrong == 1
    # 1005-998: skipping the thousands column only drops a leading zero: still 7, so dropped
    skipped = _by_site(lemma.candidate_injections(CARRY, carry_problem(1005, 998, "-", (0, 1, 2))), "skipped_column")
    assert (3,) not in skipped and (0,) in skipped
    assert skipped[(0,)].solution.answer == "1"


def test_countdown_slip_continues_consistently_by_hand():
    p = countdown_problem((2, 3, 4, 5), 15, "((2*3)+4)+5")
    slips = _by_site(lemma.candidate_injections(COUNTDOWN, p), "arithmetic_slip")
    assert slips[(0, 5)].solution.steps == ("goal 15 from 2 3 4 5", "2*3=5", "5*4=20", "20-5=15", "answer ((2*3)*4)-5")
    assert slips[(0, 7)].solution.steps == ("goal 15 from 2 3 4 5", "2*3=7", "7-4=3", "5*3=15", "answer 5*((2*3)-4)")
    assert slips[(0, 5)].first_wrong == 1
    wrong_target = _by_site(lemma.candidate_injections(COUNTDOWN, p), "wrong_target")
    assert all(inj.first_wrong == 0 and inj.solution.steps[0] != "goal 15 from 2 3 4 5" for inj in wrong_target.values())


def _independent_countdown_step_ok(step, available):
    """Hand-rolled check of one combination ``x op y = z`` against the numbers held."""
    lhs, z = step.split("=")
    op = next(c for c in "+-*/" if c in lhs)
    x, y = (int(v) for v in lhs.split(op))
    ok = x in available and (available.remove(x) or True) and y in available
    value = {"+": x + y, "-": x - y, "*": x * y, "/": Fraction(x, y)}[op]
    return ok and value == int(z)


@pytest.mark.parametrize("task", [CARRY, COUNTDOWN], ids=lambda t: t.name)
def test_every_injection_is_wrong_cut_at_its_first_wrong_step_and_fixable(task):
    count = 0
    for p in make_problems(task, 60, seed=2):
        reference = st.reference_solution(task, p)
        for inj in lemma.candidate_injections(task, p):
            count += 1
            k = inj.first_wrong
            assert task.verify(inj.solution.answer, p) < 1.0  # really wrong
            assert inj.prefix[-1] == inj.solution.steps[k] and len(inj.prefix) == k + 1
            assert inj.prefix[:k] == reference.steps[:k]  # nothing wrong before the cut
            if isinstance(task, CarryArithmetic):
                assert inj.solution.steps[k] != reference.steps[k]
            elif k == 0:
                assert inj.solution.steps[0] != f"goal {p.meta['target']} from {' '.join(map(str, p.meta['numbers']))}"
            else:
                available = list(p.meta["numbers"])
                for step in reference.steps[1:k]:  # replay the correct steps, then judge step k
                    assert _independent_countdown_step_ok(step, available)
                    _, y, z = step.replace("=", " ").translate(str.maketrans("+-*/", "    ")).split()
                    available.append(int(z))
                    available.remove(int(y))
                assert not _independent_countdown_step_ok(inj.solution.steps[k], list(available))
            prefix, fix = lemma.fix_and_continue(inj, lemma.TRANSITION_PHRASES[0])
            text = "\n".join(prefix + fix)
            assert task.verify(st.final_answer(text), p) == 1.0  # the fix reaches the right answer
            assert fix[1] == reference.steps[k]  # the wrong step, fixed
    assert count > 50


def test_sample_injections_per_type():
    p = carry_problem(478, 256, "+", (0, 1))
    picked = lemma.sample_injections(CARRY, p, np.random.default_rng(0), per_type=2)
    counts = {e: sum(i.error == e for i in picked) for e in lemma.CARRY_ERRORS}
    assert counts == {"dropped_carry": 2, "digit_slip": 2, "skipped_column": 2, "wrong_operation": 1}
    with pytest.raises(ValueError, match="unknown error types"):
        lemma.sample_injections(CARRY, p, np.random.default_rng(0), types=("typo",))


# -- connections and records -----------------------------------------------------------------------


def test_connections_by_hand():
    p = carry_problem(478, 256, "+", (0, 1))
    inj = _by_site(lemma.candidate_injections(CARRY, p), "dropped_carry")[(0,)]
    phrase = lemma.TRANSITION_PHRASES[3]
    prefix, fix = lemma.fix_and_continue(inj, phrase)
    assert "\n".join(prefix + fix) == (
        "8+6+0=14 write 4 carry 1\n7+5+0=12 write 2 carry 1\n"
        "Wait, this doesn't seem right. Let's pause and consider this:\n"
        "7+5+1=13 write 3 carry 1\n4+2+1=7 write 7 carry 0\nanswer 734")
    prefix, fix = lemma.fresh_and_restart(inj, phrase, inj.reference)
    assert fix == (phrase, lemma.RESTART_LINE) + inj.reference.steps


def test_fresh_restart_takes_another_countdown_solution():
    p = countdown_problem((2, 3, 4, 5), 15, "((2*3)+4)+5")
    alternatives = lemma.alternative_solutions(COUNTDOWN, p)
    assert alternatives and all(a.steps != st.reference_solution(COUNTDOWN, p).steps for a in alternatives)
    assert all(COUNTDOWN.verify(a.answer, p) == 1.0 for a in alternatives)


@pytest.mark.parametrize("train_on_mistake", [True, False])
def test_lemma_records_and_their_batch(train_on_mistake):
    problems = make_problems(CARRY, 12, seed=3)
    config = lemma.LemmaConfig(train_on_mistake=train_on_mistake)
    records = lemma.lemma_records(CARRY, problems, np.random.default_rng(0), config)
    assert {r.meta["connection"] for r in records} == set(lemma.CONNECTIONS)
    for r in records:
        p = problems[r.meta["problem"]]
        assert r.prompt == p.prompt + "\n"
        (mistake, trained), (correction, _) = r.pieces
        assert trained == train_on_mistake
        lines = mistake.splitlines()
        assert len(lines) == r.meta["first_wrong"] + 1
        assert st.first_wrong_step(CARRY, p, lines) == len(lines) - 1  # cut right after the wrong step
        assert correction.splitlines()[0] in lemma.TRANSITION_PHRASES
        assert CARRY.verify(st.final_answer(r.target), p) == 1.0
    tok = CharTokenizer.for_texts(r.prompt + r.target for r in records)
    batch = sft_batch(records[:4], tok)
    for row, r in enumerate(records[:4]):
        n_prompt, n_target = len(r.prompt), len(r.target)
        ids = batch["input_ids"][row]
        assert tok.decode(ids[: n_prompt + n_target]) == r.prompt + r.target
        assert ids[n_prompt + n_target] == tok.eos_token_id
        expected = [0] * n_prompt + r.target_mask() + [1]
        expected += [0] * (batch["loss_mask"].shape[1] - len(expected))
        np.testing.assert_array_equal(batch["loss_mask"][row], expected)
        assert batch["attention_mask"][row].sum() == n_prompt + n_target + 1


def test_record_counts():
    records = [lemma.SFTRecord.plain("p", "t", error=e, connection=c)
               for e, c in [("dropped_carry", lemma.FIX_AND_CONTINUE), ("dropped_carry", lemma.FRESH_AND_RESTART),
                            ("skipped_column", lemma.FIX_AND_CONTINUE)]]
    assert lemma.record_counts(records) == {"error": {"dropped_carry": 2, "skipped_column": 1},
                                            "connection": {lemma.FIX_AND_CONTINUE: 2, lemma.FRESH_AND_RESTART: 1},
                                            "total": {"records": 3}}
