"""SCL on images (offside_jax.correct.scl_vl): flip pairs of two-turn image episodes carried into
the DPO batch with their images, the lr = 0 control, and the ``mode: scl_vl`` run end to end."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from offside_jax.config import CorrectConfig, load_config
from offside_jax.correct import scl as scl_lib
from offside_jax.correct import scl_vl
from offside_jax.data.batches import make_encoder

from tests import eval_fixtures as fx


def _items():
    rel = fx.release()
    examples = [e for e in rel["complete", "forget"] if e.modality == "image"]
    items = scl_lib.rumor_items_from_examples(examples, np.random.default_rng(0))
    assert items and all(it.image for it in items)
    return rel, items


def _answer(item, right: bool) -> str:
    letter = item.answer if right else ("B" if item.answer == "A" else "A")
    return f"I look at the image. ## {letter} ##"


def _hand_made(items):
    """Four episodes: right->wrong, wrong->right, right->right, wrong->wrong."""
    picked = items[:4]
    r1 = [_answer(picked[0], True), _answer(picked[1], False), _answer(picked[2], True), _answer(picked[3], False)]
    r2 = [_answer(picked[0], False), _answer(picked[1], True), _answer(picked[2], True), _answer(picked[3], False)]
    return scl_vl.Episodes(picked, r1, r2)


def test_pairs_from_two_turn_image_episodes_carry_the_image_into_the_dpo_batch():
    rel, items = _items()
    eps = _hand_made(items)
    pairs = eps.pairs(rel.root)
    assert [p.meta["flip"] for p in pairs] == [scl_lib.RIGHT_TO_WRONG, scl_lib.WRONG_TO_RIGHT]
    # right -> wrong keeps turn 1 as chosen; wrong -> right keeps turn 2; the prompt is the bare question
    assert (pairs[0].chosen, pairs[0].rejected) == (eps.responses1[0], eps.responses2[0])
    assert (pairs[1].chosen, pairs[1].rejected) == (eps.responses2[1], eps.responses1[1])
    assert [p.prompt for p in pairs] == [items[0].question, items[1].question]
    assert all(Path(p.image).is_file() and p.image == str(Path(rel.root) / it.image) for p, it in zip(pairs, items))

    metrics = scl_vl.sliced_metrics(dataclasses.replace(eps, responses2=eps.responses2[:3] + ["## ##"]))
    assert metrics["all"]["n"] == 4 and metrics["all"]["acc_t1"] == 0.5 and metrics["all"]["acc_t2"] == 0.5
    assert metrics["all"]["no_letter_t1"] == 0.0 and metrics["all"]["no_letter_t2"] == 0.25

    # turn 2 is the same conversation: turn 1 (with the image tag), the answer, the review prompt
    chat = scl_vl.turn_chat(items[0], eps.responses1[0], 0, rel.root)
    assert [role for role, _ in chat.turns] == ["user", "assistant", "user"]
    assert chat.turns[0][1].startswith(scl_vl.IMAGE_TAG) and chat.turns[2][1] == scl_lib.review_prompt(0)

    processor = fx.processor()
    encoder = make_encoder(processor)
    batch = scl_vl.dpo_batch(encoder, pairs)
    n = len(pairs)
    assert batch["input_ids"].shape[0] == 2 * n
    pad_id = processor.config.image_token_id
    per_row = (batch["input_ids"] == pad_id).sum(axis=1)
    assert (per_row > 0).all(), "every chosen and rejected row shows the image"
    # per-row vision arrays (the image's patches and their layout) for each chosen and rejected row
    pixels = np.asarray(batch["pixel_values"])
    assert pixels.shape[0] == 2 * n and all(np.abs(pixels[row]).sum() > 0 for row in range(2 * n))
    assert np.asarray(batch["vision_positions"]).shape[0] == 2 * n
    # the image pads sit in the prompt, before the answer the loss is on
    for row in range(2 * n):
        ids, loss = batch["input_ids"][row], batch["loss_mask"][row]
        first_answer = int(np.argmax(loss > 0))
        assert loss.any() and (ids[:first_answer] == pad_id).sum() == per_row[row]
    # chosen rows hold the chosen answers: they differ from the rejected rows only after the prompt
    assert not np.array_equal(batch["input_ids"][0], batch["input_ids"][n])


class _FixedLogits:
    """A stand-in model whose "hidden states" are fixed logits and whose head is the identity
    (no plain matmul head, so the loss reads ``logits``): the loss sees exactly these logits."""

    dtype = np.float32

    def __init__(self, logits: np.ndarray):
        self._logits = jax.numpy.asarray(logits)

    def hidden_states(self, batch):
        return self._logits

    def output_head(self):
        return None

    def logits(self, hidden):
        return hidden


def _numpy_answer_logprobs(logits: np.ndarray, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per row: summed log-probability of the answer tokens and their count (position t predicts t + 1)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    ids, weights = batch["input_ids"], batch["loss_mask"] * batch["attention_mask"]
    sums, counts = [], []
    for row in range(ids.shape[0]):
        answer = [t for t in range(ids.shape[1] - 1) if weights[row, t + 1] > 0]
        sums.append(sum(logp[row, t, ids[row, t + 1]] for t in answer))
        counts.append(len(answer))
    return np.array(sums), np.array(counts, dtype=float)


def _fixed_pair_batch(rng: np.random.Generator, pairs: int = 3, length: int = 7, vocab: int = 11) -> dict:
    """Chosen rows then rejected rows; answers of different lengths end each row, then padding."""
    ids = rng.integers(vocab, size=(2 * pairs, length))
    loss_mask = np.zeros((2 * pairs, length), np.int32)
    attention = np.ones((2 * pairs, length), np.int32)
    for row in range(2 * pairs):
        answer_len = 1 + row % 3
        loss_mask[row, 3: 3 + answer_len] = 1
        attention[row, 3 + answer_len + 1:] = 0  # right padding after one spare token
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": attention}


def test_the_control_loss_is_sft_beta_times_the_mean_chosen_nll_and_the_full_loss_adds_dpo():
    from offside_jax.correct.preference import make_scl_dpo_loss

    rng = np.random.default_rng(0)
    batch = _fixed_pair_batch(rng)
    policy_logits, reference_logits = (rng.normal(size=batch["input_ids"].shape + (11,)).astype(np.float32) for _ in range(2))
    policy, reference = _FixedLogits(policy_logits), _FixedLogits(reference_logits)
    n = batch["input_ids"].shape[0] // 2
    logp, counts = _numpy_answer_logprobs(policy_logits, batch)
    ref_logp, _ = _numpy_answer_logprobs(reference_logits, batch)
    chosen_nll = -logp[:n] / counts[:n]
    margin = (logp[:n] - ref_logp[:n]) - (logp[n:] - ref_logp[n:])
    dpo = np.log1p(np.exp(-0.1 * margin))  # -log sigmoid(beta margin)
    assert np.all(np.abs(margin) > 1e-3)  # two different models: the DPO term is not a constant

    jbatch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    control = make_scl_dpo_loss(beta=0.1, sft_beta=0.1, dpo_weight=0.0)
    total, pairs, aux = control(policy, jbatch, jax.random.key(0), reference)
    assert float(pairs) == n
    np.testing.assert_allclose(float(total) / float(pairs), 0.1 * chosen_nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["margin"]), margin.mean(), rtol=1e-4)  # still logged for the control

    full, _, _ = make_scl_dpo_loss(beta=0.1, sft_beta=0.1)(policy, jbatch, jax.random.key(0), reference)
    np.testing.assert_allclose(float(full), np.sum(dpo + 0.1 * chosen_nll), rtol=1e-5)


def test_the_report_gives_mean_and_sample_sd_over_seeds_for_scl_and_the_control():
    values = {"0": (0.1, 0.3, 0.2), "1": (0.0, 0.5, 0.25), "2": (0.2, 0.4, 0.5)}  # before, SCL, control Acc@t2

    def metrics(acc_t2):
        return {"all": {**{m: 0.0 for m in scl_vl.METRICS}, "acc_t2": acc_t2, "n": 10}}

    runs = {seed: {"before": metrics(b), "after": metrics(a), "after_control": metrics(c)}
            for seed, (b, a, c) in values.items()}
    summary = scl_vl.seed_summary(runs)
    for column, model in enumerate(("before", "after", "after_control")):
        column_values = [v[column] for v in values.values()]
        got = summary["all"][model]["acc_t2"]
        assert got["seeds"] == 3
        np.testing.assert_allclose(got["mean"], sum(column_values) / 3)
        mean = sum(column_values) / 3
        np.testing.assert_allclose(got["sd"], (sum((x - mean) ** 2 for x in column_values) / 2) ** 0.5)
    assert scl_vl.mean_sd([0.4])["sd"] is None


def _tiny_model():
    """A smaller model than the fixtures' (one layer each side): the step compiles faster."""
    from offside_jax.models import tiny_vl

    shape = dataclasses.replace(fx.SHAPE, hidden_size=32, intermediate_size=64, num_hidden_layers=1, vision_depth=1)
    return tiny_vl.init_model(tiny_vl.hf_config(shape, fx.hf_config()[1]), seed=0)


