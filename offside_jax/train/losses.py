"""Training losses: the loss protocol, a registry, and the answer-only NLL.

A loss is a pure function (see ``offside_jax.train.step`` for how the step calls it)::

    loss_fn(model, batch, rng, reference) -> (loss_sum, weight, aux)

- ``model``: the trainable NNX model, merged inside the jitted step (LoRA adapters on);
- ``batch``: one micro-batch, a dict of arrays ``[rows, length]`` (``input_ids``,
  ``attention_mask``, ``loss_mask`` and whatever else the data pipeline adds);
- ``rng``: a PRNG key for this micro-batch;
- ``reference``: the frozen reference model (same base params with adapters off, or a frozen
  params copy) or ``None`` when the step was built without one;
- returns ``loss_sum`` (a float32 scalar summed over whatever the loss weighs, e.g. answer
  tokens), ``weight`` (that count) and ``aux`` (a dict of float scalars, reported averaged
  over micro-batches). The step's loss is ``sum(loss_sum) / sum(weight)`` over micro-batches.

``answer_nll`` is registered as ``"nll"``. Its cross-entropy is *fused*: per chunk of tokens
it computes the logits, the log-sum-exp and (under differentiation) the gradients with
respect to the hidden states and the head weight in the same pass, so neither the
``[B, T, V]`` logits nor their log-softmax are ever stored whole. It is exact (same math,
float32).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

Batch = Mapping[str, jax.Array]
LossOutput = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


class LossFn(Protocol):
    def __call__(self, model: nnx.Module, batch: Batch, rng: jax.Array, reference: nnx.Module | None) -> LossOutput: ...


LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: make a loss selectable by ``name`` from configs."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# -- targets and hidden states ------------------------------------------------------------------


def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Targets and weights aligned with the positions that predict them.

    Position ``t`` predicts ``input_ids[:, t + 1]``, weighted by ``loss_mask[:, t + 1]``
    (answer tokens only; padding and prompt have ``loss_mask == 0``). The last position
    predicts nothing. Shapes stay ``[B, T]`` so chunking needs no odd lengths.
    """
    ids = batch["input_ids"]
    mask = batch["loss_mask"].astype(jnp.float32)
    if "attention_mask" in batch:
        mask = mask * batch["attention_mask"].astype(jnp.float32)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    weights = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return targets.astype(jnp.int32), weights


def final_hidden(model: nnx.Module, batch: Batch) -> jax.Array:
    """Final-normed hidden states [B, T, D] of a right- (or left-) padded batch, through the
    family's ``hidden_states`` (so vision-language batches keep their images)."""
    return model.hidden_states(batch)


def output_head(model: nnx.Module) -> jax.Array | None:
    """The output projection as a [D, V] matrix, or ``None`` when the head is not a plain
    matmul (bias, adapters): callers then use ``model.logits``
    (``offside_jax.models.interface``)."""
    return model.output_head()


# -- fused cross-entropy ------------------------------------------------------------------------


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    n = x.shape[0]
    pad = -n % chunk
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
    return x.reshape((-1, chunk) + x.shape[1:])


