"""Chat JSON-lines -> right-padded training batches with answer-only loss masks.

The minimal pipeline the ``finetune`` command needs (the OFFSIDE data pipeline lives in
``offside_jax.data``). Each line is ``{"messages": [{"role": ..., "content": ...}, ...]}``;
every ``assistant`` message is an answer. Text is rendered with the tokenizer's chat template
and tokenized in segments (``prompt`` then ``answer``), so the answer tokens are exactly the
ones generation produces after the same prompt; ``loss_mask`` is 1 on those tokens only.

Batches are a deterministic function of their index (the order of epoch ``e`` is a
permutation seeded by ``seed + e``), which makes the data position a single integer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

class DataError(ValueError):
    """A malformed data file; the message names the file and line."""


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations from a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    conversations = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}:{lineno}: expected an object with a non-empty 'messages' list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{path}:{lineno}: message {i} needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: no assistant message (nothing to learn)")
        conversations.append(messages)
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def encode_conversation(tokenizer: Any, messages: Sequence[dict], where: str = "conversation") -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant-answer tokens) of one conversation."""
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render turn {i} as a continuation of the earlier turns")
        for text, is_answer in ((prompt[len(done):], 0), (full[len(prompt):], 1)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                mask.extend([is_answer] * len(piece))
        done = full
    return ids, mask


def encode_all(tokenizer: Any, conversations: Sequence[Sequence[dict]], max_length: int, origin: str = "data") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` [N, max_length] (int32).

    Longer conversations are truncated at ``max_length``; one left without any answer token
    is an error naming it.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(conversations)
    input_ids = np.full((n, max_length), pad, np.int32)
    attention = np.zeros((n, max_length), np.int32)
    loss_mask = np.zeros((n, max_length), np.int32)
    for row, messages in enumerate(conversations):
        ids, mask = encode_conversation(tokenizer, messages, f"{origin} record {row}")
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            raise DataError(f"{origin} record {row}: no answer token within max_length={max_length}")
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        loss_mask[row, : len(ids)] = mask
    return input_ids, attention, loss_mask


class EpochBatches:
    """``batch_at(i)``: batch ``i`` of an endless sequence of shuffled epochs (drop-last).

    ``rows`` (a multi-process run: ``TrainStep.process_rows(batch_size)``) selects, in order,
    the rows of each global batch that this process supplies; the global batches are the same
    whatever the number of processes.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rows: np.ndarray | None = None,
    ):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        if batch_size > self.n:
            raise DataError(f"batch_size {batch_size} is larger than the {self.n} examples")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.per_epoch = self.n // batch_size
        self.rows = None if rows is None else np.asarray(rows)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        epoch, within = divmod(index, self.per_epoch)
        order = np.random.default_rng(self.seed + epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        rows = order[within * self.batch_size : (within + 1) * self.batch_size]
        if self.rows is not None:
            rows = rows[self.rows]
        return {k: v[rows] for k, v in self.arrays.items()}


def conversation_texts(conversations: Sequence[Sequence[dict]]) -> list[str]:
    return [f"{m['role']}\n{m['content']}" for conv in conversations for m in conv]
