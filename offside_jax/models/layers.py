"""Layers shared by every model family: HF-named parameters that carry logical axis names.

Every parameter is an ``nnx.Param`` with a ``logical_axes`` tuple (one name or ``None`` per
dimension). ``offside_jax.train.mesh`` maps those names onto mesh axes through one rules
table; the layers themselves know nothing of meshes.

Leaf names are fixed so that weight I/O is a declarative table: ``kernel`` is a linear weight
stored ``[in, out]`` (HF ``weight`` transposed), ``bias``, ``embedding`` is ``[vocab, embed]``
(HF ``weight`` as is) and ``weight`` is a norm scale.

``Linear`` optionally carries LoRA adapters (``lora_a`` [in, r], ``lora_b`` [r, out]) as
:class:`LoRAWeight` variables. They are deliberately *not* ``nnx.Param``: weight I/O and
anything else that filters ``nnx.Param`` sees only the base weights. ``offside_jax.models.lora``
attaches, switches, merges and exports them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

def _attention_kernel_or_weight_dot(prim, *avals, **params) -> bool:
    """Save what a flash-attention kernel's backward pass reads (its output and softmax
    statistics: the outputs of cuDNN's forward primitive) and matmuls without batch dims."""
    if "dot_product_attention_fwd" in prim.name:
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


# Rematerialisation policies by name: what a recomputed layer keeps from its forward pass.
# "full" keeps nothing (jax.checkpoint's default: the whole layer is recomputed, least memory);
# the dots policies keep matmul outputs (less recomputation, more memory); "flash" keeps the
# weight matmuls and the attention kernels' residuals (cuDNN's forward outputs; splash's are
# named ``attention_residuals``), so the backward pass never reruns an attention forward.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "flash": jax.checkpoint_policies.save_from_both_policies(
        _attention_kernel_or_weight_dot, jax.checkpoint_policies.save_only_these_names("attention_residuals")
    ),
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "checkpoint_dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "checkpoint_dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_setting(remat: bool | str | None) -> tuple[bool, Callable[..., bool] | None]:
    """``(enabled, policy)`` for a model's ``remat`` argument: ``False``/``"none"`` (off),
    ``True`` (same as ``"full"``) or a name from :data:`REMAT_POLICIES`."""
    if remat is None or remat is False or remat == "none":
        return False, None
    if remat is True:
        return True, None
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; use none or one of {', '.join(REMAT_POLICIES)}")
    return True, REMAT_POLICIES[remat]


def param(value: jax.Array, logical_axes: Sequence[str | None]) -> nnx.Param:
    """A parameter tagged with the logical names of its dimensions."""
    axes = tuple(logical_axes)
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, logical_axes=axes)


def logical_axes_of(variable: nnx.Variable) -> Axes:
    """The logical axis names a parameter was created with (all ``None`` when untagged)."""
    axes = variable.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * jnp.ndim(variable.get_value())


class LoRAWeight(nnx.Variable):
    """A low-rank adapter matrix (not an ``nnx.Param``, so base-weight I/O ignores it)."""


class LoRADropoutKey(nnx.Variable):
    """The PRNG key of one adapter's dropout for one call; set inside a training step only."""


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with the kernel stored ``[in, out]``.

    Inputs of any rank are flattened to 2-D around the matmul: XLA's CPU backend runs the
    weight-gradient dot with two contracting dimensions (batch and length) at half speed.

    With adapters attached (:meth:`add_lora`) and enabled, ``y += (dropout(x) @ lora_a @ lora_b)
    * alpha / rank`` (the PEFT convention); dropout is active only while a key is set.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        kernel = init_std * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype)
        self.kernel = param(kernel, axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
        self.axes = tuple(axes)
        # LoRA state (None / inactive until ``add_lora``). The adapter slots are declared data
        # (they will hold variables); scale, dropout rate and the on/off flag are static.
        self.lora_a: LoRAWeight | None = nnx.data(None)
        self.lora_b: LoRAWeight | None = nnx.data(None)
        self.lora_key: LoRADropoutKey | None = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.lora_enabled = True

    def add_lora(self, rank: int, alpha: float, dropout: float, key: jax.Array, param_dtype: jnp.dtype = jnp.float32) -> None:
        """Attach adapters: ``lora_a`` uniform in +-1/sqrt(in) (PEFT's Kaiming init), ``lora_b`` zero,
        so the adapted layer starts equal to the base layer."""
        bound = 1.0 / self.in_features**0.5
        a = jax.random.uniform(key, (self.in_features, rank), param_dtype, -bound, bound)
        self.lora_a = LoRAWeight(a, logical_axes=(self.axes[0], None))
        self.lora_b = LoRAWeight(jnp.zeros((rank, self.out_features), param_dtype), logical_axes=(None, self.axes[1]))
        self.lora_scale = float(alpha) / rank
        self.lora_dropout = float(dropout)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).astype(self.dtype)
        y = jnp.dot(x2, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None and self.lora_enabled:
            xa = x2
            if self.lora_dropout > 0.0 and self.lora_key is not None:
                keep = jax.random.bernoulli(self.lora_key[...], 1.0 - self.lora_dropout, xa.shape)
                xa = jnp.where(keep, xa / (1.0 - self.lora_dropout), 0.0).astype(xa.dtype)
            low = jnp.dot(xa, self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(low, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y.reshape(*lead, self.out_features)


class Embed(nnx.Module):
    """Token embedding table ``[vocab, embed]``; ``attend`` reuses it as a tied output head."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        table = init_std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype)
        self.embedding = param(table, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        logits = jnp.dot(flat, self.embedding[...].astype(self.dtype).T, preferred_element_type=jnp.float32)
        return logits.reshape(*lead, -1)


class RMSNorm(nnx.Module):
    """HF RMSNorm: normalise in float32, cast back, then scale (the scale is never folded)."""

    def __init__(self, features: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32, axis_name: str | None = None):
        self.eps = eps
        self.weight = param(jnp.ones((features,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``, the MLP of Llama, Qwen and the Qwen2.5-VL vision tower."""

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        use_bias: bool,
        init_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        common = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(features, hidden, axes=("embed", "mlp"), **common)
        self.up_proj = Linear(features, hidden, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(hidden, features, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
