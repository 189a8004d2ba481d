"""ConceptVectors: a concept's parametric traces in the MLP down-projections, how much an
unlearning method changed them, and concept ablation (noise, then a fine-tune of only them).

A *trace* is one column of Hugging Face's ``down_proj.weight`` [d_model, d_mlp]: the vector
that the MLP adds to the residual stream, scaled by hidden unit ``dim``'s activation. Our
kernels are stored [in, out] = [d_mlp, d_model], so that column is **row** ``dim`` of our
``down_proj.kernel``. Its *vocabulary projection* is the output head applied to it directly,
without the final RMSNorm, as the official ConceptVectors code does (``model.logits`` is the
head alone: the norm lives in the decoder stack).

Locating. The concept is given as token ids (:func:`concept_token_ids` collects them from a
name's spellings). Each row of each ``down_proj`` kernel is scored by

- ``mean_rank``: the mean over concept tokens of how many vocabulary tokens the projection
  scores strictly higher (0 when every concept token tops the vocabulary), and
- ``mass``: the softmax probability the projection puts on the concept tokens;

:func:`locate_traces` keeps the best rows over the chosen layers, ordered by ``mean_rank``
("ranks the concept's tokens highest"; ``order="mass"`` uses the probability mass instead).
The paper then filters candidates with GPT-4 and a causal check; that needs data we do not
have, so the ranking is the whole locator here.

Trace change (:func:`trace_changes`): cosine similarity and L2 distance between a trace
before and after, and the Jaccard index of the top-``k`` projected tokens (k = 200 in the
official evaluation), each model's trace projected through its own head.

Ablation (the official "needle" recipe): add N(0, sigma^2) noise (sigma = 0.1) to each located
vector (:func:`noise_traces`), then fine-tune with updates multiplied by :func:`trace_rows`
(``offside_jax.train.session.mask_updates``: weight decay cannot move anything else either).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.train.distributed import to_host



@dataclasses.dataclass(frozen=True)
class Trace:
    """Row ``dim`` of layer ``layer``'s ``down_proj`` kernel, with its scores for a concept."""

    layer: int
    dim: int
    mean_rank: float = float("nan")
    mass: float = float("nan")


@dataclasses.dataclass(frozen=True)
class TraceChange:
    layer: int
    dim: int
    cosine: float
    l2: float
    jaccard: float  # of the top-k projected token sets


def down_proj_path(layer: int) -> str:
    """Dotted parameter path of a decoder layer's down-projection kernel."""
    return f"model.layers.{layer}.mlp.down_proj.kernel"


def down_proj_kernel(model: nnx.Module, layer: int) -> jax.Array:
    """Layer ``layer``'s down-projection kernel [d_mlp, d_model] (a trace is one row)."""
    layers = model.model.layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    return layers[layer].mlp.down_proj.kernel[...]


def _vocab_size(model: nnx.Module) -> int:
    return int(model.model.embed_tokens.embedding.shape[0])


def concept_token_ids(tokenizer: Any, names: Iterable[str]) -> list[int]:
    """Token ids of a concept's names, spelled bare and after a space (BPE tokenizers give
    "Ronaldo" and " Ronaldo" different ids), without special tokens; sorted, no duplicates."""
    ids: set[int] = set()
    for name in names:
        for spelling in (name, " " + name):
            ids.update(int(i) for i in tokenizer.encode(spelling, add_special_tokens=False))
    if not ids:
        raise ValueError(f"the concept names {list(names)!r} give no tokens")
    return sorted(ids)


