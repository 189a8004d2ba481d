"""Attention: one function for every model, its implementation chosen by platform and shape.

``attention(q, k, v, spec)`` computes softmax attention with grouped KV heads for decoder
layers (causal over cache slots, padding, sliding window, packed segments) and for the
Qwen2.5-VL vision tower (non-causal inside groups of patches). Three implementations compute
the same function:

- ``xla``: scores materialised in float32 (``[B, KV, G, T, S]``), any mask, any dtype, any
  backend. The reference, and the path for decode over a KV cache (one query row: the step is
  bound by reading the cache, not by the softmax).
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention(...,
  implementation="cudnn")`` on NVIDIA GPUs (bf16/fp16, head_dim <= 128 and a multiple of 8).
  cuDNN takes padding as per-row lengths of a *leading* run of real tokens, so each row is
  rotated so that its real tokens start at slot 0 (left padding becomes right padding: the
  softmax does not care where a token sits, RoPE was applied before), attended with
  ``query_seq_lengths``/``key_value_seq_lengths``, and rotated back. Packed segments go in as
  a boolean mask.
- ``splash``: Pallas splash attention on TPU (``jax.experimental.pallas.ops.tpu.
  splash_attention``): causal or full mask, padding and packed segments as segment ids, GQA as
  one MQA kernel per KV head; lengths a multiple of its 128-token blocks.

``auto`` picks ``cudnn`` on GPU, ``splash`` on TPU and ``xla`` elsewhere; whenever a kernel's
constraints are not met (a cache, float32, an odd length ...) the XLA path runs instead and the
reason is logged once (debug level for ``auto``, warning when the kernel was asked for by name).

Padding contract for the kernels: a row's real tokens form one contiguous run (left, right or
both-sided padding). Every encoder of this package pads that way; the XLA path accepts any mask.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash attention's default block sizes (query and key/value)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What the attention of one call must respect (all static).

    ``causal``: keys at later slots than the query are hidden (decoder) or not (vision tower).
    ``sliding_window``: a query sees only the ``sliding_window`` most recent slots (itself included).
    ``cached``: keys/values live in a KV cache (decode/prefill), so T and S differ.
    ``implementation``: one of :data:`IMPLEMENTATIONS`.
    """

    scale: float
    causal: bool = True
    sliding_window: int | None = None
    cached: bool = False
    implementation: str = "auto"


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return name


# -- choosing ----------------------------------------------------------------------------------


def kernel_blocker(kernel: str, platform: str, q_shape, k_shape, dtype, spec: AttentionSpec, segmented: bool) -> str | None:
    """Why ``kernel`` cannot run this call (``None`` when it can). Shapes are q [B, T, H, D]
    and k [B, S, KV, D]."""
    _, t, h, d = q_shape
    s, kv = k_shape[1], k_shape[2]
    if h % kv:
        return f"{h} query heads are not a multiple of {kv} key/value heads"
    if spec.cached or t != s:
        return "attention over a KV cache (decode/prefill) runs on XLA"
    if kernel == "cudnn":
        if platform != "gpu":
            return f"cuDNN flash attention needs a GPU, this is {platform}"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention needs bf16/fp16, got {jnp.dtype(dtype).name}"
        if d > 128 or d % 8:
            return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8, got {d}"
        if spec.sliding_window is not None and not spec.causal:
            return "cuDNN takes a sliding window only with a causal mask"
        return None
    if kernel == "splash":
        if platform != "tpu":
            return f"splash attention needs a TPU, this is {platform}"
        if t % SPLASH_BLOCK:
            return f"splash attention needs a length that is a multiple of {SPLASH_BLOCK}, got {t}"
        return None
    raise ValueError(f"unknown attention kernel {kernel!r}")


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
    log.log(level, message)


def choose_implementation(requested: str, platform: str, q_shape, k_shape, dtype, spec: AttentionSpec,
                          segmented: bool = False) -> str:
    """The implementation that runs: the kernel asked for (or the platform's, for ``auto``) when
    its constraints hold, else ``xla`` with the reason logged once."""
    check_implementation(requested)
    if requested == "xla":
        return "xla"
    kernel = requested if requested != "auto" else {"gpu": "cudnn", "tpu": "splash"}.get(platform)
    if kernel is None:
        return "xla"
    reason = kernel_blocker(kernel, platform, tuple(q_shape), tuple(k_shape), dtype, spec, segmented)
    if reason is None:
        return kernel
    level = logging.DEBUG if requested == "auto" else logging.WARNING
    _log_once(level, f"attention: {kernel} not used, XLA instead: {reason}")
    return "xla"


