"""`offside-jax correct` from a pretrained model (``pretrained=<HF dir>``): its own tokenizer
encodes and decodes every text the runs write exactly, every strategy starts from the saved
weights, and a compare run completes and reports the tokenizer it used."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from offside_jax.config import ConfigError, CorrectConfig, load_config
from offside_jax.correct import compare, run as run_lib
from offside_jax.correct.pretrained import TextTokenizer
from offside_jax.correct.tasks import make_problems

BASE = ["mode=compare", "format.length=256", "task.max_digits=2", "task.ops=+", "progress=false"]


def task_texts() -> list[str]:
    cfg = load_config(None, ["output_dir=unused", *BASE], schema=CorrectConfig)
    task = run_lib.compare_task(cfg.task)
    rng = np.random.default_rng(0)
    problems = make_problems(task, 12, seed=0)
    attempts = [text for p in problems for text in task.warmup_attempts(p, rng)]
    return [p.prompt for p in problems] + attempts + compare.extra_texts()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A random-init Llama with a byte-level BPE trained on the task's texts, saved as HF files."""
    from offside_data_fixtures import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("pretrained"), task_texts(), vocab_size=300, seed=3, hidden_size=16,
                           intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=512)


def test_text_tokenizer_round_trips_every_text_the_runs_write(pretrained):
    tok = run_lib.build_tokenizer(None, None, str(pretrained))
    assert isinstance(tok, TextTokenizer)
    for text in task_texts():
        ids = tok.encode(text)
        assert tok.eos_token_id not in ids and tok.decode(ids) == text
    assert tok.decode(tok.encode("12 + 9") + [tok.eos_token_id, tok.pad_token_id]) == "12 + 9"


def test_padding_falls_back_to_eos():
    class NoPad:
        eos_token_id, pad_token_id = 7, None

    assert TextTokenizer(NoPad()).pad_token_id == 7


def test_every_build_is_a_fresh_copy_of_the_saved_weights(pretrained):
    cfg = load_config(None, ["output_dir=unused", *BASE, f"pretrained={pretrained}"], schema=CorrectConfig)
    tok = run_lib.build_tokenizer(None, None, cfg.pretrained)
    saved = load_file(str(pretrained / "model.safetensors"))
    first = run_lib.build_model(cfg, tok, seed=0)
    embed = np.asarray(first.model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(embed, saved["model.embed_tokens.weight"])
    nnx.update(first, jax.tree.map(lambda x: x + 1.0, nnx.state(first, nnx.Param)))  # as training would
    second = run_lib.build_model(cfg, tok, seed=1)  # the seed does not change pretrained weights
    np.testing.assert_array_equal(np.asarray(second.model.embed_tokens.embedding[...]), saved["model.embed_tokens.weight"])


def test_compare_runs_from_a_pretrained_model(pretrained, tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *BASE, f"pretrained={pretrained}", "eval_size=4",
                             "compare.strategies=[sft,lemma,verifier_feedback]", "compare.train.steps=2",
                             "compare.train.problems_per_step=2", "warmup.steps=2", "warmup.problems_per_step=2",
                             "format.max_new_tokens=16"], schema=CorrectConfig)
    results = run_lib.run_correct(cfg, log=lambda _: None)
    assert results["tokenizer"] == {"kind": "pretrained", "vocab_size": len(load_tokenizer_of(pretrained))}
    assert set(results["runs"]["0"]["metrics"]) == {"sft", "lemma", "verifier_feedback"}
    assert any(f"from the pretrained {pretrained} for 2 steps" in note for note in results["notes"])
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["tokenizer"]["kind"] == "pretrained"


def load_tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_pretrained_mistakes_name_the_key(tmp_path):
    cfg = load_config(None, ["output_dir=unused", *BASE, f"pretrained={tmp_path / 'nothing'}"], schema=CorrectConfig)
    with pytest.raises(ConfigError, match="pretrained=.*neither a .gguf file, smollm2 nor a Hugging Face model directory"):
        run_lib.run_correct(cfg, log=lambda _: None)
    cfg = load_config(None, ["output_dir=unused", "mode=scl_vl", f"pretrained={tmp_path}"], schema=CorrectConfig)
    with pytest.raises(ConfigError, match="pretrained: mode=scl_vl"):
        run_lib.run_correct(cfg, log=lambda _: None)
