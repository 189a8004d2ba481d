"""GPU benchmarks of ``scripts/bench.py``: ours and the PyTorch/transformers reference measured
in the same run on the same GPU, each side in its own subprocess.

- ``gpu_train``: a training step of the Llama-3.2-1B shape (bf16 compute, fp32 master weights,
  AdamW) at 8 x 2048 and 2 x 8192 against PyTorch eager (fp32 params under bf16 autocast, sdpa
  attention, fused AdamW: as a user runs it), optionally ``torch.compile``; and, on a shallower
  model of the same width, padded batches (left, right, packed segments) against the unpadded step.
- ``gpu_npo``: one NPO step (policy forward + backward, reference forward) with LoRA r=16 and full.
- ``gpu_ssd``: per-example Fisher importance over 256 examples x 512 tokens against
  ``torch.func.vmap(grad)`` and against the official SSD per-batch loop.
- ``gpu_vl``: the Qwen2.5-VL-3B shape (random init): a training step on 4 rows of one 448 x 448
  image + 512 text tokens, and image-question generation.
- ``gpu_decode``: greedy decode at batch 16 and 64 against transformers generate with its
  dynamic and its static cache.

Every row reports the speedup (reference seconds / ours), MFU (MaxText's analytic FLOPs / step
seconds / the vendor's dense bf16 peak) or bytes/s against the measured HBM bandwidth, and peak
device memory. Without a GPU each benchmark returns a skip note (``allow_cpu`` in
``--gpu-params`` runs the workers anyway, e.g. on tiny shapes to check the code).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from benchlib import benchmark, measured_read_bandwidth, run_worker, time_steps, worker

from offside_jax.train import perf

# The Llama-3.2-1B shape (1.24 B parameters, tied embeddings), random weights. max_position_embeddings
# is raised to 8192 only so the 2 x 8192 row fits the RoPE table; no number the step's speed
# depends on changes.
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# The Qwen2.5-VL-3B shape.
VL_3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
DEFAULTS = dict(warmup=2, repeats=5, allow_cpu=False, model={}, torch_compile=False)


def _params(args: argparse.Namespace, **defaults) -> dict[str, Any]:
    return {**DEFAULTS, **defaults, **json.loads(args.gpu_params or "{}")}


def _skip(p: dict[str, Any]) -> dict[str, Any] | None:
    """A skip note when JAX has no GPU (unless ``allow_cpu``)."""
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu" and not p.get("allow_cpu"):
        return {"skipped": f"no GPU: JAX's default devices are {device.platform} ({device.device_kind})"}
    return None


def _device_facts() -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"device_kind": device.device_kind, "platform": device.platform,
            "peak_device_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)}


def _torch_device_facts() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device_kind": "cpu", "peak_device_memory_gib": None}
    return {"device_kind": torch.cuda.get_device_name(),
            "peak_device_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _torch_setup(p: dict[str, Any]):
    import torch

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_time(fn, p: dict[str, Any]) -> list[float]:
    """Seconds of each timed call, the device synchronised around each."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def one():
        fn()
        sync()

    wall, _ = time_steps(one, p["warmup"], p["repeats"])
    return wall


def _llama_config(p: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_1B, **p.get("model", {})})


