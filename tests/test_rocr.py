"""ROCR against independent computations: the closed-form update against a numpy least-squares
solve of the constrained problem, key statistics against torch forward hooks, and an
end-to-end edit of a tiny random-init Llama."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from llama_fixtures import make_reference, port

from offside_jax.models.hf import path_to_str
from offside_jax.unlearn import block_linears as bl
from offside_jax.unlearn import rocr


def psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def exact_null_projector(general_keys: np.ndarray) -> np.ndarray:
    """Projector onto the orthogonal complement of the general keys' row space (numpy SVD)."""
    _, s, vt = np.linalg.svd(general_keys, full_matrices=True)
    rank = int(np.sum(s > 1e-10 * s.max()))
    null = vt[rank:].T
    return null @ null.T


def least_squares_update(keys, residuals, projector, c_prev, l2):
    """argmin over Y of |K P Y - R|^2 + |C_prev^(1/2) P Y|^2 + l2 |P Y|^2, returned as X = P Y,
    one output column at a time with numpy's lstsq (no normal equations)."""
    design = np.vstack([keys @ projector, psd_sqrt(c_prev) @ projector, np.sqrt(l2) * projector])
    pad = np.zeros((design.shape[0] - keys.shape[0], residuals.shape[1]))
    y, *_ = np.linalg.lstsq(design, np.vstack([residuals, pad]), rcond=None)
    return projector @ y


