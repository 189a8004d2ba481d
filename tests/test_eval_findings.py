"""The five OFFSIDE findings computed from results by hand-made numbers, and the benchmark
config: bases, variants, and what each method's unlearning run is given."""
from __future__ import annotations

from pathlib import Path

import pytest

from offside_jax.benchmark import load_benchmark_config, unlearn_config, variant
from offside_jax.config import ConfigError
from offside_jax.eval import findings
from offside_jax.eval.report import findings_table

ROOT = Path(__file__).resolve().parents[1]
F = "forget/image/gen.overall"


def _entry(role="method", attacks=None, setting="multimodal", **summary):
    return {"role": role, "setting": setting, "summary": summary, **({"attacks": attacks} if attacks else {})}


def _attack(kind, value):
    return {"kind": kind, "summary": {F: value}}


def test_relearning_and_prompt_attack_findings_by_hand():
    results = {"methods": {
        "vanilla": _entry("reference", **{F: 0.8}),
        "ga": _entry(attacks={"relearn": _attack("relearning", 0.6), "prompt_x": _attack("prompt", 0.3),
                              "prompt_y": _attack("prompt", 0.1)}, **{F: 0.2}),
        "npo": _entry(attacks={"relearn": _attack("relearning", 0.3), "prompt_x": _attack("prompt", 0.41)}, **{F: 0.4}),
    }}
    relearn = findings.relearning(results)
    assert relearn["methods"]["ga"]["recovered"] == pytest.approx((0.6 - 0.2) / (0.8 - 0.2))
    assert relearn["methods"]["npo"]["recovered"] == pytest.approx((0.3 - 0.4) / (0.8 - 0.4))
    assert relearn["reproduces"] is False  # npo got worse, not better
    prompts = findings.prompt_attacks(results)
    assert prompts["methods"]["ga"]["best_attack"] == "prompt_x" and prompts["methods"]["ga"]["gain"] == pytest.approx(0.1)
    assert prompts["methods"]["npo"]["gain"] == pytest.approx(0.01)
    assert prompts["methods"]["npo"]["recovered"] == pytest.approx(0.01 / 0.4)
    assert prompts["reproduces"] is False  # npo: +0.01 and 2.5% recovered
    # When attacks ran on a subset, the comparison uses the unattacked score on that subset.
    results["methods"]["npo"]["attacks"]["clean"] = _attack("clean", 0.3)
    assert findings.prompt_attacks(results)["methods"]["npo"]["gain"] == pytest.approx(0.11)
    assert findings.prompt_attacks(results)["reproduces"] is True


def test_prompt_attacks_relative_to_the_attacked_vanilla_model():
    results = {"methods": {
        "vanilla": _entry("reference", attacks={"prompt_x": _attack("prompt", 0.4), "prompt_y": _attack("prompt", 0.8)},
                          **{F: 0.8}),
        "ga": _entry(attacks={"prompt_x": _attack("prompt", 0.2), "prompt_y": _attack("prompt", 0.3)}, **{F: 0.2}),
    }}
    row = findings.prompt_attacks(results)["methods"]["ga"]
    # x: 0.2 / 0.4 = 0.5 of the vanilla's score under x; clean 0.2 / 0.8 = 0.25; y: 0.3 / 0.8 = 0.375.
    assert row["best_attack"] == "prompt_x" and row["relative_attacked"] == pytest.approx(0.5)
    assert row["gain"] == pytest.approx(0.25) and row["vulnerable"] is True