# -- masks -------------------------------------------------------------------------------------


def attention_mask_for(
    query_slots: jax.Array, key_valid: jax.Array, sliding_window: int | None = None, causal: bool = True
) -> jax.Array:
    """Boolean mask [B, T, S]: causal over cache slots, padding keys hidden, optional window.

    ``query_slots`` [T] are the cache slots the queries occupy (shared by the batch, which is
    left-padded); ``key_valid`` [B, S] marks slots holding real tokens.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    allowed = jnp.ones((query_slots.shape[0], key_slots.shape[0]), bool)
    if causal:
        allowed &= key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        allowed &= (query_slots[:, None] - key_slots[None, :]) < sliding_window
    return allowed[None, :, :] & key_valid[:, None, :].astype(bool)


def same_segment(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T]: query and key belong to the same packed segment."""
    return segment_ids[:, :, None] == segment_ids[:, None, :]


# -- implementations ---------------------------------------------------------------------------


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention with grouped KV heads on XLA.

    q [B, T, H, D]; k, v [B, S, KV, D]; mask [B, T, S] -> [B, T, H * D]. Scores and softmax
    run in float32. Fully masked rows (queries on padding) get a large finite negative fill
    rather than -inf so they average harmlessly instead of producing NaNs.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def _rotate_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Row b of x [B, T, ...] rotated left by ``shift[b]`` slots."""
    t = x.shape[1]
    index = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _cudnn_attention(q, k, v, valid, spec: AttentionSpec, segment_ids, implementation: str = "cudnn") -> jax.Array:
    """Flash attention with padding as per-row lengths. ``implementation`` is ``jax.nn.
    dot_product_attention``'s: ``cudnn`` here; its ``xla`` reference of the same contract lets
    the rotation and length bookkeeping be tested on any backend."""
    b, t, h, d = q.shape
    valid = valid.astype(bool)
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)  # first real token (0 for an empty row)
    lengths = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.int32)  # an empty row must not divide by 0
    q, k, v = (_rotate_rows(x, start) for x in (q, k, v))
    mask = None
    if segment_ids is not None:
        mask = same_segment(_rotate_rows(segment_ids, start))[:, None]
    window = None if spec.sliding_window is None else (spec.sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=spec.scale, is_causal=spec.causal, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, local_window_size=window, implementation=implementation,
    )
    out = _rotate_rows(out, (t - start) % t)
    return out.reshape(b, t, h * d)


def _splash_attention(q, k, v, valid, spec: AttentionSpec, segment_ids, interpret: bool = False) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    if spec.causal:
        head_mask = splash.CausalMask((t, t))
        if spec.sliding_window is not None:
            head_mask = splash.LocalMask((t, t), (spec.sliding_window - 1, 0), 0)
    else:
        head_mask = splash.FullMask((t, t))
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([head_mask] * g), interpret=interpret,
        residual_checkpoint_name="attention_residuals",  # kept by the "flash" remat policy
    )
    # Padding as its own segment: a real token never sees a pad, and a pad only pads.
    segments = valid.astype(jnp.int32) if segment_ids is None else jnp.where(valid, segment_ids + 1, 0)
    qg = (q * spec.scale).reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]

    def one(qh, kh, vh, seg):
        return kernel(qh, kh, vh, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over KV heads: one MQA kernel each
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kt, vt, segments)  # [B, KV, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: AttentionSpec,
    *,
    query_slots: jax.Array,
    key_valid: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Attention of q [B, T, H, D] over k, v [B, S, KV, D] -> [B, T, H * D].

    ``query_slots`` [T]: the slots the queries occupy (``arange(T)`` without a cache);
    ``key_valid`` [B, S]: the slots holding real tokens; ``segment_ids`` [B, T]: packed
    segments (a query sees only keys of its own segment), optional. Outputs of queries on
    padding are unspecified (every implementation leaves them finite).
    """
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    impl = choose_implementation(spec.implementation, jax.default_backend(), q.shape, k.shape, q.dtype, spec,
                                 segment_ids is not None)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, key_valid, spec, segment_ids)
    if impl == "splash":
        return _splash_attention(q, k, v, key_valid, spec, segment_ids)
    mask = attention_mask_for(query_slots, key_valid, spec.sliding_window, spec.causal)
    if segment_ids is not None:
        mask &= same_segment(segment_ids)
    return grouped_attention(q, k, v, mask, spec.scale)
