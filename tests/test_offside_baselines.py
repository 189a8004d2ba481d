"""OFFSIDE's baselines against a transcription of its loss code (zh121800/OFFSIDE, baselines/):
values and gradients on fixed logits (PyTorch autograd, as the scripts compute them), the
alternation of KL_min.py / PO.py and MMUnlearner's official loop, with the loader lengths of
PyTorch's own DataLoader."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from offside_jax.unlearn import offside_baselines as ob, saliency
from offside_jax.unlearn.losses import bind, build_loss

from fake_models import TableModel

V = 9
RNG = np.random.default_rng(3)
TABLE = (RNG.normal(size=(V, V)) * 1.5).astype(np.float32)
REF_TABLE = (TABLE + RNG.normal(size=(V, V))).astype(np.float32)


def sub_batch(rows):
    """rows: lists of (token, is_answer); right padding where rows differ in length."""
    t = max(len(r) for r in rows)
    ids, attn, loss = (np.zeros((len(rows), t), np.int32) for _ in range(3))
    for i, r in enumerate(rows):
        for j, (tok, ans) in enumerate(r):
            ids[i, j], attn[i, j], loss[i, j] = tok, 1, ans
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


FORGET = sub_batch([[(1, 0), (2, 0), (3, 1), (4, 1)]])  # bash.sh: 1 forget row ...
RETAIN = sub_batch([[(4, 0), (3, 1), (6, 1), (8, 1)], [(5, 0), (5, 0), (2, 1), (3, 1)],
                    [(7, 0), (1, 1), (0, 1), (2, 1)]])  # ... and 3 retain rows, no padding
IDK = sub_batch([[(1, 0), (2, 0), (6, 1), (6, 1)]])
BATCH = {"forget": FORGET, "retain": RETAIN, "forget_idk": IDK}


# -- the transcription: OFFSIDE's code on logits = table[input_ids] ----------------------------------


def hf_outputs(table, sub):
    """``model(**inputs)`` of a Hugging Face causal LM: logits and the label-shifted mean CE
    (labels = the answer tokens, -100 elsewhere), as OFFSIDE's ``outputs.loss``."""
    ids = torch.from_numpy(sub["input_ids"]).long()
    logits = table[ids]
    labels = torch.where(torch.from_numpy(sub["loss_mask"] * sub["attention_mask"]).bool(), ids, torch.full_like(ids, -100))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    return logits, loss


def compute_kl_loss(current_logits, orig_logits, temperature=1.0):  # KL_min.py, verbatim
    current_log_probs = F.log_softmax(current_logits / temperature, dim=-1)
    orig_probs = F.softmax(orig_logits / temperature, dim=-1)
    kl_div = F.kl_div(current_log_probs, orig_probs, reduction='batchmean')
    return kl_div


def offside_gd(table, forget_batch_size=1, retain_batch_size=3):  # GD_forget.py's combined loss
    forget_loss = -hf_outputs(table, FORGET)[1]
    retain_loss = hf_outputs(table, RETAIN)[1]
    total_batch_size = forget_batch_size + retain_batch_size
    return forget_loss * (forget_batch_size / total_batch_size) + retain_loss * (retain_batch_size / total_batch_size)


def offside_kl_retain(table, ref_table, kl_weight=0.1):  # KL_min.py's retain step
    logits, loss = hf_outputs(table, RETAIN)
    with torch.no_grad():
        target_logits, _ = hf_outputs(ref_table, RETAIN)
    return loss + kl_weight * compute_kl_loss(logits, target_logits, 1.0)


def offside_npo(table, ref_table, beta=0.9):  # NPOTrainer.compute_loss
    current_loss = hf_outputs(table, FORGET)[1]
    with torch.no_grad():
        ref_loss = hf_outputs(ref_table, FORGET)[1]
    neg_log_ratios = current_loss - ref_loss
    return -F.logsigmoid(beta * neg_log_ratios).mean() * 2 / beta


def torch_value_and_grad(fn, *ref):
    table = torch.tensor(TABLE, dtype=torch.float64, requires_grad=True)
    value = fn(table, *[torch.tensor(r, dtype=torch.float64) for r in ref])
    value.backward()
    return float(value.detach()), table.grad.numpy()


def ours_value_and_grad(loss_fn):
    def value(table):
        return loss_fn(TableModel(table), BATCH, None, TableModel(jnp.asarray(REF_TABLE)))[0]

    v, g = jax.value_and_grad(value)(jnp.asarray(TABLE))
    return float(v), np.asarray(g)


