"""ROCR, rank-one concept redirection: a closed-form edit of ``down_proj`` in a few early layers.

No training. After the edit the residual stream at the unlearning subject's last token (at the
last edited layer) matches the one a replacement subject produces, so facts stored about the
subject are looked up for the replacement instead. The update is AlphaEdit's: projected into
the null space of the keys of general data so those keys map unchanged, with sequential edits
accumulating the keys already written (``C_prev``). Follows the official ORT code
(``rocr/rocr_main.py``, ``workflow.py``, ``rocr/compute_z.py``, ``rocr/layer_stats.py``); the
paper text was not available, so every choice below is the code's unless marked *ours*.

Terms, per edited layer ``l`` (``d_in`` = MLP width, ``d`` = model width):

- *key* ``k`` [d_in]: the input of ``down_proj`` at the subject's last token, averaged over
  the context templates (the official six chat prompts);
- *value*: the residual stream after decoder layer ``L`` (the last edited layer) at the
  subject's last token; ``h`` on the plain prompt ``"{subject}."``, ``z*`` for the replacement
  subject in the first context template;
- ``C0`` [d_in, d_in]: the uncentred second moment of ``down_proj`` inputs over every real
  token of general data; ``P`` the projector onto its near-null space.

Two things to know when choosing data and settings:

- ROCR redirects the *subject*, so every fact stored under it moves, not one attribute: with
  records about the same subject in the retain set, those drop with the forget answers.
  ``C0`` should come from data that does not name the subject (world facts, other players),
  or the projector protects the very key the edit must move.
- ``l2`` and ``nullspace_threshold`` are absolute, as in the code: both are to be compared
  with the scale of the model's keys (``|k|^2``, the singular values of ``C0``).

The batches for the key, ``h`` and ``z*`` (:class:`RocrRequest`, built from text by
:func:`request_batches`) each carry ``subject_index`` [B], the position of the subject's last
token, found from a fast tokenizer's character offsets (:func:`subject_last_token`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from offside_jax.unlearn import block_linears as bl

DOWN_PROJ = "mlp.down_proj"
SUBJECT_INDEX = "subject_index"


# The official Llama-3-8B-Instruct / Mistral-7B hparams edit layers 4-6 of 32 (Qwen2.5-7B: 4-8 of 28).
_REFERENCE_LAYERS, _REFERENCE_DEPTH = (4, 5, 6), 32


@dataclasses.dataclass(frozen=True)
class RocrConfig:
    """ROCR settings, the official defaults. ``layers``: the ``down_proj`` layers to edit,
    increasing (the last one is where values are read); ``None`` takes :func:`default_layers`
    of the model's depth."""

    layers: tuple[int, ...] | None = None
    l2: float = 1.0  # the ridge term lambda of the solve ("L2")
    nullspace_threshold: float = 2e-2  # singular values of C0 below this span the space the update may use

    def __post_init__(self):
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; use None for the default layers")
        if self.layers is not None and list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        if self.l2 <= 0:
            raise ValueError(f"l2 must be > 0 (the solve is singular without it), got {self.l2}")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Layers 4-6 of a 32-layer model moved to the same relative depth (ours; the official
    hparams are per model): (4, 5, 6) at 32 layers, (0,) at 2."""
    return tuple(sorted({min(num_layers - 1, round(layer * num_layers / _REFERENCE_DEPTH))
                         for layer in _REFERENCE_LAYERS}))


def edit_layers(config: RocrConfig, model: nnx.Module) -> tuple[int, ...]:
    return default_layers(len(model.model.layers)) if config.layers is None else tuple(config.layers)


@dataclasses.dataclass(frozen=True)
class RocrRequest:
    """One subject to redirect: three tokenized batches, each with ``subject_index`` [B].

    ``key_batch``: the subject in each context template (keys are averaged over its rows);
    ``value_batch``: the plain prompt ``"{subject}."`` (one row); ``target_batch``: the
    replacement subject in the first context template (one row)."""

    key_batch: Mapping[str, np.ndarray]
    value_batch: Mapping[str, np.ndarray]
    target_batch: Mapping[str, np.ndarray]


def subject_last_token(offsets: Sequence[tuple[int, int]], subject_end: int) -> int:
    """Index of the subject's last token: the last token that starts before ``subject_end``
    (the subject's end as a character offset in the text) and is not empty. ``offsets`` is a
    fast tokenizer's ``offset_mapping`` for the same text. Working on characters, not on
    re-tokenized pieces, handles the leading-space variants of BPE (" Ronaldo" vs "Ronaldo")."""
    candidates = [i for i, (start, end) in enumerate(offsets) if end > start and start < subject_end]
    if not candidates:
        raise ValueError(f"no token starts before character {subject_end}: is the subject in the text?")
    return candidates[-1]


# -- request batches from text -------------------------------------------------------------------

# The official context prefixes: each becomes the chat user turn "{prefix} {subject}." followed by
# the generation prompt and "Answer:" (``get_context_templates`` with the request prompt "{}.").
CONTEXT_PREFIXES = ("", "Please answer the question about", "Choose the best answer about",
                    "Write the answer about", "Tell me about", "Write something about")
PLACEHOLDER = "{}"
PLAIN_PROMPT = "{}."  # the official request prompt, read without chat template for h


def context_templates(tokenizer, prefixes: Sequence[str] = CONTEXT_PREFIXES) -> list[str]:
    """Chat-rendered templates, each with one ``"{}"`` where the subject goes."""
    templates = []
    for prefix in prefixes:
        messages = [{"role": "user", "content": f"{prefix} {PLACEHOLDER}."}]
        templates.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Answer:")
    return templates


def encode_with_subject(tokenizer, template: str, subject: str, add_special_tokens: bool) -> tuple[list[int], int]:
    """Token ids of ``template`` with ``subject`` at its (last) ``"{}"``, and the index of the
    subject's last token. Chat-rendered text already holds its special tokens, so it is encoded
    with ``add_special_tokens=False`` (ours: the official code adds a second BOS there)."""
    at = template.rindex(PLACEHOLDER)
    text = template[:at] + subject + template[at + len(PLACEHOLDER):]
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return list(encoded["input_ids"]), subject_last_token(encoded["offset_mapping"], at + len(subject))


def _right_padded(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, np.ndarray]:
    length = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, (ids, _) in enumerate(rows):
        input_ids[r, :len(ids)], mask[r, :len(ids)] = ids, 1
    return {"input_ids": input_ids, "attention_mask": mask,
            SUBJECT_INDEX: np.asarray([index for _, index in rows], np.int32)}


def request_batches(tokenizer, subject: str, replacement: str, templates: Sequence[str] | None = None) -> RocrRequest:
    """The three batches of one request, as the official code builds them: keys over the
    context templates, ``h`` on the plain prompt ``"{subject}."``, ``z*`` from the replacement
    in the first template."""
    templates = context_templates(tokenizer) if templates is None else list(templates)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keys = [encode_with_subject(tokenizer, t, subject, add_special_tokens=False) for t in templates]
    value = [encode_with_subject(tokenizer, PLAIN_PROMPT, subject, add_special_tokens=True)]
    target = [encode_with_subject(tokenizer, templates[0], replacement, add_special_tokens=False)]
    return RocrRequest(_right_padded(keys, pad_id), _right_padded(value, pad_id), _right_padded(target, pad_id))


# -- capturing keys and values ------------------------------------------------------------------


def _model_inputs(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items() if k != SUBJECT_INDEX}


def _subject_index(batch: Mapping[str, np.ndarray]) -> jax.Array:
    if SUBJECT_INDEX not in batch:
        raise ValueError(f"a ROCR batch needs {SUBJECT_INDEX!r} (the subject's last token per row)")
    return jnp.asarray(batch[SUBJECT_INDEX], jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _at_subject(graphdef, layers: tuple[int, ...], value_layer: int, state, batch, index):
    model = nnx.merge(graphdef, state)
    targets = [(layer, DOWN_PROJ) for layer in layers]
    _, per_layer, inputs = bl.tapped_hidden_states(model, batch, targets)
    rows = jnp.arange(index.shape[0])
    keys = {layer: inputs[(layer, DOWN_PROJ)][rows, index].astype(jnp.float32) for layer in layers}
    return keys, per_layer[value_layer][rows, index].astype(jnp.float32)


def subject_keys(model: nnx.Module, batch: Mapping[str, np.ndarray], layers: Sequence[int]) -> dict[int, jax.Array]:
    """Per layer, the ``down_proj`` input at the subject's last token averaged over the batch's
    rows (the official ``compute_ks``: one key per request, the mean over context templates)."""
    graphdef, state = nnx.split(model)
    keys, _ = _at_subject(graphdef, tuple(layers), max(layers), state, _model_inputs(batch), _subject_index(batch))
    return {layer: jnp.mean(k, axis=0) for layer, k in keys.items()}


def subject_value(model: nnx.Module, batch: Mapping[str, np.ndarray], layer: int) -> jax.Array:
    """The residual stream after decoder layer ``layer`` at the subject's last token [d],
    averaged over rows (the official code reads one row: the plain prompt, or template 0)."""
    graphdef, state = nnx.split(model)
    _, values = _at_subject(graphdef, (layer,), layer, state, _model_inputs(batch), _subject_index(batch))
    return jnp.mean(values, axis=0)


# -- key statistics and the null-space projector ------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def _add_second_moments(graphdef, layers: tuple[int, ...], shardings, sums, state, batch):
    model = nnx.merge(graphdef, state)
    _, _, inputs = bl.tapped_hidden_states(model, batch, [(layer, DOWN_PROJ) for layer in layers])
    mask = batch.get("attention_mask")
    mask = jnp.ones(batch["input_ids"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    out = {}
    for layer, sharding in zip(layers, shardings):
        keys = inputs[(layer, DOWN_PROJ)].astype(jnp.float32)
        keys = keys.reshape(-1, keys.shape[-1]) * mask.reshape(-1, 1)  # padding rows become zero
        out[layer] = bl.constrain(sums[layer] + keys.T @ keys, sharding)
    return out


def key_second_moments(
    model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]], layers: Sequence[int]
) -> tuple[dict[int, jax.Array], int]:
    """``C0 = E[k k^T]`` per layer over every real token (``attention_mask``) of ``batches``,
    streamed, in float32; and the token count. The official ``layer_stats`` collects the same
    uncentred second moment of the ``down_proj`` input over 100k Wikipedia texts. The sums'
    rows are split over the mesh like the kernel's input dimension."""
    layers = tuple(layers)
    graphdef, state = nnx.split(model)
    width = bl.kernel(model, (layers[0], DOWN_PROJ)).shape[0]
    shardings = tuple(bl.covariance_shardings(model, (layer, DOWN_PROJ))[0] for layer in layers)
    sums = {layer: bl.zeros_on((width, width), s) for layer, s in zip(layers, shardings)}
    tokens = 0
    for batch in tqdm(batches, desc="ROCR key statistics", unit="batch", leave=False):
        batch = _model_inputs(batch)
        sums = _add_second_moments(graphdef, layers, shardings, sums, state, batch)
        mask = batch.get("attention_mask")
        tokens += int(batch["input_ids"].size if mask is None else jnp.sum(mask))
    if tokens == 0:
        raise ValueError("ROCR key statistics: no tokens in the general-data batches")
    return {layer: s / tokens for layer, s in sums.items()}, tokens


def null_space_projector(second_moment: jax.Array, threshold: float) -> jax.Array:
    """``U0 U0^T`` with ``U0`` the left singular vectors of ``C0`` whose singular values are
    below ``threshold`` (the official ``get_project``). Keys ``k`` of the statistics have
    ``k P ~ 0``, so an update ``X = P Y`` leaves their outputs unchanged. The threshold is
    absolute, as in the code: it depends on the scale of the model's activations."""
    u, s, _ = jnp.linalg.svd(second_moment.astype(jnp.float32), full_matrices=False)
    small = (s < threshold).astype(jnp.float32)
    return (u * small) @ u.T


def projectors(
    model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]], config: RocrConfig
) -> dict[int, jax.Array]:
    """One null-space projector per edited layer from general data (retain or world facts)."""
    moments, _ = key_second_moments(model, batches, edit_layers(config, model))
    return {layer: null_space_projector(c, config.nullspace_threshold) for layer, c in moments.items()}


