"""What every benchmark of ``scripts/bench.py`` shares: the registries, subprocess workers,
timing, the comparison fields and the machine's measured limits. Benchmark families live in
their own modules (``bench.py`` for CPU, ``bench_gpu.py`` for one GPU) and register here."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

# Workers run as ``python scripts/bench.py --worker NAME``: bench.py imports every family.
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")

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


def thread_env(threads: int, platforms: str | None = "cpu") -> dict[str, str]:
    """Environment of a worker; ``platforms=None`` lets JAX pick its accelerator."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    if platforms is not None:
        env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", platforms)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_worker(name: str, params: dict[str, Any], threads: int, platforms: str | None = "cpu") -> dict[str, Any]:
    """Run worker ``name`` in a subprocess; its last stdout line is its JSON result."""
    cmd = [sys.executable, BENCH_SCRIPT, "--worker", name, "--params", json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads, platforms))
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


def comparison(name: str, ours: dict[str, Any], ref: dict[str, Any], unit: str, *, seconds_key: str = "seconds",
               per: float | None = None, digits: int = 4) -> dict[str, Any]:
    """The fields every comparison with the reference reports, from two workers' results: each
    side's figure (median of ``seconds_key``, or ``per / seconds`` for a rate such as tokens/s),
    the speedup in wall and in CPU time, and each side's CPU seconds and peak memory."""
    ours_s, ref_s = statistics.median(ours[seconds_key]), statistics.median(ref[seconds_key])
    ours_cpu, ref_cpu = statistics.median(ours["cpu_seconds"]), statistics.median(ref["cpu_seconds"])
    figure = (lambda s: s) if per is None else (lambda s: per / s)
    return {
        "benchmark": name,
        "ours": round(figure(ours_s), digits),
        "reference": round(figure(ref_s), digits),
        "unit": unit,
        "speedup": round(ref_s / ours_s, 3),
        "speedup_cpu_time": round(ref_cpu / ours_cpu, 3),
        "ours_cpu_seconds": round(ours_cpu, 3),
        "reference_cpu_seconds": round(ref_cpu, 3),
        "ours_peak_rss_mib": round(ours["peak_rss_mib"], 1),
        "reference_peak_rss_mib": round(ref["peak_rss_mib"], 1),
    }


# -- the machine and its limits ------------------------------------------------------------------


def machine_description(threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, library versions and JAX's devices (from a worker process)."""
    import platform
    from importlib import metadata

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory_gib = round(total_kib / (1 << 20), 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "benchmark_threads": threads,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "jax_devices": run_worker("devices", {}, threads, platforms=None),
    }


@worker("devices")
def _devices(p: dict[str, Any]) -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "count": len(devices),
        "kinds": sorted({d.device_kind for d in devices}),
        "process_count": jax.process_count(),
    }


def matmul_flops_wall_and_cpu(dtype: str, n: int, repeats: int = 5) -> tuple[float, float]:
    """Best FLOP/s of a jitted n x n x n matmul in ``dtype`` on JAX's default device, per second
    of wall time and per second of process CPU time (on a CPU shared with other work the
    steadier measure), both from the same timed runs."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    wall, cpu = time_steps(lambda: matmul(a, b).block_until_ready(), 2, repeats)
    return 2.0 * n**3 / min(wall), 2.0 * n**3 / min(cpu)


def measured_matmul_flops(dtype: str, n: int, repeats: int = 5, per_cpu_second: bool = False) -> float:
    """One of the two figures of :func:`matmul_flops_wall_and_cpu` (wall time by default)."""
    wall, cpu = matmul_flops_wall_and_cpu(dtype, n, repeats)
    return cpu if per_cpu_second else wall


@worker("peak-flops")
def _peak_flops(p: dict[str, Any]) -> dict[str, Any]:
    """This CPU's matmul peak: the best of fp32 matmuls of a few sizes (XLA threads), per
    second of wall time and per second of CPU time."""
    sizes = p.get("sizes", (1024, 2048, 3072))
    measured = {n: matmul_flops_wall_and_cpu("float32", n) for n in sizes}
    wall = {n: w for n, (w, _) in measured.items()}
    cpu = {n: c for n, (_, c) in measured.items()}
    return {"peak_flops": max(wall.values()), "peak_flops_per_cpu_second": max(cpu.values()),
            "by_size": {str(n): f for n, f in wall.items()}}


def measured_read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Best bytes/s of a jitted reduction over ``nbytes`` of bf16 (each byte read once) on
    JAX's default device: the HBM bandwidth a decode step can hope for."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    wall, _ = time_steps(lambda: total(x).block_until_ready(), 2, repeats)
    return nbytes / min(wall)
