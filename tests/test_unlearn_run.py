"""`run_unlearning` wiring on untrained tiny models: a Qwen2.5-VL model takes an unlearning step
with images (multimodal setting, LoRA, the adapters-off reference); RMU moves only its layers;
MMUnlearner alternates ascent and retain steps; DPO runs on its corrected-answer sub-batch; config sections match the loss registry; mistakes stop with a message naming them."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from offside_jax import cli, config as config_lib
from offside_jax.config import ConfigError, UnlearnConfig, load_config
from offside_jax.data.synthetic import SyntheticConfig, make_release
from offside_jax.models import hf
from offside_jax.models.auto import create_model
from offside_jax.unlearn.losses import METHODS
from offside_jax.unlearn.run import run_unlearning
from offside_jax.unlearn.saliency import DEFAULT_GROUPS, DEFAULT_TARGETS

QUIET = ["mesh.fsdp=1", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run") / "release"
    make_release(root, SyntheticConfig(players=1, seed=2, image_size=56))
    return root


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, release) -> Path:
    """A random-init Llama-family model and a tokenizer trained on the release's text."""
    from offside_data_fixtures import save_tiny_llama

    from offside_jax.data.offside import load_release

    corpus = [e.question + " " + e.answer for e in load_release(release).examples()]
    return save_tiny_llama(tmp_path_factory.mktemp("text_model"), corpus, vocab_size=400, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           rope_theta=20_000.0)


def run(tmp_path, model, release, *overrides):
    args = [f"output_dir={tmp_path}", f"model.path={model}", f"data.release={release}", *QUIET, *overrides]
    return run_unlearning(load_config(None, args, schema=UnlearnConfig))


def test_method_sections_match_the_registry():
    """Each loss method's config section has exactly its function's keyword arguments and defaults."""
    methods = config_lib.UnlearnMethodsConfig()
    for name, spec in METHODS.items():
        section = dataclasses.asdict(getattr(methods, name))
        section.pop("lr_scale", None)  # an optimizer setting (RMU), not a loss argument
        assert section == spec.defaults(), name
    mm = methods.mmunlearner
    assert mm.targets == DEFAULT_TARGETS and mm.groups == DEFAULT_GROUPS


