"""Tiny random-init transformers decoders (PyTorch, fp32) and our ports of them, for tests.

Every config uses a non-default ``rope_theta`` and GQA, so a port that ignored either would
fail. Biases and norm scales are perturbed away from their zero/one initialisation so that
a port that dropped them would fail too.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from offside_jax.models import hf
from offside_jax.models.auto import create_model

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

TINY_CONFIGS = {
    "llama3.1": lambda: LlamaConfig(
        **COMMON,
        num_key_value_heads=2,
        rope_theta=50_000.0,
        max_position_embeddings=131_072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Small original context so the scaling actually changes frequencies at head_dim 16.
            "original_max_position_embeddings": 64,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "qwen2": lambda: Qwen2Config(
        **COMMON, num_key_value_heads=2, rope_theta=30_000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0
    ),
    "qwen3": lambda: Qwen3Config(
        **COMMON, num_key_value_heads=2, head_dim=24, rope_theta=20_000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0
    ),
    "smollm2": lambda: LlamaConfig(
        **COMMON,
        num_key_value_heads=1,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}


def make_reference(name: str, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A random-init transformers model (eval mode, fp32) and its config."""
    config = TINY_CONFIGS[name]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "bias" in pname or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model, config


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    # state_dict() of a tied model lists lm_head.weight too; HF files do not store it.
    tensors = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def port(model: torch.nn.Module, config) -> object:
    ours = create_model(config, abstract=True)
    hf.load_params_into(ours, hf.DictSource(torch_state_dict(model)))
    return ours
