"""The 14 OFFSIDE question kinds, read from a question's wording.

Every OFFSIDE image carries 14 questions: 8 *shared* attributes (the same answer on every image
of a player) and 6 *private* ones (about the transfer shown in that image). The real release
does not label its records with the kind; the synthetic benchmark does (`attribute` key). For
unlabelled records `infer_attribute` matches the wording against rules written from every
question template of the published release (its README's 14 questions and the paraphrases in
its fine-tuning file: "the identity of the player", "the birth place", "which club the player
... transferred from", "the transfer details", "the club affiliation of the player on the
left", "where the player ... originated", ...). Wording no rule matches is `OTHER` (the loader
counts it per split in ``SplitCounts.attribute``), and so is a chat record whose answer does
not read like an answer of the matched kind: an unknown kind costs a per-attribute number,
a wrong one corrupts it.
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

OTHER = "other"  # a question no rule recognises

# Ordered: the first pattern that matches wins. More specific kinds come first because their
# wording overlaps broader ones ("which club ... transferred from" is the previous club, not the
# club joined; "when was he born" is a birth date, not a transfer date; "the number of trophies
# ... at the club" is no club question; "which country he represents" is no club affiliation).
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("name", (r"\bname\b|\bidentity\b|\bidentify\b|\bwho is\b|\bwho's\b"
                  r"|\bwho (?:the|this) (?:player|person|athlete|footballer|man)\b")),
        ("birthplace", (r"\bwhere\b.*\bborn\b|\bbirth ?place\b|\bplace of (?:birth|origin)\b|\bhometown\b"
                        r"|\boriginat|\bwhich (?:town|city)\b.*\bborn\b")),
        ("birth_date", r"\bwhen\b.*\bborn\b|\bbirth ?day\b|\bdate of birth\b|\bbirth ?date\b|\bwhat date\b.*\bborn\b"),
        ("age", r"\bhow old\b|\bage\b"),
        ("height", r"\btall\b|\bheight\b"),
        ("preferred_foot", r"\bfoot\b|\bfooted\b"),
        ("nationality", r"\bnationality\b|\bnational team\b|\bwhich country\b|\bwhat country\b|\bcitizen"),
        ("position", r"\bposition\b|\bplay as\b|\brole\b"),
        ("market_value", r"\bmarket value\b|\bworth\b|\bvalued?\b|\bvaluation\b"),
        ("transfer_fee", r"\bfee\b|\btransfer details\b|\bhow much\b|\bpaid\b|\bpay\b|\bcost\b|\bprice\b"),
        ("trophies", r"\btroph|\btitles?\b|\bsilverware\b|\bhonours\b|\bwon\b|\bachievements\b"),
        ("previous_club", (r"\bprevious\b|\bbefore\b|\bformer\b|\bleav(?:e|es|ing)\b|\bleft\b"
                           r"|\b(?:come|came|coming|transferred|transfer|moved|move|moving) from\b|\bdepart")),
        ("transfer_date", r"\bwhen\b|\bdate\b|\bwhich day\b|\bwhat day\b"),
        ("club_joined", (r"\bjoin|\bsign|\bmov(?:e|es|ed|ing)\b|\bplay(?:ing)? for\b|\bwhich (?:club|team)\b"
                         r"|\bwhat (?:club|team)\b|\bnext (?:club|team)\b|\bdestination\b|\baffiliat"
                         r"|\brepresent(?:s|ed|ing)?\b|\bassociated with\b")),
    )
)

# What a chat answer of each kind says, loosely; a kind whose answer says none of it is a
# misread question. Kinds whose answers are free text (a name, a position) are not checked.
_ANSWER_CUES: dict[str, re.Pattern[str]] = {
    kind: re.compile(pattern)
    for kind, pattern in (
        ("age", r"\d|\byears?\b|\bold\b"),
        ("height", r"\d|\btall\b|\bmet(?:er|re)s?\b|\bcm\b"),
        ("preferred_foot", r"\bfoot|\bfooted\b|\bfeet\b"),
        ("birth_date", r"\b(?:1[89]|20)\d\d\b|\bborn on\b"),
        ("birthplace", r"\bborn\b|\bfrom\b|\bbirthplace\b|\bhometown\b|,"),
        ("transfer_date", r"\b(?:19|20)\d\d\b|\bon\b"),
        ("transfer_fee", r"[€£$]|\d|\bfee\b|\bfree\b|\bloan\b|\bundisclosed\b|\bmillion\b"),
        ("market_value", r"[€£$]|\d|\bvalu|\bworth\b"),
        ("trophies", r"\d|\btroph|\btitles?\b|\bno\b|\bnone\b|\bzero\b|\bone\b|\btwo\b|\bthree\b|\bfour\b|\bfive\b"),
        ("previous_club", r"\bfrom\b|\bprevious|\bbefore\b|\bleft\b|\bleav|\bformer|\bplay(?:s|ed)? for\b"),
        ("club_joined", r"\bjoin|\bplay|\bsign|\bmov|\bwith\b|\brepresent|\bassociated\b|\bclub\b|\btransfer"),
    )
}

_WHERE_IN_IMAGE = re.compile(r"\b(?:on|at|to) the (?:left|right)(?: side| hand side)?\b|\b(?:left|right)[- ](?:hand )?side\b")


def match_attribute(question: str) -> str | None:
    """The kind whose rule first matches ``question``'s wording, or None."""
    text = " ".join(question.replace("<image>", " ").lower().replace("’", "'").split())
    text = _WHERE_IN_IMAGE.sub(" ", text)  # "the player on the left side" is not "he left"
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return kind
    return None


def answer_agrees(kind: str, answer: str) -> bool:
    """Whether a chat ``answer`` reads like an answer of ``kind`` (True for unchecked kinds)."""
    cue = _ANSWER_CUES.get(kind)
    return cue is None or bool(cue.search(answer.lower()))


def infer_attribute(question: str, answer: str | None = None) -> str:
    """The kind of ``question`` (one of `ATTRIBUTES`), or `OTHER` when no rule matches or the
    chat ``answer``, when given, does not read like that kind's answer."""
    kind = match_attribute(question)
    if kind is None or (answer is not None and not answer_agrees(kind, answer)):
        return OTHER
    return kind
