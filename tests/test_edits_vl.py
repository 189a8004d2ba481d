"""ROCR keys and curvature K-FAC factors on the Qwen2.5-VL decoder, against forward hooks on the
transformers model, for a left-padded batch whose rows hold images of different sizes."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from qwen2_5_vl_fixtures import RECORDS, make_tokenizer, port, qwen2_5_vl_config, vl_setup

from offside_jax.unlearn import curvature as cv
from offside_jax.unlearn import rocr


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    setup = vl_setup(qwen2_5_vl_config, tmp_path_factory)
    return setup.reference, setup.ours, setup.batch, setup.pixel_values, setup.grids


def torch_forward(reference, batch, pixel_values, grids, module, grad: bool):
    """Logits and the hooked module's (input, output); the output keeps its gradient."""
    seen = {}

    def hook(mod, args, out):
        if grad:
            out.retain_grad()
        seen["io"] = (args[0].detach(), out)

    handle = module.register_forward_hook(hook)
    ids = batch["input_ids"]
    with torch.set_grad_enabled(grad):
        logits = reference(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
            pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy((ids == reference.config.image_token_id).astype(np.int64)),
        ).logits
    handle.remove()
    return logits, seen["io"]


def test_subject_keys_on_the_vl_decoder_equal_torch_hooks(vl):
    reference, ours, batch, pixel_values, grids = vl
    index = np.array([batch["input_ids"].shape[1] - 3] * len(RECORDS), np.int32)
    got = rocr.subject_keys(ours, dict(batch, subject_index=index), [1])[1]
    module = reference.model.language_model.layers[1].mlp.down_proj
    _, (inputs, _) = torch_forward(reference, batch, pixel_values, grids, module, grad=False)
    expected = inputs.numpy()[np.arange(len(RECORDS)), index].mean(0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)


def test_gold_kfac_factors_on_the_vl_decoder_equal_explicit_outer_products(vl):
    reference, ours, batch, pixel_values, grids = vl
    target = (0, "mlp.up_proj")
    got = cv.kfac_factors(ours, [batch], (target,), labels="gold")[target]
    module = reference.model.language_model.layers[0].mlp.up_proj
    logits, (inputs, output) = torch_forward(reference, batch, pixel_values, grids, module, grad=True)
    mask = batch["attention_mask"]
    weights = np.zeros(mask.shape, np.float32)
    weights[:, :-1] = mask[:, :-1] * mask[:, 1:]
    labels = np.concatenate([batch["input_ids"][:, 1:], np.zeros_like(batch["input_ids"][:, :1])], axis=1)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(labels).long().flatten(),
                                            reduction="none")
    (nll * torch.from_numpy(weights).flatten()).sum().backward()
    keep = weights.reshape(-1) > 0
    a = inputs.numpy().reshape(-1, inputs.shape[-1])[keep].astype(np.float64)
    g = output.grad.numpy().reshape(-1, output.shape[-1])[keep].astype(np.float64)
    assert got.tokens == int(keep.sum())
    for ours_factor, explicit in ((got.activation, a.T @ a / len(a)), (got.gradient, g.T @ g / len(g))):
        np.testing.assert_allclose(np.asarray(ours_factor), explicit, rtol=1e-3, atol=1e-4 * np.abs(explicit).max())


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_request_batches_mark_the_subjects_last_token():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    request = rocr.request_batches(tokenizer, "Newcastle United", "the player")
    keys = request.key_batch
    assert keys["input_ids"].shape[0] == len(rocr.CONTEXT_PREFIXES)
    for batch, subject in ((keys, "Newcastle United"), (request.value_batch, "Newcastle United"),
                           (request.target_batch, "the player")):
        for ids, mask, index in zip(batch["input_ids"], batch["attention_mask"], batch[rocr.SUBJECT_INDEX]):
            real = ids[mask == 1].tolist()
            assert tokenizer.decode(real[:index + 1]).endswith(subject)
            assert tokenizer.decode(real[index + 1:]).startswith(".")
    assert "Tell me about Newcastle United." in tokenizer.decode(keys["input_ids"][4])


def test_apply_rocr_on_the_vl_decoder_edits_only_its_down_projections(vl):
    from flax import nnx

    from offside_jax.models.hf import path_to_str

    reference, _, _, _, _ = vl
    ours = port(reference)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    request = rocr.request_batches(tokenizer, "Newcastle United", "the player")
    cfg = rocr.RocrConfig(layers=(0, 1), l2=1e-4)
    width = ours.model.layers[0].mlp.down_proj.kernel.shape[0]
    before = {path_to_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    z_star = rocr.subject_value(ours, request.target_batch, 1)
    h_before = rocr.subject_value(ours, request.value_batch, 1)
    rocr.apply_rocr(ours, [request], {layer: jnp.eye(width) for layer in cfg.layers}, cfg)
    after = {path_to_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["model.layers.0.mlp.down_proj.kernel", "model.layers.1.mlp.down_proj.kernel"]
    h_after = rocr.subject_value(ours, request.value_batch, 1)
    assert float(jnp.linalg.norm(h_after - z_star)) < 0.05 * float(jnp.linalg.norm(h_before - z_star))