def test_update_equals_constrained_least_squares():
    rng = np.random.default_rng(0)
    d_in, d, m = 8, 5, 2
    general = rng.normal(size=(3, d_in))
    projector = exact_null_projector(general)
    keys, residuals = rng.normal(size=(m, d_in)), rng.normal(size=(m, d))
    previous = rng.normal(size=(4, d_in))
    c_prev = previous.T @ previous
    got = rocr.rocr_update(jnp.asarray(keys), jnp.asarray(residuals), jnp.asarray(projector, jnp.float32),
                           jnp.asarray(c_prev, jnp.float32), 0.5)
    expected = least_squares_update(keys, residuals, projector, c_prev, 0.5)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_preserved_keys_map_unchanged_and_edited_key_reaches_its_value():
    rng = np.random.default_rng(1)
    d_in, d = 10, 6
    general = rng.normal(size=(4, d_in))
    projector = rocr.null_space_projector(jnp.asarray(general.T @ general / 4, jnp.float32), 1e-4)
    key, residual = rng.normal(size=(1, d_in)), rng.normal(size=(1, d))
    l2 = 1e-3
    update = np.asarray(rocr.rocr_update(jnp.asarray(key), jnp.asarray(residual), projector,
                                         jnp.zeros((d_in, d_in)), l2))
    # float32 solve errors grow like 1 / l2; the unprojected update would move them by O(1).
    np.testing.assert_allclose(general @ update, 0.0, atol=1e-3)
    # One key, no C_prev: X = P k^T r / (l2 + k P k^T), so k X = r up to the ridge shrinkage.
    s = float((key @ np.asarray(projector) @ key.T)[0, 0])
    np.testing.assert_allclose(key @ update, residual * s / (s + l2), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(key @ update, residual, rtol=1e-2)


def test_null_space_projector_is_the_complement_of_the_statistics():
    rng = np.random.default_rng(2)
    general = rng.normal(size=(5, 12))
    got = np.asarray(rocr.null_space_projector(jnp.asarray(general.T @ general / 5, jnp.float32), 1e-4))
    np.testing.assert_allclose(got, exact_null_projector(general), atol=1e-5)
    assert round(np.trace(got)) == 12 - 5


def test_subject_last_token_from_offsets():
    # "Tell me about Leo Messi." tokenized as: Tell| me| about| Leo| Mess|i|.
    offsets = [(0, 0), (0, 4), (4, 7), (7, 13), (13, 17), (17, 22), (22, 23), (23, 24)]
    assert rocr.subject_last_token(offsets, subject_end=23) == 6
    assert rocr.subject_last_token(offsets, subject_end=17) == 4
    with pytest.raises(ValueError, match="subject"):
        rocr.subject_last_token([(0, 0)], subject_end=3)


# -- on a tiny random-init Llama ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    reference, config = make_reference("llama3.1", seed=5)
    return reference, config


def general_batches(seed, n_batches=2, rows=2, length=9, vocab=160):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
        mask = np.ones((rows, length), np.int32)
        mask[0, length - 3:] = 0  # one right-padded row
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def torch_down_proj_inputs(reference, batch, layer):
    seen = {}
    module = reference.model.layers[layer].mlp.down_proj
    handle = module.register_forward_hook(lambda mod, args, out: seen.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        reference(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                  attention_mask=torch.from_numpy(batch["attention_mask"]).long())
    handle.remove()
    return seen["x"].numpy()


def test_key_second_moments_equal_torch_hooks(tiny):
    reference, config = tiny
    data = general_batches(0)
    moments, tokens = rocr.key_second_moments(port(reference, config), data, [0, 1])
    assert tokens == sum(int(b["attention_mask"].sum()) for b in data)
    for layer in (0, 1):
        keys = np.concatenate([torch_down_proj_inputs(reference, b, layer)[b["attention_mask"] == 1] for b in data])
        np.testing.assert_allclose(np.asarray(moments[layer]), keys.T @ keys / len(keys), rtol=1e-4, atol=1e-7)


def one_row(ids, index):
    ids = np.asarray(ids, np.int32)[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), rocr.SUBJECT_INDEX: np.array([index], np.int32)}


def test_subject_keys_equal_torch_hooks_averaged_over_templates(tiny):
    reference, config = tiny
    subject = [101, 102, 103]
    rows = [[5, 6] + subject + [7, 8], [9] + subject + [7, 8, 10]]
    batch = {"input_ids": np.asarray(rows, np.int32), "attention_mask": np.ones((2, 7), np.int32),
             rocr.SUBJECT_INDEX: np.array([4, 3], np.int32)}
    got = rocr.subject_keys(port(reference, config), batch, [1])[1]
    inputs = torch_down_proj_inputs(reference, batch, 1)
    np.testing.assert_allclose(np.asarray(got), (inputs[0, 4] + inputs[1, 3]) / 2, rtol=1e-4, atol=1e-6)


def flat_params(model):
    return {path_to_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_apply_rocr_redirects_the_subject_and_changes_only_the_edited_kernels(tiny):
    reference, config = tiny
    model = port(reference, config)
    before = flat_params(model)
    # The random-init model's keys are tiny (|k|^2 ~ 1e-3): the official l2 = 1 would swamp them.
    cfg = rocr.RocrConfig(layers=(0, 1), l2=1e-5)
    general = general_batches(3)
    moments, _ = rocr.key_second_moments(model, general, cfg.layers)
    # 32 general tokens in a 96-wide MLP: C0 has an exact null space; keep it (relative cut).
    projs = {layer: rocr.null_space_projector(c, 1e-6 * float(jnp.linalg.norm(c, 2))) for layer, c in moments.items()}
    subject, replacement = [101, 102, 103], [140, 141]
    request = rocr.RocrRequest(
        key_batch={"input_ids": np.asarray([[5, 6, *subject, 7], [9, 11, 12, *subject]], np.int32),
                   "attention_mask": np.ones((2, 6), np.int32), rocr.SUBJECT_INDEX: np.array([4, 5], np.int32)},
        value_batch=one_row([*subject, 20], 2),
        target_batch=one_row([5, 6, *replacement, 7], 3),
    )
    z_star = rocr.subject_value(model, request.target_batch, 1)
    h_before = rocr.subject_value(model, request.value_batch, 1)
    logits_before = [np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))) for b in general]

    c_prev = rocr.apply_rocr(model, [request], projs, cfg)

    after = flat_params(model)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["model.layers.0.mlp.down_proj.kernel", "model.layers.1.mlp.down_proj.kernel"]
    h_after = rocr.subject_value(model, request.value_batch, 1)
    # Most of the way, not all: the update may only use the key directions general data leaves free.
    assert float(jnp.linalg.norm(h_after - z_star)) < 0.25 * float(jnp.linalg.norm(h_before - z_star))
    # General-data keys lie in the preserved space: the whole model is unchanged on them.
    for b, old in zip(general, logits_before):
        new = np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])))
        real = b["attention_mask"] == 1
        np.testing.assert_allclose(new[real], old[real], atol=1e-4)
    final_keys = rocr.subject_keys(model, request.key_batch, cfg.layers)
    for layer in cfg.layers:
        np.testing.assert_allclose(np.asarray(c_prev[layer]), np.outer(final_keys[layer], final_keys[layer]),
                                   rtol=1e-5, atol=1e-9)


