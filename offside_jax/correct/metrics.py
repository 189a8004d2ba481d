"""Self-correction metrics, as pure functions of outcome tables (no models).

Two-turn (SCoRe, Kumar et al. 2024), over ``N`` problems with correctness at turn 1 and 2:

- ``Acc@t1``, ``Acc@t2``, ``Delta = Acc@t2 - Acc@t1``;
- ``Delta_i->c``: fraction of *all* problems wrong at t1 and right at t2; ``Delta_c->i``: right
  at t1 and wrong at t2; so ``Delta = Delta_i->c - Delta_c->i``.

Confidence vs critique (Yang et al., ACL 2025):

- ``CL = P(right at t2 | right at t1) = 1 - Delta_c->i / Acc1`` (confidence level),
- ``CS = P(right at t2 | wrong at t1) = Delta_i->c / (1 - Acc1)`` (critique score),
- ``Acc2 = Acc1 * CL + (1 - Acc1) * CS``,
- ``RSS = (Acc2 - Acc1^2) / (2 Acc1 (1 - Acc1))`` (relative self-correction score).

Conditional quantities are NaN where their condition never occurs (``CL`` with
``Acc1 = 0``, ``CS`` with ``Acc1 = 1``, ``RSS`` with either).

Multi-turn with feedback (UFO, 2025): ``Succ@k`` (solved within the first ``k`` sequential
attempts of an episode) vs ``Pass@k`` (at least one of ``k`` independent samples right,
the unbiased estimator of Chen et al. 2021), mean attempts to success, and the
unique-answer ratio ``E / T`` (distinct answers over valid answers per episode).

Every function returns plain Python floats (JSON-ready) under stable names.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _bools(x: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one flag per problem, got shape {a.shape}")
    return a.astype(bool)


def self_correction_metrics(correct_t1: Sequence[bool] | np.ndarray, correct_t2: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """``acc_t1, acc_t2, delta, delta_i_to_c, delta_c_to_i, cl, cs, rss`` from per-problem
    correctness at turn 1 and turn 2."""
    c1, c2 = _bools(correct_t1, "correct_t1"), _bools(correct_t2, "correct_t2")
    if c1.shape != c2.shape:
        raise ValueError(f"correct_t1 {c1.shape} and correct_t2 {c2.shape} must cover the same problems")
    if c1.size == 0:
        raise ValueError("no problems to score")
    n = c1.size
    acc1, acc2 = c1.mean(), c2.mean()
    i_to_c = float(np.sum(~c1 & c2)) / n
    c_to_i = float(np.sum(c1 & ~c2)) / n
    return {
        "acc_t1": float(acc1),
        "acc_t2": float(acc2),
        "delta": float(acc2 - acc1),
        "delta_i_to_c": i_to_c,
        "delta_c_to_i": c_to_i,
        **confidence_critique(float(acc1), float(acc2), i_to_c, c_to_i),
    }


def confidence_critique(acc1: float, acc2: float, delta_i_to_c: float, delta_c_to_i: float) -> dict[str, float]:
    """``cl``, ``cs`` and ``rss`` from the two-turn rates (see the module docstring)."""
    cl = 1.0 - delta_c_to_i / acc1 if acc1 > 0 else math.nan
    cs = delta_i_to_c / (1.0 - acc1) if acc1 < 1 else math.nan
    rss = (acc2 - acc1 * acc1) / (2.0 * acc1 * (1.0 - acc1)) if 0 < acc1 < 1 else math.nan
    return {"cl": float(cl), "cs": float(cs), "rss": float(rss)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased ``Pass@k = 1 - C(n - c, k) / C(n, k)`` from ``n`` independent samples of which
    ``c`` are right (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - math.comb(n - c, k) / math.comb(n, k))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """Mean ``Pass@k`` over problems; ``correct`` is ``[problems, samples]`` of independent samples."""
    table = np.asarray(correct, bool)
    if table.ndim != 2:
        raise ValueError(f"correct must be [problems, samples], got shape {table.shape}")
    return float(np.mean([pass_at_k(table.shape[1], int(row.sum()), k) for row in table]))


def first_success(episode: Sequence[bool]) -> int | None:
    """1-based attempt of the first correct answer of an episode, ``None`` if never."""
    for t, ok in enumerate(episode, start=1):
        if ok:
            return t
    return None


def succ_at_k(episodes: Sequence[Sequence[bool]], k: int) -> float:
    """Fraction of episodes (per-attempt correctness, sequential with feedback) solved within
    their first ``k`` attempts."""
    if not episodes:
        raise ValueError("no episodes to score")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean([(t := first_success(ep)) is not None and t <= k for ep in episodes]))


def mean_turns_to_success(episodes: Sequence[Sequence[bool]]) -> float:
    """Mean 1-based attempt of the first success over solved episodes (NaN if none solved)."""
    turns = [t for ep in episodes if (t := first_success(ep)) is not None]
    return float(np.mean(turns)) if turns else math.nan


def unique_answer_ratio(answers: Sequence[Sequence[str | None]]) -> float:
    """Mean over episodes of ``E / T`` (distinct over valid answers; ``None`` is malformed and
    not counted); episodes without a valid answer are skipped (NaN if none has one)."""
    ratios = []
    for episode in answers:
        valid = [a for a in episode if a is not None]
        if valid:
            ratios.append(len(set(valid)) / len(valid))
    return float(np.mean(ratios)) if ratios else math.nan


def multi_turn_metrics(episodes: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]], ks: Sequence[int] = (1, 2, 3, 4, 5)) -> dict[str, float]:
    """``succ@k`` for each ``k``, ``mean_turns_to_success`` and ``unique_answer_ratio``."""
    out = {f"succ@{k}": succ_at_k(episodes, k) for k in ks}
    out["mean_turns_to_success"] = mean_turns_to_success(episodes)
    out["unique_answer_ratio"] = unique_answer_ratio(answers)
    return out
