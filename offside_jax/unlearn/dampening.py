"""Fisher-based dampening: SSD, loss-free LFSSD and adaptive ASSD. No training steps.

SSD (Foster et al. 2023) compares two diagonal importances per parameter: ``I_D`` on the full
training data (retain + forget) and ``I_f`` on the forget set. Parameters with
``I_f > alpha * I_D`` are selected and scaled by ``min(lambda * I_D / I_f, 1)``.

Importance estimators (say which in the config, they differ):

- ``"batch_mean"`` -- the official code: square the gradient of the *batch-mean* loss and
  average over batches (``imp += grad ** 2; imp /= n_batches``);
- ``"per_example"`` -- the empirical Fisher: mean over examples of squared per-example
  gradients, computed with ``vmap`` over chunks of examples.

LFSSD replaces the loss by the squared L2 norm of the model output (here the logits at answer
positions) and accumulates ``|grad|`` instead of ``grad ** 2``. ASSD picks alpha as the
``100 - ln(1 + 100 * forget_fraction)`` percentile of all ``I_f / I_D`` ratios.

Importances are accumulated batch by batch in a donated float32 buffer that keeps the
parameters' sharding, so memory does not depend on the dataset size and the work is spread
over the mesh like training.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from offside_jax.models.hf import path_to_str
from offside_jax.unlearn import objectives as obj

ESTIMATORS = ("batch_mean", "per_example")
OBJECTIVES = ("loss", "output_norm")


@dataclasses.dataclass(frozen=True)
class DampeningConfig:
    """SSD-family settings. ``params`` is a regex over HF-style dotted parameter paths
    (e.g. ``model\\.layers\\.`` for the decoder blocks only); ``None`` means every parameter."""

    alpha: float = 10.0
    lam: float = 1.0
    estimator: str = "batch_mean"
    objective: str = "loss"  # "loss": SSD; "output_norm": LFSSD
    adaptive: bool = False  # ASSD: alpha from the ratio percentile
    forget_fraction: float | None = None  # ASSD; default: forget examples / all examples
    params: str | None = None
    per_example_chunk: int = 8

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.per_example_chunk < 1:
            raise ValueError("per_example_chunk must be >= 1")


@dataclasses.dataclass
class DampeningReport:
    alpha: float
    selected: int  # parameters (scalars) dampened
    total: int  # parameters (scalars) considered
    per_tensor: dict[str, int]  # dotted path -> selected count
    full_examples: int
    forget_examples: int
    # parameter group (the path with layer numbers as *) -> selected, dampened (scaled below 1),
    # total scalars and the largest I_forget / I_full ratio
    per_group: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    max_ratio: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def param_filter(pattern: str | None):
    """An nnx filter selecting the ``nnx.Param``s whose dotted path matches ``pattern``."""
    regex = re.compile(pattern) if pattern else None

    def select(path, value) -> bool:
        return isinstance(value, nnx.Param) and (regex is None or regex.search(path_to_str(path)) is not None)

    return select


def split_selected(model: nnx.Module, pattern: str | None) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, selected params, everything else)``; raises if the regex selects nothing."""
    graphdef, selected, rest = nnx.split(model, param_filter(pattern), ...)
    if not jax.tree.leaves(selected):
        raise ValueError(f"parameter regex {pattern!r} selects no parameters")
    return graphdef, selected, rest


