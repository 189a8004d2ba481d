"""FLOPs, MFU and the decode roofline against hand computations; the GPU benchmark's code
path on CPU with a tiny model."""
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import LlamaConfig

from offside_jax.models.auto import create_model
from offside_jax.models.llama import count_params
from offside_jax.train import perf

TINY = perf.TransformerShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32)


def test_training_flops_of_a_tiny_shape_by_hand():
    # Per layer: q 8x8, k 8x4, v 8x4, o 8x8 -> 192; gate/up/down 3 x 8x16 -> 384; total 576.
    # Matmul weights: 2 layers x 576 + head 32 x 8 = 1408. Batch 3 x seq 5 = 15 tokens.
    flops = perf.training_flops(TINY, batch=3, seq=5)
    assert flops["weights"] == 6 * 1408 * 15 == 126_720
    # Attention: 12 x L 2 x H 2 x hd 4 x S^2 25 x B 3 = 14,400 non-causal; causal halves it.
    assert flops["attention"] == 7_200
    assert flops["total"] == 133_920
    assert perf.training_flops(TINY, batch=3, seq=5, causal=False)["attention"] == 14_400


def maxtext_style_flops(L, d, H, K, hd, ff, V, B, S):
    """MaxText's calculate_tflops_training_per_device, term by term (SwiGLU: 2 input matmuls)."""
    ffn = 2 * B * S * ff * d * 2 + 2 * B * S * ff * d
    qkv = 2 * B * S * d * (H + 2 * K) * hd
    projection = 2 * B * S * d * H * hd
    embedding = 2 * B * S * d * V
    causal_attention = 4 * B * S * S * H * hd / 2
    return ((ffn + qkv + projection) * L + embedding) * 3 + causal_attention * L * 3


def test_training_flops_equal_maxtexts_term_by_term_count():
    config = dict(L=30, d=576, H=9, K=3, hd=64, ff=1536, V=49152)
    shape = perf.TransformerShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                                  tied_embeddings=True)
    for batch, seq in [(8, 128), (1, 2048)]:
        assert perf.training_flops(shape, batch, seq)["total"] == pytest.approx(maxtext_style_flops(**config, B=batch, S=seq), rel=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_param_counts_match_the_model(tied):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tied)
    shape = perf.TransformerShape.from_hf(config)
    assert shape.params == count_params(create_model(config, abstract=True))
    # Matmul weights: everything but the norms and the input embedding (the head counts once).
    assert shape.matmul_params == shape.params - (2 * 3 + 1) * 32 - (0 if tied else 96 * 32)


def test_smollm2_135m_has_its_published_parameter_count():
    shape = perf.TransformerShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                                  vocab=49152, tied_embeddings=True)
    assert shape.params == 134_515_008


def test_mfu_by_hand():
    assert perf.mfu(2e12, 0.5, 1e12, devices=2) == pytest.approx(2.0)  # 4e12 FLOP/s on 2e12 of peak
    assert perf.mfu(989e12 * 0.25, 1.0, 989e12) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        perf.mfu(1.0, 0.0, 1e12)


def test_kv_cache_bytes_equal_the_models_cache():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2)
    model = create_model(config, seed=0)
    cache = model.init_cache(batch=5, length=24)
    nbytes = sum(x.nbytes for x in cache.keys + cache.values)
    assert perf.kv_cache_bytes(perf.TransformerShape.from_hf(config), 5, 24, bytes_per_value=4) == nbytes


def test_decode_roofline_by_hand():
    # 3 GB of weights + 1 GB of cache in 2 ms: 2,000 GB/s achieved, half of a 4,000 GB/s device.
    roof = perf.decode_roofline(3_000_000_000, 1_000_000_000, 0.002, 4e12, batch=16)
    assert roof.achieved_bandwidth == pytest.approx(2e12)
    assert roof.fraction == pytest.approx(0.5)
    assert roof.tokens_per_second == pytest.approx(8000.0)
    assert roof.bound_tokens_per_second == pytest.approx(16 * 4e12 / 4e9)  # 1 ms per step at the bound
    assert roof.as_dict()["bytes_read_per_step"] == 4_000_000_000


