"""GGUF (llama.cpp) import: metadata -> transformers config, tensors -> our HF-named params.

A GGUF file holds the architecture numbers as ``{arch}.*`` metadata, the tokenizer as
``tokenizer.*`` metadata, and the weights under llama.cpp names (``blk.3.attn_q.weight``),
often block-quantized. :class:`GGUFSource` presents those weights as a
:class:`~offside_jax.models.hf.TensorSource` of dequantized float32 tensors under Hugging Face
names and in Hugging Face layout, so :func:`offside_jax.models.hf.load_params_into` does the
placement, sharding and shape checks exactly as for safetensors.

Two things differ from an HF checkpoint and are undone here:

- ggml lists dimensions fastest-first, so a GGUF shape ``[in, out]`` is the numpy/HF shape
  ``(out, in)``;
- llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` of ``llama``-architecture
  models (it wants RoPE pairs interleaved, HF keeps them split in halves). Qwen2/Qwen3 files
  are written without that permutation.

Weights are dequantized with the ``gguf`` package (the llama.cpp project's own reader), one
tensor at a time from a memory map, so loading never holds the whole file in memory twice.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.models import hf

# GGUF architecture -> transformers model_type. Only families our decoder port serves.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Architectures whose q/k rows llama.cpp's converter permutes (``LlamaModel.permute``).
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

_MISSING = object()


class GGUFError(hf.CheckpointError):
    """A GGUF file that cannot be loaded (missing, truncated, corrupt or unsupported)."""


def gguf_to_hf_name(name: str) -> str | None:
    """The HF tensor name of a llama.cpp tensor name, or None when it has no HF counterpart."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF half-split RoPE rows -> interleaved pairs).

    Rows are grouped per head as ``[2, rows_per_head // 2]`` and transposed to
    ``[rows_per_head // 2, 2]``; works on weights ``(rows, cols)`` and biases ``(rows,)``.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of :func:`permute_qk` (a pure index shuffle, no arithmetic)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... deep in numpy on bad bytes
        raise GGUFError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


class GGUFSource:
    """The weights of one GGUF file as HF-named, HF-shaped float32 tensors (a ``TensorSource``).

    ``metadata(key)`` reads one metadata value; :meth:`hf_config` builds the transformers
    config. Tensors without an HF counterpart are listed in ``unmapped``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.architecture = self.metadata("general.architecture")
        self._tensors: dict[str, Any] = {}
        self.unmapped: list[str] = []
        for tensor in self.reader.tensors:
            name = gguf_to_hf_name(tensor.name)
            if name is None:
                self.unmapped.append(tensor.name)
            else:
                self._tensors[name] = tensor
        self._permute_heads: dict[str, int] = {}
        if self.architecture in _PERMUTED_ARCHITECTURES:
            heads = self.arch_metadata("attention.head_count")
            kv_heads = self.arch_metadata("attention.head_count_kv", heads)
            for name in self._tensors:
                if ".self_attn.q_proj." in name:
                    self._permute_heads[name] = heads
                elif ".self_attn.k_proj." in name:
                    self._permute_heads[name] = kv_heads
        # make_array_from_callback asks for one tensor once per device: keep the last one.
        self._last: tuple[str, np.ndarray] | None = None

    # -- metadata ---------------------------------------------------------------------------

    def metadata(self, key: str, default: Any = _MISSING) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: cannot read metadata key {key!r} (corrupt file?): {e}") from None
        return value

    def arch_metadata(self, key: str, default: Any = _MISSING) -> Any:
        return self.metadata(f"{self.architecture}.{key}", default)

    def has_tensor(self, gguf_name: str) -> bool:
        return any(t.name == gguf_name for t in self.reader.tensors)

    def hf_config(self):
        return hf_config_from_gguf(self)

    # -- TensorSource -----------------------------------------------------------------------

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def where(self, name: str) -> str:
        return f"{self.path} (GGUF tensor {self._tensors[name].name!r})"

    def shape(self, name: str) -> tuple[int, ...]:
        # ggml dims are fastest-first: reversed they are the numpy (and HF) shape.
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def read(self, name: str) -> np.ndarray:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        import gguf

        tensor = self._tensors[name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            array = np.asarray(array, np.float32).reshape(self.shape(name))
        except NotImplementedError:
            raise GGUFError(
                f"{self.where(name)}: quantization type {tensor.tensor_type.name} cannot be dequantized "
                f"by the installed gguf package (try a newer gguf, or a file with another quantization)"
            ) from None
        except Exception as e:
            raise GGUFError(f"{self.where(name)}: cannot read tensor (truncated or corrupt?): {e}") from None
        if name in self._permute_heads:
            array = unpermute_qk(array, self._permute_heads[name])
        self._last = (name, array)
        return array


def hf_config_from_gguf(source: GGUFSource | str | os.PathLike):
    """The transformers config (LlamaConfig, Qwen2Config or Qwen3Config) a GGUF file describes."""
    import transformers

    src = source if isinstance(source, GGUFSource) else GGUFSource(source)
    arch = src.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{src.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    if src.has_tensor("rope_freqs.weight"):
        # Llama 3.1+ files carry their RoPE scaling as a per-frequency factor tensor, whose
        # parameters (low/high frequency factors) are not in the metadata.
        raise GGUFError(f"{src.path}: per-frequency RoPE factors (rope_freqs.weight) are not supported")
    a = src.arch_metadata

    def integer(key: str, default: Any = _MISSING) -> int:
        value = a(key, default)
        if not isinstance(value, (int, np.integer)):
            raise GGUFError(f"{src.path}: metadata {arch}.{key} = {value!r} is not one integer (unsupported)")
        return int(value)

    hidden = integer("embedding_length")
    heads = integer("attention.head_count")
    head_dim = integer("attention.key_length", hidden // heads)
    if integer("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{src.path}: different key and value head sizes are not supported")
    if integer("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{src.path}: partial rotary embeddings (rope.dimension_count < head size) are not supported")
    if src.has_tensor("token_embd.weight"):
        embed_rows = src.shape("model.embed_tokens.weight")[0]
    else:
        raise GGUFError(f"{src.path}: tensor 'token_embd.weight' is missing")

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(a("rope.freq_base", 10000.0))}
    scaling = a("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(a("rope.scaling.factor")))
    elif scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=float(a("rope.scaling.factor")),
            original_max_position_embeddings=integer("rope.scaling.original_context_length"),
        )
    elif scaling != "none":
        raise GGUFError(f"{src.path}: RoPE scaling type {scaling!r} is not supported")

    def token_id(key: str) -> int | None:
        value = src.metadata(f"tokenizer.ggml.{key}", None)
        return None if value is None else int(value)

    kwargs = dict(
        vocab_size=integer("vocab_size", embed_rows),
        hidden_size=hidden,
        intermediate_size=integer("feed_forward_length"),
        num_hidden_layers=integer("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=integer("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=integer("context_length"),
        rope_parameters=rope,
        # llama.cpp omits output.weight when the head shares the embedding matrix.
        tie_word_embeddings=not src.has_tensor("output.weight"),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
    )
    model_type = ARCHITECTURES[arch]
    if model_type == "llama":
        kwargs["attention_bias"] = src.has_tensor("blk.0.attn_q.bias")
        return transformers.LlamaConfig(**kwargs)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    return transformers.Qwen3Config(**kwargs)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
    attention: str = "auto",
    sharding_fn: hf.ShardingFn | None = None,
) -> tuple[nnx.Module, Any]:
    """Load a GGUF file into our port: returns ``(model, hf_config)``.

    Quantized weights are dequantized to float32 and cast to ``param_dtype``. With a
    ``sharding_fn`` each parameter is placed directly onto its sharding. Raises
    :class:`GGUFError` (a :class:`~offside_jax.models.hf.CheckpointError`) naming the file for a
    missing, truncated, corrupt or unsupported file.
    """
    from offside_jax.models.auto import create_model, family_of

    source = GGUFSource(path)
    hf_config = hf_config_from_gguf(source)
    if source.unmapped:
        # A tensor we cannot place is a part of the architecture we would silently drop.
        raise GGUFError(f"{source.path}: tensors with no counterpart in our port: {', '.join(source.unmapped[:8])}")
    family = family_of(hf_config)
    model = create_model(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention,
                         abstract=True)
    used = {family.hf_names(path)[0][0] for path, _ in hf.iter_params(model)}
    unused = sorted(set(source.names()) - used)
    if unused:
        raise GGUFError(f"{source.path}: tensors not used by the {hf_config.model_type} port: {', '.join(unused[:8])}")
    hf.load_params_into(model, source, names=family.hf_names, sharding_fn=sharding_fn)
    return model, hf_config


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (with its chat template) stored in a GGUF file, via transformers (offline)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except ImportError as e:
        raise GGUFError(
            f"{path}: transformers reads GGUF tokenizers with code that needs PyTorch; "
            f"install the CPU build (pip install torch) or load a tokenizer directory instead ({e})"
        ) from None
    except Exception as e:  # a corrupt file fails anywhere inside transformers' GGUF reader
        raise GGUFError(f"{path}: cannot read the tokenizer (truncated or corrupt?): {type(e).__name__}: {e}") from None
