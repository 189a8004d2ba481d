"""Batched, jitted inference over evaluation items: greedy generation and answer log-probs.

A *prompt encoder* turns :class:`~offside_jax.eval.items.EvalItem` s into model batches:

- :class:`VisionPrompts` for Qwen2.5-VL / Qwen2-VL (``models.vision_inputs.VisionProcessor``:
  images decoded, patchified and placed at their ``<image>`` tags);
- :class:`TextPrompts` for Llama-family models (the tokenizer's chat template).

Both give left-padded prompts for ``models.generate.generate`` and right-padded
prompt + answer rows with ``loss_mask`` for likelihoods. Shapes are bucketed so a whole
evaluation compiles a handful of programs: fixed batch rows (the last batch is filled with
copies of its first row, whose outputs are dropped), prompt lengths rounded up to
``pad_multiple``, and items grouped by whether they show images.

Models with LoRA adapters are evaluated as a merged copy: the same graph as the plain model,
so every model of a benchmark reuses the same compiled programs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.eval.items import EvalItem
from offside_jax.models import lora
from offside_jax.models.generate import SamplingConfig, eos_ids_of, generate, left_pad
from offside_jax.train import distributed
from offside_jax.train.losses import token_logprobs


class PromptEncoder(Protocol):
    """Items -> model batches for one model family and tokenizer."""

    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    supports_images: bool

    def prompt_batch(self, items: Sequence[EvalItem], pad_multiple: int) -> dict[str, np.ndarray]: ...

    def encode_answer(self, item: EvalItem, answer: str) -> Any: ...

    def collate_answers(self, rows: Sequence[Any], length: int) -> dict[str, np.ndarray]: ...

    def answer_batch(self, items: Sequence[EvalItem], answers: Sequence[str], pad_to: int | None = None,
                     pad_multiple: int = 16) -> dict[str, np.ndarray]: ...


def _chat(item: EvalItem, answer: str | None) -> list[dict[str, str]]:
    turns = item.messages()
    return turns + [{"role": "assistant", "content": answer}] if answer is not None else turns


class VisionPrompts:
    """Prompts for a Qwen-VL model through its :class:`VisionProcessor`."""

    supports_images = True

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_token_ids = tuple(processor.eos_token_ids)
        self.pad_token_id = int(processor.pad_token_id)

    def _records(self, items, answers=None):
        answers = answers or [None] * len(items)
        return [{"messages": _chat(it, a), "images": list(it.images)} for it, a in zip(items, answers)]

    def prompt_batch(self, items: Sequence[EvalItem], pad_multiple: int = 16) -> dict[str, np.ndarray]:
        return self.processor(self._records(items), names=[it.uid for it in items], pad_multiple=pad_multiple)

    def encode_answer(self, item: EvalItem, answer: str):
        """One prompt + answer row (tokens, answer mask, the image's patches)."""
        record = {"messages": _chat(item, answer), "images": list(item.images)}
        return self.processor.encode(record, name=item.uid, with_answer=True)

    def collate_answers(self, rows: Sequence[Any], length: int) -> dict[str, np.ndarray]:
        """Right-padded rows of exactly ``length`` tokens (rows must fit)."""
        _check_fits(rows, [len(r.input_ids) for r in rows], length)
        return self.processor.collate(rows, padding_side="right", pad_multiple=length)

    def answer_batch(self, items, answers, pad_to=None, pad_multiple=16):
        return _answer_batch(self, items, answers, pad_to, pad_multiple)


class TextPrompts:
    """Prompts for a text-only model through its tokenizer's chat template."""

    supports_images = False

    def __init__(self, tokenizer: Any, extra_eos_ids: Sequence[int] = ()):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template first")
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_ids_of(tokenizer, extra_eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad or 0)

    def _check(self, item: EvalItem) -> None:
        if item.images:
            raise ValueError(f"{item.uid}: a text-only model cannot see the image; evaluate the text modality")

    def prompt_ids(self, item: EvalItem) -> list[int]:
        self._check(item)
        ids = self.tokenizer.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def prompt_batch(self, items: Sequence[EvalItem], pad_multiple: int = 16) -> dict[str, np.ndarray]:
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
        _check_fits(rows, [len(ids) for ids, _ in rows], length)
        ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        attention = np.zeros((len(rows), length), np.int32)
        loss = np.zeros((len(rows), length), np.int32)
        for b, (row_ids, row_mask) in enumerate(rows):
            ids[b, : len(row_ids)], attention[b, : len(row_ids)], loss[b, : len(row_ids)] = row_ids, 1, row_mask
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}

    def answer_batch(self, items, answers, pad_to=None, pad_multiple=16):
        return _answer_batch(self, items, answers, pad_to, pad_multiple)


def row_length(encoder: PromptEncoder, row: Any) -> int:
    """Tokens in a row from ``encoder.encode_answer``."""
    return len(row.input_ids) if hasattr(row, "input_ids") else len(row[0])


