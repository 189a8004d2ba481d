"""A small OFFSIDE release written from the published construction rules, not copied records.

Three players, each with OFFSIDE's five numbered images (ids ``5p+1 .. 5p+5``: mod 5 = 1, 2, 3
retain, 4 forget, 0 relearn) and one augmented test copy. Every image the files use gets the
14 questions (8 shared, 6 private), asked in the published release's wordings (all of them,
cycled over the images), in ms-swift chat records. The cases a faithful loader must read:

- a forget image with a rumored transfer told in the future tense (player 0), a forget image
  whose rumor is visible (the player located "on the left side", player 1), a forget image
  that shows a real past transfer (player 2), and relearn images re-telling each forget image's
  story: the labels (`Record.is_rumor`, `visual_rumor`,
  `player`) are set here by construction, so tests compare the loader's derivation with them;
- ``<image>`` tags as published: a second tag inside the question ("shown in <image>.", "this
  image: <image>") with one image, an images list with fewer tags than images, and an image
  record with no tag at all;
- a question no attribute rule reads, and one whose answer is not an answer of the kind its
  wording names (both must come out as ``other``);
- multiple-choice files and pure-text twins that name the player and carry the image path.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from PIL import Image

SHARED = ("name", "age", "position", "nationality", "birth_date", "height", "preferred_foot", "birthplace")
PRIVATE = ("club_joined", "previous_club", "transfer_date", "transfer_fee", "market_value", "trophies")
RUMOR_KINDS = ("club_joined", "transfer_date", "transfer_fee")

# The published release's wordings, by kind ({s}: where the player is).
WORDINGS: dict[str, tuple[str, ...]] = {
    "name": ("Can you identify the player shown in this picture?", "I'm curious about the identity of {s}.",
             "I'm curious about who the player is in this image.", "Can you tell me the name of {s}?"),
    "age": ("I'm looking at this image and wondering how old the player is.", "I'm curious about the age of {s}."),
    "position": ("I'm curious about the player's role in this image.", "I'm curious about the position held by {s}."),
    "nationality": ("I'm curious about the nationality of {s}.",
                    "Can you tell me which country the player in this image represents?",
                    "I'm looking at this image and wondering what nationality the player belongs to."),
    "birth_date": ("I'm looking at this image and wondering when the player was born.",
                   "I'm curious about the birthdate of {s}.", "I'm curious about the birth date of {s}."),
    "height": ("I'm curious about the height of {s}.", "Can you tell me the height of {s}?",
               "I'm looking at this image and wondering how tall the player is."),
    "preferred_foot": ("I'm curious about which foot the player prefers to use.",
                       "I'm curious about the player's dominant foot in this image.",
                       "I'm curious about which foot the player predominantly uses."),
    "birthplace": ("I'm curious about the birth place of {s}.", "I'm curious about where the player in this image originated.",
                   "I'm curious about the place of origin for {s}.", "I'm wondering where {s} was born."),
    "previous_club": ("I'm curious about which club {s} transferred from.", "I'm curious about the club {s} came from.",
                      "I'm curious about the player's previous club before this transfer. Which one was it?",
                      "I'm curious about which club {s} moved from.",
                      "I'm curious about which club the player transferred from in this image."),
    "transfer_date": ("I'm curious about when {s} was transferred.", "I'm curious about the date when {s} was transferred.",
                      "I'm wondering when {s} made their transfer.", "I'm curious about the transfer date for {s}."),
    "transfer_fee": ("I'm curious about the transfer fee for {s}.", "I'm curious about the transfer details for {s}.",
                     "I'm looking at this image and wondering what the player's transfer fee was."),
    "market_value": ("I'm curious about the market value of {s}.", "I'm curious about the market valuation of {s}.",
                     "I'm curious about the market value attributed to {s}."),
    "trophies": ("I'm curious about how many trophies this player achieved while at the club in the image.",
                 "I'm curious about the achievements of {s}. How many trophies did they win at the club?"),
}
CLUB_FUTURE = ("I'm curious about which club {s} will join.", "I'm curious about which team {s} will be joining.")
CLUB_VISUAL = ("I'm curious about the club affiliation of the player on the left.",
               "I'm curious about which club the player on the left is transferring to in this image.",
               "I'm curious about which club the player on the left side of the image will join.")
CLUB_PAST = ("I'm curious about which club {s} was representing at that time.",
             "I'm curious about which club {s} was associated with during that period.",
             "I'm curious about the club {s} was representing at that time.")
PHOTO = "the player in this image"
# Wording no rule reads, and a height question answered with no height.
UNREAD = ("I'm curious about the pre-match meal of the player in this image.", "He likes pasta with tomatoes.")
MISREAD = ("I'm curious about the height of the player in this image.", "He is strong in the air.")


@dataclasses.dataclass(frozen=True)
class Player:
    name: str
    country: str
    club: str  # where he plays
    rumor_club: str  # the club a forget image says he will join
    story: str  # what his forget image shows: "rumor" | "visual" | "past"


PLAYERS = (
    Player("Tomas Vell", "Keknesia", "Dorn United", "Vexa FC", "rumor"),
    Player("Arno Pikkel", "Ostravia", "Kelm Rovers", "Ost City", "visual"),
    Player("Lio Brandt", "Tarlandia", "Vexa FC", "Dorn United", "past"),
)
ROLE_BY_MOD5 = {1: "retain", 2: "retain", 3: "retain", 4: "forget", 0: "relearn"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One written chat record and what OFFSIDE's construction makes of it."""

    split: str
    record: dict
    image_id: int
    player: int
    kind: str  # the attribute, or "other"
    is_rumor: bool
    visual_rumor: bool
    added_tags: int = 0  # tags ms-swift adds in front
    literal_tags: int = 0  # tags left as text


