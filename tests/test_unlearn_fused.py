"""Fused (chunked) sequence log-probs and answer NLLs inside the unlearning losses: values and
gradients equal the transformers model's full-logits computation (torch autograd), and every
loss gives the same value and gradients fused or from full logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from offside_jax.models.hf import hf_name
from offside_jax.train import losses as train_losses
from offside_jax.unlearn.losses import build_loss

from llama_fixtures import make_reference, port
from test_dampening import batches as random_batches


@pytest.fixture(scope="module")
def models():
    reference, config = make_reference("smollm2", seed=4)  # tied head: the embedding is the head
    model = port(reference, config)
    # The fused (chunked) path is what these tests check; without a plain head everything would
    # silently fall back to full logits and the comparisons would be vacuous.
    assert train_losses.output_head(model) is not None
    return reference, model


def test_fused_sequence_logprob_and_gradient_equal_torch(models):
    reference, model = models
    batch = random_batches(5, n_batches=1, rows=3, length=11)[0]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cotangent = np.array([0.5, -1.0, 2.0], np.float32)

    def weighted(p):
        m = nnx.merge(graphdef, p, rest)
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        return jnp.sum(train_losses.hidden_sequence_logprob(m, m.hidden_states(b), b, chunk_tokens=7) * cotangent)

    value, grads = jax.jit(jax.value_and_grad(weighted))(params)
    ids = torch.from_numpy(batch["input_ids"]).long()
    logits = reference(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]).long()).logits[:, :-1]
    picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    answer = torch.from_numpy(batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).float()
    reference.zero_grad()
    expected = ((picked * answer).sum(1) * torch.from_numpy(cotangent)).sum()
    expected.backward()
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    torch_grads = {n: p.grad.numpy() for n, p in reference.named_parameters()}
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        name, transposed = hf_name(tuple(getattr(k, "key", k) for k in path))
        g = np.asarray(g)
        np.testing.assert_allclose(g.T if transposed else g, torch_grads[name], atol=2e-5, rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("method,hp", [("npo", {}), ("npo", {"variant": "offside", "beta": 0.9}), ("dpo", {}),
                                       ("grad_diff", {})])
def test_losses_fused_equal_full_logits(models, method, hp):
    _, model = models
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    perturbed = jax.tree.map(lambda x: x * 1.01, params)  # the policy moved away from the reference
    data = random_batches(6, n_batches=4, rows=2, length=9)
    batch = {name: {k: jnp.asarray(v) for k, v in b.items()}
             for name, b in zip(("forget", "retain", "forget_alt", "forget_idk"), data)}

    def run(chunk):
        loss_fn = build_loss(method, chunk_tokens=chunk, **hp)

        def value(p):
            ref = nnx.merge(graphdef, params, rest)
            return loss_fn(nnx.merge(graphdef, p, rest), batch, None, ref)[0]

        return jax.jit(jax.value_and_grad(value))(perturbed)

    full_value, full_grads = run(0)
    fused_value, fused_grads = run(5)
    np.testing.assert_allclose(float(fused_value), float(full_value), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
