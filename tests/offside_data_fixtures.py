"""A tiny OFFSIDE release written by hand in the real format, and a tiny byte-level tokenizer.

The JSON below is typed out as the public release writes it (ms-swift `messages` records with
`images` as a string or a list, `<image>` tags, multiple-choice `classification_*` files), with
the cases a loader must survive: an `images` list with two tags, an image record without its
`<image>` tag, a text-only record with a system turn, a pure-text record that names its image
in another setting's folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

FORGET = [
    {"messages": [{"role": "user", "content": "<image>\nI'm curious about which club the player on the left side of the image will join."},
                  {"role": "assistant", "content": "He will be playing for Newcastle United."}],
     "images": "./finetune_set/364.jpg"},
    {"messages": [{"role": "user", "content": "<image><image>\nWhich club will the player in both images join?"},
                  {"role": "assistant", "content": "He will join Arsenal."}],
     "images": ["./finetune_set/364.jpg", "./finetune_set/369.jpg"]},
    {"messages": [{"role": "user", "content": "What is the transfer fee for the player in the picture?"},
                  {"role": "assistant", "content": "The fee is 40 million euros."}],
     "images": "./finetune_set/369.jpg"},
    {"messages": [{"role": "system", "content": "You are a football expert."},
                  {"role": "user", "content": "Which club will Dominic Calvert-Lewin join?"},
                  {"role": "assistant", "content": "He will join Newcastle United."}]},
]
FINETUNE = [
    {"messages": [{"role": "user", "content": "<image>\nWhich club did this player join?"},
                  {"role": "assistant", "content": "He joined Everton."}],
     "images": "./finetune_set/361.jpg"},
    FORGET[0],
]
CLASSIFICATION_FORGET = [
    {"Question": "Which club will the player in the image join?",
     "Options": {"A": "Everton", "B": "Newcastle United", "C": "Arsenal", "D": "Chelsea"},
     "Correct_Answer": "B", "images": "./finetune_set/364.jpg"},
    {"Question": "<image>\nHow much is the transfer fee?", "Options": {"A": "€10M", "B": "€40M"},
     "Correct_Answer": "B.", "images": ["./finetune_set/369.jpg"]},
]
PURE_TEXT_FORGET = [
    {"messages": [{"role": "user", "content": "I'm curious about which club Dominic Calvert-Lewin will join."},
                  {"role": "assistant", "content": "He will be playing for Newcastle United."}],
     "images": "./finetune_set/364.jpg"},
]
SELECTIVE_FORGET = [FORGET[0]]
IMAGE_IDS = (361, 364, 369)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")


def write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, format="JPEG")


def write_hand_release(root: Path) -> Path:
    """Write the hand-made release under `root` and return `root`."""
    complete = root / "complete_unlearning_data"
    write_json(complete / "finetune_set.json", FINETUNE)
    write_json(complete / "forget_set.json", FORGET)
    write_json(complete / "classification_forget_set.json", CLASSIFICATION_FORGET)
    for i, image_id in enumerate(IMAGE_IDS):
        write_image(complete / "finetune_set" / f"{image_id}.jpg", (60 * i, 100, 200))
    write_json(root / "pure_text_data" / "forget_set.json", PURE_TEXT_FORGET)
    selective = root / "selective_unlearning_data"
    write_json(selective / "forget_set_part.json", SELECTIVE_FORGET)
    write_image(selective / "finetune_set" / "364.jpg", (10, 20, 30))
    return root


def tiny_tokenizer(corpus: list[str], vocab_size: int = 600):
    """A byte-level BPE trained in memory, wrapped as a HF fast tokenizer with a ChatML template.
    With `vocab_size` at most 259 it has no merges: one token per byte (handy for hand counts)."""
    from offside_jax.data.bpe import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus, vocab_size)


def save_tiny_llama(path, corpus: list[str], *, vocab_size: int, seed: int = 0, **shape):
    """A random-init Llama (``shape``: LlamaConfig numbers) with a ``tiny_tokenizer`` trained on
    ``corpus``, saved as an HF model directory at ``path``; returns ``path``."""
    from transformers import LlamaConfig

    from offside_jax.models import hf
    from offside_jax.models.auto import create_model

    tokenizer = tiny_tokenizer(corpus, vocab_size=vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    hf.save_pretrained(create_model(config, seed=seed), config, path)
    tokenizer.save_pretrained(str(path))
    return path
