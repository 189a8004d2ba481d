"""Unlearning methods registered by kind, each with its one typed config section.

Kinds (what the driver does with a method; never its name):

- ``loss``: a registered loss of :mod:`offside_jax.unlearn.losses`, trained by the session with
  LoRA adapters or full parameters;
- ``alternating``: several losses taking turns on one state (MMUnlearner: masked ascent and
  retain NLL, full parameters; OFFSIDE's KL_min and PO), described by the method's ``recipe``;
- ``weight_edit``: a training-free edit of the weights (SSD, LFSSD, ASSD, ROCR, curvature
  editing), full parameters, described by the method's ``edit``;
- ``generation``: a wrapper of the sampler that changes no weight (GUARD), built by ``wrap``.

ConceptVectors' ablation is a ``loss`` method whose ``setup`` (noise on the located traces)
runs before training and returns the update mask that keeps every other weight still.

A method's hyperparameters are declared once, as its section of
``offside_jax.config.UnlearnMethodsConfig`` (validated when the config loads).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from offside_jax.config import ConfigError, UnlearnMethodsConfig

KINDS = ("loss", "alternating", "weight_edit", "generation")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    kind: str
    config: type  # its section of UnlearnMethodsConfig
    lora: bool = True  # can train LoRA adapters (else full parameters only)
    # The params a full-parameter run moves when train.params is unset: fn(hyperparameters, depth) -> regex.
    trainable: Callable[[dict, int], str | None] | None = None
    retain_ratio: int = 1  # retain rows per forget row when data.retain_ratio is unset
    # loss: fn(hyperparameters, chunk_tokens) -> the training-core loss (default: the registered loss)
    build: Callable[[dict, int], Any] | None = None
    # loss: fn(run_cfg, hyperparameters, model, sets, encoder, session) -> per-forget-record arrays the
    # loss reads from its batches (e.g. cached reference log-probs), computed before training
    prepare: Callable[..., dict] | None = None
    # alternating: fn(run_cfg, hyperparameters, model, sets, encoder, batch_options, session) -> Recipe
    recipe: Callable[..., Any] | None = None
    # weight_edit: fn(edits.EditInputs) -> report; changes the model in place
    edit: Callable[..., dict] | None = None
    # generation: fn(edits.EditInputs) -> (wrapped model, report)
    wrap: Callable[..., Any] | None = None
    # generation: fn(wrapped model, directory) writes its state beside the exported weights
    save: Callable[[Any, Any], None] | None = None
    # loss: fn(edits.EditInputs) -> (report, update mask {param path: bool array}) before training
    setup: Callable[..., Any] | None = None
    # fn(hyperparameters, optim config) -> the optim config the method trains with
    optim: Callable[[dict, Any], Any] | None = None

    def default_params(self, hyperparameters: dict, depth: int) -> str | None:
        return None if self.trainable is None else self.trainable(hyperparameters, depth)

    def loss(self, hyperparameters: dict, chunk_tokens: int):
        if self.build is not None:
            return self.build(hyperparameters, chunk_tokens)
        from offside_jax.unlearn.losses import build_loss

        return build_loss(self.name, chunk_tokens=chunk_tokens, **hyperparameters)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name!r}: kind {method.kind!r} is not one of {', '.join(KINDS)}")
    if method.name in REGISTRY:
        raise ValueError(f"unlearning method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"method {name!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def hyperparameters(methods_cfg: UnlearnMethodsConfig, name: str) -> dict[str, Any]:
    """The section of ``methods_cfg`` of method ``name``, as keyword arguments."""
    get(name)
    return dataclasses.asdict(getattr(methods_cfg, name))


def _section(name: str) -> type:
    return typing.get_type_hints(UnlearnMethodsConfig)[name]


def _concept_loss(hp: dict, chunk_tokens: int):
    from offside_jax.unlearn.losses import build_loss

    kwargs = {"npo": dict(beta=hp["beta"], alpha=hp["alpha"]), "grad_diff": dict(alpha=hp["alpha"]), "ga": {}}
    return build_loss(hp["loss"], chunk_tokens=chunk_tokens, **kwargs[hp["loss"]])


def _with_lr(hp: dict, optim: Any) -> Any:
    return dataclasses.replace(optim, lr=hp["lr"])


def _scaled_lr(hp: dict, optim: Any) -> Any:
    return dataclasses.replace(optim, lr=optim.lr * hp["lr_scale"])


def _without_lr_scale(name: str):
    """The registered loss of ``name`` built from its section less ``lr_scale`` (an optimizer setting)."""

    def build(hp: dict, chunk_tokens: int):
        from offside_jax.unlearn.losses import build_loss

        return build_loss(name, chunk_tokens=chunk_tokens, **{k: v for k, v in hp.items() if k != "lr_scale"})

    return build


def _register_builtin() -> None:
    from offside_jax.unlearn import edits, offside_baselines as offside, saliency
    from offside_jax.unlearn.guard import save_guard
    from offside_jax.unlearn.losses import METHODS, rmu_layer_index, rmu_trainable_pattern

    special = {
        "rmu": dict(trainable=lambda hp, depth: rmu_trainable_pattern(rmu_layer_index(hp["layer"], depth)),
                    build=_without_lr_scale("rmu"), optim=_scaled_lr),
        "offside_gd": dict(retain_ratio=offside.OFFSIDE_RATIO),
    }
    for name in sorted(METHODS):
        register(Method(name, "loss", _section(name), **special.get(name, {})))
    register(Method("ssd", "weight_edit", _section("ssd"), lora=False, edit=edits.ssd))
    register(Method("rocr", "weight_edit", _section("rocr"), lora=False, edit=edits.rocr))
    register(Method("curvature_edit", "weight_edit", _section("curvature_edit"), lora=False, edit=edits.curvature_edit))
    register(Method("concept_ablation", "loss", _section("concept_ablation"), lora=False, build=_concept_loss,
                    setup=edits.concept_ablation, optim=_with_lr))
    register(Method("guard", "generation", _section("guard"), lora=False, wrap=edits.guard, save=save_guard))
    register(Method("mmunlearner", "alternating", _section("mmunlearner"), lora=False,
                    recipe=saliency.mmunlearner_recipe))
    register(Method("offside_kl", "alternating", _section("offside_kl"), retain_ratio=offside.OFFSIDE_RATIO,
                    recipe=offside.kl_recipe))
    register(Method("offside_po", "alternating", _section("offside_po"), retain_ratio=offside.OFFSIDE_RATIO,
                    recipe=offside.po_recipe))
    register(Method("offside_npo", "loss", _section("offside_npo"), build=offside.npo_loss,
                    prepare=offside.npo_reference_logprobs))


_register_builtin()

__all__ = ["KINDS", "Method", "REGISTRY", "get", "hyperparameters", "names", "register"]
