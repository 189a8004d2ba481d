"""SCL: self-correction learning for vision-language models (preference pairs from flips, then DPO).

Following the official data construction (``ivy3h/SCL``, ``SCL/data_construction.py``):

1. Turn 1: the question, its options, ``" Explain your reasoning step-by-step."`` and the
   answer instruction ``" Your final answer should be put between two ##, like ## A ## (if
   your final answer is A), at the end of your response."``;
2. turn 2, in the same conversation: one of four review prompts (id 0-3), the same
   step-by-step sentence and the same answer instruction;
3. answers extracted with the ``##X##`` patterns (:func:`extract_answer` keeps the official
   order and fallback, quirks included); a failed extraction counts as wrong;
4. only flips are kept: right -> wrong gives chosen = response 1, rejected = response 2;
   wrong -> right gives chosen = response 2, rejected = response 1; both right or both wrong
   are dropped. The DPO prompt is the *bare question* (``tmp_data['prompt']`` is set before the
   options and instructions are appended) and the image.

Options are written MMBench style (``" A. x B. y"``). For rumor correction on OFFSIDE the
options are the verified fact and the rumor, in random order (:func:`rumor_choice_item`).
Per-turn metrics (Acc@t1, Acc@t2, Delta, Delta_i->c, Delta_c->i) come from
:func:`offside_jax.correct.metrics.self_correction_metrics`.
"""
from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from offside_jax.correct.metrics import self_correction_metrics
from offside_jax.correct.records import PreferenceRecord
from offside_jax.data.offside import Example
from offside_jax.correct.tasks import Problem, Task

STEP_BY_STEP = " Explain your reasoning step-by-step."
ANSWER_INSTRUCTION = " Your final answer should be put between two ##, like ## A ## (if your final answer is A), at the end of your response."
REVIEW_PROMPTS = (
    "Review your previous answer and find problems with your answer. Based on the problems you found, improve your answer.",
    ("Review your previous answer and ensure that all relevant aspects of the image have been considered. Are there any "
    "elements or details that you missed? Based on your review, improve your answer."),
    ("Review your contextual understanding of the image. Have you correctly interpreted the overall context and purpose of "
    "the scene? Based on your review, improve your answer."),
    ("Review your answer and ensure that your understanding of the image is comprehensive and detailed. Are there any "
    "aspects of the scene that you have omitted or misinterpreted? Based on your review, improve your answer."),
)
RIGHT_TO_WRONG, WRONG_TO_RIGHT = "right_to_wrong", "wrong_to_right"


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question; ``answer`` is the right option's letter."""

    question: str
    options: tuple[str, ...]
    answer: str
    image: str | None = None  # a reference to the image (path or id), None for text-only
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not 2 <= len(self.options) <= 26:
            raise ValueError(f"{self.question!r}: needs 2-26 options, got {len(self.options)}")
        if self.answer not in string.ascii_uppercase[: len(self.options)]:
            raise ValueError(f"{self.question!r}: answer {self.answer!r} is not one of the option letters")


def rumor_choice_item(record: Mapping[str, str], rng: np.random.Generator, image: str | None = None) -> ChoiceItem:
    """A two-option item from a ``{question, rumor, fact}`` record: the fact (right) and the
    rumor, in an order drawn from ``rng`` so the right letter is not always the same."""
    fact_first = bool(rng.random() < 0.5)
    options = (record["fact"], record["rumor"]) if fact_first else (record["rumor"], record["fact"])
    return ChoiceItem(record["question"], options, "A" if fact_first else "B", image, {"rumor": record["rumor"], "fact": record["fact"]})


def rumor_items_from_examples(examples: Sequence[Example], rng: np.random.Generator) -> list[ChoiceItem]:
    """Choice items from OFFSIDE records that state a rumor with a known correction: a
    classification record keeps its options with the corrected letter as the answer; a
    question-answer record becomes fact-or-rumor (:func:`rumor_choice_item`). The image is the
    record's first image file (relative to the release root); ``meta`` keeps ``visual_rumor``
    (the image itself shows the rumor) and where the record came from. Others are skipped."""
    items = []
    for ex in examples:
        if ex.is_rumor is False:
            continue
        image = ex.image_files[0] if ex.modality == "image" and ex.image_files else None
        meta = {"visual_rumor": ex.visual_rumor, "source": ex.source, "index": ex.index}
        if ex.kind == "mcq" and ex.corrected_letter and ex.options:
            letters = [letter for letter, _ in ex.options]
            if ex.corrected_letter in letters:
                answer = string.ascii_uppercase[letters.index(ex.corrected_letter)]
                items.append(ChoiceItem(ex.question, tuple(text for _, text in ex.options), answer, image, meta))
        elif ex.kind == "qa" and ex.corrected_answer and ex.answer:
            item = rumor_choice_item({"question": ex.question, "rumor": ex.answer, "fact": ex.corrected_answer}, rng, image)
            items.append(dataclasses.replace(item, meta={**item.meta, **meta}))
    return items


def options_text(options: Sequence[str]) -> str:
    return " " + " ".join(f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options))


def turn1_prompt(item: ChoiceItem) -> str:
    return item.question + options_text(item.options) + STEP_BY_STEP + ANSWER_INSTRUCTION


def review_prompt(prompt_id: int = 0) -> str:
    if not 0 <= prompt_id < len(REVIEW_PROMPTS):
        raise ValueError(f"review prompt id must be 0-{len(REVIEW_PROMPTS) - 1}, got {prompt_id}")
    return REVIEW_PROMPTS[prompt_id] + STEP_BY_STEP + ANSWER_INSTRUCTION