# -- locating -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score_rows(graphdef, state, kernel, concept_ids, chunk: int):
    """(mean rank, probability mass) of the concept tokens in each row's vocabulary projection.

    Rows go through the head ``chunk`` at a time so that only [chunk, vocab] logits exist at once.
    """
    model = nnx.merge(graphdef, state)
    rows, width = kernel.shape
    padded = -(-rows // chunk) * chunk
    blocks = jnp.pad(kernel, ((0, padded - rows), (0, 0))).reshape(-1, chunk, width)

    def one(block):
        logits = model.logits(block).astype(jnp.float32)  # [chunk, V]
        concept = jnp.take(logits, concept_ids, axis=1)  # [chunk, K]
        # One [chunk, V] comparison per concept token: never a [chunk, K, V] array.
        beaten = sum(jnp.sum(logits > concept[:, k:k + 1], axis=-1) for k in range(concept.shape[1]))
        mass = jnp.exp(jax.nn.logsumexp(concept, axis=-1) - jax.nn.logsumexp(logits, axis=-1))
        return beaten / concept.shape[1], mass

    ranks, mass = jax.lax.map(one, blocks)
    return ranks.reshape(-1)[:rows], mass.reshape(-1)[:rows]


def score_rows(model: nnx.Module, layer: int, concept_ids: Sequence[int], chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``(mean_rank, mass)`` of layer ``layer``'s down-projection for a concept."""
    ids = np.unique(np.asarray(concept_ids, np.int32))
    vocab = _vocab_size(model)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"concept token ids must be non-empty and in [0, {vocab}), got {list(concept_ids)}")
    graphdef, state = nnx.split(model)
    kernel = down_proj_kernel(model, layer)
    ranks, mass = _score_rows(graphdef, state, kernel, jnp.asarray(ids), min(chunk, kernel.shape[0]))
    ranks, mass = to_host((ranks, mass))  # every process gets all rows (arrays may span processes)
    return np.asarray(ranks, np.float64), np.asarray(mass, np.float64)


def locate_traces(
    model: nnx.Module,
    concept_ids: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    top: int = 10,
    order: Literal["rank", "mass"] = "rank",
    chunk: int = 256,
) -> list[Trace]:
    """The ``top`` down-projection rows (over ``layers``, default all) whose vocabulary
    projection ranks the concept's tokens highest (``order="rank"``: lowest mean rank, ties
    broken by mass) or puts the most probability on them (``order="mass"``)."""
    if order not in ("rank", "mass"):
        raise ValueError(f"order must be 'rank' or 'mass', got {order!r}")
    n_layers = len(model.model.layers)
    layers = range(n_layers) if layers is None else layers
    bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} decoder layers")
    layer_ids, dims, ranks, masses = [], [], [], []
    for layer in sorted({int(layer) % n_layers for layer in layers}):
        rank, mass = score_rows(model, layer, concept_ids, chunk)
        layer_ids.append(np.full(rank.shape, layer))
        dims.append(np.arange(rank.size))
        ranks.append(rank)
        masses.append(mass)
    layer_ids, dims, ranks, masses = (np.concatenate(x) for x in (layer_ids, dims, ranks, masses))
    # np.lexsort sorts by its last key first.
    keys = (dims, layer_ids, -masses, ranks) if order == "rank" else (dims, layer_ids, ranks, -masses)
    best = np.lexsort(keys)[:top]
    return [Trace(int(layer_ids[i]), int(dims[i]), float(ranks[i]), float(masses[i])) for i in best]


# -- how much a trace changed ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3))
def _top_tokens(graphdef, state, vectors, k: int):
    model = nnx.merge(graphdef, state)
    return jax.lax.top_k(model.logits(vectors).astype(jnp.float32), k)[1]


def projected_top_tokens(model: nnx.Module, vectors: jax.Array, k: int) -> np.ndarray:
    """Ids of the ``k`` highest-scoring tokens of each vector's projection through the head [N, k]."""
    graphdef, state = nnx.split(model)
    return np.asarray(to_host(_top_tokens(graphdef, state, jnp.asarray(vectors), int(k))))


def trace_vectors(model: nnx.Module, traces: Sequence[Trace]) -> np.ndarray:
    """The located vectors [N, d_model] in float32."""
    return np.stack([np.asarray(to_host(down_proj_kernel(model, t.layer)[t.dim]), np.float32) for t in traces])


@dataclasses.dataclass(frozen=True)
class TraceSnapshot:
    """The traces of a model as they were: vectors [N, d_model] and top-``k`` projected tokens
    [N, k] (so the model itself need not be kept to compare with it later)."""

    traces: tuple[Trace, ...]
    vectors: np.ndarray
    top_tokens: np.ndarray
    k: int


