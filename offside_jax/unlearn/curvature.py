"""Curvature editing: keep only the high-curvature K-FAC eigen-directions of chosen matrices.

"From Memorization to Reasoning in the Spectrum of Loss Curvature" (arXiv 2510.24256): averaged
over data, memorised points are sharp in directions of their own, so the *flat* directions of
the loss carry memorisation. For each chosen linear layer (kernel ``W`` [in, out]) the Fisher
is approximated by K-FAC, ``A (x) G`` with ``A = E[a a^T]`` over the layer's inputs and
``G = E[g g^T]`` over the gradients of the loss w.r.t. its outputs. With ``A = U_A diag(mu) U_A^T``
and ``G = U_G diag(lam) U_G^T`` the curvature of the pair ``(i, j)`` is ``mu_i lam_j``; the edit
keeps the pairs of largest curvature until they hold a fraction ``rho`` of the total
``(sum mu)(sum lam)`` and projects ``W`` onto them (in general not a low-rank truncation).

Follows the official code (``data/collect_kfac_multilayer.py``, ``kfac_treatment_pairwise.py``,
``evaluations/eval_mem_kfac.py``); choices where code and paper are silent are marked *ours*.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from offside_jax.train.losses import nll_sum
from offside_jax.unlearn import block_linears as bl
from offside_jax.unlearn.objectives import position_weights

LABELS = ("sampled", "gold")
SKIP_RHO = 0.9999  # the official evaluation leaves a matrix alone at rho >= 0.9999
# OLMo-2-7B (32 layers) edits layers 23-25; other depths take the same relative places (ours).
_OLMO_LAYERS, _OLMO_DEPTH = (23, 24, 25), 32


@dataclasses.dataclass(frozen=True)
class CurvatureConfig:
    """Curvature-edit settings; defaults are the paper's OLMo-2-7B language-model edit.

    ``layers``: decoder layers to edit (``None``: :func:`default_layers` of the model's depth);
    ``matrices``: linear layers inside each block (``mlp.down_proj`` and attention matrices
    work too); ``rho``: fraction of total curvature kept; ``labels``: ``"sampled"`` draws each
    next token from the model (the true Fisher, as the paper) or ``"gold"`` uses the data's
    next token (the code's default); ``sample_chunk``: tokens whose logits exist at once while
    sampling.
    """

    layers: tuple[int, ...] | None = None
    matrices: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    rho: float = 0.6
    labels: str = "sampled"
    seed: int = 0
    sample_chunk: int = 512

    def __post_init__(self):
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if not self.matrices:
            raise ValueError("curvature editing needs at least one matrix")
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; use None for the default layers")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's OLMo-2-7B layers (23, 24, 25 of 32) moved to the same relative depth (ours)."""
    return tuple(sorted({min(num_layers - 1, round(layer * num_layers / _OLMO_DEPTH)) for layer in _OLMO_LAYERS}))


def edit_targets(config: CurvatureConfig, num_layers: int) -> tuple[bl.Target, ...]:
    layers = default_layers(num_layers) if config.layers is None else config.layers
    return tuple((layer, matrix) for layer in layers for matrix in config.matrices)


# -- K-FAC statistics ---------------------------------------------------------------------------


class KfacFactors(NamedTuple):
    """Uncentred covariances of one linear layer over ``tokens`` positions (float32)."""

    activation: jax.Array  # A [in, in]
    gradient: jax.Array  # G [out, out]
    tokens: int


def sample_labels(model: nnx.Module, hidden: jax.Array, rng: jax.Array, chunk: int) -> jax.Array:
    """One next token per position [B, T], drawn from the model's predictive distribution.
    Only ``chunk`` positions' logits exist at a time (the vocabulary may be large)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    keys = jax.random.split(rng, flat.shape[0])

    def draw(args):
        h, key = args
        return jax.random.categorical(key, model.logits(h[None])[0])

    labels = jax.lax.map(draw, (flat, keys), batch_size=max(1, min(chunk, flat.shape[0])))
    return labels.reshape(hidden.shape[:-1]).astype(jnp.int32)


def gold_labels(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The data's next token at each position (0 after the last one, which has no weight)."""
    ids = batch["input_ids"]
    return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1).astype(jnp.int32)


def _layer_out(model: nnx.Module, target: bl.Target) -> int:
    return bl.kernel(model, target).shape[1]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))
