"""The training state and the pure, jitted training step.

State
-----
:class:`TrainState` is a pytree ``(step, params, opt_state, rng)``. ``params`` holds only the
*trainable* arrays as a pure nested dict with the model's HF-shaped paths: the LoRA adapters
when the model has adapters, otherwise every parameter. Frozen arrays (the base weights
under LoRA, or a frozen reference copy in full fine-tuning) live beside the state in
:class:`ModelParts`, are never donated and never enter the optimizer state.

Loss protocol
-------------
A loss is a pure function ``loss_fn(model, batch, rng, reference) -> (loss_sum, weight, aux)``
(``offside_jax.train.losses``):

- ``model`` is the trainable NNX model, merged from ``(graphdef, trainable, frozen)`` inside
  the jitted step (adapters on, LoRA dropout keyed for this micro-batch);
- ``batch`` is one micro-batch: a dict of arrays ``[rows, length]`` (``input_ids``,
  ``attention_mask``, ``loss_mask`` — 1 iff the token is an answer token — and any extra
  per-row arrays the loss needs);
- ``rng`` is a key for this micro-batch;
- ``reference`` is the frozen reference model: with LoRA, the *same* base params with the
  adapters switched off (no second copy); in full fine-tuning, a model merged from the frozen
  params copy made by ``partition(model, reference=True)``; ``None`` otherwise. Its params
  receive no gradient. Hidden states at any layer are available from both through
  ``model.hidden_states(batch, collect_hidden=True)`` (RMU).
- it returns ``loss_sum`` (float32 scalar), ``weight`` (what it was summed over, e.g. answer
  tokens) and ``aux`` (dict of float scalars, reported as means over micro-batches).

Step
----
``TrainStep(parts, loss_fn, optimizer, mesh=..., micro_batches=M)`` jits
:func:`train_step` with explicit ``in_shardings``/``out_shardings`` (from the rules table in
``offside_jax.train.mesh``) and donates the state. Batches come from
:meth:`TrainStep.shard_batch`, which splits host arrays ``[B, T]`` into ``[M, B/M, T]``
(micro-batch ``m`` is rows ``m*B/M ... (m+1)*B/M - 1``) with the rows of every micro-batch
spread over ``data`` x ``fsdp``. The step scans over the micro-batches, accumulating
gradients of ``loss_sum`` in float32, then divides by the total weight: the loss is
``sum(loss_sum) / sum(weight)`` over micro-batches, so token-weighted accumulation equals one
big batch. Then global-norm clipping and AdamW (``offside_jax.train.optim``). Metrics:
``loss``, ``grad_norm`` (before clipping), ``learning_rate`` (of this update),
``answer_tokens`` (total weight), ``tokens`` (non-padding tokens) and the aux means.

Master weights
--------------
With ``fp32_master_weights=True`` the state keeps float32 copies of trainable params that
the model holds in bf16/fp16: the optimizer (and its moments) update the float32 masters,
and every step casts them to the model's own dtypes before merging (on each shard, so FSDP
gathers move half-size weights). Updates smaller than a bf16 ulp accumulate in the master
instead of rounding away. Frozen arrays stay in the model's dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from offside_jax.models import lora
from offside_jax.models.layers import LoRAWeight
from offside_jax.train import distributed, mesh as mesh_lib
from offside_jax.train.losses import LossFn

F32 = jnp.float32


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any  # pure dict of the trainable arrays
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable)


@dataclasses.dataclass
class ModelParts:
    """A model split once into its static graph, trainable and frozen arrays."""

    graphdef: nnx.GraphDef
    trainable: dict
    frozen: dict
    reference: dict | None
    lora: bool

    def merge(self, trainable: Any | None = None) -> nnx.Module:
        """An NNX model from these parts (``trainable`` defaults to the initial one)."""
        return nnx.merge(self.graphdef, self.trainable if trainable is None else trainable, self.frozen)


def partition(model: nnx.Module, *, reference: bool = False) -> ModelParts:
    """Split ``model``: adapters are trainable when it has LoRA adapters, else all params.

    ``reference=True`` (full fine-tuning only) keeps a frozen copy of the initial params as
    the reference model; with LoRA the reference is always the base model (adapters off).
    The trainable arrays are shared with ``model`` and may be donated by the first step.
    """
    is_lora = lora.has_adapters(model)
    if is_lora:
        graphdef, trainable, frozen = nnx.split(model, LoRAWeight, ...)
        ref = None
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        ref = jax.tree.map(jnp.copy, nnx.to_pure_dict(trainable)) if reference else None
    return ModelParts(graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen), ref, is_lora)


def _reference_model(parts_graphdef, trainable, frozen, reference, is_lora: bool) -> nnx.Module | None:
    if is_lora:
        ref = nnx.merge(parts_graphdef, jax.lax.stop_gradient(trainable), frozen)
        lora.set_enabled(ref, False)
        return ref
    if reference is not None:
        return nnx.merge(parts_graphdef, reference, frozen)
    return None


def cast_like(params: Any, dtypes: Any) -> Any:
    """``params`` cast to the dtypes of the matching leaves of ``dtypes`` (``None``: unchanged)."""
    if dtypes is None:
        return params
    return jax.tree.map(lambda p, d: p.astype(d.dtype), params, dtypes)


def _tree_zeros_f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, F32), tree)


def train_step(
    state: TrainState,
    frozen: dict,
    reference: dict | None,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    is_lora: bool,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None,
    model_dtypes: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a batch of micro-batches ``[M, rows, length]`` (pure).

    ``model_dtypes``: with master weights, a tree like the params whose leaves' ``dtype`` is
    what the model computes with; the float32 params are cast to it (differentiably) first.
    """
    key = jax.random.wrap_key_data(state.rng)
    key, step_key = jax.random.split(key)

    def loss_of(trainable, micro, rng):
        trainable = cast_like(trainable, model_dtypes)
        model = nnx.merge(graphdef, trainable, frozen)
        dropout_key, loss_key = jax.random.split(rng)
        lora.set_dropout_key(model, dropout_key)
        ref = _reference_model(graphdef, trainable, frozen, reference, is_lora)
        loss_sum, weight, aux = loss_fn(model, micro, loss_key, ref)
        return jnp.asarray(loss_sum, F32), (jnp.asarray(weight, F32), {k: jnp.asarray(v, F32) for k, v in aux.items()})

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def accumulate(carry, xs):
        micro, index = xs
        (loss_sum, (weight, aux)), grads = grad_fn(state.params, micro, jax.random.fold_in(step_key, index))
        g_acc, l_acc, w_acc, aux_acc = carry
        g_acc = jax.tree.map(lambda a, g: a + g.astype(F32), g_acc, grads)
        aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
        return (g_acc, l_acc + loss_sum, w_acc + weight, aux_acc), None

    first = jax.tree.map(lambda x: x[0], batch)
    _, (_, aux_shape) = jax.eval_shape(loss_of, state.params, first, step_key)
    carry = (_tree_zeros_f32(state.params), jnp.zeros((), F32), jnp.zeros((), F32), _tree_zeros_f32(aux_shape))
    if n_micro == 1:
        carry, _ = accumulate(carry, (first, 0))
    else:
        carry, _ = jax.lax.scan(accumulate, carry, (batch, jnp.arange(n_micro)))
    grad_sum, loss_sum, weight, aux_sum = carry

    # Token weighting: every micro-batch contributed sums, so one division gives the mean
    # over all answer tokens of the whole batch. A batch without any weight gives zeros.
    denom = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": grad_norm,
        "answer_tokens": weight,
        **{k: v / n_micro for k, v in aux_sum.items()},
    }
    masks = [x for path, x in jax.tree_util.tree_leaves_with_path(batch) if _last_key(path) == "attention_mask"]
    if masks:
        metrics["tokens"] = sum(jnp.sum(x.astype(F32)) for x in masks)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), F32)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(key))
    return new_state, metrics


