"""Labels the published OFFSIDE release leaves implicit, derived from how OFFSIDE built it.

The release's records carry no rumor flag, no visual-rumor flag and no player id; its README
and files say how they were made, and that is enough to recover all three:

- **Images and players.** Every player has five original images numbered consecutively, and
  ``image id mod 5`` gives an image's role: 1, 2, 3 retain, 4 forget, 0 relearn (README,
  "Dataset Construction"); three test images are augmented copies of the retain images. So
  ids ``5k+1 .. 5k+5`` are one player's images and ``player_id = (image_id - 1) // 5`` (the
  published 80 players use ids 1..400; e.g. ``006.jpg`` and ``007.jpg`` both show Erling
  Haaland, ``014.jpg`` Declan Rice). A record's image id is the number its image file is named
  by (``./finetune_set/364.jpg`` -> 364), pure-text records included (they name the image of
  the question they paraphrase).
- **Rumors.** Each image has 14 questions: 8 shared (name, age, position, nationality, birth
  date, height, foot, birthplace: true on every image) and 6 private ones about one transfer
  (club joined, previous club, transfer date, transfer fee, market value, trophies). Retain,
  relearn and test images show a real past transfer. A forget image carries the invented
  "will join" story: its club question and answer are in the future tense ("which club the
  player ... will join" -> "He will be playing for Newcastle United."), and the transfer it
  invents is the club joined, the date and the fee (`attributes.RUMOR_ATTRIBUTES`); the
  previous club is the player's real club, market value and trophies are facts, and so is
  every shared answer. So a record states a rumor when it is a club-joined, transfer-date or
  transfer-fee question about an image whose transfer is the rumored one. A forget image's
  transfer counts as rumored unless its club question or answer reads only in the past tense
  ("was representing ... at that time"), which marks a real past transfer; those images are
  counted (`Derived.forget_images_past`). A relearn image (the relearning attack re-teaches
  the forgotten story with another picture) counts as rumored when its club question or
  answer speaks of the coming transfer ("will join"); retain and test images never do.
- **Visual rumors.** The images that show the rumor itself are composites, and their
  questions locate the player in them ("the player on the left side of the image"); ordinary
  photographs are asked about "the player in this image". A forget image carrying a rumor
  whose questions locate the player by side is a visual rumor; every record of it gets
  ``visual_rumor=True``, every other record ``False``. This reading of the wording is an
  inference: the release says only that some rumors are visible in the image.

A record that states a label itself (the synthetic benchmark's ``is_rumor``, ``visual_rumor``,
``player_id`` keys) keeps it; only missing labels are derived. The evaluation slices
(``eval.suite.SLICES``) and the unlearning data selection (``unlearn.settings``) read these
labels, so both see the same rumors.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable

from offside_jax.data.attributes import RUMOR_ATTRIBUTES

IMAGES_PER_PLAYER = 5  # original images per player: ids 5k+1 .. 5k+5
FORGET_ROLE = "forget"
RELEARN_ROLE = "relearn"
RUMOR_ROLES = (FORGET_ROLE, RELEARN_ROLE)  # roles whose images may carry the invented transfer
CLUB_QUESTION = "club_joined"  # the question whose tense says whether a transfer is rumored

_FUTURE = re.compile(r"\bwill\b|\bgoing to\b|\bset to\b|\bbe joining\b|\bnext (?:club|team)\b|\babout to\b"
                     r"|\bexpected to\b|\bis to join\b")
_PAST = re.compile(r"\b(?:was|were|did|joined|represented|signed|moved|transferred)\b|\bat th(?:at|e) time\b"
                   r"|\bduring th(?:at|e) (?:time|period)\b")
_SIDE = re.compile(r"\b(?:on|at) the (?:left|right)\b|\b(?:left|right)[- ](?:hand )?side\b")


def player_of(image_id: int | None) -> int | None:
    """The player an original image belongs to (``(image_id - 1) // 5``), None without an id."""
    if image_id is None or image_id < 1:
        return None
    return (image_id - 1) // IMAGES_PER_PLAYER


def reads_future(text: str) -> bool:
    """Whether a club question/answer speaks of a coming transfer ("will join")."""
    return bool(_FUTURE.search(text.lower()))


def reads_past_only(text: str) -> bool:
    """Whether a club question/answer speaks of a past transfer and not of a coming one."""
    text = text.lower()
    return bool(_PAST.search(text)) and not _FUTURE.search(text)


def locates_player_by_side(question: str) -> bool:
    return bool(_SIDE.search(question.lower()))


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """What the records about one image say about it."""

    forget: bool  # a forget image (by its records' role)
    rumored: bool  # a forget or relearn image whose transfer is the invented one
    by_side: bool  # some question locates the player by side in the image


@dataclasses.dataclass
class Derived:
    """How many labels were derived (reported beside the split counts)."""

    rumor_records: int = 0
    fact_records: int = 0
    visual_rumor_images: int = 0
    rumored_images: int = 0
    forget_images_past: int = 0  # forget images whose club question reads as a past transfer
    player_ids: int = 0  # records given a player id

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def image_facts(examples: Iterable) -> dict[int, ImageFacts]:
    """Per image id: the facts its records (from every split and setting) establish."""
    forget: dict[int, bool] = defaultdict(bool)
    relearn: dict[int, bool] = defaultdict(bool)
    club_texts: dict[int, list[str]] = defaultdict(list)
    by_side: dict[int, bool] = defaultdict(bool)
    for e in examples:
        if e.image_id is None:
            continue
        forget[e.image_id] |= e.role == FORGET_ROLE
        relearn[e.image_id] |= e.role == RELEARN_ROLE
        by_side[e.image_id] |= locates_player_by_side(e.question)
        if e.attribute == CLUB_QUESTION:
            club_texts[e.image_id].append(e.question + " " + (e.answer if e.kind == "qa" else ""))
    out = {}
    for image_id, is_forget in forget.items():
        texts = club_texts.get(image_id, [])
        past = bool(texts) and all(reads_past_only(t) for t in texts)
        future = any(reads_future(t) for t in texts)
        rumored = (is_forget and not past) or (relearn[image_id] and future)
        out[image_id] = ImageFacts(is_forget, rumored, by_side[image_id])
    return out


def labelled(example, facts: dict[int, ImageFacts]):
    """``example`` with its missing ``is_rumor``, ``visual_rumor`` and ``player_id`` derived."""
    changes = {}
    if example.player_id is None and (player := player_of(example.image_id)) is not None:
        changes["player_id"] = player
    image = facts.get(example.image_id) if example.image_id is not None else None
    if example.is_rumor is None and image is not None:
        changes["is_rumor"] = image.rumored and example.role in RUMOR_ROLES and example.attribute in RUMOR_ATTRIBUTES
    if example.visual_rumor is None and image is not None:
        changes["visual_rumor"] = image.rumored and image.by_side
    return dataclasses.replace(example, **changes) if changes else example


def derive(examples: list) -> tuple[list, Derived]:
    """Every example labelled (see the module docstring), and what was derived."""
    facts = image_facts(examples)
    out = [labelled(e, facts) for e in examples]
    derived = Derived(
        rumor_records=sum(a.is_rumor is True and b.is_rumor is None for a, b in zip(out, examples)),
        fact_records=sum(a.is_rumor is False and b.is_rumor is None for a, b in zip(out, examples)),
        visual_rumor_images=sum(f.rumored and f.by_side for f in facts.values()),
        rumored_images=sum(f.rumored for f in facts.values()),
        forget_images_past=sum(f.forget and not f.rumored for f in facts.values()),
        player_ids=sum(a.player_id is not None and b.player_id is None for a, b in zip(out, examples)),
    )
    return out, derived
