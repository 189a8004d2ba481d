"""Model families by transformers ``model_type``: one place that knows which port serves which."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from offside_jax.models import hf


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one family and name its tensors in HF checkpoints."""

    name: str
    model_types: tuple[str, ...]
    create: Callable[..., nnx.Module]
    hf_names: hf.NameFn = hf.default_names
    vision: bool = False  # takes images (pixel_values + image_grid_thw) besides token ids


def _llama_create(hf_config: Any, **kwargs) -> nnx.Module:
    from offside_jax.models import llama

    return llama.create(hf_config, **kwargs)


def _qwen_vl_create(hf_config: Any, **kwargs) -> nnx.Module:
    from offside_jax.models import qwen2_5_vl

    return qwen2_5_vl.create(hf_config, **kwargs)


def _qwen_vl_names(path: hf.Path_) -> list[tuple[str, bool]]:
    from offside_jax.models import qwen2_5_vl

    return qwen2_5_vl.hf_names(path)


FAMILIES: list[Family] = [
    Family("llama", ("llama", "qwen2", "qwen3"), _llama_create),
    Family("qwen2_5_vl", ("qwen2_5_vl", "qwen2_vl"), _qwen_vl_create, _qwen_vl_names, vision=True),
]


def register_family(family: Family) -> None:
    FAMILIES.append(family)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(hf_config: Any) -> Family:
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")


def create_model(hf_config: Any, **kwargs) -> nnx.Module:
    """Instantiate the port for ``hf_config`` (kwargs: dtype, param_dtype, remat, seed, abstract)."""
    return family_of(hf_config).create(hf_config, **kwargs)
