"""Evaluation items: the OFFSIDE test sets of a release as prompts with their references.

An :class:`EvalItem` is one question to put to a model: the user text (without image tags),
the images it shows, the reference answer and, for multiple choice, the options. Items are
built from the release's records (:func:`build_tasks`) and rewritten by prompt attacks
(``offside_jax.eval.attacks``), then encoded for a model by ``offside_jax.eval.engine``.

OFFSIDE's four test sets map onto release splits (``TEST_SETS``):

- ``forget`` (efficacy): ``forget`` / ``classification_forget``;
- ``test`` (generalization, augmented images): ``test`` / ``classification_test``;
- ``retain`` and ``world`` (utility): ``retain`` / ``classification_retain`` and the
  synthetic release's ``world_facts`` / ``classification_world_facts``;
- ``relearn`` (robustness, with the attacks): ``relearn`` / ``classification_relearn``.

Image prompts come from the ``complete`` setting. Text-only prompts use the ``pure_text``
twins (which name the player instead of showing him); multiple choice in text form asks a
twin's question with the options of the classification record about the same image and
attribute (only when records carry the ids to pair them). World facts are text already.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offside_jax.data.offside import Example, Release
from offside_jax.data.pipeline import mcq_prompt

# test set -> (QA split, multiple-choice split) in the complete setting
TEST_SETS: dict[str, tuple[str, str]] = {
    "forget": ("forget", "classification_forget"),
    "test": ("test", "classification_test"),
    "retain": ("retain", "classification_retain"),
    "world": ("world_facts", "classification_world_facts"),
    "relearn": ("relearn", "classification_relearn"),
}
# What each test set measures, for reports.
PURPOSE: dict[str, str] = {
    "forget": "efficacy", "test": "generalization", "retain": "utility", "world": "utility", "relearn": "robustness",
    "general": "utility",
}
# Not from the release: real-world questions a pretrained model should keep answering
# (``eval/templates/general_knowledge.yaml``); text generation only.
GENERAL = "general"
GENERAL_FILE = "general_knowledge.yaml"
# Test sets whose text-only twins live in pure_text_data (same split names).
TEXT_TWIN_SETS = ("forget", "retain")
FORMATS = ("gen", "mcq")
MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One prompt and what a good answer is.

    ``prompt`` is the user turn without image tags (for multiple choice: question, lettered
    options and instruction); ``images`` are absolute image paths shown before it. ``truth``
    and ``rumor`` are short key phrases (e.g. clubs) for rumor questions whose corrected
    answer is known, used to classify an answer as stating the truth or the rumor.
    """

    uid: str  # "<source file>:<record index>"
    test_set: str
    modality: str  # "image" | "text"
    fmt: str  # "gen" | "mcq"
    question: str  # the bare question
    prompt: str  # the user turn as asked (question, or question + options + instruction)
    reference: str  # the reference answer (gen) or the correct option's text (mcq)
    images: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    correct: str | None = None  # mcq: the right letter
    correct_raw: str | None = None  # mcq: the release's Correct_Answer as written (OFFSIDE's scorer compares to it)
    corrected_letter: str | None = None  # mcq on rumors: the option stating the truth
    corrected_answer: str | None = None  # gen on rumors: the true answer
    truth: str | None = None
    rumor: str | None = None
    # Likelihood: answers whose probability is scored. [0] is the reference; for a truth
    # ratio, [1:] are wrong answers (the other options inside the reference sentence).
    answers: tuple[str, ...] = ()
    # Phrases a right answer contains (general knowledge: "Paris"); scored as key accuracy.
    keys: tuple[str, ...] = ()
    player_id: int | None = None
    image_id: int | None = None
    attribute: str | None = None
    is_rumor: bool | None = None
    visual_rumor: bool | None = None
    # The question form it asks the fact in (``eval.forms``; None: the release's own question).
    form: str | None = None
    # gen items with images: the record's user turn as written up to the question (its leading
    # "<image>\n", say; "" when the tag was implied), for OFFSIDE's prompt layout; None: unknown.
    raw_prefix: str | None = None
    layout: str = "trained"  # "trained" | "offside" (see messages)

    @property
    def option_dict(self) -> dict[str, str]:
        return dict(self.options)

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat turns; each image is an ``<image>`` tag before the text. A
        multiple-choice prompt follows its image directly, as OFFSIDE's evaluation puts the
        image content item right before the query text. A generation prompt is the question as
        the model was trained on it (ms-swift's placement: image, line break, question);
        OFFSIDE's ``eval_generation.py`` instead sends the record's raw user turn after the
        image, its leading ``<image>\\n`` included as literal text: ``layout="offside"`` writes
        that (the tags past the images stay text, ms-swift's rule in ``VisionProcessor``)."""
        tags = "<image>" * len(self.images)
        if not tags:
            return [{"role": "user", "content": self.prompt}]
        if self.fmt == "mcq":
            sep = ""
        elif self.layout == "offside" and self.raw_prefix is not None:
            sep = self.raw_prefix
        else:
            sep = "\n"
        return [{"role": "user", "content": f"{tags}{sep}{self.prompt}"}]

    def meta(self) -> dict[str, Any]:
        """What per-example output files record about the item besides its text."""
        keys = ("uid", "test_set", "modality", "fmt", "player_id", "image_id", "attribute", "is_rumor", "visual_rumor")
        out = {k: getattr(self, k) for k in keys}
        if self.form is not None:
            out["form"] = self.form
        return out


@dataclasses.dataclass(frozen=True)
class Task:
    """The items of one test set in one modality and format, e.g. ``forget/image/gen``."""

    test_set: str
    modality: str
    fmt: str
    items: tuple[EvalItem, ...]
    form: str | None = None  # the question form of every item (``eval.forms``)

    @property
    def name(self) -> str:
        if self.form is not None:  # e.g. forget@blank/text/gen
            return f"{self.test_set}@{self.form}/{self.modality}/{self.fmt}"
        return f"{self.test_set}/{self.modality}/{self.fmt}"


def _key(e: Example) -> tuple | None:
    """What pairs records about the same image and question kind across files."""
    if e.image_id is None or e.attribute is None:
        return None
    return (e.image_id, e.attribute, e.role)


def _images(e: Example, root: Path) -> tuple[str, ...]:
    if e.modality != "image":
        return ()
    return tuple(str(p) for p in e.image_paths(root) if p is not None)


def _phrases(mcq: Example | None) -> tuple[str | None, str | None]:
    """(truth, rumor) key phrases of a rumor question: the options the record marks."""
    if mcq is None or not mcq.is_rumor or not mcq.corrected_letter:
        return None, None
    options = mcq.option_dict
    truth, rumor = options.get(mcq.corrected_letter), options.get(mcq.correct or "")
    if not truth or not rumor or truth == rumor:
        return None, None
    return truth, rumor


def _perturbed_answers(reference: str, mcq: Example | None) -> tuple[str, ...]:
    """The reference sentence with its key value swapped for each wrong option.

    Defined when a paired multiple-choice record exists and its correct option's text occurs
    in the reference answer as whole words (TOFU's perturbed answers, built from the options).
    """
    if mcq is None or mcq.correct is None:
        return ()
    options = mcq.option_dict
    value = options.get(mcq.correct, "")
    if not value or not re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reference):
        return ()
    wrong = [text for letter, text in mcq.options if letter != mcq.correct and text != value]
    pattern = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")
    return tuple(pattern.sub(lambda _m, w=w: w, reference) for w in wrong)


def qa_item(e: Example, test_set: str, root: Path, mcq: Example | None = None, modality: str | None = None) -> EvalItem:
    """A generation item from a chat record (``mcq``: the paired classification record)."""
    truth, rumor = _phrases(mcq)
    wrong = _perturbed_answers(e.answer, mcq)
    raw = next((m.content for m in reversed(e.messages) if m.role == "user"), None)
    raw_prefix = raw[: len(raw) - len(e.question)] if raw is not None and raw.endswith(e.question) else None
    return EvalItem(
        uid=f"{e.source}:{e.index}", test_set=test_set, modality=modality or e.modality, fmt="gen",
        question=e.question, prompt=e.question, reference=e.answer, images=_images(e, root),
        corrected_answer=e.corrected_answer, truth=truth, rumor=rumor, answers=(e.answer,) + wrong,
        player_id=e.player_id, image_id=e.image_id, attribute=e.attribute, is_rumor=e.is_rumor,
        visual_rumor=e.visual_rumor, raw_prefix=raw_prefix,
    )


def mcq_item(e: Example, test_set: str, root: Path, question: str | None = None, modality: str | None = None) -> EvalItem:
    """A multiple-choice item; ``question``/``modality`` re-ask it in text form (a twin's question)."""
    modality = modality or e.modality
    question = question or e.question
    truth, rumor = _phrases(e)
    return EvalItem(
        uid=f"{e.source}:{e.index}", test_set=test_set, modality=modality, fmt="mcq", question=question,
        prompt=mcq_prompt(question, e.options, modality), reference=e.option_dict.get(e.correct or "", e.answer),
        images=_images(e, root) if modality == "image" else (), options=e.options, correct=e.correct,
        correct_raw=e.correct_raw, corrected_letter=e.corrected_letter, truth=truth, rumor=rumor, player_id=e.player_id, image_id=e.image_id,
        attribute=e.attribute, is_rumor=e.is_rumor, visual_rumor=e.visual_rumor,
    )


def _split(release: Release, setting: str, split: str) -> list[Example]:
    return list(release.splits.get(setting, {}).get(split, []))


def build_tasks(
    release: Release,
    test_sets: Iterable[str] = tuple(TEST_SETS),
    modalities: Iterable[str] = ("image",),
    formats: Iterable[str] = FORMATS,
    *,
    max_examples: int | Mapping[str, int | None] | None = None,
    seed: int = 0,
) -> list[Task]:
    """The tasks of ``test_sets`` x ``modalities`` x ``formats`` that the release can supply.

    A combination the release has no records for (e.g. the augmented test set as text) is
    left out. World facts are text-only and appear under ``text`` (and under ``image`` for an
    image-only evaluation, since a vision-language model answers text questions too).
    ``max_examples`` (one number, or per test set) keeps a deterministic subset that draws
    evenly from every (rumor?, attribute) group, so slices keep their members.
    """
    root = Path(release.root)
    modalities, formats = tuple(modalities), tuple(formats)
    test_sets = tuple(test_sets)
    for name, allowed, given in (("test set", (*TEST_SETS, GENERAL), test_sets), ("modality", MODALITIES, modalities),
                                 ("format", FORMATS, formats)):
        bad = sorted(set(given) - set(allowed))
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; expected some of {list(allowed)}")
    tasks = []
    for test_set in test_sets:
        if test_set == GENERAL:
            if "gen" in formats:
                tasks.append(Task(GENERAL, "text", "gen", tuple(general_knowledge_items())))
            continue
        qa_split, mcq_split = TEST_SETS[test_set]
        qa = _split(release, "complete", qa_split)
        mcq = _split(release, "complete", mcq_split)
        mcq_by_key = {k: e for e in mcq if (k := _key(e)) is not None}
        limit = max_examples.get(test_set) if isinstance(max_examples, Mapping) else max_examples
        text_only = bool(qa or mcq) and all(e.modality == "text" for e in qa + mcq)
        for modality in modalities:
            if text_only and modality == "image" and "text" in modalities:
                continue  # listed once, under text
            for fmt in formats:
                items = _items(release, root, test_set, modality, fmt, qa, mcq, mcq_by_key, text_only)
                if items:
                    label = "text" if text_only else modality
                    tasks.append(Task(test_set, label, fmt, tuple(subsample(items, limit, seed))))
    return tasks


def _items(release, root, test_set, modality, fmt, qa, mcq, mcq_by_key, text_only) -> list[EvalItem]:
    if text_only or modality == "image":
        if fmt == "gen":
            return [qa_item(e, test_set, root, mcq_by_key.get(_key(e))) for e in qa]
        return [mcq_item(e, test_set, root) for e in mcq]
    # Text prompts about players: the pure-text twins.
    if test_set not in TEXT_TWIN_SETS:
        return []
    twins = _split(release, "pure_text", test_set)
    if fmt == "gen":
        return [qa_item(e, test_set, root, mcq_by_key.get(_key(e)), modality="text") for e in twins]
    twin_question = {k: e.question for e in twins if (k := _key(e)) is not None}
    return [mcq_item(e, test_set, root, question=twin_question[k], modality="text")
            for e in mcq if (k := _key(e)) is not None and k in twin_question]


def general_knowledge_items() -> list[EvalItem]:
    """The packaged general-knowledge questions as text generation items."""
    import importlib.resources

    import yaml

    text = importlib.resources.files("offside_jax.eval.templates").joinpath(GENERAL_FILE).read_text(encoding="utf-8")
    items = []
    for k, q in enumerate(yaml.safe_load(text)["questions"]):
        keys = (str(q["key"]), *(str(a) for a in q.get("aliases", ())))
        items.append(EvalItem(uid=f"{GENERAL_FILE}:{k}", test_set=GENERAL, modality="text", fmt="gen",
                              question=q["question"], prompt=q["question"], reference=q["answer"],
                              answers=(q["answer"],), keys=keys))
    return items


def subsample(items: Sequence[EvalItem], limit: int | None, seed: int = 0) -> list[EvalItem]:
    """At most ``limit`` items, deterministic, returned in their original order.

    Draws alternate between rumor and other questions, and within each between attributes
    (round-robin, each in a seeded order), so small subsets still fill every slice.
    """
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise ValueError(f"max_examples must be >= 1, got {limit}")
    rng = np.random.default_rng(seed)
    levels: dict[bool, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, item in enumerate(items):
        levels[bool(item.is_rumor)][item.attribute or ""].append(i)
    queues = {flag: [list(rng.permutation(idx)) for _, idx in sorted(groups.items())]
              for flag, groups in sorted(levels.items(), reverse=True)}
    turn = {flag: 0 for flag in queues}
    chosen: list[int] = []
    while len(chosen) < limit:
        for flag, groups in queues.items():
            for _ in range(len(groups)):  # the next attribute group that still has items
                group = groups[turn[flag] % len(groups)]
                turn[flag] += 1
                if group:
                    chosen.append(int(group.pop(0)))
                    break
            if len(chosen) == limit:
                break
    return [items[i] for i in sorted(chosen)]
