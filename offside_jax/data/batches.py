"""Model inputs for a text model or a Qwen-VL model: one encoder family for training and evaluation.

Fine-tuning on a release and unlearning turn `offside.Example` records (optionally with their
answer replaced, e.g. by a refusal) into right-padded batches with an answer-only
``loss_mask``, all of one shape so a jitted step compiles once; evaluation turns
`eval.items.EvalItem` s into left-padded prompts for generation and right-padded prompt +
answer rows for likelihoods. One encoder per model does both:

- :class:`TextEncoder`, a text-only model through its tokenizer's chat template (training rows
  via `pipeline.tokenize`: answer mask from character offsets, ``<image>`` tags dropped);
- :class:`VisionEncoder`, a Qwen2.5-VL / Qwen2-VL model through `vision_inputs.VisionProcessor`
  (images decoded, patchified, image pads expanded); text-only records go through the same
  model without images.

:func:`make_encoder` picks one for a tokenizer (and the model's transformers config) or a
``VisionProcessor``. Training batches are padded to ``max_length`` tokens (and, for images,
``max_patches`` patches per row); :func:`fit_shape` measures the smallest shape that fits a list
of examples. :func:`epoch_rows` gives the rows of batch ``i`` of a deterministic sequence of
shuffled epochs, so a data position is one integer.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from offside_jax.data import pipeline
from offside_jax.data.offside import Example, Message

if TYPE_CHECKING:
    from offside_jax.eval.items import EvalItem


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
    """A model's input encoder: training rows of examples padded into batches of one fixed
    shape, and prompts / prompt + answer rows of evaluation items."""

    tokenizer: Any
    max_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    supports_images: bool

    def encode(self, example: Example) -> Any: ...

    def row_shape(self, row: Any) -> tuple[int, int]:
        """(tokens, image patches) of an encoded row."""
        ...

    def collate(self, rows: Sequence[Any]) -> dict[str, np.ndarray]: ...

    def empty_row(self) -> Any:
        """A row without tokens (fills a last batch; masked out of every loss)."""
        ...

    def prompt_batch(self, items: Sequence[EvalItem], pad_multiple: int) -> dict[str, np.ndarray]: ...

    def encode_answer(self, item: EvalItem, answer: str) -> Any: ...

    def collate_answers(self, rows: Sequence[Any], length: int) -> dict[str, np.ndarray]: ...

    def answer_batch(self, items: Sequence[EvalItem], answers: Sequence[str], pad_to: int | None = None,
                     pad_multiple: int = 16) -> dict[str, np.ndarray]: ...


def _chat(item: EvalItem, answer: str | None) -> list[dict[str, str]]:
    turns = item.messages()
    return turns + [{"role": "assistant", "content": answer}] if answer is not None else turns


class TextEncoder:
    """A text-only model's inputs through its tokenizer's chat template (``<image>`` tags dropped
    from training examples; evaluation items with images refused)."""

    supports_images = False

    def __init__(self, tokenizer: Any, max_length: int = 0, extra_eos_ids: Sequence[int] = ()):
        from offside_jax.models.generate import eos_ids_of

        if getattr(tokenizer, "chat_template", None) is None:
            raise BatchDataError("the tokenizer has no chat template; set tokenizer.chat_template first")
        self.tokenizer, self.max_length, self.max_patches = tokenizer, max_length, 0
        self.pad_token_id = pipeline.pad_id_of(tokenizer)
        self.eos_token_ids = eos_ids_of(tokenizer, extra_eos_ids)

    # -- training rows

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
        return pipeline.collate(rows, batch_size=len(rows), buckets=(self.max_length,), pad_id=self.pad_token_id)

    def empty_row(self) -> dict[str, np.ndarray]:
        return {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.int32), "index": np.int32(-1)}

    # -- evaluation items

    def _check(self, item: EvalItem) -> None:
        if item.images:
            raise ValueError(f"{item.uid}: a text-only model cannot see the image; evaluate the text modality")

    def prompt_ids(self, item: EvalItem) -> list[int]:
        self._check(item)
        ids = self.tokenizer.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def prompt_batch(self, items: Sequence[EvalItem], pad_multiple: int = 16) -> dict[str, np.ndarray]:
        from offside_jax.models.generate import left_pad

        return left_pad([self.prompt_ids(it) for it in items], self.pad_token_id, pad_multiple)

    def encode_answer(self, item: EvalItem, answer: str) -> tuple[list[int], list[int]]:
        """One prompt + answer row: token ids and the answer mask.

        The answer is what the chat template adds after the generation prompt, up to and
        including its end-of-turn marker (whitespace after the marker belongs to no turn), as
        ``VisionProcessor`` masks it.
        """
        self._check(item)
        render = self.tokenizer.apply_chat_template
        prompt = render(item.messages(), tokenize=False, add_generation_prompt=True)
        full = render(_chat(item, answer), tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"{item.uid}: the chat template does not render the conversation as prompt + answer")
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]
        return list(prompt_ids) + list(answer_ids), [0] * len(prompt_ids) + [1] * len(answer_ids)

    def collate_answers(self, rows: Sequence[tuple[list[int], list[int]]], length: int) -> dict[str, np.ndarray]:
        """Right-padded rows of exactly ``length`` tokens (rows must fit)."""
        _check_fits([len(ids) for ids, _ in rows], length)
        ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        attention = np.zeros((len(rows), length), np.int32)
        loss = np.zeros((len(rows), length), np.int32)
        for b, (row_ids, row_mask) in enumerate(rows):
            ids[b, : len(row_ids)], attention[b, : len(row_ids)], loss[b, : len(row_ids)] = row_ids, 1, row_mask
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}

    def answer_batch(self, items, answers, pad_to=None, pad_multiple=16):
        return _answer_batch(self, items, answers, pad_to, pad_multiple)


class VisionEncoder:
    """A Qwen-VL model's inputs through its `VisionProcessor` (training images resolved against
    ``image_root``, the release root)."""

    supports_images = True

    def __init__(self, processor: Any, image_root: str | os.PathLike | None = None, max_length: int = 0,
                 max_patches: int = 0):
        self.processor, self.image_root = processor, None if image_root is None else Path(image_root)
        self.max_length, self.max_patches = max_length, max_patches
        self.tokenizer = processor.tokenizer
        self.eos_token_ids = tuple(processor.eos_token_ids)
        self.pad_token_id = int(processor.pad_token_id)

    # -- training rows

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

    # -- evaluation items

    def prompt_batch(self, items: Sequence[EvalItem], pad_multiple: int = 16) -> dict[str, np.ndarray]:
        records = [{"messages": _chat(it, None), "images": list(it.images)} for it in items]
        return self.processor(records, names=[it.uid for it in items], pad_multiple=pad_multiple)

    def encode_answer(self, item: EvalItem, answer: str):
        """One prompt + answer row (tokens, answer mask, the image's patches)."""
        record = {"messages": _chat(item, answer), "images": list(item.images)}
        return self.processor.encode(record, name=item.uid, with_answer=True)

    def collate_answers(self, rows: Sequence[Any], length: int) -> dict[str, np.ndarray]:
        """Right-padded rows of exactly ``length`` tokens (rows must fit)."""
        _check_fits([len(r.input_ids) for r in rows], length)
        return self.processor.collate(rows, padding_side="right", pad_multiple=length)

    def answer_batch(self, items, answers, pad_to=None, pad_multiple=16):
        return _answer_batch(self, items, answers, pad_to, pad_multiple)


def row_length(encoder: ExampleEncoder, row: Any) -> int:
    """Tokens in a row from ``encoder.encode_answer``."""
    return len(row.input_ids) if hasattr(row, "input_ids") else len(row[0])


def _check_fits(lengths: Sequence[int], length: int) -> None:
    longest = max(lengths)
    if longest > length:
        raise ValueError(f"a row of {longest} tokens does not fit the fixed length {length}")


def _answer_batch(encoder, items, answers, pad_to, pad_multiple) -> dict[str, np.ndarray]:
    """Right-padded prompt + answer rows with ``loss_mask``; length ``pad_to`` or the longest
    row rounded up to ``pad_multiple``."""
    rows = [encoder.encode_answer(it, a) for it, a in zip(items, answers)]
    longest = max(row_length(encoder, r) for r in rows)
    if pad_to is not None and longest > pad_to:
        raise ValueError(f"{items[0].uid}...: a row of {longest} tokens exceeds the fixed length {pad_to}")
    return encoder.collate_answers(rows, pad_to or _round_up(longest, pad_multiple))


def preference_answer_batch(encoder: ExampleEncoder, items: Sequence[Any], chosen: Sequence[str], rejected: Sequence[str],
                            pad_to: int | None = None, pad_multiple: int = 16) -> dict[str, np.ndarray]:
    """A DPO batch through the encoder: chosen rows ``0..N-1`` then rejected rows ``N..2N-1``
    (the layout of :func:`offside_jax.correct.preference.pair_logprobs`), each the item's
    prompt (its images included: a vision encoder adds ``pixel_values`` / ``image_grid_thw``
    and expands the image pads) followed by the answer, ``loss_mask`` on the answer."""
    if not len(items) == len(chosen) == len(rejected) or not items:
        raise ValueError(f"{len(items)} items, {len(chosen)} chosen and {len(rejected)} rejected answers")
    return _answer_batch(encoder, list(items) * 2, list(chosen) + list(rejected), pad_to, pad_multiple)


def is_vision_language(hf_config: Any) -> bool:
    from offside_jax.models.loader import is_vision_language as vision

    return vision(hf_config)


def make_encoder(tokenizer_or_processor: Any, hf_config: Any = None, *, image_root: str | os.PathLike | None = None,
                 max_length: int = 0, max_pixels: int = 256 * 256) -> ExampleEncoder:
    """The encoder for a model's inputs:

    - an encoder is returned as is;
    - a ``VisionProcessor`` gives a :class:`VisionEncoder` around it;
    - a tokenizer, with ``hf_config`` of a vision-language family, a :class:`VisionEncoder` with a
      new processor (images up to ``max_pixels``; images without an ``<image>`` tag go first);
    - any other tokenizer a :class:`TextEncoder`.

    ``image_root`` resolves training examples' image paths; ``max_length`` fixes the training
    batch length (0: measure it with :func:`fit_shape`).
    """
    if hasattr(tokenizer_or_processor, "prompt_batch"):
        return tokenizer_or_processor
    if hasattr(tokenizer_or_processor, "image_processor") and hasattr(tokenizer_or_processor, "collate"):
        return VisionEncoder(tokenizer_or_processor, image_root, max_length)
    if hf_config is None or not is_vision_language(hf_config):
        return TextEncoder(tokenizer_or_processor, max_length)
    from offside_jax.models.vision_inputs import VisionProcessor

    processor = VisionProcessor(hf_config, tokenizer_or_processor, max_pixels=max_pixels, untagged_images="prepend")
    return VisionEncoder(processor, image_root, max_length)


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
