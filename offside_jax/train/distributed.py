"""Multi-process runs: one JAX process per host (TPU VM worker, GPU node, or local process).

Every process runs the same program. :func:`initialize` joins them into one JAX runtime
(``jax.distributed.initialize``) *before anything touches a device*; after that
``jax.devices()`` lists the devices of every process, meshes span hosts, and the jitted
training step runs as one SPMD program. What each process still does on its own:

- **data**: it reads only its own rows of every global batch (:func:`process_rows` says
  which), and ``jax.make_array_from_process_local_data`` assembles the global batch
  (``TrainStep.shard_batch``);
- **files**: checkpoints are written and read collectively by orbax (every process calls
  save/restore; each writes its own shards); metrics, progress bars, configs and exports are
  written by process 0 only (:func:`is_primary`).

Where the settings come from (``offside_jax.config.DistributedConfig``, ``distributed.*``):

- ``mode: off`` never initializes (one process, whatever the environment says);
- ``mode: on`` always initializes; unset fields are filled by JAX's own cluster detection
  (Cloud TPU VMs and pod slices, SLURM, Open MPI, Kubernetes) or the environment;
- ``mode: auto`` (default) initializes when there is a clear sign of a multi-process launch:
  a coordinator address in the config or ``JAX_COORDINATOR_ADDRESS``, or a SLURM step with
  more than one task. A single process otherwise.

Explicit local set-up (what the tests and a several-GPU-host launch use)::

    offside-jax finetune --config cfg.yaml distributed.coordinator_address=10.0.0.1:8476 \\
        distributed.num_processes=2 distributed.process_id=$RANK

``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` fill ``num_processes``/``process_id`` when the
config leaves them unset (``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS`` are read
by JAX itself). On CPU, cross-process collectives use gloo.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

MODES = ("off", "auto", "on")


class DistributedError(RuntimeError):
    """Joining the processes failed; the message names the coordinator and this process."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    index: int
    count: int
    initialized: bool  # whether jax.distributed was initialized by this call or earlier
    local_devices: int
    global_devices: int


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def multi_process_signs(cfg: Any) -> list[str]:
    """Reasons to believe this is one process of a multi-process launch (``mode: auto``)."""
    signs = []
    if getattr(cfg, "coordinator_address", None):
        signs.append("distributed.coordinator_address is set")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        signs.append("JAX_COORDINATOR_ADDRESS is set")
    slurm_tasks = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if slurm_tasks is not None and slurm_tasks > 1:
        signs.append(f"SLURM step with {slurm_tasks} tasks")
    return signs


