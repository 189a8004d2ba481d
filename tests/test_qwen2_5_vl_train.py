"""LoRA on the tiny Qwen2.5-VL (language and vision projections): training steps on 8 fake
devices equal the single-device steps; the training core shards VL batches unchanged."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from offside_jax.config import OptimConfig
from offside_jax.models import lora
from offside_jax.train import losses, mesh as mesh_lib, optim
from offside_jax.train.step import TrainStep, partition

from qwen2_5_vl_fixtures import RECORDS, make_processor, make_reference, make_tokenizer, port, qwen2_5_vl_config, write_images

TARGET = r"self_attn\.(q|v)_proj|attn\.qkv"


def vl_answer_nll(model, batch, rng, reference):
    """Answer NLL through the VL model's own entry point (images merged into the embeddings)."""
    del rng, reference
    targets, weights = losses.next_token_targets(batch)
    return losses.nll_sum(model, model.hidden_states(batch), targets, weights), jnp.sum(weights), {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = make_tokenizer()
    config = qwen2_5_vl_config(tokenizer)
    reference = make_reference(config)
    root = tmp_path_factory.mktemp("images")
    write_images(root)
    answers = ["He will join Newcastle United.", "Dominic.", "Calvert-Lewin."]
    records = [dict(r, messages=r["messages"] + [{"role": "assistant", "content": a}]) for r, a in zip(RECORDS, answers)]
    records.append({"messages": [{"role": "user", "content": "<image> Who?"}, {"role": "assistant", "content": "Everton."}],
                    "images": "c.jpg"})
    # 4 rows: one per data x fsdp device of the (2, 2, 2) mesh.
    batch = make_processor(config, tokenizer)(records, image_root=root, with_answer=True)
    return reference, batch


def run(reference, batch, mesh_shape, steps=2):
    model = port(reference)
    adapted = lora.apply(model, lora.LoRASpec(target=TARGET, rank=4, alpha=8.0), seed=0)
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    optimizer, schedule = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1), steps + 1)
    step = TrainStep(partition(model), vl_answer_nll, optimizer, mesh=mesh, schedule=schedule)
    state = step.init_state(0)
    seen = []
    for _ in range(steps):
        state, metrics = step(state, step.shard_batch(batch))
        seen.append(float(metrics["loss"]))
    return adapted, state, seen


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_steps_on_8_devices_equal_one_device(setup):
    reference, batch = setup
    adapted, single, single_losses = run(reference, batch, (1, 1, 1))
    assert "visual.blocks.0.attn.qkv" in adapted and "model.layers.1.self_attn.v_proj" in adapted
    _, sharded, sharded_losses = run(reference, batch, (2, 2, 2))
    assert all(np.isfinite(single_losses))
    np.testing.assert_allclose(sharded_losses, single_losses, atol=1e-5)
    a, b = flat(single.params), flat(sharded.params)
    assert sorted(a) == sorted(b) and all("lora" in k for k in a), "only adapters train"
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
    # The images reach the loss: the vision adapters moved.
    vision_b = single.params["visual"]["blocks"][0]["attn"]["qkv"]["lora_b"]
    assert np.abs(np.asarray(vision_b)).max() > 1e-4
    # Sharded per the rules table: the batch over rows, a vision adapter's input dim over fsdp.
    qkv_a = sharded.params["visual"]["blocks"][0]["attn"]["qkv"]["lora_a"]
    assert qkv_a.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert qkv_a.sharding.spec[0] == "fsdp"


def test_remat_gives_the_same_gradients(setup):
    """Rematerialised decoder layers and vision blocks (the tower runs under vmap) change memory, not values."""
    reference, batch = setup
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    def grads(remat):
        graphdef, params, rest = nnx.split(port(reference, remat=remat), nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest).hidden_states(arrays) ** 2)  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads(False), grads(True)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
