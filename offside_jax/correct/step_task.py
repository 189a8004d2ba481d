"""Verifiable tasks answered in their step format (:mod:`offside_jax.correct.steps`).

:class:`StepTask` gives a step-format task the interface of :mod:`offside_jax.correct.tasks`
(``sample``, ``extract``, ``verify``, ``alphabet``, ``warmup_attempts``), so the two-turn
rollouts, the warm-up and the evaluations score step-by-step completions unchanged, and every
correction strategy can be compared on the same step-format tasks as LEMMA and mistake tuning.
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np

from offside_jax.correct import steps as st
from offside_jax.correct.lemma import candidate_injections
from offside_jax.correct.tasks import (
    CarryArithmetic,
    CountdownMini,
    Problem,
    lazy_second_attempt,
)

# Every character the step formats, LEMMA's transition phrases and prompts and the
# mistake-tuning tags use (for character tokenizers).
STEP_ALPHABET = "".join(sorted(set(string.ascii_letters + string.digits + " \n.,:;'?!-+*/()=[]#")))


@dataclasses.dataclass(frozen=True)
class StepTask:
    """A task answered in its step format, with the :class:`~offside_jax.correct.tasks.Task`
    interface, so the two-turn rollouts, warm-up and evaluation score step-by-step
    completions: the answer is that of the last ``answer`` line. The warm-up's buggy first
    attempt is a whole wrong solution from the LEMMA injector (with the task's ``p_bug``)."""

    task: CarryArithmetic | CountdownMini

    @property
    def name(self) -> str:
        return f"{self.task.name}_steps"

    @property
    def alphabet(self) -> str:
        return "".join(sorted(set(STEP_ALPHABET + self.task.alphabet)))

    @property
    def correct_reward(self) -> float:
        return getattr(self.task, "correct_reward", 1.0)

    def sample(self, rng: np.random.Generator) -> Problem:
        return self.task.sample(rng)

    def extract(self, text: str) -> str | None:
        answer = st.final_answer(text)
        return None if answer is None else self.task.extract(answer)

    def verify(self, text: str, problem: Problem) -> float:
        """The task's reward for the stated answer; a text without an answer line gets 0."""
        answer = st.final_answer(text)
        return 0.0 if answer is None else self.task.verify(answer, problem)

    def warmup_attempts(self, problem: Problem, rng: np.random.Generator) -> tuple[str, str]:
        right = st.reference_solution(self.task, problem).text
        wrong = candidate_injections(self.task, problem) if rng.random() < self.task.p_bug else []
        first = wrong[int(rng.integers(len(wrong)))].solution.text if wrong else right
        return first, lazy_second_attempt(first, right, self.task.p_fix, rng)
