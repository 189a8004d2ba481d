"""A small Qwen2.5-VL built from scratch for a corpus: tokenizer, config and input processor.

Used where no pretrained vision-language model is at hand (CPU demos, tests): a byte-level
BPE trained on the corpus with Qwen's special tokens, a transformers ``Qwen2_5_VLConfig``
with the shape in :class:`TinyVLConfig`, and a :class:`VisionProcessor` whose pixel budget
fits the images. The chat template is Qwen's without the default system turn (a model
trained from scratch needs no persona, and every prompt is shorter for it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)


@dataclasses.dataclass
class TinyVLConfig:
    """Shape of a from-scratch Qwen2.5-VL (every number goes into the transformers config)."""

    vocab_size: int = 2048  # BPE vocabulary trained on the corpus (special tokens included)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_heads: int = 2
    image_size: int = 112  # images are resized to at most image_size x image_size pixels


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with Qwen-VL's special tokens, trained on ``texts`` (deterministic)."""
    from offside_jax.data.bpe import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size, special_tokens=QWEN_VL_SPECIAL_TOKENS, pad_token="<|endoftext|>",
                               additional_special_tokens=QWEN_VL_SPECIAL_TOKENS[1:])


def hf_config(cfg: TinyVLConfig, tokenizer: Any):
    """The transformers ``Qwen2_5_VLConfig`` of a tiny model for ``tokenizer``'s ids."""
    from transformers import Qwen2_5_VLConfig

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 2:
        raise ValueError(f"hidden_size / num_attention_heads = {head_dim} must be even (rotary halves)")
    half = head_dim // 2
    # M-RoPE splits the rotary frequencies over (time, height, width): about 1/4, 3/8, 3/8.
    t = max(1, half // 4)
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    ids = {t_: tokenizer.convert_tokens_to_ids(t_) for t_ in QWEN_VL_SPECIAL_TOKENS}
    patch, merge = 14, 2
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=1e-6,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": mrope},
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        ),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
            num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=patch, spatial_merge_size=merge,
            temporal_patch_size=2, window_size=4 * patch * merge, fullatt_block_indexes=[cfg.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def processor(config: Any, tokenizer: Any, image_size: int):
    """A ``VisionProcessor`` that shrinks images to at most ``image_size`` squared pixels."""
    from offside_jax.models.vision_inputs import VisionProcessor

    return VisionProcessor(config, tokenizer, min_pixels=28 * 28, max_pixels=image_size * image_size,
                           allow_downscale=True)


def init_model(config: Any, seed: int = 0, attention: str = "auto"):
    """A randomly initialised model for ``config``, its initialisation compiled as one program.

    The same values as ``auto.create_model(config, seed=seed)``, which runs the initialisers
    op by op; on CPU, where compiling each op dominates a tiny model's start-up, the single
    program is compiled with XLA's cheap optimisation level.
    """
    import jax
    from flax import nnx

    from offside_jax.models.auto import create_model

    graphdef, _ = nnx.split(create_model(config, seed=seed, attention=attention, abstract=True))
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    init = jax.jit(lambda: nnx.split(create_model(config, seed=seed, attention=attention))[1],
                   compiler_options=options if jax.default_backend() == "cpu" else None)
    return nnx.merge(graphdef, init())
