"""`make demo` / `offside-jax demo`: the OFFSIDE benchmark, end to end, on a laptop's CPU.

Runs ``offside_jax.benchmark`` with ``configs/demo.yaml`` (the built-in defaults when that
file is not at hand): a 20-player synthetic release, a tiny Qwen2.5-VL trained from scratch
to memorise it (vanilla) and its retain-only twin, GA, GradDiff, KL, NPO, SimNPO, IdK and SSD
(LoRA for the loss methods), every test set, the attacks, corrective relearning, and the
report in ``results/demo/``. The SmolLM2 question-answering demo that used to live here is
``offside-jax chat-demo`` (``offside_jax.chat_demo``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DEFAULT_CONFIG = Path("configs") / "demo.yaml"


def run_demo(config: str | None = None, overrides: Sequence[str] = ()) -> int:
    """Run the benchmark demo; returns a process exit code. A config problem raises
    ``ConfigError``, which the command line reports (exit 2)."""
    from offside_jax.benchmark import load_benchmark_config, run_benchmark
    from offside_jax.eval.report import method_table

    path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = load_benchmark_config(path, overrides)
    if path is None:
        print(f"({DEFAULT_CONFIG} not found: running the built-in demo settings)")
    results = run_benchmark(cfg)
    print()
    print(method_table(results))
    return 0
