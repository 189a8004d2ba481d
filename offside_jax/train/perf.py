"""Performance against the hardware limit: training FLOPs and MFU, the decode roofline.

**Training FLOPs** follow MaxText's ``calculate_tflops_training_per_device`` (a step is forward
+ backward = 3 x the forward matmul FLOPs; rematerialised recomputation is *not* counted, so
this is model FLOPs utilisation, not hardware FLOPs utilisation):

- learnable weights: ``6 * N * tokens`` where ``N`` counts the weights of every matmul: per
  layer q/k/v/o and the three SwiGLU projections, plus the output head once (``vocab * d``,
  tied or not). The input embedding is a lookup (no FLOPs); norms and biases are ignored.
- attention: ``12 * layers * heads * head_dim * seq^2 * batch`` for full (non-causal) scores
  (QK^T and AV, 2 FLOPs per multiply-add, x3 for forward + backward), **halved for causal
  attention** as MaxText does (only the lower triangle is needed): ``6 * L * H * hd * S^2 * B``.

``MFU = training FLOPs per step / step seconds / (peak FLOP/s per device * devices)``.

**Decode roofline**: a decode step of batch ``B`` reads every weight once and the whole
allocated KV cache (attention reads every slot, masked or not), so it cannot be faster than
``bytes / memory bandwidth``; tokens/s at that bound is ``B * bandwidth / bytes``, and the
fraction reached is ``(bytes / measured step seconds) / bandwidth``.

Peak numbers are vendor figures for dense bf16 matmuls (no sparsity) and HBM bandwidth;
measure rather than trust them where possible (``scripts/bench.py`` measures the CPU's
matmul peak and every device's read bandwidth).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

# device_kind pattern -> dense bf16 FLOP/s per device (one GPU, one TPU chip).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756e12),
    (r"H100|H800", 989e12),  # SXM
    (r"H200", 989e12),
    (r"A100", 312e12),
    (r"TPU v4", 275e12),
    (r"TPU v5 ?lite|TPU v5e", 197e12),
    (r"TPU v5p|TPU v5$", 459e12),
    (r"TPU v6 ?lite|TPU v6e", 918e12),
)
# device_kind pattern -> HBM bandwidth (bytes/s) per device, vendor figures.
PEAK_HBM_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 2.0e12),
    (r"H100|H800", 3.35e12),
    (r"H200", 4.8e12),
    (r"A100.*80GB", 2.039e12),
    (r"A100", 1.555e12),
    (r"TPU v4", 1.2e12),
    (r"TPU v5 ?lite|TPU v5e", 0.819e12),
    (r"TPU v5p|TPU v5$", 2.765e12),
    (r"TPU v6 ?lite|TPU v6e", 1.64e12),
)


def _lookup(table: tuple[tuple[str, float], ...], device_kind: str) -> float | None:
    for pattern, value in table:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return value
    return None


def peak_bf16_flops(device_kind: str) -> float | None:
    """Vendor dense bf16 FLOP/s of one device (``jax.Device.device_kind``); ``None`` if unknown."""
    return _lookup(PEAK_BF16_FLOPS, device_kind)


def peak_hbm_bandwidth(device_kind: str) -> float | None:
    """Vendor HBM bytes/s of one device; ``None`` if unknown (CPUs: measure instead)."""
    return _lookup(PEAK_HBM_BYTES_PER_S, device_kind)


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """The numbers of a Llama-family decoder that FLOPs and bytes depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf_config: Any) -> "TransformerShape":
        """From a transformers config (text part of a VL config is not handled here)."""
        from offside_jax.models.llama import DecoderConfig

        c = DecoderConfig.from_hf(hf_config)
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                   c.intermediate_size, c.vocab_size, c.tie_word_embeddings)

    @property
    def layer_matmul_params(self) -> int:
        """q, k, v, o and gate/up/down weights of one layer."""
        d, hd = self.hidden, self.head_dim
        return d * hd * (2 * self.heads + 2 * self.kv_heads) + 3 * d * self.intermediate

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: the layers and the output head."""
        return self.layers * self.layer_matmul_params + self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Every parameter: layers, norms, embedding (and a separate head unless tied)."""
        norms = (2 * self.layers + 1) * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * self.layer_matmul_params + norms + self.vocab * self.hidden + head


def training_flops(shape: TransformerShape, batch: int, seq: int, *, causal: bool = True) -> dict[str, float]:
    """FLOPs of one training step (forward + backward) over ``batch`` rows of ``seq`` tokens.

    Returns ``weights`` (6 N tokens), ``attention`` (halved when ``causal``) and ``total``.
    """
    tokens = batch * seq
    weights = 6.0 * shape.matmul_params * tokens
    attention = 12.0 * shape.layers * shape.heads * shape.head_dim * seq * seq * batch
    if causal:
        attention /= 2.0
    return {"weights": weights, "attention": attention, "total": weights + attention}


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
    if step_seconds <= 0 or peak_flops_per_device <= 0 or devices < 1:
        raise ValueError(f"need positive step time, peak and device count, got {step_seconds}, {peak_flops_per_device}, {devices}")
    return flops_per_step / step_seconds / (peak_flops_per_device * devices)


def kv_cache_bytes(shape: TransformerShape, batch: int, length: int, bytes_per_value: int) -> int:
    """Bytes of a KV cache of ``length`` slots: keys and values of every layer."""
    return 2 * shape.layers * batch * length * shape.kv_heads * shape.head_dim * bytes_per_value


@dataclasses.dataclass(frozen=True)
class DecodeRoofline:
    """One decode step against the memory-bandwidth bound."""

    bytes_per_step: int
    step_seconds: float
    bandwidth: float  # bytes/s the step is compared with (measured or peak)
    batch: int

    @property
    def achieved_bandwidth(self) -> float:
        return self.bytes_per_step / self.step_seconds

    @property
    def fraction(self) -> float:
        """Share of the bandwidth the step reached (1.0 = at the roofline)."""
        return self.achieved_bandwidth / self.bandwidth

    @property
    def bound_tokens_per_second(self) -> float:
        """Tokens/s if every step ran at the bandwidth limit."""
        return self.batch * self.bandwidth / self.bytes_per_step

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.step_seconds

    def as_dict(self) -> dict[str, float]:
        return {
            "bytes_read_per_step": self.bytes_per_step,
            "step_ms": self.step_seconds * 1e3,
            "achieved_gbs": self.achieved_bandwidth / 1e9,
            "bandwidth_gbs": self.bandwidth / 1e9,
            "bandwidth_fraction": self.fraction,
            "tokens_per_second": self.tokens_per_second,
            "bandwidth_bound_tokens_per_s": self.bound_tokens_per_second,
        }


def decode_roofline(weight_bytes: int, cache_bytes: int, step_seconds: float, bandwidth: float, batch: int) -> DecodeRoofline:
    """The roofline of a decode step that reads ``weight_bytes`` + ``cache_bytes``."""
    if step_seconds <= 0 or bandwidth <= 0:
        raise ValueError(f"need positive step time and bandwidth, got {step_seconds}, {bandwidth}")
    return DecodeRoofline(int(weight_bytes + cache_bytes), float(step_seconds), float(bandwidth), int(batch))


__all__ = [
    "DecodeRoofline",
    "PEAK_BF16_FLOPS",
    "PEAK_HBM_BYTES_PER_S",
    "TransformerShape",
    "decode_roofline",
    "kv_cache_bytes",
    "mfu",
    "peak_bf16_flops",
    "peak_hbm_bandwidth",
    "training_flops",
]
