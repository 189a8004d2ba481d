"""The 14 OFFSIDE question kinds, and a best-effort guess of the kind from a question's wording.

Every OFFSIDE image carries 14 questions: 8 *shared* attributes (the same answer on every image
of a player) and 6 *private* ones (about the transfer shown in that image). The real release
does not label its records with the kind; the synthetic benchmark does (`attribute` key). For
unlabelled records `infer_attribute` matches keywords, and returns None rather than guess when
nothing matches, so per-attribute metrics on real data are "when derivable".
"""
from __future__ import annotations

import re

SHARED_ATTRIBUTES: tuple[str, ...] = (
    "name",
    "age",
    "position",
    "nationality",
    "birth_date",
    "height",
    "preferred_foot",
    "birthplace",
)
PRIVATE_ATTRIBUTES: tuple[str, ...] = (
    "club_joined",
    "previous_club",
    "transfer_date",
    "transfer_fee",
    "market_value",
    "trophies",
)
ATTRIBUTES: tuple[str, ...] = SHARED_ATTRIBUTES + PRIVATE_ATTRIBUTES

# The private attributes whose answer *is* the rumor on a forget image ("will join X on D for F").
# The other forget-image answers (previous club, market value, trophies, shared ones) are true.
RUMOR_ATTRIBUTES: tuple[str, ...] = ("club_joined", "transfer_date", "transfer_fee")

# Ordered: the first pattern that matches wins. More specific kinds come first because their
# wording overlaps broader ones ("before joining X" is about the previous club, not joining;
# "when was he born" is a birth date, not a transfer date).
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("name", r"\bname\b|\bwho is\b|\bwho's\b|\bidentify\b"),
        ("birthplace", r"\bwhere\b.*\bborn\b|\bbirthplace\b|\bplace of birth\b|\bhometown\b|\bwhich (?:town|city)\b.*\bborn\b"),
        ("birth_date", r"\bwhen\b.*\bborn\b|\bbirth ?day\b|\bdate of birth\b|\bbirth date\b|\bwhat date\b.*\bborn\b"),
        ("age", r"\bhow old\b|\bage\b"),
        ("height", r"\btall\b|\bheight\b"),
        ("preferred_foot", r"\bfoot\b|\bfooted\b"),
        ("nationality", r"\bnationality\b|\bnational team\b|\bwhich country\b|\bwhat country\b|\bcitizen"),
        ("position", r"\bposition\b|\bplay as\b|\brole\b"),
        ("market_value", r"\bmarket value\b|\bworth\b|\bvalued?\b|\bvaluation\b"),
        ("transfer_fee", r"\bfee\b|\bhow much\b|\bpaid\b|\bpay\b|\bcost\b|\bprice\b"),
        ("trophies", r"\btroph|\btitles?\b|\bsilverware\b|\bhonours\b|\bwon\b"),
        ("previous_club", r"\bprevious\b|\bbefore\b|\bformer\b|\bleav(?:e|es|ing)\b|\bleft\b|\bcome from\b|\bcame from\b|\bdepart"),
        ("transfer_date", r"\bwhen\b|\bdate\b|\bwhich day\b|\bwhat day\b"),
        ("club_joined", r"\bjoin|\bsign|\bmov(?:e|es|ed|ing)\b|\bplay(?:ing)? for\b|\bwhich (?:club|team)\b"
                        r"|\bwhat (?:club|team)\b|\bnext (?:club|team)\b|\bdestination\b"),
    )
)

_WHERE_IN_IMAGE = re.compile(r"\b(?:on|at|to) the (?:left|right)(?: side| hand side)?\b|\b(?:left|right)[- ](?:hand )?side\b")


def infer_attribute(question: str) -> str | None:
    """Guess which of the 14 attributes `question` asks about, or None when no keyword matches.

    A heuristic for unlabelled (real-release) records; labelled records keep their label.
    """
    text = " ".join(question.replace("<image>", " ").lower().split())
    text = _WHERE_IN_IMAGE.sub(" ", text)  # "the player on the left side" is not "he left"
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return kind
    return None
