"""HF safetensors import/export: bitwise round trips, sharded placement, clear errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from offside_jax.models import hf

from conftest import needs_devices
from llama_fixtures import make_reference, torch_state_dict


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Qwen2 (biases) checkpoint saved by transformers in several shards with an index."""
    reference, config = make_reference("qwen2")
    directory = tmp_path_factory.mktemp("qwen2")
    reference.save_pretrained(directory, max_shard_size="40KB")
    return reference, config, directory


def test_transformers_checkpoint_is_sharded(saved):
    _, _, directory = saved
    assert (directory / hf.SAFE_INDEX).exists()
    assert len(list(directory.glob("*.safetensors"))) > 1


def test_load_then_export_reproduces_every_tensor_bitwise(saved, tmp_path):
    reference, _, directory = saved
    model = hf.load_pretrained(directory)
    out = hf.save_pretrained(model, hf.load_hf_config(directory), tmp_path / "export", max_shard_bytes=30_000)
    original = {}
    for f in directory.glob("*.safetensors"):
        original.update(load_file(f))
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(f))
    assert (out / hf.SAFE_INDEX).exists(), "export past max_shard_bytes writes an index"
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
        assert np.array_equal(exported[name], tensor), name
    # transformers itself loads the export and computes the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), reference(ids).logits.numpy())


def test_tied_export_has_no_lm_head(tmp_path):
    reference, config = make_reference("smollm2")
    from offside_jax.models.auto import create_model

    model = create_model(config, abstract=True)
    hf.load_params_into(model, hf.DictSource(torch_state_dict(reference)))
    out = hf.save_pretrained(model, config, tmp_path / "tied")
    names = set(load_file(out / hf.SAFE_SINGLE))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@needs_devices(8)
def test_sharded_placement_reads_each_device_slice(saved):
    reference, _, directory = saved
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor", "vocab": "tensor"}

    def sharding_fn(path, axes, shape):
        spec = [rules.get(a) if a is not None and shape[i] % mesh.shape[rules.get(a, "fsdp")] == 0 else None
                for i, a in enumerate(axes)]
        return NamedSharding(mesh, PartitionSpec(*spec))

    model = hf.load_pretrained(directory, sharding_fn=sharding_fn)
    kernel = model.model.layers[0].mlp.up_proj.kernel.get_value()
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (32, 24)
    expected = reference.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def _write_checkpoint(directory, tensors, config):
    directory.mkdir()
    save_file(tensors, str(directory / hf.SAFE_SINGLE), metadata={"format": "pt"})
    config.save_pretrained(directory)


def test_missing_tensor_is_named(tmp_path):
    reference, config = make_reference("llama3.1")
    tensors = torch_state_dict(reference)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    _write_checkpoint(tmp_path / "ckpt", tensors, config)
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        hf.load_pretrained(tmp_path / "ckpt")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    reference, config = make_reference("llama3.1")
    tensors = torch_state_dict(reference)
    tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
    _write_checkpoint(tmp_path / "ckpt", tensors, config)
    with pytest.raises(hf.CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 95\), expected \(64, 96\)"):
        hf.load_pretrained(tmp_path / "ckpt")


def test_truncated_safetensors_names_the_file(tmp_path):
    reference, config = make_reference("llama3.1")
    _write_checkpoint(tmp_path / "ckpt", torch_state_dict(reference), config)
    path = tmp_path / "ckpt" / hf.SAFE_SINGLE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        hf.load_pretrained(tmp_path / "ckpt")


def test_index_listing_a_missing_file_is_named(tmp_path):
    reference, config = make_reference("llama3.1")
    _write_checkpoint(tmp_path / "ckpt", torch_state_dict(reference), config)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "ckpt" / hf.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors: listed in"):
        hf.load_pretrained(tmp_path / "ckpt")