def test_vision_language_model_unlearns_with_images(tmp_path, release):
    from qwen2_5_vl_fixtures import make_tokenizer, qwen2_5_vl_config

    tokenizer = make_tokenizer()
    config = qwen2_5_vl_config(tokenizer)
    vanilla = tmp_path / "vanilla"
    hf.save_pretrained(create_model(config, seed=0), config, vanilla)
    tokenizer.save_pretrained(str(vanilla))
    result = run(tmp_path / "out", vanilla, release, "method=npo", "data.setting=multimodal", "data.forget_batch_size=1",
                 "train.steps=1", "lora.enabled=true", r"lora.target=self_attn\.(q|v)_proj|attn\.qkv", "lora.rank=4",
                 "optim.lr=1e-2", "methods.npo.alpha=0", "eval.sets=[forget]", "eval.max_records=2")
    step = json.loads((tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["step"] == 1 and np.isfinite(step["loss"]) and step["npo"] > 0
    assert set(result.summary["answer_probability"]) == {"forget"} and len(result.summary["per_record"]["forget"]["after"]) == 2
    # The images reached the loss: the merged export's vision attention moved, its MLP did not.
    before = load_file(str(vanilla / "model.safetensors"))
    after = load_file(str(result.model_dir / "model.safetensors"))
    assert not np.allclose(after["visual.blocks.0.attn.qkv.weight"], before["visual.blocks.0.attn.qkv.weight"])
    assert np.array_equal(after["visual.blocks.0.mlp.up_proj.weight"], before["visual.blocks.0.mlp.up_proj.weight"])
    assert not any("lora" in k for k in after)


def test_rmu_moves_only_its_layers(tmp_path, release, text_model):
    result = run(tmp_path, text_model, release, "method=rmu", "data.setting=unimodal", "methods.rmu.layer=0",
                 "methods.rmu.alpha=10.0", "train.steps=2", "optim.lr=1e-2", "optim.weight_decay=0.1",
                 "eval.enabled=false")
    before, after = load_file(str(text_model / "model.safetensors")), load_file(str(result.model_dir / "model.safetensors"))
    moved = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert moved == ["model.layers.0.mlp.down_proj.weight"]  # layers L-2..L of L=0, down_proj only


def test_rmu_lr_scale_multiplies_the_shared_learning_rate(tmp_path, release, text_model):
    common = ["method=rmu", "data.setting=unimodal", "train.steps=2", "optim.weight_decay=0.0", "eval.enabled=false"]
    scaled = run(tmp_path / "scaled", text_model, release, *common, "optim.lr=1e-4")  # default lr_scale 10
    plain = run(tmp_path / "plain", text_model, release, *common, "optim.lr=1e-3", "methods.rmu.lr_scale=1")
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (scaled, plain))
    before = load_file(str(text_model / "model.safetensors"))
    assert any(not np.array_equal(before[k], a[k]) for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_mmunlearner_alternates_masked_ascent_and_retain_steps(tmp_path, release, text_model):
    result = run(tmp_path, text_model, release, "method=mmunlearner", "data.setting=unimodal", "train.steps=4",
                 "optim.lr=1e-3", "eval.enabled=false", "export_merged=false")
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert ["forget_nll" in x for x in lines] == [True, False, True, False]
    assert ["retain_nll" in x for x in lines] == [False, True, False, True]
    report = result.summary["report"]["saliency"]
    assert set(report["total"]) == {"language"} and 0 < report["selected"]["language"] < report["total"]["language"]


def test_mmunlearner_official_update(tmp_path, release, text_model):
    """The official loop: one forget step, then len(retain batches) // len(forget batches) retain
    steps; every tensor outside the projections may ascend (the final norm moves at step 1)."""
    result = run(tmp_path, text_model, release, "method=mmunlearner", "methods.mmunlearner.variant=official",
                 "data.setting=unimodal", "data.forget_attributes=[rumor]", "data.forget_batch_size=1", "train.steps=1",
                 "optim.lr=1e-3", "eval.enabled=false")
    report = result.summary["report"]
    records = result.summary["records"]
    assert report["retain_steps_per_forget_step"] == records["retain"] // records["forget"] > 1
    before, after = load_file(str(text_model / "model.safetensors")), load_file(str(result.model_dir / "model.safetensors"))
    assert not np.array_equal(before["model.norm.weight"], after["model.norm.weight"])


def test_offside_kl_alternates_and_accumulates_pairs(tmp_path, release, text_model):
    common = ["method=offside_kl", "data.setting=unimodal", "data.forget_attributes=[rumor]", "data.forget_batch_size=1",
              "optim.lr=1e-2", "eval.enabled=false", "lora.enabled=false"]

    def logged(name):
        return [json.loads(x) for x in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]

    # train.steps counts updates: with accelerate's accumulation of 2, each is a forget and a retain micro-step.
    result = run(tmp_path / "pairs", text_model, release, *common, "train.steps=2")
    lines = logged("pairs")
    assert ["forget_nll" in x for x in lines] == [True, False, True, False] and "retain_kl" in lines[1]
    assert result.summary["report"]["retain_ratio"] == 3  # OFFSIDE's 1 : 3 rows unless data.retain_ratio says
    assert result.summary["report"]["micro_steps"] == 4
    # The update averages both micro-steps' gradients: it differs from the forget step alone (accumulation=1).
    one = run(tmp_path / "one", text_model, release, *common, "train.steps=1")
    alone = run(tmp_path / "alone", text_model, release, *common, "train.steps=1", "methods.offside_kl.accumulation=1")
    assert len(logged("one")) == 2 and len(logged("alone")) == 1
    before = load_file(str(text_model / "model.safetensors"))
    paired = load_file(str(one.model_dir / "model.safetensors"))
    forget_only = load_file(str(alone.model_dir / "model.safetensors"))
    assert not all(np.array_equal(before[k], paired[k]) for k in before)
    assert not all(np.array_equal(paired[k], forget_only[k]) for k in before)


def test_offside_npo_reference_is_fine_tuned_on_the_retain_set(tmp_path, release, text_model):
    """At step 0 the policy is the vanilla model and the reference its retain fine-tune: the NPO
    loss is not (2/beta) log 2 (equal NLLs) but follows from the two models' NLLs."""
    run(tmp_path, text_model, release, "method=offside_npo", "data.setting=unimodal", "data.forget_attributes=[rumor]",
        "data.forget_batch_size=2", "train.steps=1", "methods.offside_npo.reference_steps=5",
        "methods.offside_npo.reference_lr=1e-2", "eval.enabled=false", "export_merged=false")
    first = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["npo"] != pytest.approx(2 / 0.9 * np.log(2), rel=1e-3)


def test_dpo_prefers_the_corrected_answer_through_the_run(tmp_path, release, text_model):
    run(tmp_path, text_model, release, "method=dpo", "data.setting=unimodal", "data.forget_attributes=[rumor]",
        "data.forget_batch_size=2", "train.steps=2", "optim.lr=1e-3", "eval.enabled=false", "export_merged=false")
    first, second = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[:2]]
    # At step 0 the policy is the reference: every margin is 0 and the loss is (2/beta) log 2.
    assert first["dpo"] == pytest.approx(2 / 0.1 * np.log(2), rel=1e-5)
    # That value holds whatever the log-probs are; after one update the policy prefers the
    # corrected answer over the rumor, so the margins turn positive and the loss falls.
    assert second["dpo"] < first["dpo"]


def test_mistakes_stop_with_a_message(tmp_path, release, text_model, capsys):
    base = ["unlearn", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "unlearn_tiny.yaml"),
            f"output_dir={tmp_path}", f"model.path={text_model}", f"data.release={release}", *QUIET]
    assert cli.main(base + ["method=nope"]) == 2
    assert "method 'nope' is not one of" in capsys.readouterr().err
    assert cli.main(base + ["data.setting=multimodal"]) == 2
    assert "needs a vision-language model" in capsys.readouterr().err
    assert cli.main(base + [f"data.release={tmp_path / 'missing'}"]) == 2
    assert "no OFFSIDE setting folder found" in capsys.readouterr().err
    assert cli.main(base + ["data.forget_batch_size=64"]) == 2
    assert "takes 64 forget rows but the forget set has 3" in capsys.readouterr().err
    assert cli.main(base + ["method=rmu", "methods.rmu.layer=7"]) == 2
    assert "methods.rmu.layer=7.0: a fraction of the model's depth in [0, 1)" in capsys.readouterr().err
    assert cli.main(base + ["method=rmu", "methods.rmu.lr_scale=0"]) == 2
    assert "methods.rmu.lr_scale=0.0: a positive multiple of optim.lr" in capsys.readouterr().err
    assert cli.main(base + ["methods.npo.betta=1"]) == 2
    assert "unknown key 'methods.npo.betta'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.source=hf"):
        run(tmp_path, text_model, release, "model.source=tiny")