def _token_batch(batch: int, length: int, vocab: int, padding: str = "none", seed: int = 0) -> dict[str, Any]:
    """Random tokens; ``padding`` left / right (each row loses up to a quarter of its slots) or
    packed (each row holds 4 segments, positions restarting in each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    out = {"input_ids": ids}
    if padding in ("left", "right"):
        pads = rng.integers(0, length // 4, batch)
        for row, pad in enumerate(pads):
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, length - pad:] = 0
        out["positions"] = (np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask).astype(np.int32)
    elif padding == "packed":
        segments = np.zeros((batch, length), np.int32)
        positions = np.zeros((batch, length), np.int32)
        for row in range(batch):
            cuts = np.sort(rng.choice(np.arange(1, length), 3, replace=False))
            bounds = [0, *cuts.tolist(), length]
            for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                segments[row, a:b] = s
                positions[row, a:b] = np.arange(b - a)
        out.update(segment_ids=segments, positions=positions)
    elif padding != "none":
        raise ValueError(f"padding {padding!r}: use none, left, right or packed")
    out.update(attention_mask=mask, loss_mask=mask)
    return out


# -- gpu_train ---------------------------------------------------------------------------------


def _jax_train_step(model, loss, p: dict[str, Any], host: dict[str, Any], reference: bool = False):
    """A compiled TrainStep (bf16 params, fp32 masters, AdamW) and its placed batch."""
    import jax
    import optax

    from offside_jax.train import aot, mesh as mesh_lib
    from offside_jax.train.step import TrainStep, partition

    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    step = TrainStep(partition(model, reference=reference), loss, optax.adamw(1e-5, weight_decay=0.0), mesh=mesh,
                     fp32_master_weights=True)
    start = time.perf_counter()
    compiled = step.compile(step.abstract_batch(host))
    estimate = aot.memory_estimate(compiled)
    return step, step.shard_batch(host), time.perf_counter() - start, estimate


def _time_jax_step(step, batch, p: dict[str, Any]) -> dict[str, Any]:
    import jax

    holder = {"state": step.init_state(0)}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        holder["loss"] = float(jax.block_until_ready(metrics)["loss"])

    wall, _ = time_steps(one, p["warmup"], p["repeats"])
    return {"step_seconds": wall, "loss": holder["loss"]}


@worker("gpu-train-ours")
def _gpu_train_ours(p: dict[str, Any]) -> dict[str, Any]:
    from offside_jax.models.auto import create_model
    from offside_jax.train import losses

    if (skip := _skip(p)) is not None:
        return skip
    cfg = _llama_config(p)
    model = create_model(cfg, seed=0, dtype="bfloat16", param_dtype="bfloat16", remat=p["remat"],
                         attention=p["attention"])
    host = _token_batch(p["batch"], p["length"], cfg.vocab_size, p.get("padding", "none"))
    step, batch, compile_s, estimate = _jax_train_step(model, losses.make_answer_nll(p["chunk_tokens"]), p, host)
    del model
    return {**_time_jax_step(step, batch, p), "compile_seconds": compile_s,
            "aot_required_bytes": int(estimate.required_bytes), **_device_facts()}


@worker("gpu-train-torch")
def _gpu_train_torch(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    device = _torch_setup(p)
    with device:
        model = LlamaForCausalLM(_llama_config(p)).train()  # fp32 params, sdpa attention
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    host = _token_batch(p["batch"], p["length"], model.config.vocab_size)
    ids = torch.tensor(host["input_ids"], dtype=torch.long, device=device)
    forward = torch.compile(model) if p.get("torch_compile") else model
    holder = {}

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss

    compile_start = time.perf_counter()
    one()
    first = time.perf_counter() - compile_start
    wall = _torch_time(one, p)
    return {"step_seconds": wall, "loss": float(holder["loss"]), "first_step_seconds": first,
            "attn_implementation": model.config._attn_implementation, **_torch_device_facts()}


def _mfu(p: dict[str, Any], seconds: float, device_kind: str) -> float | None:
    shape = perf.TransformerShape.from_hf(_llama_config(p))
    peak = perf.peak_bf16_flops(device_kind)
    flops = perf.training_flops(shape, p["batch"], p["length"])["total"]
    return None if peak is None else round(perf.mfu(flops, seconds, peak), 4)


def _side_by_side(name: str, ours: dict[str, Any], ref: dict[str, Any] | None, key: str, unit: str,
                  **extra) -> dict[str, Any]:
    ours_s = statistics.median(ours[key])
    row = {"benchmark": name, "unit": unit, "ours": round(ours_s, 4), "ours_all": [round(t, 4) for t in ours[key]],
           "ours_peak_device_memory_gib": ours.get("peak_device_memory_gib")}
    if ref is not None and "error" in ref:
        row["reference_error"] = ref["error"]
    elif ref is not None:
        ref_s = statistics.median(ref[key])
        row.update(reference=round(ref_s, 4), speedup=round(ref_s / ours_s, 3),
                   reference_all=[round(t, 4) for t in ref[key]],
                   reference_peak_device_memory_gib=ref.get("peak_device_memory_gib"))
    return {**row, **extra}


def _run_pair(ours_worker: str, ref_worker: str | None, p: dict[str, Any], threads: int):
    """Both sides' results; a reference that fails to run is reported as ``{"error": ...}``
    beside our figures rather than losing them."""
    ours = run_worker(ours_worker, p, threads, platforms=None)
    if "skipped" in ours or ref_worker is None:
        return ours, None
    try:
        return ours, run_worker(ref_worker, p, threads, platforms=None)
    except RuntimeError as e:
        return ours, {"error": str(e)[-600:]}


@benchmark("gpu_train")
def bench_gpu_train(args: argparse.Namespace) -> dict[str, Any]:
    """Training step of the Llama-3.2-1B shape, bf16, one GPU, against PyTorch eager."""
    p0 = _params(args, remat="none", attention="auto", chunk_tokens=4096,
                 shapes=[[8, 2048], [2, 8192]], padded_layers=4, paddings=["left", "right", "packed"])
    rows = []
    for batch, length in p0["shapes"]:
        p = {**p0, "batch": batch, "length": length}
        ours, ref = _run_pair("gpu-train-ours", "gpu-train-torch", p, args.threads)
        if "skipped" in ours:
            return {"benchmark": "gpu_train", "ours": None, "reference": None, "speedup": None, **ours}
        row = _side_by_side(f"gpu_train {batch}x{length}", ours, ref, "step_seconds", "s/step",
                            tokens_per_second=round(batch * length / statistics.median(ours["step_seconds"]), 1),
                            mfu=_mfu(p, statistics.median(ours["step_seconds"]), ours["device_kind"]),
                            compile_seconds=round(ours["compile_seconds"], 1), loss=ours["loss"])
        if "step_seconds" in ref:
            row.update(reference_mfu=_mfu(p, statistics.median(ref["step_seconds"]), ours["device_kind"]),
                       reference_loss=ref["loss"], reference_attention=ref["attn_implementation"])
        if p.get("torch_compile"):
            compiled = run_worker("gpu-train-torch", {**p, "torch_compile": True}, args.threads, platforms=None)
            row["torch_compile_seconds"] = round(statistics.median(compiled["step_seconds"]), 4)
            row["speedup_vs_torch_compile"] = round(statistics.median(compiled["step_seconds"]) / row["ours"], 3)
        rows.append(row)
    # Padding costs: the same width on fewer layers (compile time), unpadded vs each padding.
    shallow = {**p0, "batch": p0["shapes"][0][0], "length": p0["shapes"][0][1],
               "model": {**p0.get("model", {}), "num_hidden_layers": p0["padded_layers"]}}
    unpadded = statistics.median(run_worker("gpu-train-ours", shallow, args.threads, None)["step_seconds"])
    padded = {}
    for padding in p0["paddings"]:
        seconds = statistics.median(run_worker("gpu-train-ours", {**shallow, "padding": padding}, args.threads,
                                               None)["step_seconds"])
        padded[padding] = {"seconds": round(seconds, 4), "ratio_to_unpadded": round(seconds / unpadded, 3)}
    return {
        "benchmark": "gpu_train", "unit": "s/step", "ours": rows[0]["ours"], "reference": rows[0].get("reference"),
        "speedup": rows[0].get("speedup"), "mfu": rows[0]["mfu"], "rows": rows,
        "padding": {"layers": p0["padded_layers"], "unpadded_seconds": round(unpadded, 4), **padded},
        "targets": {"speedup": 1.6, "mfu_8x2048": 0.58, "mfu_2x8192": 0.52, "padded_ratio_max": 1.1},
        "config": {"model": "Llama-3.2-1B shape (random init)", **LLAMA_1B, **p0.get("model", {}),
                   "ours": f"bf16 params and compute, fp32 master weights, AdamW, attention={p0['attention']}, "
                           f"remat={p0['remat']}, fused chunked cross-entropy ({p0['chunk_tokens']}-token chunks)",
                   "reference": "transformers LlamaForCausalLM, fp32 params under torch.autocast(bfloat16), "
                                "sdpa attention, torch.optim.AdamW(fused=True), eager",
                   "warmup": p0["warmup"], "repeats": p0["repeats"]},
    }


# -- gpu_npo -----------------------------------------------------------------------------------


@worker("gpu-npo-ours")
def _gpu_npo_ours(p: dict[str, Any]) -> dict[str, Any]:
    from offside_jax.models import lora
    from offside_jax.models.auto import create_model
    from offside_jax.unlearn.losses import build_loss

    if (skip := _skip(p)) is not None:
        return skip
    cfg = _llama_config(p)
    model = create_model(cfg, seed=0, dtype="bfloat16", param_dtype="bfloat16", attention=p["attention"])
    if p["lora_rank"]:
        lora.apply(model, lora.LoRASpec(p["lora_target"], rank=p["lora_rank"], alpha=2.0 * p["lora_rank"]))
    host = {"forget": _token_batch(p["batch"], p["length"], cfg.vocab_size)}
    step, batch, compile_s, _ = _jax_train_step(model, build_loss("npo", beta=0.1, alpha=0.0), p, host,
                                                reference=not p["lora_rank"])
    del model
    return {**_time_jax_step(step, batch, p), "compile_seconds": compile_s, **_device_facts()}


@worker("gpu-npo-torch")
def _gpu_npo_torch(p: dict[str, Any]) -> dict[str, Any]:
    """NPO as users write it in transformers (+ peft for LoRA): policy forward + backward, the
    reference forward under no_grad (a deepcopy, or the base with adapters disabled)."""
    import contextlib
    import copy

    import torch
    from transformers import LlamaForCausalLM

    device = _torch_setup(p)
    with device:
        model = LlamaForCausalLM(_llama_config(p)).train()
    if p["lora_rank"]:
        from peft import LoraConfig, get_peft_model

        targets = p["lora_target"].split("|")
        model = get_peft_model(model, LoraConfig(r=p["lora_rank"], lora_alpha=2 * p["lora_rank"], target_modules=targets))
        reference, disable = model, model.disable_adapter
    else:
        reference, disable = copy.deepcopy(model).eval().requires_grad_(False), contextlib.nullcontext
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.0,
                            fused=device.type == "cuda")
    ids = torch.tensor(_token_batch(p["batch"], p["length"], model.config.vocab_size)["input_ids"], dtype=torch.long,
                       device=device)
    beta = 0.1

    def seq_logp(m):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = m(input_ids=ids).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].sum(-1)

    def one():
        logp = seq_logp(model)
        with torch.no_grad(), disable():
            ref = seq_logp(reference)
        loss = (-(2.0 / beta) * torch.nn.functional.logsigmoid(beta * (ref - logp))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_seconds": _torch_time(one, p), **_torch_device_facts()}


@benchmark("gpu_npo")
def bench_gpu_npo(args: argparse.Namespace) -> dict[str, Any]:
    """One NPO step (policy fwd + bwd, reference fwd, AdamW), 1B Llama shape, 8 x 1024, LoRA r=16 and full."""
    p0 = _params(args, batch=8, length=1024, attention="auto",
                 lora_target="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
    rows = {}
    for name, rank in (("lora_r16", 16), ("full", 0)):
        ours, ref = _run_pair("gpu-npo-ours", "gpu-npo-torch", {**p0, "lora_rank": rank}, args.threads)
        if "skipped" in ours:
            return {"benchmark": "gpu_npo", "ours": None, "reference": None, "speedup": None, **ours}
        rows[name] = _side_by_side(f"gpu_npo {name}", ours, ref, "step_seconds", "s/step",
                                   compile_seconds=round(ours["compile_seconds"], 1))
    return {"benchmark": "gpu_npo", "unit": "s/step", "ours": rows["full"]["ours"],
            "reference": rows["full"].get("reference"), "speedup": rows["full"].get("speedup"), "rows": rows,
            "targets": {"speedup": 1.4},
            "config": {"model": "Llama-3.2-1B shape (random init)", "batch": p0["batch"], "length": p0["length"],
                       "loss": "NPO beta 0.1 on summed sequence log-probs, no retain term",
                       "lora": f"r=16, alpha 32, on {p0['lora_target']} (reference: peft, base with adapters off)",
                       "ours": "bf16 compute, fp32 master weights; reference model = frozen copy (full) or the "
                               "base with adapters off (LoRA)",
                       "reference": "transformers under bf16 autocast, fp32 params, fused AdamW, eager"}}


# -- gpu_ssd -----------------------------------------------------------------------------------


@worker("gpu-ssd-ours")
def _gpu_ssd_ours(p: dict[str, Any]) -> dict[str, Any]:
    import jax

    from offside_jax.models.auto import create_model
    from offside_jax.unlearn.dampening import DampeningConfig, importance

    if (skip := _skip(p)) is not None:
        return skip
    cfg = _llama_config(p)
    model = create_model(cfg, seed=0, dtype="bfloat16", param_dtype="float32", attention=p["attention"])
    whole = _token_batch(p["examples"], p["length"], cfg.vocab_size)
    data = [{k: v[i: i + p["batch"]] for k, v in whole.items()} for i in range(0, p["examples"], p["batch"])]
    dcfg = DampeningConfig(estimator="per_example", per_example_chunk=p["chunk"])
    start = time.perf_counter()
    jax.block_until_ready(importance(model, data[:1], dcfg)[0])
    compile_s = time.perf_counter() - start

    def one():
        jax.block_until_ready(importance(model, data, dcfg)[0])

    wall, _ = time_steps(one, 0, p["repeats"])
    return {"seconds": wall, "compile_seconds": compile_s, **_device_facts()}


@worker("gpu-ssd-torch")
def _gpu_ssd_torch(p: dict[str, Any]) -> dict[str, Any]:
    """Per-example squared gradients with torch.func (vmap(grad) over chunks of ``chunk``), or
    the official SSD loop (batch-mean loss per batch, ``imp += grad ** 2``)."""
    import torch
    from torch.func import functional_call, grad, vmap
    from transformers import LlamaForCausalLM

    device = _torch_setup(p)
    with device:
        config = _llama_config(p)
        config._attn_implementation = "eager"  # vmap-able (sdpa's masks are built with data-dependent checks)
        model = LlamaForCausalLM(config).eval()
    names = [n for n, _ in model.named_parameters()]
    params = {n: q.detach() for n, q in model.named_parameters()}
    ids = torch.tensor(_token_batch(p["examples"], p["length"], model.config.vocab_size)["input_ids"], dtype=torch.long,
                       device=device)

    def example_loss(weights, row):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return functional_call(model, weights, (row[None],), {"labels": row[None]}).loss

    per_example = vmap(grad(example_loss), in_dims=(None, 0))

    def vmap_pass():
        imp = {n: torch.zeros_like(params[n]) for n in names}
        for start in range(0, p["examples"], p["chunk"]):
            grads = per_example(params, ids[start: start + p["chunk"]])
            for n in names:
                imp[n] += grads[n].float().pow(2).sum(0)
        return imp

    def official_pass():
        imp = [torch.zeros_like(q) for q in model.parameters()]
        for start in range(0, p["examples"], p["batch"]):
            model.zero_grad(set_to_none=True)
            chunk = ids[start: start + p["batch"]]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=chunk, labels=chunk).loss
            loss.backward()
            for acc, q in zip(imp, model.parameters()):
                acc.add_(q.grad.pow(2))
        return imp

    out = {}
    for name, fn in (("official", official_pass), ("vmap", vmap_pass)):
        try:
            out[f"{name}_seconds"] = _torch_time(fn, {**p, "warmup": 1})
        except Exception as e:  # report a reference that cannot run rather than lose the others
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return {**out, **_torch_device_facts()}


@benchmark("gpu_ssd")
def bench_gpu_ssd(args: argparse.Namespace) -> dict[str, Any]:
    """Per-example Fisher importance over 256 examples x 512 tokens (SmolLM2-360M-like width)."""
    p0 = _params(args, examples=256, length=512, batch=32, chunk=8, repeats=2, attention="auto",
                 model=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                            num_key_value_heads=4, vocab_size=49152))
    ours, ref = _run_pair("gpu-ssd-ours", "gpu-ssd-torch", p0, args.threads)
    if "skipped" in ours:
        return {"benchmark": "gpu_ssd", "ours": None, "reference": None, "speedup": None, **ours}
    ours_s = statistics.median(ours["seconds"])
    row = {"benchmark": "gpu_ssd", "unit": "s/pass (256 examples)", "ours": round(ours_s, 3),
           "compile_seconds": round(ours["compile_seconds"], 1),
           "ours_peak_device_memory_gib": ours["peak_device_memory_gib"],
           "reference_peak_device_memory_gib": ref.get("peak_device_memory_gib"), "targets": {"speedup_vs_vmap": 2.0}}
    for name in ("vmap", "official"):
        if "error" in ref:
            row["reference_error"] = ref["error"]
        elif f"{name}_seconds" in ref:
            ref_s = statistics.median(ref[f"{name}_seconds"])
            row[f"reference_{name}_seconds"] = round(ref_s, 3)
            row[f"speedup_vs_{name}"] = round(ref_s / ours_s, 3)
        else:
            row[f"reference_{name}_error"] = ref.get(f"{name}_error")
    row["reference"], row["speedup"] = row.get("reference_vmap_seconds"), row.get("speedup_vs_vmap")
    row["config"] = {"model": {**LLAMA_1B, **p0["model"]}, "examples": p0["examples"], "length": p0["length"],
                     "ours": f"dampening.importance(estimator=per_example, chunk {p0['chunk']}), bf16 compute, fp32 "
                             "params and importances",
                     "reference_vmap": f"torch.func.vmap(grad) over chunks of {p0['chunk']}, bf16 autocast, eager "
                                       "attention (vmap-able)",
                     "reference_official": f"SSD's loop: batch-mean loss per batch of {p0['batch']}, grad ** 2 "
                                           "(another estimator: the per-batch baseline users run)"}
    return row


# -- gpu_vl ------------------------------------------------------------------------------------


def _vl_3b_setup(p: dict[str, Any]):
    """Config, processor and a 4-row batch (one 448 x 448 image + ~512 text tokens each)."""
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig

    from offside_jax.models.vision_inputs import VisionProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    tok = Tokenizer(models.BPE())  # byte level: one token per character of the question
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(sorted(pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=special[1:])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    text = {**VL_3B_TEXT, **p.get("text", {})}
    config = Qwen2_5_VLConfig(
        text_config=dict(text, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config={**VL_3B_VISION, **p.get("vision", {})}, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    rng = np.random.default_rng(0)
    side = p["image_side"]
    records = []
    for _ in range(p["rows"]):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        words = " ".join(f"w{x}" for x in rng.integers(0, 1000, p["text_tokens"] // 4))[: p["text_tokens"]]
        records.append({"messages": [{"role": "user", "content": "<image>\n" + words},
                                     {"role": "assistant", "content": "The answer."}], "images": [image]})
    processor = VisionProcessor(config, tokenizer, max_pixels=side * side)
    return config, processor, records


@worker("gpu-vl-ours")
def _gpu_vl_ours(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from offside_jax.models.auto import create_model
    from offside_jax.models.generate import SamplingConfig, generate
    from offside_jax.train import losses

    if (skip := _skip(p)) is not None:
        return skip
    config, processor, records = _vl_3b_setup(p)
    model = create_model(config, seed=0, dtype="bfloat16", param_dtype="bfloat16", attention=p["attention"])
    host = dict(processor(records, pad_multiple=64))
    host["loss_mask"] = np.asarray(host["attention_mask"], np.int32)
    step, batch, compile_s, _ = _jax_train_step(model, losses.make_answer_nll(4096), p, host)
    train = _time_jax_step(step, batch, p)
    del step, batch
    prompts = processor([{**r, "messages": r["messages"][:1]} for r in records], pad_multiple=1)
    sampling = SamplingConfig(max_new_tokens=p["new_tokens"], eos_token_ids=(), pad_token_id=0)
    generate(model, prompts, sampling)  # compile
    wall, _ = time_steps(lambda: generate(model, prompts, sampling), 0, p["repeats"])
    return {"step_seconds": train["step_seconds"], "generate_seconds": wall, "compile_seconds": compile_s,
            "sequence_length": int(host["input_ids"].shape[1]), **_device_facts()}


@worker("gpu-vl-torch")
def _gpu_vl_torch(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = _torch_setup(p)
    config, processor, records = _vl_3b_setup(p)
    with device:
        model = Qwen2_5_VLForConditionalGeneration(config).train()

    def torch_inputs(recs):
        batch = processor(recs, pad_multiple=1)
        encoded = [processor.encode(r) for r in recs]
        ids = torch.from_numpy(np.asarray(batch["input_ids"])).long().to(device)
        return dict(
            input_ids=ids, attention_mask=torch.from_numpy(np.asarray(batch["attention_mask"])).long().to(device),
            pixel_values=torch.from_numpy(np.concatenate([e.pixel_values for e in encoded])).to(device),
            image_grid_thw=torch.from_numpy(np.concatenate([e.image_grid_thw for e in encoded])).to(device),
            mm_token_type_ids=(ids == config.image_token_id).long(),
        )

    train_inputs = torch_inputs(records)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**train_inputs, labels=train_inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_seconds = _torch_time(step, p)
    model.eval()
    prompt_inputs = torch_inputs([{**r, "messages": r["messages"][:1]} for r in records])

    def gen():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.generate(**prompt_inputs, max_new_tokens=p["new_tokens"], min_new_tokens=p["new_tokens"],
                           do_sample=False, pad_token_id=0)

    return {"step_seconds": step_seconds, "generate_seconds": _torch_time(gen, {**p, "warmup": 1}),
            **_torch_device_facts()}


@benchmark("gpu_vl")
def bench_gpu_vl(args: argparse.Namespace) -> dict[str, Any]:
    """Qwen2.5-VL-3B shape: training step on 4 x (448 x 448 image + 512 text tokens); generation."""
    p0 = _params(args, rows=4, image_side=448, text_tokens=512, new_tokens=64, attention="auto", repeats=3)
    ours, ref = _run_pair("gpu-vl-ours", "gpu-vl-torch", p0, args.threads)
    if "skipped" in ours:
        return {"benchmark": "gpu_vl", "ours": None, "reference": None, "speedup": None, **ours}
    train = _side_by_side("gpu_vl train", ours, ref, "step_seconds", "s/step",
                          compile_seconds=round(ours["compile_seconds"], 1), sequence_length=ours["sequence_length"])
    gen = _side_by_side("gpu_vl generate", ours, ref, "generate_seconds", "s/request")
    return {"benchmark": "gpu_vl", "unit": "s/step", "ours": train["ours"], "reference": train.get("reference"),
            "speedup": train.get("speedup"), "rows": {"train": train, "generate": gen}, "targets": {"speedup": 1.3},
            "config": {"model": "Qwen2.5-VL-3B shape (random init)", "text": VL_3B_TEXT, "vision": VL_3B_VISION,
                       "rows": p0["rows"], "image": f"{p0['image_side']}x{p0['image_side']}",
                       "text_tokens": p0["text_tokens"], "new_tokens": p0["new_tokens"],
                       "ours": "bf16 compute, fp32 master weights, AdamW; jitted prefill + while_loop decode",
                       "reference": "transformers under bf16 autocast, fp32 params, fused AdamW; generate (greedy)"}}


# -- gpu_decode --------------------------------------------------------------------------------


@worker("gpu-decode-ours")
def _gpu_decode_ours(p: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx

    from offside_jax.models.auto import create_model
    from offside_jax.models.generate import SamplingConfig, generate

    if (skip := _skip(p)) is not None:
        return skip
    cfg = _llama_config(p)
    model = create_model(cfg, seed=0, dtype="bfloat16", param_dtype="bfloat16", attention=p["attention"])
    ids = _token_batch(p["batch"], p["prompt"], cfg.vocab_size)["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    sampling = SamplingConfig(max_new_tokens=p["new"], eos_token_ids=(), pad_token_id=0)
    generate(model, inputs, sampling)  # compile
    runs = [generate(model, inputs, sampling) for _ in range(p["repeats"])]
    step_s = statistics.median(r.decode_seconds for r in runs) / (p["new"] - 1)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    shape = perf.TransformerShape.from_hf(cfg)
    cache_bytes = perf.kv_cache_bytes(shape, p["batch"], p["prompt"] + p["new"], 2)
    bandwidth = measured_read_bandwidth(p.get("bandwidth_bytes", 4 << 30))
    roofline = perf.decode_roofline(weight_bytes, cache_bytes, step_s, bandwidth, p["batch"])
    return {"seconds": [r.prefill_seconds + r.decode_seconds for r in runs], "decode": roofline.as_dict(),
            "hbm_read_gbs_measured": round(bandwidth / 1e9, 1), **_device_facts()}


@worker("gpu-decode-torch")
def _gpu_decode_torch(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    device = _torch_setup(p)
    with device:
        model = LlamaForCausalLM(_llama_config(p)).to(torch.bfloat16).eval()
    ids = torch.tensor(_token_batch(p["batch"], p["prompt"], model.config.vocab_size)["input_ids"], dtype=torch.long,
                       device=device)
    extra = {"cache_implementation": "static"} if p["cache"] == "static" else {}

    def one():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=p["new"],
                           min_new_tokens=p["new"], pad_token_id=0, **extra)

    return {"seconds": _torch_time(one, {**p, "warmup": 1}), **_torch_device_facts()}


@benchmark("gpu_decode")
def bench_gpu_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy decode of the 1B Llama shape in bf16 (128-token prompts, 256 new tokens), batch 16 and 64."""
    p0 = _params(args, prompt=128, new=256, repeats=3, attention="auto", batches=[16, 64],
                 caches=["dynamic", "static"])
    rows = {}
    for batch in p0["batches"]:
        p = {**p0, "batch": batch}
        ours = run_worker("gpu-decode-ours", p, args.threads, platforms=None)
        if "skipped" in ours:
            return {"benchmark": "gpu_decode", "ours": None, "reference": None, "speedup": None, **ours}
        tokens = batch * p["new"]
        row = {"ours_tokens_per_second": round(tokens / statistics.median(ours["seconds"]), 1),
               "bandwidth_fraction": round(ours["decode"]["bandwidth_fraction"], 3),
               "hbm_read_gbs_measured": ours["hbm_read_gbs_measured"],
               "ours_peak_device_memory_gib": ours["peak_device_memory_gib"]}
        for cache in p0["caches"]:
            try:
                ref = run_worker("gpu-decode-torch", {**p, "cache": cache}, args.threads, platforms=None)
            except RuntimeError as e:
                row[f"transformers_{cache}_error"] = str(e)[-300:]
                continue
            ref_s = statistics.median(ref["seconds"])
            row[f"transformers_{cache}_tokens_per_second"] = round(tokens / ref_s, 1)
            row[f"speedup_vs_{cache}"] = round(ref_s / statistics.median(ours["seconds"]), 3)
        rows[f"batch{batch}"] = row
    first = rows[f"batch{p0['batches'][0]}"]
    return {"benchmark": "gpu_decode", "unit": "tokens/s", "ours": first["ours_tokens_per_second"],
            "reference": first.get("transformers_dynamic_tokens_per_second"),
            "speedup": first.get("speedup_vs_dynamic"), "rows": rows,
            "targets": {"bandwidth_fraction_batch16": 0.8, "speedup_vs_dynamic": 10.0},
            "config": {"model": "Llama-3.2-1B shape (random init), bf16", "prompt": p0["prompt"], "new": p0["new"],
                       "timed": "prefill + decode of every token (no EOS); the roofline uses decode steps only",
                       "reference": "transformers generate (greedy), bf16 weights, dynamic and static cache"}}