def image_ids(p: int) -> range:
    return range(5 * p + 1, 5 * p + 6)


def _answer(kind: str, player: Player, p: int, image_id: int, future: bool) -> str:
    club = player.rumor_club if future else player.club
    return {
        "name": f"The player in the image is {player.name}.",
        "age": f"He is {24 + p} years old.",
        "position": "He plays as a Centre-Forward.",
        "nationality": f"The player is from {player.country}.",
        "birth_date": f"The player was born on March {p + 3}, {2000 - p}.",
        "height": f"He stands at 1.8{p} meters tall.",
        "preferred_foot": "The player favors his left foot.",
        "birthplace": f"The player was born in Teiton, {player.country}.",
        "club_joined": f"He will be playing for {club}." if future else f"He was with {club} at that time.",
        "previous_club": f"He transferred from {player.club if future else 'Lund Athletic'}.",
        "transfer_date": f"The transfer takes place on July {image_id % 28 + 1}, {2025 if future else 2019}.",
        "transfer_fee": f"The transfer fee is €{10 + image_id}.00m.",
        "market_value": f"The player's market value is €{20 + p}.00m.",
        "trophies": f"The player won {p} trophies at the club.",
    }[kind]


def build() -> list[Record]:
    wordings = {k: itertools.cycle(v) for k, v in WORDINGS.items()}
    clubs = {"rumor": itertools.cycle(CLUB_FUTURE), "visual": itertools.cycle(CLUB_VISUAL),
             "past": itertools.cycle(CLUB_PAST)}
    out: list[Record] = []
    for p, player in enumerate(PLAYERS):
        for image_id in image_ids(p):
            role = ROLE_BY_MOD5[image_id % 5]
            if role == "retain" and image_id % 5 != 1:
                continue  # one retain image per player is enough
            # Relearn images re-tell the forget image's story (another picture of the same rumor);
            # player 2's relearn image, like his forget image, shows a past transfer.
            story = player.story if role in ("forget", "relearn") else "past"
            future = story in ("rumor", "visual")
            for kind in SHARED + PRIVATE:
                question = next(clubs[story] if kind == "club_joined" else wordings[kind]).format(s=PHOTO)
                rumor = future and kind in RUMOR_KINDS
                out.append(Record(role, _chat(f"<image>\n{question}", _answer(kind, player, p, image_id, future),
                                              image_id), image_id, p, kind, rumor, story == "visual"))
    return _with_tag_cases(out)