def _check_fits(rows: Sequence[Any], lengths: Sequence[int], length: int) -> None:
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
    return encoder.collate_answers(rows, pad_to or -(-longest // pad_multiple) * pad_multiple)


def make_encoder(processor_or_tokenizer: Any) -> PromptEncoder:
    """A prompt encoder for a ``VisionProcessor``, a tokenizer, or an encoder (returned as is)."""
    if hasattr(processor_or_tokenizer, "prompt_batch"):
        return processor_or_tokenizer
    if hasattr(processor_or_tokenizer, "image_processor") and hasattr(processor_or_tokenizer, "collate"):
        return VisionPrompts(processor_or_tokenizer)
    return TextPrompts(processor_or_tokenizer)


def evaluation_model(model: nnx.Module, mesh: Any | None = None) -> nnx.Module:
    """The model to evaluate: a merged copy when it carries LoRA adapters (see module doc),
    its variables placed on ``mesh`` by the rules table when one is given.

    Placing every evaluated model the same way matters beyond memory: a jitted program is
    compiled per input sharding, so models fresh from training (on a mesh) and models
    loaded from disk (on one device) would otherwise each compile their own. A model without
    adapters is placed in place: it is the caller's own, moved rather than copied so that a
    large model is never held twice.
    """
    if lora.has_adapters(model):
        model = lora.merged_copy(model)
    if mesh is None:
        return model
    from offside_jax.train.step import place_model_on_mesh

    return place_model_on_mesh(model, mesh)


def batch_indices(has_image: Sequence[bool], lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices of batches of exactly ``batch_size`` rows.

    Rows with images and without are never mixed (different programs), each group is
    ordered by length (less padding, fewer length buckets), and a short last batch is filled
    with -1 (the caller repeats a real row there and drops its output).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (bool(has_image[i]), lengths[i], i))
    for flag in (False, True):
        group = [i for i in order if bool(has_image[i]) == flag]
        for start in range(0, len(group), batch_size):
            idx = group[start: start + batch_size]
            yield idx + [-1] * (batch_size - len(idx))


def generate_texts(
    model: nnx.Module,
    encoder: PromptEncoder,
    items: Sequence[EvalItem],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    pad_multiple: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to every item, decoded without special tokens, in item order."""
    out: list[str | None] = [None] * len(items)
    mesh = _spanning_mesh(model)
    place = None if mesh is None else functools.partial(distributed.rows_on_mesh, mesh=mesh)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=encoder.eos_token_ids,
                              pad_token_id=encoder.pad_token_id)
    for idx in batch_indices([bool(it.images) for it in items], [len(it.prompt) for it in items], batch_size):
        rows = [items[i if i >= 0 else idx[0]] for i in idx]
        result = generate(model, encoder.prompt_batch(rows, pad_multiple), sampling, place=place)
        for row, (i, n) in enumerate(zip(idx, result.lengths)):
            if i >= 0:
                ids = result.tokens[row, :n].tolist()
                # As OFFSIDE decodes (batch_decode with these flags), unstripped: its MCQ parser
                # and its empty-answer test see the text exactly as generated.
                out[i] = encoder.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if on_batch:
            on_batch(sum(i >= 0 for i in idx))
    return out  # type: ignore[return-value]


def _spanning_mesh(model: nnx.Module) -> Any:
    """The mesh of a model whose arrays span several processes (``None`` in one process):
    every batch then goes in as global arrays, each process handing over its own rows."""
    return distributed.mesh_of(nnx.state(model)) if jax.process_count() > 1 else None


@functools.partial(jax.jit, static_argnums=0)
def _answer_logprobs(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    logp, weights = token_logprobs(model, batch)
    return logp, weights


def answer_nll(
    model: nnx.Module,
    encoder: PromptEncoder,
    items: Sequence[EvalItem],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    pad_multiple: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean negative log-likelihood of ``answers[i]`` as the reply to ``items[i]`` [N].

    Teacher-forced over the answer tokens (its text and end-of-turn marker), as
    ``eval.metrics.mean_nll`` defines it.
    """
    from offside_jax.eval.metrics import mean_nll

    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    graphdef, params = nnx.split(model)
    mesh = _spanning_mesh(model)
    out = np.zeros(len(items))
    lengths = [len(it.prompt) + len(a) for it, a in zip(items, answers)]
    for idx in batch_indices([bool(it.images) for it in items], lengths, batch_size):
        real = [i if i >= 0 else idx[0] for i in idx]
        batch = encoder.answer_batch([items[i] for i in real], [answers[i] for i in real], pad_multiple=pad_multiple)
        placed = {k: jnp.asarray(v) for k, v in batch.items()} if mesh is None else distributed.rows_on_mesh(batch, mesh)
        logp, weights = distributed.to_host(_answer_logprobs(graphdef, params, placed))
        nll = mean_nll(np.asarray(logp), np.asarray(weights) > 0)
        for row, i in enumerate(idx):
            if i >= 0:
                out[i] = nll[row]
        if on_batch:
            on_batch(sum(i >= 0 for i in idx))
    return out
