#!/usr/bin/env python
"""Benchmarks against the PyTorch/transformers reference: ``python scripts/bench.py [NAME] [--json FILE]``.

Each benchmark is a function registered with :func:`benchmark` that returns a dict with at
least ``benchmark``, ``ours``, ``reference``, ``unit``, ``speedup`` (reference cost / our cost:
above 1 means we are faster) and the configuration measured. One JSON object per benchmark is
printed; ``--json FILE`` also writes them all in one report (below). Without a NAME every benchmark runs.

Every measured side runs in its own subprocess (``--worker``), so its peak memory (max RSS)
is its own and the thread settings apply from interpreter start: XLA and torch both get
``--threads`` (default 2) CPU threads. Warm-up steps (compilation, first allocations) are
excluded on both sides.

Against the hardware limit (``offside_jax.train.perf``): the ``train`` benchmark reports MFU
(MaxText's analytic training FLOPs / step time / the peak FLOP/s measured with a large fp32
matmul on this CPU) and ``decode`` the memory-bandwidth roofline. The ``gpu_*`` benchmarks
(``bench_gpu.py``) do the same on one GPU against PyTorch on that GPU (each reports a skip note
where there is none).

``--json FILE`` writes one report: ``{"machine": {CPU model, cores, memory, versions,
devices}, "results": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from offside_jax.files import write_json
from offside_jax.train import perf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling modules, however it is loaded
import bench_gpu  # noqa: E402,F401  (registers the gpu_* benchmarks)
from benchlib import (  # noqa: E402  (scripts/ is on sys.path when this file runs)
    BENCHMARKS, WORKERS, benchmark, comparison, machine_description, peak_rss_mib, run_worker, time_steps, worker,
)


# -- train: full AdamW step of the SmolLM2-135M shape ------------------------------------------

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def _llama_config(overrides: dict[str, Any] | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(**{**SMOLLM2_135M, **(overrides or {})})


def _random_batch(batch: int, length: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    ones = np.ones((batch, length), np.int32)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


@worker("train-ours")
def _train_ours(p: dict[str, Any]) -> dict[str, Any]:
    import jax

    from offside_jax.config import OptimConfig
    from offside_jax.models import lora
    from offside_jax.models.auto import create_model
    from offside_jax.train import losses, mesh as mesh_lib, optim
    from offside_jax.train.step import TrainStep, partition

    model = create_model(_llama_config(p.get("model")), seed=0, remat=p.get("remat", False))
    if p.get("lora_rank"):
        lora.apply(model, lora.LoRASpec(p["lora_target"], rank=p["lora_rank"], alpha=2.0 * p["lora_rank"]))
    tx, schedule = optim.make_optimizer(
        OptimConfig(lr=1e-4, schedule="constant", weight_decay=0.01, max_grad_norm=None), 100
    )
    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    loss = losses.make_answer_nll(p.get("chunk_tokens", 1024))
    step = TrainStep(partition(model), loss, tx, mesh=mesh, schedule=schedule)
    del model
    state = step.init_state(0)
    batch = step.shard_batch(_random_batch(p["batch"], p["length"], _llama_config(p.get("model")).vocab_size))
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    compile_start = time.perf_counter()
    one()
    compile_s = time.perf_counter() - compile_start
    wall, cpu = time_steps(one, p["warmup"] - 1, p["repeats"])
    return {"step_seconds": wall, "cpu_seconds": cpu, "first_step_seconds": compile_s, "peak_rss_mib": peak_rss_mib()}


@worker("train-torch")
def _train_torch(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(p.get("model")))  # default attention: sdpa
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    b = _random_batch(p["batch"], p["length"], model.config.vocab_size)
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    mask = torch.tensor(b["attention_mask"], dtype=torch.long)

    def one():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    wall, cpu = time_steps(one, p["warmup"], p["repeats"])
    return {"step_seconds": wall, "cpu_seconds": cpu, "attn_implementation": model.config._attn_implementation, "peak_rss_mib": peak_rss_mib()}


@benchmark("train")
def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Full training step (fwd + bwd + AdamW), SmolLM2-135M shape, batch 8 x 128, fp32."""
    common = {"batch": 8, "length": 128, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
    ours = run_worker("train-ours", common, args.threads)
    lora_run = run_worker("train-ours", {**common, "lora_rank": 8, "lora_target": "q_proj|v_proj"}, args.threads)
    ref = run_worker("train-torch", common, args.threads)
    peaks = run_worker("peak-flops", {}, args.threads)
    peak, peak_cpu = peaks["peak_flops"], peaks["peak_flops_per_cpu_second"]
    ours_s, ref_s = statistics.median(ours["step_seconds"]), statistics.median(ref["step_seconds"])
    ours_cpu_s, ref_cpu_s = statistics.median(ours["cpu_seconds"]), statistics.median(ref["cpu_seconds"])
    flops = perf.training_flops(perf.TransformerShape.from_hf(_llama_config()), common["batch"], common["length"])
    return {
        **comparison("train", ours, ref, "s/step", seconds_key="step_seconds"),
        "ours_first_step_seconds": round(ours["first_step_seconds"], 2),
        "lora_r8_qv_step_seconds": round(statistics.median(lora_run["step_seconds"]), 4),
        "lora_r8_qv_peak_rss_mib": round(lora_run["peak_rss_mib"], 1),
        # Against the hardware limit: MaxText's analytic FLOPs (causal attention halved).
        "training_flops_per_step": flops["total"],
        "cpu_peak_gflops_measured": round(peak / 1e9, 1),
        "ours_mfu": round(perf.mfu(flops["total"], ours_s, peak), 4),
        "reference_mfu": round(perf.mfu(flops["total"], ref_s, peak), 4),
        # The same ratio in CPU time (step CPU seconds vs the matmul's FLOPs per CPU second).
        "cpu_peak_gflops_per_cpu_second": round(peak_cpu / 1e9, 1),
        "ours_mfu_cpu_time": round(perf.mfu(flops["total"], ours_cpu_s, peak_cpu), 4),
        "reference_mfu_cpu_time": round(perf.mfu(flops["total"], ref_cpu_s, peak_cpu), 4),
        "ours_achieved_gflops": round(flops["total"] / ours_s / 1e9, 1),
        "ours_step_seconds_all": [round(t, 4) for t in ours["step_seconds"]],
        "reference_step_seconds_all": [round(t, 4) for t in ref["step_seconds"]],
        "config": {
            "model": "SmolLM2-135M shape (random init)",
            **{k: SMOLLM2_135M[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
            "batch": 8,
            "length": 128,
            "dtype": "float32",
            "optimizer": "AdamW lr 1e-4 wd 0.01, no clipping (ours: optax; reference: torch.optim.AdamW)",
            "threads": args.threads,
            "reference": f"transformers eager, attn_implementation={ref['attn_implementation']}",
            "ours_loss": "fused chunked cross-entropy (1024-token chunks)",
            "repeats": args.repeats,
            "warmup_steps_excluded": common["warmup"],
            "mfu": "MaxText training FLOPs (6 x matmul weights x tokens + causal attention 6 L H hd S^2 B) / median "
                   "step seconds / this CPU's peak, measured as the best fp32 matmul (1024-3072) at --threads; "
                   "*_mfu_cpu_time: the same in process CPU seconds (steadier on a shared machine)",
        },
    }


# -- vl: Qwen2.5-VL prefill + greedy decode of a 256x256 image question ------------------------

VL_TEXT = dict(
    vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
)
VL_VISION = dict(
    depth=8, hidden_size=256, intermediate_size=688, num_heads=4, out_hidden_size=512, window_size=112,
    fullatt_block_indexes=[3, 7], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
              "<|video_pad|>"]
VL_QUESTION = "<image>\nI'm curious about which club the player on the left side of the image will join."


def _vl_setup():
    """The same random-init transformers model, tokenizer and 256x256 image in either worker."""
    import numpy as np
    import torch
    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from offside_jax.models.vision_inputs import VisionProcessor

    tok = Tokenizer(models.BPE())  # byte-level, no merges: enough for chat formatting
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(sorted(pre_tokenizers.ByteLevel.alphabet()))  # sorted: ids equal in every process
    tok.add_special_tokens(VL_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=VL_SPECIAL[1:])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VL_SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=dict(VL_TEXT, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=VL_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    reference = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.BILINEAR)
    processor = VisionProcessor(config, tokenizer, max_pixels=256 * 256)
    record = {"messages": [{"role": "user", "content": VL_QUESTION}], "images": [image]}
    return config, reference, processor, record


@worker("vl-ours")
def _vl_ours(p: dict[str, Any]) -> dict[str, Any]:
    from offside_jax.models import hf, qwen2_5_vl
    from offside_jax.models.auto import create_model
    from offside_jax.models.generate import SamplingConfig, generate

    config, reference, processor, record = _vl_setup()
    model = create_model(config, abstract=True)
    hf.load_params_into(model, hf.DictSource({k: v.numpy() for k, v in reference.state_dict().items()}),
                        names=qwen2_5_vl.hf_names)
    del reference
    batch = processor([record], pad_multiple=1)
    sampling = SamplingConfig(max_new_tokens=p["new_tokens"], eos_token_ids=(), pad_token_id=0)
    holder = {}

    def one():
        holder["out"] = generate(model, batch, sampling)  # returns host tokens: fully synchronised

    compile_start = time.perf_counter()
    one()
    compile_s = time.perf_counter() - compile_start
    wall, cpu = time_steps(one, p["warmup"] - 1, p["repeats"])
    out = holder["out"]
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "prefill_seconds": out.prefill_seconds,
        "decode_seconds": out.decode_seconds,
        "first_call_seconds": compile_s,
        "tokens": out.tokens[0].tolist(),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "image_tokens": int((batch["input_ids"] == config.image_token_id).sum()),
        "peak_rss_mib": peak_rss_mib(),
    }


@worker("vl-torch")
def _vl_torch(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(p["threads"])
    config, reference, processor, record = _vl_setup()
    batch = processor([record], pad_multiple=1)
    encoded = processor.encode(record)
    ids = torch.from_numpy(batch["input_ids"]).long()
    inputs = dict(
        input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
        pixel_values=torch.from_numpy(encoded.pixel_values), image_grid_thw=torch.from_numpy(encoded.image_grid_thw),
        # Without it transformers' Qwen2.5-VL silently computes different positions.
        mm_token_type_ids=(ids == config.image_token_id).long(),
    )
    holder = {}

    def one():
        with torch.no_grad():
            holder["out"] = reference.generate(**inputs, max_new_tokens=p["new_tokens"], min_new_tokens=p["new_tokens"],
                                               do_sample=False, pad_token_id=0)

    wall, cpu = time_steps(one, p["warmup"], p["repeats"])
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "tokens": holder["out"][0, ids.shape[1]:].tolist(),
        "attn_implementation": reference.config._attn_implementation,
        "peak_rss_mib": peak_rss_mib(),
    }


@benchmark("vl")
def bench_vl(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill + 32-token greedy decode of a 256x256 image question, small Qwen2.5-VL, fp32."""
    common = {"new_tokens": 32, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
    ours = run_worker("vl-ours", common, args.threads)
    ref = run_worker("vl-torch", common, args.threads)
    return {
        **comparison("vl", ours, ref, "s/request"),
        "same_tokens": ours["tokens"] == ref["tokens"],
        "ours_prefill_seconds": round(ours["prefill_seconds"], 4),
        "ours_decode_seconds": round(ours["decode_seconds"], 4),
        "ours_first_call_seconds": round(ours["first_call_seconds"], 2),
        "ours_peak_rss_mib": round(ours["peak_rss_mib"], 1),
        "reference_peak_rss_mib": round(ref["peak_rss_mib"], 1),
        "ours_seconds_all": [round(t, 4) for t in ours["seconds"]],
        "reference_seconds_all": [round(t, 4) for t in ref["seconds"]],
        "config": {
            "model": "Qwen2.5-VL shape (random init)",
            "text": {k: VL_TEXT[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "vocab_size")},
            "vision": {k: VL_VISION[k] for k in ("depth", "hidden_size", "num_heads", "window_size",
                                                 "fullatt_block_indexes")},
            "image": "256x256 (18x18 patches, 81 image tokens)",
            "prompt_tokens": ours["prompt_tokens"],
            "new_tokens": common["new_tokens"],
            "batch": 1,
            "dtype": "float32",
            "threads": args.threads,
            "reference": f"transformers generate (greedy), attn_implementation={ref['attn_implementation']}",
            "ours": "jitted prefill (vision tower + M-RoPE) + lax.while_loop decode",
            "repeats": args.repeats,
            "warmup_excluded": common["warmup"],
        },
    }


# -- decode: greedy generation tokens/s, and the memory-bandwidth roofline ----------------------


@worker("read-bandwidth")
def _read_bandwidth(p: dict[str, Any]) -> dict[str, Any]:
    """Machine read bandwidth: the best of a jitted sum (XLA threads) and numpy over 1 GiB."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    nbytes = 1 << 30
    device_array = jnp.ones((nbytes // 4,), jnp.float32)
    host_array = np.ones(nbytes // 4, np.float32)
    jitted_sum = jax.jit(jnp.sum)
    best = {}
    for label, fn in (("xla", lambda: jitted_sum(device_array).block_until_ready()), ("numpy", lambda: host_array.sum())):
        wall, _ = time_steps(fn, 2, 5)
        best[label] = nbytes / min(wall) / 1e9
    return {"read_gbs": max(best.values()), **{f"{k}_gbs": v for k, v in best.items()}}


def _decode_inputs(p: dict[str, Any]):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, SMOLLM2_135M["vocab_size"], (p["batch"], p["prompt"])).astype(np.int32)
    return ids


@worker("decode-ours")
def _decode_ours(p: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx

    from offside_jax.models.auto import create_model
    from offside_jax.models.generate import SamplingConfig, generate

    model = create_model(_llama_config(), seed=0)
    ids = _decode_inputs(p)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    # No EOS: every row generates exactly max_new_tokens, like the reference's min_new_tokens.
    sampling = SamplingConfig(max_new_tokens=p["new"], eos_token_ids=(), pad_token_id=0)
    runs = []
    wall, cpu = time_steps(lambda: runs.append(generate(model, inputs, sampling)), p["warmup"], p["repeats"])
    timed = runs[p["warmup"]:]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "prefill_seconds": [r.prefill_seconds for r in timed],
        "decode_seconds": [r.decode_seconds for r in timed],
        "weight_bytes": weight_bytes,
        "peak_rss_mib": peak_rss_mib(),
    }


@worker("decode-torch")
def _decode_torch(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).eval()
    ids = torch.tensor(_decode_inputs(p), dtype=torch.long)

    def one():
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=p["new"], min_new_tokens=p["new"], pad_token_id=0,
            )

    wall, cpu = time_steps(one, p["warmup"], p["repeats"])
    return {"seconds": wall, "cpu_seconds": cpu, "attn_implementation": model.config._attn_implementation, "peak_rss_mib": peak_rss_mib()}


@benchmark("decode")
def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy decode, SmolLM2-135M shape, fp32, batch 8, 64-token prompts, 64 new tokens."""
    common = {"batch": 8, "prompt": 64, "new": 64, "warmup": 1, "repeats": args.repeats, "threads": args.threads}
    ours = run_worker("decode-ours", common, args.threads)
    ref = run_worker("decode-torch", common, args.threads)
    bandwidth = run_worker("read-bandwidth", {}, args.threads)
    tokens = common["batch"] * common["new"]
    # One decode step reads every weight once (the tied table is the head) and the whole
    # allocated KV cache (attention reads every slot, masked or not): offside_jax.train.perf.
    shape = perf.TransformerShape.from_hf(_llama_config())
    cache_bytes = perf.kv_cache_bytes(shape, common["batch"], common["prompt"] + common["new"], 4)
    step_s = statistics.median(ours["decode_seconds"]) / (common["new"] - 1)
    roofline = perf.decode_roofline(ours["weight_bytes"], cache_bytes, step_s, bandwidth["read_gbs"] * 1e9, common["batch"])
    return {
        **comparison("decode", ours, ref, "tokens/s", per=tokens, digits=2),
        "ours_prefill_seconds": round(statistics.median(ours["prefill_seconds"]), 4),
        "ours_decode_step_ms": round(step_s * 1e3, 2),
        "bytes_read_per_step": roofline.bytes_per_step,
        "achieved_read_gbs": round(roofline.achieved_bandwidth / 1e9, 2),
        "machine_read_gbs": round(bandwidth["read_gbs"], 2),
        "bandwidth_fraction": round(roofline.fraction, 3),
        "bandwidth_bound_tokens_per_s": round(roofline.bound_tokens_per_second, 1),
        "ours_peak_rss_mib": round(ours["peak_rss_mib"], 1),
        "reference_peak_rss_mib": round(ref["peak_rss_mib"], 1),
        "config": {
            "model": "SmolLM2-135M shape (random init)", "dtype": "float32", **{k: common[k] for k in ("batch", "prompt", "new")},
            "threads": args.threads, "repeats": args.repeats,
            "reference": f"transformers generate(do_sample=False) under inference_mode, attn_implementation={ref['attn_implementation']}",
            "timed": "whole generate call (prefill + decode), warm-up excluded",
        },
    }


# -- fwdbwd: forward + backward of one batch ------------------------------------------------------


@worker("fwdbwd-ours")
def _fwdbwd_ours(p: dict[str, Any]) -> dict[str, Any]:
    import jax
    from flax import nnx

    from offside_jax.models.auto import create_model
    from offside_jax.train.losses import make_answer_nll

    model = create_model(_llama_config(), seed=0)
    graphdef, params = nnx.split(model)
    loss_fn = make_answer_nll(p.get("chunk_tokens", 1024))
    batch = _random_batch(p["batch"], p["length"], SMOLLM2_135M["vocab_size"])

    def mean_loss(params, batch):
        total, weight, _ = loss_fn(nnx.merge(graphdef, params), batch, None, None)
        return total / weight

    grad_fn = jax.jit(jax.value_and_grad(mean_loss))
    wall, cpu = time_steps(lambda: jax.block_until_ready(grad_fn(params, batch)), p["warmup"], p["repeats"])
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": peak_rss_mib()}


@worker("fwdbwd-torch")
def _fwdbwd_torch(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).train()
    ids = torch.tensor(_random_batch(p["batch"], p["length"], model.config.vocab_size)["input_ids"], dtype=torch.long)

    def one():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    wall, cpu = time_steps(one, p["warmup"], p["repeats"])
    return {"seconds": wall, "cpu_seconds": cpu, "attn_implementation": model.config._attn_implementation, "peak_rss_mib": peak_rss_mib()}


@benchmark("fwdbwd")
def bench_fwdbwd(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward (mean next-token NLL), SmolLM2-135M shape, batch 8 x 128, fp32."""
    common = {"batch": 8, "length": 128, "warmup": 2, "repeats": args.repeats, "threads": args.threads}
    ours = run_worker("fwdbwd-ours", common, args.threads)
    ref = run_worker("fwdbwd-torch", common, args.threads)
    return {
        **comparison("fwdbwd", ours, ref, "s/batch"),
        "config": {
            "model": "SmolLM2-135M shape (random init)", "dtype": "float32", "batch": 8, "length": 128,
            "threads": args.threads, "repeats": args.repeats,
            "reference": f"transformers eager forward(labels=...) + backward, attn_implementation={ref['attn_implementation']}",
            "ours_loss": "fused chunked cross-entropy (1024-token chunks), jax.value_and_grad",
        },
    }


# -- ssd / ssd_batch: Fisher importance for SSD; npo: one NPO training step --------------------


def _importance_data(p: dict[str, Any]) -> list[dict[str, Any]]:
    """``examples`` random sequences of ``length`` tokens (every next token an answer), in batches."""
    whole = _random_batch(p["examples"], p["length"], SMOLLM2_135M["vocab_size"])
    rows = p["batch"]
    return [{k: v[i: i + rows] for k, v in whole.items()} for i in range(0, p["examples"], rows)]


@worker("importance-ours")
def _importance_ours(p: dict[str, Any]) -> dict[str, Any]:
    import jax

    from offside_jax.models.auto import create_model
    from offside_jax.unlearn.dampening import DampeningConfig, importance

    model = create_model(_llama_config(), seed=0)
    data = _importance_data(p)
    cfg = DampeningConfig(estimator=p["estimator"], per_example_chunk=p.get("chunk", 8))
    compile_start = time.perf_counter()
    jax.block_until_ready(importance(model, data[:1], cfg)[0])  # compiles the accumulation step
    compile_s = time.perf_counter() - compile_start
    holder = {}

    def one():
        holder["imp"], holder["n"] = importance(model, data, cfg)
        jax.block_until_ready(holder["imp"])

    wall, cpu = time_steps(one, 0, p["repeats"])
    return {"seconds": wall, "cpu_seconds": cpu, "first_batch_seconds": compile_s, "examples": holder["n"],
            "peak_rss_mib": peak_rss_mib()}


@worker("importance-torch")
def _importance_torch(p: dict[str, Any]) -> dict[str, Any]:
    """The official SSD loop (eval mode; per batch: zero grads, batch-mean loss, backward,
    ``imp += grad ** 2``; then divide), over single examples for the per-example estimator."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).eval()
    params = [q for q in model.parameters() if q.requires_grad]
    rows = 1 if p["estimator"] == "per_example" else p["batch"]
    whole = _random_batch(p["examples"], p["length"], model.config.vocab_size)
    ids = torch.tensor(whole["input_ids"], dtype=torch.long)

    def one():
        imp = [torch.zeros_like(q) for q in params]
        n = 0
        for start in range(0, p["examples"], rows):
            model.zero_grad(set_to_none=True)
            chunk = ids[start: start + rows]
            model(input_ids=chunk, labels=chunk).loss.backward()
            for acc, q in zip(imp, params):
                acc.add_(q.grad.pow(2))
            n += 1
        imp = [acc / n for acc in imp]  # the official loop's final division, timed with the rest; the result is unused

    wall, cpu = time_steps(one, 0, p["repeats"])
    return {"seconds": wall, "cpu_seconds": cpu, "attn_implementation": model.config._attn_implementation, "peak_rss_mib": peak_rss_mib()}


def _importance_result(name: str, estimator: str, args: argparse.Namespace, chunks: tuple[int, ...] = (8,)) -> dict[str, Any]:
    """One pass of importance over 64 x 128 tokens, ours at each chunk size (the fastest is
    "ours") and the torch loop; each pass is long, so it is timed once (``repeats`` 1)."""
    common = {"examples": 64, "length": 128, "batch": 16 if estimator == "per_example" else 8, "estimator": estimator,
              "repeats": 1, "threads": args.threads}
    runs = {c: run_worker("importance-ours", {**common, "chunk": c}, args.threads) for c in chunks}
    chunk = min(runs, key=lambda c: statistics.median(runs[c]["seconds"]))
    ours = runs[chunk]
    ref = run_worker("importance-torch", common, args.threads)
    flops = perf.training_flops(perf.TransformerShape.from_hf(_llama_config()), common["examples"], common["length"])
    return {
        **comparison(name, ours, ref, "s/pass (64 examples)", digits=3),
        "ours_first_batch_seconds": round(ours["first_batch_seconds"], 2),
        "examples_counted": ours["examples"],
        **({f"ours_chunk{c}_seconds": round(statistics.median(r["seconds"]), 3) for c, r in runs.items()}
           if estimator == "per_example" else {}),
        **({f"ours_chunk{c}_cpu_seconds": round(statistics.median(r["cpu_seconds"]), 2) for c, r in runs.items()}
           if estimator == "per_example" else {}),
        **({f"ours_chunk{c}_peak_rss_mib": round(r["peak_rss_mib"], 1) for c, r in runs.items()}
           if estimator == "per_example" else {}),
        # Forward + backward FLOPs of the pass (no optimizer): the lower bound at the measured peak.
        "pass_flops": flops["total"],
        "config": {
            "model": "SmolLM2-135M shape (random init)",
            "examples": common["examples"], "length": common["length"], "dtype": "float32", "threads": args.threads,
            "estimator": estimator,
            "ours": (f"dampening.importance, per-example gradients by vmap over chunks of {chunk} example(s) inside "
                     f"a scan (fastest of chunks {list(chunks)}), batches of {common['batch']}" if estimator == "per_example" else
                     f"dampening.importance, squared batch-mean gradients, batches of {common['batch']}"),
            "reference": ("transformers + a loop over single examples (grad ** 2 each)" if estimator == "per_example"
                          else f"the official SSD loop in transformers, batches of {common['batch']}")
                         + f", attn_implementation={ref['attn_implementation']}",
            "timed": "one full pass over the 64 examples after a compiling/warm-up batch (ours)",
        },
    }


@benchmark("ssd")
def bench_ssd(args: argparse.Namespace) -> dict[str, Any]:
    """Per-example Fisher importance (mean of squared per-example gradients) of 64 x 128 tokens.

    Chunks of 1 (a scan over single examples) and 8 (vmap): on CPU the scan is the faster,
    on accelerators the vmap."""
    return _importance_result("ssd", "per_example", args, chunks=(1, 8))


@benchmark("ssd_batch")
def bench_ssd_batch(args: argparse.Namespace) -> dict[str, Any]:
    """SSD's official importance (squared batch-mean gradients, batch 8) of the same 64 x 128 tokens."""
    return _importance_result("ssd_batch", "batch_mean", args)


# Memory-lean settings for a CPU step: XLA's default CPU scheduler favours running independent
# ops concurrently, which keeps rematerialised activations alive and defeats remat; the
# sequential scheduler lets remat (saving only matmul outputs) bring the step's peak down.
LEAN_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
LEAN_REMAT = "dots_with_no_batch_dims_saveable"


@worker("npo-ours")
def _npo_ours(p: dict[str, Any]) -> dict[str, Any]:
    if p.get("lean"):  # before JAX creates its CPU client; first, as XLA stops at a bare token
        os.environ["XLA_FLAGS"] = f"{LEAN_XLA_FLAG} {os.environ.get('XLA_FLAGS', '')}"
    import jax

    from offside_jax.config import OptimConfig
    from offside_jax.models.auto import create_model
    from offside_jax.train import mesh as mesh_lib, optim
    from offside_jax.train.step import TrainStep, partition
    from offside_jax.unlearn.losses import build_loss

    model = create_model(_llama_config(), seed=0, remat=LEAN_REMAT if p.get("lean") else False)
    tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-5, schedule="constant", weight_decay=0.0, max_grad_norm=None), 100)
    loss = build_loss("npo", beta=0.1, alpha=0.0)  # fused 256-token chunks: no [B, T, V] logits
    step = TrainStep(partition(model, reference=True), loss, tx, mesh=mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]),
                     schedule=schedule)
    del model
    holder = {"state": step.init_state(0)}
    batch = step.shard_batch({"forget": _random_batch(p["batch"], p["length"], SMOLLM2_135M["vocab_size"])})

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        holder["loss"] = float(jax.block_until_ready(metrics)["loss"])

    compile_start = time.perf_counter()
    one()
    compile_s = time.perf_counter() - compile_start
    wall, cpu = time_steps(one, p["warmup"] - 1, p["repeats"])
    return {"step_seconds": wall, "cpu_seconds": cpu, "first_step_seconds": compile_s, "loss": holder["loss"],
            "peak_rss_mib": peak_rss_mib()}