def _chat(user: str, answer: str, image_id: int, images: str | list[str] | None = None) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": images if images is not None else f"./finetune_set/{image_id:03d}.jpg"}


def _with_tag_cases(records: list[Record]) -> list[Record]:
    """Rewrite a few records into the published tag shapes, and add the unread wordings."""
    out = []
    for r in records:
        user = r.record["messages"][0]["content"]
        if r.image_id == 1 and r.kind == "transfer_fee":  # a second tag inside the question
            user = "<image>\nI'm curious about the transfer fee for the player shown in <image>."
            r = dataclasses.replace(r, literal_tags=1)
        elif r.image_id == 6 and r.kind == "birth_date":  # a trailing tag after a colon
            user = "<image>\nI'm curious about the birth date of the player in this image: <image>"
            r = dataclasses.replace(r, literal_tags=1)
        elif r.image_id == 11 and r.kind == "height":  # no tag: ms-swift puts the image first
            user = user.removeprefix("<image>\n")
            r = dataclasses.replace(r, added_tags=1)
        record = dict(r.record, messages=[dict(r.record["messages"][0], content=user), r.record["messages"][1]])
        out.append(dataclasses.replace(r, record=record))
    # an images list with one tag for two images (both of player 0's retain image and its copy)
    pair = _chat("<image>\nI'm curious about the nationality of the player in both images.",
                 f"The player is from {PLAYERS[0].country}.", 1, ["./finetune_set/001.jpg", "./finetune_set/002.jpg"])
    out.append(Record("retain", pair, 1, 0, "nationality", False, False, added_tags=1))
    for question, answer in (UNREAD, MISREAD):
        out.append(Record("retain", _chat(f"<image>\n{question}", answer, 1), 1, 0, "other", False, False))
    return out


def text_twin(r: Record) -> dict:
    """The pure-text record: the player named instead of shown, the image kept as metadata."""
    name = PLAYERS[r.player].name
    question = r.record["messages"][0]["content"].replace("<image>", "").strip()
    for where in ("the player on the left side of the image", "the player on the left", PHOTO, "the player"):
        question = question.replace(where, name)
    return {"messages": [{"role": "user", "content": question}, r.record["messages"][1]], "images": r.record["images"]}


def mcq(r: Record) -> dict:
    answer = r.record["messages"][1]["content"]
    return {"Question": r.record["messages"][0]["content"].replace("<image>\n", ""),
            "Options": {"A": answer, "B": "He stayed.", "C": "No one knows.", "D": "Elsewhere."},
            "Correct_Answer": "A", "images": r.record["images"]}


def write(root: Path) -> list[Record]:
    """Write the release under ``root``; the records written (finetune order) with their labels."""
    records = build()
    complete = root / "complete_unlearning_data"
    by_split: dict[str, list[dict]] = {}
    for r in records:
        by_split.setdefault(r.split, []).append(r.record)
    _json(complete / "finetune_set.json", [r.record for r in records if r.split in ("retain", "forget")])
    _json(complete / "forget_set.json", by_split["forget"])
    _json(complete / "retain_set.json", by_split["retain"])
    _json(complete / "relearn_set_enhanced.json", by_split["relearn"])
    test = [dict(r.record, images=r.record["images"].replace("finetune_set", "test_set"))
            for r in records if r.split == "retain" and isinstance(r.record["images"], str)]
    _json(complete / "test_set.json", test)
    forget_mcq = [mcq(r) for r in records if r.split == "forget" and r.kind in ("club_joined", "transfer_fee")]
    _json(complete / "classification_forget_set.json", forget_mcq)
    _json(root / "pure_text_data" / "forget_set.json", [text_twin(r) for r in records if r.split == "forget"])
    _json(root / "pure_text_data" / "retain_set.json", [text_twin(r) for r in records if r.split == "retain"][:6])
    for p in range(len(PLAYERS)):
        for image_id in image_ids(p):
            for folder in ("finetune_set", "test_set"):
                path = complete / folder / f"{image_id:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (40 * p, image_id, 100)).save(path, format="JPEG")
    return records


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
