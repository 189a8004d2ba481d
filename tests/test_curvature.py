"""Curvature editing against independent computations: K-FAC factors against explicit
per-position outer products of torch activations and output gradients (forward hooks on the
transformers model), the pair selection against a numpy brute force, the projection against
an explicit sum over the kept eigen-pairs, and an end-to-end edit of a tiny random-init Llama."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import needs_devices
from flax import nnx
from llama_fixtures import make_reference, port

from offside_jax.models.hf import path_to_str
from offside_jax.unlearn import block_linears as bl
from offside_jax.unlearn import curvature as cv


@pytest.fixture(scope="module")
def tiny():
    return make_reference("qwen2", seed=7)


def text_batches(seed, n_batches=2, rows=3, length=10, vocab=160):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
        mask = np.ones((rows, length), np.int32)
        mask[1, 6:] = 0  # a right-padded row
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _recorder(seen, name):
    """A forward hook keeping a module's input and its output (whose gradient it retains)."""
    def hook(module, args, out):
        out.retain_grad()
        seen[name] = (args[0].detach(), out)
    return hook


def torch_factors(reference, batches, labels_per_batch, module_names):
    """Explicit sums of a a^T and g g^T over positions t that predict a real token, where g is
    d(sum_t CE(logits_t, label_t)) / d(layer output at t), read with hooks and retain_grad."""
    modules = dict(reference.named_modules())
    sums = {n: [0.0, 0.0] for n in module_names}
    count = 0
    for batch, labels in zip(batches, labels_per_batch):
        seen = {}
        handles = [modules[n].register_forward_hook(_recorder(seen, n)) for n in module_names]
        ids = torch.from_numpy(batch["input_ids"]).long()
        attn = torch.from_numpy(batch["attention_mask"]).long()
        logits = reference(input_ids=ids, attention_mask=attn).logits
        weights = np.zeros(attn.shape, np.float32)
        weights[:, :-1] = batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]
        w = torch.from_numpy(weights)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(np.array(labels)).long().flatten(),
                                                reduction="none")
        (nll * w.flatten()).sum().backward()
        for h in handles:
            h.remove()
        keep = weights.reshape(-1) > 0
        for n in module_names:
            a = seen[n][0].numpy().reshape(-1, seen[n][0].shape[-1])[keep].astype(np.float64)
            g = seen[n][1].grad.numpy().reshape(-1, seen[n][1].shape[-1])[keep].astype(np.float64)
            sums[n][0] = sums[n][0] + a.T @ a
            sums[n][1] = sums[n][1] + g.T @ g
        count += int(keep.sum())
        reference.zero_grad()
    return {n: (a / count, g / count) for n, (a, g) in sums.items()}, count


TARGETS = ((1, "mlp.gate_proj"), (0, "mlp.down_proj"), (1, "self_attn.o_proj"))


def torch_name(target):
    return f"model.layers.{target[0]}.{target[1]}"


def assert_factor_close(got, expected):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-4 * scale)


def test_gold_label_factors_equal_explicit_outer_products(tiny):
    reference, config = tiny
    data = text_batches(0)
    got = cv.kfac_factors(port(reference, config), data, TARGETS, labels="gold")
    gold = [np.concatenate([b["input_ids"][:, 1:], np.zeros_like(b["input_ids"][:, :1])], axis=1) for b in data]
    expected, count = torch_factors(reference, data, gold, [torch_name(t) for t in TARGETS])
    for t in TARGETS:
        assert got[t].tokens == count
        a, g = expected[torch_name(t)]
        assert_factor_close(got[t].activation, a)
        assert_factor_close(got[t].gradient, g)


def test_sampled_label_factors_use_labels_drawn_from_the_model(tiny):
    reference, config = tiny
    model = port(reference, config)
    data = text_batches(1)
    rng = jax.random.key(3)
    targets = TARGETS[:1]
    got = cv.kfac_factors(model, data, targets, labels="sampled", rng=rng, sample_chunk=7)
    labels = []
    for i, b in enumerate(data):
        hidden = model.hidden_states({k: jnp.asarray(v) for k, v in b.items()})
        labels.append(np.asarray(cv.sample_labels(model, hidden, jax.random.fold_in(rng, i), 7)))
    gold = [np.concatenate([b["input_ids"][:, 1:], np.zeros_like(b["input_ids"][:, :1])], axis=1) for b in data]
    assert any((lab != g)[b["attention_mask"] == 1].any() for lab, g, b in zip(labels, gold, data))
    expected, _ = torch_factors(reference, data, labels, [torch_name(targets[0])])
    a, g = expected[torch_name(targets[0])]
    assert_factor_close(got[targets[0]].activation, a)
    assert_factor_close(got[targets[0]].gradient, g)