def test_finetune_names_a_bad_data_source(tmp_path, release, capsys):
    base = ["finetune", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "finetune_offside_tiny.yaml"),
            f"output_dir={tmp_path}", "log.progress=false"]
    assert cli.main(base + [f"data.release={release}", "data.train_file=x.jsonl"]) == 2
    assert "set exactly one of data.train_file" in capsys.readouterr().err
    assert cli.main(base + [f"data.release={release}", "data.release_splits=[nope]"]) == 2
    assert "no split 'nope' in the complete setting" in capsys.readouterr().err
    assert cli.main(base + [f"data.release={release}", "data.release_modality=image"]) == 2
    assert "a text-only model cannot see" in capsys.readouterr().err


def _moved(model_dir: Path, result) -> dict[str, np.ndarray]:
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(result.model_dir / "model.safetensors"))
    return {k: before[k] != after[k] for k in before if not np.array_equal(before[k], after[k])}


def test_rocr_edits_only_its_down_projection(tmp_path, release, text_model):
    from offside_jax.data.offside import load_release
    from offside_jax.unlearn.subjects import forget_subjects
    from offside_jax.unlearn import settings

    result = run(tmp_path, text_model, release, "method=rocr", "data.setting=unimodal", "eval.enabled=false",
                 "methods.rocr.general_data=none")
    report = result.summary["report"]["rocr"]
    sets = settings.select(load_release(release), "unimodal", vision=False)
    assert report["subjects"] == forget_subjects(sets.forget, sets.retain) and len(report["subjects"]) == 1
    assert report["subjects"][0] in sets.forget[0].question + " ".join(e.question for e in sets.forget)
    assert report["layers"] == [0]  # the official layers 4-6 of 32 at a depth of 2
    assert sorted(_moved(text_model, result)) == ["model.layers.0.mlp.down_proj.weight"]


