"""The math of the unlearning objectives, over logits and answer masks (no models, no data files).

Every function here takes float32 logits ``[B, T, V]`` and a batch dict with ``input_ids``,
``loss_mask`` (1 iff ``input_ids[b, t]`` is an answer token) and optionally
``attention_mask``. Position ``t`` predicts token ``t + 1``. Definitions follow
``locuslab/open-unlearning`` (and OFFSIDE where it differs, as an option).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from offside_jax.train.losses import logits_token_logprobs, next_token_targets

Batch = Mapping[str, jax.Array]


def position_weights(batch: Batch) -> jax.Array:
    """1 on positions that predict a real next token (any token, not only answers): for
    objectives defined over all positions (KL to the reference, RMU)."""
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    mask = jnp.ones(ids.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.concatenate([mask[:, :-1] * mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)


def batch_mean_nll(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean answer-token NLL over the whole batch (token-weighted)."""
    logp, weights = logits_token_logprobs(logits, batch)
    return -jnp.sum(logp * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def logits_sequence_logprob(logits: jax.Array, batch: Batch) -> jax.Array:
    """Summed answer log-probability per row [B]."""
    logp, weights = logits_token_logprobs(logits, batch)
    return jnp.sum(logp * weights, axis=1)


def answer_lengths(batch: Batch) -> jax.Array:
    return jnp.sum(next_token_targets(batch)[1], axis=1)


def kl_to_reference(logits: jax.Array, ref_logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``KL(ref || cur)`` per position, averaged over positions with weight > 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def batchmean_kl(logits: jax.Array, ref_logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``KL(ref || cur)`` summed over positions with weight > 0, divided by the rows: PyTorch's
    ``kl_div(log_softmax(cur), softmax(ref), reduction="batchmean")`` (OFFSIDE's KL_min.py)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return jnp.sum(kl * weights) / logits.shape[0]


def npo_loss(logp_seq: jax.Array, ref_logp_seq: jax.Array, beta: float) -> jax.Array:
    """NPO: ``mean_b -(2/beta) log sigmoid(beta * (logp_ref - logp))`` over rows.

    With summed log-probs this is open-unlearning's NPO; pass minus the mean NLL per batch
    for OFFSIDE's variant (see :func:`offside_npo_loss`).
    """
    return jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * (ref_logp_seq - logp_seq)))


def offside_npo_loss(nll_mean: jax.Array, ref_nll_mean: jax.Array, beta: float) -> jax.Array:
    """OFFSIDE's NPO on batch-mean NLLs: ``-(2/beta) log sigmoid(beta * (NLL - NLL_ref))``."""
    return -(2.0 / beta) * jax.nn.log_sigmoid(beta * (nll_mean - ref_nll_mean))


def simnpo_loss(logp_seq: jax.Array, lengths: jax.Array, beta: float, delta: float) -> jax.Array:
    """SimNPO: ``mean_b -(2/beta) log sigmoid(beta * (NLL_sum / |y| - delta))``.

    Reference-free: the length-normalised NLL replaces NPO's log-ratio; minimising it raises
    the forget answers' NLL.
    """
    normalised_nll = -logp_seq / jnp.maximum(lengths, 1.0)
    return jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * (normalised_nll - delta)))


def dpo_loss(
    logp_win: jax.Array, ref_logp_win: jax.Array, logp_lose: jax.Array, ref_logp_lose: jax.Array, beta: float
) -> jax.Array:
    """DPO: ``mean_b -(2/beta) log sigmoid(beta * ((w - w_ref) - (l - l_ref)))`` (open-unlearning scale)."""
    margin = (logp_win - ref_logp_win) - (logp_lose - ref_logp_lose)
    return jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * margin))


def wga_loss(logits: jax.Array, batch: Batch, beta: float) -> jax.Array:
    """WGA: ``mean over answer tokens of -(p^beta (detached) * CE)`` = weighted gradient ascent."""
    logp, weights = logits_token_logprobs(logits, batch)
    weight = jax.lax.stop_gradient(jnp.exp(logp) ** beta)
    ce = -logp
    return jnp.sum(-(weight * ce) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def undial_loss(logits: jax.Array, ref_logits: jax.Array, batch: Batch, beta: float) -> jax.Array:
    """UNDIAL: CE from ``softmax(ref_logits - beta * onehot(target))`` to the student, on answer tokens."""
    targets, weights = next_token_targets(batch)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    teacher = jax.nn.softmax(ref_logits.astype(jnp.float32) - beta * onehot, axis=-1)
    teacher = jax.lax.stop_gradient(teacher)
    ce = -jnp.sum(teacher * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def masked_mse(hidden: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over weighted positions of the mean squared error across features (RMU's MSE)."""
    per_position = jnp.mean((hidden.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=-1)
    return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)
