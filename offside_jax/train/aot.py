"""Ahead-of-time compilation: how much device memory a step needs, known before it runs.

``jax.jit(...).lower(abstract args).compile()`` builds the executable from shapes alone
(``TrainStep.compile``); XLA's buffer assignment then knows every byte the step will hold on
one device: its arguments (params/adapters, optimizer state, frozen weights, the batch), its
outputs, its temporaries (activations, gradients, collectives' buffers), minus what outputs
reuse from donated arguments. :func:`check_memory` compares that with the budget and stops
with both numbers before the first step, instead of an out-of-memory error deep in a run
(or, on TPU, a compile-time error naming HLO buffers).

The budget is the configured one (``train.memory_budget_gib``) or, where JAX reports it, the
device's own limit (``device.memory_stats()["bytes_limit"]`` on GPU and TPU). CPU devices
report none: there the check runs only with a configured budget. Jitted calls with the same
shapes reuse the executable compiled here, so the check costs no second compilation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

GIB = 1 << 30


class MemoryBudgetError(MemoryError):
    """A step needs more device memory than the budget; the message gives both numbers."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes of one compiled executable (from ``compiled.memory_analysis()``)."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # outputs written into donated argument buffers (counted once)
    code_bytes: int  # the executable itself: reported, not counted (small, and not per step)

    @property
    def required_bytes(self) -> int:
        """Bytes one device holds while the step runs: arguments + outputs + temporaries - aliased
        (MaxText's accounting)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def describe(self) -> str:
        return (
            f"{format_bytes(self.required_bytes)} per device (arguments {format_bytes(self.argument_bytes)} + "
            f"outputs {format_bytes(self.output_bytes)} + temporaries {format_bytes(self.temp_bytes)} - "
            f"aliased {format_bytes(self.alias_bytes)})"
        )

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "required_bytes": self.required_bytes}


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def memory_estimate(compiled: Any) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a ``jax.stages.Compiled`` executable."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend reports no memory analysis for compiled executables")
    return MemoryEstimate(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
    )


def device_memory_limit(device: Any | None = None) -> int | None:
    """Bytes the device may allocate, where JAX reports it (GPU, TPU); ``None`` on CPU."""
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    if not stats:
        return None
    limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    return int(limit) if limit else None


def memory_budget(budget_gib: float | None, device: Any | None = None) -> tuple[int | None, str]:
    """``(bytes, where it came from)``: the configured budget, else the device's limit, else none."""
    if budget_gib is not None:
        if budget_gib <= 0:
            raise ValueError(f"train.memory_budget_gib must be positive, got {budget_gib}")
        return int(budget_gib * GIB), "train.memory_budget_gib"
    limit = device_memory_limit(device)
    if limit is not None:
        return limit, "the device's bytes_limit"
    return None, "no budget (the device reports no memory limit; set train.memory_budget_gib)"


def check_memory(estimate: MemoryEstimate, budget_bytes: int | None, *, what: str = "the training step", source: str = "budget") -> None:
    """Raise :class:`MemoryBudgetError` when ``estimate`` needs more than ``budget_bytes``."""
    if budget_bytes is None or estimate.required_bytes <= budget_bytes:
        return
    raise MemoryBudgetError(
        f"{what} needs {estimate.required_bytes:,} bytes per device ({estimate.describe()}), but only "
        f"{budget_bytes:,} bytes ({format_bytes(budget_bytes)}, {source}) are available. Shard further "
        "(mesh.fsdp / mesh.tensor), use more micro-batches (data.micro_batches), rematerialise layers "
        "(model.remat=true), use LoRA, or shorten data.max_length."
    )


def check_train_step(step_fn: Any, host_batch: Any, budget_gib: float | None) -> tuple[MemoryEstimate, int | None, Any]:
    """Compile ``step_fn`` (a ``TrainStep``) for batches like ``host_batch`` and check it fits.

    Returns ``(estimate, budget bytes or None, compiled)``; raises :class:`MemoryBudgetError`
    before anything is allocated for training when it does not fit.
    """
    compiled = step_fn.compile(step_fn.abstract_batch(host_batch))
    estimate = memory_estimate(compiled)
    budget, source = memory_budget(budget_gib)
    check_memory(estimate, budget, source=source)
    return estimate, budget, compiled


__all__ = [
    "MemoryBudgetError",
    "MemoryEstimate",
    "check_memory",
    "check_train_step",
    "device_memory_limit",
    "format_bytes",
    "memory_budget",
    "memory_estimate",
]
