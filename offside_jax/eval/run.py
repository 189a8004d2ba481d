"""`offside-jax evaluate`: the OFFSIDE evaluation suite on one model, on one or several processes.

    offside-jax evaluate --config cfg.yaml model.path=runs/npo/model release=runs/offside_tiny

The model comes from the one loader (``offside_jax.models.loader``) through a training
session's start-up (``jax.distributed``, the mesh ``suite.mesh``), so a run on a TPU slice
or several GPU hosts looks like one on a laptop: each process's devices generate their rows
of every batch, each process scores its share of the records, the records are gathered and
process 0 writes ``output_dir`` (``eval.suite.Suite.run``). A model directory of
``offside-jax unlearn method=guard`` (with ``guard.json``) is evaluated under GUARD.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from offside_jax.config import ConfigError, DistributedConfig, ModelConfig
from offside_jax.eval.suite import SuiteConfig


@dataclasses.dataclass
class EvaluateConfig:
    output_dir: str = "results/eval"
    name: str = "model"  # how the results name the model
    release: str = "???"  # an OFFSIDE release directory (offside-jax make-data writes one)
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(source="hf"))
    suite: SuiteConfig = dataclasses.field(default_factory=SuiteConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    max_pixels: int | None = None  # image budget of a vision-language model's processor
    # A model directory written by `offside-jax unlearn method=guard` holds GUARD's state
    # (guard.json): run the model under it; false scores the unchanged weights alone.
    guard: bool = True


def run_evaluation(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.release``; the results (the same in every process)."""
    from offside_jax.data.offside import load_release
    from offside_jax.eval.suite import Suite
    from offside_jax.train import mesh as mesh_lib
    from offside_jax.train.session import Session
    from offside_jax.unlearn import guard

    if not Path(cfg.release).is_dir():
        raise ConfigError(f"release {cfg.release}: no such directory")
    session = Session(cfg.suite.mesh, distributed_cfg=cfg.distributed)
    rows = mesh_lib.batch_divisor(session.mesh)
    if jax.process_count() > 1 and cfg.suite.batch_size % rows:
        # Every batch is split over the data x fsdp devices of all processes.
        raise ConfigError(f"suite.batch_size={cfg.suite.batch_size} does not split over the mesh's {rows} data x fsdp "
                          f"devices; use a multiple of {rows}")
    release = load_release(cfg.release)

    def texts() -> list[str]:  # the corpus of a tiny_vl model's tokenizer
        return [t for e in release.examples() for t in ([m.content for m in e.messages] + [e.question]
                                                        + [v for _, v in e.options])]

    loaded = session.load(cfg.model, seed=cfg.seed, texts=texts, max_pixels=cfg.max_pixels)
    try:
        suite = Suite(release, loaded.processor, cfg.suite, mesh=session.mesh)
    except ValueError as e:  # what the release cannot give this model (e.g. images to a text model)
        raise ConfigError(str(e)) from None
    info = {"model": dataclasses.asdict(cfg.model), "release": str(cfg.release)}
    model = loaded.model
    if cfg.guard and cfg.model.source == "hf" and cfg.model.path and guard.has_guard(cfg.model.path):
        try:
            model = guard.load_guard(cfg.model.path, model)
        except ValueError as e:
            raise ConfigError(f"{e} (guard=false evaluates the weights without it)") from None
        info["guard"] = f"{cfg.model.path}/{guard.GUARD_FILE}"
        if session.primary:
            print(f"evaluate: {cfg.model.path} runs under GUARD ({guard.GUARD_FILE}; guard=false: the weights alone)")
    return suite.run(model, cfg.output_dir, name=cfg.name, info=info, progress=session.primary)


__all__ = ["EvaluateConfig", "run_evaluation"]
