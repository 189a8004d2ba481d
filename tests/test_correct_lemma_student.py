"""LEMMA on a student's own samples: rule-based labels, error distribution, connections."""
import numpy as np

from offside_jax.correct import lemma
from offside_jax.correct import lemma_student as ls
from offside_jax.correct import steps as st
from offside_jax.correct.tasks import (
    CarryArithmetic,
    CountdownMini,
    Problem,
    make_problems,
)

CARRY, COUNTDOWN = CarryArithmetic(), CountdownMini()
P_CARRY = Problem("478+256=", "734", {"a": 478, "b": 256, "op": "+", "carry_columns": (0, 1)})
P_COUNT = Problem("2 3 4 5 to 15:", "((2*3)+4)+5", {"numbers": (2, 3, 4, 5), "target": 15})


def test_carry_labels_by_hand():
    assert ls.label_mistake(CARRY, P_CARRY, st.carry_reference(P_CARRY).text) is None
    dropped = "8+6+0=14 write 4 carry 1\n7+5+0=12 write 2 carry 1\n4+2+1=7 write 7 carry 0\nanswer 724"
    assert ls.label_mistake(CARRY, P_CARRY, dropped) == ls.MistakeLabel(1, "dropped_carry", "CA")
    skipped = "8+6+0=14 write 4 carry 1\n4+2+1=7 write 7 carry 0\nanswer 74"
    assert ls.label_mistake(CARRY, P_CARRY, skipped) == ls.MistakeLabel(1, "skipped_column", "MS")
    wrong_op = "8-6-0=2 write 2 borrow 0\n7-5-0=2 write 2 borrow 0\n4-2-0=2 write 2 borrow 0\nanswer 222"
    assert ls.label_mistake(CARRY, P_CARRY, wrong_op) == ls.MistakeLabel(0, "wrong_operation", "QM")
    assert ls.label_mistake(CARRY, P_CARRY, "8+6+0=14 write 4 carry 1\nbanana") == ls.MistakeLabel(1, ls.UNCLASSIFIED, "NO")


def test_carry_injections_are_labelled_at_their_first_wrong_step():
    for p in make_problems(CARRY, 30, seed=7):
        for inj in lemma.candidate_injections(CARRY, p):
            label = ls.label_mistake(CARRY, p, inj.solution.text)
            assert label.first_wrong == inj.first_wrong and label.error != ls.UNCLASSIFIED


def test_countdown_labels_by_hand():
    goal, first = "goal 15 from 2 3 4 5", "2*3=6"

    def label(*lines):
        return ls.label_mistake(COUNTDOWN, P_COUNT, "\n".join(lines))

    assert label("goal 14 from 2 3 4 5", "2*3=6", "6+4=10", "10+4=14", "answer ((2*3)+4)+4") == ls.MistakeLabel(0, "wrong_target", "QM")
    assert label("goal 15 from 2 3 4", "2*3=6").error == ls.UNCLASSIFIED
    assert label(goal, "2*3=5", "5*4=20", "20-5=15", "answer ((2*3)*4)-5") == ls.MistakeLabel(1, "wrong_operator", "FC")
    assert label(goal, first, "6+5=12", "12+4=16", "answer ((2*3)+5)+4") == ls.MistakeLabel(2, "arithmetic_slip", "CA")
    assert label(goal, first, "6+5=40").error == ls.UNCLASSIFIED


def test_countdown_fix_from_the_students_own_prefix():
    text = "goal 15 from 2 3 4 5\n2*3=6\n6+5=12\n12+4=16\nanswer ((2*3)+5)+4"
    # 6+5 is 11; holding 4 and 11, the finish is 4+11=15
    assert ls.fix_lines(COUNTDOWN, P_COUNT, text.splitlines(), 2) == ("6+5=11", "4+11=15", "answer 4+((2*3)+5)")
    # holding 2 and 12 after 4+5=9, 9+3=12: no way to 15, so no Fix & Continue
    assert ls.fix_lines(COUNTDOWN, P_COUNT, "goal 15 from 2 3 4 5\n4+5=9\n9+3=13".splitlines(), 2) is None
    assert ls.fix_lines(COUNTDOWN, P_COUNT, ["goal 14 from 2 3 4 5"], 0) == st.countdown_reference(P_COUNT).steps


def test_student_records():
    wrong = "goal 15 from 2 3 4 5\n2*3=6\n6+5=12\n12+4=16\nanswer ((2*3)+5)+4"
    right = st.countdown_reference(P_COUNT).text
    records = ls.student_records(COUNTDOWN, [P_COUNT], [[wrong, right]], np.random.default_rng(0))
    assert sorted(r.meta["connection"] for r in records) == sorted(lemma.CONNECTIONS)
    fix = next(r for r in records if r.meta["connection"] == lemma.FIX_AND_CONTINUE)
    (mistake, _), (correction, _) = fix.pieces
    assert mistake == "goal 15 from 2 3 4 5\n2*3=6\n6+5=12\n"
    lines = correction.splitlines()
    assert lines[0] in lemma.TRANSITION_PHRASES and lines[1:] == ["6+5=11", "4+11=15", "answer 4+((2*3)+5)"]
    assert all(COUNTDOWN.verify(st.final_answer(r.target), P_COUNT) == 1.0 for r in records)
    assert fix.meta["error"] == "arithmetic_slip" and fix.meta["source"] == "student"


def test_error_distribution_and_sampling_from_it():
    labels = [ls.MistakeLabel(1, "dropped_carry", "CA")] * 2 + [ls.MistakeLabel(0, "skipped_column", "MS"),
                                                                 ls.MistakeLabel(3, ls.UNCLASSIFIED, "NO"), None]
    assert ls.error_distribution(labels) == {"dropped_carry": 2 / 3, "skipped_column": 1 / 3}
    assert ls.error_distribution([None]) == {}
    picked = ls.sample_by_distribution(CARRY, P_CARRY, {"dropped_carry": 1.0}, 2, np.random.default_rng(0))
    assert sorted(i.site for i in picked) == [(0,), (1,)] and all(i.error == "dropped_carry" for i in picked)
    assert ls.sample_by_distribution(CARRY, P_CARRY, {"wrong_target": 1.0}, 2, np.random.default_rng(0)) == []
    mixed = ls.sample_by_distribution(CARRY, P_CARRY, {"digit_slip": 0.5, "skipped_column": 0.5}, 4, np.random.default_rng(0))
    assert len(mixed) == 4 and {i.error for i in mixed} <= {"digit_slip", "skipped_column"}
