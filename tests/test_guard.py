"""GUARD: classifier, span extraction, the span filter against brute force, the sampler hook,
and a tiny random-init Llama end to end."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import LlamaConfig
from word_tokenizer import WordTokenizer

from offside_jax.models.auto import create_model
from offside_jax.models.generate import SamplingConfig, generate, left_pad
from offside_jax.unlearn import guard


class BigramModel(nnx.Module):
    """Next-token logits are a fixed table row of the previous token: logits we construct."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def init_cache(self, batch, length):
        return jnp.zeros((batch,), jnp.int32)

    def prefill(self, inputs, cache):
        last = inputs["input_ids"][:, -1]
        return self.table[...][last], cache, jnp.zeros(last.shape, jnp.int32)

    def decode_step(self, tokens, positions, cache, cache_index):
        return self.table[...][tokens], cache


def occurs(span, tokens) -> bool:
    n = len(span)
    return any(tuple(tokens[i:i + n]) == tuple(span) for i in range(len(tokens) - n + 1))


def emitted(out, row):
    return out.tokens[row, :out.lengths[row]].tolist()


# -- the filter against brute force --------------------------------------------------------------


def test_recent_tokens():
    generated = jnp.asarray([[7, 8, 9, 0, 0], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(guard.recent_tokens(generated, jnp.int32(2), 3), [[-1, 7, 8], [-1, 1, 2]])
    np.testing.assert_array_equal(guard.recent_tokens(generated, jnp.int32(0), 2), [[-1, -1], [-1, -1]])
    np.testing.assert_array_equal(guard.recent_tokens(generated, jnp.int32(5), 2), [[0, 0], [4, 5]])


def brute_force_token_match(spans, active, history, vocab, token_penalty):
    banned = np.zeros((len(history), vocab), bool)
    penalty = np.zeros((len(history), vocab))
    for b, seen in enumerate(history):
        for s, span in enumerate(spans):
            if not active[b, s]:
                continue
            for m in range(len(span)):
                if m <= len(seen) and tuple(seen[len(seen) - m:]) == tuple(span[:m]):
                    if m == len(span) - 1:
                        banned[b, span[m]] = True
                    else:
                        penalty[b, span[m]] = max(penalty[b, span[m]], token_penalty * (m + 1) / len(span))
    return banned, penalty


def test_token_match_against_brute_force():
    rng = np.random.default_rng(0)
    vocab, steps = 6, 7
    spans = [(1,), (2, 3), (2, 3, 4), (3, 3, 5), (4, 2)]
    embedding = jnp.asarray(rng.normal(size=(vocab, 4)), jnp.float32)
    for trial in range(20):
        history = [rng.integers(0, vocab, size=rng.integers(0, steps)).tolist() for _ in range(3)]
        flags = rng.random(3) < 0.7
        filt = guard.span_filter(spans, flags, embedding, guard.DecodingConfig(token_penalty=3.0))
        generated = np.zeros((3, steps), np.int32)
        for b, seen in enumerate(history):
            generated[b, :len(seen)] = seen
        # Rows share one step in the sampler; check each row at the step that ends its history.
        for b, seen in enumerate(history):
            window = guard.recent_tokens(jnp.asarray(generated), jnp.int32(len(seen)), 2)
            banned, penalty = filt.token_match(window, vocab)
            want_banned, want_penalty = brute_force_token_match(spans, np.asarray(filt.active), history, vocab, 3.0)
            np.testing.assert_array_equal(np.asarray(banned)[b], want_banned[b], err_msg=f"trial {trial} row {b}")
            np.testing.assert_allclose(np.asarray(penalty)[b], want_penalty[b], rtol=1e-6)


def test_semantic_match_against_explicit_continuations():
    rng = np.random.default_rng(1)
    vocab, dim = 12, 5
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    spans = [(3, 4), (7,), (1, 2, 9)]
    config = guard.DecodingConfig(semantic_penalty=4.0, semantic_threshold=0.3, semantic_top_k=5)
    filt = guard.span_filter(spans, np.array([True, True, False]), jnp.asarray(table), config)
    history = [[5, 6, 3], [8], [2, 2]]
    generated = np.zeros((3, 6), np.int32)
    for b, seen in enumerate(history):
        generated[b, :len(seen)] = seen
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    for b, seen in enumerate(history):
        window = guard.recent_tokens(jnp.asarray(generated), jnp.int32(len(seen)), 2)
        got = np.asarray(filt.semantic_match(jnp.asarray(logits), window))[b]
        want = np.zeros(vocab)
        if b < 2:  # the third row is not flagged
            for c in np.argsort(-logits[b])[:5]:
                best = -1.0
                for span in spans:
                    previous = seen[max(len(seen) - (len(span) - 1), 0):] if len(span) > 1 else []
                    cont = table[previous].sum(0) + table[c]
                    target = table[list(span)].mean(0)
                    best = max(best, cont @ target / np.linalg.norm(cont) / np.linalg.norm(target))
                want[c] = 4.0 * max(best - 0.3, 0.0) / 0.7
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"row {b}")


def test_unflagged_rows_keep_their_logits_bit_for_bit():
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    filt = guard.span_filter([(1, 2), (3,)], np.array([False, True]), table)
    logits = jnp.asarray(rng.normal(size=(2, 10)), jnp.float32)
    apply = jax.jit(lambda f, x, g, i: f(x, g, i))
    out = np.asarray(apply(filt, logits, jnp.asarray([[1, 0, 0], [1, 0, 0]], jnp.int32), jnp.int32(1)))
    np.testing.assert_array_equal(out[0], np.asarray(logits)[0])
    assert out[1, 2] == np.finfo(np.float32).min and out[1, 3] == np.finfo(np.float32).min


# -- the sampler hook on constructed logits -------------------------------------------------------


def chain_table(vocab, chain, margin=20.0, seed=0):
    """Random logits plus ``margin`` on ``chain[i] -> chain[i + 1]``: the model wants the chain."""
    table = np.random.default_rng(seed).normal(size=(vocab, vocab))
    for a, b in itertools.pairwise(chain):
        table[a, b] += margin
    return table


def test_filter_never_emits_a_span_the_logits_insist_on():
    vocab = 16
    table = chain_table(vocab, [3, 4, 5, 6, 7, 8, 4, 5, 6, 9, 10])
    model = BigramModel(table)
    spans = [(4, 5, 6), (10,), (7, 8)]
    inputs = left_pad([[1, 3], [2, 3], [3]], pad_id=0)
    sampling = SamplingConfig(max_new_tokens=12)
    plain = generate(model, inputs, sampling)
    assert all(occurs(spans[0], emitted(plain, row)) for row in range(3))  # the logits insist

    flags = np.array([True, False, True])
    filt = guard.span_filter(spans, flags, jnp.asarray(np.eye(vocab), jnp.float32))
    guarded = generate(model, inputs, sampling, logits_processor=filt)
    for row in (0, 2):
        assert not any(occurs(span, emitted(guarded, row)) for span in spans), emitted(guarded, row)
    np.testing.assert_array_equal(guarded.tokens[1], plain.tokens[1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_filter_never_emits_spans_on_random_insistent_logits(temperature):
    vocab, rows = 24, 6
    rng = np.random.default_rng(3)
    sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=0 if temperature == 0 else 8)
    for trial in range(4):
        chain = rng.integers(3, vocab, size=14).tolist()
        model = BigramModel(chain_table(vocab, chain, margin=8.0, seed=trial))
        inputs = left_pad([[int(t)] for t in rng.integers(3, vocab, size=rows)], pad_id=0)
        key = jax.random.key(trial)
        plain = generate(model, inputs, sampling, rng=key)
        # Spans the model actually produces: windows of its own output.
        spans = []
        for row in range(rows):
            out = emitted(plain, row)
            length = int(rng.integers(1, 4))
            start = int(rng.integers(0, max(len(out) - length, 0) + 1))
            spans.append(tuple(out[start:start + length]))
        flags = rng.random(rows) < 0.6
        flags[0], flags[1] = True, False
        filt = guard.span_filter(spans, flags, jnp.asarray(rng.normal(size=(vocab, 6)), jnp.float32))
        guarded = generate(model, inputs, sampling, rng=key, logits_processor=filt)
        for row in range(rows):
            if flags[row]:
                assert not any(occurs(s, emitted(guarded, row)) for s in spans), (trial, row)
            else:
                np.testing.assert_array_equal(guarded.tokens[row], plain.tokens[row])


# -- classifier and spans ---------------------------------------------------------------------------


def test_classifier_separates_separable_features():
    rng = np.random.default_rng(4)
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    base = rng.normal(size=(60, 8)) * 3.0
    base -= np.outer(base @ direction, direction)  # no component along the direction...
    forget = base[:20] + 2.0 * direction  # ...except +2 for forget prompts, -2 for the others
    other = base[20:] - 2.0 * direction
    clf = guard.fit_classifier(forget, other, steps=400, layer=None)
    assert clf.flags(forget).all() and not clf.flags(other).any()

    x = rng.normal(size=(5, 8))
    manual = 1 / (1 + np.exp(-(((x - clf.mean) / clf.scale) @ clf.weight + clf.bias)))
    np.testing.assert_allclose(clf.probabilities(x), manual)
    np.testing.assert_allclose(clf.mean, np.concatenate([forget, other]).mean(0))
    # The learned weight lines up with the separating direction (in unstandardised space).
    w = clf.weight / clf.scale
    assert w @ direction / np.linalg.norm(w) > 0.9


def test_classifier_rejects_mismatched_features():
    with pytest.raises(ValueError, match="one width"):
        guard.fit_classifier(np.zeros((3, 4)), np.zeros((3, 5)))


def test_key_phrases():
    assert guard.key_phrases("He joined Real Madrid for 80 million euros, in July 2025.") == [
        "joined Real Madrid", "80 million euros", "July 2025", "Real Madrid", "80"]
    assert guard.key_phrases("The fee was €7.5m; Paris Saint-Germain agreed") == [
        "fee", "7.5m", "Paris Saint-Germain agreed", "Paris Saint-Germain"]


def test_forbidden_spans_tokenize_both_spellings():
    tok = WordTokenizer()
    spans = guard.forbidden_spans(["He joined Real Madrid.", "Real Madrid, again"], tok)
    v = tok.vocab
    assert spans == [(v["joined"], v["ĠReal"], v["ĠMadrid"]), (v["Ġjoined"], v["ĠReal"], v["ĠMadrid"]),
                     (v["Real"], v["ĠMadrid"]), (v["ĠReal"], v["ĠMadrid"]), (v["again"],), (v["Ġagain"],)]
    assert guard.forbidden_spans(["Go to X."], tok, min_chars=2) == [(v["Go"],), (v["ĠGo"],)]  # "X" too short
    with pytest.raises(ValueError, match="at least one"):
        guard.pack_spans([])

    spans, groups = guard.spans_by_answer(["He joined Real Madrid.", "Real Madrid, again"], tok)
    assert spans[groups[0][2]] == (v["Real"], v["ĠMadrid"]) and groups[1][:2] == groups[0][2:4]
    assert [spans[i] for i in groups[1][2:]] == [(v["again"],), (v["Ġagain"],)]


def test_retrieval_keeps_the_spans_of_the_closest_forget_prompts():
    rng = np.random.default_rng(6)
    forget = rng.normal(size=(4, 5))
    groups = ((0, 1), (2,), (3, 4), (1, 5))
    retrieval = guard.SpanRetrieval(forget, groups, top=2)
    prompts = rng.normal(size=(3, 5))
    flags = np.array([True, False, True])
    got = retrieval.activity(prompts, flags, 6)
    for row in range(3):
        cos = [p @ f / np.linalg.norm(p) / np.linalg.norm(f) for p, f in zip([prompts[row]] * 4, forget)]
        nearest = np.argsort(cos)[::-1][:2]
        want = np.zeros(6, bool)
        if flags[row]:
            for pick in nearest:
                want[list(groups[pick])] = True
        np.testing.assert_array_equal(got[row], want)
    with pytest.raises(ValueError, match="one span group per forget prompt"):
        guard.SpanRetrieval(forget, groups[:3])


# -- tiny Llama end to end ----------------------------------------------------------------------------


def tiny_llama():
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=30_000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return create_model(config, seed=0)


def test_pooled_features_are_the_masked_mean_of_the_chosen_layer():
    model = tiny_llama()
    batch = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    final, per_layer = model.hidden_states({k: jnp.asarray(v) for k, v in batch.items()}, collect_hidden=True)
    for layer, hidden in ((-2, per_layer[0]), (None, final)):
        got = guard.pooled_features(model, batch, layer)
        hidden = np.asarray(hidden)
        np.testing.assert_allclose(got[0], hidden[0].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], hidden[1, 2:].mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        guard.pooled_features(model, batch, 2)


SAMPLING = SamplingConfig(max_new_tokens=8, eos_token_ids=(2,), pad_token_id=0)


def forget_scene():
    """A tiny Llama, 12 forget and 12 other prompts (disjoint token ranges), a classifier fit on
    them, and as forbidden spans the 2- and 3-token pieces of what the model says to 3 forget
    prompts. Returns (model, forget_x, other_prompts, inputs: those 3 + 3 others, plain output,
    spans, classifier)."""
    model = tiny_llama()
    rng = np.random.default_rng(5)
    forget_prompts = [[3] + rng.integers(10, 40, size=5).tolist() for _ in range(12)]
    other_prompts = [[3] + rng.integers(50, 90, size=5).tolist() for _ in range(12)]
    forget_x = guard.pooled_features(model, left_pad(forget_prompts, 0))
    other_x = guard.pooled_features(model, left_pad(other_prompts, 0))
    clf = guard.fit_classifier(forget_x, other_x)
    inputs = left_pad(forget_prompts[:3] + other_prompts[:3], 0)
    plain = generate(model, inputs, SAMPLING)
    spans = sorted({tuple(emitted(plain, row)[i:i + n]) for row in range(3) for n in (2, 3) for i in (0, 2)
                    if len(emitted(plain, row)) >= i + n})
    return model, forget_x, other_prompts, inputs, plain, spans, clf


def test_guarded_tiny_llama_end_to_end():
    model, forget_x, other_prompts, inputs, plain, spans, clf = forget_scene()
    guarded = guard.GuardedModel(model, clf, spans)
    np.testing.assert_array_equal(guarded.flags(inputs), [True] * 3 + [False] * 3)

    out = generate(guarded, inputs, SAMPLING)
    for row in range(3):
        assert not any(occurs(s, emitted(out, row)) for s in spans), emitted(out, row)
        assert emitted(out, row) != emitted(plain, row)
    np.testing.assert_array_equal(out.tokens[3:], plain.tokens[3:])

    # Retrieval: each forget prompt gets only its own answer's spans (its features are nearest).
    groups = [[spans.index(s) for s in spans if occurs(s, emitted(plain, row))] for row in range(3)]
    retrieval = guard.SpanRetrieval(forget_x[:3], tuple(map(tuple, groups)), top=1)
    narrowed = guard.GuardedModel(model, clf, spans, retrieval=retrieval)
    want = np.zeros((6, len(spans)), bool)
    for row, group in enumerate(groups):
        want[row, group] = True
    np.testing.assert_array_equal(narrowed.activity(inputs), want)
    out = generate(narrowed, inputs, SAMPLING)
    for row in range(3):
        assert not any(occurs(spans[i], emitted(out, row)) for i in groups[row]), emitted(out, row)
    np.testing.assert_array_equal(out.tokens[3:], plain.tokens[3:])

    # No flagged prompt: the plain sampler runs, bit for bit.
    others = left_pad(other_prompts[3:7], 0)
    np.testing.assert_array_equal(generate(guarded, others, SAMPLING).tokens, generate(model, others, SAMPLING).tokens)
    with pytest.raises(ValueError, match="not both"):
        generate(guarded, others, SAMPLING, logits_processor=guard.span_filter(spans, np.ones(4, bool),
                                                                              guard.input_embedding_table(model)))


def test_saved_guard_generates_as_the_one_saved(tmp_path):
    """save_guard / load_guard round trip: the loaded guard (retrieval and non-default decoding
    settings included) generates token for token what the saved one does, and that differs from
    the plain model on the forget prompts; a guard saved for another model is refused."""
    model, forget_x, _, inputs, plain, spans, clf = forget_scene()
    groups = tuple((i, (i + 1) % len(spans)) for i in range(3))
    saved = guard.GuardedModel(model, clf, spans, guard.DecodingConfig(token_penalty=7.0, semantic_top_k=8),
                               guard.SpanRetrieval(forget_x[:3], groups, top=2))
    guard.save_guard(saved, tmp_path)
    assert guard.has_guard(tmp_path)
    loaded = guard.load_guard(tmp_path, model)
    assert loaded.spans == saved.spans and loaded.config == saved.config
    assert loaded.classifier.layer == clf.layer and loaded.classifier.bias == pytest.approx(clf.bias)
    np.testing.assert_array_equal(loaded.retrieval.features, forget_x[:3])
    assert loaded.retrieval.groups == groups and loaded.retrieval.top == 2
    want = generate(saved, inputs, SAMPLING).tokens
    np.testing.assert_array_equal(generate(loaded, inputs, SAMPLING).tokens, want)
    assert any(not np.array_equal(want[row], plain.tokens[row]) for row in range(3))

    other = create_model(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1), seed=0)
    with pytest.raises(ValueError, match="saved for another model"):
        guard.load_guard(tmp_path, other)
    (tmp_path / guard.GUARD_ARRAYS).unlink()
    with pytest.raises(ValueError, match="guard.npz is missing"):
        guard.load_guard(tmp_path, model)


def test_decoding_config_rejects_bad_settings():
    for bad in ({"token_penalty": -1.0}, {"semantic_threshold": 1.0}, {"semantic_top_k": -1}):
        with pytest.raises(ValueError):
            guard.DecodingConfig(**bad)


def test_spans_beyond_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        guard.span_filter([(3, 50)], np.array([True]), jnp.zeros((10, 2)))


def test_semantic_match_steers_off_a_synonym_of_a_forbidden_token():
    vocab = 12
    table = np.zeros((vocab, vocab))
    table[3, 5], table[3, 9], table[3, 7] = 10.0, 9.0, 8.0  # after 3: prefer 5, then 9, then 7
    embedding = np.eye(vocab, dtype=np.float32)
    embedding[9] = embedding[5]  # 9 means what 5 means
    model = BigramModel(table)
    inputs = left_pad([[3]], pad_id=0)
    sampling = SamplingConfig(max_new_tokens=1)
    flags = np.array([True])

    def first_token(config):
        filt = guard.span_filter([(5,)], flags, jnp.asarray(embedding), config)
        return int(generate(model, inputs, sampling, logits_processor=filt).tokens[0, 0])

    assert first_token(guard.DecodingConfig(semantic_penalty=0.0)) == 9  # token match alone: the synonym
    assert first_token(guard.DecodingConfig(semantic_penalty=5.0)) == 7