def eval_step(
    params: dict,
    frozen: dict,
    reference: dict | None,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    is_lora: bool,
    loss_fn: LossFn,
    model_dtypes: Any = None,
) -> dict[str, jax.Array]:
    """Loss of a batch ``[M, rows, length]`` without updating anything (dropout off)."""
    params = cast_like(params, model_dtypes)

    def one(carry, micro):
        model = nnx.merge(graphdef, params, frozen)
        ref = _reference_model(graphdef, params, frozen, reference, is_lora)
        loss_sum, weight, _ = loss_fn(model, micro, jax.random.key(0), ref)
        return (carry[0] + jnp.asarray(loss_sum, F32), carry[1] + jnp.asarray(weight, F32)), None

    (loss_sum, weight), _ = jax.lax.scan(one, (jnp.zeros((), F32), jnp.zeros((), F32)), batch)
    return {"loss": loss_sum / jnp.where(weight > 0, weight, 1.0), "answer_tokens": weight}


class TrainStep:
    """The jitted step for one model, loss, optimizer and mesh.

    ``step(state, batch) -> (state, metrics)`` with the state donated; ``batch`` as returned
    by :meth:`shard_batch`. Frozen params (and the reference copy) are held here, placed on
    the mesh once. ``fp32_master_weights``: see "Master weights" in the module docstring.
    """

    def __init__(
        self,
        parts: ModelParts,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        mesh: Mesh,
        micro_batches: int = 1,
        schedule: optax.Schedule | None = None,
        fp32_master_weights: bool = False,
    ):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.parts, self.loss_fn, self.optimizer, self.mesh = parts, loss_fn, optimizer, mesh
        self.micro_batches = micro_batches
        self.schedule = schedule
        # What the model computes with (a tree of ShapeDtypeStructs), when it differs from the
        # float32 masters the state keeps; None: the state holds the model's own arrays.
        self.model_dtypes = jax.eval_shape(lambda t: t, parts.trainable) if fp32_master_weights else None
        master_abstract = jax.eval_shape(self._to_master, parts.trainable)
        model_abstract = nnx.eval_shape(lambda: parts.merge())
        all_shardings = mesh_lib.state_shardings(model_abstract, mesh)
        self.param_shardings = _select(all_shardings, parts.trainable)
        self.frozen_shardings = _select(all_shardings, parts.frozen)
        self.reference_shardings = None if parts.reference is None else self.param_shardings
        opt_abstract = jax.eval_shape(optimizer.init, master_abstract)
        repl = mesh_lib.replicated(mesh)
        self.opt_shardings = mesh_lib.shardings_like(opt_abstract, parts.trainable, self.param_shardings, mesh)
        self.state_shardings = TrainState(step=repl, params=self.param_shardings, opt_state=self.opt_shardings, rng=repl)
        self.batch_sharding = mesh_lib.batch_sharding(mesh)  # [M, rows, ...]
        self.frozen = jax.device_put(parts.frozen, self.frozen_shardings)
        self.reference = None if parts.reference is None else jax.device_put(parts.reference, self.reference_shardings)
        common = dict(graphdef=parts.graphdef, is_lora=parts.lora, loss_fn=loss_fn, model_dtypes=self.model_dtypes)
        self._step = jax.jit(
            functools.partial(train_step, optimizer=optimizer, schedule=schedule, **common),
            in_shardings=(self.state_shardings, self.frozen_shardings, self.reference_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=(0,),
        )
        self._eval = jax.jit(
            functools.partial(eval_step, **common),
            in_shardings=(self.param_shardings, self.frozen_shardings, self.reference_shardings, self.batch_sharding),
            out_shardings=repl,
        )

    # -- state ------------------------------------------------------------------------------

    def init_state(self, seed: int = 0) -> TrainState:
        """Step 0: the trainable params placed on the mesh, fresh optimizer state, a seeded key."""
        params = jax.device_put(self.parts.trainable, self.param_shardings)
        if self.model_dtypes is not None:
            params = jax.jit(self._to_master, out_shardings=self.param_shardings)(params)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
        repl = mesh_lib.replicated(self.mesh)
        return TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), repl),
            params=params,
            opt_state=opt_state,
            rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), repl),
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (a restore target for checkpoints)."""
        shapes = jax.eval_shape(
            lambda p: TrainState(
                step=jnp.zeros((), jnp.int32),
                params=p,
                opt_state=self.optimizer.init(p),
                rng=jax.random.key_data(jax.random.key(0)),
            ),
            jax.eval_shape(self._to_master, self.parts.trainable),
        )
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model at ``state`` (for evaluation, generation, export; shares buffers unless
        master weights are cast to the model's dtypes)."""
        return nnx.merge(self.parts.graphdef, cast_like(state.params, self.model_dtypes), self.frozen)

    def _to_master(self, params: Any) -> Any:
        """The state's copy of trainable params: float32 masters, or the params as they are."""
        if self.model_dtypes is None:
            return params
        return jax.tree.map(lambda p: p.astype(F32) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    # -- batches ----------------------------------------------------------------------------

    def shard_batch(self, batch: Mapping[str, Any], micro_batches: int | None = None) -> dict[str, Any]:
        """Host arrays ``[B, ...]`` -> global arrays ``[M, B/M, ...]`` sharded over the rows.

        ``batch`` is a dict of arrays, or of sub-batches (dicts of arrays, e.g. ``forget`` and
        ``retain`` for unlearning; each may have its own row count). In a multi-process run
        each process passes its own rows (``B`` is then per process).
        """
        m = self.micro_batches if micro_batches is None else micro_batches

        def place(path, value):
            value = np.asarray(value)
            local = value.reshape(self._micro_batched_shape(jax.tree_util.keystr(path), value.shape, m))
            return jax.make_array_from_process_local_data(self.batch_sharding, local)

        return jax.tree_util.tree_map_with_path(place, dict(batch))

    def _micro_batched_shape(self, name: str, shape: tuple[int, ...], m: int) -> tuple[int, ...]:
        """``[rows, ...] -> [m, rows / m, ...]`` for this process's rows, checked against the mesh."""
        divisor = max(1, mesh_lib.batch_divisor(self.mesh) // max(1, jax.process_count()))
        if len(shape) == 0:
            raise ValueError(f"batch entry {name} is a scalar; every entry needs a leading row axis")
        rows = shape[0]
        if rows % m:
            raise ValueError(f"batch entry {name} has {rows} rows, not divisible into {m} micro-batches")
        if (rows // m) % divisor:
            raise ValueError(
                f"batch entry {name}: {rows // m} rows per micro-batch do not split over the mesh's "
                f"{divisor} data x fsdp devices; use a row count that is a multiple of {divisor * m}"
            )
        return (m, rows // m) + tuple(shape[1:])

    def process_rows(self, global_rows: int, micro_batches: int | None = None) -> np.ndarray:
        """Which rows of a global batch of ``global_rows`` this process passes to :meth:`shard_batch`
        (in that order); every row in a one-process run. Data sources read only these."""
        m = self.micro_batches if micro_batches is None else micro_batches
        return distributed.process_rows(self.batch_sharding, global_rows, m)

    def abstract_batch(self, host_batch: Mapping[str, Any], micro_batches: int | None = None) -> dict[str, Any]:
        """Shapes, dtypes and shardings of what :meth:`shard_batch` makes of ``host_batch`` (this
        process's rows), without moving any data: the batch argument of :meth:`compile`."""
        m = self.micro_batches if micro_batches is None else micro_batches
        processes = jax.process_count()

        def spec(path, value):
            value = value if hasattr(value, "shape") else np.asarray(value)
            local = self._micro_batched_shape(jax.tree_util.keystr(path), tuple(value.shape), m)
            global_shape = (m, local[1] * processes) + local[2:]
            return jax.ShapeDtypeStruct(global_shape, value.dtype, sharding=self.batch_sharding)

        return jax.tree_util.tree_map_with_path(spec, dict(host_batch))

    # -- ahead-of-time compilation ------------------------------------------------------------

    def compile(self, batch: Mapping[str, Any]) -> jax.stages.Compiled:
        """The step compiled ahead of time for batches shaped like ``batch`` (sharded arrays or
        :meth:`abstract_batch`), from the abstract state: nothing is allocated or run. Its
        ``memory_analysis()`` is what one step needs per device (``offside_jax.train.aot``)."""
        return self._step.lower(self.abstract_state(), self.frozen, self.reference, batch).compile()

    # -- running ----------------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._step(state, self.frozen, self.reference, batch)

    def evaluate(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Answer loss of a sharded batch at ``state`` (no update; the state is not donated)."""
        return self._eval(state.params, self.frozen, self.reference, batch)

    def step_for(self, batch: Mapping[str, Any]) -> "TrainStep":
        """The step that runs ``batch`` (this one; an :class:`AlternatingStep` picks a phase)."""
        del batch
        return self


class AlternatingStep:
    """Several losses taking turns on one training state (MMUnlearner's masked ascent and
    retain steps): a batch holding sub-batch ``key`` alone runs ``phases[key]``.

    ``phases``: ``{key: (loss_fn, optimizer)}``; the optimizers must give states of one layout
    (e.g. the same optimizer chained after different stateless or same-state transforms).
    Quacks like :class:`TrainStep` for the loop (call, ``shard_batch``, ``init_state``,
    ``abstract_state``, ``model``, ``process_rows``, ``step_for``).
    """

    def __init__(self, parts: ModelParts, phases: Mapping[str, tuple[LossFn, optax.GradientTransformation]], **step_kwargs):
        if not phases:
            raise ValueError("an alternating step needs at least one phase")
        self.steps = {key: TrainStep(parts, fn, tx, **step_kwargs) for key, (fn, tx) in phases.items()}
        self.first = next(iter(self.steps.values()))

    def step_for(self, batch: Mapping[str, Any]) -> TrainStep:
        keys = [k for k in self.steps if k in batch]
        if len(keys) != 1 or len(batch) != 1:
            raise ValueError(f"an alternating step takes a batch of exactly one of {sorted(self.steps)}, got {sorted(batch)}")
        return self.steps[keys[0]]

    def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        return self.step_for(batch)(state, batch)

    def shard_batch(self, batch, micro_batches: int | None = None):
        return self.first.shard_batch(batch, micro_batches)

    def process_rows(self, global_rows: int, micro_batches: int | None = None) -> np.ndarray:
        return self.first.process_rows(global_rows, micro_batches)

    def init_state(self, seed: int = 0) -> TrainState:
        return self.first.init_state(seed)

    def abstract_state(self) -> TrainState:
        return self.first.abstract_state()

    def model(self, state: TrainState) -> nnx.Module:
        return self.first.model(state)


def _last_key(path: tuple) -> Any:
    return getattr(path[-1], "key", None) if path else None


def _select(shardings: dict, subset: dict) -> dict:
    """The entries of a full pure-dict shardings tree that ``subset`` (a pure dict) has."""
    if isinstance(subset, Mapping):
        return {k: _select(shardings[k], v) for k, v in subset.items()}
    return shardings


def place_model_on_mesh(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every variable of ``model`` onto its sharding from the rules table (in place)."""
    state = nnx.state(model)
    shardings = mesh_lib.state_shardings(state, mesh)
    nnx.update(model, jax.device_put(nnx.to_pure_dict(state), shardings))
    return model


def frozen_copy(model: nnx.Module) -> nnx.Module:
    """A model with its own copy of every array (safe from the donation of a training state)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


__all__ = [
    "AlternatingStep",
    "ModelParts",
    "TrainState",
    "TrainStep",
    "eval_step",
    "frozen_copy",
    "partition",
    "place_model_on_mesh",
    "train_step",
]