def snapshot_traces(model: nnx.Module, traces: Sequence[Trace], k: int = 200) -> TraceSnapshot:
    k = min(k, _vocab_size(model))
    vectors = trace_vectors(model, traces) if traces else np.zeros((0, 0), np.float32)
    top = projected_top_tokens(model, vectors, k) if traces else np.zeros((0, k), np.int64)
    return TraceSnapshot(tuple(traces), vectors, top, k)


def changes_since(snapshot: TraceSnapshot, after: nnx.Module) -> list[TraceChange]:
    """Cosine, L2 and top-``k`` Jaccard of each trace between the snapshot and ``after`` (same
    architecture), each projected through its own model's head."""
    if not snapshot.traces:
        return []
    new = trace_vectors(after, snapshot.traces)
    new_top = projected_top_tokens(after, new, snapshot.k)
    changes = []
    for t, a, b, ta, tb in zip(snapshot.traces, snapshot.vectors, new, snapshot.top_tokens, new_top):
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        cosine = float(a @ b / norms) if norms > 0 else 0.0
        sa, sb = set(ta.tolist()), set(tb.tolist())
        changes.append(TraceChange(t.layer, t.dim, cosine, float(np.linalg.norm(a - b)), len(sa & sb) / len(sa | sb)))
    return changes


def trace_changes(before: nnx.Module, after: nnx.Module, traces: Sequence[Trace], k: int = 200) -> list[TraceChange]:
    """Cosine, L2 and top-``k`` Jaccard of each trace between two models of one architecture."""
    return changes_since(snapshot_traces(before, traces, k), after)


def trace_summary(changes: Sequence[TraceChange]) -> dict[str, float]:
    """Means over traces: the ``trace kept`` figures of a report (1, 0, 1 for an untouched model)."""
    if not changes:
        return {"cosine": float("nan"), "l2": float("nan"), "jaccard": float("nan")}
    return {name: float(np.mean([getattr(c, name) for c in changes])) for name in ("cosine", "l2", "jaccard")}


# -- ablation ------------------------------------------------------------------------------------


def _rows_by_path(traces: Sequence[Trace], model: nnx.Module) -> dict[str, list[int]]:
    """Located rows per kernel path; out-of-range traces raise (JAX would drop their writes)."""
    layers = model.model.layers
    n_layers = len(layers)
    rows: dict[str, list[int]] = {}
    for t in traces:
        if not -n_layers <= t.layer < n_layers or not 0 <= t.dim < layers[t.layer].mlp.down_proj.in_features:
            raise ValueError(f"trace (layer {t.layer}, dim {t.dim}) is outside the model's down-projections")
        rows.setdefault(down_proj_path(t.layer % n_layers), []).append(t.dim)
    return rows


def noise_traces(model: nnx.Module, traces: Sequence[Trace], key: jax.Array, sigma: float = 0.1) -> None:
    """Add N(0, sigma^2) noise to each located vector of ``model``, in place (the official code
    adds ``torch.normal(0, 0.1, (d_model,))`` to ``down_proj.weight[:, dim]``). Nothing else moves."""
    layers = model.model.layers
    for i, (path, dims) in enumerate(sorted(_rows_by_path(traces, model).items())):
        kernel_var = layers[int(path.split(".")[2])].mlp.down_proj.kernel
        kernel = kernel_var.get_value()
        rows = np.unique(dims)
        noise = sigma * jax.random.normal(jax.random.fold_in(key, i), (rows.size, kernel.shape[1]), jnp.float32)
        kernel_var.set_value(kernel.at[rows].add(noise.astype(kernel.dtype)))


def trace_rows(model: nnx.Module, traces: Sequence[Trace]) -> dict[str, np.ndarray]:
    """Update masks for ``Session.step(update_mask=...)``: per traced ``down_proj`` kernel path,
    a boolean [d_mlp, 1] column true exactly on the located rows (it broadcasts over the
    kernel's output dimension). Training with it moves only the traces; masking the updates
    (not only the gradients) keeps decoupled weight decay and stale moments off the rest."""
    masks = {}
    for path, dims in _rows_by_path(traces, model).items():
        layer = int(path.split(".")[2])
        column = np.zeros((model.model.layers[layer].mlp.down_proj.in_features, 1), bool)
        column[np.unique(dims)] = True
        masks[path] = column
    return masks
