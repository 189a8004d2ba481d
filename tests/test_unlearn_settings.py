"""The OFFSIDE unlearning settings as data selection (counts derived by hand from the synthetic
release's attributes), the forget/retain batches (ratio, shared rows, refusal and corrected
answers read back from the tokens) and empty filler rows that add nothing to importances."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from offside_data_fixtures import tiny_tokenizer

from offside_jax.data.attributes import RUMOR_ATTRIBUTES
from offside_jax.data.batches import BatchDataError, TextEncoder, fit_shape, sequential_batches, with_answer
from offside_jax.data.offside import load_release
from offside_jax.data.synthetic import SyntheticConfig, make_release
from offside_jax.unlearn import dampening, objectives
from offside_jax.unlearn.settings import REFUSALS, SettingError, UnlearningBatches, select

PLAYERS = 2


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings") / "release"
    make_release(root, SyntheticConfig(players=PLAYERS, seed=1, image_size=48))
    return load_release(root)


@pytest.fixture(scope="module")
def tokenizer(release):
    corpus = [e.question + " " + e.answer for e in release.examples()] + list(REFUSALS)
    corpus += [e.corrected_answer for e in release.examples() if e.corrected_answer]
    return tiny_tokenizer(corpus)


def ids(examples):
    return [(e.source, e.index) for e in examples]


def test_unimodal_trains_on_text_twins_and_forgets_by_attribute(release):
    text_forget, text_retain = release["pure_text", "forget"], release["pure_text", "retain"]
    sets = select(release, "unimodal", vision=False, forget_attributes=["rumor"])
    rumors = [e for e in text_forget if e.attribute in RUMOR_ATTRIBUTES]
    others = [e for e in text_forget if e.attribute not in RUMOR_ATTRIBUTES]
    # 1 forget image per player, 3 of its 14 questions state the rumor.
    assert len(rumors) == PLAYERS * 3 and len(others) == PLAYERS * 11
    assert ids(sets.forget) == ids(sets.forget_all) == ids(rumors)
    assert ids(sets.retain) == ids(others) + ids(text_retain)  # the rest of the forget image is kept
    assert all(e.modality == "text" and e.is_rumor for e in sets.forget)
    assert set(sets.evaluation) == {"forget", "retain"}  # a text model cannot be asked about images
    assert ids(sets.full) == ids(sets.retain) + ids(sets.forget_all)

    # A vision-language model trained on text is also measured on the image questions.
    with_images = select(release, "unimodal", vision=True, forget_attributes=["club_joined"])
    image_forget = with_images.evaluation["forget_image"]
    assert ids(image_forget) == ids([e for e in release["complete", "forget"] if e.attribute == "club_joined"])
    assert all(e.modality == "image" for e in image_forget)
    assert len(with_images.evaluation["retain_image"]) == len(release["complete", "retain"]) + PLAYERS * 13


def test_multimodal_needs_images_and_forgets_whole_forget_images(release):
    with pytest.raises(SettingError, match="needs a vision-language model"):
        select(release, "multimodal", vision=False)
    sets = select(release, "multimodal", vision=True)
    assert ids(sets.forget) == ids(release["complete", "forget"]) and len(sets.forget) == PLAYERS * 14
    assert ids(sets.retain) == ids(release["complete", "retain"])
    assert all(e.modality == "image" for e in sets.forget + sets.retain)
    assert ids(sets.evaluation["forget_text"]) == ids(release["pure_text", "forget"])


def test_selective_takes_the_release_parts(release):
    sets = select(release, "selective", vision=True)
    assert ids(sets.forget) == ids(release["selective", "forget_part"])
    assert ids(sets.retain) == ids(release["selective", "retain_part"]) + ids(release["complete", "retain"])
    # The text twins measured are those of the forgotten questions.
    twins = sets.evaluation["forget_text"]
    assert {(e.image_id, e.attribute) for e in twins} == {(e.image_id, e.attribute) for e in sets.forget}


def test_corrective_subset_and_bad_attributes(release):
    full = select(release, "unimodal", vision=False)
    half = select(release, "unimodal", vision=False, identified_fraction=0.5, seed=7)
    assert len(half.forget) == round(0.5 * len(full.forget)) and len(half.forget_all) == len(full.forget)
    assert set(ids(half.forget)) < set(ids(full.forget))
    assert ids(select(release, "unimodal", vision=False, identified_fraction=0.5, seed=7).forget) == ids(half.forget)
    assert ids(half.full) == ids(full.full)  # SSD's D still holds every forget record
    with pytest.raises(SettingError, match="unknown forget_attributes .*'shoe_size'"):
        select(release, "unimodal", vision=False, forget_attributes=["shoe_size"])
    with pytest.raises(SettingError, match="unknown setting"):
        select(release, "pure_text", vision=False)


def decoded_answers(tokenizer, batch):
    rows = []
    for ids_, mask in zip(batch["input_ids"], batch["loss_mask"]):
        rows.append(tokenizer.decode(ids_[mask == 1]))
    return rows


def decoded_prompts(tokenizer, batch):
    return [tokenizer.decode(i[(a == 1) & (m == 0)]) for i, a, m in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])]


def test_batches_ratio_shared_rows_refusals_and_corrections(release, tokenizer):
    sets = select(release, "unimodal", vision=False, forget_attributes=["rumor"])
    splits = ("forget", "retain", "forget_idk", "forget_alt")
    batches = UnlearningBatches(sets, TextEncoder(tokenizer), splits, forget_batch_size=2, retain_ratio=3, seed=0)
    batches.encoder = fit_shape(TextEncoder(tokenizer), batches.all_examples())
    by_index = {e.index: e for e in sets.forget}
    seen = []
    for i in range(len(sets.forget) // 2):  # one epoch of forget rows
        b = batches(i)
        assert b["forget"]["input_ids"].shape == (2, batches.encoder.max_length)
        assert b["retain"]["input_ids"].shape == (6, batches.encoder.max_length)  # 1:3
        rows = [by_index[int(k)] for k in b["forget"]["index"]]
        seen += [e.index for e in rows]
        # The three forget variants ask the same questions ...
        prompts = decoded_prompts(tokenizer, b["forget"])
        assert decoded_prompts(tokenizer, b["forget_idk"]) == prompts == decoded_prompts(tokenizer, b["forget_alt"])
        assert all(e.question in p for e, p in zip(rows, prompts))
        # ... answered with the rumor, a refusal, and the corrected answer.
        assert decoded_answers(tokenizer, b["forget"]) == [e.answer + "<|im_end|>" for e in rows]
        assert decoded_answers(tokenizer, b["forget_idk"]) == [REFUSALS[e.index % len(REFUSALS)] + "<|im_end|>" for e in rows]
        assert decoded_answers(tokenizer, b["forget_alt"]) == [e.corrected_answer + "<|im_end|>" for e in rows]
    assert sorted(seen) == sorted(by_index)  # every forget record once per epoch
    for key, value in batches(3).items():  # a pure function of the index
        np.testing.assert_array_equal(value["input_ids"], batches(3)[key]["input_ids"])

    true_fact = next(e for e in release["pure_text", "retain"])
    with pytest.raises(BatchDataError, match=r"retain_set.json: record 0: no corrected_answer or corrected_fact"):
        from offside_jax.unlearn.settings import alternate_answer

        alternate_answer(true_fact)
    with pytest.raises(SettingError, match="takes 20 forget rows but the forget set has 6"):
        UnlearningBatches(sets, batches.encoder, ("forget",), forget_batch_size=20)
    assert with_answer(true_fact, "X").answer == "X" and with_answer(true_fact, "X").messages[-1].content == "X"


def test_empty_filler_rows_add_nothing_to_importance(release, tokenizer):
    """A last batch filled with empty rows: the per-example importance still equals the mean
    over the real examples of their squared gradients, computed one by one."""
    from transformers import LlamaConfig

    from offside_jax.models.auto import create_model

    examples = release["pure_text", "forget"][:5]
    encoder = fit_shape(TextEncoder(tokenizer), examples)
    batches = list(sequential_batches(examples, encoder, 4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4]
    assert batches[1]["attention_mask"][1:].sum() == 0 and batches[1]["loss_mask"].sum() > 0

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=20_000.0)
    model = create_model(config, seed=0)
    cfg = dampening.DampeningConfig(estimator="per_example", per_example_chunk=2, params=r"mlp\.down_proj")
    imp, n = dampening.importance(model, batches, cfg)
    assert n == 5

    graphdef, params, rest = nnx.split(model, dampening.param_filter(cfg.params), ...)
    expected = jax.tree.map(jnp.zeros_like, params)
    for e in examples:
        row = {k: jnp.asarray(v) for k, v in encoder.collate([encoder.encode(e)]).items()}
        grads = jax.grad(lambda p, row=row: objectives.batch_mean_nll(nnx.merge(graphdef, p, rest).logits(
            nnx.merge(graphdef, p, rest).hidden_states(row)), row))(params)
        expected = jax.tree.map(lambda a, g: a + g ** 2 / 5, expected, grads)
    for got, want in zip(jax.tree.leaves(imp), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-12)
