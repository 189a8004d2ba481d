"""ConceptVectors on tiny random-init decoders, checked against numpy brute force."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import LlamaConfig
from word_tokenizer import WordTokenizer

from offside_jax.models.auto import create_model
from offside_jax.train.session import mask_updates
from offside_jax.train.step import partition
from offside_jax.unlearn import concept_vectors as cv

VOCAB, D, MLP, LAYERS = 64, 16, 24, 3


def tiny(tied: bool, seed: int = 0):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=20_000.0,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return create_model(config, seed=seed)


def head_matrix(model) -> np.ndarray:
    """[D, V] unembedding, read straight from the parameters."""
    if model.lm_head is None:
        return np.asarray(model.model.embed_tokens.embedding[...]).T
    return np.asarray(model.lm_head.kernel[...])


def brute_force_scores(model, layer, concept):
    kernel = np.asarray(model.model.layers[layer].mlp.down_proj.kernel[...], np.float64)
    logits = kernel @ head_matrix(model).astype(np.float64)  # [MLP, V]
    ranks = np.zeros(kernel.shape[0])
    mass = np.zeros(kernel.shape[0])
    for row in range(kernel.shape[0]):
        probs = np.exp(logits[row] - logits[row].max())
        probs /= probs.sum()
        ranks[row] = np.mean([np.sum(logits[row] > logits[row, t]) for t in concept])
        mass[row] = probs[concept].sum()
    return ranks, mass


@pytest.mark.parametrize("tied", [False, True])
def test_row_scores_match_brute_force(tied):
    model = tiny(tied)
    concept = [5, 17, 40]
    for layer in range(LAYERS):
        ranks, mass = cv.score_rows(model, layer, concept, chunk=7)  # 7 does not divide 24: padding path
        want_ranks, want_mass = brute_force_scores(model, layer, concept)
        np.testing.assert_allclose(ranks, want_ranks)
        np.testing.assert_allclose(mass, want_mass, rtol=1e-4)


def test_locate_orders_like_a_brute_force_ranking_and_finds_a_planted_trace():
    model = tiny(False, seed=3)
    concept = [9, 33]
    # Plant a trace: layer 1, row 11 writes the concept tokens' unembedding directions.
    head = head_matrix(model)
    kernel = model.model.layers[1].mlp.down_proj.kernel
    kernel.set_value(kernel[...].at[11].set(jnp.asarray(5.0 * (head[:, 9] + head[:, 33]))))

    found = cv.locate_traces(model, concept, top=6)
    assert (found[0].layer, found[0].dim) == (1, 11)
    assert found[0].mean_rank < found[1].mean_rank

    every = []
    for layer in range(LAYERS):
        ranks, mass = brute_force_scores(model, layer, concept)
        every += [(r, -m, layer, dim) for dim, (r, m) in enumerate(zip(ranks, mass))]
    want = [(layer, dim) for _, _, layer, dim in sorted(every)[:6]]
    assert [(t.layer, t.dim) for t in found] == want

    by_mass = cv.locate_traces(model, concept, top=4, order="mass", layers=[0, 2])
    candidates = [(-m, r, layer, dim) for layer in (0, 2)
                  for dim, (r, m) in enumerate(zip(*brute_force_scores(model, layer, concept)))]
    assert [(t.layer, t.dim) for t in by_mass] == [(layer, dim) for _, _, layer, dim in sorted(candidates)[:4]]


def test_locate_rejects_bad_input():
    model = tiny(False)
    with pytest.raises(ValueError, match="out of range"):
        cv.locate_traces(model, [3], layers=[LAYERS])
    with pytest.raises(ValueError, match="concept token ids"):
        cv.score_rows(model, 0, [VOCAB])
    with pytest.raises(ValueError, match="outside the model"):
        cv.trace_rows(model, [cv.Trace(0, MLP)])
    with pytest.raises(ValueError, match="outside the model"):
        cv.noise_traces(model, [cv.Trace(LAYERS, 0)], jax.random.key(0))


def test_concept_token_ids_cover_both_spellings():
    tok = WordTokenizer()
    ids = cv.concept_token_ids(tok, ["Leo Messi"])
    assert ids == sorted({tok.vocab["Leo"], tok.vocab["ĠLeo"], tok.vocab["ĠMessi"]})


def test_trace_changes_by_hand():
    before = tiny(False, seed=1)
    after = tiny(False, seed=1)
    traces = [cv.Trace(0, 3), cv.Trace(2, 20)]
    new_row = np.linspace(-1.0, 1.0, D).astype(np.float32)
    kernel = after.model.layers[2].mlp.down_proj.kernel
    kernel.set_value(kernel[...].at[20].set(jnp.asarray(new_row)))

    changes = cv.trace_changes(before, after, traces, k=10)
    untouched, changed = changes
    assert (untouched.cosine, untouched.l2, untouched.jaccard) == (pytest.approx(1.0), 0.0, 1.0)

    old_row = np.asarray(before.model.layers[2].mlp.down_proj.kernel[...][20])
    assert changed.cosine == pytest.approx(old_row @ new_row / np.linalg.norm(old_row) / np.linalg.norm(new_row), rel=1e-5)
    assert changed.l2 == pytest.approx(np.linalg.norm(old_row - new_row), rel=1e-5)
    head = head_matrix(before)
    top_old = set(np.argsort(-(old_row @ head))[:10].tolist())
    top_new = set(np.argsort(-(new_row @ head))[:10].tolist())
    assert changed.jaccard == pytest.approx(len(top_old & top_new) / len(top_old | top_new))

    summary = cv.trace_summary(changes)
    assert summary["jaccard"] == pytest.approx((1.0 + changed.jaccard) / 2)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_noise_changes_only_the_located_vectors():
    model = tiny(False, seed=2)
    before = jax.tree.map(np.asarray, _params(model))
    traces = [cv.Trace(1, 4), cv.Trace(1, 9), cv.Trace(2, 0)]
    cv.noise_traces(model, traces, jax.random.key(0), sigma=0.1)
    after = jax.tree.map(np.asarray, _params(model))

    located = {("1", 4), ("1", 9), ("2", 0)}
    for (path, old), (_, new) in zip(jax.tree_util.tree_leaves_with_path(before),
                                     jax.tree_util.tree_leaves_with_path(after)):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        if not name.endswith("mlp.down_proj.kernel"):
            np.testing.assert_array_equal(old, new, err_msg=name)
            continue
        layer = name.split(".")[2]
        for row in range(MLP):
            if (layer, row) in located:
                delta = new[row] - old[row]
                assert np.all(delta != 0) and 0.02 < delta.std() < 0.3, (name, row)
            else:
                np.testing.assert_array_equal(old[row], new[row], err_msg=f"{name}[{row}]")


def test_masked_finetune_trains_only_the_traces():
    model = tiny(True, seed=4)
    traces = [cv.Trace(0, 2), cv.Trace(2, 17)]
    rows = cv.trace_rows(model, traces)
    assert sorted(rows) == ["model.layers.0.mlp.down_proj.kernel", "model.layers.2.mlp.down_proj.kernel"]
    assert [np.flatnonzero(m).tolist() for _, m in sorted(rows.items())] == [[2], [17]]

    parts = partition(model)
    params = parts.trainable
    start = jax.tree.map(np.asarray, params)
    # AdamW with weight decay: decay alone would move every weight if only gradients were masked.
    optimizer = mask_updates(optax.adamw(1e-2, weight_decay=0.1), params, rows)
    opt_state = optimizer.init(params)
    batch = {"input_ids": jnp.asarray([[3, 8, 11, 5, 9]]), "attention_mask": jnp.ones((1, 5), jnp.int32)}

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = parts.merge(p)(batch["input_ids"], batch["attention_mask"])
            return -jnp.mean(jax.nn.log_softmax(logits)[0, :-1, 7])  # push every position toward token 7

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
        params, opt_state = step(params, opt_state)
    changed_rows = {"model.layers.0.mlp.down_proj.kernel": {2}, "model.layers.2.mlp.down_proj.kernel": {17}}
    for (path, old), (_, new) in zip(jax.tree_util.tree_leaves_with_path(start),
                                     jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, params))):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        if name not in changed_rows:
            np.testing.assert_array_equal(old, new, err_msg=name)
            continue
        for row in range(MLP):
            if row in changed_rows[name]:
                assert not np.array_equal(old[row], new[row]), (name, row)
            else:
                np.testing.assert_array_equal(old[row], new[row], err_msg=f"{name}[{row}]")


def test_ablation_end_to_end_moves_only_the_concept_traces():
    model = tiny(False, seed=5)
    reference = tiny(False, seed=5)
    concept = [12, 30]
    traces = cv.locate_traces(model, concept, layers=[1, 2], top=3)
    others = [cv.Trace(0, 0), cv.Trace(1, 5)]
    others = [t for t in others if (t.layer, t.dim) not in {(s.layer, s.dim) for s in traces}]

    cv.noise_traces(model, traces, jax.random.key(1))
    parts = partition(model)
    params = parts.trainable
    optimizer = mask_updates(optax.adam(5e-2), params, cv.trace_rows(model, traces))
    opt_state = optimizer.init(params)
    batch = jnp.asarray([[4, 12, 30, 6, 12, 30]])

    def concept_logprob(p):
        logp = jax.nn.log_softmax(parts.merge(p)(batch))
        return jnp.mean(logp[0, :, 12] + logp[0, :, 30])

    @jax.jit
    def step(params, opt_state):  # descend the concept tokens' log-probability: unlearn them
        updates, opt_state = optimizer.update(jax.grad(concept_logprob)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    before = float(concept_logprob(params))
    for _ in range(5):
        params, opt_state = step(params, opt_state)
    assert float(concept_logprob(params)) < before  # the masked steps do train the traces
    unlearned = parts.merge(params)

    for change in cv.trace_changes(reference, unlearned, traces, k=8):
        assert change.cosine < 1.0 and change.l2 > 0.0
    for change in cv.trace_changes(reference, unlearned, others, k=8):
        assert (change.cosine, change.l2, change.jaccard) == (pytest.approx(1.0), 0.0, 1.0)
