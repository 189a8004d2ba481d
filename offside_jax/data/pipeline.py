"""grain pipelines over OFFSIDE examples: chat-template tokenization, answer-only loss masks,
padding to a few bucket lengths, batching. Deterministic from the seed and checkpointable.

    ds = make_loader(sources["forget"], tokenizer, BatchConfig(batch_size=8, seed=0))
    it = iter(ds)
    batch = next(it)               # dict of numpy arrays, see `collate`
    state = it.get_state()         # a small JSON-able dict: save it beside the model checkpoint
    it = iter(ds); it.set_state(state)   # resumes with exactly the batch that came next

A source is any random-access sequence of `offside.Example` (e.g. ``release["complete",
"forget"]``) or of TFDS records (``tfds_builder.open_sources(...)["forget"]``).

Batch layout (right padding, training): ``input_ids`` [B, T] int32; ``attention_mask`` [B, T]
int32, 1 on real tokens; ``loss_mask`` [B, T] int32, aligned with the *input* token:
``loss_mask[b, t] == 1`` iff ``input_ids[b, t]`` is an answer token, so the loss at position
``t - 1`` (whose logits predict token t) counts; ``index`` [B] int32, the record index of each
row in its release file (-1 for filler rows of a padded last batch). T is the smallest bucket
length that fits the longest row, so a jitted step compiles once per bucket, not per batch.
Image tokens and pixel values are not produced yet: examples keep their image files/bytes.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from offside_jax.data import image_tags
from offside_jax.data.offside import Example

# OFFSIDE's multiple-choice instruction (eval_classi.py, create_few_shot_prompt); the text form
# drops "look at this image" for questions asked without one.
MCQ_INSTRUCTION_IMAGE = ("Please look at this image and answer the question by selecting the correct option "
                         "from the choices below.")
MCQ_INSTRUCTION_TEXT = "Please answer the question by selecting the correct option from the choices below."
MCQ_FORMAT_HINT = "Please respond with only the letter of the correct answer (e.g., 'The answer is A' or just 'A')."


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    batch_size: int = 8
    buckets: tuple[int, ...] = (128, 256, 512)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever (each epoch reshuffled)
    drop_remainder: bool = True  # False: the last batch is filled with empty rows (index -1)
    overflow: str = "error"  # a row longer than the largest bucket: "error" or "truncate"
    image_placeholder: str | None = None  # text that replaces <image>; None drops the tag
    shard_index: int = 0  # this host's share of the data (jax.process_index())
    shard_count: int = 1  # (jax.process_count())
    read_threads: int = 2  # `make_loader`: threads that tokenize ahead (0: none, synchronous)
    prefetch_batches: int = 8  # `make_loader`: batches kept ready

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive lengths, got {self.buckets}")
        if self.overflow not in ("error", "truncate"):
            raise ValueError(f"overflow must be 'error' or 'truncate', got {self.overflow!r}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
        if self.read_threads < 0 or self.prefetch_batches < 0:
            raise ValueError("read_threads and prefetch_batches must be >= 0")


# --------------------------------------------------------------------------------------------
# One example


def mcq_prompt(question: str, options: Sequence[tuple[str, str]], modality: str) -> str:
    """OFFSIDE's multiple-choice query, character for character (``eval_classi.py``:
    ``f"{query}\\n\\n{create_few_shot_prompt(options)}"``): the question, the instruction,
    the answer-format hint, then "Options:" and one "A: text" line per option."""
    instruction = MCQ_INSTRUCTION_IMAGE if modality == "image" else MCQ_INSTRUCTION_TEXT
    options_text = "".join(f"{letter}: {text}\n" for letter, text in options)
    return f"{question}\n\n{instruction}\n\n{MCQ_FORMAT_HINT}\n\nOptions:\n{options_text}\n"


def conversation(example: Example, image_placeholder: str | None = None) -> list[dict[str, str]]:
    """The chat turns to train on, images placed by ms-swift's rule (`image_tags`: missing tags
    in front of the first turn, tags beyond the last image left as text); placed images become
    `image_placeholder` (dropped when None, for a text-only model). Multiple-choice records are
    asked with `mcq_prompt` and answered with the correct letter."""
    if example.kind == "mcq":
        user = mcq_prompt(example.question, example.options, example.modality)
        if example.modality == "image":
            user = f"{image_tags.PLACED * len(example.images)}\n{user}"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": example.correct or ""}]
    else:
        turns = [{"role": m.role, "content": m.content} for m in example.messages]
        # images a text record names are metadata, not inputs: none is placed
        placed = len(example.images) if example.modality == "image" else 0
        turns = image_tags.place_images(turns, placed, image_tags.PLACED)
    return [{"role": t["role"], "content": _place_images(t["content"], image_placeholder)} for t in turns]


def _place_images(text: str, placeholder: str | None) -> str:
    """Placed images become `placeholder`; tags beyond the last image stay literal text."""
    if placeholder is not None:
        return text.replace(image_tags.PLACED, placeholder)
    # Dropping an image also drops the line break that ms-swift records put after its tag.
    return text.replace(image_tags.PLACED + "\n", "").replace(image_tags.PLACED, "").strip()


def tokenize(example: Example, tokenizer: Any, image_placeholder: str | None = None) -> dict[str, np.ndarray]:
    """Token ids of the whole conversation (chat template applied) and its answer-token mask.

    The mask is 1 on every token that starts inside an assistant turn as the template renders
    it (its text and end-of-turn marker, without trailing whitespace the template adds after
    the marker). Found from character offsets, so it is exact even when a token merges across
    the prompt/answer boundary (such a token counts as prompt). Needs a fast tokenizer (offsets).
    """
    turns = conversation(example, image_placeholder)
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    full = render(turns)
    spans = []
    for j, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix = render(turns[:j], add_generation_prompt=True)
        upto = render(turns[: j + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ValueError(f"{example.source}: record {example.index}: the chat template does not render "
                             "the conversation as prompt + answer (prefix property fails); cannot mask answers")
        spans.append((len(prefix), len(upto.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
    ends = np.asarray([e for _, e in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), np.int32)
    for lo, hi in spans:
        mask |= ((starts >= lo) & (starts < hi) & (ends > starts)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": mask, "index": np.int32(example.index)}


# --------------------------------------------------------------------------------------------
# Batches


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (the caller has already truncated or refused longer rows)."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def collate(rows: Sequence[dict[str, np.ndarray]], *, batch_size: int, buckets: Sequence[int],
            pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad tokenized rows into one batch of `batch_size` rows (filler rows are empty)."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows for a batch of {batch_size}")
    t = bucket_length(max(len(r["input_ids"]) for r in rows), buckets)
    input_ids = np.full((batch_size, t), pad_id, np.int32)
    attention = np.zeros((batch_size, t), np.int32)
    loss = np.zeros((batch_size, t), np.int32)
    index = np.full((batch_size,), -1, np.int32)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = row["input_ids"]
        attention[b, :n] = 1
        loss[b, :n] = row["loss_mask"]
        index[b] = row["index"]
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss, "index": index}


def pad_id_of(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def as_example(element: Any) -> Example:
    """An `Example` from a source element (an Example, or a TFDS record dict)."""
    if isinstance(element, Example):
        return element
    if isinstance(element, dict) and "message_roles" in element:
        from offside_jax.data.tfds_builder import decode_record  # lazy: tfds is slow to import

        return decode_record(element)
    raise TypeError(f"cannot read a {type(element).__name__} as an OFFSIDE example")


class _Tokenize:
    """The per-element transform (a class, not a closure, so worker processes can pickle it)."""

    def __init__(self, tokenizer: Any, config: BatchConfig):
        self.tokenizer, self.config = tokenizer, config

    def __call__(self, element: Any) -> dict[str, np.ndarray]:
        example = as_example(element)
        row = tokenize(example, self.tokenizer, self.config.image_placeholder)
        limit = self.config.buckets[-1]
        if len(row["input_ids"]) > limit:
            if self.config.overflow == "error":
                raise ValueError(f"{example.source}: record {example.index}: {len(row['input_ids'])} tokens exceed "
                                 f"the largest bucket ({limit}); add a longer bucket or set overflow='truncate'")
            row = {"input_ids": row["input_ids"][:limit], "loss_mask": row["loss_mask"][:limit], "index": row["index"]}
        return row


def make_dataset(source: Sequence[Any], tokenizer: Any, config: BatchConfig = BatchConfig(),
                 transform: Callable[[Any], Any] | None = None) -> grain.MapDataset:
    """A grain MapDataset of batches: shard -> shuffle(seed) -> repeat -> tokenize -> batch.

    Random access all the way, so `iter(ds)` gives an iterator whose `get_state()` /
    `set_state()` resume exactly. `transform` (optional) maps each source element before
    tokenization (e.g. to rewrite forget answers into refusals).
    """
    ds = grain.MapDataset.source(source)
    if config.shard_count > 1:
        ds = ds[config.shard_index::config.shard_count]
    if len(ds) == 0:
        raise ValueError("the source has no examples (for this shard)")
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.map(_Tokenize(tokenizer, config))
    return ds.batch(config.batch_size, drop_remainder=config.drop_remainder,
                    batch_fn=functools.partial(collate, batch_size=config.batch_size, buckets=config.buckets,
                                               pad_id=pad_id_of(tokenizer)))


def make_loader(source: Sequence[Any], tokenizer: Any, config: BatchConfig = BatchConfig(),
                transform: Callable[[Any], Any] | None = None) -> grain.IterDataset:
    """`make_dataset` read ahead by `config.read_threads` threads, `config.prefetch_batches`
    batches deep: what a training loop iterates. Its iterators save and restore state exactly
    like `make_dataset`'s (read-ahead work is not counted as consumed).

    (Iterating a bare MapDataset also reads ahead, with grain's defaults of 16 threads and 500
    elements, far more than a small model needs; this makes the amount explicit.)
    """
    ds = make_dataset(source, tokenizer, config, transform)
    options = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_batches)
    return ds.to_iter_dataset(options)