@pytest.mark.slow
def test_dpo_with_lr_zero_leaves_the_parameters_bitwise_unchanged():
    from flax import nnx

    rel, items = _items()
    pairs = _hand_made(items).pairs(rel.root)
    model = _tiny_model()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    losses: list[float] = []
    trained = scl_vl.train_dpo(model, make_encoder(fx.processor()), pairs,
                               scl_vl.DPOSettings(lr=0.0, steps=2, pairs_per_step=2), losses_out=losses)
    after = jax.tree.map(np.asarray, nnx.state(trained, nnx.Param))
    assert len(losses) == 2 and all(np.isfinite(losses))
    flat_before, flat_after = jax.tree.leaves(before), jax.tree.leaves(after)
    assert len(flat_before) == len(flat_after)
    for a, b in zip(flat_before, flat_after):
        np.testing.assert_array_equal(a, b)
        assert a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_scl_vl_mode_runs_end_to_end_and_reports_the_metrics(tmp_path):
    from offside_jax.correct.run import run_correct

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "mode=scl_vl", "progress=false",
                             f"scl_vl.release={fx.release().root}", "scl_vl.splits=[forget]", "scl_vl.vanilla_steps=4",
                             "scl_vl.batch_size=8", "scl_vl.warmup_copies=1", "scl_vl.samples=2", "scl_vl.max_new_tokens=4",
                             "scl_vl.steps=2", "scl_vl.pairs_per_step=2", "scl_vl.vocab_size=512", "scl_vl.hidden_size=32",
                             "scl_vl.layers=1", "scl_vl.chosen_sft_control=true"], schema=CorrectConfig)
    results = run_correct(cfg, log=lambda _: None)
    out = tmp_path / "run"
    assert {"results.json", "report.md", "config.yaml"} <= {p.name for p in out.iterdir()}
    run = results["runs"]["0"]
    before = run["before"]["all"]
    for key in ("acc_t1", "acc_t2", "delta_i_to_c", "delta_c_to_i"):
        assert 0.0 <= before[key] <= 1.0
    assert before["delta"] == pytest.approx(before["acc_t2"] - before["acc_t1"])
    assert run["before"]["all"]["n"] == run["eval_items"] > 0
    assert "visual_rumor" in run["before"]
    assert ("after" in run) == (run["pairs"]["n"] > 0)
    assert ("after_control" in run) == (run["pairs"]["n"] > 0)
    if "after_control" in run:
        assert run["control_training"]["dpo_weight"] == 0.0 and run["dpo"]["dpo_weight"] == 1.0
        assert results["summary"]["all"]["after_control"]["acc_t2"]["mean"] == run["after_control"]["all"]["acc_t2"]
    text = (out / "report.md").read_text()
    assert "Acc@t2" in text and "mean ± sd" in text