@worker("npo-torch")
def _npo_torch(p: dict[str, Any]) -> dict[str, Any]:
    """NPO in transformers: policy forward + backward, a frozen reference copy's forward under
    no_grad, ``-(2/beta) logsigmoid(beta (logp_ref - logp))`` on summed answer log-probs, AdamW."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config()).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(_random_batch(p["batch"], p["length"], model.config.vocab_size)["input_ids"], dtype=torch.long)
    beta = 0.1

    def seq_logp(m):
        logits = m(input_ids=ids).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].sum(-1)

    holder = {}

    def one():
        logp = seq_logp(model)
        with torch.no_grad():
            ref = seq_logp(reference)
        loss = (-(2.0 / beta) * torch.nn.functional.logsigmoid(beta * (ref - logp))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss.item()

    wall, cpu = time_steps(one, p["warmup"], p["repeats"])
    return {"step_seconds": wall, "cpu_seconds": cpu, "loss": holder["loss"],
            "attn_implementation": model.config._attn_implementation, "peak_rss_mib": peak_rss_mib()}


@benchmark("npo")
def bench_npo(args: argparse.Namespace) -> dict[str, Any]:
    """One NPO step (policy fwd + bwd, reference fwd, AdamW), SmolLM2-135M shape, batch 8 x 128, fp32.

    "ours" is the memory-lean configuration (remat saving matmul outputs, XLA's sequential CPU
    scheduler); the default configuration is reported beside it."""
    common = {"batch": 8, "length": 128, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
    ours = run_worker("npo-ours", {**common, "lean": True}, args.threads)
    default = run_worker("npo-ours", common, args.threads)
    ref = run_worker("npo-torch", common, args.threads)
    default_vs_ref = comparison("npo", default, ref, "s/step", seconds_key="step_seconds")
    return {
        **comparison("npo", ours, ref, "s/step", seconds_key="step_seconds"),
        "peak_memory_ratio": round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3),
        "default_config_seconds": default_vs_ref["ours"],
        "default_config_speedup": default_vs_ref["speedup"],
        "default_config_speedup_cpu_time": default_vs_ref["speedup_cpu_time"],
        "default_config_peak_rss_mib": default_vs_ref["ours_peak_rss_mib"],
        "ours_first_step_seconds": round(ours["first_step_seconds"], 2),
        "ours_step_seconds_all": [round(t, 4) for t in ours["step_seconds"]],
        "reference_step_seconds_all": [round(t, 4) for t in ref["step_seconds"]],
        "config": {
            "model": "SmolLM2-135M shape (random init)", "batch": 8, "length": 128, "dtype": "float32",
            "loss": "NPO (open-unlearning: summed answer log-probs, beta 0.1), no retain term; every next token an answer",
            "optimizer": "AdamW lr 1e-5, no weight decay, no clipping",
            "ours": (f"TrainStep(partition(model, reference=True), build_loss('npo')): frozen reference copy outside the "
                     f"optimizer, fused 256-token log-prob chunks, jitted and donated; model remat={LEAN_REMAT!r}, "
                     f"XLA_FLAGS={LEAN_XLA_FLAG}"),
            "default_config": "the same without remat and with XLA's default (concurrency-optimised) CPU scheduler",
            "reference": f"transformers, deepcopy reference under no_grad, attn_implementation={ref['attn_implementation']}",
            "threads": args.threads, "repeats": args.repeats, "warmup_steps_excluded": args.warmup,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", help="also write the report (machine + results) as JSON to this file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocation)")
    parser.add_argument("--gpu-params", help="JSON overrides of the gpu_* benchmarks' settings, e.g. "
                        "'{\"allow_cpu\": true, \"model\": {\"num_hidden_layers\": 2}}' (bench_gpu.py)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.params))))
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    report = {"machine": machine_description(args.threads), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv[1:] if argv is None else list(argv), "results": []}
    print(json.dumps({"machine": report["machine"]}), flush=True)
    for name in args.names or list(BENCHMARKS):
        result = BENCHMARKS[name](args)
        print(json.dumps(result), flush=True)
        report["results"].append(result)
    if args.json:  # written once, complete: never a half-written report
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
