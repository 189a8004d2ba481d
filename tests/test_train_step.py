"""The training step: sharded == single device, token-weighted accumulation, the fused NLL,
optimizer schedules and masks; every value checked against numpy or an independent path."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from transformers import LlamaConfig

from offside_jax.config import OptimConfig
from offside_jax.models.auto import create_model
from offside_jax.train import losses, mesh as mesh_lib, optim
from offside_jax.train.step import TrainStep, partition

VOCAB = 128


def tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=64, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_batch(rows=8, length=16, seed=0):
    """Right-padded rows with prompts and answers of different lengths (unequal token counts)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (rows, length)).astype(np.int32)
    attention = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        real = int(rng.integers(6, length + 1))
        prompt = int(rng.integers(2, real - 1))
        attention[r, :real] = 1
        loss_mask[r, prompt:real] = 1
        ids[r, real:] = 0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def numpy_answer_nll(logits, batch):
    """Mean NLL of answer tokens from logits, computed in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ids, mask = batch["input_ids"], batch["loss_mask"] * batch["attention_mask"]
    picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    w = mask[:, 1:]
    return -(picked * w).sum() / w.sum()


def build(mesh_shape, *, micro_batches=1, optimizer=None, seed=0, loss=losses.answer_nll, cfg=None):
    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = mesh_lib.make_mesh(mesh_shape, devices)
    model = create_model(cfg or tiny_config(), seed=seed)
    if optimizer is None:
        optimizer, schedule = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1), 3)
    else:
        schedule = None
    step = TrainStep(partition(model), loss, optimizer, mesh=mesh, micro_batches=micro_batches, schedule=schedule)
    return step, step.init_state(seed)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sharded_steps_equal_single_device_and_follow_the_rules_table():
    batches = [make_batch(seed=s) for s in range(3)]
    results = {}
    for shape in [(1, 1, 1), (2, 2, 2)]:
        step, state = build(shape, micro_batches=2)
        losses_seen = []
        for b in batches:
            state, metrics = step(state, step.shard_batch(b))
            losses_seen.append(float(metrics["loss"]))
        results[shape] = (state, losses_seen)
    single, sharded = results[(1, 1, 1)][0], results[(2, 2, 2)][0]
    a, b = flat(single.params), flat(sharded.params)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_allclose(results[(2, 2, 2)][1], results[(1, 1, 1)][1], atol=1e-5)
    # The updates actually moved the params.
    first = build((1, 1, 1))[1]
    assert max(np.abs(a[k] - v).max() for k, v in flat(first.params).items()) > 1e-3

    # Layouts, spelled out from the rules table: embed->fsdp, heads/kv_heads/mlp/vocab->tensor.
    params = sharded.params
    layer = params["model"]["layers"][0]
    expected = {
        "q": (layer["self_attn"]["q_proj"]["kernel"], P("fsdp", "tensor")),
        "k": (layer["self_attn"]["k_proj"]["kernel"], P("fsdp", "tensor")),
        "o": (layer["self_attn"]["o_proj"]["kernel"], P("tensor", "fsdp")),
        "down": (layer["mlp"]["down_proj"]["kernel"], P("tensor", "fsdp")),
        "norm": (layer["input_layernorm"]["weight"], P(None)),  # norm scales carry no logical axis
        "embed": (params["model"]["embed_tokens"]["embedding"], P("tensor", "fsdp")),
        "head": (params["lm_head"]["kernel"], P("fsdp", "tensor")),
    }
    for name, (array, spec) in expected.items():
        assert array.sharding.spec == spec, name
        assert array.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
        # Each device holds 1/4 of a matrix (fsdp x tensor); replicated vectors are whole.
        shard = array.addressable_shards[0].data.shape
        assert math.prod(shard) * (4 if array.ndim == 2 else 1) == array.size, name
    adam = sharded.opt_state[1][0]
    assert isinstance(adam, optax.ScaleByAdamState)
    assert adam.mu["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert adam.nu["model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert adam.count.sharding.spec == P()


def test_loss_metric_is_the_numpy_answer_nll():
    step, state = build((1, 1, 1))
    batch = make_batch(seed=3)
    model = step.model(state)
    logits = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    expected = numpy_answer_nll(logits, batch)
    evaluation = step.evaluate(state, step.shard_batch(batch, micro_batches=2))
    assert float(evaluation["loss"]) == pytest.approx(expected, abs=1e-5)
    _, metrics = step(state, step.shard_batch(batch))
    assert float(metrics["loss"]) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["answer_tokens"]) == (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum()
    assert float(metrics["tokens"]) == batch["attention_mask"].sum()


def test_four_micro_batches_equal_one_big_batch_token_weighted():
    batch = make_batch(rows=8, seed=5)
    # Micro-batches with very different answer-token counts: a plain mean of micro-batch
    # means would differ from the big batch; token weighting must not.
    counts = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).reshape(4, 2, -1).sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1
    sgd = optax.sgd(1.0)  # params' change == -gradient: compares gradients directly
    out = {}
    for m in (1, 4):
        step, state = build((1, 1, 1), micro_batches=m, optimizer=sgd)
        before = flat(state.params)
        state, metrics = step(state, step.shard_batch(batch))
        after = flat(state.params)
        out[m] = ({k: before[k] - after[k] for k in before}, float(metrics["loss"]), float(metrics["grad_norm"]))
    for k, g in out[1][0].items():
        np.testing.assert_allclose(out[4][0][k], g, atol=1e-5, err_msg=k)
    assert out[4][1] == pytest.approx(out[1][1], abs=1e-5)
    assert out[4][2] == pytest.approx(out[1][2], rel=1e-5)
    # The gradient itself is the one of the numpy-checked loss, by an independent autodiff path.
    step, state = build((1, 1, 1), optimizer=sgd)
    model = step.model(state)

    def plain_loss(params):
        from flax import nnx

        m = nnx.merge(step.parts.graphdef, params, step.frozen)
        logits = m(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(batch["input_ids"])[:, 1:, None], axis=-1)[..., 0]
        w = jnp.asarray(batch["loss_mask"] * batch["attention_mask"])[:, 1:]
        return -(picked * w).sum() / w.sum()

    del model
    grads = flat(jax.grad(plain_loss)(state.params))
    for k, g in grads.items():
        np.testing.assert_allclose(out[1][0][k], g, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("chunk", [5, 64, 10_000])
def test_fused_cross_entropy_matches_plain_log_softmax(chunk):
    rng = np.random.default_rng(1)
    n, d, v = 37, 16, 50
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, n), jnp.float32)

    def plain(h, w, weights):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return -(jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0] * weights).sum()

    def fused(h, w, weights):
        return losses.fused_nll_sum(h, w, targets, weights, chunk, jnp.dtype(jnp.float32))

    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected = ((lse - logits[np.arange(n), np.asarray(targets)]) * np.asarray(weights)).sum()
    assert float(jax.jit(fused)(h, w, weights)) == pytest.approx(expected, rel=1e-6)
    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(h, w, weights)
    want = jax.grad(plain, argnums=(0, 1, 2))(h, w, weights)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_fused_and_plain_model_loss_agree_with_tied_embeddings():
    model = create_model(tiny_config(tie_word_embeddings=True), seed=2)
    batch = {k: jnp.asarray(v) for k, v in make_batch(seed=9).items()}
    fused, plain = losses.make_answer_nll(7), losses.make_answer_nll(0)
    from flax import nnx

    graphdef, params = nnx.split(model)

    def value(loss, p):
        s, w, _ = loss(nnx.merge(graphdef, p), batch, jax.random.key(0), None)
        return s / w

    assert float(jax.jit(lambda p: value(fused, p))(params)) == pytest.approx(float(value(plain, params)), abs=1e-6)
    g1 = jax.jit(jax.grad(lambda p: value(fused, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: value(plain, p)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_schedule_warmup_then_cosine_and_linear():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, total_steps=14)
    assert [float(s(i)) for i in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Cosine from 1 to 0.1 over the remaining 10 steps.
    for i in (6, 9, 14):
        t = (i - 4) / 10
        assert float(s(i)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), abs=1e-6)
    lin = optim.make_schedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="linear"), total_steps=10)
    assert [float(lin(i)) for i in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(OptimConfig(schedule="step"), 10)


def test_weight_decay_mask_and_clipping():
    params = {"a": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "norm": {"weight": jnp.ones(3)}, "embed_tokens": {"embedding": jnp.ones((4, 2))}}
    mask = optim.decay_mask(params, no_decay="embed_tokens")
    assert mask == {"a": {"kernel": True, "bias": False}, "norm": {"weight": False}, "embed_tokens": {"embedding": False}}
    # lr 1, Adam with b1 = b2 = 0 and eps = 1: update = -c / (|c| + 1) for the clipped gradient c,
    # minus lr * wd * p on decayed leaves only.
    cfg = OptimConfig(lr=1.0, schedule="constant", weight_decay=0.5, max_grad_norm=1.0, b1=0.0, b2=0.0, eps=1.0, no_decay="embed_tokens")
    tx, _ = optim.make_optimizer(cfg, 10)
    grads = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    n = sum(x.size for x in jax.tree.leaves(params))
    c = 10.0 / (10.0 * math.sqrt(n))  # every element after clipping to global norm 1
    adam = -c / (c + 1.0)
    np.testing.assert_allclose(updates["a"]["kernel"], adam - 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["a"]["bias"], adam, rtol=1e-6)
    np.testing.assert_allclose(updates["embed_tokens"]["embedding"], adam, rtol=1e-6)


def test_mesh_shapes_and_rules():
    assert mesh_lib.MeshShape(2, -1, 1).resolve(8) == (2, 4, 1)
    with pytest.raises(ValueError, match="needs 12 devices"):
        mesh_lib.MeshShape(3, 2, 2).resolve(8)
    with pytest.raises(ValueError, match="needs 12 devices"):
        mesh_lib.make_mesh((3, 2, 2))
    with pytest.warns(UserWarning, match="uses 2 of the 8 devices"):
        assert mesh_lib.make_mesh((1, 2, 1)).devices.size == 2
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.MeshShape(-1, -1, 1).resolve(8)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert mesh_lib.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    # A dimension the mesh does not divide stays replicated.
    assert mesh_lib.logical_to_spec(("vocab", "embed"), (129, 64), mesh) == P(None, "fsdp")
    with pytest.raises(KeyError, match="no sharding rule"):
        mesh_lib.logical_to_spec(("embd",), (64,), mesh)
    assert mesh_lib.batch_sharding(mesh).spec == P(None, ("data", "fsdp"))
    step, _ = build((2, 2, 2))
    with pytest.raises(ValueError, match="multiple of 4"):
        step.shard_batch(make_batch(rows=6))


def test_full_finetuning_reference_is_a_frozen_copy_outside_the_optimizer():
    batch = make_batch(seed=7)
    initial = create_model(tiny_config(), seed=0)
    initial_logits = np.asarray(initial(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))

    def with_reference(model, micro, rng, reference):
        s, w, _ = losses.answer_nll(model, micro, rng, reference)
        ref_logits = reference(micro["input_ids"], micro["attention_mask"])
        return s, w, {"ref_logit_sum": jnp.sum(ref_logits)}

    tx, _ = optim.make_optimizer(OptimConfig(lr=1e-2, schedule="constant"), 3)
    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    step = TrainStep(partition(create_model(tiny_config(), seed=0), reference=True), with_reference, tx, mesh=mesh)
    state = step.init_state(0)
    # Adam's mu and nu mirror the trainable params once each: the reference is not in there.
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_params  # + scalar counters
    for _ in range(2):
        state, metrics = step(state, step.shard_batch(batch))
    # After two updates the reference still computes the initial model's logits.
    assert float(metrics["ref_logit_sum"]) == pytest.approx(float(initial_logits.sum()), rel=1e-5, abs=1e-3)
    assert np.abs(np.asarray(step.model(state)(jnp.asarray(batch["input_ids"]))) - initial_logits).max() > 1e-3


def test_fused_cross_entropy_at_a_128k_vocabulary_in_bf16_accumulates_in_fp32():
    """Llama-3's vocabulary with bf16 operands: the loss must match a float64 computation on
    the same bf16 values to fp32-accumulation accuracy (a bf16 sum over 128k logits would be
    off by ~1e-2), and the gradients to bf16 accuracy."""
    rng = np.random.default_rng(2)
    n, d, v = 48, 64, 128256
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.05, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, n), jnp.float32)

    def fused(h, w):
        return losses.fused_nll_sum(h, w, targets, weights, 16, jnp.dtype(jnp.bfloat16))

    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    logits = h64 @ w64
    top = logits.max(1, keepdims=True)
    probs = np.exp(logits - top)
    lse = np.log(probs.sum(1)) + top[:, 0]
    t, wt = np.asarray(targets), np.asarray(weights)
    expected = ((lse - logits[np.arange(n), t]) * wt).sum()
    assert float(jax.jit(fused)(h, w)) == pytest.approx(expected, rel=1e-4)
    dlogits = probs / probs.sum(1, keepdims=True) * wt[:, None]
    dlogits[np.arange(n), t] -= wt
    grad_h, grad_w = jax.jit(jax.grad(fused, argnums=(0, 1)))(h, w)
    for got, want in ((grad_h, dlogits @ w64.T), (grad_w, h64.T @ dlogits)):
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
