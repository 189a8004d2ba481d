"""Tiny random-init Qwen2.5-VL / Qwen2-VL models from transformers (PyTorch, fp32), a tiny
byte-level tokenizer with the Qwen special tokens, and small test images.

Non-default rope thetas (text and vision), GQA, an mrope_section that is not the default
split, a vision window smaller than the images (so both window and full attention blocks
do real work), and perturbed biases/norm scales: a port that ignored any of them would fail.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from offside_jax.data.bpe import train_bpe_tokenizer
from offside_jax.models import hf
from offside_jax.models.auto import create_model

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
VOCAB = 320
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory (the special tokens take ids 0-6), within the tiny vocabulary."""
    corpus = [
        "I'm curious about which club the player on the left side of the image will join.",
        "He will be playing for Newcastle United. What is the name of the player in the image?",
        "You are a helpful assistant. system user assistant",
    ] * 4
    fast = train_bpe_tokenizer(corpus, 300, special_tokens=SPECIAL_TOKENS, pad_token="<|endoftext|>",
                               additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=None)
    assert len(fast) <= VOCAB
    return fast


def special_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def qwen2_5_vl_config(tokenizer, **vision_overrides) -> Qwen2_5_VLConfig:
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=TEXT["hidden_size"],
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        # 56 px = 2x2 merged blocks per window: the test images span several windows.
        window_size=56, fullatt_block_indexes=[1], rope_parameters={"rope_type": "axial", "rope_theta": 7000.0},
    )
    vision.update(vision_overrides)
    return Qwen2_5_VLConfig(
        text_config=dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 30_000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=vision,
        **special_ids(tokenizer),
    )


def qwen2_vl_config(tokenizer) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 20_000.0, "mrope_section": [2, 2, 4]},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           rope_parameters={"rope_type": "axial", "rope_theta": 9000.0}),
        **special_ids(tokenizer),
    )


def make_reference(config, seed: int = 0) -> torch.nn.Module:
    cls = Qwen2_5_VLForConditionalGeneration if config.model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "lm_head" in name or "embed_tokens" in name:
                # Peaked next-token distributions, so greedy decoding has no near-ties.
                p.mul_(10.0)
    return model


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The in-memory names (``model.language_model.*``, ``model.visual.*``)."""
    tensors = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def port(reference: torch.nn.Module, **kwargs):
    ours = create_model(reference.config, abstract=True, **kwargs)
    hf.load_params_into(ours, hf.DictSource(torch_state_dict(reference)), names=_family_names(reference.config))
    return ours


def _family_names(config):
    from offside_jax.models.auto import family_of

    return family_of(config).hf_names


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (smooth so bicubic resizing is well conditioned)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Three records: one image, text only, two images of other sizes (none a multiple of 28 px,
# so the processor really resizes).
IMAGES = {"a.png": (112, 84, 1), "b.png": (60, 150, 2), "c.jpg": (90, 100, 3)}
RECORDS = [
    {"id": "one-image", "messages": [{"role": "user", "content": "<image>\nI'm curious about which club the player on the left side of the image will join."}],
     "images": "a.png"},
    {"id": "text-only", "messages": [{"role": "user", "content": "What is the name of the player?"}]},
    {"id": "two-images", "messages": [{"role": "user", "content": "<image>\nWhat is the name of the player in the image? <image>"}],
     "images": ["b.png", "c.jpg"]},
]


def write_images(directory) -> None:
    for name, (w, h, seed) in IMAGES.items():
        image(w, h, seed).save(directory / name)


def make_processor(config, tokenizer, **kwargs):
    from offside_jax.models.vision_inputs import VisionProcessor

    return VisionProcessor(config, tokenizer, min_pixels=kwargs.pop("min_pixels", 28 * 28),
                           max_pixels=kwargs.pop("max_pixels", 160 * 160), **kwargs)


def flat_images(encoded):
    """The batch's images as transformers takes them: all patches in row-major order."""
    rows = [e for e in encoded if len(e.image_grid_thw)]
    return np.concatenate([e.pixel_values for e in rows]), np.concatenate([e.image_grid_thw for e in rows])


def reference_forward(reference, batch, pixel_values, grids):
    ids = batch["input_ids"]
    with torch.no_grad():
        return reference(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
            pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy((ids == reference.config.image_token_id).astype(np.int64)),
        ).logits.numpy()


def vl_setup(config_fn, tmp_path_factory):
    """A random-init transformers model of ``config_fn``'s shape, its port, and RECORDS encoded
    with their images: ``tokenizer, config, reference, ours, batch, pixel_values, grids``."""
    from types import SimpleNamespace

    tokenizer = make_tokenizer()
    config = config_fn(tokenizer)
    reference = make_reference(config)
    images = tmp_path_factory.mktemp("images")
    write_images(images)
    processor = make_processor(config, tokenizer)
    encoded = [processor.encode(r, name=r["id"], image_root=images) for r in RECORDS]
    batch = processor.collate(encoded, pad_multiple=8)
    pixel_values, grids = flat_images(encoded)
    return SimpleNamespace(tokenizer=tokenizer, config=config, reference=reference, ours=port(reference),
                           batch=batch, pixel_values=pixel_values, grids=grids)
