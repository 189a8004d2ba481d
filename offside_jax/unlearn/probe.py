"""Answer probability of records under a model: the quick before/after measure of unlearning.

``answer_probabilities(model, examples, encoder)`` returns, per record, ``exp(-mean NLL)`` of
its answer tokens given the question (open-unlearning's "probability";
``offside_jax.eval.metrics.answer_probability``), teacher-forced, in float32, from the same
answer log-probs as the evaluation suite (``offside_jax.eval.engine.answer_logprobs``). The full
evaluation suite (generation, ROUGE, MCQ, attacks) lives in ``offside_jax.eval``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from offside_jax.data.batches import ExampleEncoder, sequential_batches
from offside_jax.data.offside import Example
from offside_jax.eval import metrics
from offside_jax.eval.engine import answer_logprobs


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