def conversation(item: ChoiceItem, response1: str | None = None, prompt_id: int = 0) -> list[dict[str, str]]:
    """Chat messages of turn 1 (``response1`` None) or of turn 2 (turn 1, its response, the
    review prompt)."""
    messages = [{"role": "user", "content": turn1_prompt(item)}]
    if response1 is not None:
        messages += [{"role": "assistant", "content": response1}, {"role": "user", "content": review_prompt(prompt_id)}]
    return messages


_PATTERNS = (r"##\s*([ABCD])\s*##", r"##(.*?)##", r"##\s*([0-3])\s*##")
_FALLBACK = r"([ABCD])\."


def extract_answer(text: str) -> str | None:
    """The official extraction: each pattern in turn; after a pattern misses, a bare ``X.``
    (A-D) is tried and wins if present. So ``## B ##`` -> ``B``; ``A. first ## C ##`` -> ``C``
    (pattern 1 matches first); ``The answer is C. ## x ##`` -> ``C`` (the fallback precedes
    pattern 2); nothing -> ``None``."""
    for pattern in _PATTERNS:
        match = re.search(pattern, text)
        if match:
            return match.group(1).strip()
        match = re.search(_FALLBACK, text)
        if match:
            return match.group(1).strip()
    return None


def is_right(text: str, item: ChoiceItem) -> bool:
    return extract_answer(text) == item.answer


def flip(response1: str, response2: str, right1: bool, right2: bool) -> tuple[str, str, str] | None:
    """``(kind, chosen, rejected)`` when correctness flips between the turns, else ``None``:
    right -> wrong keeps the first response, wrong -> right the second."""
    if right1 and not right2:
        return RIGHT_TO_WRONG, response1, response2
    if right2 and not right1:
        return WRONG_TO_RIGHT, response2, response1
    return None


def select_pair(response1: str, response2: str, item: ChoiceItem) -> tuple[str, str, str] | None:
    """:func:`flip` judged by the ``##X##`` answer against the item's letter."""
    return flip(response1, response2, is_right(response1, item), is_right(response2, item))


def task_flip_pairs(task: Task, problems: Sequence[Problem], responses1: Sequence[str], responses2: Sequence[str]) -> list[PreferenceRecord]:
    """The same selection on a verifiable task (the toolkit's adaptation: an exact verifier
    instead of a letter); right means the task's full reward, and the prompt is the problem's."""
    if not len(problems) == len(responses1) == len(responses2):
        raise ValueError(f"{len(problems)} problems, {len(responses1)} first and {len(responses2)} second responses")
    full = getattr(task, "correct_reward", 1.0)
    records = []
    for index, (p, r1, r2) in enumerate(zip(problems, responses1, responses2)):
        pair = flip(r1, r2, task.verify(r1, p) >= full, task.verify(r2, p) >= full)
        if pair is not None:
            records.append(PreferenceRecord(p.prompt, pair[1], pair[2], None, {"problem": index, "flip": pair[0]}))
    return records


def scl_pairs(items: Sequence[ChoiceItem], responses1: Sequence[str], responses2: Sequence[str],
              prompt: str = "question") -> list[PreferenceRecord]:
    """DPO records of the flips. ``prompt="question"`` is the official bare question;
    ``"turn1"`` uses the whole turn-1 text (options and instructions), which is what the model
    answered."""
    if not len(items) == len(responses1) == len(responses2):
        raise ValueError(f"{len(items)} items, {len(responses1)} first and {len(responses2)} second responses")
    if prompt not in ("question", "turn1"):
        raise ValueError(f"prompt must be 'question' or 'turn1', got {prompt!r}")
    records = []
    for index, (item, r1, r2) in enumerate(zip(items, responses1, responses2)):
        pair = select_pair(r1, r2, item)
        if pair is not None:
            kind, chosen, rejected = pair
            text = item.question if prompt == "question" else turn1_prompt(item)
            records.append(PreferenceRecord(text, chosen, rejected, item.image, {"item": index, "flip": kind}))
    return records


def turn_metrics(items: Sequence[ChoiceItem], responses1: Sequence[str], responses2: Sequence[str]) -> dict[str, float]:
    """Acc@t1, Acc@t2, Delta, Delta_i->c, Delta_c->i (and CL, CS, RSS) of two-turn responses."""
    return self_correction_metrics([is_right(r, it) for r, it in zip(responses1, items)],
                                   [is_right(r, it) for r, it in zip(responses2, items)])


Generate = Callable[[list[list[dict[str, str]]], list[str | None]], list[str]]


@dataclasses.dataclass
class TwoTurnResult:
    responses1: list[str]
    responses2: list[str]
    pairs: list[PreferenceRecord]
    metrics: dict[str, float]


def two_turn(items: Sequence[ChoiceItem], generate_fn: Generate, prompt_id: int = 0, prompt: str = "question") -> TwoTurnResult:
    """Both turns through ``generate_fn(conversations, images) -> texts`` (a VL sampler at
    temperature 0.7 in the official code), then the flip pairs and the per-turn metrics."""
    images = [item.image for item in items]
    responses1 = list(generate_fn([conversation(item) for item in items], images))
    responses2 = list(generate_fn([conversation(item, r1, prompt_id) for item, r1 in zip(items, responses1)], images))
    return TwoTurnResult(responses1, responses2, scl_pairs(items, responses1, responses2, prompt),
                         turn_metrics(items, responses1, responses2))
