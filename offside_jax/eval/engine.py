"""Batched, jitted inference over evaluation items: greedy generation and answer log-probs.

Items become model batches through the model's encoder (``offside_jax.data.batches``:
left-padded prompts for ``models.generate.generate``, right-padded prompt + answer rows with
``loss_mask`` for likelihoods). Shapes are bucketed so a whole evaluation compiles a handful of
programs: fixed batch rows (the last batch is filled with copies of its first row, whose
outputs are dropped), prompt lengths rounded up to ``pad_multiple``, and items grouped by
whether they show images.

Models with LoRA adapters are evaluated as a merged copy: the same graph as the plain model,
so every model of a benchmark reuses the same compiled programs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.data.batches import ExampleEncoder
from offside_jax.eval.items import EvalItem
from offside_jax.models import lora
from offside_jax.models.generate import SamplingConfig, generate, rewrapped, underlying_model
from offside_jax.train import distributed
from offside_jax.train.losses import model_token_logprobs


def evaluation_model(model: nnx.Module, mesh: Any | None = None) -> nnx.Module:
    """The model to evaluate: a merged copy when it carries LoRA adapters (see module doc),
    its variables placed on ``mesh`` by the rules table when one is given.

    Placing every evaluated model the same way matters beyond memory: a jitted program is
    compiled per input sharding, so models fresh from training (on a mesh) and models
    loaded from disk (on one device) would otherwise each compile their own. A model without
    adapters is placed in place: it is the caller's own, moved rather than copied so that a
    large model is never held twice.
    """
    if hasattr(model, "sampler_setup"):  # a generation wrapper (GUARD): place its weights, keep the wrapper
        return rewrapped(model, evaluation_model(underlying_model(model), mesh))
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
    encoder: ExampleEncoder,
    items: Sequence[EvalItem],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    pad_multiple: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to every item, decoded without special tokens, in item order."""
    out: list[str | None] = [None] * len(items)
    mesh = _spanning_mesh(underlying_model(model))
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
def _answer_token_logprobs(graphdef, params, batch):
    return model_token_logprobs(nnx.merge(graphdef, params), batch)


def answer_logprobs(model: nnx.Module, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position answer log-probs and answer weights ``[B, T]`` of one right-padded batch
    with ``loss_mask`` (host arrays): teacher-forced, float32, one compiled program per batch
    shape. The one answer likelihood behind :func:`answer_nll` and ``unlearn.probe``."""
    model = underlying_model(model)  # a generation wrapper changes no likelihood
    graphdef, params = nnx.split(model)
    mesh = _spanning_mesh(model)
    if mesh is None:
        logp, weights = _answer_token_logprobs(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
        return np.asarray(logp), np.asarray(weights)
    # Several processes: each hands over its rows, every one gets all of them back.
    return distributed.to_host(_answer_token_logprobs(graphdef, params, distributed.rows_on_mesh(batch, mesh)))


def answer_nll(
    model: nnx.Module,
    encoder: ExampleEncoder,
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
    out = np.zeros(len(items))
    lengths = [len(it.prompt) + len(a) for it, a in zip(items, answers)]
    for idx in batch_indices([bool(it.images) for it in items], lengths, batch_size):
        real = [i if i >= 0 else idx[0] for i in idx]
        batch = encoder.answer_batch([items[i] for i in real], [answers[i] for i in real], pad_multiple=pad_multiple)
        logp, weights = answer_logprobs(model, batch)
        nll = mean_nll(logp, weights > 0)
        for row, i in enumerate(idx):
            if i >= 0:
                out[i] = nll[row]
        if on_batch:
            on_batch(sum(i >= 0 for i in idx))
    return out
