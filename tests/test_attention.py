"""The one attention function: every implementation that runs on CPU against a float64 numpy
reference (padded GQA batches, sliding windows, packed segments, prefill and decode over a
KV cache), and the choice of implementation per platform and shape."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offside_jax.models import attention as attn

B, T, H, KV, D = 3, 256, 4, 2, 16


def numpy_attention(q, k, v, allowed, scale):
    """softmax(q k^T * scale) v per head in float64; KV head j serves query heads j*G..(j+1)*G-1;
    ``allowed`` [B, T, S]. Rows with nothing allowed are left at 0 (callers ignore them)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for i in range(b):
        for head in range(h):
            scores = q[i, :, head] @ k[i, :, head // g].T * scale
            scores = np.where(allowed[i], scores, -np.inf)
            live = allowed[i].any(-1)
            probs = np.zeros_like(scores)
            probs[live] = np.exp(scores[live] - scores[live].max(-1, keepdims=True))
            probs[live] /= probs[live].sum(-1, keepdims=True)
            out[i, :, head] = probs @ v[i, :, head // g]
    return out.reshape(b, t, h * d)


def allowed_mask(valid, causal=True, window=None, segments=None):
    t = valid.shape[1]
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    rule = np.ones((t, t), bool)
    if causal:
        rule &= ki <= qi
    if window is not None:
        rule &= qi - ki < window
    allowed = rule[None] & valid[:, None, :]
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed


def padded_batch(seed=0, t=T):
    """q, k, v and a [B, T] validity with a left-padded, a right-padded and a both-sided row."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, H, D)).astype(np.float32)
    k = rng.normal(size=(B, t, KV, D)).astype(np.float32)
    v = rng.normal(size=(B, t, KV, D)).astype(np.float32)
    pos = np.arange(t)
    valid = np.stack([pos >= 37, pos < t - 50, (pos >= 11) & (pos < t - 90)])
    return q, k, v, valid


def run(impl, q, k, v, valid, spec, segments=None):
    seg = None if segments is None else jnp.asarray(segments)
    if impl == "xla":
        return attn.attention(q, k, v, spec, query_slots=jnp.arange(q.shape[1]), key_valid=jnp.asarray(valid),
                              segment_ids=seg)
    if impl == "lengths":  # the cuDNN path's bookkeeping through JAX's XLA reference of the same contract
        return attn._cudnn_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid), spec, seg,
                                     implementation="xla")
    return attn._splash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid), spec, seg,
                                  interpret=True)


def assert_close_on_real_tokens(out, expected, valid, tol=1e-5):
    out = np.asarray(out, np.float64)
    rows = np.asarray(valid, bool)
    np.testing.assert_allclose(out[rows], expected[rows], atol=tol, rtol=tol)
    assert np.isfinite(out).all(), "outputs on padding must stay finite"


@pytest.mark.parametrize("impl", ["xla", "lengths", "splash"])
@pytest.mark.parametrize("window", [None, 24])
def test_causal_padded_gqa_matches_numpy(impl, window):
    q, k, v, valid = padded_batch()
    spec = attn.AttentionSpec(scale=D**-0.5, sliding_window=window)
    expected = numpy_attention(q, k, v, allowed_mask(valid, window=window), spec.scale)
    assert_close_on_real_tokens(run(impl, q, k, v, valid, spec), expected, valid)


@pytest.mark.parametrize("impl", ["xla", "lengths", "splash"])
def test_packed_segments_match_numpy(impl):
    q, k, v, _ = padded_batch(seed=1)
    valid = np.ones((B, T), bool)
    valid[1, -40:] = False  # a packed row with right padding after its last segment
    segments = np.zeros((B, T), np.int32)
    segments[:, 100:] = 1
    segments[:, 180:] = 2
    spec = attn.AttentionSpec(scale=D**-0.5)
    expected = numpy_attention(q, k, v, allowed_mask(valid, segments=segments), spec.scale)
    assert_close_on_real_tokens(run(impl, q, k, v, valid, spec, segments), expected, valid)


@pytest.mark.parametrize("impl", ["xla", "lengths", "splash"])
def test_non_causal_groups_match_numpy(impl):
    """The vision tower's case: full attention inside right-padded groups."""
    q, k, v, _ = padded_batch(seed=2, t=128)
    valid = np.arange(128)[None, :] < np.array([[128], [70], [5]])
    spec = attn.AttentionSpec(scale=0.3, causal=False)
    expected = numpy_attention(q, k, v, allowed_mask(valid, causal=False), spec.scale)
    assert_close_on_real_tokens(run(impl, q, k, v, valid, spec), expected, valid)


@pytest.mark.parametrize("impl", ["lengths", "splash"])
def test_kernel_gradients_match_xla(impl):
    """The backward pass of each kernel path (rotation included) equals XLA's on real tokens."""
    q, k, v, valid = padded_batch(seed=3, t=128)
    spec = attn.AttentionSpec(scale=D**-0.5, sliding_window=40)
    weights = np.random.default_rng(4).normal(size=(B, 128, H * D)) * valid[..., None]

    def loss(impl_name, q, k, v):
        return jnp.sum(run(impl_name, q, k, v, valid, spec) * weights)

    expected = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-5, rtol=1e-4, err_msg=name)


def test_decode_over_left_padded_cache_matches_numpy():
    """Prefill then one decode step over a cache: the XLA path's slot arithmetic."""
    rng = np.random.default_rng(5)
    s, prompt = 12, 7
    pad = np.array([0, 3, 5])
    valid = np.zeros((B, s), bool)
    for i, p in enumerate(pad):
        valid[i, p:prompt + 1] = True  # the prompt's real tokens and the token decoded at slot `prompt`
    k = rng.normal(size=(B, s, KV, D)).astype(np.float32)
    v = rng.normal(size=(B, s, KV, D)).astype(np.float32)
    q = rng.normal(size=(B, 1, H, D)).astype(np.float32)
    spec = attn.AttentionSpec(scale=D**-0.5, cached=True, sliding_window=5)
    out = attn.attention(q, k, v, spec, query_slots=jnp.array([prompt]), key_valid=jnp.asarray(valid))
    allowed = valid[:, None, :] & (np.arange(s) <= prompt) & (prompt - np.arange(s) < 5)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, allowed, spec.scale), atol=1e-5)