def test_visual_rumor_and_catastrophic_forgetting_findings_by_hand():
    vis, plain, world = "forget/image/gen[visual_rumor].overall", "forget/image/gen[plain_rumor].overall", "world/text/gen.overall"
    results = {"methods": {
        "vanilla": _entry("reference", **{F: 0.8, vis: 0.8, plain: 0.6, world: 1.0}),
        "a": _entry(**{F: 0.2, vis: 0.4, plain: 0.15, world: 0.5}),
        "b": _entry(**{F: 0.5, vis: 0.4, plain: 0.3, world: 0.9}),
        "c": _entry(**{F: 0.7, vis: 0.7, plain: 0.5, world: 1.0}),
    }}
    v = findings.visual_rumors(results)
    assert v["methods"]["a"]["visual_removed"] == pytest.approx(0.5) and v["methods"]["a"]["plain_removed"] == pytest.approx(0.75)
    assert v["methods"]["b"]["visual_removed"] == pytest.approx(0.5) and v["methods"]["b"]["plain_removed"] == pytest.approx(0.5)
    assert v["methods_worse_on_visual"] == 2 and v["reproduces"] is True  # a and c, not b (a tie)
    c = findings.catastrophic_forgetting(results)
    drops = [(0.6, 0.5), (0.3, 0.1), (0.1, 0.0)]
    got = [v for m in c["methods"].values() for v in (m["forget_drop"], m["world_drop"])]
    assert got == pytest.approx([v for d in drops for v in d])
    import numpy as np

    assert c["pearson_r"] == pytest.approx(np.corrcoef([d[0] for d in drops], [d[1] for d in drops])[0, 1])
    assert c["world_to_forget_drop_top_half"] == pytest.approx((0.5 + 0.1) / (0.6 + 0.3))  # median 0.3: a and b
    assert c["reproduces"] is True
    table = findings_table({"findings": findings.all_findings(results)})
    assert "| 2 catastrophic forgetting | yes |" in table and "| 3 visual rumors | yes |" in table


def test_unimodal_finding_by_hand():
    txt = "forget/text/gen.overall"
    results = {"methods": {
        "vanilla": _entry("reference", **{F: 0.8, txt: 0.9}),
        "ga": _entry(**{F: 0.1, txt: 0.2}),
        "ga_text": _entry(setting="unimodal", **{F: 0.7, txt: 0.1}),
    }}
    u = findings.unimodal_vs_multimodal(results)
    assert u["unimodal"]["ga_text"] == pytest.approx({"image_drop": 0.1, "text_drop": 0.8})
    assert u["multimodal"]["ga"] == pytest.approx({"image_drop": 0.7})
    assert u["reproduces"] is True
    assert findings.unimodal_vs_multimodal({"methods": {"vanilla": results["methods"]["vanilla"]}}) is None


def test_findings_configs_build_on_the_demo(tmp_path):
    demo = load_benchmark_config(ROOT / "configs" / "demo.yaml")
    for path in sorted((ROOT / "configs" / "findings").glob("*.yaml")):
        cfg = load_benchmark_config(path)
        assert cfg.work_dir == demo.output_dir and cfg.output_dir.startswith("results/findings/")
        assert cfg.data == demo.data and cfg.model == demo.model, path.name
    one = load_benchmark_config(ROOT / "configs" / "findings" / "1_unimodal_vs_multimodal.yaml", ["unlearn.steps=7"])
    assert one.vanilla.records == ["complete/finetune", "complete/world_facts"]
    assert one.vanilla.tune.lr == demo.vanilla.tune.lr and one.vanilla.tune.steps == 500  # deep merge of the base
    v = variant(one, "npo_text")
    assert (v.method, v.setting, v.steps, v.lr) == ("npo", "unimodal", 7, demo.unlearn.lr)
    cfg = unlearn_config(one, "npo_text", tmp_path / "vanilla", tmp_path / "release", tmp_path)
    assert (cfg.method, cfg.data.setting, cfg.train.steps, cfg.lora.enabled) == ("npo", "unimodal", 7, True)
    assert cfg.output_dir == str(tmp_path / "npo_text" / "unlearn") and cfg.model.path == str(tmp_path / "vanilla")
    assert unlearn_config(demo, "ssd", tmp_path, tmp_path, tmp_path).lora.enabled is False  # SSD edits the weights


def test_benchmark_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"methods \['gaa'\] are neither"):
        load_benchmark_config(None, ["methods=[gaa]"])
    with pytest.raises(ConfigError, match="variants.*must be one of"):
        load_benchmark_config(None, ["methods=[x]", "variants={x: {method: nope}}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'configs' / 'demo.yaml'}\nunlearn:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'unlearn.stepz'"):
        load_benchmark_config(bad)
    from offside_jax.benchmark import prepare_release

    small = load_benchmark_config(ROOT / "configs" / "demo.yaml", ["data.image_size=30"])
    with pytest.raises(ConfigError, match=r"data: image_size must be >= 32 pixels, got 30"):
        prepare_release(small, tmp_path)
    assert not (tmp_path / "data").exists()