def test_curvature_edit_projects_only_its_matrices(tmp_path, release, text_model):
    result = run(tmp_path, text_model, release, "method=curvature_edit", "data.setting=unimodal", "eval.enabled=false",
                 "methods.curvature_edit.layers=[0]", "methods.curvature_edit.matrices=[mlp.up_proj]",
                 "methods.curvature_edit.rho=0.5")
    kept = result.summary["report"]["curvature"]["kept_curvature"]
    assert list(kept) == ["layers.0.mlp.up_proj"] and 0.5 <= kept["layers.0.mlp.up_proj"] < 0.6
    assert sorted(_moved(text_model, result)) == ["model.layers.0.mlp.up_proj.weight"]


def test_concept_ablation_moves_only_the_located_traces(tmp_path, release, text_model):
    result = run(tmp_path, text_model, release, "method=concept_ablation", "data.setting=unimodal", "train.steps=2",
                 "methods.concept_ablation.top=3", "eval.enabled=false", "optim.weight_decay=0.1")
    traces = result.summary["report"]["concept_ablation"]["traces"]
    moved = _moved(text_model, result)
    # HF's down_proj.weight is [d_model, d_mlp]: a trace is one column.
    expected = {f"model.layers.{layer}.mlp.down_proj.weight" for layer, _ in traces}
    assert set(moved) == expected and len(traces) == 3
    for name, changed in moved.items():
        layer = int(name.split(".")[2])
        columns = sorted({dim for trace_layer, dim in traces if trace_layer == layer})
        assert sorted(np.flatnonzero(changed.any(axis=0)).tolist()) == columns
    kept = result.summary["trace_kept"]  # the located traces of the run's own subject moved
    assert kept["traces"] == 10 and kept["cosine"] < 1.0


def test_ablation_and_trace_probe_locate_once_when_their_settings_agree(tmp_path, release, text_model, monkeypatch):
    from offside_jax.unlearn import concept_vectors as cv

    calls = []
    real = cv.locate_traces
    monkeypatch.setattr(cv, "locate_traces", lambda *a, **k: calls.append(k["top"]) or real(*a, **k))
    run(tmp_path / "same", text_model, release, "method=concept_ablation", "data.setting=unimodal", "train.steps=1",
        "eval.enabled=false", "export_merged=false")  # top 10 both
    assert calls and set(calls) == {10}
    once = len(calls)  # one scoring per subject
    calls.clear()
    run(tmp_path / "apart", text_model, release, "method=concept_ablation", "data.setting=unimodal", "train.steps=1",
        "methods.concept_ablation.top=3", "eval.enabled=false", "export_merged=false")
    assert sorted(calls) == [3] * once + [10] * once


def test_guard_wraps_the_unchanged_model(tmp_path, release, text_model):
    result = run(tmp_path, text_model, release, "method=guard", "data.setting=unimodal",
                 "data.forget_attributes=[rumor]", "eval.sets=[forget]")
    assert hasattr(result.model, "sampler_setup") and result.summary["kind"] == "generation"
    assert _moved(text_model, result) == {}
    assert result.summary["trace_kept"] == {"cosine": pytest.approx(1.0), "l2": 0.0, "jaccard": 1.0, "traces": 10}
    report = result.summary["report"]["guard"]
    assert report["spans"] > 0 and report["classifier_training"]["forget"] == result.summary["records"]["forget"]