# -- the choice of implementation --------------------------------------------------------------

Q, K = (2, 512, 8, 64), (2, 512, 2, 64)


def choose(requested, platform, q=Q, k=K, dtype=jnp.bfloat16, **spec):
    return attn.choose_implementation(requested, platform, q, k, dtype, attn.AttentionSpec(scale=0.1, **spec))


def test_auto_picks_the_platform_kernel_when_its_constraints_hold():
    assert choose("auto", "gpu") == "cudnn"
    assert choose("auto", "tpu") == "splash"
    assert choose("auto", "cpu") == "xla"
    assert choose("xla", "gpu") == "xla"
    assert choose("auto", "gpu", sliding_window=128) == "cudnn"
    assert choose("auto", "gpu", causal=False) == "cudnn"


@pytest.mark.parametrize("requested, platform, kwargs, reason", [
    ("auto", "gpu", dict(dtype=jnp.float32), "bf16/fp16"),
    ("auto", "gpu", dict(q=(2, 512, 8, 256), k=(2, 512, 2, 256)), "head_dim"),
    ("auto", "gpu", dict(cached=True), "KV cache"),
    ("auto", "gpu", dict(q=(2, 1, 8, 64)), "KV cache"),
    ("auto", "tpu", dict(q=(2, 200, 8, 64), k=(2, 200, 2, 64)), "multiple of 128"),
    ("cudnn", "cpu", {}, "needs a GPU"),
    ("splash", "gpu", {}, "needs a TPU"),
])
def test_unmet_constraints_fall_back_to_xla_with_the_reason_logged_once(requested, platform, kwargs, reason, caplog):
    attn._log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger=attn.log.name):
        assert choose(requested, platform, **kwargs) == "xla"
        assert choose(requested, platform, **kwargs) == "xla"
    messages = [r for r in caplog.records if reason in r.getMessage()]
    assert len(messages) == 1, [r.getMessage() for r in caplog.records]
    expected_level = logging.DEBUG if requested == "auto" else logging.WARNING
    assert messages[0].levelno == expected_level


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="flash"):
        choose("flash", "gpu")


