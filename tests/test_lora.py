"""LoRA: selection by regex, only adapters train, merge == base + adapter, off == base, HF export."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM as TorchLlama

from offside_jax.config import OptimConfig
from offside_jax.models import hf, lora
from offside_jax.models.auto import create_model
from offside_jax.models.layers import LoRAWeight
from offside_jax.train import losses, mesh as mesh_lib, optim
from offside_jax.train.step import TrainStep, partition

CFG = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=2500.0, max_position_embeddings=64, tie_word_embeddings=False,
)


def batch(rows=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (rows, length)).astype(np.int32)
    attention = np.ones((rows, length), np.int32)
    attention[0, -3:] = 0
    loss_mask = np.zeros((rows, length), np.int32)
    loss_mask[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask * attention}


def logits_of(model, b):
    return np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])))


def randomize_adapters(model, seed=1):
    """Non-zero ``lora_b`` (training would get there; zero adapters would prove nothing)."""
    for i, (_, layer) in enumerate(lora.adapted_layers(model)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        layer.lora_b.set_value(0.1 * jax.random.normal(key, layer.lora_b.get_value().shape))


def test_regex_selects_layers_and_adapters_are_not_params():
    model = create_model(CFG, seed=0)
    paths = lora.apply(model, lora.LoRASpec("q_proj|v_proj", rank=4, alpha=8.0))
    assert paths == sorted(paths, key=paths.index)  # deterministic order
    assert sorted(paths) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_a.get_value().shape == (32, 4) and layer.lora_b.get_value().shape == (4, 32)
    assert not np.any(np.asarray(layer.lora_b.get_value()))  # starts as the base model
    # Weight I/O (nnx.Param) never sees adapters.
    assert not any("lora" in name for name in hf.state_dict(model))
    # q_proj: 32 -> 32, v_proj: 32 -> 2 kv heads x 8 = 16; rank 4; two layers.
    n_adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAWeight)))
    assert n_adapter == lora.adapter_count(model) == 2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16))
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.apply(create_model(CFG, seed=0), lora.LoRASpec("qproj"))
    with pytest.raises(ValueError, match="lm_head"):
        lora.apply(create_model(CFG, seed=0), lora.LoRASpec("lm_head"))


def test_adapters_off_is_exactly_the_base_and_merge_equals_base_plus_adapter():
    b = batch()
    base = create_model(CFG, seed=0)
    base_logits = logits_of(base, b)
    model = create_model(CFG, seed=0)
    lora.apply(model, lora.LoRASpec("q_proj|v_proj|down_proj", rank=4, alpha=8.0))
    randomize_adapters(model)
    adapted_logits = logits_of(model, b)
    assert np.abs(adapted_logits - base_logits).max() > 1e-3
    with lora.disabled(model):
        np.testing.assert_array_equal(logits_of(model, b), base_logits)  # bitwise
    np.testing.assert_array_equal(logits_of(model, b), adapted_logits)  # switched back on

    # Merged weights, checked against kernels folded by hand in numpy.
    merged = lora.merged_copy(model)
    assert not lora.has_adapters(merged) and lora.has_adapters(model)
    for path, layer in lora.adapted_layers(model):
        a, bb = np.asarray(layer.lora_a.get_value()), np.asarray(layer.lora_b.get_value())
        expected = np.asarray(layer.kernel.get_value()) + a @ bb * (8.0 / 4)
        got = merged
        for part in path.split("."):
            got = got[int(part)] if part.isdigit() else getattr(got, part)
        np.testing.assert_allclose(np.asarray(got.kernel.get_value()), expected, atol=1e-6)
    np.testing.assert_allclose(logits_of(merged, b), adapted_logits, atol=1e-5)


def test_only_adapters_train_and_reference_is_the_base():
    b = batch()
    # Rematerialised decoder layers and adapter dropout: the step must handle both.
    model = create_model(CFG, seed=0, remat=True)
    lora.apply(model, lora.LoRASpec("q_proj|v_proj", rank=4, alpha=8.0, dropout=0.1))
    base_state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    base_logits = logits_of(create_model(CFG, seed=0), b)
    parts = partition(model)
    assert parts.lora
    # Only adapter leaves are trainable, so only they enter the optimizer state.
    trainable_names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(parts.trainable)}
    assert trainable_names and all("lora_" in n for n in trainable_names)

    seen = {}

    def loss_with_reference(model, micro, rng, reference):
        s, w, aux = losses.answer_nll(model, micro, rng, reference)
        seen["reference"] = reference is not None
        ref_logits = reference(micro["input_ids"], micro["attention_mask"])
        return s, w, {"ref_logit_mean": jnp.mean(ref_logits)}

    tx, schedule = optim.make_optimizer(OptimConfig(lr=5e-2, max_grad_norm=None, schedule="constant"), 3)
    step = TrainStep(parts, loss_with_reference, tx, mesh=mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), micro_batches=2)
    state = step.init_state(0)
    opt_leaves = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if x.ndim > 0}
    assert opt_leaves and all("lora_" in n for n in opt_leaves)
    for _ in range(3):
        state, metrics = step(state, step.shard_batch(b))
    assert seen["reference"]
    # The reference (adapters off) is the base model at every step.
    assert float(metrics["ref_logit_mean"]) == pytest.approx(float(base_logits.mean()), abs=1e-5)
    trained = step.model(state)
    now_base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(base_state), jax.tree.leaves(now_base)):
        np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
    for _, layer in lora.adapted_layers(trained):
        assert np.abs(np.asarray(layer.lora_b.get_value())).max() > 0
    with lora.disabled(trained):
        np.testing.assert_array_equal(logits_of(trained, b), base_logits)


def test_merged_export_loads_in_transformers(tmp_path):
    b = batch()
    model = create_model(CFG, seed=0)
    lora.apply(model, lora.LoRASpec("q_proj|v_proj|up_proj", rank=4, alpha=8.0))
    randomize_adapters(model)
    ours = logits_of(model, b)
    lora.save_merged(model, CFG, tmp_path / "merged")
    ref = TorchLlama.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        theirs = ref(
            input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(b["attention_mask"], dtype=torch.long),
        ).logits.numpy()
    real = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)


@pytest.mark.parametrize("remat", [False, True])
def test_adapter_dropout_follows_the_key(remat):
    model = create_model(CFG, seed=0, remat=remat)
    lora.apply(model, lora.LoRASpec("q_proj|v_proj", rank=4, dropout=0.5))
    randomize_adapters(model)
    graphdef, state = nnx.split(model)
    ids = jnp.ones((1, 5), jnp.int32)

    @jax.jit
    def run(state, key):
        m = nnx.merge(graphdef, state)
        lora.set_dropout_key(m, key)
        return m(ids)

    a, b, again = run(state, jax.random.key(0)), run(state, jax.random.key(1)), run(state, jax.random.key(0))
    assert np.abs(np.asarray(a - b)).max() > 1e-4  # different masks
    np.testing.assert_array_equal(a, again)  # same key, same mask
    # Without a key (evaluation, generation) there is no dropout: the plain adapted model.
    # (eager vs jitted: equal up to float rounding; dropout would differ by ~0.1)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state)), atol=1e-6)