def initialize(cfg: Any | None = None) -> ProcessInfo:
    """Join the processes of a run (see the module docstring); a no-op for one process.

    ``cfg`` is a ``DistributedConfig`` (or anything with its fields); ``None`` means
    ``mode: auto`` with nothing configured. Call it once, first thing in a command: JAX
    refuses to initialize after a device has been used. Calling it again (e.g. a second run
    in the same process) is harmless.
    """
    mode = getattr(cfg, "mode", "auto")
    if mode not in MODES:
        raise DistributedError(f"distributed.mode {mode!r} is not one of {', '.join(MODES)}")
    wanted = mode == "on" or (mode == "auto" and bool(multi_process_signs(cfg)))
    if wanted and not jax.distributed.is_initialized():
        # gloo: the CPU client's cross-process collectives (it only concerns CPU devices, so it
        # is harmless on TPU/GPU hosts, whose collectives are their own).
        cpu_collectives = getattr(cfg, "cpu_collectives", "gloo")
        if cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        address = getattr(cfg, "coordinator_address", None)
        count = getattr(cfg, "num_processes", None)
        index = getattr(cfg, "process_id", None)
        count = _env_int("JAX_NUM_PROCESSES") if count is None else count
        index = _env_int("JAX_PROCESS_ID") if index is None else index
        local_ids = getattr(cfg, "local_device_ids", None)
        kwargs: dict[str, Any] = dict(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            local_device_ids=list(local_ids) if local_ids else None,
            initialization_timeout=int(getattr(cfg, "timeout_s", 300)),
        )
        detection = getattr(cfg, "cluster_detection", None)
        if detection:
            kwargs["cluster_detection_method"] = detection
        # JAX aborts the process (no Python exception) when the coordinator stays unreachable:
        # say first what this process is trying to join, so that abort has a context.
        print(
            f"joining a multi-process run: process {index if index is not None else '(auto)'} of "
            f"{count if count is not None else '(auto)'}, coordinator "
            f"{address or os.environ.get('JAX_COORDINATOR_ADDRESS') or '(auto-detected)'}, "
            f"timeout {kwargs['initialization_timeout']} s",
            file=sys.stderr,
            flush=True,
        )
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:  # noqa: BLE001 - JAX raises several types; say who failed to join what
            where = address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "an auto-detected coordinator"
            raise DistributedError(
                f"process {index if index is not None else '?'} of {count if count is not None else '?'} "
                f"could not join the run at {where}: {type(e).__name__}: {e}. Check that every process uses "
                "the same coordinator address and process count, that process 0 is running and its port is "
                "reachable, and that no device was used before initialization."
            ) from e
    return ProcessInfo(
        index=jax.process_index(),
        count=jax.process_count(),
        initialized=jax.distributed.is_initialized(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
    )


def is_primary() -> bool:
    """Whether this process writes logs, configs, reports and exports (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to do for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(sharding: NamedSharding, global_rows: int, micro_batches: int = 1) -> np.ndarray:
    """Global row indices of a batch that this process must supply, in the order it supplies them.

    A batch of ``global_rows`` rows becomes ``[micro_batches, global_rows / micro_batches, ...]``
    laid out by ``sharding`` (rows of each micro-batch over ``data`` x ``fsdp``); row ``r`` of
    micro-batch ``m`` is global row ``m * global_rows / micro_batches + r``. This process holds
    a contiguous block of rows of every micro-batch; the result lists, micro-batch by
    micro-batch, the global rows of those blocks, so that ``batch[process_rows(...)]`` is
    exactly the process-local data ``jax.make_array_from_process_local_data`` expects.
    One process: ``arange(global_rows)``.
    """
    if global_rows % micro_batches:
        raise ValueError(f"{global_rows} rows do not split into {micro_batches} micro-batches")
    per_micro = global_rows // micro_batches
    try:
        blocks = sharding.addressable_devices_indices_map((micro_batches, per_micro))
    except ValueError as e:  # jax's IndivisibleError is a ValueError
        raise ValueError(f"{per_micro} rows per micro-batch do not split over the batch devices: {e}") from None
    held = np.zeros(per_micro, bool)
    for index in blocks.values():
        held[index[1]] = True
    (rows,) = np.nonzero(held)
    if rows[-1] - rows[0] + 1 != len(rows):
        raise ValueError(
            f"process {jax.process_index()} holds rows {rows.tolist()} of each micro-batch, not one "
            "contiguous block; build the mesh with each process's devices next to each other"
        )
    return (np.arange(micro_batches)[:, None] * per_micro + rows[None, :]).reshape(-1)


def global_batch(batch: Any, sharding: NamedSharding) -> dict:
    """A host batch ``{name: [rows, ...]}`` (every row, the same in every process) as global
    arrays with rows laid out by ``sharding`` (``[rows, ...]`` layout): each process hands over
    only the rows its devices hold. One process: the batch placed by ``sharding``."""
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    n = len(next(iter(arrays.values())))
    mesh, spec = sharding.mesh, sharding.spec
    rows = process_rows(NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec)), n, 1)
    return {k: jax.make_array_from_process_local_data(sharding, v[rows]) for k, v in arrays.items()}


def rows_on_mesh(batch: Any, mesh: Any) -> Any:
    """A host batch ``{name: [rows, ...]}`` (the same in every process) for a jitted function
    whose arrays live on ``mesh``: as it is in one process (jit places it), over several the
    global arrays of :func:`global_batch` with rows over ``data`` x ``fsdp`` (each process hands
    over the rows its devices hold, so each process's devices compute their own rows)."""
    if jax.process_count() == 1:
        return batch
    from offside_jax.train import mesh as mesh_lib

    sharding = mesh_lib.batch_sharding(mesh, micro_batched=False)
    rows = len(next(iter(batch.values())))
    if rows % mesh_lib.batch_divisor(mesh):
        raise ValueError(f"a batch of {rows} rows does not split over the mesh's {mesh_lib.batch_divisor(mesh)} "
                         "data x fsdp devices; use a batch size that is a multiple of it")
    return global_batch(batch, sharding)


def mesh_of(tree: Any) -> Any:
    """The mesh the arrays of ``tree`` are placed on (``None`` when they are not on one)."""
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None:
            return mesh
    return None


def _numpy_to_python(value: Any) -> Any:
    """JSON's fallback for numpy scalars and arrays (NaN stays NaN, unlike ``files.jsonable``)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot travel between processes as JSON")


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, in process order, in every process (collective: every
    process calls it). Values travel as JSON (plain data: dicts with string keys, lists,
    strings, numbers, None; floats round-trip exactly, NaN included), never pickled."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, default=_numpy_to_python).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(everything[i, : int(n)].tobytes().decode("utf-8")) for i, n in enumerate(sizes)]


def to_host(tree: Any) -> Any:
    """Numpy copies of every array of ``tree``, complete in every process.

    Arrays sharded across processes are all-gathered (every process must call this);
    fully addressable ones are simply copied to the host.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(gather, tree)


__all__ = [
    "DistributedError",
    "MODES",
    "ProcessInfo",
    "barrier",
    "gather_objects",
    "global_batch",
    "initialize",
    "is_primary",
    "mesh_of",
    "multi_process_signs",
    "process_rows",
    "rows_on_mesh",
    "to_host",
]
