"""Device mesh and the one logical-axis rules table.

The mesh always has the three axes ``data``, ``fsdp`` and ``tensor`` (any of them may have
size 1), built with explicit ``AxisType.Auto`` so XLA propagates shardings from the inputs
and parameters. A (1, 1, 1) mesh on one CPU is just the smallest case of the same code.

Parameters and activations carry *logical* axis names (``offside_jax.models.layers``);
:data:`LOGICAL_AXIS_RULES` maps each name onto mesh axes. That table is the only place that
decides how anything is sharded:

- ``embed`` (the model width of every weight) over ``fsdp``: fully-sharded data parallel,
  XLA all-gathers each weight where it is used;
- ``heads``, ``kv_heads``, ``mlp``, ``vocab`` over ``tensor``: Megatron-style tensor
  parallelism;
- ``batch`` over ``data`` and ``fsdp`` together (FSDP devices each see their own rows).

A dimension whose size the mesh axes do not divide stays replicated (tiny test models, a
vocabulary of odd size) instead of failing: sharding is a layout, never a semantic choice.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from offside_jax.models.layers import logical_axes_of

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes; ``-1`` (at most one) takes the devices the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed axes {sizes}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs {math.prod(sizes)} devices, "
                f"but {num_devices} are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(shape: MeshShape | Sequence[int] | Mapping[str, int] = MeshShape(), devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all) with ``AxisType.Auto``.

    A fully specified shape (no ``-1``) smaller than the devices available uses the first
    devices only, with a warning (a one-device debugging run on a multi-device host).
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        shape = MeshShape(**shape)
    elif not isinstance(shape, MeshShape):
        shape = MeshShape(*shape)
    fixed = (shape.data, shape.fsdp, shape.tensor)
    if -1 not in fixed and 0 < math.prod(fixed) < len(devices) and all(s > 0 for s in fixed):
        warnings.warn(f"mesh {fixed} uses {math.prod(fixed)} of the {len(devices)} devices available", stacklevel=2)
        devices = devices[: math.prod(fixed)]
    sizes = shape.resolve(len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_for_shape(shape: Sequence[int]) -> Mesh:
    """The mesh of a configured ``(data, fsdp, tensor)`` shape: a fully specified one takes the
    first devices without :func:`make_mesh`'s warning (a small run on purpose), one with a
    ``-1`` spreads over every device."""
    shape = tuple(shape)
    return make_mesh(shape, None if -1 in shape else jax.devices()[: int(np.prod(shape))])


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions have ``logical_axes``.

    Unknown logical names raise (a typo would otherwise silently replicate a weight). A mesh
    axis is used at most once per array, and a dimension the mesh axes do not divide stays
    replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(logical_axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {', '.join(sorted(table))}")
        target = table[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State | nnx.Module, mesh: Mesh) -> dict:
    """NamedSharding of every variable in an NNX state (or module), as a pure nested dict.

    The result has the structure of ``nnx.to_pure_dict(state)`` (how the training state
    stores parameters), each leaf placed by its ``logical_axes`` metadata.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, logical_to_spec(logical_axes_of(v), v.get_value().shape, mesh)),
        state,
        is_leaf=_is_variable,
    )
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


def shardings_like(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. an optax state) that embeds copies of the params structure.

    Every subtree with exactly the params' structure (Adam's ``mu`` and ``nu``, a reference
    copy) takes the params' shardings; every other leaf (step counters) is replicated.
    """
    params_def = jax.tree.structure(params)

    def is_params_like(node: Any) -> bool:
        try:
            return jax.tree.structure(node) == params_def
        except Exception:  # noqa: BLE001 - unflattenable leaves are simply not params-like
            return False

    return jax.tree.map(
        lambda node: params_shardings if is_params_like(node) else replicated(mesh),
        tree,
        is_leaf=is_params_like,
    )


def batch_sharding(mesh: Mesh, micro_batched: bool = True) -> NamedSharding:
    """Sharding of batch arrays: rows over ``data`` x ``fsdp``, everything else replicated.

    ``micro_batched``: arrays are ``[micro_batches, rows, ...]`` (the step's layout), else
    ``[rows, ...]``. The spec names only the leading axes, so it fits arrays of any rank.
    """
    target = dict(LOGICAL_AXIS_RULES)["batch"]
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape[a] > 1)
    rows = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(None, rows) if micro_batched else PartitionSpec(rows))


def batch_divisor(mesh: Mesh) -> int:
    """How many rows (per micro-batch) the batch must be a multiple of on this mesh."""
    return int(np.prod([mesh.shape[a] for a in dict(LOGICAL_AXIS_RULES)["batch"]]))


def sharding_fn(mesh: Mesh) -> Callable[[tuple, tuple, tuple[int, ...]], NamedSharding]:
    """A ``sharding_fn(path, logical_axes, shape)`` for ``offside_jax.models.hf.load_params_into``,
    so each device reads only its slice of a checkpoint."""
    return lambda path, axes, shape: NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