def test_llama_through_the_kernel_path_equals_xla(monkeypatch):
    """A whole decoder (GQA, sliding-window layers, left-padded rows) through the cuDNN path's
    rotation and length bookkeeping gives the XLA path's logits on real tokens."""
    from transformers import Qwen2Config

    from offside_jax.models import llama

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, use_sliding_window=True,
                      sliding_window=9, max_window_layers=1, layer_types=["full_attention", "sliding_attention"])
    ids = np.random.default_rng(6).integers(0, 97, (2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :13] = 0  # left padding
    mask[1, 31:] = 0  # right padding
    reference = np.asarray(llama.create(cfg, attention="xla")(ids, mask))
    monkeypatch.setattr(attn, "choose_implementation", lambda *a, **k: "cudnn")
    real = attn._cudnn_attention
    monkeypatch.setattr(attn, "_cudnn_attention", lambda *a: real(*a, implementation="xla"))
    got = np.asarray(llama.create(cfg, attention="cudnn")(ids, mask))
    rows = mask.astype(bool)
    np.testing.assert_allclose(got[rows], reference[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_on_gpu_matches_xla_in_bf16(window):
    """The real kernel: values and gradients against the XLA path in float32 on the same bf16 inputs."""
    q, k, v, valid = padded_batch(seed=7)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    spec = attn.AttentionSpec(scale=D**-0.5, sliding_window=window, implementation="cudnn")
    weights = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, H * D)) * valid[..., None], jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    def kernel(q, k, v):
        assert attn.choose_implementation("cudnn", "gpu", q.shape, k.shape, q.dtype, spec) == "cudnn"
        return attn.attention(q, k, v, spec, query_slots=jnp.arange(T), key_valid=jnp.asarray(valid))

    def reference(q, k, v):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return attn.grouped_attention(q, k, v, attn.attention_mask_for(jnp.arange(T), jnp.asarray(valid), window),
                                      spec.scale)

    rows = valid.astype(bool)
    out, expected = np.asarray(kernel(q, k, v), np.float32), np.asarray(reference(q, k, v))
    assert np.linalg.norm(out[rows] - expected[rows]) / np.linalg.norm(expected[rows]) < 1e-2
    got = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2


def test_flash_remat_policy_keeps_gradients(monkeypatch):
    """Remat with the "flash" policy (saving kernel residuals and weight matmuls) gives the
    same gradients as no remat, through the XLA path and through the kernel path."""
    from flax import nnx
    from transformers import LlamaConfig

    from offside_jax.models import llama

    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=3000.0)
    ids = np.random.default_rng(9).integers(0, 61, (2, 128)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :20] = 0

    def grads(remat, impl):
        model = llama.create(cfg, remat=remat, attention=impl)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(ids, mask)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

        return jax.grad(loss)(params)

    expected = grads(False, "xla")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads("flash", "xla"), expected)
    # Through the kernel path (its named residuals saved by the policy); splash's own backward
    # is checked against XLA's in test_kernel_gradients_match_xla.
    real = attn._cudnn_attention
    monkeypatch.setattr(attn, "choose_implementation", lambda *a, **k: "cudnn")
    monkeypatch.setattr(attn, "_cudnn_attention", lambda *a: real(*a, implementation="xla"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads("flash", "cudnn"), expected)