# -- the closed-form update ---------------------------------------------------------------------


def rocr_update(
    keys: jax.Array, residuals: jax.Array, projector: jax.Array, c_prev: jax.Array, l2: float
) -> jax.Array:
    """The kernel update ``X`` [d_in, d] for keys [m, d_in] and value residuals [m, d].

    Solves ``(P (K^T K + C_prev) + l2 I) X = P K^T R`` (the official ``torch.linalg.solve``
    line, whose ``upd_matrix`` is already in our ``[in, out]`` layout). ``X`` minimises
    ``|K X - R|^2 + |C_prev^(1/2) X|^2 + l2 |X|^2`` over updates ``X = P Y`` in the range of
    ``P``: the edited keys move toward their residuals, keys already written (``C_prev``) and
    general-data keys (``K0 P = 0``) stay put.
    """
    chex.assert_rank([keys, residuals], 2)
    chex.assert_equal_shape_prefix([keys, residuals], 1)  # one residual per key
    chex.assert_shape([projector, c_prev], (keys.shape[1], keys.shape[1]))
    keys, residuals = keys.astype(jnp.float32), residuals.astype(jnp.float32)
    lhs = projector @ (keys.T @ keys + c_prev) + l2 * jnp.eye(keys.shape[1], dtype=jnp.float32)
    return jnp.linalg.solve(lhs, projector @ keys.T @ residuals)


