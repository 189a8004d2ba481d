"""Half Fine-Tuning (HFT): each round, half of every decoder block trains and the other half
stays exactly where it was.

HFT (Hui et al., ACL 2025) fights forgetting during fine-tuning by updating only a random half
of the parameters per round, re-drawn every round. The rule, per decoder block
(``...layers.<i>.*``):

- **attention**: 2 of the 4 projections (``self_attn.{q,k,v,o}_proj``) train;
- **MLP**: 2 or 1 of the 3 projections (``mlp.{gate,up,down}_proj``): 2 where ``i + round``
  is even, 1 where it is odd, so neighbouring layers alternate and each layer averages one half
  over rounds (the paper says "2 or 1"; the alternation is our reading);
- **norms**: half of the block's norm scales (``input_layernorm``/``post_attention_layernorm``,
  and ``q_norm``/``k_norm`` where a family has them); an odd count alternates like the MLP
  (the paper does not give the norm rule);
- everything outside the decoder blocks always trains: embeddings, ``lm_head``, the final norm
  (freezing embeddings and head hurt in the paper's ablation), and a vision tower's blocks
  (``visual.blocks.*``; the paper is about text-only models).

A matrix's bias and its LoRA pair (``lora_a``/``lora_b``) share the matrix's draw. The mask is
drawn on the model's own matrices whether or not they carry adapters, so with LoRA the same
rule applies to the adapter pairs: an adapter trains when its matrix is in the trained half
this round (a model with ``q_proj|v_proj`` adapters trains 0, 1 or 2 of them).

**Rounds and the RNG.** Round ``r`` covers optimizer updates ``r * rounds ... (r+1) * rounds - 1``
and its mask is a pure function of ``(seed, r)``: one uniform draw from
``fold_in(key(seed), r)`` ranks the members of every group. The update counter lives in the optimizer state, so the mask is drawn
inside the jitted step from traced values (no recompilation when a round changes) and a run
resumed from a checkpoint re-draws exactly the masks of an uninterrupted one. :func:`hft_mask`
gives the same mask on the host for any ``(seed, round)``.

**Freezing.** Zeroing gradients does not freeze a parameter under AdamW: decoupled weight decay
and stale momentum still move it. :func:`half_finetune` therefore wraps the whole optimizer
(clipping included): frozen gradients are zeroed *before* it (so they do not count in the
clipping norm, as ``requires_grad=False`` in PyTorch), and frozen *updates* are zeroed after
it, so a frozen array is bitwise unchanged for the round.

**Adam moments when a matrix is re-enabled: kept.** The paper is silent. We follow what
``requires_grad=False`` does in PyTorch's AdamW: a frozen matrix's optimizer state (first and
second moments) is left exactly as it was while frozen (not decayed with zero gradients) and
resumes from there when the matrix trains again. One difference to PyTorch: optax's Adam has
one bias-correction count for all parameters, which keeps counting while a matrix is frozen
(after the first few dozen updates the correction is ~1 either way). Resetting the moments is
not offered: with optax's global count a reset moment would get no bias correction and its first
update would be ~3x a normal Adam step (``(1 - b1) / sqrt(1 - b2)``).

    tx = half_finetune(tx, params, HalfFinetuneConfig(enabled=True, rounds=50, seed=0))
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from offside_jax.config import ConfigError
from offside_jax.models.hf import path_to_str

GROUPS = ("attention", "mlp", "norm")
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_LEAF_NAMES = ("kernel", "bias", "weight", "scale", "embedding", "lora_a", "lora_b")


def classify(dotted: str) -> tuple[int, str, str] | None:
    """``(layer, group, member)`` of a parameter's dotted path, ``None`` outside the decoder
    blocks' matrices and norms (always trained). ``member`` is the module inside the block
    (``self_attn.q_proj``): its kernel, bias and LoRA pair share one draw."""
    match = _BLOCK.search(dotted)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    parts = rest.split(".")
    member = ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] in _LEAF_NAMES else rest
    last = member.split(".")[-1]
    if "norm" in last:
        return layer, "norm", member
    if last.endswith("_proj") and member.startswith(("self_attn.", "attn.")):
        return layer, "attention", member
    if last.endswith("_proj") and member.startswith("mlp."):
        return layer, "mlp", member
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The blocks of a model: ``members[(layer, group)]`` lists the group's modules in a fixed
    order; masks are drawn over these, whatever subset of them trains."""

    members: dict[tuple[int, str], tuple[str, ...]]

    @classmethod
    def from_paths(cls, paths: Sequence[str]) -> "Plan":
        groups: dict[tuple[int, str], set[str]] = {}
        for dotted in paths:
            found = classify(dotted)
            if found is not None:
                layer, group, member = found
                groups.setdefault((layer, group), set()).add(member)
        return cls({k: tuple(sorted(v)) for k, v in sorted(groups.items())})

    def draw(self, seed: int, round_: Any) -> dict[tuple[int, str], jax.Array]:
        """``{(layer, group): bool[len(members)]}``: which members train in ``round_`` (may be
        traced). Half of each group, an odd group's extra member where ``layer + round`` is even.
        One uniform draw ranks the members of every group at once (cheap to compile)."""
        if not self.members:
            return {}
        round_ = jnp.asarray(round_, jnp.int32)
        key = jax.random.fold_in(jax.random.key(seed), round_)
        groups = list(self.members)
        sizes = np.array([len(self.members[g]) for g in groups])
        layers = np.array([layer for layer, _ in groups])
        u = jax.random.uniform(key, (len(groups), int(sizes.max())))
        u = jnp.where(np.arange(u.shape[1])[None, :] < sizes[:, None], u, 2.0)  # padding ranks last
        rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
        keep = sizes // 2 + (sizes % 2) * ((layers + round_) % 2 == 0)
        trains = rank < keep[:, None]
        return {g: trains[i, : sizes[i]] for i, g in enumerate(groups)}

    def mask(self, tree: Any, seed: int, round_: Any) -> Any:
        """A tree like ``tree`` of bool scalars: True where the leaf trains in ``round_``."""
        drawn = self.draw(seed, round_)

        def leaf(path, _):
            found = classify(path_to_str(path))
            if found is None:
                return jnp.asarray(True)
            layer, group, member = found
            return drawn[(layer, group)][self.members[(layer, group)].index(member)]

        return jax.tree_util.tree_map_with_path(leaf, tree)


