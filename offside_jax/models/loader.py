"""The one model loader: every command gets its model, config and tokenizer from here.

``source`` is one vocabulary for every config (``offside_jax.config.ModelConfig.source`` and
the benchmark's ``model.source``):

- ``hf``: a Hugging Face checkpoint directory (config.json + safetensors + tokenizer);
- ``gguf``: a GGUF file (weights, config and tokenizer from the file);
- ``tiny``: a random-init Llama-family model of a given shape (the caller supplies the tokenizer,
  e.g. one trained on its data);
- ``tiny_vl``: a random-init Qwen2.5-VL of a given shape with a BPE tokenizer trained on the
  texts given (``offside_jax.models.tiny_vl``).

Placement: with ``sharding_fn`` (``offside_jax.train.mesh.sharding_fn(mesh)``) each device
reads only its slice of a checkpoint; random-init models are placed by the caller.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from flax import nnx

SOURCES = ("hf", "gguf", "tiny", "tiny_vl")


class LoaderError(ValueError):
    """A model that cannot be loaded as configured (the message names the setting)."""


@dataclasses.dataclass
class Loaded:
    model: nnx.Module
    hf_config: Any
    tokenizer: Any
    # What turns prompts (and images) into model inputs: a VisionProcessor for vision-language
    # models, the tokenizer otherwise.
    processor: Any = None

    def __post_init__(self):
        if self.processor is None:
            self.processor = self.tokenizer


def auto_tokenizer(path: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tiny_hf_config(shape: Any, tokenizer: Any) -> Any:
    """A transformers config for a random-init Llama-family model of ``shape`` (a dataclass with
    ``model_type`` and the config's numbers) and the tokenizer's special ids."""
    from transformers import AutoConfig

    values = dataclasses.asdict(shape)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        **values,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def load(
    source: str,
    *,
    path: str | None = None,
    tokenizer: Any = None,
    tiny: Any = None,
    texts: Callable[[], Sequence[str]] | None = None,
    seed: int = 0,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    remat: Any = False,
    attention: str = "auto",
    sharding_fn: Any = None,
    max_pixels: int | None = None,
) -> Loaded:
    """``(model, hf_config, tokenizer, processor)`` of ``source`` (see the module docstring).

    ``tokenizer``: a tokenizer object, or a directory to load one from (default: ``path`` for
    hf/gguf). ``tiny``: the shape of a random-init model. ``texts()``: the corpus a
    ``tiny_vl`` tokenizer is trained on. ``max_pixels``: image budget of a vision-language
    model's processor (hf sources).
    """
    from offside_jax.models import hf
    from offside_jax.models.auto import create_model

    if source not in SOURCES:
        raise LoaderError(f"model.source {source!r} is not one of {', '.join(SOURCES)}")
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = auto_tokenizer(tokenizer)
    if source == "tiny":
        if tokenizer is None:
            raise LoaderError("model.source=tiny needs a tokenizer (model.tokenizer or one trained on the data)")
        hf_config = tiny_hf_config(tiny, tokenizer)
        return Loaded(create_model(hf_config, seed=seed, **kwargs), hf_config, tokenizer)
    if source == "tiny_vl":
        from offside_jax.models import tiny_vl

        if tokenizer is None:
            if texts is None:
                raise LoaderError("model.source=tiny_vl needs texts to train its tokenizer on")
            tokenizer = tiny_vl.train_tokenizer(texts(), tiny.vocab_size)
        hf_config = tiny_vl.hf_config(tiny, tokenizer)
        processor = tiny_vl.processor(hf_config, tokenizer, tiny.image_size)
        return Loaded(tiny_vl.init_model(hf_config, seed=seed, attention=attention), hf_config, tokenizer, processor)
    if not path:
        raise LoaderError(f"model.path is required for model.source={source}")
    if source == "gguf":
        from offside_jax.models import gguf

        if not Path(path).is_file():
            raise LoaderError(f"model.path {path}: no such GGUF file")
        model, hf_config = gguf.load_gguf(path, sharding_fn=sharding_fn, **kwargs)
        return Loaded(model, hf_config, tokenizer if tokenizer is not None else gguf.load_gguf_tokenizer(path))
    hf_config = hf.load_hf_config(path)
    model = hf.load_pretrained(path, sharding_fn=sharding_fn, **kwargs)
    tokenizer = tokenizer if tokenizer is not None else auto_tokenizer(path)
    processor = tokenizer
    if is_vision_language(hf_config):
        from offside_jax.models.vision_inputs import VisionProcessor

        processor = VisionProcessor(hf_config, tokenizer, max_pixels=max_pixels or 256 * 256, allow_downscale=True)
    return Loaded(model, hf_config, tokenizer, processor)


def is_vision_language(hf_config: Any) -> bool:
    """Whether models of ``hf_config`` take images (from its family, never its name)."""
    from offside_jax.models.auto import family_of

    return family_of(hf_config).vision


__all__ = ["Loaded", "LoaderError", "SOURCES", "auto_tokenizer", "is_vision_language", "load", "tiny_hf_config"]