CASES = {
    "ga": (lambda t: -hf_outputs(t, FORGET)[1], (), lambda: build_loss("ga", chunk_tokens=0)),
    "offside_gd": (offside_gd, (), lambda: build_loss("offside_gd", chunk_tokens=0)),
    "offside_kl retain step": (offside_kl_retain, (REF_TABLE,), lambda: bind(
        ob.kl_retain_step, "kl", splits=("retain",), needs_reference=True, chunk_tokens=0, kl_weight=0.1)),
    "offside_po forget step": (lambda t: hf_outputs(t, IDK)[1], (), lambda: bind(ob.refusal_step, "po", splits=("forget_idk",))),
    "offside_po retain step": (lambda t: hf_outputs(t, RETAIN)[1], (), lambda: bind(ob.retain_step, "po", splits=("retain",))),
    "offside_npo": (offside_npo, (REF_TABLE,), lambda: ob.npo_loss({"beta": 0.9, "reference": "frozen"}, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_equal_offsides_code(name):
    theirs, args, ours = CASES[name]
    value, grad = torch_value_and_grad(theirs, *args)
    got_value, got_grad = ours_value_and_grad(ours())
    assert got_value == pytest.approx(value, rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-7)


def test_gd_weights_are_the_rows_shares():
    # 1:3 rows give OFFSIDE's 0.25 / 0.75: the same loss as grad_diff with those weights.
    ours = ours_value_and_grad(build_loss("offside_gd", chunk_tokens=0))[0]
    assert ours == pytest.approx(ours_value_and_grad(build_loss("grad_diff", gamma=0.25, alpha=0.75))[0], rel=1e-6)


def test_kl_excludes_padding_only():
    """Our batches are padded to a fixed length: padding more leaves the KL term unchanged."""
    retain = ob.kl_retain_step
    padded = {k: np.pad(v, ((0, 0), (0, 3))) for k, v in RETAIN.items()}
    fn = bind(retain, "kl", splits=("retain",), needs_reference=True, kl_weight=0.1)
    a = fn(TableModel(TABLE), {"retain": RETAIN}, None, TableModel(REF_TABLE))[0]
    b = fn(TableModel(TABLE), {"retain": padded}, None, TableModel(REF_TABLE))[0]
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_npo_with_cached_reference_logprobs_equals_the_reference_model():
    ref_logp = np.array([sum(np.log(np.exp(REF_TABLE[2]) / np.exp(REF_TABLE[2]).sum())[[3]])
                         + np.log(np.exp(REF_TABLE[3]) / np.exp(REF_TABLE[3]).sum())[4]], np.float32)
    cached = {"forget": {**FORGET, "ref_logp": ref_logp}}
    loss = ob.npo_loss({"beta": 0.9, "reference": "retain_finetune"}, 0)
    assert not loss.needs_reference
    got = float(loss(TableModel(TABLE), cached, None, None)[0])
    assert got == pytest.approx(torch_value_and_grad(offside_npo, REF_TABLE)[0], rel=1e-5)


# -- schedules -----------------------------------------------------------------------------------


def loader_length(n, batch_size):
    return len(torch.utils.data.DataLoader(range(n), batch_size=batch_size))


def offside_alternation(n_forget, forget_bs, n_retain, retain_bs, epochs):
    """KL_min.py / PO.py's loop: the kind of every micro-step and the running batch counts."""
    forget_len, retain_len = loader_length(n_forget, forget_bs), loader_length(n_retain, retain_bs)
    out, counts = [], {"forget": 0, "retain": 0}
    for _ in range(epochs):
        steps_per_epoch = max(retain_len, forget_len)
        for step in range(steps_per_epoch):
            kind = "retain" if step % 2 == 1 else "forget"
            out.append((kind, counts[kind]))
            counts[kind] += 1
    return out


@pytest.mark.parametrize("sizes", [(6, 1, 160, 3), (7, 2, 20, 6), (9, 2, 3, 6), (4, 4, 24, 12)])
def test_alternation_follows_offsides_loop(sizes):
    n_forget, fb, n_retain, rb = sizes
    expected = offside_alternation(n_forget, fb, n_retain, rb, epochs=3)
    steps = ob.epoch_steps(n_forget, fb, n_retain, rb)
    assert steps == max(loader_length(n_forget, fb), loader_length(n_retain, rb))
    assert [ob.micro_step(i, steps) for i in range(len(expected))] == expected
    batches = ob.OffsideAlternation(lambda n: {"forget": ("F", n)}, lambda n: {"retain": ("R", n)}, steps)
    assert [next(iter(batches(i).values())) for i in range(len(expected))] == [(k[0].upper(), n) for k, n in expected]


def official_mmunlearner_loop(n_forget, n_retain, batch_size):
    """MLLMU_manifold.py's iterations: a forget step when iter % forget_freq == 0, then a retain step."""
    n_iters = loader_length(n_retain, batch_size)
    forget_freq = loader_length(n_retain, batch_size) // loader_length(n_forget, batch_size)
    out, counts = [], {"forget": 0, "retain": 0}
    for it in range(n_iters):
        for kind in (("forget", "retain") if it % forget_freq == 0 else ("retain",)):
            out.append((kind, counts[kind]))
            counts[kind] += 1
    return out


@pytest.mark.parametrize("sizes", [(6, 160, 2), (5, 20, 4), (8, 9, 1)])
def test_mmunlearner_official_schedule(sizes):
    n_forget, n_retain, bs = sizes
    expected = official_mmunlearner_loop(n_forget, n_retain, bs)
    retain_steps = saliency.official_retain_steps(n_forget, bs, n_retain, bs)
    batches = saliency.AlternatingBatches(lambda n: {"forget": n}, lambda n: {"retain": n}, retain_steps)
    assert [next(iter(batches(i).items())) for i in range(len(expected))] == expected


def test_official_ascent_clips_before_masking():
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([12.0])}
    masks = {"a": np.array([True, False]), "b": np.array([True])}
    tx = optax.chain(optax.clip_by_global_norm(1.0), saliency.mask_gradients(masks, True))
    (phase_forget, _) = saliency.alternating_phases(masks, clip_before_mask=1.0)
    for transform in (tx, phase_forget.transform):
        updates, _ = transform.update(grads, transform.init(grads))
        # The official order: g * min(1, 1 / ||g||) over all of g (norm 13), then the mask.
        np.testing.assert_allclose(np.asarray(updates["a"]), [3 / 13, 0.0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(updates["b"]), [12 / 13], rtol=1e-6)
    # Masking first then clipping gives another update (the masked norm is sqrt(9 + 144)).
    masked = saliency.mask_gradients(masks, True)
    clip_after = optax.chain(masked, optax.clip_by_global_norm(1.0))
    updates, _ = clip_after.update(grads, clip_after.init(grads))
    assert float(updates["a"][0]) == pytest.approx(3 / np.sqrt(153), rel=1e-6) != pytest.approx(3 / 13)
