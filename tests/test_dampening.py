"""SSD family against an independent implementation: torch autograd for the importances and
numpy for the official selection/dampening rule."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from offside_jax.models.hf import hf_name, path_to_str
from offside_jax.unlearn import dampening as dmp

from llama_fixtures import make_reference, port


def batches(seed, n_batches=3, rows=4, length=12, vocab=160):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
        attn = np.ones((rows, length), np.int32)
        loss = np.zeros((rows, length), np.int32)
        for r in range(rows):
            real = rng.integers(length // 2, length + 1)
            attn[r, real:] = 0
            ids[r, real:] = 0
            loss[r, real // 2: real] = 1  # answer = second half of the real tokens
        out.append({"input_ids": ids, "attention_mask": attn, "loss_mask": loss})
    return out


@pytest.fixture(scope="module")
def models():
    reference, config = make_reference("qwen2", seed=3)
    return reference, config


def torch_importance(reference, data, objective):
    """The official loop: per batch, gradient of the batch-mean objective; accumulate grad**2
    (|grad| for the loss-free variant); divide by the number of batches."""
    imp = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for b in data:
        reference.zero_grad()
        ids = torch.from_numpy(b["input_ids"]).long()
        attn = torch.from_numpy(b["attention_mask"]).long()
        logits = reference(input_ids=ids, attention_mask=attn).logits[:, :-1]
        answer = torch.from_numpy(b["loss_mask"][:, 1:] * b["attention_mask"][:, 1:]).bool()
        if objective == "loss":
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            value = -(logp[answer]).mean()
        else:
            value = (logits ** 2).sum(-1)[answer].mean()
        value.backward()
        for n, p in reference.named_parameters():
            if p.grad is not None:
                imp[n] += p.grad.pow(2) if objective == "loss" else p.grad.abs()
    return {n: (v / len(data)).numpy() for n, v in imp.items()}


def ours_as_hf(state):
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, transposed = hf_name(path)
        value = np.asarray(var.get_value() if isinstance(var, nnx.Variable) else var)
        out[name] = value.T if transposed else value
    return out


@pytest.mark.parametrize("objective", ["loss", "output_norm"])
def test_batch_mean_importance_equals_official_torch_loop(models, objective):
    reference, config = models
    data = batches(0)
    pattern = r"model\.layers\.1\."
    imp, n = dmp.importance(port(reference, config), data, dmp.DampeningConfig(objective=objective, params=pattern))
    assert n == 12
    expected = torch_importance(reference, data, objective)
    got = ours_as_hf(imp)
    assert got and all(k.startswith("model.layers.1.") for k in got)
    for name, value in got.items():
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(value, expected[name], rtol=2e-3, atol=1e-5 * scale, err_msg=name)


def numpy_official_dampening(params, imp_full, imp_forget, alpha, lam):
    """if-loops/selective-synaptic-dampening `modify_weight`, transcribed to numpy."""
    out = {}
    for name, p in params.items():
        p = p.copy()
        locations = np.where(imp_forget[name] > imp_full[name] * alpha)
        weight = (imp_full[name] * lam) / imp_forget[name]
        update = weight[locations]
        update[update > 1] = 1
        p[locations] = p[locations] * update
        out[name] = p
    return out


def test_dampening_equals_official_rule_exactly(models):
    reference, config = models
    model = port(reference, config)
    full, forget = batches(1, n_batches=4), batches(2, n_batches=2)
    cfg = dmp.DampeningConfig(alpha=2.0, lam=0.5, params=r"model\.layers\.")
    imp_full, _ = dmp.importance(model, full, cfg)
    imp_forget, _ = dmp.importance(model, forget, cfg)
    before = ours_as_hf(nnx.state(model, dmp.param_filter(cfg.params)))
    expected = numpy_official_dampening(before, ours_as_hf(imp_full), ours_as_hf(imp_forget), 2.0, 0.5)
    counts, groups = dmp.dampen(model, imp_full, imp_forget, 2.0, 0.5, cfg.params)
    after = ours_as_hf(nnx.state(model, dmp.param_filter(cfg.params)))
    assert sum(counts.values()) > 0, "the test data must select something"
    # Per group (layer numbers as *): selected I_f > 2 I_D, dampened where 0.5 I_D / I_f < 1 too.
    want: dict = {}
    full_hf, forget_hf = ours_as_hf(imp_full), ours_as_hf(imp_forget)
    for name in full_hf:
        d, f = np.asarray(full_hf[name], np.float64), np.asarray(forget_hf[name], np.float64)
        group = want.setdefault(re.sub(r"\.\d+\.", ".*.", name), [0, 0, 0])
        group[0] += int(np.sum(f > 2.0 * d))
        group[1] += int(np.sum((f > 2.0 * d) & (0.5 * d < f)))
        group[2] += d.size
    got = {g: [v["selected"], v["dampened"], v["total"]] for g, v in groups.items()}
    assert sorted(got.values()) == sorted(want.values()) and len(got) == len(want) > 1
    for name in expected:
        np.testing.assert_array_equal(after[name], expected[name], err_msg=name)
    # Parameters outside the regex are untouched.
    embed = model.model.embed_tokens.embedding.get_value()
    np.testing.assert_array_equal(np.asarray(embed), reference.state_dict()["model.embed_tokens.weight"].numpy())


def test_per_example_fisher_equals_loop_over_examples(models):
    reference, config = models
    model = port(reference, config)
    data = batches(4, n_batches=2, rows=4)
    per_example, n = dmp.importance(model, data, dmp.DampeningConfig(estimator="per_example", per_example_chunk=2))
    singles = [{k: v[i: i + 1] for k, v in b.items()} for b in data for i in range(4)]
    loop, m = dmp.importance(model, singles, dmp.DampeningConfig(estimator="batch_mean"))
    assert n == m == 8
    for (path, a), (_, b) in zip(nnx.to_flat_state(per_example), nnx.to_flat_state(loop)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-4, atol=1e-12, err_msg=path_to_str(path))


def test_sharded_importance_equals_single_device(models):
    from offside_jax.train.mesh import make_mesh
    from offside_jax.train.step import place_model_on_mesh

    reference, config = models
    data = batches(5, n_batches=2, rows=8)
    cfg = dmp.DampeningConfig(estimator="per_example", per_example_chunk=4)
    single, _ = dmp.importance(port(reference, config), data, cfg)
    sharded_model = place_model_on_mesh(port(reference, config), make_mesh((2, 2, 2)))
    sharded, _ = dmp.importance(sharded_model, data, cfg)
    up = sharded["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    up = up.get_value() if isinstance(up, nnx.Variable) else up
    assert not up.sharding.is_fully_replicated, "importance keeps the params' sharding"
    for (path, a), (_, b) in zip(nnx.to_flat_state(single), nnx.to_flat_state(sharded)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        # Reductions run in another order across devices: compare relative to the tensor's scale.
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=path_to_str(path))


def test_assd_alpha_is_the_ratio_percentile():
    full = {"a": jax.numpy.asarray([1.0, 2.0, 4.0, 1.0]), "b": jax.numpy.asarray([[1.0, 1.0], [2.0, 8.0]])}
    forget = {"a": jax.numpy.asarray([3.0, 2.0, 1.0, 10.0]), "b": jax.numpy.asarray([[0.5, 6.0], [2.0, 2.0]])}
    ratios = np.array([3.0, 1.0, 0.25, 10.0, 0.5, 6.0, 1.0, 0.25])
    fraction = 0.1
    expected = np.percentile(ratios, 100 - np.log(1 + 100 * fraction))
    assert dmp.assd_alpha(full, forget, fraction) == pytest.approx(expected)


def test_ssd_end_to_end_reports_and_validates(models):
    reference, config = models
    model = port(reference, config)
    report = dmp.ssd(model, batches(6), batches(7, n_batches=1), dmp.DampeningConfig(adaptive=True))
    assert report.full_examples == 12 and report.forget_examples == 4
    assert 0 < report.selected < report.total
    with pytest.raises(ValueError, match="selects no parameters"):
        dmp.ssd(model, batches(6), batches(7), dmp.DampeningConfig(params="no_such_param"))
    with pytest.raises(ValueError, match="estimator must be one of"):
        dmp.DampeningConfig(estimator="fisher")
    subset = dmp.identified_subset(50, 0.1, seed=0)
    assert len(subset) == 5 and len(set(subset)) == 5 and subset.max() < 50


def test_ssd_warns_naming_alpha_and_the_largest_ratio_when_it_selects_nothing(models):
    reference, config = models
    model = port(reference, config)
    full, forget = batches(1, n_batches=2), batches(2, n_batches=1)
    cfg = dmp.DampeningConfig(alpha=1e6, params=r"model\.layers\.")
    imp_full, _ = dmp.importance(model, full, cfg)
    imp_forget, _ = dmp.importance(model, forget, cfg)
    largest = max(float(np.max(np.asarray(f, np.float64) / np.maximum(np.asarray(d, np.float64), 1e-38)))
                  for d, f in zip(jax.tree.leaves(imp_full), jax.tree.leaves(imp_forget)))
    with pytest.warns(UserWarning, match=r"SSD selected no weight: alpha=1e\+06 but the largest I_forget / I_full "
                                         r"ratio is [0-9.e+]+; set methods.ssd.alpha below it"):
        report = dmp.ssd(model, full, forget, cfg)
    assert report.selected == 0 and report.max_ratio == pytest.approx(largest, rel=1e-4)
    assert all(g["selected"] == g["dampened"] == 0 for g in report.per_group.values())
