"""The Llama-style decoder family in Flax NNX: Llama 2/3/3.x, Qwen2/2.5, Qwen3, SmolLM2.

One implementation, configured from the transformers config object alone. The differences
between the families are flags read from that config: q/k/v biases (Qwen2), per-head q/k
RMSNorm (Qwen3), tied embeddings (SmolLM2, small Qwen), RoPE scaling (Llama 3.1+), sliding
window layers. Parameter paths mirror the HF module names (``model.layers.3.self_attn.q_proj``)
so weight I/O is a key table (``offside_jax.models.hf``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    SwiGLU,
    remat_setting,
)
from offside_jax.models.attention import AttentionSpec, attention, check_implementation
from offside_jax.models.rope import apply_rope, rope_cos_sin, rope_frequencies

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> jnp.dtype:
    """Accept ``jnp.float32``, ``"bfloat16"``, ``"bf16"``... and return a jnp dtype."""
    if isinstance(dtype, str):
        key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        return _DTYPES[key]
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Every architectural number of a decoder, read from a transformers config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: tuple[tuple[str, Any], ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_parameters)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "DecoderConfig":
        """Build from a ``transformers.PretrainedConfig`` (or its ``to_dict()``)."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} for the Llama-family decoder; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        rope = get("rope_parameters") or {}
        if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
            raise NotImplementedError("per-layer-type rope_parameters are not supported")
        rope = dict(rope)
        # transformers 4.x configs carry rope_theta / rope_scaling separately.
        if "rope_theta" not in rope:
            rope["rope_theta"] = get("rope_theta", 10000.0)
        legacy_scaling = get("rope_scaling")
        if legacy_scaling and "rope_type" not in rope:
            rope.update(legacy_scaling)
        rope.setdefault("rope_type", rope.pop("type", "default"))

        n_layers = get("num_hidden_layers")
        layer_types = get("layer_types") or ["full_attention"] * n_layers
        window = get("sliding_window")
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        attention_bias = bool(get("attention_bias", False))
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps"),
            rope_parameters=tuple(sorted(rope.items())),
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=windows,
            initializer_range=get("initializer_range", 0.02),
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=get("pad_token_id"),
        )