LONG = os.environ.get("OFFSIDE_JAX_LONG_TESTS") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="about 6 minutes on 2 CPU cores: set OFFSIDE_JAX_LONG_TESTS=1")
def test_the_starting_model_answers_with_option_letters_and_scl_is_scored_beside_its_control(tmp_path):
    """configs/scl_vl_tiny.yaml warms the starting model up for 400 steps so that most of its
    answers give an option letter: before/after then measures correction, not the answer format.
    Measured (seed 0, 18 held-out rumor items; 363 s on 2 shared CPU cores): no option letter in
    22% / 17% of the starting model's turn-1 / turn-2 answers (89% / 67% with 200 steps). Acc@t2
    0.333 before, 0.278 after SCL, 0.333 after the SFT-on-chosen control: over three seeds SCL
    does not raise Acc@t2 here (README, "SCL on images"), so this checks the setting, not a gain."""
    from offside_jax.correct.run import run_correct

    path = Path(__file__).resolve().parents[1] / "configs" / "scl_vl_tiny.yaml"
    cfg = load_config(path, [f"output_dir={tmp_path / 'run'}", "progress=false", 'scl_vl.release=""'], schema=CorrectConfig)
    run = run_correct(cfg, log=lambda _: None)["runs"]["0"]
    before = run["before"]["all"]
    assert before["no_letter_t1"] < 0.5 and before["no_letter_t2"] < 0.5
    for scored in ("after", "after_control"):
        assert run[scored]["all"]["n"] == before["n"]
        assert 0.0 <= run[scored]["all"]["acc_t2"] <= 1.0
    assert run["control_training"]["dpo_weight"] == 0.0
