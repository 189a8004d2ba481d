"""A character-level tokenizer for tiny self-correction runs on CPU.

Verifiable tasks such as carry arithmetic have a few dozen characters; one token per character
lets a 2-layer model learn digit-by-digit procedures (and their bugs) in minutes. Ids: 0 is
padding, 1 end-of-sequence, then the characters in the order given.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    chars: str
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer characters must be distinct")

    @classmethod
    def for_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Every character of ``texts``, sorted (deterministic ids)."""
        return cls("".join(sorted(set("".join(texts)))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        index = {c: i + 2 for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters {missing} are not in the tokenizer's alphabet {self.chars!r}")
        return [index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; padding and EOS are dropped."""
        return "".join(self.chars[i - 2] for i in ids if i >= 2)
