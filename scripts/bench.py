#!/usr/bin/env python
"""Benchmarks against the PyTorch/transformers reference: ``python scripts/bench.py [NAME] [--json FILE]``.

Each benchmark is a function registered with :func:`benchmark` that returns a dict with at
least ``benchmark``, ``ours``, ``reference``, ``unit``, ``speedup`` (reference cost / our cost:
above 1 means we are faster) and the configuration measured. One JSON object per benchmark is
printed; ``--json FILE`` also writes them all as a list. Without a NAME every benchmark runs.

Every measured side runs in its own subprocess (``--worker``), so its peak memory (max RSS)
is its own and the thread settings apply from interpreter start: XLA and torch both get
``--threads`` (default 2) CPU threads. Warm-up steps (compilation, first allocations) are
excluded on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {}
WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def benchmark(name: str):
    """Register a benchmark (``fn(args) -> result dict``)."""

    def add(fn):
        BENCHMARKS[name] = fn
        return fn

    return add


def worker(name: str):
    """Register a measurement that runs in a fresh subprocess (``fn(params) -> dict``)."""

    def add(fn):
        WORKERS[name] = fn
        return fn

    return add


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_worker(name: str, params: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run worker ``name`` in a subprocess; its last stdout line is its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--params", json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def time_steps(step: Callable[[], None], warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``repeats`` calls after ``warmup`` calls.

    CPU time (all threads) is reported beside wall time because it is far less sensitive to
    other processes competing for the cores of a shared machine.
    """
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


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
    ours_s, ref_s = statistics.median(ours["step_seconds"]), statistics.median(ref["step_seconds"])
    return {
        "benchmark": "train",
        "ours": round(ours_s, 4),
        "reference": round(ref_s, 4),
        "unit": "s/step",
        "speedup": round(ref_s / ours_s, 3),
        "speedup_cpu_time": round(statistics.median(ref["cpu_seconds"]) / statistics.median(ours["cpu_seconds"]), 3),
        "ours_cpu_seconds": round(statistics.median(ours["cpu_seconds"]), 3),
        "reference_cpu_seconds": round(statistics.median(ref["cpu_seconds"]), 3),
        "ours_peak_rss_mib": round(ours["peak_rss_mib"], 1),
        "reference_peak_rss_mib": round(ref["peak_rss_mib"], 1),
        "ours_first_step_seconds": round(ours["first_step_seconds"], 2),
        "lora_r8_qv_step_seconds": round(statistics.median(lora_run["step_seconds"]), 4),
        "lora_r8_qv_peak_rss_mib": round(lora_run["peak_rss_mib"], 1),
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
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", help="also write the results as a JSON list to this file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocation)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.params))))
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}")
    results = []
    for name in args.names or list(BENCHMARKS):
        result = BENCHMARKS[name](args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