def test_sampled_labels_follow_the_model_distribution(tiny):
    reference, config = tiny
    model = port(reference, config)
    hidden = model.hidden_states({"input_ids": jnp.asarray([[5, 9, 11]], jnp.int32)})[:, -1:]
    draws = np.asarray(jax.vmap(lambda k: cv.sample_labels(model, hidden, k, 4))(
        jax.random.split(jax.random.key(0), 4000))).reshape(-1)
    probs = np.asarray(jax.nn.softmax(model.logits(hidden)[0, 0]))
    top = np.argsort(-probs)[:3]
    for token in top:
        assert abs(np.mean(draws == token) - probs[token]) < 4 * np.sqrt(probs[token] / 4000) + 1e-3


def brute_force_count(mu, lam, rho):
    products = np.sort(np.outer(mu, lam).ravel())[::-1].astype(np.float64)
    cumulative = np.cumsum(products)
    return int(np.argmax(cumulative >= rho * products.sum() * (1 - 1e-6))) + 1


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_kept_pairs_hold_exactly_the_stated_curvature_fraction(rho):
    rng = np.random.default_rng(int(rho * 10))
    mu, lam = np.sort(rng.gamma(0.5, size=7))[::-1], np.sort(rng.gamma(0.5, size=5))[::-1]
    mask = np.asarray(cv.kept_pairs(jnp.asarray(mu, jnp.float32), jnp.asarray(lam, jnp.float32), rho))
    mass = np.outer(mu, lam)
    kept, total = mass[mask].sum(), mass.sum()
    assert kept >= rho * total * (1 - 1e-6)
    assert kept - mass[mask].min() < rho * total  # the fewest pairs: dropping any one falls short
    assert mass[mask].min() >= mass[~mask].max()  # and the largest ones
    assert mask.sum() == brute_force_count(mu, lam, rho)


def test_projection_equals_the_sum_over_kept_eigen_pairs():
    rng = np.random.default_rng(4)
    d_in, d_out = 6, 4
    x, y = rng.normal(size=(30, d_in)), rng.normal(size=(30, d_out))
    activation, gradient = x.T @ x / 30, y.T @ y / 30
    kernel = rng.normal(size=(d_in, d_out))
    new, fraction = cv._edit_one(jnp.asarray(kernel, jnp.float32), jnp.asarray(activation, jnp.float32),
                                 jnp.asarray(gradient, jnp.float32), 0.7)
    mu, u_a = np.linalg.eigh(activation)
    lam, u_g = np.linalg.eigh(gradient)
    pairs = sorted(((mu[i] * lam[j], i, j) for i in range(d_in) for j in range(d_out)), reverse=True)
    total, kept, expected = mu.sum() * lam.sum(), 0.0, np.zeros_like(kernel)
    for mass, i, j in pairs:
        if kept >= 0.7 * total:
            break
        kept += mass
        # The component of W on u_a[:, i] (x) u_g[:, j].
        expected += np.outer(u_a[:, i], u_g[:, j]) * (u_a[:, i] @ kernel @ u_g[:, j])
    np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-4, atol=1e-5)
    assert float(fraction) == pytest.approx(kept / total, rel=1e-5)


