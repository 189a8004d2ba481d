"""DPO pairs' log-probabilities on a tiny random-init Llama against numpy on PyTorch's logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from llama_fixtures import make_reference, port

from offside_jax.correct import preference
from offside_jax.correct.chars import CharTokenizer
from offside_jax.correct.records import PreferenceRecord, preference_batch
from offside_jax.train import losses

RECORDS = [
    PreferenceRecord("Which club? A. Inter B. Roma", "It is ## A ##", "Maybe ## B ##"),
    PreferenceRecord("478+256=", "answer 734", "answer 724 because I forgot the carry"),
    PreferenceRecord("q", "x", "yy"),
]


@pytest.fixture(scope="module")
def setup():
    torch_policy, config = make_reference("llama3.1", seed=0)
    torch_reference, _ = make_reference("llama3.1", seed=1)
    policy, reference = port(torch_policy, config), port(torch_reference, config)
    assert losses.output_head(policy) is not None  # the fused per-row path is the one under test
    tok = CharTokenizer.for_texts(r.prompt + r.chosen + r.rejected for r in RECORDS)
    batch = preference_batch(RECORDS, tok)
    return (torch_policy, torch_reference), (policy, reference), batch


def numpy_answer_logprobs(torch_model, batch):
    """Summed log p(answer token | prefix) per row, in float64 from PyTorch's logits."""
    with torch.no_grad():
        logits = torch_model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                             attention_mask=torch.from_numpy(batch["attention_mask"]).long()).logits.double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ids = batch["input_ids"]
    picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    weights = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    return (picked * weights).sum(1)


def test_batch_layout(setup):
    _, _, batch = setup
    n = len(RECORDS)
    assert batch["input_ids"].shape[0] == 2 * n
    answer_tokens = batch["loss_mask"].sum(1)
    assert answer_tokens.tolist() == [len(r.chosen) + 1 for r in RECORDS] + [len(r.rejected) + 1 for r in RECORDS]


def test_pair_logratios_equal_numpy(setup):
    (torch_policy, torch_reference), (policy, reference), batch = setup
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    stats = jax.tree.map(np.asarray, preference.pair_logratios(policy, jbatch, reference, chunk_tokens=5))
    n = len(RECORDS)
    lp, ref = numpy_answer_logprobs(torch_policy, batch), numpy_answer_logprobs(torch_reference, batch)
    np.testing.assert_allclose(stats["chosen_logp"], lp[:n], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["rejected_logp"], lp[n:], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["logp_diff"], lp[:n] - lp[n:], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["margin"], (lp[:n] - ref[:n]) - (lp[n:] - ref[n:]), rtol=1e-5, atol=2e-4)
    assert np.all(np.abs(stats["margin"]) > 1e-3)  # two different models: the check is not vacuous


def test_scl_dpo_loss_equals_numpy(setup):
    (torch_policy, torch_reference), (policy, reference), batch = setup
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_fn = preference.make_scl_dpo_loss(beta=0.1, sft_beta=0.1, chunk_tokens=4)
    total, weight, aux = loss_fn(policy, jbatch, jax.random.key(0), reference)
    n = len(RECORDS)
    lp, ref = numpy_answer_logprobs(torch_policy, batch), numpy_answer_logprobs(torch_reference, batch)
    margin = (lp[:n] - ref[:n]) - (lp[n:] - ref[n:])
    dpo = np.log1p(np.exp(-0.1 * margin))  # -log sigmoid
    nll = -lp[:n] / np.array([len(r.chosen) + 1 for r in RECORDS])
    np.testing.assert_allclose(float(total), np.sum(dpo + 0.1 * nll), rtol=1e-5)
    assert float(weight) == n
    np.testing.assert_allclose(float(aux["pair_accuracy"]), np.mean(margin > 0))
    with pytest.raises(ValueError, match="reference"):
        loss_fn(policy, jbatch, jax.random.key(0), None)


def test_same_model_as_reference_gives_zero_margin(setup):
    _, (policy, _), batch = setup
    stats = preference.pair_logratios(policy, {k: jnp.asarray(v) for k, v in batch.items()}, policy)
    np.testing.assert_allclose(np.asarray(stats["margin"]), 0.0, atol=1e-5)


def test_scl_dpo_gradient_equals_torch(setup):
    """The loss differentiates through the fused per-row log-probs; the reference gets none."""
    from flax import nnx

    from offside_jax.models.hf import hf_name

    (torch_policy, torch_reference), (policy, reference), batch = setup
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_fn = preference.make_scl_dpo_loss(beta=0.1, sft_beta=0.1, chunk_tokens=4)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), jbatch, jax.random.key(0), reference)[0]))(params)

    def torch_logprobs(model):
        ids = torch.from_numpy(batch["input_ids"]).long()
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]).long()).logits[:, :-1]
        picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (picked * torch.from_numpy(batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).float()).sum(1)

    n = len(RECORDS)
    with torch.no_grad():
        ref = torch_logprobs(torch_reference)
    torch_policy.zero_grad()
    lp = torch_logprobs(torch_policy)
    margin = (lp[:n] - ref[:n]) - (lp[n:] - ref[n:])
    tokens = torch.tensor([len(r.chosen) + 1.0 for r in RECORDS])
    (-torch.nn.functional.logsigmoid(0.1 * margin) + 0.1 * (-lp[:n] / tokens)).sum().backward()
    torch_grads = {name: p.grad.numpy() for name, p in torch_policy.named_parameters()}
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        name, transposed = hf_name(tuple(getattr(k, "key", k) for k in path))
        g = np.asarray(g)
        np.testing.assert_allclose(g.T if transposed else g, torch_grads[name], atol=2e-5, rtol=1e-3, err_msg=name)
