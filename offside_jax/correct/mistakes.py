"""Mistake tuning and self-rethinking ("Can LLMs Learn from Previous Mistakes?", CoTErrorSet, ACL 2024).

**Mistake tuning** (§5): fine-tune on sequences ``Q ⊕ S ⊕ R`` where the prefix ``S`` marks
the rationale ``R`` as ``[CORRECT RATIONALE]`` or ``[INCORRECT RATIONALE]``; at inference the
model is conditioned on ``[CORRECT RATIONALE]`` (inferred: the paper's visible text does not
say). On carry arithmetic and Countdown-mini the correct rationale is the task's
step-by-step reference solution and the incorrect one a whole wrong solution from the LEMMA
injector (:mod:`offside_jax.correct.lemma`; on carry arithmetic it includes the dropped carry
of the task's own buggy attempts), continued to its wrong answer.

Choices where the paper is silent (unsourced): the mix is ``incorrect_per_correct`` wrong
rationales per correct one, 1.0 by default (every question once under each tag, as each
CoTErrorSet record pairs a question's reference with one incorrect rationale); ``Q ⊕ S`` is
the prompt and the loss covers ``R`` only (the tag is a condition the user supplies, not
something to predict).

**Self-rethinking** (§4, App. A): answer with zero-shot CoT; show randomly chosen mistakes
from a bank (type, cause, a correct and an incorrect example) and ask whether the answer
repeats them; if it does, regenerate with a demonstration and the suspect answer; at most
``k`` rounds (k = 1 in the main setting, 2-3 calls per question). The prompt texts were in an
image that was not recovered: the templates below are ours. The wrapper runs over any
``generate_fn(prompts) -> texts`` (one call per round over the questions still open), so it
needs no model to test, and it counts calls per question for the cost columns.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from offside_jax.correct import lemma
from offside_jax.correct import steps as st
from offside_jax.correct.records import SFTRecord
from offside_jax.correct.tasks import Problem, Task

CORRECT_TAG = "[CORRECT RATIONALE]"
INCORRECT_TAG = "[INCORRECT RATIONALE]"
TAGGED_PROMPT = "{prompt}\n{tag}\n"


@dataclasses.dataclass(frozen=True)
class MistakeTuningConfig:
    incorrect_per_correct: float = 1.0  # unsourced (see the module docstring)
    types: tuple[str, ...] | None = None  # error types of the incorrect rationales (None: all)
    prompt_template: str = TAGGED_PROMPT

    def __post_init__(self):
        if self.incorrect_per_correct < 0:
            raise ValueError(f"incorrect_per_correct must be >= 0, got {self.incorrect_per_correct}")


def tagged_prompt(problem: Problem, tag: str, template: str = TAGGED_PROMPT) -> str:
    return template.format(prompt=problem.prompt, tag=tag)


def inference_prompt(problem: Problem, template: str = TAGGED_PROMPT) -> str:
    """The prompt a mistake-tuned model answers: conditioned on the correct tag."""
    return tagged_prompt(problem, CORRECT_TAG, template)


def _incorrect_counts(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``round(ratio * n)`` incorrect rationales spread over ``n`` questions: ``floor`` each,
    the remainder to questions drawn at random (so the mix is exact, not only on average)."""
    total = round(ratio * n)
    counts = np.full(n, total // n if n else 0)
    counts[rng.permutation(n)[: total - counts.sum()]] += 1
    return counts


def mistake_tuning_records(task: Task, problems: Sequence[Problem], rng: np.random.Generator,
                           config: MistakeTuningConfig = MistakeTuningConfig()) -> list[SFTRecord]:
    """One ``[CORRECT RATIONALE]`` record per problem, and ``incorrect_per_correct`` times as
    many ``[INCORRECT RATIONALE]`` records (distinct wrong solutions of a problem where it has
    enough; a problem without any injectable error gets none)."""
    records = []
    for index, (problem, n_wrong) in enumerate(zip(problems, _incorrect_counts(len(problems), config.incorrect_per_correct, rng))):
        records.append(SFTRecord.plain(tagged_prompt(problem, CORRECT_TAG, config.prompt_template),
                                       st.reference_solution(task, problem).text, problem=index, tag="correct"))
        if not n_wrong:
            continue
        candidates = lemma.candidate_injections(task, problem)
        if config.types is not None:
            candidates = [c for c in candidates if c.error in config.types]
        for i in rng.permutation(len(candidates))[:n_wrong].tolist():
            wrong = candidates[i]
            records.append(SFTRecord.plain(tagged_prompt(problem, INCORRECT_TAG, config.prompt_template), wrong.solution.text,
                                           problem=index, tag="incorrect", error=wrong.error))
    return records


# -- self-rethinking --------------------------------------------------------------------------------

COT_TRIGGER = "Let's think step by step."  # zero-shot CoT, stage 1
ANSWER_TEMPLATE = "Question: {question}\n" + COT_TRIGGER + "\n"
MISTAKE_TEMPLATE = "Mistake type: {error_type}\nCause: {cause}\nCorrect example:\n{correct}\nIncorrect example:\n{incorrect}\n"
CHECK_TEMPLATE = (
    "Here are mistakes made before on similar questions.\n{mistakes}\n"
    "Question: {question}\nAnswer:\n{answer}\n"
    "Does this answer make any of the mistakes above? Reply yes or no.\n"
)
REVISE_TEMPLATE = (
    "{demonstration}\n"
    "Question: {question}\nA previous answer, which may repeat the mistakes above:\n{answer}\n"
    "Avoid those mistakes and answer again. " + COT_TRIGGER + "\n"
)
COMPONENTS = ("error_type", "cause", "correct", "incorrect")


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One mistake-bank entry (CoTErrorSet: error type, cause, correct and incorrect example)."""

    error_type: str
    cause: str
    correct: str
    incorrect: str

    def render(self, components: Sequence[str] = COMPONENTS) -> str:
        """The entry with only ``components`` shown (Tab. 7 ablates them); the rest blank."""
        shown = {c: getattr(self, c) if c in components else "-" for c in COMPONENTS}
        return MISTAKE_TEMPLATE.format(**shown)


def mistake_bank(task: Task, problems: Sequence[Problem], rng: np.random.Generator, per_problem: int = 1) -> list[Mistake]:
    """Entries from injected errors: the type, its description and where it struck as the
    cause, the question with its reference and with the wrong solution as examples."""
    taxonomy = lemma.error_taxonomy(task)
    bank = []
    for problem in problems:
        candidates = lemma.candidate_injections(task, problem)
        for i in rng.permutation(len(candidates))[:per_problem].tolist():
            inj = candidates[i]
            kind = taxonomy[inj.error]
            bank.append(Mistake(
                f"{inj.error} ({kind.code})",
                f"{kind.description}; it first goes wrong at step {inj.first_wrong + 1}: {inj.solution.steps[inj.first_wrong]}",
                f"{problem.prompt}\n{inj.reference.text}",
                f"{problem.prompt}\n{inj.solution.text}",
            ))
    return bank


_VERDICT = re.compile(r"\s*(yes|no)\b", re.IGNORECASE)


def says_yes(text: str) -> bool:
    """A check's verdict: the reply starts with "yes". Anything else (no, unparsable) keeps the
    answer: regenerating on noise would only add calls."""
    m = _VERDICT.match(text)
    return bool(m) and m.group(1).lower() == "yes"


@dataclasses.dataclass
class RethinkResult:
    answers: list[str]  # the final answer text per question
    calls: list[int]  # generate_fn prompts spent per question
    revisions: list[int]  # regenerations per question
    transcript: list[list[tuple[str, str]]]  # per question, (prompt, generated text) in order

    def generated_texts(self) -> list[str]:
        """Every text generated, for counting generated tokens."""
        return [text for turns in self.transcript for _, text in turns]


def self_rethink(
    questions: Sequence[str],
    generate_fn: Callable[[list[str]], list[str]],
    bank: Sequence[Mistake],
    rng: np.random.Generator,
    *,
    k: int = 1,
    shown: int = 2,
    components: Sequence[str] = COMPONENTS,
    answer_template: str = ANSWER_TEMPLATE,
    check_template: str = CHECK_TEMPLATE,
    revise_template: str = REVISE_TEMPLATE,
) -> RethinkResult:
    """Answer, then up to ``k`` rounds of check-and-regenerate on the questions whose check
    said yes; a question leaves the loop when its check says no. Each round shows ``shown``
    mistakes drawn from ``bank``; the regeneration's demonstration is their correct examples.
    The templates (``{question}``; ``{mistakes}``, ``{answer}``; ``{demonstration}``,
    ``{question}``, ``{answer}``) can be replaced, e.g. by a chat model's own wording."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k and not bank:
        raise ValueError("self-rethinking needs a non-empty mistake bank")
    n = len(questions)
    transcript: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    calls, revisions = [0] * n, [0] * n

    def run(rows: list[int], prompts: list[str]) -> list[str]:
        texts = generate_fn(prompts) if prompts else []
        if len(texts) != len(prompts):
            raise ValueError(f"generate_fn returned {len(texts)} texts for {len(prompts)} prompts")
        for row, prompt, text in zip(rows, prompts, texts):
            transcript[row].append((prompt, text))
            calls[row] += 1
        return list(texts)

    rows = list(range(n))
    answers = run(rows, [answer_template.format(question=q) for q in questions])
    for _ in range(k):
        if not rows:
            break
        picks = {r: [bank[i] for i in rng.choice(len(bank), size=min(shown, len(bank)), replace=False)] for r in rows}
        checks = run(rows, [check_template.format(mistakes="\n".join(m.render(components) for m in picks[r]),
                                                  question=questions[r], answer=answers[r]) for r in rows])
        rows = [r for r, verdict in zip(rows, checks) if says_yes(verdict)]
        demos = {r: "\n".join(f"Question: {m.correct}" for m in picks[r]) for r in rows}
        for r, text in zip(rows, run(rows, [revise_template.format(demonstration=demos[r], question=questions[r], answer=answers[r])
                                            for r in rows])):
            answers[r] = text
            revisions[r] += 1
    return RethinkResult(answers, calls, revisions, transcript)
