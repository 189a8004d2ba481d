"""Self-correction metrics on constructed outcome tables, checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from offside_jax.correct import metrics as m


def table(*counts):
    """Outcome rows (correct at t1, correct at t2) from counts of (1,1), (1,0), (0,1), (0,0)."""
    rows = []
    for (c1, c2), n in zip([(1, 1), (1, 0), (0, 1), (0, 0)], counts):
        rows += [(c1, c2)] * n
    arr = np.array(rows, bool)
    return arr[:, 0], arr[:, 1]


def test_two_turn_metrics_and_identities():
    # 10 problems: 4 right->right, 1 right->wrong, 2 wrong->right, 3 wrong->wrong.
    got = m.self_correction_metrics(*table(4, 1, 2, 3))
    # Acc1 = 5/10, Acc2 = (4 + 2)/10, Delta = 0.1; i->c = 2/10, c->i = 1/10.
    assert got["acc_t1"] == pytest.approx(0.5)
    assert got["acc_t2"] == pytest.approx(0.6)
    assert got["delta"] == pytest.approx(0.1)
    assert got["delta_i_to_c"] == pytest.approx(0.2)
    assert got["delta_c_to_i"] == pytest.approx(0.1)
    # Identity: Delta = Delta_i->c - Delta_c->i = 0.2 - 0.1.
    assert got["delta"] == pytest.approx(got["delta_i_to_c"] - got["delta_c_to_i"])
    # CL = P(right | right before) = 4/5 = 1 - 0.1/0.5; CS = P(right | wrong before) = 2/5 = 0.2/0.5.
    assert got["cl"] == pytest.approx(0.8)
    assert got["cs"] == pytest.approx(0.4)
    # Acc2 = Acc1 CL + (1 - Acc1) CS = 0.4 + 0.2.
    assert got["acc_t1"] * got["cl"] + (1 - got["acc_t1"]) * got["cs"] == pytest.approx(got["acc_t2"])
    # RSS = (0.6 - 0.25) / (2 * 0.5 * 0.5) = 0.7.
    assert got["rss"] == pytest.approx(0.7)


def test_asymmetric_table():
    # 8 problems: 5 rr, 1 rw, 1 wr, 1 ww: Acc1 = Acc2 = 6/8, i->c = c->i = 1/8.
    got = m.self_correction_metrics(*table(5, 1, 1, 1))
    assert (got["acc_t1"], got["acc_t2"], got["delta"]) == pytest.approx((0.75, 0.75, 0.0))
    # CL = 5/6 = 1 - 0.125/0.75; CS = 1/2 = 0.125/0.25.
    assert got["cl"] == pytest.approx(5 / 6)
    assert got["cs"] == pytest.approx(0.5)
    # RSS = (0.75 - 0.5625) / (2 * 0.75 * 0.25) = 0.1875 / 0.375.
    assert got["rss"] == pytest.approx(0.5)


def test_score_paper_row():
    # SCoRe on MATH500: 60.0 / 64.4 / +4.4 / 5.8 / 1.4 from 1000 problems:
    # c->i 14, so 600 - 14 = 586 rr; i->c 58, so 400 - 58 = 342 ww.
    got = m.self_correction_metrics(*table(586, 14, 58, 342))
    assert [got[k] for k in ("acc_t1", "acc_t2", "delta", "delta_i_to_c", "delta_c_to_i")] == pytest.approx([0.6, 0.644, 0.044, 0.058, 0.014])


def test_undefined_conditionals_are_nan():
    got = m.self_correction_metrics([True, True], [True, False])
    assert got["cl"] == pytest.approx(0.5)  # 1 - 0.5 / 1
    assert math.isnan(got["cs"]) and math.isnan(got["rss"])  # nothing was wrong at t1
    got = m.self_correction_metrics([False], [True])
    assert math.isnan(got["cl"]) and got["cs"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same problems"):
        m.self_correction_metrics([True], [True, False])
    with pytest.raises(ValueError, match="no problems"):
        m.self_correction_metrics([], [])


def test_pass_at_k():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert m.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert m.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert m.pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples
    assert m.pass_at_k(5, 0, 3) == 0.0
    # Mean over problems: rows with c = 2 and c = 0 of n = 5 at k = 2 -> (0.7 + 0) / 2.
    assert m.mean_pass_at_k(np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]), 2) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="k <= n"):
        m.pass_at_k(3, 1, 4)


def test_succ_at_k_turns_and_unique_answers():
    episodes = [[False, True], [True], [False] * 5, [False, False, True]]
    # First successes at attempts 2, 1, never, 3.
    assert [m.succ_at_k(episodes, k) for k in (1, 2, 3, 5)] == pytest.approx([0.25, 0.5, 0.75, 0.75])
    assert m.mean_turns_to_success(episodes) == pytest.approx(2.0)  # (2 + 1 + 3) / 3
    answers = [["1", "2", "2"], ["3"], [None, None], ["4", None, "4"]]
    # E/T: 2/3, 1/1, (no valid answer: skipped), 1/2 -> mean 0.72222.
    assert m.unique_answer_ratio(answers) == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    got = m.multi_turn_metrics(episodes, answers, ks=(1, 3))
    assert set(got) == {"succ@1", "succ@3", "mean_turns_to_success", "unique_answer_ratio"}
    assert math.isnan(m.mean_turns_to_success([[False]]))
