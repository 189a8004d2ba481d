"""Task generators and verifiers: right answers pass; near misses and malformed output fail."""
from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

from offside_jax.correct import tasks as t


# -- carry arithmetic ---------------------------------------------------------------------------------

ARITH = t.CarryArithmetic()
ADD = t.Problem("123+459=", "582", {"a": 123, "b": 459, "op": "+", "carry_columns": (0,)})


@pytest.mark.parametrize("text", ["582", " 582\n", "582\n"])
def test_arithmetic_accepts_the_answer(text):
    assert ARITH.verify(text, ADD) == 1.0


@pytest.mark.parametrize(
    "text",
    ["572", "583", "5820", "58", "482"]  # near misses: dropped carry (572), off by one, extra/missing digit
    + ["", "5 82", "+582", "0582", "582a", "five hundred", "-582", "582.0"],  # malformed or wrong sign
)
def test_arithmetic_rejects_near_misses_and_malformed(text):
    assert ARITH.verify(text, ADD) == 0.0


def test_carry_and_borrow_columns_and_the_buggy_results():
    # 58 + 67: 8+7 = 15 carries out of column 0; 5+6+1 = 12 out of column 1 -> 125.
    assert t.carry_columns(58, 67) == [0, 1]
    # Forgetting the units carry: tens 5+6 = 11 -> 115 = 125 - 10; the tens carry: 25 = 125 - 100.
    assert t.dropped_carry(58, 67, "+", 0) == 115
    assert t.dropped_carry(58, 67, "+", 1) == 25
    # 503 - 78: 3-8 borrows (col 0), 0-7-1 borrows (col 1), 5-0-1 = 4 -> 425.
    assert t.borrow_columns(503, 78) == [0, 1]
    # Forgetting the units borrow: tens 10-7 = 3 (borrowing), hundreds 4 -> 435 = 425 + 10.
    assert t.dropped_carry(503, 78, "-", 0) == 435
    assert t.carry_columns(12, 34) == [] and t.borrow_columns(34, 12) == []


def test_arithmetic_generator_is_seeded_and_valid():
    a, b = t.make_problems(ARITH, 50, seed=3), t.make_problems(ARITH, 50, seed=3)
    assert a == b and a != t.make_problems(ARITH, 50, seed=4)
    for p in a:
        x, y, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert p.prompt == f"{x}{op}{y}=" and 10 <= x < 10_000 and 10 <= y < 10_000
        assert int(p.answer) == (x + y if op == "+" else x - y) >= 0
        assert ARITH.verify(p.answer, p) == 1.0


def test_arithmetic_warmup_first_attempt_drops_a_carry():
    rng = np.random.default_rng(0)
    buggy = t.CarryArithmetic(p_bug=1.0)
    problems = [p for p in t.make_problems(buggy, 40, seed=0) if p.meta["carry_columns"]]
    assert problems
    for p in problems:
        first, second = buggy.warmup_attempts(p, rng)
        assert second == p.answer and buggy.verify(first, p) == 0.0
        # Off by one unit of 10^(column + 1) in the direction of the forgotten carry/borrow.
        diff = int(p.answer) - int(first) if p.meta["op"] == "+" else int(first) - int(p.answer)
        assert diff in {10 ** (c + 1) for c in p.meta["carry_columns"]}
    clean = t.CarryArithmetic(p_bug=0.0)
    assert all(clean.warmup_attempts(p, rng) == (p.answer, p.answer) for p in problems)


# -- Countdown-mini -------------------------------------------------------------------------------------

CD = t.CountdownMini()
P22 = t.Problem("3 5 7 to 22:", "3*5+7", {"numbers": (3, 5, 7), "target": 22})


def test_expression_parser_is_exact():
    # 2*(3+4) - 6/4 = 14 - 3/2 = 25/2; numbers in order of appearance.
    assert t.parse_expression("2*(3+4)-6/4") == (Fraction(25, 2), [2, 3, 4, 6, 4])
    assert t.parse_expression("7/(5-5)") == (None, [7, 5, 5])  # division by zero: no value
    for bad in ["", "3+", "(3+4", "3+4)", "-3+4", "3**4", "3.5", "__import__('os')", "3 4", "03+4"]:
        with pytest.raises(t.ExpressionError):
            t.parse_expression(bad)


@pytest.mark.parametrize("text", ["3*5+7", "5*3+7", " 7 + 3 * 5 ", "(5*3)+7", "7+(3*5)"])
def test_countdown_accepts_solutions(text):
    assert CD.verify(text, P22) == 1.0


@pytest.mark.parametrize(
    "text",
    ["(3+5)*7", "3*5+7+1", "3*5+8", "3*5*7", "3*7+5", "7/(5-5)+3", "3*5+7-0"],  # wrong value or numbers
)
def test_countdown_well_formed_but_wrong_gets_the_format_reward(text):
    assert CD.verify(text, P22) == pytest.approx(0.1)


@pytest.mark.parametrize("text", ["", "3*5+7=22", "22", "3*5+", "-3*5+7", "3*5+7.0", "3x5+7", "print(22)"])
def test_countdown_rejects_malformed(text):
    # "22" is a well-formed expression using the number 22: format reward, not malformed.
    expected = 0.1 if text == "22" else 0.0
    assert CD.verify(text, P22) == pytest.approx(expected)


