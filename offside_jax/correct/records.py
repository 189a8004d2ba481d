"""Text records for supervised and preference training, and their token batches.

- :class:`SFTRecord`: a prompt and a target made of pieces, each trained on or not (LEMMA's
  erroneous prefix can be kept in the context but out of the loss);
- :class:`PreferenceRecord`: a prompt, a chosen and a rejected answer (DPO), with an optional
  image reference for vision-language pairs.

Batches are built through :func:`offside_jax.correct.episodes.episode_batch`: the prompt is
context, every trained piece an attempt, so ``loss_mask`` is 1 exactly on the trained target
tokens (and the end-of-sequence token that closes the target). Pieces are tokenised one by
one, the way answers are tokenised after their prompt for training elsewhere; with the
character tokenizer this equals tokenising the whole text.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offside_jax.correct import episodes as ep


class Tokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    prompt: str
    pieces: tuple[tuple[str, bool], ...]  # (text, trained on) in order; their join is the target
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def plain(cls, prompt: str, target: str, **meta: Any) -> SFTRecord:
        """A record trained on its whole target."""
        return cls(prompt, ((target, True),), meta)

    @property
    def target(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def target_mask(self) -> list[int]:
        """1 per character of :attr:`target` that is trained on, else 0."""
        return [int(trained) for text, trained in self.pieces for _ in text]

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "target": self.target, "target_mask": self.target_mask(), "meta": dict(self.meta)}


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    image: str | None = None  # reference to the image of a vision-language pair (path or id)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "image": self.image, "meta": dict(self.meta)}


def encode_piece(tok: Tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of one piece. A Hugging Face tokenizer adds its special tokens (BOS) to the
    first piece only, never in the middle of a sequence; simpler tokenizers (the character
    tokenizer) have none to add."""
    if "add_special_tokens" in inspect.signature(tok.encode).parameters:
        return list(tok.encode(text, add_special_tokens=first))
    return list(tok.encode(text))


def record_episode(tok: Tokenizer, prompt: str, pieces: Sequence[tuple[str, bool]], problem: int = 0) -> ep.Episode:
    """Prompt as context, trained pieces as attempts, the rest as context; EOS closes the
    target and is trained on (the model must learn where its answer ends)."""
    episode = ep.Episode.start(encode_piece(tok, prompt, True), problem)
    last = len(pieces) - 1
    for i, (text, trained) in enumerate(pieces):
        ids = encode_piece(tok, text, False) + ([tok.eos_token_id] if i == last and trained else [])
        if ids:
            (episode.add_attempt if trained else episode.add_context)(ids)
    if not pieces or not pieces[-1][1]:
        episode.add_attempt([tok.eos_token_id])
    return episode


def _pad_id(tok: Tokenizer, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    return getattr(tok, "pad_token_id", None) or 0


def sft_batch(records: Sequence[SFTRecord], tok: Tokenizer, *, pad_id: int | None = None, pad_multiple: int = 8) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``loss_mask`` [N, T] (right-padded with ``pad_id``,
    by default the tokenizer's) of SFT records."""
    episodes = [record_episode(tok, r.prompt, r.pieces, i) for i, r in enumerate(records)]
    batch = ep.episode_batch(episodes, pad_id=_pad_id(tok, pad_id), pad_multiple=pad_multiple)
    batch.pop("turn_ids")
    return batch


def preference_batch(records: Sequence[PreferenceRecord], tok: Tokenizer, *, pad_id: int | None = None, pad_multiple: int = 8) -> dict[str, np.ndarray]:
    """Chosen rows ``0..N-1`` then rejected rows ``N..2N-1`` in one right-padded batch (one
    forward pass scores both), ``loss_mask`` on the answer tokens and EOS."""
    rows = [SFTRecord.plain(r.prompt, r.chosen) for r in records] + [SFTRecord.plain(r.prompt, r.rejected) for r in records]
    return sft_batch(rows, tok, pad_id=pad_id, pad_multiple=pad_multiple)


def chat_messages(record: SFTRecord, index: int = 0) -> list[dict[str, str]]:
    """The record as a user turn and an assistant turn, the chat JSON-lines format the
    ``finetune`` command reads (:func:`offside_jax.train.sft_data.read_chat_jsonl`). That format
    trains on whole assistant turns, so a record with untrained target pieces cannot go there."""
    if not all(trained for _, trained in record.pieces):
        raise ValueError(f"record {index} keeps part of its target out of the loss; chat files train on whole answers "
                         "(build it with the mistake trained on, or train through sft_batch)")
    return [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.target}]


def write_chat_jsonl(records: Sequence[SFTRecord], path: str | os.PathLike) -> Path:
    """One ``{"messages": [...], "meta": {...}}`` line per record."""
    path = Path(path)
    lines = [json.dumps({"messages": chat_messages(r, i), "meta": dict(r.meta)}, ensure_ascii=False) for i, r in enumerate(records)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
