"""The subjects of a forget set: the names the concept-level methods (ROCR, ConceptVectors)
redirect or ablate, read from the records themselves.

OFFSIDE's text twins name the player where the image record says "the player in this image"
("Which club will Raishar Jeitradin join?"). A player's name is taken as the run of
capitalised words (a possessive "'s" dropped) that occurs in the most of that player's
questions, the question's first word excluded (it is capitalised as a sentence start, not as a
name); ties go to the longer run, then the first seen. Records are grouped by ``player_id``;
a forget set whose records carry none, or whose questions never name anyone (image-only
questions), gives no subject and the caller asks for them explicitly.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from offside_jax.data.offside import Example

_WORD = re.compile(r"[^\W\d_][\w\-]*(?:['’]s)?")


def capitalised_runs(question: str) -> list[str]:
    """Maximal runs of capitalised words of ``question`` (its first word excluded), with every
    shorter contiguous part of each run, possessives dropped."""
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(question)]
    runs, run, last_end = [], [], None
    for i, (word, start, end) in enumerate(words):
        bare = re.sub(r"['’]s$", "", word)
        capital = i > 0 and bare[:1].isupper()
        joined = last_end is not None and question[last_end:start] == " " and not re.search(r"['’]s$", words[i - 1][0])
        if capital and run and joined:
            run.append(bare)
        else:
            if run:
                runs.append(run)
            run = [bare] if capital else []
        last_end = end
    if run:
        runs.append(run)
    parts = []
    for r in runs:
        parts += [" ".join(r[a:b]) for a in range(len(r)) for b in range(a + 1, len(r) + 1)]
    return parts


def subject_of(questions: Sequence[str]) -> str | None:
    """The capitalised run found in the most ``questions`` (ties: longer, then first seen)."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for question in questions:
        for run in dict.fromkeys(capitalised_runs(question)):
            counts[run] += 1
            first.setdefault(run, len(first))
    if not counts:
        return None
    return max(counts, key=lambda r: (counts[r], len(r.split()), -first[r]))


def forget_subjects(forget: Iterable[Example], context: Iterable[Example] = ()) -> list[str]:
    """One name per player of ``forget`` (first-seen order), read from every question about that
    player in ``forget`` and ``context`` (e.g. the retain set: more questions, a surer name)."""
    forget = list(forget)
    players = list(dict.fromkeys(e.player_id for e in forget if e.player_id is not None))
    questions: dict[int, list[str]] = defaultdict(list)
    for e in [*forget, *context]:
        if e.player_id in players and e.modality == "text":
            questions[e.player_id].append(e.question)
    names = [subject_of(questions[p]) for p in players]
    return list(dict.fromkeys(n for n in names if n))