class KVCache(NamedTuple):
    """Per-layer key/value buffers [B, S, KV, D] and the validity of each slot [B, S]."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, length: int, dtype: jnp.dtype = jnp.float32) -> "KVCache":
        shape = (batch, length, config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            valid=jnp.zeros((batch, length), jnp.int32),
        )


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int, *, dtype, param_dtype, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        common = dict(init_std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.sliding_window = config.sliding_windows[layer_idx]
        self.attention_impl = attention_impl  # static: offside_jax.models.attention.IMPLEMENTATIONS
        self.q_proj = Linear(d, h * hd, axes=("embed", "heads"), use_bias=config.qkv_bias, **common)
        self.k_proj = Linear(d, kv * hd, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **common)
        self.v_proj = Linear(d, kv * hd, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **common)
        self.o_proj = Linear(h * hd, d, axes=("heads", "embed"), use_bias=config.o_bias, **common)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, query_slots, key_valid, cache_kv=None, cache_index=None, segment_ids=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
        spec = AttentionSpec(scale=self.head_dim**-0.5, sliding_window=self.sliding_window,
                             cached=cache_kv is not None, implementation=self.attention_impl)
        out = attention(q, k, v, spec, query_slots=query_slots, key_valid=key_valid, segment_ids=segment_ids)
        return self.o_proj(out), (k, v)


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int, *, dtype, param_dtype, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, layer_idx, dtype=dtype, param_dtype=param_dtype,
                                   attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(
            config.hidden_size,
            config.intermediate_size,
            use_bias=config.mlp_bias,
            init_std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, query_slots, key_valid, cache_kv=None, cache_index=None, segment_ids=None):
        attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, query_slots, key_valid, cache_kv, cache_index,
                                      segment_ids)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class DecoderModel(nnx.Module):
    """The decoder stack (HF ``model.*``): embeddings, layers, final norm."""

    def __init__(self, config: DecoderConfig, *, dtype, param_dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        self.embed_tokens = Embed(
            config.vocab_size, config.hidden_size, init_std=config.initializer_range,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
             for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """Causal LM over the decoder stack, HF-named (``model.*``, ``lm_head``).

    ``remat`` recomputes each decoder layer in the backward pass (activation memory of one
    layer instead of all of them): ``True``/``"full"``, or a policy name from
    ``offside_jax.models.layers.REMAT_POLICIES`` (e.g. ``"dots_saveable"`` keeps matmul outputs).
    ``attention`` picks the attention implementation (``offside_jax.models.attention``: auto,
    xla, cudnn, splash).
    """

    def __init__(
        self,
        config: DecoderConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool | str = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        remat_setting(remat)  # an unknown policy name fails here, not in the first step
        check_implementation(attention)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.model = DecoderModel(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, axes=("embed", "vocab"),
                init_std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )
        inv_freq, self.rope_scale = rope_frequencies(config.rope, config.head_dim, config.max_position_embeddings)
        # Static constants (part of the graph definition), never trained, saved or sharded.
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)

    # Text only (offside_jax.models.interface): no batch key carries images.
    vision = False
    image_inputs: tuple[str, ...] = ()

    # -- pieces -------------------------------------------------------------------------------

    def output_head(self) -> jax.Array | None:
        """The output projection as a [D, V] matrix (the tied embedding's transpose), or
        ``None`` when the head is not a plain matmul (a bias, LoRA adapters)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        if self.lm_head.bias is not None or self.lm_head.lora_a is not None:
            return None
        return self.lm_head.kernel[...]

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output head over final hidden states; float32 logits (accumulated in float32)."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.shape[-1]).astype(self.dtype)
        out = jnp.dot(flat, self.lm_head.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return out.reshape(*lead, -1)

    def decode_hidden(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        rope_cos_sin_override: tuple[jax.Array, jax.Array] | None = None,
        collect_hidden: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None, list[jax.Array]]:
        """Run the layers over embeddings [B, T, D].

        Without a cache, ``attention_mask`` [B, T] marks real tokens. With a cache,
        ``attention_mask`` [B, S] marks valid cache slots *after* this call's tokens are
        written at ``cache_index``. ``rope_cos_sin_override`` lets multimodal models supply
        their own rotary tables (3-D M-RoPE). ``segment_ids`` [B, T] separates sequences packed
        into one row (their ``positions`` restart per segment). Returns final-normed hidden states, the updated
        cache, and (optionally) the residual stream after each layer.
        """
        t = inputs_embeds.shape[1]
        if rope_cos_sin_override is None:
            cos, sin = rope_cos_sin(positions, jnp.asarray(self.rope_inv_freq, jnp.float32), self.rope_scale)
        else:
            cos, sin = rope_cos_sin_override
        query_slots = jnp.arange(t) + cache_index
        remat, policy = remat_setting(self.remat)
        layer_fn = nnx.remat(DecoderLayer.__call__, policy=policy) if remat else DecoderLayer.__call__
        x = inputs_embeds.astype(self.dtype)
        new_keys, new_values, hidden = [], [], []
        for i, layer in enumerate(self.model.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, (k, v) = layer_fn(layer, x, cos, sin, query_slots, attention_mask, cache_kv, cache_index, segment_ids)
            new_keys.append(k)
            new_values.append(v)
            if collect_hidden:
                hidden.append(x)
        x = self.model.norm(x)
        new_cache = None if cache is None else KVCache(tuple(new_keys), tuple(new_values), attention_mask)
        return x, new_cache, hidden

    def hidden_states(self, batch: dict[str, jax.Array], collect_hidden: bool = False):
        """Final-normed hidden states [B, T, D] of a training batch (``input_ids``, optional
        ``attention_mask``, ``positions`` and packed ``segment_ids``) and, with ``collect_hidden``, the residual stream
        after each layer. Every family implements this: it is the entry point for losses."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = jnp.ones(input_ids.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
        positions = batch.get("positions")
        positions = positions_from_mask(mask) if positions is None else positions
        hidden, _, per_layer = self.decode_hidden(self.embed(input_ids), positions, mask, collect_hidden=collect_hidden,
                                                  segment_ids=batch.get("segment_ids"))
        return (hidden, per_layer) if collect_hidden else hidden

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (float32) for a (possibly left- or right-padded) batch."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden, _, _ = self.decode_hidden(self.embed(input_ids), positions, attention_mask)
        return self.logits(hidden)

    # -- generation protocol (offside_jax.models.generate) -------------------------------------

    def init_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.zeros(self.config, batch, length, self.dtype)

    def prefill(self, inputs: dict[str, jax.Array], cache: KVCache) -> tuple[jax.Array, KVCache, jax.Array]:
        """Fill the cache with left-padded prompts; last-token logits and each row's next position."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt_len = input_ids.shape[1]
        valid = jnp.zeros(cache.valid.shape, jnp.int32).at[:, :prompt_len].set(mask.astype(jnp.int32))
        positions = positions_from_mask(mask)
        hidden, cache, _ = self.decode_hidden(self.embed(input_ids), positions, valid, cache, 0)
        return self.logits(hidden[:, -1]), cache, positions[:, -1] + 1

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache, cache_index: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """One token per row at cache slot ``cache_index``; returns its logits [B, V]."""
        valid = jax.lax.dynamic_update_slice(
            cache.valid, jnp.ones((tokens.shape[0], 1), jnp.int32), (0, cache_index)
        )
        hidden, cache, _ = self.decode_hidden(self.embed(tokens[:, None]), positions[:, None], valid, cache, cache_index)
        return self.logits(hidden[:, 0]), cache


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that count only real tokens (0 for padding), as HF generation does."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def create(
    hf_config: Any,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool | str = False,
    attention: str = "auto",
    seed: int = 0,
    abstract: bool = False,
) -> LlamaForCausalLM:
    """Instantiate from a transformers config. ``abstract=True`` allocates nothing (shapes only)."""
    config = hf_config if isinstance(hf_config, DecoderConfig) else DecoderConfig.from_hf(hf_config)

    def make() -> LlamaForCausalLM:
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention,
                                rngs=nnx.Rngs(params=seed))

    return nnx.eval_shape(make) if abstract else make()


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
