"""LoRA adapters on any model built from ``offside_jax.models.layers.Linear``.

Adapters are selected by a regular expression searched in each linear layer's HF-style dotted
path (``model.layers.0.self_attn.q_proj``), so ``"q_proj|v_proj"`` adapts the query and value
projections of every layer of every family. They live inside the layers as
:class:`~offside_jax.models.layers.LoRAWeight` variables (``lora_a`` [in, r], ``lora_b`` [r, out],
``lora_b`` zero so training starts from the base model):

- ``nnx.split(model, LoRAWeight, ...)`` separates adapters (trainable) from the base weights
  (frozen, ``nnx.Param``); only adapters enter the optimizer state;
- with adapters switched off (:func:`set_enabled`) the very same params are the frozen base
  model, which serves as the reference model of unlearning losses without a second copy;
- :func:`merge` folds ``kernel + lora_a @ lora_b * alpha / r`` into the base weights and
  :func:`save_merged` exports those as an HF safetensors checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from offside_jax.models.layers import Linear, LoRADropoutKey, LoRAWeight


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which layers get adapters and how big they are."""

    target: str = r"q_proj|v_proj"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.target)
        except re.error as e:
            raise ValueError(f"LoRA target {self.target!r} is not a valid regular expression: {e}") from None


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def linear_layers(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """(dotted path, layer) of every ``Linear`` in the model, in a deterministic order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield _dotted(path), node


def adapted_layers(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """The linear layers that carry adapters."""
    return ((p, layer) for p, layer in linear_layers(model) if layer.lora_a is not None)


def apply(model: nnx.Module, spec: LoRASpec, *, seed: int = 0) -> list[str]:
    """Attach adapters to every linear layer whose dotted path matches ``spec.target``.

    Returns the adapted paths. Raises if nothing matches (a typo must not silently train
    nothing) or if the output head is selected (the head's logits read its kernel directly).
    """
    pattern = re.compile(spec.target)
    layers = list(linear_layers(model))
    chosen = [(p, layer) for p, layer in layers if pattern.search(p)]
    if not chosen:
        examples = ", ".join(p for p, _ in layers[:8])
        raise ValueError(f"LoRA target {spec.target!r} matches no linear layer; paths look like: {examples}")
    if any(p == "lm_head" or p.endswith(".lm_head") for p, _ in chosen):
        raise ValueError(f"LoRA target {spec.target!r} selects lm_head, which does not support adapters")
    root = jax.random.key(seed)
    for i, (path, layer) in enumerate(chosen):
        if layer.lora_a is not None:
            raise ValueError(f"{path} already has LoRA adapters")
        layer.add_lora(spec.rank, spec.alpha, spec.dropout, jax.random.fold_in(root, i), layer.kernel.get_value().dtype)
    return [p for p, _ in chosen]


def has_adapters(model: nnx.Module) -> bool:
    return any(True for _ in adapted_layers(model))


def set_enabled(model: nnx.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the model computes exactly the base model)."""
    for _, layer in adapted_layers(model):
        layer.lora_enabled = enabled


@contextlib.contextmanager
def disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """``with lora.disabled(model) as base:`` runs the frozen base model."""
    states = [(layer, layer.lora_enabled) for _, layer in adapted_layers(model)]
    set_enabled(model, False)
    try:
        yield model
    finally:
        for layer, state in states:
            layer.lora_enabled = state


def set_dropout_key(model: nnx.Module, key: jax.Array | None) -> None:
    """Give each adapter with dropout its own key for this call (``None``: no dropout).

    Meant for use inside a jitted step on a model just merged from its state; the keys are
    never part of the saved or optimized state.
    """
    for i, (_, layer) in enumerate(adapted_layers(model)):
        if layer.lora_dropout > 0.0:
            layer.lora_key = None if key is None else LoRADropoutKey(jax.random.fold_in(key, i))


def merge(model: nnx.Module) -> nnx.Module:
    """Fold adapters into the base kernels (``kernel += a @ b * alpha / r``) and drop them, in place."""
    for _, layer in adapted_layers(model):
        kernel = layer.kernel[...]
        delta = (layer.lora_a[...].astype(jnp.float32) @ layer.lora_b[...].astype(jnp.float32)) * layer.lora_scale
        layer.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        layer.lora_a = layer.lora_b = layer.lora_key = None
        layer.lora_scale, layer.lora_dropout, layer.lora_enabled = 0.0, 0.0, True
    return model


def merged_copy(model: nnx.Module) -> nnx.Module:
    """A new model with the adapters folded in; ``model`` itself is left untouched."""
    return merge(nnx.clone(model))


def save_merged(model: nnx.Module, hf_config: Any, directory: str | os.PathLike, **kwargs) -> Path:
    """Export base + adapters as plain HF weights (config.json + safetensors)."""
    from offside_jax.models import hf

    return hf.save_pretrained(merged_copy(model), hf_config, directory, **kwargs)


def adapter_count(model: nnx.Module) -> int:
    """Number of adapter scalars (the trainable parameters of LoRA fine-tuning)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAWeight))))
