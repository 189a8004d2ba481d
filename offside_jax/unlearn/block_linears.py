"""The linear layers of decoder blocks, addressed as ``(layer, "mlp.down_proj")``: read, tap, rewrite.

Weight edits that work on single matrices (ROCR, curvature editing) need three things from a
model: a matrix's kernel, the inputs the matrix sees on some batches, and the gradient of a
loss with respect to its outputs. All three go through the model's public interface
(``model.model.layers[i]`` and ``model.hidden_states``), so the Llama-family decoders and the
Qwen2.5-VL decoder (whose text stack is the same class) are served alike.

Kernels are stored ``[in, out]`` (the HF ``weight`` transposed), so an input row ``x`` maps to
``x @ kernel``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Target = tuple[int, str]  # (decoder layer index, dotted path inside the layer, e.g. "mlp.down_proj")


def linear(model: nnx.Module, target: Target) -> nnx.Module:
    """The ``Linear`` at ``target``; a message naming the path when it does not exist."""
    layer, path = target
    layers = model.model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist: the decoder has {len(layers)} layers")
    node = layers[layer]
    for part in path.split("."):
        if not hasattr(node, part):
            raise ValueError(f"model.layers.{layer} has no {path!r} (no attribute {part!r})")
        node = getattr(node, part)
    if not hasattr(node, "kernel"):
        raise ValueError(f"model.layers.{layer}.{path} is not a linear layer (no kernel)")
    return node


def kernel(model: nnx.Module, target: Target) -> jax.Array:
    """The ``[in, out]`` kernel at ``target``."""
    return linear(model, target).kernel[...]


def set_kernels(model: nnx.Module, kernels: Mapping[Target, jax.Array]) -> None:
    """Write new kernels into ``model`` in place, in each kernel's own dtype, shape and mesh
    placement. Only the base kernel changes: LoRA adapters, if attached, are left as they are
    (merge them first to edit the adapted weight)."""
    for target, value in kernels.items():
        lin = linear(model, target)
        old = lin.kernel[...]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"new kernel for model.layers.{target[0]}.{target[1]} has shape {tuple(value.shape)}, "
                             f"the model's is {tuple(old.shape)}")
        value = jnp.asarray(value, old.dtype)
        if isinstance(getattr(old, "sharding", None), NamedSharding):
            value = jax.device_put(value, old.sharding)
        lin.kernel[...] = value


def covariance_shardings(model: nnx.Module, target: Target) -> tuple[NamedSharding | None, NamedSharding | None]:
    """Shardings for ``[in, in]`` and ``[out, out]`` statistics of the layer at ``target``: rows
    split like the kernel's input and output dimension, so the statistics spread over the mesh
    the way the parameters do. ``None`` where the kernel has no mesh sharding (one device)."""
    sharding = getattr(kernel(model, target), "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    return (NamedSharding(sharding.mesh, PartitionSpec(spec[0], None)),
            NamedSharding(sharding.mesh, PartitionSpec(spec[1], None)))


def zeros_on(shape: tuple[int, ...], sharding: NamedSharding | None) -> jax.Array:
    """A float32 accumulator, placed on ``sharding`` when there is one."""
    zeros = jnp.zeros(shape, jnp.float32)
    return zeros if sharding is None else jax.device_put(zeros, sharding)


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """Keep an accumulator on its sharding inside a jitted update."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def shallow_copy(model: nnx.Module) -> nnx.Module:
    """A copy whose variables are new but whose arrays are shared: editing one of its kernels
    leaves ``model`` untouched and costs no parameter memory (``nnx.merge`` of the same state
    would share the variables too)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


class _Tap(nnx.Module):
    """Wraps a linear layer: hands its input to ``record`` and adds ``perturbation`` to its
    output (a zero perturbation whose gradient is the gradient w.r.t. the layer's output)."""

    def __init__(self, inner: nnx.Module, record: Callable[[jax.Array], None], perturbation: jax.Array | None):
        self.inner = inner
        self.record = record
        self.perturbation = nnx.data(perturbation)

    def __call__(self, x: jax.Array) -> jax.Array:
        self.record(x)
        y = self.inner(x)
        return y if self.perturbation is None else y + self.perturbation.astype(y.dtype)


@contextlib.contextmanager
def _tapped(model: nnx.Module, targets: Sequence[Target], perturbations: Mapping[Target, jax.Array] | None,
            captured: dict[Target, jax.Array]) -> Iterator[None]:
    parents = []
    for target in targets:
        layer, path = target
        parent_path, _, name = path.rpartition(".")
        parent = model.model.layers[layer]
        for part in filter(None, parent_path.split(".")):
            parent = getattr(parent, part)
        inner = linear(model, target)
        pert = None if perturbations is None else perturbations.get(target)
        setattr(parent, name, _Tap(inner, lambda x, t=target: captured.__setitem__(t, x), pert))
        parents.append((parent, name, inner))
    # A rematerialised layer runs under its own trace: a recorded input would leak out of it.
    # The statistics take one batch at a time, so they run without remat.
    remat = getattr(model, "remat", False)
    if remat:
        model.remat = False
    try:
        yield
    finally:
        for parent, name, inner in parents:
            setattr(parent, name, inner)
        if remat:
            model.remat = remat


def tapped_hidden_states(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    targets: Sequence[Target],
    perturbations: Mapping[Target, jax.Array] | None = None,
) -> tuple[jax.Array, list[jax.Array], dict[Target, jax.Array]]:
    """``model.hidden_states(batch, collect_hidden=True)`` while recording the input of each
    target linear layer ([B, T, in]) and adding ``perturbations[target]`` ([B, T, out]) to its
    output. Returns the final-normed hidden states, the residual stream after each layer and
    the recorded inputs. The taps are removed again before returning."""
    captured: dict[Target, jax.Array] = {}
    with _tapped(model, targets, perturbations, captured):
        hidden, per_layer = model.hidden_states(batch, collect_hidden=True)
    missing = [t for t in targets if t not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never called {missing}")
    return hidden, per_layer, captured