def _objective_value(model: nnx.Module, batch: Mapping[str, jax.Array], objective: str) -> jax.Array:
    from offside_jax.train.losses import final_hidden

    logits = model.logits(final_hidden(model, batch))
    if objective == "loss":
        return obj.batch_mean_nll(logits, batch)
    # LFSSD: squared L2 norm of the output at each answer position, averaged over them.
    _, weights = obj.next_token_targets(batch)
    sq_norm = jnp.sum(jnp.square(logits.astype(jnp.float32)), axis=-1)
    return jnp.sum(sq_norm * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _reduce(grad: jax.Array, objective: str) -> jax.Array:
    g = grad.astype(jnp.float32)
    return jnp.square(g) if objective == "loss" else jnp.abs(g)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _accumulate(graphdef, estimator: str, objective: str, chunk: int, acc, selected, rest, batch):
    def value(sel, b):
        return _objective_value(nnx.merge(graphdef, sel, rest), b, objective)

    if estimator == "batch_mean":
        grads = jax.grad(value)(selected, batch)
        return jax.tree.map(lambda a, g: a + _reduce(g, objective), acc, grads)

    # per_example: each row is its own batch of one; vmap over a chunk, scan over chunks.
    rows = batch["input_ids"].shape[0]
    if rows % chunk:
        raise ValueError(f"batch of {rows} rows is not a multiple of per_example_chunk={chunk}")
    chunks = jax.tree.map(lambda x: x.reshape((rows // chunk, chunk, 1) + x.shape[1:]), dict(batch))

    def one_chunk(acc, chunk_batch):
        grads = jax.vmap(lambda b: jax.grad(value)(selected, b))(chunk_batch)
        return jax.tree.map(lambda a, g: a + jnp.sum(_reduce(g, objective), axis=0), acc, grads), None

    acc, _ = jax.lax.scan(one_chunk, acc, chunks)
    return acc


def importance(
    model: nnx.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    config: DampeningConfig = DampeningConfig(),
    *,
    description: str = "importance",
    mesh: Any = None,
) -> tuple[nnx.State, int]:
    """Diagonal importance of the selected params over ``batches`` and the number of examples.

    Streams the batches (any iterable); the accumulator keeps each parameter's sharding. With
    several processes (``mesh`` spanning them) each process hands over its rows of every batch
    and the importances are summed across processes by the sharded computation.
    """
    graphdef, selected, rest = split_selected(model, config.params)
    acc = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), selected)
    n_batches = n_examples = 0
    for batch in tqdm(batches, desc=description, unit="batch", leave=False):
        batch = _place(batch, mesh)
        acc = _accumulate(graphdef, config.estimator, config.objective, config.per_example_chunk, acc, selected, rest, batch)
        n_batches += 1
        n_examples += _rows_with_answers(batch)
    if n_batches == 0:
        raise ValueError(f"{description}: no batches")
    divisor = n_batches if config.estimator == "batch_mean" else n_examples
    return jax.tree.map(lambda a: a / divisor, acc), n_examples


def _place(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    if mesh is None or jax.process_count() == 1:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    from offside_jax.train import distributed, mesh as mesh_lib

    return distributed.global_batch(batch, mesh_lib.batch_sharding(mesh, micro_batched=False))


def _rows_with_answers(batch: Mapping[str, jax.Array]) -> int:
    """Examples in a batch: rows with at least one answer token (empty filler rows of a last
    batch add zero gradient, so they must not count either)."""
    _, weights = obj.next_token_targets(batch)
    return int(jnp.sum(jnp.any(weights > 0, axis=1)))


def assd_alpha(imp_full: nnx.State, imp_forget: nnx.State, forget_fraction: float) -> float:
    """ASSD: the ``100 - ln(1 + 100 * forget_fraction)`` percentile of all ``I_f / I_D`` ratios."""
    if not 0 < forget_fraction <= 1:
        raise ValueError(f"forget_fraction must be in (0, 1], got {forget_fraction}")
    from offside_jax.train.distributed import to_host

    ratios = [
        np.asarray(to_host(f / jnp.maximum(d, jnp.finfo(jnp.float32).tiny))).ravel()
        for d, f in zip(jax.tree.leaves(imp_full), jax.tree.leaves(imp_forget))
    ]
    percentile = 100.0 - math.log(1.0 + 100.0 * forget_fraction)
    return float(np.percentile(np.concatenate(ratios), percentile))


@jax.jit
def _dampen_tensor(param: jax.Array, imp_full: jax.Array, imp_forget: jax.Array, alpha: float, lam: float):
    selected = imp_forget > alpha * imp_full
    # min(lambda * I_D / I_f, 1): never scales a weight up. I_f > 0 wherever selected.
    factor = jnp.minimum(lam * imp_full / jnp.where(selected, imp_forget, 1.0), 1.0)
    new = jnp.where(selected, param * factor.astype(param.dtype), param)
    ratio = jnp.max(imp_forget / jnp.maximum(imp_full, jnp.finfo(jnp.float32).tiny))
    return new, jnp.sum(selected), jnp.sum(selected & (factor < 1.0)), ratio


def parameter_group(path: str) -> str:
    """A tensor's group: its dotted path with layer/block numbers as ``*``."""
    return re.sub(r"\.\d+\.", ".*.", path)


def dampen(
    model: nnx.Module, imp_full: nnx.State, imp_forget: nnx.State, alpha: float, lam: float, pattern: str | None
) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Scale the selected parameters of ``model`` in place; returns the selected count per
    tensor and, per :func:`parameter_group`, the selected, dampened and total scalars and the
    largest importance ratio."""
    _, selected, _ = split_selected(model, pattern)
    counts, groups = {}, {}
    flat_params = nnx.to_flat_state(selected)
    flat_full = dict(nnx.to_flat_state(imp_full))
    flat_forget = dict(nnx.to_flat_state(imp_forget))
    for path, var in flat_params:
        new, n, damped, ratio = _dampen_tensor(var.get_value(), _value(flat_full[path]), _value(flat_forget[path]),
                                               alpha, lam)
        var.set_value(new)
        name = path_to_str(path)
        counts[name] = int(n)
        group = groups.setdefault(parameter_group(name), {"selected": 0, "dampened": 0, "total": 0, "max_ratio": 0.0})
        group["selected"] += int(n)
        group["dampened"] += int(damped)
        group["total"] += int(np.prod(var.get_value().shape))
        group["max_ratio"] = max(group["max_ratio"], float(ratio))
    nnx.update(model, nnx.from_flat_state(flat_params))
    return counts, groups


def _value(x: Any) -> jax.Array:
    return x.get_value() if isinstance(x, nnx.Variable) else x


def ssd(
    model: nnx.Module,
    full_batches: Iterable[Mapping[str, np.ndarray]],
    forget_batches: Iterable[Mapping[str, np.ndarray]],
    config: DampeningConfig = DampeningConfig(),
    *,
    mesh: Any = None,
) -> DampeningReport:
    """Run SSD / LFSSD / ASSD on ``model`` in place and report what was dampened.

    ``full_batches`` is the training data D (retain + forget); ``forget_batches`` the forget
    set, or in the corrective setting only the identified fraction of it.
    """
    imp_full, n_full = importance(model, full_batches, config, description="importance on D", mesh=mesh)
    imp_forget, n_forget = importance(model, forget_batches, config, description="importance on forget", mesh=mesh)
    alpha = config.alpha
    if config.adaptive:
        fraction = config.forget_fraction if config.forget_fraction is not None else n_forget / max(n_full, 1)
        alpha = assd_alpha(imp_full, imp_forget, fraction)
    counts, groups = dampen(model, imp_full, imp_forget, alpha, config.lam, config.params)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(imp_full))
    max_ratio = max((g["max_ratio"] for g in groups.values()), default=0.0)
    report = DampeningReport(alpha, sum(counts.values()), total, counts, n_full, n_forget, groups, max_ratio)
    if report.selected == 0:
        warnings.warn(f"SSD selected no weight: alpha={alpha:g} but the largest I_forget / I_full ratio is "
                      f"{max_ratio:.3g}; set methods.ssd.alpha below it (or methods.ssd.adaptive=true)", stacklevel=2)
    return report


def identified_subset(n_forget: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of the forget examples known in the corrective setting (a seeded random subset)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"identified fraction must be in (0, 1], got {fraction}")
    count = max(1, int(round(fraction * n_forget)))
    return np.sort(np.random.default_rng(seed).permutation(n_forget)[:count])