def _add_factors(graphdef, targets, shardings, labels_mode: str, chunk: int, sums, state, batch, rng):
    """Add one batch's ``sum a a^T`` and ``sum g g^T`` to ``sums``, per target.

    ``g`` is the gradient of the *summed* next-token NLL w.r.t. the layer's output at each
    position, obtained as the gradient w.r.t. a zero perturbation added to that output: the
    full backpropagated signal (a position also reaches later positions' losses through
    attention), as the official backward hooks see it. The code differentiates the *mean*
    loss; that only rescales G and leaves its eigenvectors and the edit unchanged.
    """
    weights = position_weights(batch)  # real positions that predict a real token
    model = nnx.merge(graphdef, state)
    shape = batch["input_ids"].shape
    zeros = {t: jnp.zeros((*shape, _layer_out(model, t)), jnp.float32) for t in targets}

    def loss(perturbations):
        m = nnx.merge(graphdef, state)
        hidden, _, inputs = bl.tapped_hidden_states(m, batch, targets, perturbations)
        if labels_mode == "gold":
            labels = gold_labels(batch)
        else:
            labels = sample_labels(m, jax.lax.stop_gradient(hidden), rng, chunk)
        return nll_sum(m, hidden, labels, weights), inputs

    grads, inputs = jax.grad(loss, has_aux=True)(zeros)
    mask = weights.reshape(-1, 1)  # the official code drops the last position; padding too
    out = {}
    for t, (a_sharding, g_sharding) in zip(targets, shardings):
        a = inputs[t].astype(jnp.float32).reshape(-1, inputs[t].shape[-1]) * mask
        g = grads[t].reshape(-1, grads[t].shape[-1]) * mask
        activation, gradient = sums[t]
        out[t] = (bl.constrain(activation + a.T @ a, a_sharding), bl.constrain(gradient + g.T @ g, g_sharding))
    return out


def kfac_factors(
    model: nnx.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    targets: tuple[bl.Target, ...],
    *,
    labels: str = "sampled",
    rng: jax.Array | None = None,
    sample_chunk: int = 512,
) -> dict[bl.Target, KfacFactors]:
    """K-FAC factors of each target layer, streamed over ``batches``: float32 sums in donated
    buffers whose rows are split over the mesh like the kernel's dimensions
    (:func:`~offside_jax.unlearn.block_linears.covariance_shardings`), divided by the number of
    positions at the end. Batch ``i`` samples its labels with ``fold_in(rng, i)``."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    rng = jax.random.key(0) if rng is None else rng
    targets = tuple(targets)
    graphdef, state = nnx.split(model)
    shardings = tuple(bl.covariance_shardings(model, t) for t in targets)
    sums = {}
    for t, (a_sharding, g_sharding) in zip(targets, shardings):
        d_in, d_out = bl.kernel(model, t).shape
        sums[t] = (bl.zeros_on((d_in, d_in), a_sharding), bl.zeros_on((d_out, d_out), g_sharding))
    tokens = 0
    for i, batch in enumerate(tqdm(batches, desc="K-FAC factors", unit="batch", leave=False)):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        sums = _add_factors(graphdef, targets, shardings, labels, sample_chunk, sums, state, batch,
                            jax.random.fold_in(rng, i))
        tokens += int(jnp.sum(position_weights(batch)))
    if tokens == 0:
        raise ValueError("K-FAC factors: no positions with a next token in the batches")
    return {t: KfacFactors(a / tokens, g / tokens, tokens) for t, (a, g) in sums.items()}


# -- eigen-basis selection and projection ---------------------------------------------------------


def eigenbasis(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues in descending order and their eigenvectors (columns), in float32.

    Eigenvalues are clipped at zero (ours): rounding can make a PSD factor's smallest ones
    slightly negative, and two negatives would multiply into spurious positive curvature."""
    values, vectors = jnp.linalg.eigh(factor.astype(jnp.float32))
    return jnp.clip(values[::-1], 0.0, None), vectors[:, ::-1]


