"""A stand-in tokenizer for span and concept-name tests: each word is one id, and a word after
a space gets a different id from the bare word, as BPE tokenizers spell " Ronaldo" and "Ronaldo"."""
from __future__ import annotations


class WordTokenizer:
    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert add_special_tokens is False, "callers must not add special tokens to names and phrases"
        words = text.split(" ")
        pieces = [("Ġ" if i > 0 or text.startswith(" ") else "") + w for i, w in enumerate(words) if w]
        return [self.vocab.setdefault(p, len(self.vocab) + 10) for p in pieces]
