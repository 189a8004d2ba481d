"""Log-probabilities of preference pairs under a model, and the DPO loss SCL trains with.

A preference batch (:func:`offside_jax.correct.records.preference_batch`) holds the ``N``
chosen answers in rows ``0..N-1`` and the ``N`` rejected ones in rows ``N..2N-1``, so one
forward pass scores both. Sequence log-probabilities are the answer tokens' summed
log-probabilities through :func:`offside_jax.train.losses.hidden_sequence_logprob` (fused per-row
cross-entropy: no ``[B, T, V]`` array).

SCL's DPO (SWIFT ``rlhf dpo``, β = 0.1, ``sft_beta`` = 0.1):
``-log sigmoid(β [(log π_w - log π_ref,w) - (log π_l - log π_ref,l)]) + sft_beta · NLL(y_w)``,
the NLL taken per token of the chosen answer (the meaning of ``sft_beta`` is inferred: an SFT
term on the chosen answer, as TRL's ``rpo_alpha``). ``dpo_weight`` 0 drops the preference term and
leaves SFT on the chosen answers: the control that separates what the preference teaches from
what imitating the chosen answers (their format included) teaches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from offside_jax.train import losses


def pair_logprobs(model: nnx.Module, batch: losses.Batch, chunk_tokens: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Summed answer log-probabilities ``(chosen [N], rejected [N])`` of a preference batch."""
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"a preference batch has chosen rows then rejected rows: an even count, got {rows}")
    logp = losses.hidden_sequence_logprob(model, losses.final_hidden(model, batch), batch, chunk_tokens)
    return logp[: rows // 2], logp[rows // 2:]


def pair_logratios(model: nnx.Module, batch: losses.Batch, reference: nnx.Module | None = None,
                   chunk_tokens: int = 1024) -> dict[str, jax.Array]:
    """Per pair: ``chosen_logp``, ``rejected_logp``, ``logp_diff = chosen - rejected``; with a
    reference also its log-probs (gradient stopped) and the DPO ``margin``
    ``(chosen - ref_chosen) - (rejected - ref_rejected)``."""
    chosen, rejected = pair_logprobs(model, batch, chunk_tokens)
    out = {"chosen_logp": chosen, "rejected_logp": rejected, "logp_diff": chosen - rejected}
    if reference is not None:
        ref_chosen, ref_rejected = jax.tree.map(jax.lax.stop_gradient, pair_logprobs(reference, batch, chunk_tokens))
        out.update(ref_chosen_logp=ref_chosen, ref_rejected_logp=ref_rejected,
                   margin=(chosen - ref_chosen) - (rejected - ref_rejected))
    return out


def make_scl_dpo_loss(beta: float = 0.1, sft_beta: float = 0.1, chunk_tokens: int = 1024,
                      dpo_weight: float = 1.0) -> losses.LossFn:
    """The DPO loss of SCL as a training loss (``(sum over pairs, pairs, aux)``); it needs the
    frozen reference (adapters off under LoRA). ``dpo_weight`` scales the preference term
    (0: SFT on the chosen answers only; the reference still gives the margin in ``aux``, so the
    control's log shows whether imitation alone moves the preference)."""

    def scl_dpo(model: nnx.Module, batch: losses.Batch, rng: jax.Array, reference: nnx.Module | None) -> losses.LossOutput:
        del rng
        if reference is None:
            raise ValueError("the SCL DPO loss needs a reference model")
        stats = pair_logratios(model, batch, reference, chunk_tokens)
        _, weights = losses.next_token_targets(batch)
        chosen_tokens = jnp.maximum(jnp.sum(weights, axis=1)[: weights.shape[0] // 2], 1.0)
        dpo = -jax.nn.log_sigmoid(beta * stats["margin"])
        nll = -stats["chosen_logp"] / chosen_tokens
        pairs = jnp.asarray(dpo.shape[0], jnp.float32)
        aux = {"dpo": jnp.mean(dpo), "chosen_nll": jnp.mean(nll), "margin": jnp.mean(stats["margin"]),
               "pair_accuracy": jnp.mean((stats["margin"] > 0).astype(jnp.float32))}
        return jnp.sum(dpo_weight * dpo + sft_beta * nll), pairs, aux

    return scl_dpo
