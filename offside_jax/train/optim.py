"""The optimizer: optax AdamW with warmup + cosine/linear/constant schedule, clipping, decay mask."""
from __future__ import annotations

import re
from typing import Any

import jax
import optax

from offside_jax.config import OptimConfig

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then decay to ``lr * min_lr_ratio``
    at ``total_steps`` (cosine or linear), or stay constant."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    warmup = max(0, int(cfg.warmup_steps))
    decay_steps = max(1, int(total_steps) - warmup)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params: Any, no_decay: str | None = None) -> Any:
    """True for parameters that get weight decay: matrices (>= 2 dims: not biases or norm
    scales) whose dotted path does not match the ``no_decay`` regex."""
    pattern = re.compile(no_decay) if no_decay else None

    def decide(path, leaf) -> bool:
        dotted = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        return leaf.ndim >= 2 and not (pattern and pattern.search(dotted))

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm`` (when ``max_grad_norm``) then AdamW on the schedule."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm is not None and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.no_decay),
        )
    )
    return optax.chain(*parts), schedule
