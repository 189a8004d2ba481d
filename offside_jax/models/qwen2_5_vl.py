"""Qwen2.5-VL (and Qwen2-VL) in Flax NNX: vision tower, patch merger, M-RoPE language model.

The language model *is* the Llama-family decoder (:class:`LlamaForCausalLM`, configured as a
Qwen2 decoder: q/k/v biases, no o bias) with a vision tower beside it. Parameter paths mirror
the names published Qwen2.5-VL checkpoints are saved under (``model.layers.*``,
``model.embed_tokens``, ``lm_head``, ``visual.*``); :func:`hf_names` also accepts the names
transformers uses in memory (``model.language_model.*``, ``model.visual.*``), so either key
layout loads and either can be exported.

Three host-side (numpy) computations depend on image sizes and therefore stay outside jit;
:func:`prepare_inputs` runs them once per batch and returns plain arrays:

- ``positions`` [B, 3, T]: the multimodal RoPE ids (temporal, height, width), the same as
  transformers' ``get_rope_index`` (left padding, text-only rows, several images per row);
- ``vision_positions`` [B, P, 2]: (row, column) of every patch for the vision tower's 2-D RoPE;
- ``vision_full_groups`` / ``vision_window_groups`` [B, G, L]: which patches attend to each
  other (one group per image, or per window), padded with -1.

Every batch array has the batch row as its leading axis (each row's images are padded to
the longest row's patch count), so the training core shards a VL batch over rows exactly as
a text batch, and each device runs the vision tower on its own rows. Attention inside the
vision tower runs per group, so images cost the sum of per-image (per-window) attention,
never one quadratic attention over all patches. The order of patches inside a group does
not change non-causal attention, so no window permutation (and its inverse) is needed,
unlike transformers.

Decoding continues each row at (largest prompt position + 1), one step at a time; text
tokens have equal temporal/height/width ids, for which M-RoPE reduces to ordinary RoPE — so
``decode_step`` is the Llama one unchanged and ``offside_jax.models.generate`` drives it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.models import hf
from offside_jax.models.attention import AttentionSpec, attention, check_implementation
from offside_jax.models.layers import Linear, RMSNorm, SwiGLU, param, remat_setting
from offside_jax.models.llama import DecoderConfig, KVCache, LlamaForCausalLM, as_dtype, positions_from_mask
from offside_jax.models.rope import apply_rope

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")

# transformers hard-codes these (they are not config fields): every vision norm and the
# merger's norm use eps 1e-6, whatever the text model's rms_norm_eps is.
VISION_NORM_EPS = 1e-6

# Batch keys the model reads besides input_ids / attention_mask (see prepare_inputs).
VISION_KEYS = ("pixel_values", "vision_positions", "vision_full_groups", "vision_window_groups")


class VisionInputError(ValueError):
    """Images and image tokens that do not fit together; the message says which row/image."""


# -- configuration ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Every architectural number of the vision tower, read from ``config.vision_config``."""

    variant: str  # "qwen2_5_vl" (RMSNorm, SwiGLU, windows) or "qwen2_vl" (LayerNorm, fc1/fc2)
    depth: int
    hidden_size: int  # width of the vision blocks
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int  # merger output = language model width
    hidden_act: str
    rope_theta: float
    window_size: int | None  # pixels; None: every block attends over the whole image
    full_attention_blocks: tuple[int, ...]
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def window_units(self) -> int | None:
        """Window side in merged units (transformers' ``vit_merger_window_size``)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class VLConfig:
    model_type: str
    text: DecoderConfig
    vision: VisionConfig
    mrope_section: tuple[int, ...]
    image_token_id: int
    video_token_id: int | None
    vision_start_token_id: int | None
    vision_end_token_id: int | None

    @classmethod
    def from_hf(cls, hf_config: Any) -> "VLConfig":
        """Build from a transformers ``Qwen2_5_VLConfig`` / ``Qwen2VLConfig`` (or a config.json dict)."""
        if isinstance(hf_config, VLConfig):
            return hf_config
        if isinstance(hf_config, Mapping):
            hf_config = _config_from_dict(hf_config)
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} for the Qwen-VL port; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        text = hf_config.text_config.to_dict()
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        mrope = rope.pop("mrope_section", None)
        if mrope is None:
            raise ValueError(f"{model_type} config: text_config.rope_parameters has no 'mrope_section'")
        if rope.get("rope_type", rope.get("type")) == "mrope":  # legacy name of plain RoPE + sections
            rope.pop("type", None)
            rope["rope_type"] = "default"
        text["rope_parameters"] = rope
        text.pop("rope_scaling", None)
        # The VL language model is a Qwen2 decoder (q/k/v biases, no o bias); the embedding
        # tie lives on the outer config (the 3B model ties, the 7B does not).
        decoder = DecoderConfig.from_hf({**text, "model_type": "qwen2"})
        decoder = dataclasses.replace(
            decoder, model_type=text["model_type"], tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False))
        )
        if sum(mrope) != decoder.head_dim // 2:
            raise ValueError(
                f"{model_type} config: mrope_section {list(mrope)} sums to {sum(mrope)}, "
                f"but the text head_dim {decoder.head_dim} needs {decoder.head_dim // 2}"
            )
        return cls(
            model_type=model_type,
            text=decoder,
            vision=_vision_config(model_type, hf_config.vision_config),
            mrope_section=tuple(int(s) for s in mrope),
            image_token_id=int(hf_config.image_token_id),
            video_token_id=getattr(hf_config, "video_token_id", None),
            vision_start_token_id=getattr(hf_config, "vision_start_token_id", None),
            vision_end_token_id=getattr(hf_config, "vision_end_token_id", None),
        )


def _config_from_dict(d: Mapping[str, Any]):
    # Published config.json files are flat (text fields at the top level); the transformers
    # config class knows how to fold them into text_config, so let it.
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} for the Qwen-VL port; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return AutoConfig.for_model(model_type, **d)


def _vision_config(model_type: str, v: Any) -> VisionConfig:
    get = (lambda k, d=None: v.get(k, d)) if isinstance(v, Mapping) else (lambda k, d=None: getattr(v, k, d))
    rope = get("rope_parameters") or {}
    common = dict(
        depth=get("depth"),
        num_heads=get("num_heads"),
        in_channels=get("in_channels"),
        patch_size=_single(get("patch_size"), "patch_size"),
        temporal_patch_size=_single(get("temporal_patch_size"), "temporal_patch_size"),
        spatial_merge_size=get("spatial_merge_size"),
        hidden_act=get("hidden_act"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        initializer_range=get("initializer_range", 0.02),
    )
    if model_type == "qwen2_5_vl":
        cfg = VisionConfig(
            variant=model_type,
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            out_hidden_size=get("out_hidden_size"),
            window_size=get("window_size"),
            full_attention_blocks=tuple(int(i) for i in get("fullatt_block_indexes")),
            **common,
        )
        if cfg.hidden_act != "silu":
            raise NotImplementedError(f"Qwen2.5-VL vision hidden_act {cfg.hidden_act!r} (the SwiGLU MLP needs 'silu')")
        if cfg.window_units is not None and cfg.window_units < 1:
            raise ValueError(f"vision window_size {cfg.window_size} is smaller than one merged patch")
    else:  # qwen2_vl: width is embed_dim, hidden_size is the merger's output
        cfg = VisionConfig(
            variant=model_type,
            hidden_size=get("embed_dim"),
            intermediate_size=int(get("embed_dim") * get("mlp_ratio")),
            out_hidden_size=get("hidden_size"),
            window_size=None,
            full_attention_blocks=tuple(range(get("depth"))),
            **common,
        )
        if cfg.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(f"Qwen2-VL vision hidden_act {cfg.hidden_act!r}; supported: {', '.join(_ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
        raise ValueError(f"vision hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give a head_dim divisible by 4")
    return cfg


def _single(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise NotImplementedError(f"non-square vision {name} {value} is not supported")
        return int(value[0])
    return int(value)


_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


# -- host-side layout (numpy, outside jit) -----------------------------------------------------


def vision_layout(image_grid_thw: np.ndarray, vision: VisionConfig) -> dict[str, np.ndarray]:
    """Patch coordinates and attention groups of the patches of all images, in processor order.

    The image processor orders each image's patches block-major: (frame, merged row, merged
    column, row inside the block, column inside the block).
    """
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = vision.spatial_merge_size
    positions, full, windows = [], [], []
    offset = 0
    for i, (t, h, w) in enumerate(grids.tolist()):
        if h % m or w % m or min(t, h, w) < 1:
            raise VisionInputError(f"image {i}: grid (t={t}, h={h}, w={w}) is not a whole number of {m}x{m} merge blocks")
        uh, uw = h // m, w // m
        frame, brow, bcol, r, c = np.meshgrid(
            np.arange(t), np.arange(uh), np.arange(uw), np.arange(m), np.arange(m), indexing="ij"
        )
        frame, brow, bcol = frame.reshape(-1), brow.reshape(-1), bcol.reshape(-1)
        positions.append(np.stack([(brow * m + r.reshape(-1)), (bcol * m + c.reshape(-1))], axis=-1))
        index = offset + np.arange(t * h * w)
        full.extend(index[frame == f] for f in range(t))  # each frame attends within itself
        if vision.window_units is not None:
            u = vision.window_units
            n_wh, n_ww = -(-uh // u), -(-uw // u)
            window_id = (frame * n_wh + brow // u) * n_ww + bcol // u
            order = np.argsort(window_id, kind="stable")
            bounds = np.cumsum(np.bincount(window_id, minlength=t * n_wh * n_ww))
            windows.extend(g for g in np.split(index[order], bounds[:-1]) if len(g))
        offset += t * h * w
    layout = {
        "vision_positions": np.concatenate(positions).astype(np.int32),
        "vision_full_groups": _pad_groups(full),
    }
    if vision.window_units is not None:
        layout["vision_window_groups"] = _pad_groups(windows)
    return layout


def _pad_groups(groups: Sequence[np.ndarray]) -> np.ndarray:
    out = np.full((len(groups), max(len(g) for g in groups)), -1, np.int32)
    for i, g in enumerate(groups):
        out[i, : len(g)] = g
    return out


def mrope_positions(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, list[list[int]]]:
    """3-D RoPE ids [B, 3, T] as transformers' ``get_rope_index`` computes them for images,
    and which images (indices into ``image_grid_thw``) each row holds.

    Text tokens count up by one on all three axes; an image's tokens take (t, row, column)
    of its merged grid offset by the position where it starts; the text after it continues
    from that start + max(rows, columns). Padding gets 0. Images are consumed in row-major
    order, each taking t * rows * columns consecutive image tokens.
    """
    input_ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    batch, length = input_ids.shape
    out = np.zeros((batch, 3, length), np.int32)
    rows: list[list[int]] = []
    m = spatial_merge_size
    next_image = 0
    for b in range(batch):
        valid = np.flatnonzero(mask[b])
        ids = input_ids[b, valid]
        is_image = ids == image_token_id
        pos = np.zeros((3, len(ids)), np.int64)
        row_images: list[int] = []
        start, i = 0, 0
        while i < len(ids):
            if not is_image[i]:
                j = i + int(np.argmax(is_image[i:])) if is_image[i:].any() else len(ids)
                pos[:, i:j] = start + np.arange(j - i)
                start += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise VisionInputError(
                    f"row {b}: image tokens at position {valid[i]} but all {len(grids)} images are used by earlier tokens"
                )
            t, h, w = (int(x) for x in grids[next_image])
            gh, gw = h // m, w // m
            n = t * gh * gw
            if i + n > len(ids) or not is_image[i : i + n].all():
                run = int(np.argmin(is_image[i:])) if not is_image[i:].all() else len(ids) - i
                raise VisionInputError(
                    f"row {b}: image {next_image} (grid {t}x{h}x{w}) needs {n} consecutive image tokens, "
                    f"found a run of {run} at position {valid[i]}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos[:, i : i + n] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start
            start += max(gh, gw)
            row_images.append(next_image)
            next_image += 1
            i += n
        out[b][:, valid] = pos
        rows.append(row_images)
    if next_image != len(grids):
        raise VisionInputError(
            f"the batch has image tokens for {next_image} images but {len(grids)} images (image_grid_thw rows)"
        )
    return out, rows


def prepare_inputs(
    config: VLConfig | Any,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    patch_multiple: int = 1,
) -> dict[str, np.ndarray]:
    """Complete a batch for the model: M-RoPE ``positions`` and per-row vision arrays.

    ``pixel_values`` [N, C*T*P*P] and ``image_grid_thw`` [images, 3] are the image
    processor's outputs for the batch's images in row-major order (as transformers takes
    them). Rows without images are fine; so is padding on either side.

    Every returned array has the batch row as its leading axis, so a training step can
    shard the whole batch over rows (each device runs the vision tower on its own rows):

    - ``positions`` [B, 3, T];
    - ``pixel_values`` [B, P, C*T*P*P]: each row's patches, zero-padded to the longest row
      (rounded up to ``patch_multiple`` so similar batches share one compiled program);
    - ``vision_positions`` [B, P, 2], ``vision_full_groups`` [B, G, L] and (Qwen2.5-VL)
      ``vision_window_groups``: indices into the row's own patches, -1 for padding.
    """
    config = VLConfig.from_hf(config)
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise VisionInputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if config.video_token_id is not None and np.any((input_ids == config.video_token_id) & (mask > 0)):
        raise NotImplementedError("video inputs (video pad tokens) are not supported")
    out: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": mask}
    n_image_tokens = int(((input_ids == config.image_token_id) & (mask > 0)).sum())
    if pixel_values is None:
        if n_image_tokens:
            raise VisionInputError(f"the batch has {n_image_tokens} image tokens but no pixel_values")
        positions = np.asarray(positions_from_mask(mask), np.int32)
        out["positions"] = np.repeat(positions[:, None, :], 3, axis=1)
        return out
    if image_grid_thw is None:
        raise VisionInputError("pixel_values without image_grid_thw: pass the image processor's image_grid_thw too")
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    v = config.vision
    if pixel_values.ndim != 2 or pixel_values.shape[1] != v.patch_dim:
        raise VisionInputError(
            f"pixel_values must be [patches, {v.patch_dim}] (channels x temporal x patch x patch), got {pixel_values.shape}"
        )
    sizes = grids.prod(-1)
    if int(sizes.sum()) != pixel_values.shape[0]:
        raise VisionInputError(
            f"image_grid_thw describes {int(sizes.sum())} patches but pixel_values has {pixel_values.shape[0]}"
        )
    expected_tokens = int(sizes.sum()) // v.spatial_merge_size**2
    if expected_tokens != n_image_tokens:
        raise VisionInputError(
            f"the batch has {n_image_tokens} image tokens but its {len(grids)} images need {expected_tokens}"
        )
    out["positions"], row_images = mrope_positions(
        input_ids, mask, grids, image_token_id=config.image_token_id, spatial_merge_size=v.spatial_merge_size
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    per_row = []
    for images in row_images:
        patches = [pixel_values[offsets[i] : offsets[i + 1]] for i in images]
        layout = vision_layout(grids[images], v) if images else {}
        per_row.append((np.concatenate(patches) if patches else np.zeros((0, v.patch_dim), np.float32), layout))
    n_patches = max(len(p) for p, _ in per_row)
    n_patches = -(-n_patches // patch_multiple) * patch_multiple
    out["pixel_values"] = np.zeros((len(per_row), n_patches, v.patch_dim), np.float32)
    for b, (patches, _) in enumerate(per_row):
        out["pixel_values"][b, : len(patches)] = patches
    keys = ["vision_positions", "vision_full_groups"] + (["vision_window_groups"] if v.window_units is not None else [])
    for key in keys:
        parts = [layout.get(key) for _, layout in per_row]
        if key == "vision_positions":
            arr = np.zeros((len(per_row), n_patches, 2), np.int32)
        else:
            g = max(len(p) for p in parts if p is not None)
            length = max(p.shape[1] for p in parts if p is not None)
            arr = np.full((len(per_row), g, length), -1, np.int32)
        for b, p in enumerate(parts):
            if p is not None:
                arr[b, : p.shape[0], : p.shape[1]] = p
        out[key] = arr
    return out


# -- vision tower ------------------------------------------------------------------------------


class PatchProjection(nnx.Module):
    """HF ``patch_embed.proj``: a Conv3d whose stride equals its kernel, i.e. one matmul per
    patch. The weight keeps the Conv3d shape [out, C, T, P, P] so I/O needs no reshaping."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.dtype = dtype
        self.weight = param(cfg.initializer_range * jax.random.normal(rngs.params(), shape, param_dtype),
                            ("embed", None, None, None, None))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        # Processor rows are flattened (C, T, P, P), the order of the Conv3d kernel.
        kernel = self.weight[...].reshape(self.weight.shape[0], -1).astype(self.dtype)
        return jnp.dot(pixels.astype(self.dtype), kernel.T)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = PatchProjection(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.proj(pixels)


class LayerNorm(nnx.Module):
    """torch ``LayerNorm`` (Qwen2-VL vision): normalise in float32, then scale and shift."""

    def __init__(self, features: int, *, eps: float, param_dtype):
        self.eps = eps
        self.weight = param(jnp.ones((features,), param_dtype), (None,))
        self.bias = param(jnp.zeros((features,), param_dtype), (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class VisionMLP(nnx.Module):
    """Qwen2-VL vision MLP: ``fc2(act(fc1(x)))``."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(use_bias=True, init_std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = cfg.hidden_act
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **common)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


def group_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Non-causal attention inside groups of patches.

    q, k, v [N, H, D]; ``groups`` [G, L] lists the patches of each group (an image or a
    window), padded with -1. Each patch belongs to exactly one group. Returns [N, H * D].
    """
    n, h, d = q.shape
    valid = groups >= 0
    safe = jnp.where(valid, groups, 0)
    g, length = groups.shape
    out = attention(q[safe], k[safe], v[safe], spec, query_slots=jnp.arange(length), key_valid=valid)  # [G, L, H * D]
    target = jnp.where(valid, groups, n).reshape(-1)  # padding slots point past the end: dropped
    return jnp.zeros((n, h * d), out.dtype).at[target].set(out.reshape(g * length, h * d), mode="drop")


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        common = dict(use_bias=True, init_std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attention_impl = attention_impl  # static: offside_jax.models.attention.IMPLEMENTATIONS
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=("embed", "heads"), **common)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **common)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, groups: jax.Array) -> jax.Array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # transformers rotates vision q/k in float32 whatever the compute dtype.
        q = apply_rope(q[None].astype(jnp.float32), cos[None], sin[None])[0].astype(v.dtype)
        k = apply_rope(k[None].astype(jnp.float32), cos[None], sin[None])[0].astype(v.dtype)
        spec = AttentionSpec(scale=self.head_dim**-0.5, causal=False, implementation=self.attention_impl)
        return self.proj(group_attention(q, k, v, groups, spec))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        if cfg.variant == "qwen2_5_vl":
            self.norm1 = RMSNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
            self.norm2 = RMSNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
            self.mlp = SwiGLU(
                cfg.hidden_size, cfg.intermediate_size, use_bias=True, init_std=cfg.initializer_range,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )
        else:
            self.norm1 = LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
            self.norm2 = LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
            self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)

    def __call__(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then an MLP over each spatial_merge_size**2 block of neighbouring patches.

    ``mlp`` is a list with a hole at index 1 (the GELU) so the paths read ``mlp.0`` and
    ``mlp.2`` as in the HF ``nn.Sequential``.
    """

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.width = width
        norm = RMSNorm if cfg.variant == "qwen2_5_vl" else LayerNorm
        self.ln_q = norm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
        common = dict(use_bias=True, init_std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = nnx.List([
            Linear(width, width, axes=("embed", "mlp"), **common),
            None,
            Linear(width, cfg.out_hidden_size, axes=("mlp", "embed"), **common),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.width)
        return self.mlp[2](jax.nn.gelu(self.mlp[0](x), approximate=False))


def _remat_block(block: VisionBlock, x, cos, sin, groups, policy=None) -> jax.Array:
    """Recompute one block in the backward pass. The model runs the tower under ``jax.vmap``
    (one call per row), where ``nnx.remat`` would try to write the module's state back across
    trace levels; a pure ``jax.checkpoint`` over the block's split state only reads it."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a), policy=policy)(state, x, cos, sin, groups)


class VisionTransformer(nnx.Module):
    """HF ``visual``: patch embedding, blocks (windowed or full attention), merger."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool = False, attention: str = "auto",
                 rngs: nnx.Rngs):
        self.config = cfg
        self.remat = remat
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention, rngs=rngs)
                                for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Axial RoPE: head_dim // 4 frequencies each for rows and columns (float32, as HF).
        spatial = cfg.head_dim // 2
        exponents = np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / np.float32(spatial)
        self.rope_inv_freq = tuple(float(f) for f in (np.float32(1.0) / np.float32(cfg.rope_theta) ** exponents))

    def rope_cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tables [N, head_dim] laid out (rows, columns, rows, columns) as transformers does."""
        freqs = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(self.rope_inv_freq, jnp.float32)
        freqs = freqs.reshape(positions.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def hidden_states(self, pixel_values, vision_positions, vision_full_groups, vision_window_groups=None) -> jax.Array:
        """Patch features [N, hidden_size] after the last block (before the merger)."""
        x = self.patch_embed(pixel_values)
        cos, sin = self.rope_cos_sin(vision_positions)
        for i, block in enumerate(self.blocks):
            if i in self.config.full_attention_blocks:
                groups = vision_full_groups
            elif vision_window_groups is None:
                raise VisionInputError(f"vision block {i} uses window attention: the batch needs vision_window_groups")
            else:
                groups = vision_window_groups
            remat, policy = remat_setting(self.remat)
            x = _remat_block(block, x, cos, sin, groups, policy) if remat else block(x, cos, sin, groups)
        return x

    def __call__(self, pixel_values, vision_positions, vision_full_groups, vision_window_groups=None) -> jax.Array:
        """Merged image features [N / merge**2, out_hidden_size], one row per image token."""
        return self.merger(self.hidden_states(pixel_values, vision_positions, vision_full_groups, vision_window_groups))


# -- the vision-language model -----------------------------------------------------------------


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    """The Llama-family Qwen2 decoder with a vision tower (``visual``) and multimodal RoPE.

    Batches come from :func:`prepare_inputs` (or ``offside_jax.models.vision_inputs``);
    ``model(**batch)`` gives logits and ``offside_jax.models.generate.generate(model, batch)``
    generates.
    """

    # Images (offside_jax.models.interface): the per-row vision arrays of prepare_inputs.
    vision = True
    image_inputs: tuple[str, ...] = ("pixel_values", "vision_positions", "vision_full_groups", "vision_window_groups")

    def __init__(
        self,
        config: VLConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        check_implementation(attention)
        super().__init__(config.text, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, rngs=rngs)
        self.vl_config = config
        self.visual = VisionTransformer(config.vision, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                        attention=attention, rngs=rngs)
        # Which of the three position streams (t, h, w) drives each rotary frequency.
        self.mrope_streams = tuple(i % 3 for i, n in enumerate(config.mrope_section) for _ in range(n))

    # -- pieces -------------------------------------------------------------------------------

    def mrope_cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin [B, T, head_dim] from 3-D positions [B, 3, T] (or plain [B, T])."""
        if positions.ndim == 2:
            positions = positions[:, None, :]
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.rope_inv_freq, jnp.float32)
        freqs = jnp.broadcast_to(freqs, (freqs.shape[0], 3, *freqs.shape[2:]))
        streams = jnp.asarray(self.mrope_streams)
        freqs = jnp.where(streams == 0, freqs[:, 0], jnp.where(streams == 1, freqs[:, 1], freqs[:, 2]))
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb) * self.rope_scale, jnp.sin(emb) * self.rope_scale

    def image_features(self, pixel_values, vision_positions, vision_full_groups, vision_window_groups=None) -> jax.Array:
        """Merged features of one row's (or one flat list of) patches: [P / merge**2, D]."""
        return self.visual(pixel_values, vision_positions, vision_full_groups, vision_window_groups)

    def embed_inputs(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Token embeddings [B, T, D] with each row's image tokens replaced, in order, by the
        merged features of that row's images (batch from :func:`prepare_inputs`)."""
        input_ids = batch["input_ids"]
        x = self.embed(input_ids)
        if batch.get("pixel_values") is None:
            return x
        missing = [k for k in VISION_KEYS[1:3] if batch.get(k) is None]
        if missing:
            raise VisionInputError(
                f"pixel_values without {', '.join(missing)}: build the batch with qwen2_5_vl.prepare_inputs "
                "(or offside_jax.models.vision_inputs)"
            )
        window = batch.get("vision_window_groups")

        def row_features(pixels, positions, full, win):
            return self.image_features(pixels, positions, full, win)

        # One vision-tower call per row (vmapped): everything stays sharded over rows.
        features = jax.vmap(row_features, in_axes=(0, 0, 0, None if window is None else 0))(
            batch["pixel_values"], batch["vision_positions"], batch["vision_full_groups"], window
        )
        is_image = input_ids == self.vl_config.image_token_id
        # The k-th image token of a row takes the row's k-th feature; prepare_inputs checked counts.
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        picked = jnp.take_along_axis(features, index[..., None], axis=1).astype(x.dtype)
        return jnp.where(is_image[..., None], picked, x)

    def decode_hidden(self, inputs_embeds, positions, attention_mask, cache=None, cache_index=0,
                      rope_cos_sin_override=None, collect_hidden=False, segment_ids=None):
        """The Llama decoder stack; 3-D ``positions`` [B, 3, T] select multimodal RoPE."""
        if rope_cos_sin_override is None and positions is not None and positions.ndim == 3:
            rope_cos_sin_override = self.mrope_cos_sin(positions)
        return super().decode_hidden(inputs_embeds, positions, attention_mask, cache, cache_index,
                                     rope_cos_sin_override, collect_hidden, segment_ids)

    def _positions(self, batch: Mapping[str, jax.Array], attention_mask: jax.Array) -> jax.Array:
        positions = batch.get("positions")
        if positions is None:
            if batch.get("pixel_values") is not None:
                raise VisionInputError("a batch with images needs 3-D positions: build it with qwen2_5_vl.prepare_inputs")
            positions = positions_from_mask(attention_mask)
        return positions

    def hidden_states(self, batch: Mapping[str, jax.Array], collect_hidden: bool = False):
        """Final-normed hidden states [B, T, D] of a batch (images included) and, optionally,
        the residual stream after each layer: the entry point for training losses."""
        mask = batch.get("attention_mask")
        mask = jnp.ones(batch["input_ids"].shape, jnp.int32) if mask is None else mask
        hidden, _, per_layer = self.decode_hidden(
            self.embed_inputs(batch), self._positions(batch, mask), mask, collect_hidden=collect_hidden
        )
        return (hidden, per_layer) if collect_hidden else hidden

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        vision_positions: jax.Array | None = None,
        vision_full_groups: jax.Array | None = None,
        vision_window_groups: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (float32) of a batch from :func:`prepare_inputs` (``model(**batch)``)."""
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions, pixel_values=pixel_values,
                     vision_positions=vision_positions, vision_full_groups=vision_full_groups,
                     vision_window_groups=vision_window_groups)
        return self.logits(self.hidden_states(batch))

    # -- generation protocol (offside_jax.models.generate) ---------------------------------------

    def prefill(self, inputs: dict[str, jax.Array], cache: KVCache) -> tuple[jax.Array, KVCache, jax.Array]:
        """Run the vision tower and the prompt; each row continues at its largest position + 1."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt_len = input_ids.shape[1]
        positions = self._positions(inputs, mask)
        valid = jnp.zeros(cache.valid.shape, jnp.int32).at[:, :prompt_len].set(mask.astype(jnp.int32))
        hidden, cache, _ = self.decode_hidden(self.embed_inputs(inputs), positions, valid, cache, 0)
        if positions.ndim == 2:
            positions = positions[:, None, :]
        last = jnp.max(jnp.where(mask.astype(bool)[:, None, :], positions, -1), axis=(1, 2))
        return self.logits(hidden[:, -1]), cache, (last + 1).astype(jnp.int32)

    # decode_step is LlamaForCausalLM's: generated tokens are text, whose three M-RoPE ids are
    # equal, and M-RoPE with equal ids is plain RoPE over the same frequencies.


def create(
    hf_config: Any,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
    attention: str = "auto",
    seed: int = 0,
    abstract: bool = False,
) -> Qwen2_5_VLForConditionalGeneration:
    """Instantiate from a transformers config. ``abstract=True`` allocates nothing (shapes only)."""
    config = VLConfig.from_hf(hf_config)

    def make() -> Qwen2_5_VLForConditionalGeneration:
        return Qwen2_5_VLForConditionalGeneration(
            config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, rngs=nnx.Rngs(params=seed)
        )

    return nnx.eval_shape(make) if abstract else make()


# -- HF names ----------------------------------------------------------------------------------


def hf_names(path: hf.Path_) -> list[tuple[str, bool]]:
    """The saved name (``model.layers.*``, ``visual.*``) first, then the in-memory one
    (``model.language_model.*``, ``model.visual.*``): loading accepts both, export writes the
    saved layout that published checkpoints use."""
    name, transposed = hf.hf_name(path)
    if name.startswith("model."):
        return [(name, transposed), ("model.language_model." + name[len("model."):], transposed)]
    if name.startswith("visual."):
        return [(name, transposed), ("model." + name, transposed)]
    return [(name, transposed)]


def in_memory_names(path: hf.Path_) -> list[tuple[str, bool]]:
    """Like :func:`hf_names` with the in-memory layout first (``save_pretrained(..., names=in_memory_names)``)."""
    return list(reversed(hf_names(path)))
