"""MMUnlearner-style geometry-constrained gradient ascent: Fisher-ratio masks per module group
and the alternating masked-ascent / retain schedule.

Masks. For each module group (vision tower, projector/merger, language model) and each
parameter element of its attention/MLP projections::

    mask = (F_forget + eps) / (F_preserve + eps) >= threshold          (eps = 1e-15, threshold 1)

(threshold 1 is the paper's and its code's; ``method=mmunlearner`` defaults to 0.02, see
``offside_jax.config.MMUnlearnerConfig``), with ``F`` the squared gradient of the (gradient-ascent) loss, averaged over batches
(``offside_jax.unlearn.dampening.importance`` with the batch-mean estimator: the square of
the GA loss's gradient is the NLL's). ``F_forget`` is measured on the forget set, ``F_preserve``
on the group's preserve data (by default the retain set, image and text records alike).
Parameters outside the projections get mask 0: ascent never moves them (the paper); the
released code's mask file holds only the projections, so there every other tensor ascends
unmasked (``variant=official``, ``saliency_masks(..., outside=True)``).

Schedule. Training alternates two steps on one optimizer state: a gradient-ascent step on a
forget batch whose gradients are multiplied by the mask, then an unmasked retain-NLL step
(the official code: a forget step, clipped before masking, before every
``len(retain batches) // len(forget batches)``-th retain step).
The mask is applied *inside* the jitted step by an optax transform placed first in the
optimizer chain (:func:`mask_gradients`); it keeps the masks in the optimizer state, so they
are sharded like the parameters and checkpointed with them, and are never baked into the
compiled program. :func:`alternating_phases` gives the two phases to the training session
(``offside_jax.train.session``), whose ``AlternatingStep`` holds one step per phase (same
model parts, same optimizer state layout) and picks the phase from the batch:
``{"forget": ...}`` batches ascend, ``{"retain": ...}`` batches descend.
:class:`AlternatingBatches` feeds them.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from offside_jax.models.hf import path_to_str
from offside_jax.unlearn import objectives as obj
from offside_jax.unlearn.dampening import DampeningConfig, importance
from offside_jax.unlearn.losses import build_loss

# Module groups by dotted parameter path (Qwen2.5-VL / Qwen2-VL layout; a text model has only
# the language group). Order matters for reports only.
DEFAULT_GROUPS: dict[str, str] = {
    "vision": r"^visual\.(blocks|patch_embed)\.",
    "projector": r"^visual\.merger\.",
    "language": r"^(model|lm_head)\.",
}
# The attention and MLP projections (and the merger's MLP): the only tensors ascent may move.
DEFAULT_TARGETS = r"(self_attn\.(q|k|v|o)_proj|attn\.(qkv|proj)|mlp\.(gate|up|down)_proj|merger\.mlp\.\d+)\."

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]  # a fresh pass over the data per call


@dataclasses.dataclass(frozen=True)
class SaliencyConfig:
    groups: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_GROUPS))
    targets: str = DEFAULT_TARGETS
    threshold: float = 1.0
    eps: float = 1e-15

    def __post_init__(self):
        for name, pattern in {**self.groups, "targets": self.targets}.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"saliency regex {name}={pattern!r} is invalid: {e}") from None


@dataclasses.dataclass
class SaliencyReport:
    selected: dict[str, int]  # group -> mask elements set
    total: dict[str, int]  # group -> elements considered (targets in the group)
    per_tensor: dict[str, int]  # dotted path -> mask elements set

    def fractions(self) -> dict[str, float]:
        return {g: self.selected[g] / max(self.total[g], 1) for g in self.total}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fractions": self.fractions()}


def _exact(paths: list[str]) -> str:
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def group_paths(model: nnx.Module, config: SaliencyConfig) -> dict[str, list[str]]:
    """Dotted paths of the target params of each group (groups that match nothing are left out)."""
    targets = re.compile(config.targets)
    paths = [path_to_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    out = {}
    for name, pattern in config.groups.items():
        regex = re.compile(pattern)
        chosen = [p for p in paths if regex.search(p) and targets.search(p)]
        if chosen:
            out[name] = chosen
    if not out:
        raise ValueError(f"no parameter matches both a saliency group ({dict(config.groups)}) and the targets "
                         f"{config.targets!r}; parameter paths look like: {', '.join(paths[:6])}")
    return out


@jax.jit
def _ratio_mask(forget: jax.Array, preserve: jax.Array, eps: float, threshold: float) -> jax.Array:
    return (forget + eps) / (preserve + eps) >= threshold


def saliency_masks(
    model: nnx.Module,
    forget_batches: Batches,
    preserve_batches: Batches | Mapping[str, Batches],
    config: SaliencyConfig = SaliencyConfig(),
    *,
    outside: bool = False,
) -> tuple[dict, SaliencyReport]:
    """Boolean masks (a pure dict shaped like ``nnx.state(model, nnx.Param)``) and a report.

    ``preserve_batches`` is one data source for every group or a mapping group -> source.
    Importances stream over the batches (memory independent of the dataset size). ``outside``:
    the mask of every tensor outside the targets (0: frozen for ascent; 1: the official code,
    whose mask file holds only the projections, so every other tensor ascends unmasked).
    """
    groups = group_paths(model, config)
    if isinstance(preserve_batches, Mapping):
        missing = sorted(set(groups) - set(preserve_batches))
        if missing:
            raise ValueError(f"no preserve data for saliency group(s) {missing}")
    every = [p for paths in groups.values() for p in paths]
    f_forget = dict(nnx.to_flat_state(importance(model, forget_batches(), _fisher(every), description="Fisher on forget")[0]))
    f_preserve: dict = {}
    if not isinstance(preserve_batches, Mapping):
        f_preserve = dict(nnx.to_flat_state(importance(model, preserve_batches(), _fisher(every), description="Fisher on preserve")[0]))
    else:
        for name, paths in groups.items():
            state, _ = importance(model, preserve_batches[name](), _fisher(paths), description=f"Fisher on preserve ({name})")
            f_preserve.update(dict(nnx.to_flat_state(state)))

    owner = {p: g for g, paths in groups.items() for p in paths}
    forget_by_name = {path_to_str(k): _value(v) for k, v in f_forget.items()}
    preserve_by_name = {path_to_str(k): _value(v) for k, v in f_preserve.items()}
    selected = {g: 0 for g in groups}
    total = {g: 0 for g in groups}
    per_tensor = {}

    def mask_of(path, param):
        name = path_to_str(path)
        if name not in owner:
            return jnp.full(param.shape, outside, jnp.bool_)
        mask = _ratio_mask(forget_by_name[name], preserve_by_name[name], config.eps, config.threshold)
        per_tensor[name] = count = int(jnp.sum(mask))
        selected[owner[name]] += count
        total[owner[name]] += int(mask.size)
        return mask

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = jax.tree_util.tree_map_with_path(mask_of, params)
    return masks, SaliencyReport(selected, total, per_tensor)


def _fisher(paths: list[str]) -> DampeningConfig:
    return DampeningConfig(estimator="batch_mean", objective="loss", params=_exact(paths))


def _value(x: Any) -> jax.Array:
    return x.get_value() if isinstance(x, nnx.Variable) else x


# -- masks inside the step -----------------------------------------------------------------------


class MaskState(NamedTuple):
    mask: Any  # bool arrays with the params' structure


def mask_gradients(masks: Any, active: bool) -> optax.GradientTransformation:
    """Multiply the gradients by ``masks`` (when ``active``); the masks live in the state.

    Use the same ``masks`` for the active and the inactive transform so both give optimizer
    states of one layout (the alternating phases share a state).
    """

    def init(params):
        del params
        return MaskState(jax.tree.map(jnp.asarray, masks))

    def update(updates, state, params=None):
        del params
        if active:
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, state.mask)
        return updates, state

    return optax.GradientTransformation(init, update)


def retain_nll(model, batch, rng, reference):
    """The retain phase's loss: mean answer NLL of the ``retain`` sub-batch."""
    del rng, reference
    retain = batch["retain"]
    nll = obj.batch_mean_nll(model.logits(model.hidden_states(retain)), retain)
    return nll, jnp.ones((), jnp.float32), {"retain_nll": nll}