def test_guard_model_directory_is_evaluated_under_guard(tmp_path, release, text_model):
    """`unlearn method=guard` writes GUARD's state into the exported model directory, and
    `offside-jax evaluate` on it generates what the in-process guarded model generates;
    guard=false scores the unchanged weights, as the model alone generates."""
    from offside_jax.eval.suite import Suite, SuiteConfig

    # Every prompt flagged and every candidate penalised by its closeness to a span: the untrained
    # model's outputs then differ under GUARD, so the two evaluations below cannot agree by chance.
    result = run(tmp_path / "unlearn", text_model, release, "method=guard", "data.setting=unimodal",
                 "data.forget_attributes=[rumor]", "eval.sets=[forget]", "methods.guard.threshold=1e-6",
                 "methods.guard.semantic_threshold=-1")
    assert {"guard.json", "guard.npz", "model.safetensors"} <= {p.name for p in result.model_dir.iterdir()}
    suite_args = dict(test_sets=["forget", "retain"], modalities=["text"], formats=["gen"], batch_size=8,
                      mesh=[1, 1, 1], likelihood=False, max_new_tokens=12)
    suite = Suite(release, result.tokenizer, SuiteConfig(**suite_args))
    outputs = {}
    for flag, model in (("true", result.model), ("false", result.model.model)):
        suite.run(model, tmp_path / f"want_{flag}", progress=False)
        assert cli.main(["evaluate", "--config", os.devnull, f"release={release}", f"output_dir={tmp_path / flag}",
                         f"model.path={result.model_dir}", f"guard={flag}", "suite.test_sets=[forget,retain]",
                         "suite.modalities=[text]", "suite.formats=[gen]", "suite.batch_size=8", "suite.mesh=[1,1,1]",
                         "suite.likelihood=false", "suite.max_new_tokens=12"]) == 0
        for task in ("forget_text_gen", "retain_text_gen"):
            got = [json.loads(x)["output"] for x in (tmp_path / flag / "examples" / f"{task}.jsonl").read_text().splitlines()]
            want = [json.loads(x)["output"] for x in (tmp_path / f"want_{flag}" / "examples" / f"{task}.jsonl")
                    .read_text().splitlines()]
            assert got == want and got, (flag, task)
            outputs[flag, task] = got
        config = json.loads((tmp_path / flag / "config.json").read_text())
        assert ("guard" in config) == (flag == "true")
    assert outputs["true", "forget_text_gen"] != outputs["false", "forget_text_gen"]


def test_edit_mistakes_name_their_key(tmp_path, release, text_model):
    with pytest.raises(ConfigError, match=r"methods\.rocr\.layers=\[5\]: the model has 2 decoder layers"):
        run(tmp_path / "a", text_model, release, "method=rocr", "data.setting=unimodal", "methods.rocr.layers=[5]")
    with pytest.raises(ConfigError, match=r"methods\.curvature_edit\.rho"):
        run(tmp_path / "b", text_model, release, "method=curvature_edit", "methods.curvature_edit.rho=0")
    with pytest.raises(ConfigError, match=r"methods\.curvature_edit\.matrices=\['mlp\.nope'\]: model\.layers\.1 has no 'mlp\.nope'"):
        run(tmp_path / "c", text_model, release, "method=curvature_edit", "data.setting=unimodal",
            "methods.curvature_edit.matrices=[mlp.nope]")
    assert not (tmp_path / "c").exists()  # refused before anything was written: the corrected rerun may use it


def test_half_finetune_moves_half_of_each_block(tmp_path, release, text_model):
    """train.half_finetune in unlearning: within one round exactly 2 of the 4 attention
    projections of every layer move (full parameters, AdamW with weight decay)."""
    result = run(tmp_path, text_model, release, "method=grad_diff", "data.setting=unimodal", "lora.enabled=false",
                 "train.steps=2", "train.half_finetune.enabled=true", "train.half_finetune.rounds=10",
                 "optim.lr=1e-2", "optim.weight_decay=0.1", "eval.enabled=false")
    moved = _moved(text_model, result)
    for layer in range(2):
        attention = [p for p in ("q", "k", "v", "o") if f"model.layers.{layer}.self_attn.{p}_proj.weight" in moved]
        assert len(attention) == 2, (layer, attention)
    assert "model.embed_tokens.weight" in moved  # embeddings always train
