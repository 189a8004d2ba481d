"""Memory features of the training core: remat policies by name, bf16 params with float32
master weights."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import LlamaConfig

from offside_jax.config import OptimConfig
from offside_jax.models import lora
from offside_jax.models.auto import create_model
from offside_jax.models.layers import REMAT_POLICIES, LoRAWeight
from offside_jax.train import aot, mesh as mesh_lib, optim
from offside_jax.train.losses import answer_nll
from offside_jax.train.step import TrainStep, partition

VOCAB = 128


def config(layers=2):
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )


def batch(rows=8, length=32, seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}


def make_step(model, *, lr, master, mesh_shape=(1, 1, 1), schedule="constant"):
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    tx, sched = optim.make_optimizer(OptimConfig(lr=lr, schedule=schedule, max_grad_norm=None, weight_decay=0.0), 100)
    return TrainStep(partition(model), answer_nll, tx, mesh=mesh, schedule=sched, fp32_master_weights=master)


def dtypes(tree):
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}


# -- remat --------------------------------------------------------------------------------------


def grads_with(remat):
    model = create_model(config(), seed=0, remat=remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    b = {k: jnp.asarray(v) for k, v in batch().items()}

    def loss(p):
        total, weight, _ = answer_nll(nnx.merge(graphdef, p, rest), b, None, None)
        return total / weight

    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_gradients(policy):
    plain, remat = grads_with(False), grads_with(policy)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_full_remat_needs_less_temporary_memory_than_none():
    """XLA's own buffer assignment (AOT): recomputing layers keeps fewer activations."""
    temps = {}
    for remat in ("none", "full"):
        step = make_step(create_model(config(layers=6), seed=0, remat=remat), lr=1e-3, master=False)
        temps[remat] = aot.memory_estimate(step.compile(step.abstract_batch(batch(rows=8, length=64)))).temp_bytes
    assert temps["full"] < temps["none"], temps


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="unknown remat policy 'dots_savable'.*dots_saveable"):
        create_model(config(), seed=0, remat="dots_savable")
    assert "full" in REMAT_POLICIES and "none" not in REMAT_POLICIES  # "none" means no remat at all


# -- bf16 params with float32 master weights ---------------------------------------------------


def bf16_model():
    return create_model(config(), seed=0, dtype="bfloat16", param_dtype="bfloat16")


def test_master_weights_are_float32_and_the_model_computes_in_bf16():
    step = make_step(bf16_model(), lr=1e-3, master=True, mesh_shape=(1, 4, 2))
    state = step.init_state(0)
    assert dtypes(state.params) == {jnp.dtype(jnp.float32)}
    adam = state.opt_state[-1][0]
    assert dtypes(adam.mu) == dtypes(adam.nu) == {jnp.dtype(jnp.float32)}
    assert dtypes(step.abstract_state().params) == {jnp.dtype(jnp.float32)}
    # The model the step merges (and exports) holds bf16 params, sharded like the masters.
    model_params = nnx.state(step.model(state), nnx.Param)
    assert dtypes(model_params) == {jnp.dtype(jnp.bfloat16)}
    q = state.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == model_params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...].sharding.spec
    # The masters start as the exact bf16 initial values.
    init = nnx.to_pure_dict(nnx.state(bf16_model(), nnx.Param))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(init)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def test_bf16_training_with_master_weights_learns():
    step = make_step(bf16_model(), lr=1e-2, master=True)
    state = step.init_state(0)
    b = step.shard_batch(batch())
    seen = []
    for _ in range(8):
        state, metrics = step(state, b)
        seen.append(float(metrics["loss"]))
    assert seen[-1] < seen[0] - 1.0, seen  # memorising one batch: a large drop from ln(128) ~ 4.85
    assert dtypes(state.params) == {jnp.dtype(jnp.float32)}


def test_updates_below_bf16_resolution_accumulate_only_in_the_master():
    """Adam's first steps move every weight by about lr. With lr = 1e-5, far below half a bf16
    ulp of a weight of magnitude >= 0.01 (>= 3e-5), bf16 params never change, while the
    float32 masters move by ~lr per step."""
    lr, steps = 1e-5, 3
    init = {k: np.asarray(v, np.float32) for k, v in flat(nnx.to_pure_dict(nnx.state(bf16_model(), nnx.Param))).items()}
    b = batch()
    results = {}
    for master in (True, False):
        step = make_step(bf16_model(), lr=lr, master=master)
        state = step.init_state(0)
        sharded = step.shard_batch(b)
        for _ in range(steps):
            state, _ = step(state, sharded)
        results[master] = {k: np.asarray(v, np.float32) for k, v in flat(state.params).items()}
    big = {k: np.abs(v) >= 0.01 for k, v in init.items()}
    moved_master = np.concatenate([np.abs(results[True][k] - init[k])[big[k]] for k in init])
    moved_bf16 = np.concatenate([np.abs(results[False][k] - init[k])[big[k]] for k in init])
    assert np.mean(moved_master > 0.5 * lr) > 0.9  # almost every weight moved in the master
    assert moved_master.max() <= steps * lr * 1.01  # and by at most lr per step
    assert np.count_nonzero(moved_bf16) == 0  # pure bf16 training lost every one of those updates


def test_lora_on_bf16_base_keeps_base_in_bf16_and_adapters_in_float32():
    model = bf16_model()
    lora.apply(model, lora.LoRASpec("q_proj|v_proj", rank=4), seed=0)
    step = make_step(model, lr=1e-3, master=True)
    state = step.init_state(0)
    assert dtypes(state.params) == {jnp.dtype(jnp.float32)}
    assert dtypes(step.frozen) == {jnp.dtype(jnp.bfloat16)}
    state, metrics = step(state, step.shard_batch(batch()))
    assert np.isfinite(float(metrics["loss"]))
    assert dtypes(nnx.state(step.model(state), LoRAWeight)) == {jnp.dtype(jnp.bfloat16)}


def flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}
