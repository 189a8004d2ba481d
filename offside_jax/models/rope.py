"""Rotary position embeddings in the Hugging Face convention (half split, not interleaved).

The inverse frequencies are computed from the transformers config's ``rope_parameters`` the
way transformers computes them (float32, the same formulas), so a port cannot silently
ignore ``rope_theta`` or a scaling type.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    # transformers: 1 / base ** (arange(0, dim, 2).float() / dim), all in float32.
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, params: Mapping[str, Any], max_positions: int) -> tuple[np.ndarray, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_frequencies(
    rope_parameters: Mapping[str, Any], head_dim: int, max_positions: int
) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float32, ``head_dim // 2`` of them) and the cos/sin scale factor."""
    params = dict(rope_parameters)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise NotImplementedError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return _base_inv_freq(theta, dim), 1.0
    if rope_type == "linear":
        return (_base_inv_freq(theta, dim) / np.float32(params["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        return _llama3(_base_inv_freq(theta, dim), params), 1.0
    if rope_type == "yarn":
        return _yarn(theta, dim, params, max_positions)
    raise NotImplementedError(
        f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def rope_cos_sin(positions: jnp.ndarray, inv_freq: jnp.ndarray, scale: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [..., head_dim] for integer ``positions`` [...], computed in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [B, T, H, D] by tables [B, T, D] (broadcast over heads)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