def test_countdown_generator_problems_are_solvable():
    for p in t.make_problems(CD, 40, seed=1):
        nums = p.meta["numbers"]
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 9 for n in nums)
        assert 1 <= p.meta["target"] <= 24
        assert p.prompt == f"{' '.join(map(str, nums))} to {p.meta['target']}:"
        assert CD.verify(p.answer, p) == 1.0
        assert CD.extract(p.answer) == re.sub(r"\s", "", p.answer)
    rng = np.random.default_rng(0)
    buggy = t.CountdownMini(p_bug=1.0)
    firsts = [buggy.warmup_attempts(p, rng) for p in t.make_problems(buggy, 20, seed=2)]
    assert sum(CD.verify(f, p) == pytest.approx(0.1) for (f, _), p in zip(firsts, t.make_problems(buggy, 20, seed=2))) >= 15


# -- rumor self-correction --------------------------------------------------------------------------------

RECORDS = (
    {"question": "Which club does Lionel Messi play for?", "rumor": "Real Madrid", "fact": "Inter Miami"},
    {"question": "Where does Koke play?", "rumor": "Madrid", "fact": "Atlético Madrid"},
)
RUMOR = t.RumorCorrection(RECORDS)


@pytest.mark.parametrize("text", ["Inter Miami", "He plays for inter miami.", "INTER MIAMI!", "Inter Miami CF"])
def test_rumor_accepts_the_fact(text):
    assert RUMOR.verify(text, RUMOR.problem(0)) == 1.0


@pytest.mark.parametrize(
    "text",
    ["Real Madrid", "He joined Real Madrid.", "Inter Miami or Real Madrid", "Inter", "Internal Miami", "Miami", "", "   "],
)
def test_rumor_rejects_the_rumor_near_misses_and_empty(text):
    assert RUMOR.verify(text, RUMOR.problem(0)) == 0.0


def test_rumor_inside_the_fact_still_passes():
    # The rumor "Madrid" is part of the fact "Atlético Madrid": the fact's own words do not count.
    p = RUMOR.problem(1)
    assert RUMOR.verify("Atletico Madrid", p) == 1.0  # accents normalised away
    assert RUMOR.verify("Madrid", p) == 0.0
    assert RUMOR.verify("Atlético Madrid, not Madrid", p) == 0.0


def test_rumor_records_and_warmup():
    assert t.rumor_record_from_offside({"question": "Q?", "answer": "Real Madrid", "corrected_answer": "Inter Miami", "is_rumor": True}) == {
        "question": "Q?", "rumor": "Real Madrid", "fact": "Inter Miami"}
    assert t.rumor_record_from_offside({"question": "Q?", "answer": "A", "is_rumor": False, "corrected_answer": "B"}) is None
    assert t.rumor_record_from_offside({"question": "Q?", "answer": "A"}) is None
    with pytest.raises(ValueError, match=r"record 0 lacks .*'fact'"):
        t.RumorCorrection(({"question": "Q", "rumor": "A"},))
    with pytest.raises(ValueError, match="same answer"):
        t.RumorCorrection(({"question": "Q", "rumor": "Inter", "fact": "inter"},))
    p = RUMOR.problem(0)
    assert (p.prompt, p.answer, p.meta["rumor"]) == (RECORDS[0]["question"], "Inter Miami", "Real Madrid")
    assert t.RumorCorrection(RECORDS, p_bug=1.0).warmup_attempts(p, np.random.default_rng(0)) == ("Real Madrid", "Inter Miami")
    assert RUMOR.extract("  ") is None and RUMOR.extract("Inter Miami!") == "inter miami"


# -- shared by every task ------------------------------------------------------------------------------


def test_lazy_second_attempts_fix_with_probability_p_fix():
    problems = [p for p in t.make_problems(t.CarryArithmetic(), 400, seed=1) if p.meta["carry_columns"]]
    # p_fix 0: a wrong first attempt is always repeated; a right one is kept.
    never = t.CarryArithmetic(p_bug=1.0, p_fix=0.0)
    rng = np.random.default_rng(0)
    for p in problems[:20]:
        first, second = never.warmup_attempts(p, rng)
        assert first != p.answer and second == first
    assert t.CarryArithmetic(p_bug=0.0, p_fix=0.0).warmup_attempts(problems[0], rng) == (problems[0].answer,) * 2
    # p_fix 0.3: among wrong first attempts, the fix rate is a binomial proportion near 0.3
    # (n = len(problems) > 300: 4 standard deviations are < 0.11).
    lazy = t.CarryArithmetic(p_bug=1.0, p_fix=0.3)
    pairs = [lazy.warmup_attempts(p, rng) for p in problems]
    fixed = np.mean([second == p.answer for (_, second), p in zip(pairs, problems)])
    assert all(second in (first, p.answer) for (first, second), p in zip(pairs, problems))
    assert len(problems) > 300 and abs(fixed - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(problems))
    # The other tasks share the rule: a rumor repeated, a wrong expression repeated.
    assert t.RumorCorrection(RECORDS, p_bug=1.0, p_fix=0.0).warmup_attempts(RUMOR.problem(0), rng) == ("Real Madrid", "Real Madrid")
    first, second = t.CountdownMini(p_bug=1.0, p_fix=0.0).warmup_attempts(P22, rng)
    assert CD.verify(first, P22) == CD.format_reward and second == first
    with pytest.raises(ValueError, match="p_fix"):
        t.CarryArithmetic(p_fix=1.5)
    with pytest.raises(ValueError, match="p_bug"):
        t.RumorCorrection(RECORDS, p_bug=-0.1)


def test_alphabets_cover_every_text_a_task_writes():
    rng = np.random.default_rng(0)
    for task in (t.CarryArithmetic(ops="+-", p_bug=0.5), t.CountdownMini(p_bug=0.5), t.RumorCorrection(RECORDS)):
        for _ in range(50):
            p = task.sample(rng)
            texts = [p.prompt, p.answer, *task.warmup_attempts(p, rng)]
            assert set("".join(texts)) <= set(task.alphabet), (task.name, texts)
    assert t.CarryArithmetic(ops="+").alphabet == "0123456789=+"
