"""MMUnlearner masks against torch autograd + numpy, and the alternating schedule: a masked
ascent step moves exactly the masked elements by Adam's first step on the masked gradient; a
retain step moves everything."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from offside_jax.config import OptimConfig
from offside_jax.models.hf import hf_name
from offside_jax.train import mesh as mesh_lib, optim
from offside_jax.train.step import AlternatingStep, partition
from offside_jax.unlearn import saliency

from llama_fixtures import make_reference, port
from test_dampening import batches as random_batches

LR = 1e-2


@pytest.fixture(scope="module")
def reference():
    return make_reference("qwen2", seed=5)


def torch_fisher(model, data):
    """Squared gradient of the batch-mean answer NLL, averaged over batches (HF names)."""
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in data:
        model.zero_grad()
        nll = torch_nll(model, b)
        nll.backward()
        for n, p in model.named_parameters():
            out[n] += p.grad.pow(2)
    return {n: (v / len(data)).numpy().astype(np.float64) for n, v in out.items()}


def torch_nll(model, b):
    ids = torch.from_numpy(b["input_ids"]).long()
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(b["attention_mask"]).long()).logits[:, :-1]
    answer = torch.from_numpy(b["loss_mask"][:, 1:] * b["attention_mask"][:, 1:]).bool()
    return -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0][answer].mean()


def as_hf(tree):
    """A pure dict of our params (or masks) -> HF-named numpy arrays (kernels transposed back)."""
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(tree):
        name, transposed = hf_name(tuple(getattr(p, "key", p) for p in path))
        value = np.asarray(value)
        out[name] = value.T if transposed else value
    return out


def test_masks_equal_the_fisher_ratio_rule(reference):
    model_t, config = reference
    forget, preserve = random_batches(0, n_batches=2), random_batches(1, n_batches=3)
    masks, report = saliency.saliency_masks(port(model_t, config), lambda: forget, lambda: preserve)
    f_forget, f_preserve = torch_fisher(model_t, forget), torch_fisher(model_t, preserve)
    got = as_hf(masks)
    assert set(got) == set(f_forget)
    targets = [n for n in got if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
    assert "model.layers.0.self_attn.q_proj.bias" in targets and len(targets) == 2 * (4 * 1 + 3) + 2 * 3  # kernels + q/k/v biases
    near_ties = 0
    for name, mask in got.items():
        if name not in targets:
            assert not mask.any(), f"{name} is not an attention/MLP projection: ascent must not move it"
            continue
        ratio = (f_forget[name] + 1e-15) / (f_preserve[name] + 1e-15)
        clear = np.abs(np.log(ratio)) > 1e-3  # leave float32-vs-float64 ties out
        near_ties += int((~clear).sum())
        np.testing.assert_array_equal(mask[clear], (ratio >= 1.0)[clear], err_msg=name)
        assert report.per_tensor[name.replace(".weight", ".kernel") if "proj.weight" in name else name] == int(mask.sum())
    total = sum(m.size for n, m in got.items() if n in targets)
    assert near_ties < 2e-3 * total  # ratios within 0.1% of the threshold: a handful of ~50k
    assert report.total == {"language": total} and 0 < report.selected["language"] < total
    # The official code's mask file holds only the projections: every other tensor ascends unmasked.
    official, _ = saliency.saliency_masks(port(model_t, config), lambda: forget, lambda: preserve, outside=True)
    for name, mask in as_hf(official).items():
        assert mask.all() if name not in targets else np.array_equal(mask, got[name]), name


def test_alternating_steps_mask_ascent_inside_the_jitted_step(reference):
    model_t, config = reference
    forget, retain = random_batches(2, n_batches=1)[0], random_batches(3, n_batches=1)[0]
    model = port(model_t, config)
    params0 = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # copies: the step donates
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda p: rng.random(p.shape) < 0.3, params0)
    masks["model"]["norm"]["weight"] = np.zeros_like(masks["model"]["norm"]["weight"])
    tx, schedule = optim.make_optimizer(OptimConfig(lr=LR, schedule="constant", max_grad_norm=None), 10)
    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    phases = {p.batch_key: (p.loss_fn, optax.chain(p.transform, tx)) for p in saliency.alternating_phases(masks)}
    step = AlternatingStep(partition(model), phases, mesh=mesh, schedule=schedule)
    state = step.init_state(0)
    kept = jax.tree.map(np.asarray, state.opt_state[0].mask)  # the masks live in the optimizer state
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(masks)))

    state, metrics = step(state, step.shard_batch({"forget": forget}))
    after_ascent = jax.tree.map(np.asarray, state.params)
    # Expected: Adam's first step on g = mask * grad(-NLL) is -lr * g / (|g| + eps).
    model_t.zero_grad()
    nll = torch_nll(model_t, forget)
    (-nll).backward()
    np.testing.assert_allclose(float(metrics["loss"]), -nll.item(), rtol=1e-5)
    grads = {n: p.grad.numpy().astype(np.float64) for n, p in model_t.named_parameters()}
    before, after, mask = as_hf(params0), as_hf(after_ascent), as_hf(masks)
    for name, old in before.items():
        g = mask[name] * grads[name]
        expected = old - LR * g / (np.abs(g) + 1e-8)
        # Where |g| is near Adam's eps the step's size hangs on the gradient's last digits.
        firm = np.abs(g) > 1e-6
        np.testing.assert_allclose(after[name][firm], expected[firm], atol=LR * 1e-3, rtol=0, err_msg=name)
        assert np.all(np.abs(after[name] - old) <= LR * (1 + 1e-3)), name
        np.testing.assert_array_equal(after[name][~mask[name]], old[~mask[name]])  # bitwise untouched

    state, metrics = step(state, step.shard_batch({"retain": retain}))
    after_retain = as_hf(jax.tree.map(np.asarray, state.params))
    norm = "model.norm.weight"
    assert np.array_equal(after[norm], before[norm]) and not np.allclose(after_retain[norm], before[norm])
    assert "retain_nll" in metrics
    with pytest.raises(ValueError, match="exactly one of"):
        step(state, step.shard_batch({"forget": forget, "retain": retain}))


def test_groups_of_a_vision_language_model():
    from qwen2_5_vl_fixtures import make_tokenizer, qwen2_5_vl_config

    from offside_jax.models.auto import create_model

    model = create_model(qwen2_5_vl_config(make_tokenizer()), abstract=True)
    groups = saliency.group_paths(model, saliency.SaliencyConfig())
    assert set(groups) == {"vision", "projector", "language"}
    assert "visual.blocks.1.attn.qkv.kernel" in groups["vision"] and "visual.blocks.0.mlp.up_proj.bias" in groups["vision"]
    assert not any("patch_embed" in p or "norm" in p for p in groups["vision"])  # not projections
    assert groups["projector"] == ["visual.merger.mlp.0.bias", "visual.merger.mlp.0.kernel",
                                   "visual.merger.mlp.2.bias", "visual.merger.mlp.2.kernel"]
    assert "model.layers.0.mlp.down_proj.kernel" in groups["language"]
    assert not any("embed" in p or "lm_head" in p for p in groups["language"])
    with pytest.raises(ValueError, match="no parameter matches"):
        saliency.group_paths(model, saliency.SaliencyConfig(targets=r"no_such_layer"))
    with pytest.raises(ValueError, match="no preserve data for saliency group"):
        saliency.saliency_masks(model, lambda: [], {"language": lambda: []})