def rocr_kernels(
    model: nnx.Module,
    request: RocrRequest,
    projectors: Mapping[int, jax.Array],
    c_prev: Mapping[int, jax.Array],
    config: RocrConfig,
) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
    """New ``down_proj`` kernels of the edited layers for one request, and the updated ``C_prev``.

    As the official ``apply_rocr_to_model``: ``z*`` is read once before any edit; then layer by
    layer (each on the model with the earlier layers already edited) the key and ``h`` are
    recomputed and the residual ``(z* - h) / (layers left)`` is written; finally the keys are
    recomputed on the fully edited model and ``C_prev += k k^T`` per layer. ``model`` itself
    is not modified (see :func:`apply_rocr`).
    """
    layers = edit_layers(config, model)
    missing = [layer for layer in layers if layer not in projectors or layer not in c_prev]
    if missing:
        raise ValueError(f"no projector or C_prev for layers {missing}")
    value_layer = layers[-1]
    work = bl.shallow_copy(model)
    target = subject_value(work, request.target_batch, value_layer)
    for i, layer in enumerate(layers):
        key = subject_keys(work, request.key_batch, [layer])[layer]
        current = subject_value(work, request.value_batch, value_layer)
        residual = (target - current) / (len(layers) - i)
        update = rocr_update(key[None], residual[None], projectors[layer], c_prev[layer], config.l2)
        old = bl.kernel(work, (layer, DOWN_PROJ))
        bl.set_kernels(work, {(layer, DOWN_PROJ): old.astype(jnp.float32) + update})
    final_keys = subject_keys(work, request.key_batch, layers)
    new_c_prev = {layer: c_prev[layer] + jnp.outer(final_keys[layer], final_keys[layer]) for layer in layers}
    return {layer: bl.kernel(work, (layer, DOWN_PROJ)) for layer in layers}, new_c_prev


def empty_c_prev(model: nnx.Module, config: RocrConfig) -> dict[int, jax.Array]:
    """``C_prev`` before the first request: zeros, as the official workflow starts."""
    layers = edit_layers(config, model)
    width = bl.kernel(model, (layers[0], DOWN_PROJ)).shape[0]
    return {layer: jnp.zeros((width, width), jnp.float32) for layer in layers}


def apply_rocr(
    model: nnx.Module,
    requests: Iterable[RocrRequest],
    projectors: Mapping[int, jax.Array],
    config: RocrConfig,
    c_prev: Mapping[int, jax.Array] | None = None,
) -> dict[int, jax.Array]:
    """Redirect each request's subject in turn, editing ``model`` in place; returns ``C_prev``
    after the last one (pass it back to continue with more requests later)."""
    c_prev = dict(empty_c_prev(model, config) if c_prev is None else c_prev)
    for request in requests:
        kernels, c_prev = rocr_kernels(model, request, projectors, c_prev, config)
        bl.set_kernels(model, {(layer, DOWN_PROJ): k for layer, k in kernels.items()})
    return c_prev
