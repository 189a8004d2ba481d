"""A byte-level BPE tokenizer trained in memory on a corpus, for models trained from scratch
(tiny CPU demos and tests): ``tokenizers`` trains it, ``transformers`` wraps it as a fast
tokenizer with a ChatML chat template. Deterministic for a given corpus and vocabulary size.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
                        pad_token: str = "<|pad|>", eos_token: str = "<|im_end|>",
                        additional_special_tokens: Sequence[str] = (), chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE of ``vocab_size`` tokens (``special_tokens`` first, ids 0, 1, ...)
    trained on ``texts``; with ``vocab_size`` at most 256 + specials it has no merges (one token
    per byte). ``chat_template=None`` leaves the tokenizer without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    extra = {"additional_special_tokens": list(additional_special_tokens)} if additional_special_tokens else {}
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad_token, eos_token=eos_token, **extra)
