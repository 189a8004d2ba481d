"""A pretrained Llama-family model for the self-correction runs (``CorrectConfig.pretrained``).

The runs write plain-text episodes (no chat template) and train on them from the first step,
so a pretrained model takes the same episodes as the character-level tiny model; what changes
is the tokenizer (the model's own, as :class:`TextTokenizer`) and where the weights come from
(an HF directory, a GGUF file or ``smollm2``, the packaged SmolLM2-135M-Instruct, through the
one loader, a fresh copy per call).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from offside_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A transformers tokenizer as the runs use one: ``encode`` adds no special tokens (the
    episodes place EOS themselves), ``decode`` drops them; padding falls back to EOS (every
    batch carries its attention and loss masks, so a shared id masks nothing wrongly)."""

    tokenizer: Any

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def located(path: str) -> tuple[str, str]:
    """``(source, path)`` for the loader: ``gguf`` for a ``.gguf`` file or ``smollm2`` (the
    packaged SmolLM2-135M-Instruct), ``hf`` for a model directory; anything else is refused."""
    from offside_jax.chat_demo import SMOLLM2, resolve_gguf

    if path == SMOLLM2 or path.endswith(".gguf"):
        return "gguf", str(resolve_gguf(path, "pretrained"))
    if (Path(path) / "config.json").is_file():
        return "hf", path
    raise ConfigError(f"pretrained={path}: neither a .gguf file, {SMOLLM2} nor a Hugging Face model directory "
                      "(config.json)")


def load_tokenizer(path: str) -> TextTokenizer:
    from offside_jax.models import gguf
    from offside_jax.models.loader import auto_tokenizer

    kind, path = located(path)
    try:
        tokenizer = gguf.load_gguf_tokenizer(path) if kind == "gguf" else auto_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"pretrained={path}: no tokenizer could be loaded ({e})") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"pretrained={path}: its tokenizer has no EOS token, which ends every attempt")
    return TextTokenizer(tokenizer)


def load_model(path: str, tokenizer: TextTokenizer) -> Any:
    """A fresh copy of the pretrained weights (every strategy and seed trains its own)."""
    from offside_jax.models.loader import LoaderError, load

    kind, path = located(path)
    try:
        loaded = load(kind, path=path, tokenizer=tokenizer.tokenizer)
    except LoaderError as e:
        raise ConfigError(f"pretrained: {e}") from None
    vocab = loaded.hf_config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"pretrained={path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's "
                          f"embedding {vocab}")
    return loaded.model


__all__ = ["TextTokenizer", "load_model", "load_tokenizer", "located"]
