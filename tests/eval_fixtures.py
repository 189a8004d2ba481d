"""One tiny Qwen2.5-VL trained from scratch on a 3-player synthetic release, shared by the
evaluation tests (suite, attacks, relearning, report) within a test session.

The functions are memoised at module level, so whichever test module asks first pays for the
training (about a minute on 2 CPU cores) and the others reuse the model. Everything is
seeded: the same model every run.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from offside_jax.data.offside import load_release
from offside_jax.data.synthetic import SyntheticConfig, make_release
from offside_jax.data.batches import make_encoder
from offside_jax.eval.items import qa_item
from offside_jax.eval.tuning import TuneConfig, tune
from offside_jax.models import tiny_vl

PLAYERS = 3
IMAGE_SIZE = 56  # 2 x 2 merged patches = 4 image tokens per picture
SHAPE = tiny_vl.TinyVLConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             vision_hidden_size=32, vision_intermediate_size=64, image_size=IMAGE_SIZE)
VANILLA = TuneConfig(steps=220, batch_size=16, lr=5e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1,
                     lora=False, mesh=[1, 1, 1])
GA = TuneConfig(steps=12, batch_size=16, lr=2e-3, lora=True, lora_rank=8, lora_alpha=16.0, mesh=[1, 1, 1])


@functools.cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="offside_eval_tests_"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def release():
    root = workdir() / "release"
    make_release(root, SyntheticConfig(players=PLAYERS, seed=0, image_size=IMAGE_SIZE))
    return load_release(root)


@functools.cache
def hf_config():
    rel = release()
    texts = [m.content for e in rel.examples() for m in e.messages] + [e.question for e in rel.examples()]
    tokenizer = tiny_vl.train_tokenizer(texts, SHAPE.vocab_size)
    return tiny_vl.hf_config(SHAPE, tokenizer), tokenizer


@functools.cache
def processor():
    config, tokenizer = hf_config()
    return tiny_vl.processor(config, tokenizer, IMAGE_SIZE)


def training_pairs(split: str = "finetune"):
    """(item, answer) pairs of the complete setting's image records of ``split``."""
    rel = release()
    return [(qa_item(e, "train", rel.root), e.answer) for e in rel["complete", split] if e.modality == "image"]


@functools.cache
def vanilla():
    """The vanilla model: trained on every image question of the finetune split (facts + rumors)."""
    model = tiny_vl.init_model(hf_config()[0], seed=0)
    return tune(model, make_encoder(processor()), training_pairs(), VANILLA, progress=False).model


@functools.cache
def ga_unlearned():
    """The vanilla model after LoRA gradient ascent on the forget set's image questions."""
    from offside_jax.unlearn.losses import build_loss

    return tune(vanilla(), make_encoder(processor()), training_pairs("forget"), GA, loss_fn=build_loss("ga"),
                sub_batch="forget", progress=False).model


def suite_config(**fields):
    """Suite settings shared by the tests, so their compiled programs are shared too."""
    from offside_jax.eval.suite import SuiteConfig

    return SuiteConfig(**{"batch_size": 8, "pad_multiple": 32, "mesh": [1, 1, 1], **fields})