def _paths(*trees: Any) -> list[str]:
    return [path_to_str(p) for tree in trees if tree is not None for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def hft_mask(params: Any, seed: int, round_: int, *, model_params: Any = None) -> Any:
    """The mask of round ``round_`` on the host: a tree like ``params`` of Python bools (True:
    trains). ``model_params``: the model's other arrays (LoRA: the base weights), so the draw
    covers every matrix of each block (default: ``params`` alone)."""
    plan = Plan.from_paths(_paths(params, model_params))
    return jax.tree.map(bool, jax.device_get(plan.mask(params, seed, round_)))


class HalfFinetuneState(NamedTuple):
    count: jax.Array  # int32: optimizer updates so far (the round is count // rounds)
    inner: Any  # the wrapped optimizer's state


def _where(mask: Any, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda m, n, o: jnp.where(m, n, o), mask, new, old)


def half_finetune(optimizer: optax.GradientTransformation, params: Any, cfg: Any, *,
                  model_params: Any = None) -> optax.GradientTransformation:
    """``optimizer`` updating only this round's half (see the module docstring).

    ``params``: the trainable tree (its structure is the updates'); ``model_params``: the
    model's other arrays (LoRA: base weights), whose names complete each block's groups;
    ``cfg``: ``enabled``/``rounds``/``seed``/``moments`` (:class:`~offside_jax.config.HalfFinetuneConfig`).
    """
    if cfg.moments != "keep":
        raise ConfigError(f"train.half_finetune.moments={cfg.moments!r}: only 'keep' is implemented (see "
                          "offside_jax.train.half_finetune)")
    if cfg.rounds < 1:
        raise ConfigError(f"train.half_finetune.rounds must be >= 1, got {cfg.rounds}")
    plan = Plan.from_paths(_paths(params, model_params))
    if not any(classify(p) for p in _paths(params)):
        examples = ", ".join(_paths(params)[:4])
        raise ConfigError("train.half_finetune: none of the trainable parameters is a decoder block's projection "
                          f"or norm (model.layers.<i>.self_attn.q_proj, ...); got {examples}, ...")
    params_def = jax.tree.structure(params)
    seed, rounds = int(cfg.seed), int(cfg.rounds)

    def is_params_like(node: Any) -> bool:
        try:
            return jax.tree.structure(node) == params_def
        except Exception:  # noqa: BLE001 - unflattenable nodes are simply not params-like
            return False

    def keep_frozen(new_inner: Any, old_inner: Any, mask: Any) -> Any:
        """Every params-shaped part of the state (Adam's mu and nu) keeps its frozen leaves."""
        return jax.tree.map(lambda n, o: _where(mask, n, o) if is_params_like(n) else n,
                            new_inner, old_inner, is_leaf=is_params_like)

    def init(init_params: Any) -> HalfFinetuneState:
        return HalfFinetuneState(jnp.zeros((), jnp.int32), optimizer.init(init_params))

    def update(updates: Any, state: HalfFinetuneState, params: Any = None) -> tuple[Any, HalfFinetuneState]:
        mask = plan.mask(updates, seed, state.count // rounds)
        grads = _where(mask, updates, jax.tree.map(jnp.zeros_like, updates))
        new_updates, inner = optimizer.update(grads, state.inner, params)
        new_updates = _where(mask, new_updates, jax.tree.map(jnp.zeros_like, new_updates))
        return new_updates, HalfFinetuneState(state.count + 1, keep_frozen(inner, state.inner, mask))

    return optax.GradientTransformation(init, update)


__all__ = ["GROUPS", "HalfFinetuneState", "Plan", "classify", "half_finetune", "hft_mask"]
