"""Unlearning methods registered by kind, each with its one typed config section.

Kinds (what the driver does with a method; never its name):

- ``loss``: a registered loss of :mod:`offside_jax.unlearn.losses`, trained by the session with
  LoRA adapters or full parameters;
- ``alternating``: several losses taking turns on one state (MMUnlearner: masked ascent and
  retain NLL), full parameters;
- ``weight_edit``: a training-free edit of the weights (SSD, LFSSD, ASSD), full parameters;
- ``generation``: a wrapper of the sampler (room for GUARD-style methods; none yet).

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
    # The params a full-parameter run moves when train.params is unset: fn(hyperparameters) -> regex.
    trainable: Callable[[dict], str | None] | None = None

    def default_params(self, hyperparameters: dict) -> str | None:
        return None if self.trainable is None else self.trainable(hyperparameters)


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


def _register_builtin() -> None:
    from offside_jax.unlearn.losses import METHODS, rmu_trainable_pattern

    special = {"rmu": dict(trainable=lambda hp: rmu_trainable_pattern(hp["layer"]))}
    for name in sorted(METHODS):
        register(Method(name, "loss", _section(name), **special.get(name, {})))
    register(Method("ssd", "weight_edit", _section("ssd"), lora=False))
    register(Method("mmunlearner", "alternating", _section("mmunlearner"), lora=False))


_register_builtin()

__all__ = ["KINDS", "Method", "REGISTRY", "get", "hyperparameters", "names", "register"]