def _chunk_logits(h: jax.Array, w: jax.Array, targets: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = jnp.dot(h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return logits, lse, lse - target_logit


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_nll_sum(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int, dtype: Any) -> jax.Array:
    """``sum_n weights[n] * -log softmax(hidden[n] @ head)[targets[n]]`` in float32.

    ``hidden`` [N, D], ``head`` [D, V], ``targets`` [N] int, ``weights`` [N]. Runs over chunks
    of ``chunk`` rows; under differentiation the gradients are formed in the same pass
    (``dlogits = weights * (softmax - onehot)``), so the logits are computed once and only one
    chunk of them exists at a time.
    """
    return _fused_forward(hidden, head, targets, weights, chunk, dtype, with_grads=False)[0]


def _fused_forward(hidden, head, targets, weights, chunk, dtype, with_grads: bool):
    n = hidden.shape[0]
    chunk = max(1, min(chunk, n))
    hs, ts, ws = _chunked(hidden, chunk), _chunked(targets, chunk), _chunked(weights.astype(jnp.float32), chunk)

    def body(carry, xs):
        total, grad_head = carry
        h, t, w = xs
        logits, lse, nll = _chunk_logits(h, head, t, dtype)
        total = total + jnp.sum(w * nll)
        if not with_grads:
            return (total, grad_head), (nll, None)
        dlogits = jnp.exp(logits - lse[:, None]) * w[:, None]
        dlogits = dlogits.at[jnp.arange(t.shape[0]), t].add(-w)
        grad_h = jnp.dot(dlogits.astype(dtype), head.astype(dtype).T, preferred_element_type=jnp.float32)
        grad_head = grad_head + jnp.dot(h.astype(dtype).T, dlogits.astype(dtype), preferred_element_type=jnp.float32)
        return (total, grad_head), (nll, grad_h)

    init_grad = jnp.zeros(head.shape, jnp.float32) if with_grads else None
    (total, grad_head), (nll, grad_h) = jax.lax.scan(body, (jnp.zeros((), jnp.float32), init_grad), (hs, ts, ws))
    nll = nll.reshape(-1)[:n]
    if with_grads:
        grad_h = grad_h.reshape(-1, hidden.shape[-1])[:n]
    return total, nll, grad_h, grad_head


def _fused_fwd(hidden, head, targets, weights, chunk, dtype):
    total, nll, grad_h, grad_head = _fused_forward(hidden, head, targets, weights, chunk, dtype, with_grads=True)
    return total, (nll, grad_h.astype(hidden.dtype), grad_head.astype(head.dtype))


def _fused_bwd(chunk, dtype, residuals, g):
    nll, grad_h, grad_head = residuals
    # targets are integers (no cotangent); the weights' cotangent is the per-token NLL.
    return (grad_h * g).astype(grad_h.dtype), (grad_head * g).astype(grad_head.dtype), None, nll * g


fused_nll_sum.defvjp(_fused_fwd, _fused_bwd)


def nll_sum(model: nnx.Module, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk_tokens: int = 1024) -> jax.Array:
    """Weighted next-token NLL sum over ``hidden`` [B, T, D]; fused when the head allows it.

    ``chunk_tokens <= 0`` (or a head that is not a plain matrix) computes full logits with
    ``model.logits`` instead: same value, more memory.
    """
    head = output_head(model) if chunk_tokens > 0 else None
    flat_t, flat_w = targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)
    if head is None:
        logits = model.logits(hidden).reshape(flat_t.shape[0], -1)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, flat_t[:, None], axis=-1)[:, 0] * flat_w)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    return fused_nll_sum(flat_h, head, flat_t, flat_w, int(chunk_tokens), jnp.dtype(model.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_row_logprob(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int, dtype: Any) -> jax.Array:
    """Per-row ``sum_t weights[b, t] * log softmax(hidden[b, t] @ head)[targets[b, t]]`` [B] in float32.

    ``hidden`` [B, T, D]; the sequence log-probabilities NPO and DPO compare, computed over
    chunks of ``chunk`` tokens like :func:`fused_nll_sum`, so no ``[B, T, V]`` array exists.
    The backward pass recomputes each chunk's logits once and forms the gradients in the same
    pass (a weighted cross-entropy whose token weights are ``-cotangent[b] * weights[b, t]``).
    """
    b, t, d = hidden.shape
    ones = jnp.ones((b * t,), jnp.float32)
    _, nll, _, _ = _fused_forward(hidden.reshape(b * t, d), head, targets.reshape(-1), ones, chunk, dtype, with_grads=False)
    return -jnp.sum(nll.reshape(b, t) * weights.astype(jnp.float32), axis=1)


def _row_fwd(hidden, head, targets, weights, chunk, dtype):
    return fused_row_logprob(hidden, head, targets, weights, chunk, dtype), (hidden, head, targets, weights)


def _row_bwd(chunk, dtype, residuals, g):
    hidden, head, targets, weights = residuals
    b, t, d = hidden.shape
    token_weights = (-g[:, None] * weights.astype(jnp.float32)).reshape(-1)
    _, nll, grad_h, grad_head = _fused_forward(hidden.reshape(b * t, d), head, targets.reshape(-1), token_weights, chunk,
                                               dtype, with_grads=True)
    grad_weights = (-nll.reshape(b, t) * g[:, None]).astype(weights.dtype)
    return grad_h.reshape(b, t, d).astype(hidden.dtype), grad_head.astype(head.dtype), None, grad_weights


fused_row_logprob.defvjp(_row_fwd, _row_bwd)


def hidden_sequence_logprob(model: nnx.Module, hidden: jax.Array, batch: Batch, chunk_tokens: int = 1024) -> jax.Array:
    """Summed answer log-probability per row [B] from final hidden states [B, T, D]; fused when
    the head allows it (``chunk_tokens > 0``), else from full logits. Same value either way."""
    targets, weights = next_token_targets(batch)
    head = output_head(model) if chunk_tokens > 0 else None
    if head is None:
        logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(picked * weights, axis=1)
    return fused_row_logprob(hidden, head, targets, weights, int(chunk_tokens), jnp.dtype(model.dtype))


def logits_token_logprobs(logits: jax.Array, batch: Batch, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """From logits [B, T, V]: log p(next token) [B, T] (zero off the answer) and the answer
    weights [B, T]. ``temperature`` scores under ``softmax(logits / temperature)``, the
    distribution that sampling at that temperature draws from."""
    targets, weights = next_token_targets(batch)
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * (weights > 0), weights


def model_token_logprobs(model: nnx.Module, batch: Batch, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """:func:`logits_token_logprobs` of ``model`` on ``batch`` (materialises the full logits):
    for losses and scores that need per-token log-probs (RL estimators, answer likelihoods)."""
    return logits_token_logprobs(model.logits(final_hidden(model, batch)), batch, temperature)


# -- registered losses ----------------------------------------------------------------------------


def make_answer_nll(chunk_tokens: int = 1024) -> LossFn:
    """The answer-only NLL with a given fused cross-entropy chunk size."""

    def answer_nll(model: nnx.Module, batch: Batch, rng: jax.Array, reference: nnx.Module | None) -> LossOutput:
        """Mean NLL of answer tokens: sums -log p(answer token | everything before it)."""
        del rng, reference
        targets, weights = next_token_targets(batch)
        total = nll_sum(model, final_hidden(model, batch), targets, weights, chunk_tokens)
        return total, jnp.sum(weights), {}

    return answer_nll


answer_nll = register_loss("nll")(make_answer_nll())
