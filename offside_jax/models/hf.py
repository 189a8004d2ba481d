"""Hugging Face weight I/O: safetensors <-> NNX params, tensor by tensor, onto shardings.

Our parameter paths mirror the HF module names, so the mapping is declarative: join the
path with dots and rename the leaf (``kernel`` -> ``weight`` transposed, ``embedding`` ->
``weight``). Families whose saved names differ from the in-memory ones (Qwen2.5-VL) give a
list of candidate names per parameter; the first present in the checkpoint is used.

Loading never builds the whole model in host memory: each tensor (or, with a sharding, each
device's slice of it) is read from its file and placed directly, and the model is created
abstractly first. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.files import write_json
from offside_jax.models.layers import logical_axes_of

Path_ = tuple[Any, ...]
# (path, logical axes, shape) -> where to place the tensor (None: default device).
ShardingFn = Callable[[Path_, tuple, tuple[int, ...]], "jax.sharding.Sharding | None"]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and tensor."""


# -- names -------------------------------------------------------------------------------------


def path_to_str(path: Path_) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def hf_name(path: Path_) -> tuple[str, bool]:
    """HF tensor name of one of our parameter paths, and whether it is stored transposed."""
    parts = [str(getattr(p, "key", p)) for p in path]
    leaf = parts[-1]
    if leaf == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    if leaf == "embedding":
        return ".".join(parts[:-1] + ["weight"]), False
    return ".".join(parts), False


def iter_params(model: nnx.Module) -> Iterator[tuple[Path_, nnx.Param]]:
    """(path, Param variable) of every parameter, in a deterministic order."""
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        yield tuple(path), var


# -- tensor sources ----------------------------------------------------------------------------


class TensorSource(Protocol):
    """Named tensors readable one at a time (and by slice, for sharded placement)."""

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


class DictSource:
    """Tensors already in memory (e.g. a transformers state dict converted to numpy)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], origin: str = "<state dict>"):
        self.tensors, self.origin = dict(tensors), origin

    def names(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name])

    def where(self, name: str) -> str:
        return self.origin


class SafetensorsSource:
    """One or many ``*.safetensors`` files of a checkpoint directory (with or without index)."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / SAFE_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files (and no {SAFE_INDEX})")
            weight_map = None
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        for fname in files:
            path = self.directory / fname
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {SAFE_INDEX} but missing")
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error type for corrupt headers
                raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
            self._handles[fname] = handle
            for key in handle.keys():
                self._file_of[key] = fname
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self._file_of:
                    raise CheckpointError(f"{self.directory / fname}: index lists tensor {key!r} but the file lacks it")

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def where(self, name: str) -> str:
        return str(self.directory / self._file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.where(name)}: cannot read tensor {name!r} (truncated file?): {e}") from None

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        try:
            return self._handles[self._file_of[name]].get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{self.where(name)}: cannot read tensor {name!r} (truncated file?): {e}") from None


# -- loading -----------------------------------------------------------------------------------

NameFn = Callable[[Path_], list[tuple[str, bool]]]


def default_names(path: Path_) -> list[tuple[str, bool]]:
    return [hf_name(path)]


def load_params_into(
    model: nnx.Module,
    source: TensorSource,
    *,
    names: NameFn = default_names,
    sharding_fn: ShardingFn | None = None,
    transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> nnx.Module:
    """Fill every Param of ``model`` (abstract or concrete) from ``source``, in place.

    Each tensor is checked against the parameter's shape and cast to its dtype. With a
    ``sharding_fn`` and a source that can read slices, each device reads only its slice.
    ``transforms`` maps HF names to functions applied to the raw tensor (e.g. GGUF un-permute).
    Raises :class:`CheckpointError` naming the tensor for a missing or mis-shaped tensor.
    """
    available = set(source.names())
    transforms = transforms or {}
    where = getattr(source, "where", lambda n: "checkpoint")
    for path, var in iter_params(model):
        candidates = names(path)
        found = next(((n, t) for n, t in candidates if n in available), None)
        if found is None:
            tried = " or ".join(repr(n) for n, _ in candidates)
            raise CheckpointError(f"checkpoint is missing tensor {tried} (parameter {path_to_str(path)})")
        name, transposed = found
        expected = tuple(var.get_value().shape)
        stored = tuple(source.shape(name))
        want_stored = expected[::-1] if transposed else expected
        if stored != want_stored:
            raise CheckpointError(
                f"{where(name)}: tensor {name!r} has shape {stored}, expected {want_stored} "
                f"(parameter {path_to_str(path)} of shape {expected})"
            )
        dtype = var.get_value().dtype
        sharding = sharding_fn(path, logical_axes_of(var), expected) if sharding_fn else None
        var.set_value(_place(source, name, transposed, transforms.get(name), expected, dtype, sharding))
    return model


def _place(source, name, transposed, transform, shape, dtype, sharding) -> jax.Array:
    def host(index: tuple[slice, ...] | None) -> np.ndarray:
        if transform is None and index is not None and hasattr(source, "read_slice"):
            stored_index = index[::-1] if transposed else index
            t = source.read_slice(name, tuple(stored_index))
            return np.ascontiguousarray(t.T if transposed else t).astype(dtype)
        t = source.read(name)
        if transform is not None:
            t = transform(t)
        t = t.T if transposed else t
        return np.ascontiguousarray(t if index is None else t[index]).astype(dtype)

    if sharding is None:
        return jnp.asarray(host(None))
    return jax.make_array_from_callback(shape, sharding, lambda idx: host(tuple(idx)))


def load_hf_config(directory: str | os.PathLike):
    """The transformers config of a checkpoint directory (offline; config.json only)."""
    from transformers import AutoConfig

    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_pretrained(
    directory: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
    attention: str = "auto",
    sharding_fn: ShardingFn | None = None,
) -> nnx.Module:
    """Load an HF checkpoint directory (config.json + safetensors) into our model."""
    from offside_jax.models.auto import create_model, family_of

    hf_config = load_hf_config(directory)
    family = family_of(hf_config)
    model = create_model(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention,
                         abstract=True)
    load_params_into(model, SafetensorsSource(directory), names=family.hf_names, sharding_fn=sharding_fn)
    return model


# -- export ------------------------------------------------------------------------------------


def state_dict(model_or_state: nnx.Module | nnx.State, names: NameFn = default_names) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of every parameter (the first candidate name of each)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, transposed = names(tuple(path))[0]
        value = np.asarray(jax.device_get(var.get_value()))
        out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


def save_pretrained(
    model: nnx.Module,
    hf_config: Any,
    directory: str | os.PathLike,
    *,
    names: NameFn = default_names,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write config.json + safetensors (sharded with an index past ``max_shard_bytes``).

    Files are written under temporary names and renamed at the end, so an interrupted export
    never leaves a directory that looks complete.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict(model, names)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    files = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    pending = []
    for fname, shard in zip(files, shards):
        tmp = directory / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        pending.append((tmp, directory / fname))
    for tmp, final in pending:
        os.replace(tmp, final)
    if len(shards) > 1:  # the index last: it names shards that are all in place
        write_json(directory / SAFE_INDEX, {
            "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
            "weight_map": {name: fname for fname, shard in zip(files, shards) for name in shard},
        })
    if hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(str(directory))
    else:
        write_json(directory / "config.json", hf_config)
    return directory
