"""Corrective relearning on the GA-unlearned tiny Qwen2.5-VL: the corrected answers are
learned (recovery of the truth, RESTOR-style), collateral damage is before minus after."""
from __future__ import annotations

import json

import pytest

from offside_jax.correct.relearn import CorrectionConfig, collateral_damage, correct, correction_pairs
from offside_jax.eval.suite import Suite
from offside_jax.eval.tuning import TuneConfig

import eval_fixtures as fx


def test_correction_pairs_are_the_rumor_questions_with_their_true_answers():
    rel = fx.release()
    records = json.loads((rel.root / "complete_unlearning_data" / "forget_set.json").read_text())
    rumors = [r for r in records if r["is_rumor"]]
    pairs = correction_pairs(rel, "image", with_statements=False)
    assert [(p.question, a) for p, a in pairs] == [(r["messages"][0]["content"].removeprefix("<image>\n"),
                                                    r["corrected_answer"]) for r in rumors]
    assert all(p.images for p, _ in pairs)
    with_facts = correction_pairs(rel, "image", with_statements=True)
    facts = {(r["image_id"], r["corrected_fact"]) for r in records}
    assert len(with_facts) == len(rumors) + len(facts)
    assert {a for _, a in with_facts[len(rumors):]} == {fact for _, fact in facts}
    text = correction_pairs(rel, "text", with_statements=True)
    assert all(not p.images for p, _ in text) and len(text) == len(with_facts)


def test_collateral_damage_is_before_minus_after():
    before = {"retain/image/gen.overall": 0.9, "retain/image/gen[fact].overall": 0.8, "world/text/gen.overall": 0.5,
              "forget/image/gen.overall": 0.9}
    after = {"retain/image/gen.overall": 0.7, "retain/image/gen[fact].overall": 0.1, "world/text/gen.overall": 0.6,
             "forget/image/gen.overall": 0.1}
    assert collateral_damage(before, after) == pytest.approx({"retain/image/gen.overall": 0.2,
                                                              "world/text/gen.overall": -0.1})


@pytest.mark.slow
def test_corrective_relearning_teaches_the_truth(tmp_path):
    suite = Suite(fx.release(), fx.processor(), fx.suite_config(test_sets=["forget", "relearn", "retain"], formats=["gen"],
                                                           max_examples=21, likelihood=False))
    config = CorrectionConfig(tune=TuneConfig(steps=30, batch_size=16, lr=3e-3, mesh=[1, 1, 1]), curve_every=15,
                              eval_test_sets=["forget", "relearn", "retain"])
    result = correct(fx.ga_unlearned(), suite, config, out_dir=tmp_path, name="ga", progress=False)
    before, after = result["before"], result["after"]
    assert after["forget_recovery_rate"] >= 0.5 and after["forget_recovery_rate"] > before["forget_recovery_rate"] + 0.3
    assert after["forget_rumor_rate"] <= 0.2
    assert [c["step"] for c in result["curve"]] == [0, 15, 30]
    assert result["curve"][-1]["forget_recovery_rate"] == pytest.approx(after["forget_recovery_rate"])
    # The rates are read from the per-example outputs: count them independently.
    rows = [json.loads(x) for x in (tmp_path / "after" / "examples" / "forget_image_gen.jsonl").read_text().splitlines()]
    labelled = [r["correction"] for r in rows if r["is_rumor"] and "correction" in r]
    assert after["forget_recovery_rate"] == pytest.approx(labelled.count("states_truth") / len(labelled))
    b = json.loads((tmp_path / "before" / "results.json").read_text())["summary"]
    a = json.loads((tmp_path / "after" / "results.json").read_text())["summary"]
    assert result["collateral"]["retain/image/gen.overall"] == pytest.approx(b["retain/image/gen.overall"]
                                                                              - a["retain/image/gen.overall"])
    saved = json.loads((tmp_path / "correction.json").read_text())
    assert saved["after"] == pytest.approx(after) and "model" not in saved
