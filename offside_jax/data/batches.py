"""OFFSIDE examples -> fixed-shape training batches, for a text model or a Qwen-VL model.

Fine-tuning on a release and unlearning both need the same thing: turn `offside.Example`
records (optionally with their answer replaced, e.g. by a refusal) into right-padded batches
with an answer-only ``loss_mask``, all of one shape so a jitted step compiles once.

- :class:`TextEncoder` tokenizes with `pipeline.tokenize` (chat template, answer mask from
  character offsets; ``<image>`` tags dropped) for a text-only model;
- :class:`VisionEncoder` encodes with `vision_inputs.VisionProcessor` (images decoded,
  patchified, image pads expanded) for a Qwen2.5-VL / Qwen2-VL model; text-only records go
  through the same model without images.

:func:`make_encoder` picks one from the model's transformers config. Both pad every batch to
``max_length`` tokens (and, for images, ``max_patches`` patches per row); :func:`fit_shape`
measures the smallest shape that fits a list of examples. :func:`epoch_rows` gives the rows of
batch ``i`` of a deterministic sequence of shuffled epochs, so a data position is one integer.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from offside_jax.data import pipeline
from offside_jax.data.offside import Example, Message


class BatchDataError(ValueError):
    """An example that cannot become a training row; the message names its file and record."""


def with_answer(example: Example, answer: str) -> Example:
    """``example`` with its final assistant turn (and ``answer``) replaced by ``answer``."""
    if example.kind != "qa" or not example.messages or example.messages[-1].role != "assistant":
        raise BatchDataError(f"{example.source}: record {example.index}: only question-answer records "
                             "ending in an assistant turn can take another answer")
    messages = example.messages[:-1] + (Message("assistant", answer),)
    return dataclasses.replace(example, messages=messages, answer=answer)


def _where(example: Example) -> str:
    return f"{example.source}: record {example.index}"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ExampleEncoder(Protocol):
    """Encodes examples to rows and pads rows into batches of one fixed shape."""

    max_length: int

    def encode(self, example: Example) -> Any: ...

    def row_shape(self, row: Any) -> tuple[int, int]:
        """(tokens, image patches) of an encoded row."""
        ...

    def collate(self, rows: Sequence[Any]) -> dict[str, np.ndarray]: ...

    def empty_row(self) -> Any:
        """A row without tokens (fills a last batch; masked out of every loss)."""
        ...


class TextEncoder:
    """Chat-template tokenization for a text-only model (``<image>`` tags dropped)."""

    def __init__(self, tokenizer: Any, max_length: int = 0):
        self.tokenizer, self.max_length, self.max_patches = tokenizer, max_length, 0
        self.pad_id = pipeline.pad_id_of(tokenizer)

    def encode(self, example: Example) -> dict[str, np.ndarray]:
        row = pipeline.tokenize(example, self.tokenizer)
        if not row["loss_mask"][1:].any():
            raise BatchDataError(f"{_where(example)}: no answer token to train on")
        if self.max_length and len(row["input_ids"]) > self.max_length:
            raise BatchDataError(f"{_where(example)}: {len(row['input_ids'])} tokens exceed max_length="
                                 f"{self.max_length}; raise max_length (0 measures the data)")
        return row

    def row_shape(self, row: dict[str, np.ndarray]) -> tuple[int, int]:
        return len(row["input_ids"]), 0

    def collate(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return pipeline.collate(rows, batch_size=len(rows), buckets=(self.max_length,), pad_id=self.pad_id)

    def empty_row(self) -> dict[str, np.ndarray]:
        return {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.int32), "index": np.int32(-1)}


class VisionEncoder:
    """Qwen-VL inputs through `VisionProcessor` (images resolved against the release root)."""

    def __init__(self, processor: Any, image_root: str | os.PathLike, max_length: int = 0, max_patches: int = 0):
        self.processor, self.image_root = processor, Path(image_root)
        self.max_length, self.max_patches = max_length, max_patches

    def encode(self, example: Example):
        from offside_jax.models.vision_inputs import ImageInputError

        try:
            row = self.processor.encode(example, name=_where(example), image_root=self.image_root, with_answer=True)
        except ImageInputError as e:
            raise BatchDataError(str(e)) from None
        tokens, patches = self.row_shape(row)
        if self.max_length and tokens > self.max_length:
            raise BatchDataError(f"{_where(example)}: {tokens} tokens (image tokens included) exceed "
                                 f"max_length={self.max_length}; raise max_length (0 measures the data)")
        if self.max_patches and patches > self.max_patches:
            raise BatchDataError(f"{_where(example)}: {patches} image patches exceed max_patches={self.max_patches}")
        return row

    def row_shape(self, row: Any) -> tuple[int, int]:
        return len(row.input_ids), int(np.prod(row.image_grid_thw, axis=-1).sum()) if len(row.image_grid_thw) else 0

    def collate(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        # Padding to a multiple of the fixed length *is* padding to it (no row is longer), so
        # every batch has one shape; likewise for the per-row patch count.
        batch = self.processor.collate(rows, padding_side="right", pad_multiple=max(1, self.max_length),
                                       patch_multiple=max(1, self.max_patches))
        batch.setdefault("loss_mask", np.zeros_like(batch["input_ids"]))
        return batch

    def empty_row(self) -> Any:
        from offside_jax.models.vision_inputs import EncodedRecord

        patch_dim = self.processor.config.vision.patch_dim
        return EncodedRecord("empty row", np.zeros(0, np.int32), np.zeros(0, np.int32),
                             np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64))


def is_vision_language(hf_config: Any) -> bool:
    from offside_jax.models.loader import is_vision_language as vision

    return vision(hf_config)


def make_encoder(hf_config: Any, tokenizer: Any, release_root: str | os.PathLike, *, max_length: int = 0,
                 max_pixels: int = 256 * 256) -> ExampleEncoder:
    """The encoder for this model: images for a vision-language family, text otherwise."""
    if not is_vision_language(hf_config):
        return TextEncoder(tokenizer, max_length)
    from offside_jax.models.vision_inputs import VisionProcessor

    processor = VisionProcessor(hf_config, tokenizer, max_pixels=max_pixels, untagged_images="prepend")
    return VisionEncoder(processor, release_root, max_length)


def fit_shape(encoder: ExampleEncoder, examples: Sequence[Example], multiple: int = 8) -> ExampleEncoder:
    """Measure ``examples`` and fix the encoder's batch shape: ``max_length`` (rounded up to
    ``multiple``) and, for images, patches per row, where they are 0; a limit already set that
    a record exceeds is an error naming the record. Returns ``encoder``."""
    from tqdm.auto import tqdm

    has_patches = isinstance(encoder, VisionEncoder)
    limits = encoder.max_length, (encoder.max_patches if has_patches else 0)
    encoder.max_length = 0
    if has_patches:
        encoder.max_patches = 0
    longest: tuple[int, Example | None] = (0, None)
    patches = 0
    try:
        for example in tqdm(examples, desc="measuring rows", unit="record", leave=False, disable=len(examples) < 2000):
            t, p = encoder.row_shape(encoder.encode(example))
            if t > longest[0]:
                longest = (t, example)
            patches = max(patches, p)
    finally:
        encoder.max_length = limits[0]
        if has_patches:
            encoder.max_patches = limits[1]
    if limits[0] and longest[0] > limits[0]:
        raise BatchDataError(f"{_where(longest[1])}: {longest[0]} tokens exceed max_length={limits[0]}; "
                             "raise max_length (0 measures the data)")
    encoder.max_length = limits[0] or _round_up(max(longest[0], 1), multiple)
    if has_patches:
        if limits[1] and patches > limits[1]:
            raise BatchDataError(f"a record has {patches} image patches, over max_patches={limits[1]}")
        encoder.max_patches = limits[1] or patches
    return encoder


def epoch_rows(n: int, batch_size: int, index: int, *, seed: int, stream: int = 0, shuffle: bool = True) -> np.ndarray:
    """Rows of batch ``index`` in an endless sequence of epochs over ``n`` items (drop-last).

    Epoch ``e`` is a permutation seeded by ``(seed, stream, e)``: independent streams (forget,
    retain) with the same seed never share an order.
    """
    if not 0 < batch_size <= n:
        raise BatchDataError(f"a batch of {batch_size} rows needs 1..{n} examples to draw from; lower the batch size")
    per_epoch = n // batch_size
    epoch, within = divmod(index, per_epoch)
    order = np.random.default_rng([seed, stream, epoch]).permutation(n) if shuffle else np.arange(n)
    return order[within * batch_size: (within + 1) * batch_size]


class ExampleBatches:
    """``batch_at(i)``: batch ``i`` of shuffled epochs over ``examples`` (for `IndexedBatches`).

    ``rows`` (a multi-process run: ``TrainStep.process_rows(batch_size)``) picks the rows of
    each global batch this process supplies.
    """

    def __init__(self, examples: Sequence[Example], encoder: ExampleEncoder, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, rows: np.ndarray | None = None):
        self.examples, self.encoder = list(examples), encoder
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rows = None if rows is None else np.asarray(rows)
        epoch_rows(len(self.examples), batch_size, 0, seed=seed)  # validates the sizes now

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rows = epoch_rows(len(self.examples), self.batch_size, index, seed=self.seed, shuffle=self.shuffle)
        if self.rows is not None:
            rows = rows[self.rows]
        return self.encoder.collate([self.encoder.encode(self.examples[r]) for r in rows])


def sequential_batches(examples: Sequence[Example], encoder: ExampleEncoder, batch_size: int):
    """Every example once, in order, ``batch_size`` rows per batch; the last batch is filled
    with empty rows (no tokens, no answer: they add nothing to any loss or importance)."""
    for start in range(0, len(examples), batch_size):
        rows = [encoder.encode(e) for e in examples[start: start + batch_size]]
        rows += [encoder.empty_row() for _ in range(batch_size - len(rows))]
        yield encoder.collate(rows)


MODALITIES = ("auto", "text", "image", "all")


def release_examples(root: str | os.PathLike, setting: str, splits: Sequence[str], modality: str, *,
                     vision: bool) -> list[Example]:
    """The question-answer records of ``setting``/``splits`` of a release, filtered by modality
    (``auto``: text records for a text-only model, every record for a vision-language one)."""
    from offside_jax.data.offside import load_release

    if modality not in MODALITIES:
        raise BatchDataError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    if modality == "auto":
        modality = "all" if vision else "text"
    if modality in ("image", "all") and not vision:
        raise BatchDataError(f"modality={modality!r} keeps image records, which a text-only model cannot see; use 'text'")
    release = load_release(root, [setting], check_images=vision)
    examples = []
    for split in splits:
        if split not in release.splits[setting]:
            raise BatchDataError(f"{root}: no split {split!r} in the {setting} setting; found {sorted(release.splits[setting])}")
        examples += [e for e in release[setting, split]
                     if e.kind == "qa" and (modality == "all" or e.modality == modality)]
    if not examples:
        raise BatchDataError(f"{root}: no {modality} question-answer records in {setting}/{', '.join(splits)}")
    return examples
