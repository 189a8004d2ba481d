"""The Qwen2.5-VL / Qwen2-VL port equals transformers (PyTorch, fp32) on tiny random-init
models: vision tower, M-RoPE positions, logits of a padded batch mixing one-image, text-only
and two-image rows, greedy generation; HF weight I/O in both key layouts."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from offside_jax.models import hf, qwen2_5_vl
from offside_jax.models.auto import create_model
from offside_jax.models.generate import SamplingConfig, generate
from offside_jax.train import mesh as mesh_lib

from conftest import needs_devices
from qwen2_5_vl_fixtures import (
    qwen2_5_vl_config, qwen2_vl_config,
    reference_forward, torch_state_dict, vl_setup,
)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    return vl_setup(qwen2_5_vl_config, tmp_path_factory)


def test_batch_mixes_padding_text_only_rows_and_images_of_different_sizes(vl):
    mask = vl.batch["attention_mask"]
    assert not mask[:, 0].all() and mask[:, -1].all(), "left padding"
    image_tokens = (vl.batch["input_ids"] == vl.config.image_token_id).sum(1)
    assert image_tokens[1] == 0 and image_tokens[0] > 0 and image_tokens[2] > 0
    assert len(vl.grids) == 3 and len({tuple(g) for g in vl.grids.tolist()}) == 3
    assert vl.batch["vision_window_groups"].shape[1] > 1, "several windows per image"


def test_vision_tower_matches_transformers(vl):
    grid = torch.from_numpy(vl.grids)
    with torch.no_grad():
        expected = vl.reference.model.visual(torch.from_numpy(vl.pixel_values), grid_thw=grid).pooler_output.numpy()
    layout = qwen2_5_vl.vision_layout(vl.grids, vl.ours.vl_config.vision)
    got = np.asarray(vl.ours.image_features(vl.pixel_values, **layout))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


def test_mrope_positions_match_get_rope_index(vl):
    ids = torch.from_numpy(vl.batch["input_ids"]).long()
    expected, _ = vl.reference.model.get_rope_index(
        ids, (ids == vl.config.image_token_id).long(), torch.from_numpy(vl.grids),
        attention_mask=torch.from_numpy(vl.batch["attention_mask"]),
    )
    np.testing.assert_array_equal(vl.batch["positions"], expected.numpy().transpose(1, 0, 2))


def test_logits_match_transformers(vl):
    expected = reference_forward(vl.reference, vl.batch, vl.pixel_values, vl.grids)
    got = np.asarray(vl.ours(**vl.batch))
    valid = vl.batch["attention_mask"].astype(bool)
    assert got.shape == expected.shape
    assert np.abs(got - expected)[valid].max() <= 1e-4
    # Not vacuous: the images reach the logits of the rows that hold them.
    blank = dict(vl.batch, pixel_values=np.zeros_like(vl.batch["pixel_values"]))
    changed = np.abs(np.asarray(vl.ours(**blank)) - got)[valid]
    assert changed.max() > 1e-2


def _reference_generate(vl, max_new_tokens, eos):
    ids = vl.batch["input_ids"]
    with torch.no_grad():
        out = vl.reference.generate(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(vl.batch["attention_mask"]).long(),
            pixel_values=torch.from_numpy(vl.pixel_values), image_grid_thw=torch.from_numpy(vl.grids),
            mm_token_type_ids=torch.from_numpy((ids == vl.config.image_token_id).astype(np.int64)),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
        )
    return out[:, ids.shape[1]:].numpy()


def test_greedy_generation_with_images_matches_transformers(vl):
    # An EOS that row 0 produces mid-way: row 0 must stop there, the others go on.
    free_run = _reference_generate(vl, 12, eos=[vl.config.text_config.vocab_size + 5])
    eos = int(free_run[0, 4])
    expected = _reference_generate(vl, 12, eos=[eos])
    out = generate(vl.ours, vl.batch, SamplingConfig(max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=0))
    width = expected.shape[1]
    np.testing.assert_array_equal(out.tokens[:, :width], expected)
    first = int(np.argmax(expected[0] == eos))
    assert out.lengths[0] == first + 1 and (out.tokens[0, first + 1:] == 0).all()


def test_qwen2_vl_matches_transformers(tmp_path_factory):
    q2 = vl_setup(qwen2_vl_config, tmp_path_factory)
    assert "vision_window_groups" not in q2.batch
    expected = reference_forward(q2.reference, q2.batch, q2.pixel_values, q2.grids)
    got = np.asarray(q2.ours(**q2.batch))
    valid = q2.batch["attention_mask"].astype(bool)
    assert np.abs(got - expected)[valid].max() <= 1e-4


# -- weight I/O --------------------------------------------------------------------------------


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert b[name].dtype == t.dtype and b[name].shape == t.shape and np.array_equal(b[name], t), name


def test_saved_layout_round_trip_is_bitwise_and_transformers_reads_the_export(vl, tmp_path):
    vl.reference.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    original = _tensors(tmp_path / "hf")
    assert "visual.blocks.0.attn.qkv.weight" in original and "model.layers.0.self_attn.q_proj.bias" in original
    model = hf.load_pretrained(tmp_path / "hf")
    out = hf.save_pretrained(model, hf.load_hf_config(tmp_path / "hf"), tmp_path / "export", max_shard_bytes=300_000)
    _assert_bitwise(original, _tensors(out))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    for name, t in vl.reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t), name


def test_in_memory_layout_round_trip_is_bitwise(vl, tmp_path):
    tensors = torch_state_dict(vl.reference)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in tensors and "model.visual.merger.mlp.0.weight" in tensors
    (tmp_path / "mem").mkdir()
    save_file(tensors, str(tmp_path / "mem" / hf.SAFE_SINGLE), metadata={"format": "pt"})
    vl.config.save_pretrained(tmp_path / "mem")
    model = hf.load_pretrained(tmp_path / "mem")
    out = hf.save_pretrained(model, vl.config, tmp_path / "export", names=qwen2_5_vl.in_memory_names)
    _assert_bitwise(tensors, _tensors(out))


def test_tied_embeddings_export_without_lm_head(vl, tmp_path):
    config = qwen2_5_vl_config(vl.tokenizer)
    config.tie_word_embeddings = True  # as Qwen2.5-VL-3B
    tensors = torch_state_dict(vl.reference)
    del tensors["lm_head.weight"]
    model = create_model(config, abstract=True)
    hf.load_params_into(model, hf.DictSource(tensors), names=qwen2_5_vl.hf_names)
    assert model.lm_head is None
    out = hf.save_pretrained(model, config, tmp_path / "tied")
    names = set(_tensors(out))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    again = hf.load_pretrained(out)
    _assert_bitwise(hf.state_dict(model, qwen2_5_vl.hf_names), hf.state_dict(again, qwen2_5_vl.hf_names))


@needs_devices(8)
def test_sharded_placement_reads_each_device_slice(vl, tmp_path):
    vl.reference.save_pretrained(tmp_path / "hf")
    mesh = mesh_lib.make_mesh((1, 2, 4))
    model = hf.load_pretrained(tmp_path / "hf", sharding_fn=mesh_lib.sharding_fn(mesh))
    expected = vl.reference.state_dict()
    for kernel, name in [
        (model.visual.blocks[0].mlp.up_proj.kernel, "model.visual.blocks.0.mlp.up_proj.weight"),
        (model.model.layers[1].mlp.gate_proj.kernel, "model.language_model.layers.1.mlp.gate_proj.weight"),
    ]:
        value = kernel.get_value()
        assert value.sharding.spec == PartitionSpec("fsdp", "tensor")
        assert len(value.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(value), expected[name].numpy().T)
