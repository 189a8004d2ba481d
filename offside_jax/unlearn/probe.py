"""Answer probability of records under a model: the quick before/after measure of unlearning.

``answer_probabilities(model, examples, encoder)`` returns, per record, ``exp(-mean NLL)`` of
its answer tokens given the question (open-unlearning's "probability";
``offside_jax.eval.metrics.answer_probability``), teacher-forced, in float32. The full
evaluation suite (generation, ROUGE, MCQ, attacks) lives in ``offside_jax.eval``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from offside_jax.data.batches import ExampleEncoder, sequential_batches
from offside_jax.data.offside import Example
from offside_jax.eval import metrics
from offside_jax.unlearn import objectives as obj


@functools.partial(jax.jit, static_argnums=(0,))
def _token_logprobs(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    logits = model.logits(model.hidden_states(batch))
    return obj.token_logprobs(logits, batch)


def answer_logprobs(model: nnx.Module, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position answer log-probs and answer weights ``[B, T]`` of one batch (host arrays)."""
    graphdef, state = nnx.split(model)
    if jax.process_count() == 1:
        logp, weights = _token_logprobs(graphdef, state, {k: jax.numpy.asarray(v) for k, v in batch.items()})
        return np.asarray(logp), np.asarray(weights)
    # Several processes: the model spans them; each hands over its rows, every one gets all back.
    from offside_jax.train import distributed, mesh as mesh_lib

    mesh = jax.tree.leaves(state)[0].sharding.mesh
    placed = distributed.global_batch(batch, mesh_lib.batch_sharding(mesh, micro_batched=False))
    return distributed.to_host(_token_logprobs(graphdef, state, placed))


def answer_probabilities(model: nnx.Module, examples: Sequence[Example], encoder: ExampleEncoder, *,
                         batch_size: int = 8, description: str = "answer probability") -> np.ndarray:
    """``exp(-mean answer NLL)`` of each example, in order."""
    out = []
    total = -(-len(examples) // batch_size)
    for batch in tqdm(sequential_batches(examples, encoder, batch_size), total=total, desc=description, leave=False):
        logp, weights = answer_logprobs(model, batch)
        real = weights.sum(1) > 0  # filler rows of the last batch have no answer
        out.append(metrics.answer_probability(logp[real], weights[real]))
    return np.concatenate(out) if out else np.zeros(0)


def sequence_logprobs(model: nnx.Module, examples: Sequence[Example], encoder: ExampleEncoder, *,
                      batch_size: int = 8) -> np.ndarray:
    """Summed answer log-probability of each example, in order (cached reference log-probs)."""
    out = []
    for batch in sequential_batches(examples, encoder, batch_size):
        logp, weights = answer_logprobs(model, batch)
        out.append((logp * weights).sum(1)[weights.sum(1) > 0])
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
