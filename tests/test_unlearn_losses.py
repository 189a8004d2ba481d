"""Every unlearning loss against a hand (numpy, loop-by-loop) computation of its formula."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from offside_jax.unlearn import objectives as obj
from offside_jax.unlearn.losses import METHODS, build_loss, rmu_direction, rmu_layer_index, rmu_trainable_pattern

from fake_models import TableModel

V = 7
RNG = np.random.default_rng(0)
TABLE = RNG.normal(size=(V, V)).astype(np.float32) * 2.0  # logits = TABLE[token] (fake model)
REF_TABLE = TABLE + RNG.normal(size=(V, V)).astype(np.float32)


def sub_batch(rows):
    """rows: lists of (token, is_answer) with None as right padding."""
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int32)
    attn = np.zeros((len(rows), t), np.int32)
    loss = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        for j, (tok, ans) in enumerate(r):
            ids[i, j], attn[i, j], loss[i, j] = tok, 1, ans
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


# Prompt tokens (0), answer tokens (1), padding: the masks must exclude prompt and padding.
FORGET = sub_batch([[(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)], [(6, 0), (2, 1), (1, 1)]])
RETAIN = sub_batch([[(4, 0), (3, 1), (6, 1)], [(5, 0), (5, 0), (2, 1), (3, 1), (0, 1)]])
IDK = sub_batch([[(1, 0), (2, 0), (6, 1), (6, 1)], [(6, 0), (6, 1)]])
ALT = sub_batch([[(1, 0), (2, 0), (0, 1)], [(6, 0), (4, 1), (4, 1), (4, 1)]])
BATCH = {"forget": FORGET, "retain": RETAIN, "forget_idk": IDK, "forget_alt": ALT}


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (np.log(np.sum(np.exp(x - x.max()))) + x.max())


def answer_terms(sub, table=TABLE):
    """Per row: list of (logits at the predicting position, target token) for answer tokens."""
    out = []
    for ids, attn, loss in zip(sub["input_ids"], sub["attention_mask"], sub["loss_mask"]):
        row = []
        for t in range(1, len(ids)):
            if attn[t] and loss[t]:
                row.append((table[ids[t - 1]], int(ids[t])))
        out.append(row)
    return out


def seq_logp(sub, table=TABLE):
    return np.array([sum(log_softmax(logits)[y] for logits, y in row) for row in answer_terms(sub, table)])


def mean_nll(sub, table=TABLE):
    terms = [-log_softmax(logits)[y] for row in answer_terms(sub, table) for logits, y in row]
    return sum(terms) / len(terms)


def logsig(x):
    return -math.log1p(math.exp(-x))


FakeModel = TableModel  # logits = table[token]


POLICY, REFERENCE = FakeModel(TABLE), FakeModel(REF_TABLE)


def run(name, batch=BATCH, **hp):
    loss, weight, aux = build_loss(name, **hp)(POLICY, batch, None, REFERENCE)
    assert float(weight) == 1.0
    return float(loss), aux


def test_mask_excludes_prompt_and_padding():
    # Row 0 of FORGET: answers are tokens 3, 4, 5 predicted from 2, 3, 4.
    logp, weights = obj.logits_token_logprobs(jnp.asarray(TABLE)[FORGET["input_ids"]], FORGET)
    np.testing.assert_array_equal(np.asarray(weights), [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    expected = log_softmax(TABLE[2])[3] + log_softmax(TABLE[3])[4] + log_softmax(TABLE[4])[5]
    assert np.sum(np.asarray(logp)[0]) == pytest.approx(expected, rel=1e-5)


def test_ga():
    loss, _ = run("ga")
    assert loss == pytest.approx(-mean_nll(FORGET), rel=1e-5)


def test_grad_diff_offside_weights():
    loss, _ = run("grad_diff", gamma=0.25, alpha=0.75)
    assert loss == pytest.approx(-0.25 * mean_nll(FORGET) + 0.75 * mean_nll(RETAIN), rel=1e-5)


def kl_ref_cur(sub):
    """KL(ref || cur) averaged over every real position that predicts a real token."""
    total, n = 0.0, 0
    for ids, attn in zip(sub["input_ids"], sub["attention_mask"]):
        for t in range(1, len(ids)):
            if attn[t] and attn[t - 1]:
                p_ref = log_softmax(REF_TABLE[ids[t - 1]])
                p_cur = log_softmax(TABLE[ids[t - 1]])
                total += float(np.sum(np.exp(p_ref) * (p_ref - p_cur)))
                n += 1
    return total / n


def test_grad_diff_kl_retain_and_kl_min():
    loss, _ = run("grad_diff", retain_loss="kl")
    assert loss == pytest.approx(-mean_nll(FORGET) + kl_ref_cur(RETAIN), rel=1e-5)
    loss, _ = run("kl", alpha=0.1)
    assert loss == pytest.approx(-mean_nll(FORGET) + 0.1 * kl_ref_cur(RETAIN), rel=1e-5)


def test_idk():
    loss, _ = run("idk", alpha=0.5)
    assert loss == pytest.approx(mean_nll(IDK) + 0.5 * mean_nll(RETAIN), rel=1e-5)


def test_npo_summed_logprobs():
    beta = 0.1
    ratio = seq_logp(FORGET, REF_TABLE) - seq_logp(FORGET)
    expected = np.mean([-(2 / beta) * logsig(beta * r) for r in ratio])
    loss, aux = run("npo", beta=beta, alpha=0.0)
    assert loss == pytest.approx(expected, rel=1e-5)
    loss, _ = run("npo", beta=beta, alpha=2.0)
    assert loss == pytest.approx(expected + 2.0 * mean_nll(RETAIN), rel=1e-5)


def test_npo_offside_mean_nll_variant():
    beta = 0.9
    expected = -(2 / beta) * logsig(beta * (mean_nll(FORGET) - mean_nll(FORGET, REF_TABLE)))
    loss, _ = run("npo", beta=beta, alpha=0.0, variant="offside")
    assert loss == pytest.approx(expected, rel=1e-5)


def test_npo_uses_cached_reference_logprobs():
    cached = {**BATCH, "forget": {**FORGET, "ref_logp": np.array([-3.0, -1.5], np.float32)}}
    ratio = np.array([-3.0, -1.5]) - seq_logp(FORGET)
    expected = np.mean([-(2 / 0.1) * logsig(0.1 * r) for r in ratio])
    assert run("npo", batch=cached, alpha=0.0)[0] == pytest.approx(expected, rel=1e-5)


def test_simnpo_is_length_normalised():
    beta, delta = 4.5, 0.3
    lengths = np.array([3, 2])
    norm_nll = -seq_logp(FORGET) / lengths
    expected = np.mean([-(2 / beta) * logsig(beta * (x - delta)) for x in norm_nll])
    loss, _ = run("simnpo", beta=beta, delta=delta, gamma=1.0, alpha=0.0)
    assert loss == pytest.approx(expected, rel=1e-5)
    loss, _ = run("simnpo", beta=beta, delta=delta)  # defaults gamma=0.125, alpha=1
    assert loss == pytest.approx(0.125 * expected + mean_nll(RETAIN), rel=1e-5)


def test_dpo_and_idk_dpo():
    beta = 0.1
    lose = seq_logp(FORGET) - seq_logp(FORGET, REF_TABLE)
    for name, win_sub in (("dpo", ALT), ("idk_dpo", IDK)):
        win = seq_logp(win_sub) - seq_logp(win_sub, REF_TABLE)
        expected = np.mean([-(2 / beta) * logsig(beta * (w - lo)) for w, lo in zip(win, lose)])
        loss, _ = run(name, beta=beta, alpha=0.0)
        assert loss == pytest.approx(expected, rel=1e-5), name


def test_wga():
    beta = 0.7
    terms = [(np.exp(log_softmax(logits)[y]) ** beta) * log_softmax(logits)[y] for row in answer_terms(FORGET) for logits, y in row]
    loss, _ = run("wga", beta=beta, alpha=0.0)
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_undial():
    beta = 10.0
    terms = []
    for (logits, y), (lr, _) in zip(
        [t for row in answer_terms(FORGET) for t in row], [t for row in answer_terms(FORGET, REF_TABLE) for t in row]
    ):
        teacher_logits = np.array(lr, np.float64)
        teacher_logits[y] -= beta
        teacher = np.exp(log_softmax(teacher_logits))
        terms.append(-np.sum(teacher * log_softmax(logits)))
    loss, _ = run("undial", beta=beta)
    assert loss == pytest.approx(np.mean(terms), rel=1e-5)


def test_rmu():
    layer, c, alpha = 1, 6.5, 1200.0  # layer 1 of the fake model's 3: the fraction 0.5
    u = np.asarray(rmu_direction(V, 0))
    assert np.linalg.norm(u) == pytest.approx(1.0, rel=1e-6)

    def hidden(table, ids):
        return table[ids] * (layer + 1)  # FakeModel's residual after `layer`

    def mse(h, target, attn):
        per = np.mean((h - target) ** 2, axis=-1)
        return np.sum(per * attn) / np.sum(attn)

    f_ids, r_ids = FORGET["input_ids"], RETAIN["input_ids"]
    forget = mse(hidden(TABLE, f_ids), c * u, FORGET["attention_mask"])
    retain = mse(hidden(TABLE, r_ids), hidden(REF_TABLE, r_ids), RETAIN["attention_mask"])
    loss, aux = run("rmu", layer=0.5, steering_coeff=c, alpha=alpha)
    assert loss == pytest.approx(forget + alpha * retain, rel=1e-5)
    assert rmu_trainable_pattern(7) == r"model\.layers\.(5|6|7)\.mlp\.down_proj"
    # The default fraction is layer 7 of 32 (WMDP / open-unlearning) and layer 0 of a 2-layer model.
    assert [rmu_layer_index(0.21875, n) for n in (32, 28, 2, 1)] == [7, 6, 0, 0]
    assert rmu_layer_index(0.99, 4) == 3
    with pytest.raises(ValueError, match=r"methods\.rmu\.layer=7: a fraction"):
        rmu_layer_index(7, 32)


def test_registry_errors_name_valid_choices():
    with pytest.raises(ValueError, match="unknown unlearning method 'gd'.*grad_diff.*npo"):
        build_loss("gd")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['betta'\] for 'npo'; valid: .*'beta'"):
        build_loss("npo", betta=0.2)
    with pytest.raises(KeyError, match="needs a 'retain' sub-batch"):
        build_loss("grad_diff")(POLICY, {"forget": FORGET}, None, REFERENCE)
    with pytest.raises(ValueError, match="needs a reference model"):
        build_loss("npo")(POLICY, BATCH, None, None)


def test_every_registered_method_is_tested():
    # offside_gd: tests/test_offside_baselines.py
    assert set(METHODS) == {"ga", "grad_diff", "kl", "idk", "dpo", "idk_dpo", "npo", "simnpo", "wga", "undial", "rmu",
                            "offside_gd"}