def alternating_phases(masks: Any, gamma: float = 1.0, clip_before_mask: float | None = None) -> list:
    """MMUnlearner's two phases for ``offside_jax.train.session.Session.step``: gradient ascent
    (times ``gamma``) on ``forget`` batches moving only the masked weights, and the unmasked
    retain NLL on ``retain`` batches. The masks are base weights': train full parameters.

    ``clip_before_mask``: clip the ascent gradient's global norm to this before masking (the
    official code); the optimizer's own clipping then finds a norm already below it."""
    from offside_jax.train.session import Phase

    ascent = build_loss("ga")

    def scaled_ascent(model, batch, rng, reference):
        loss, weight, aux = ascent(model, batch, rng, reference)
        return gamma * loss, weight, aux

    masking = mask_gradients(masks, True)
    if clip_before_mask:
        masking = optax.chain(optax.clip_by_global_norm(clip_before_mask), masking)
        keep = optax.chain(optax.identity(), mask_gradients(masks, False))  # the same state layout
    else:
        keep = mask_gradients(masks, False)
    return [Phase("forget", scaled_ascent, masking), Phase("retain", retain_nll, keep)]


class AlternatingBatches:
    """A forget batch, then ``retain_steps`` retain batches, again and again: with 1 (the
    paper's alternation) even indices are forget batch ``i // 2``, odd ones retain batch
    ``i // 2``; the official code's loop runs a forget step before every
    ``retain_steps = len(retain batches) // len(forget batches)``-th retain step."""

    def __init__(self, forget_at: Callable[[int], Mapping[str, Any]], retain_at: Callable[[int], Mapping[str, Any]],
                 retain_steps: int = 1):
        self.forget_at, self.retain_at = forget_at, retain_at
        self.period = max(1, retain_steps) + 1

    def __call__(self, index: int) -> dict[str, Any]:
        cycle, position = divmod(index, self.period)
        if position == 0:
            return {"forget": self.forget_at(cycle)["forget"]}
        return {"retain": self.retain_at(index - cycle - 1)["retain"]}


