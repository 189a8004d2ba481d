"""The one interface every model family exposes to the rest of the library.

Losses, evaluation, dampening and the training step talk to a model only through these
members; nothing outside ``offside_jax.models`` looks for attributes (``lm_head``,
``embed_tokens``, a vision tower) or asks what family a model is. A new family implements
this protocol (``LlamaForCausalLM`` does; ``Qwen2_5_VLForConditionalGeneration`` inherits
it and adds images).

- ``hidden_states(batch, collect_hidden=False)``: final-normed hidden states ``[B, T, D]`` of
  a batch (``input_ids``, ``attention_mask``, optional ``positions``/``segment_ids`` and the
  family's image inputs), and with ``collect_hidden`` the residual stream after each layer;
- ``logits(hidden)``: the output head over hidden states, float32 ``[..., V]``;
- ``output_head()``: the head as a plain ``[D, V]`` matrix for the fused cross-entropy, or
  ``None`` when it is not one (a bias, LoRA adapters on it): callers then use ``logits``;
- ``dtype``: what the model computes in (the fused cross-entropy's matmuls follow it);
- ``vision``: whether the model takes images, and ``image_inputs`` the batch keys that carry
  them (empty for text-only families);
- generation: ``init_cache(batch, length)``, ``prefill(inputs, cache)`` and
  ``decode_step(tokens, positions, cache, cache_index)`` (``offside_jax.models.generate``).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import jax


@runtime_checkable
class CausalLM(Protocol):
    dtype: Any
    vision: bool
    image_inputs: Sequence[str]

    def hidden_states(self, batch: Any, collect_hidden: bool = False) -> Any: ...

    def logits(self, hidden: jax.Array) -> jax.Array: ...

    def output_head(self) -> jax.Array | None: ...

    def init_cache(self, batch: int, length: int) -> Any: ...

    def prefill(self, inputs: dict[str, jax.Array], cache: Any) -> tuple[jax.Array, Any, jax.Array]: ...

    def decode_step(self, tokens: jax.Array, positions: jax.Array, cache: Any,
                    cache_index: jax.Array) -> tuple[jax.Array, Any]: ...


__all__ = ["CausalLM"]
