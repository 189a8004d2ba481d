"""The Llama-family port equals transformers (PyTorch, fp32) on tiny random-init models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offside_jax.models.generate import SamplingConfig, generate, left_pad
from offside_jax.models.llama import DecoderConfig, positions_from_mask

from llama_fixtures import TINY_CONFIGS, make_reference, port


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    reference, config = make_reference(request.param)
    return request.param, reference, config, port(reference, config)


def mixed_batch(vocab: int, long_len: int = 600, short_len: int = 37, seed: int = 0):
    """A 600-token prompt beside a left-padded short one."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, long_len)).astype(np.int32)
    mask = np.ones((2, long_len), np.int32)
    mask[1, : long_len - short_len] = 0
    ids[1, : long_len - short_len] = 0
    return ids, mask


def test_logits_match_transformers(pair):
    name, reference, config, ours = pair
    ids, mask = mixed_batch(config.vocab_size)
    # transformers' plain forward numbers positions 0..T-1 regardless of padding; generation
    # numbers only real tokens. We follow generation, so pass the same positions explicitly.
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        ).logits.numpy()
    got = np.asarray(ours(ids, mask))
    valid = mask.astype(bool)
    assert got.shape == expected.shape
    assert np.abs(got - expected)[valid].max() <= 1e-4, name


def test_config_reads_every_architectural_number():
    config = TINY_CONFIGS["llama3.1"]()
    ours = DecoderConfig.from_hf(config)
    assert ours.rope["rope_theta"] == 50_000.0 and ours.rope["rope_type"] == "llama3"
    assert (ours.num_key_value_heads, ours.head_dim) == (2, 16)
    qwen3 = DecoderConfig.from_hf(TINY_CONFIGS["qwen3"]())
    assert qwen3.qk_norm and qwen3.head_dim == 24 and not qwen3.qkv_bias
    qwen2 = DecoderConfig.from_hf(TINY_CONFIGS["qwen2"]())
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert DecoderConfig.from_hf(TINY_CONFIGS["smollm2"]()).tie_word_embeddings


def test_unknown_model_type_names_supported_ones():
    from offside_jax.models.auto import create_model

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama.*qwen2.*qwen3"):
        create_model({"model_type": "gpt2"})


def _reference_generate(reference, inputs, max_new_tokens, eos):
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.from_numpy(inputs["input_ids"]).long(),
            attention_mask=torch.from_numpy(inputs["attention_mask"]).long(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def test_greedy_generation_matches_transformers(pair):
    name, reference, config, ours = pair
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, config.vocab_size, n)) for n in (23, 6, 14)]
    inputs = left_pad(prompts, pad_id=0)
    # Pick as EOS a token that row 0 produces mid-way (without any EOS), so EOS stops are
    # exercised: row 0 must stop there and be padded after it.
    free_run = _reference_generate(reference, inputs, 24, eos=[config.vocab_size + 10])
    eos = int(free_run[0, 5])
    expected = _reference_generate(reference, inputs, 24, eos=[eos])
    out = generate(ours, inputs, SamplingConfig(max_new_tokens=24, eos_token_ids=(eos,), pad_token_id=0))
    width = expected.shape[1]  # transformers stops early once every row is done
    np.testing.assert_array_equal(out.tokens[:, :width], expected, err_msg=name)
    assert (out.tokens[:, width:] == 0).all()
    first_eos = int(np.argmax(expected[0] == eos))
    assert out.lengths[0] == first_eos + 1 and (out.tokens[0, first_eos + 1:] == 0).all()


def test_bfloat16_params_and_compute_track_float32(pair):
    """bf16 is for accelerators; here we check it runs end to end (prefill, decode, logits)
    and stays close to the fp32 reference: bf16 carries ~3 significant digits."""
    import jax.numpy as jnp

    from offside_jax.models import hf
    from offside_jax.models.auto import create_model

    name, reference, config, ours = pair
    bf16 = create_model(config, dtype="bfloat16", param_dtype="bfloat16", abstract=True)
    hf.load_params_into(bf16, hf.DictSource(hf.state_dict(ours)))
    assert bf16.model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    ids, mask = mixed_batch(config.vocab_size, long_len=64, short_len=20)
    full = np.asarray(ours(ids, mask))
    half = np.asarray(bf16(ids, mask))
    assert half.dtype == np.float32  # logits are accumulated and returned in fp32
    valid = mask.astype(bool)
    scale = np.abs(full[valid]).max()
    assert np.abs(half - full)[valid].max() <= 0.05 * scale, name
    agree = (half.argmax(-1) == full.argmax(-1))[valid].mean()
    assert agree > 0.9, name
    out = generate(bf16, left_pad([[5, 6, 7]], pad_id=0), SamplingConfig(max_new_tokens=4))
    assert out.tokens.shape == (1, 4)