def official_retain_steps(n_forget: int, forget_rows: int, n_retain: int, retain_rows: int) -> int:
    """``len(retain_loader) // len(forget_loader)`` of the official loop (at least 1)."""
    return max(1, -(-n_retain // retain_rows) // -(-n_forget // forget_rows))


def mmunlearner_recipe(run_cfg, hparams, model, sets, base, common, session):
    """The alternating recipe of ``method=mmunlearner`` (``variant`` paper or official)."""
    del session
    from offside_jax.data.batches import sequential_batches
    from offside_jax.unlearn import settings
    from offside_jax.unlearn.offside_baselines import Recipe
    from offside_jax.unlearn.run import fitted_encoder

    official = hparams["variant"] == "official"
    scfg = SaliencyConfig(groups=dict(hparams["groups"]), targets=hparams["targets"], threshold=hparams["threshold"],
                          eps=hparams["eps"])
    preserve = list(sets.retain)
    if hparams["preserve_text"] and "retain_text" in sets.evaluation:
        preserve += sets.evaluation["retain_text"]
    fisher_encoder = fitted_encoder(base, sets.forget + preserve, run_cfg.data.max_length)
    size = hparams["fisher_batch_size"]
    masks, report = saliency_masks(model, lambda: sequential_batches(sets.forget, fisher_encoder, size),
                                   lambda: sequential_batches(preserve, fisher_encoder, size), scfg, outside=official)
    forget_at = settings.UnlearningBatches(sets, base, ("forget",), **common)
    retain_at = settings.UnlearningBatches(sets, base, ("retain",), **common)
    forget_at.encoder = retain_at.encoder = fitted_encoder(base, sets.forget + sets.retain, run_cfg.data.max_length)
    retain_steps = 1
    if official:
        retain_steps = official_retain_steps(len(sets.forget), forget_at.forget_rows, len(sets.retain),
                                             retain_at.retain_rows)
    clip = run_cfg.optim.max_grad_norm if official else None
    batches = AlternatingBatches(forget_at, retain_at, retain_steps)
    phases = alternating_phases(masks, hparams["gamma"], clip_before_mask=clip)
    return Recipe(phases, batches, [batches(0), batches(1)],
                  {"saliency": report.to_dict(), "retain_steps_per_forget_step": retain_steps})