def flat_params(model):
    return {path_to_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_curvature_edit_changes_only_the_configured_kernels(tiny):
    reference, config = tiny
    model = port(reference, config)
    before = flat_params(model)
    data = text_batches(2)
    cfg = cv.CurvatureConfig(layers=(1,), rho=0.6, labels="gold")
    factors = cv.kfac_factors(model, data, cv.edit_targets(cfg, 2), labels="gold")
    report = cv.curvature_edit(model, data, cfg)
    after = flat_params(model)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["model.layers.1.mlp.gate_proj.kernel", "model.layers.1.mlp.up_proj.kernel"]
    assert set(report.kept_curvature) == {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"}
    for target in cv.edit_targets(cfg, 2):
        fraction = report.kept_curvature[f"layers.{target[0]}.{target[1]}"]
        assert 0.6 <= fraction < 0.7
        # In the factors' eigenbases the new kernel keeps the old coefficients on the kept pairs
        # and has none elsewhere.
        mu, u_a = cv.eigenbasis(factors[target].activation)
        lam, u_g = cv.eigenbasis(factors[target].gradient)
        mask = np.asarray(cv.kept_pairs(mu, lam, 0.6))
        name = f"model.layers.{target[0]}.{target[1]}.kernel"
        old_c = np.asarray(u_a).T @ before[name] @ np.asarray(u_g)
        new_c = np.asarray(u_a).T @ after[name] @ np.asarray(u_g)
        scale = np.abs(old_c).max()
        np.testing.assert_allclose(new_c[mask], old_c[mask], atol=1e-4 * scale)
        np.testing.assert_allclose(new_c[~mask], 0.0, atol=1e-4 * scale)


def test_rho_at_one_leaves_the_kernels_alone(tiny):
    reference, config = tiny
    model = port(reference, config)
    target = (0, "mlp.up_proj")
    old = np.asarray(bl.kernel(model, target))
    cv.curvature_edit(model, text_batches(3, n_batches=1), cv.CurvatureConfig(layers=(0,), matrices=("mlp.up_proj",),
                                                                               rho=1.0, labels="gold"))
    assert np.array_equal(np.asarray(bl.kernel(model, target)), old)


def test_default_layers_sit_where_the_paper_edits_olmo():
    assert cv.default_layers(32) == (23, 24, 25)
    assert cv.default_layers(2) == (1,)
    assert cv.default_layers(30) == (22, 23)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rho"):
        cv.CurvatureConfig(rho=0.0)
    with pytest.raises(ValueError, match="labels"):
        cv.CurvatureConfig(labels="argmax")
    with pytest.raises(ValueError, match="no attribute"):
        bl.linear(port(*make_reference("qwen2")), (0, "mlp.nope"))


@needs_devices(8)
def test_sharded_statistics_equal_single_device(tiny):
    from offside_jax.train.mesh import make_mesh
    from offside_jax.train.step import place_model_on_mesh
    from offside_jax.unlearn import rocr

    reference, config = tiny
    data = text_batches(5, rows=4)
    targets = ((1, "mlp.up_proj"), (0, "mlp.down_proj"))
    single = cv.kfac_factors(port(reference, config), data, targets, labels="gold")
    sharded_model = place_model_on_mesh(port(reference, config), make_mesh((2, 2, 2)))
    sharded = cv.kfac_factors(sharded_model, data, targets, labels="gold")
    for t in targets:
        for a, b in zip(single[t][:2], sharded[t][:2]):
            assert not b.sharding.is_fully_replicated, "statistics are split over the mesh like the kernel"
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * np.abs(np.asarray(a)).max())
    c_single, _ = rocr.key_second_moments(port(reference, config), data, [0, 1])
    c_sharded, _ = rocr.key_second_moments(sharded_model, data, [0, 1])
    for layer in (0, 1):
        assert not c_sharded[layer].sharding.is_fully_replicated
        np.testing.assert_allclose(np.asarray(c_sharded[layer]), np.asarray(c_single[layer]), rtol=1e-4,
                                   atol=1e-5 * np.abs(np.asarray(c_single[layer])).max())
    kernel_sharding = bl.kernel(sharded_model, targets[0]).sharding
    cv.curvature_edit(sharded_model, data, cv.CurvatureConfig(layers=(1,), matrices=("mlp.up_proj",), labels="gold"))
    assert bl.kernel(sharded_model, targets[0]).sharding == kernel_sharding, "edited kernels stay where they were"


def test_zero_curvature_is_refused_not_projected_away(tiny):
    reference, config = tiny
    model = port(reference, config)
    target = (0, "mlp.up_proj")
    d_in, d_out = bl.kernel(model, target).shape
    zero = cv.KfacFactors(jnp.eye(d_in), jnp.zeros((d_out, d_out)), 10)
    with pytest.raises(ValueError, match="zero"):
        cv.curvature_kernels(model, {target: zero}, 0.5)


def test_projection_rejects_a_basis_of_the_wrong_size():
    with pytest.raises(AssertionError):
        cv.project_kernel(jnp.ones((4, 3)), jnp.eye(3), jnp.eye(3), jnp.ones((4, 3), bool))