def test_peak_tables_know_the_devices_jax_names():
    assert perf.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert perf.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert perf.peak_bf16_flops("NVIDIA H200") == 989e12
    assert perf.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert perf.peak_bf16_flops("TPU v4") == 275e12
    assert perf.peak_bf16_flops("TPU v5 lite") == 197e12
    assert perf.peak_bf16_flops("TPU v5p") == 459e12
    assert perf.peak_bf16_flops("cpu") is None
    assert perf.peak_hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert perf.peak_hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12


# -- scripts/bench.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("offside_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_WORKERS = ("gpu-train-ours", "gpu-npo-ours", "gpu-ssd-ours", "gpu-vl-ours", "gpu-decode-ours")
TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("name", GPU_WORKERS)
def test_gpu_benchmarks_skip_with_a_note_without_a_gpu(bench, name):
    assert jax.devices()[0].platform == "cpu"
    assert "no GPU" in bench.WORKERS[name]({})["skipped"]


def test_gpu_benchmark_batches_pad_and_pack_as_described(bench):
    import bench_gpu

    left = bench_gpu._token_batch(4, 64, 100, "left", seed=3)
    for mask, pos in zip(left["attention_mask"], left["positions"]):
        pad = int((mask == 0).sum())
        assert pad < 16 and mask[:pad].sum() == 0 and mask[pad:].all()
        np.testing.assert_array_equal(pos[pad:], np.arange(64 - pad))
    packed = bench_gpu._token_batch(3, 64, 100, "packed", seed=4)
    for seg, pos in zip(packed["segment_ids"], packed["positions"]):
        assert sorted(set(seg.tolist())) == [0, 1, 2, 3] and (np.diff(seg) >= 0).all()
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert (pos[starts] == 0).all() and pos[0] == 0
    assert packed["attention_mask"].all()


def test_gpu_train_and_decode_code_paths_on_cpu_with_a_tiny_model(bench):
    import bench_gpu

    common = {"allow_cpu": True, "model": TINY_LLAMA, "warmup": 1, "repeats": 2, "attention": "auto", "remat": "none",
              "chunk_tokens": 64, "batch": 2, "length": 32}
    result = bench.WORKERS["gpu-train-ours"]({**common, "padding": "packed"})  # segment ids reach the attention
    assert len(result["step_seconds"]) == 2 and np.isfinite(result["loss"]) and result["aot_required_bytes"] > 0
    shape = perf.TransformerShape.from_hf(LlamaConfig(**{**bench_gpu.LLAMA_1B, **TINY_LLAMA}))
    seconds = 0.5
    expected = perf.training_flops(shape, 2, 32)["total"] / seconds / perf.peak_bf16_flops("NVIDIA H200")
    assert bench_gpu._mfu(common, seconds, "NVIDIA H200") == pytest.approx(expected, abs=1e-4)
    decode = bench.WORKERS["gpu-decode-ours"]({**common, "batch": 2, "prompt": 8, "new": 6, "repeats": 1,
                                               "bandwidth_bytes": 1 << 24})
    # Bytes per decode step: bf16 weights (tied head) + the bf16 cache of 2 rows x 14 slots.
    assert decode["decode"]["bytes_read_per_step"] == 2 * shape.params + perf.kv_cache_bytes(shape, 2, 14, 2)
    assert 0 < decode["decode"]["bandwidth_fraction"] < 1


def test_comparison_fields_are_medians_and_ratios(bench):
    ours = {"seconds": [3.0, 1.0, 2.0], "cpu_seconds": [4.0, 4.0, 5.0], "peak_rss_mib": 100.04}
    ref = {"seconds": [5.0, 4.0, 6.0], "cpu_seconds": [6.0, 7.0, 6.0], "peak_rss_mib": 250.0}
    result = bench.comparison("x", ours, ref, "s/step")
    assert (result["ours"], result["reference"]) == (2.0, 5.0)  # medians
    assert result["speedup"] == 2.5 and result["speedup_cpu_time"] == 1.5  # 6 / 4
    assert (result["ours_peak_rss_mib"], result["reference_peak_rss_mib"]) == (100.0, 250.0)
    rate = bench.comparison("x", ours, ref, "tokens/s", per=512, digits=2)
    assert (rate["ours"], rate["reference"], rate["speedup"]) == (256.0, 102.4, 2.5)  # a rate: higher is better
