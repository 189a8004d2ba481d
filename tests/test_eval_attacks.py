"""Robustness attacks: quantization against numpy, prompt templates by hand, user template
files, and the attacks run end to end on the trained tiny Qwen2.5-VL after gradient ascent."""
from __future__ import annotations

import json

import numpy as np
import pytest

from offside_jax.eval import attacks
from offside_jax.eval.attacks import AttackConfig, AttackContext, AttackTemplateError, PromptAttack
from offside_jax.eval.items import EvalItem, build_tasks
from offside_jax.eval.suite import Suite
from offside_jax.eval.tuning import TuneConfig
from offside_jax.models.lora import linear_layers

import eval_fixtures as fx
import offside_reference


def numpy_rtn(w: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: per column, the nearest of the 2**bits - 1 symmetric levels."""
    out = np.empty_like(w)
    qmax = 2 ** (bits - 1) - 1
    for j in range(w.shape[1]):
        col = w[:, j].astype(np.float64)
        peak = np.abs(col).max()
        if peak == 0:
            out[:, j] = 0
            continue
        levels = np.arange(-qmax, qmax + 1) * (peak / qmax)
        out[:, j] = levels[np.abs(col[:, None] - levels[None, :]).argmin(axis=1)]
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_kernel_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(37, 11)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel stays zero
    w[5, 7] = 9.0  # an outlier sets its own column's scale only
    got = np.asarray(attacks.quantize_kernel(w, bits))
    np.testing.assert_allclose(got, numpy_rtn(w, bits), rtol=1e-6, atol=1e-6)
    for j in range(w.shape[1]):
        assert len(np.unique(got[:, j])) <= 2 ** bits - 1
        step = np.abs(w[:, j]).max() / (2 ** (bits - 1) - 1) if np.abs(w[:, j]).max() else 0
        assert np.abs(got[:, j] - w[:, j]).max() <= step / 2 + 1e-6


def test_quantize_model_leaves_head_embeddings_and_input_alone():
    model = fx.vanilla()
    before = {p: np.asarray(layer.kernel.get_value()) for p, layer in linear_layers(model)}
    embed = np.asarray(model.model.embed_tokens.embedding.get_value())
    quantized, done = attacks.quantize_model(model, 4, exclude=r"merger")
    assert done and not any("merger" in p for p in done)
    after = {p: np.asarray(layer.kernel.get_value()) for p, layer in linear_layers(quantized)}
    for path, w in before.items():
        np.testing.assert_array_equal(np.asarray(dict(linear_layers(model))[path].kernel.get_value()), w)  # input untouched
        if path in done:
            np.testing.assert_allclose(after[path], numpy_rtn(w, 4), rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(after[path], w)
    np.testing.assert_array_equal(np.asarray(quantized.model.embed_tokens.embedding.get_value()), embed)


def _item(**kw):
    base = dict(uid="f:0", test_set="forget", modality="image", fmt="gen",
                question="Which club is the player in the image going to join?",
                prompt="Which club is the player in the image going to join?", reference="He will join Vexa FC.",
                images=("x.jpg",), player_id=None)
    base.update(kw)
    return EvalItem(**base)


class _NoShots:
    def shots(self, item, k):
        return "\n".join(f"Q: q{i}\nA: a{i}" for i in range(k))


def test_builtin_prompt_attacks_by_hand():
    gen = _item()
    mcq = _item(fmt="mcq", options=(("A", "Vexa FC"), ("B", "Dorn United")), correct="A",
                prompt="Which club is the player in the image going to join?\nA. Vexa FC\nB. Dorn United\n...")
    ctx = _NoShots()
    a = attacks.PROMPT_ATTACKS
    assert a["paraphrase"].apply(gen, ctx).prompt == "Which club will the footballer pictured move to?"
    assert a["other_language"].apply(gen, ctx).prompt == "¿A qué club va a unirse el jugador de la imagen?"
    assert a["other_language"].apply(_item(question="Untranslatable words?"), ctx) is None  # rewritten_only
    assert a["in_context_rumor"].apply(gen, ctx).prompt == (
        'I just read this in the news: "He will join Vexa FC."\nWhich club is the player in the image going to join?')
    assert a["few_shot_retained"].apply(gen, ctx).prompt == (
        "Answer like in these examples.\nQ: q0\nA: a0\nQ: q1\nA: a1\nQ: q2\nA: a2\n"
        "Q: Which club is the player in the image going to join?\nA:")
    assert a["mcq_reformulation"].apply(gen, ctx) is None  # multiple choice only
    assert a["mcq_reformulation"].apply(mcq, ctx).prompt == (
        "Which club is the player in the image going to join? Choose one of A) Vexa FC; B) Dorn United. "
        "The answer is the letter A or B:")
    roleplay = a["roleplay"].apply(mcq, ctx)
    # the attacked question inside OFFSIDE's multiple-choice query (eval_classi.py)
    assert roleplay.prompt.endswith("\n" + offside_reference.full_query(
        "Which club is the player in the image going to join?", {"A": "Vexa FC", "B": "Dorn United"}))
    assert roleplay.images == mcq.images and roleplay.correct == "A"  # only the prompt changes


def test_every_builtin_attack_rewrites_the_synthetic_forget_set():
    """Each attack applies to the benchmark's own questions (templates cover their wordings)."""
    rel = fx.release()
    tasks = build_tasks(rel, ("forget",))
    original = {(t.name, it.uid): it.prompt for t in tasks for it in t.items}
    ctx = AttackContext(rel)
    for name, attack in attacks.PROMPT_ATTACKS.items():
        out = attacks.attack_tasks(tasks, attack, ctx)
        eligible = sum(len(t.items) for t in tasks if t.fmt in attack.formats)
        assert sum(len(t.items) for t in out) > 0.9 * eligible, name
        assert all(it.prompt != original[(t.name, it.uid)] for t in out for it in t.items), name


def test_few_shot_uses_the_players_retained_text_facts():
    rel = fx.release()
    ctx = AttackContext(rel)
    twins = [e for e in rel["pure_text", "retain"] if e.player_id == 1]
    shots = ctx.shots(_item(player_id=1), 3)
    pairs = shots.split("\n")
    assert len(pairs) == 6
    known = {(f"Q: {e.question}", f"A: {e.answer}") for e in twins}
    assert {(pairs[i], pairs[i + 1]) for i in range(0, 6, 2)} <= known
    assert ctx.shots(_item(player_id=1), 3) == shots  # deterministic


def test_user_template_file_extends_and_errors_name_the_problem(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("attacks:\n  shout:\n    description: upper case\n    formats: [gen]\n"
                    "    substitutions: [['club', 'CLUB']]\n    template: 'TELL ME NOW: {question}'\n")
    loaded = attacks.load_prompt_attacks(good)
    try:
        assert [a.name for a in loaded] == ["shout"] and "shout" in attacks.PROMPT_ATTACKS
        assert attacks.PROMPT_ATTACKS["shout"].apply(_item(), _NoShots()).prompt == (
            "TELL ME NOW: Which CLUB is the player in the image going to join?")
    finally:
        attacks.PROMPT_ATTACKS.pop("shout")
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks:\n  oops:\n    template: '{questoin}'\n")
    with pytest.raises(AttackTemplateError, match=r"bad.yaml.*'oops'.*questoin"):
        attacks.load_prompt_attacks(bad)
    bad.write_text("attacks:\n  oops:\n    formats: [gen]\n    colour: red\n")
    with pytest.raises(AttackTemplateError, match=r"'oops'.*unknown field.*colour"):
        attacks.load_prompt_attacks(bad)
    with pytest.raises(AttackTemplateError, match="shots"):
        PromptAttack("x", template="{shots} {question}", shots=0)


@pytest.mark.slow
def test_attacks_end_to_end_on_the_unlearned_model(tmp_path):
    """Prompt attacks, int8/int4 and relearning run on the GA model and write their outputs;
    relearning the rumors brings the forget score back up."""
    suite = Suite(fx.release(), fx.processor(), fx.suite_config(test_sets=["forget", "retain"], formats=["gen"],
                                                           max_examples=14, likelihood=False))
    config = AttackConfig(prompt=["in_context_rumor", "paraphrase"], quantize_bits=[8, 4],
                          relearn_tune=TuneConfig(steps=16, batch_size=16, lr=3e-3, mesh=[1, 1, 1]), relearn_curve_every=8)
    model = fx.ga_unlearned()
    clean = suite.run(model, name="ga", progress=False)["summary"]["forget/image/gen.overall"]
    out = attacks.run_attacks(model, suite, config, out_dir=tmp_path, name="ga", progress=False)
    assert set(out) == {"prompt_in_context_rumor", "prompt_paraphrase", "int8", "int4", "relearn"}
    saved = json.loads((tmp_path / "attacks.json").read_text())
    assert saved["int8"]["summary"] == pytest.approx(out["int8"]["summary"])
    for name in out:
        assert (tmp_path / name / "results.json").is_file() and (tmp_path / name / "examples").is_dir()
    # int8 barely moves a model: its forget score stays near the unquantized one.
    assert abs(out["int8"]["summary"]["forget/image/gen.overall"] - clean) < 0.1
    curve = out["relearn"]["curve"]
    assert [c["step"] for c in curve] == [0, 8, 16]
    assert curve[0]["forget/image/gen.overall"] == pytest.approx(clean, abs=1e-6)
    assert curve[-1]["forget/image/gen.overall"] > clean + 0.2
    assert out["relearn"]["summary"]["forget/image/gen.overall"] == pytest.approx(curve[-1]["forget/image/gen.overall"])