def kept_pairs(in_values: jax.Array, out_values: jax.Array, rho: float) -> jax.Array:
    """Mask [in, out] of the eigen-pairs kept: the fewest pairs of largest curvature
    ``in_values[i] * out_values[j]`` whose sum reaches ``rho`` of the total. The official code
    walks the pairs in descending order with a heap-based k-way merge; sorting all products
    selects the same set."""
    mass = (in_values[:, None] * out_values[None, :]).reshape(-1)
    order = jnp.argsort(-mass, stable=True)
    cumulative = jnp.cumsum(mass[order])
    total = jnp.sum(in_values) * jnp.sum(out_values)
    count = jnp.minimum(jnp.searchsorted(cumulative, rho * total, side="left") + 1, mass.shape[0])
    rank = jnp.empty_like(order).at[order].set(jnp.arange(mass.shape[0], dtype=order.dtype))
    return (rank < count).reshape(in_values.shape[0], out_values.shape[0])


def project_kernel(kernel: jax.Array, in_vectors: jax.Array, out_vectors: jax.Array, mask: jax.Array) -> jax.Array:
    """``U_A ((U_A^T W U_G) * mask) U_G^T`` for a kernel ``W`` [in, out] (the paper's
    ``U_G (C * M) U_A^T`` on the HF-layout weight, transposed)."""
    d_in, d_out = kernel.shape
    chex.assert_shape([in_vectors, out_vectors, mask], [(d_in, d_in), (d_out, d_out), (d_in, d_out)])
    coefficients = in_vectors.T @ kernel.astype(jnp.float32) @ out_vectors
    return in_vectors @ (coefficients * mask) @ out_vectors.T


@jax.jit
def _edit_one(kernel, activation, gradient, rho):
    in_values, in_vectors = eigenbasis(activation)
    out_values, out_vectors = eigenbasis(gradient)
    mask = kept_pairs(in_values, out_values, rho)
    kept = jnp.sum(jnp.where(mask, in_values[:, None] * out_values[None, :], 0.0))
    fraction = kept / (jnp.sum(in_values) * jnp.sum(out_values))
    return project_kernel(kernel, in_vectors, out_vectors, mask).astype(kernel.dtype), fraction


def curvature_kernels(
    model: nnx.Module, factors: Mapping[bl.Target, KfacFactors], rho: float
) -> dict[bl.Target, tuple[jax.Array, float]]:
    """The projected kernel of each target and the fraction of curvature it keeps; at
    ``rho >= 0.9999`` the kernels are returned unchanged (the official evaluation skips them)."""
    out = {}
    for target, f in factors.items():
        k = bl.kernel(model, target)
        if rho >= SKIP_RHO:
            out[target] = (k, 1.0)
            continue
        # With no curvature at all every pair "reaches" rho of it: the edit would erase the matrix.
        if float(jnp.trace(f.activation)) * float(jnp.trace(f.gradient)) <= 0:
            raise ValueError(f"model.layers.{target[0]}.{target[1]}: its K-FAC factors are zero (no activation or "
                             "no gradient reached it); refusing to project onto an empty curvature spectrum")
        new, fraction = _edit_one(k, f.activation, f.gradient, rho)
        out[target] = (new, float(fraction))
    return out


@dataclasses.dataclass
class CurvatureReport:
    kept_curvature: dict[str, float]  # "layers.{i}.{matrix}" -> fraction of curvature kept
    tokens: int  # positions the statistics were taken over

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def curvature_edit(
    model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]], config: CurvatureConfig = CurvatureConfig()
) -> CurvatureReport:
    """Collect K-FAC factors on ``batches`` (any text: memorised or clean labels are not needed)
    and project the configured matrices of ``model`` in place."""
    targets = edit_targets(config, len(model.model.layers))
    factors = kfac_factors(model, batches, targets, labels=config.labels, rng=jax.random.key(config.seed),
                           sample_chunk=config.sample_chunk)
    edited = curvature_kernels(model, factors, config.rho)
    bl.set_kernels(model, {t: k for t, (k, _) in edited.items()})
    tokens = next(iter(factors.values())).tokens
    return CurvatureReport({f"layers.{t[0]}.{t[1]}": frac for t, (_, frac) in edited.items()}, tokens)