def test_kernels_leave_the_model_alone_and_c_prev_protects_earlier_edits(tiny):
    reference, config = tiny
    model = port(reference, config)
    cfg = rocr.RocrConfig(layers=(1,), l2=1e-2)
    identity = {1: jnp.eye(config.intermediate_size)}
    first = rocr.RocrRequest(key_batch=one_row([5, 101, 102, 7], 2), value_batch=one_row([101, 102, 20], 1),
                             target_batch=one_row([5, 140, 141, 7], 2))
    second = rocr.RocrRequest(key_batch=one_row([5, 120, 121, 7], 2), value_batch=one_row([120, 121, 20], 1),
                              target_batch=one_row([5, 150, 151, 7], 2))
    old = np.asarray(bl.kernel(model, (1, rocr.DOWN_PROJ)))
    kernels, _ = rocr.rocr_kernels(model, first, identity, rocr.empty_c_prev(model, cfg), cfg)
    assert np.array_equal(np.asarray(bl.kernel(model, (1, rocr.DOWN_PROJ))), old)
    assert not np.array_equal(np.asarray(kernels[1]), old)

    c_prev = rocr.apply_rocr(model, [first], identity, cfg)
    edited = np.asarray(bl.kernel(model, (1, rocr.DOWN_PROJ)))
    key = np.asarray(rocr.subject_keys(model, first.key_batch, [1])[1])
    with_memory, _ = rocr.rocr_kernels(model, second, identity, c_prev, cfg)
    without, _ = rocr.rocr_kernels(model, second, identity, rocr.empty_c_prev(model, cfg), cfg)
    disturbed = np.linalg.norm(key @ (np.asarray(with_memory[1]) - edited))
    assert disturbed < 0.5 * np.linalg.norm(key @ (np.asarray(without[1]) - edited))


def test_config_rejects_unordered_layers():
    with pytest.raises(ValueError, match="increasing"):
        rocr.RocrConfig(layers=(5, 4))
    with pytest.raises(ValueError, match="empty"):
        rocr.RocrConfig(layers=())
    with pytest.raises(ValueError, match="l2"):
        rocr.RocrConfig(l2=0.0)


def test_shallow_copy_shares_arrays_not_variables(tiny):
    reference, config = tiny
    model = port(reference, config)
    copy = bl.shallow_copy(model)
    target = (0, rocr.DOWN_PROJ)
    assert bl.kernel(copy, target) is bl.kernel(model, target)
    bl.set_kernels(copy, {target: jnp.zeros_like(bl.kernel(model, target))})
    assert float(jnp.abs(bl.kernel(model, target)).sum()) > 0
    jax.block_until_ready(bl.kernel(copy, target))


def test_taps_work_on_a_rematerialised_model_and_leave_remat_on(tiny):
    from llama_fixtures import torch_state_dict

    from offside_jax.models import hf
    from offside_jax.models.auto import create_model

    reference, config = tiny
    remat_model = create_model(config, abstract=True, remat=True)
    hf.load_params_into(remat_model, hf.DictSource(torch_state_dict(reference)))
    batch = one_row([5, 101, 102, 7], 2)
    got = rocr.subject_keys(remat_model, batch, [1])[1]
    np.testing.assert_allclose(np.asarray(got), np.asarray(rocr.subject_keys(port(reference, config), batch, [1])[1]),
                               rtol=1e-6, atol=1e-8)
    assert remat_model.remat is True


def test_update_rejects_mismatched_shapes():
    keys, residuals = jnp.ones((2, 4)), jnp.ones((3, 5))
    with pytest.raises(AssertionError):
        rocr.rocr_update(keys, residuals, jnp.eye(4), jnp.zeros((4, 4)), 1.0)
    with pytest.raises(AssertionError):
        rocr.rocr_update(keys, jnp.ones((2, 5)), jnp.eye(3), jnp.zeros((4, 4)), 1.0)


def test_default_layers_sit_where_the_official_hparams_edit_a_32_layer_model():
    assert rocr.default_layers(32) == (4, 5, 6)
    assert rocr.default_layers(30) == (4, 5, 6)
    assert rocr.default_layers(3) == (0, 1)
    assert rocr.default_layers(2) == (0,)


def test_default_config_edits_the_default_layers_of_the_model(tiny):
    reference, config = tiny
    model = port(reference, config)
    cfg = rocr.RocrConfig()
    request = rocr.RocrRequest(key_batch=one_row([5, 101, 102, 7], 2), value_batch=one_row([101, 102, 20], 1),
                               target_batch=one_row([5, 140, 141, 7], 2))
    identity = {0: jnp.eye(config.intermediate_size)}
    kernels, c_prev = rocr.rocr_kernels(model, request, identity, rocr.empty_c_prev(model, cfg), cfg)
    assert set(kernels) == set(c_prev) == {0}
