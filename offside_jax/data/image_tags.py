"""Where a record's images go: ms-swift's ``<image>`` tag rule, which OFFSIDE trained with.

ms-swift (``Template._add_default_tags`` and ``Template._pre_tokenize_images``) reads a chat
record with ``images`` like this:

1. count the ``<image>`` tags in every turn (system included);
2. fewer tags than images: the missing tags are put, with no separator, in front of the first
   non-system turn (``"<image>" * missing + content``);
3. walk the turns in order and replace tags by images *while images remain*; a tag after the
   last image stays in the text as the literal characters ``<image>``.

So a published record whose question says "... shown in <image>." beside its leading tag and
one image trains on one image and the words "shown in <image>.". Everything here is plain
text manipulation; the loader, the training encoders and ``models.vision_inputs`` share it so
they place images identically.

OFFSIDE's vanilla model was trained with ``swift sft`` (its ``bash.sh``), hence this rule. Its
own unlearning and evaluation scripts (``baselines/*.py``, ``eval/*.py``) build the Qwen
messages themselves instead: the image as the first content item, then the record's text
unchanged, every ``<image>`` in it left as literal text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

IMAGE_TAG = "<image>"
# Stands for a placed image while turns are edited as text; never occurs in release text.
PLACED = "\x00"


@dataclasses.dataclass(frozen=True)
class TagPlan:
    """How ms-swift reconciles a record's tags with its images."""

    tags: int  # tags written in the record
    images: int

    @property
    def added(self) -> int:
        """Tags ms-swift puts in front of the first non-system turn (fewer tags than images)."""
        return max(0, self.images - self.tags)

    @property
    def literal(self) -> int:
        """Tags after the last image, left in the text as ``<image>`` (more tags than images)."""
        return max(0, self.tags - self.images)


def plan(contents: Sequence[str], n_images: int) -> TagPlan:
    """The tag plan of a record whose turns hold ``contents`` and which has ``n_images`` images."""
    return TagPlan(sum(c.count(IMAGE_TAG) for c in contents), n_images)


def place_images(messages: Sequence[Mapping[str, str]], n_images: int, image: str) -> list[dict[str, str]]:
    """The turns with images placed as ms-swift places them: missing tags added in front of the
    first non-system turn, then the first ``n_images`` tags (in turn order) replaced by
    ``image``; later tags stay literal text."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = plan([t["content"] for t in turns], n_images).added
    if missing:
        first = next((i for i, t in enumerate(turns) if t["role"] != "system"), None)
        if first is None:
            raise ValueError(f"{n_images} image(s) but no non-system turn to put them in")
        turns[first]["content"] = IMAGE_TAG * missing + turns[first]["content"]
    left = n_images
    for turn in turns:
        if not left:
            break
        pieces, rest = [], turn["content"]
        while left and IMAGE_TAG in rest:
            head, _, rest = rest.partition(IMAGE_TAG)
            pieces.append(head + image)
            left -= 1
        turn["content"] = "".join(pieces) + rest
    return turns

