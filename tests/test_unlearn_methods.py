"""Unlearning works: a tiny Llama-family model fine-tuned (`run_finetune` on a synthetic OFFSIDE
release) to memorise two players' text twins, then each method run through `run_unlearning`
on the unimodal setting, forgetting the rumor answers and keeping every other answer.

GradDiff, NPO with its retain term, SimNPO and SSD must halve the forget-set answer probability
while the retain-set probability stays within 20% of the vanilla model's; GA must halve it too
(its retain damage is printed, not bounded). A method that did nothing fails. Hyperparameters
were tuned once for this model (fixed seeds, deterministic) and leave margin both ways.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from offside_jax import cli
from offside_jax.config import FinetuneConfig, UnlearnConfig, load_config
from offside_jax.data.batches import TextEncoder, fit_shape, sequential_batches
from offside_jax.data.offside import load_release
from offside_jax.data.synthetic import SyntheticConfig, make_release
from offside_jax.models import hf
from offside_jax.train.finetune import run_finetune
from offside_jax.unlearn.run import run_unlearning
from offside_jax.unlearn.settings import select

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

VANILLA = [
    "model.source=tiny", "model.tiny.vocab_size=512", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
    "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4", "model.tiny.num_key_value_heads=2",
    "mesh.fsdp=1", "optim.lr=1e-2", "optim.warmup_steps=20", "optim.schedule=cosine", "data.release_setting=pure_text",
    "data.release_splits=[forget,retain]", "data.max_length=0", "data.batch_size=8", "train.steps=400",
    "train.loss_chunk_tokens=0", "checkpoint.every=0", "log.tensorboard=false", "log.progress=false",
]
COMMON = [
    "model.source=hf", "mesh.fsdp=1", "data.setting=unimodal", "data.forget_attributes=[rumor]",
    "data.forget_batch_size=2", "data.retain_ratio=3", "optim.schedule=constant", "optim.max_grad_norm=1.0",
    "log.tensorboard=false", "log.progress=false", "export_merged=false",
]
METHODS = {
    "grad_diff": ["optim.lr=1e-3", "train.steps=15", "methods.grad_diff.gamma=1.0", "methods.grad_diff.alpha=1.0"],
    "npo": ["optim.lr=5e-4", "train.steps=20", "methods.npo.beta=0.1", "methods.npo.alpha=1.0"],
    "simnpo": ["optim.lr=1e-3", "train.steps=20", "methods.simnpo.beta=4.5", "methods.simnpo.gamma=1.0"],
    "ssd": ["methods.ssd.alpha=10.0", "methods.ssd.lam=1.0"],
    "ga": ["optim.lr=1e-3", "train.steps=10"],
}


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn")
    release = root / "release"
    make_release(release, SyntheticConfig(players=2, seed=0, image_size=48))
    cfg = load_config(None, [f"output_dir={root / 'vanilla'}", f"data.release={release}", *VANILLA], schema=FinetuneConfig)
    run_finetune(cfg)
    return release, root / "vanilla" / "model"


def unlearn(vanilla, tmp_path, method, extra=()):
    release, model = vanilla
    overrides = [f"output_dir={tmp_path / method}", f"model.path={model}", f"data.release={release}", f"method={method}",
                 *COMMON, *METHODS[method], *extra]
    return run_unlearning(load_config(None, overrides, schema=UnlearnConfig))


@pytest.mark.parametrize("method", list(METHODS))
def test_method_forgets_rumors_and_keeps_the_rest(vanilla, tmp_path, method):
    result = unlearn(vanilla, tmp_path, method)
    p = result.summary["answer_probability"]
    forget, retain = p["forget"], p["retain"]
    print(f"\n{method}: forget {forget['before']:.3f} -> {forget['after']:.3f}, "
          f"retain {retain['before']:.3f} -> {retain['after']:.3f}")
    assert result.summary["records"]["forget"] == 6 and result.summary["records"]["retain"] == 106
    assert forget["before"] > 0.9 and retain["before"] > 0.85, "the vanilla model has memorised its data"
    assert forget["after"] <= 0.5 * forget["before"], f"{method} did not halve the forget-set probability"
    if method != "ga":
        assert abs(retain["after"] - retain["before"]) <= 0.2 * retain["before"], f"{method} damaged the retain set"
    else:
        assert np.isfinite(retain["after"])
    if method == "ssd":
        assert result.summary["steps"] == 0 and result.summary["report"]["dampening"]["selected"] > 0
    else:
        lines = [json.loads(x) for x in (tmp_path / method / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(1, int(result.summary["steps"]) + 1))


def numpy_answer_probability(model, examples, tokenizer):
    """exp(-mean answer NLL) per record from the model's logits in float64 numpy."""
    encoder = fit_shape(TextEncoder(tokenizer), examples)
    out = []
    for batch in sequential_batches(examples, encoder, 8):
        logits = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp[:, :-1], batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
        w = (batch["loss_mask"] * batch["attention_mask"])[:, 1:]
        real = w.sum(1) > 0
        out.append(np.exp((picked * w).sum(1)[real] / w.sum(1)[real]))
    return np.concatenate(out)


def test_cli_runs_the_example_config_and_writes_its_outputs(vanilla, tmp_path, capsys):
    """`offside-jax unlearn --config configs/unlearn_tiny.yaml method=ssd`: exported model, config,
    summary (its probabilities match a numpy recomputation from the exported weights) and plot."""
    release, model = vanilla
    out = tmp_path / "cli"
    args = ["unlearn", "--config", str(ROOT / "configs" / "unlearn_tiny.yaml"), "method=ssd", f"output_dir={out}",
            f"model.path={model}", f"data.release={release}", "log.progress=false"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "forget: answer probability" in printed and f"done: ssd; outputs in {out}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.png").stat().st_size > 0 and "method: ssd" in (out / "config.yaml").read_text()
    assert "method: ssd" in (out / "model" / "config.yaml").read_text()

    from transformers import AutoTokenizer

    exported = hf.load_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    sets = select(load_release(release), "unimodal", vision=False, forget_attributes=["rumor"])
    for name in ("forget", "retain"):
        expected = numpy_answer_probability(exported, sets.evaluation[name], tokenizer)
        np.testing.assert_allclose(summary["per_record"][name]["after"], expected, rtol=2e-4)
    assert summary["answer_probability"]["forget"]["after"] < 0.5 * summary["answer_probability"]["forget"]["before"]

    # Re-running into the same directory with another method is refused, naming the key.
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "1").mkdir(exist_ok=True)
    assert cli.main(args[:3] + ["method=npo"] + args[4:]) == 2
    assert "holds a run started with another config: method ('ssd' -> 'npo')" in capsys.readouterr().err
