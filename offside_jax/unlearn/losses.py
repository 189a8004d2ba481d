"""Registry of unlearning losses, each a short pure function selected by name from config.

A method receives an :class:`Outputs` view of one micro-batch and its hyperparameters, and
returns ``(loss, aux_metrics)``. :func:`build_loss` binds the hyperparameters and adapts the
method to the training core's loss protocol (``offside_jax.train.losses``):
``loss_fn(model, batch, rng, reference) -> (loss_sum, weight, aux)`` with weight 1, so the
step averages methods over micro-batches.

The batch is a dict of sub-batches, each in the data pipeline's format (``input_ids``,
``attention_mask``, ``loss_mask``):

- ``forget``: the records to unlearn (question + rumor answer);
- ``retain``: records to keep (OFFSIDE's GD samples them 1:3 against forget);
- ``forget_idk``: the forget questions answered with a refusal (IdK/PO, IdkDPO);
- ``forget_alt``: the forget questions with an alternate answer (DPO; for OFFSIDE, the
  corrected fact);
- optional ``ref_logp`` [B] inside a sub-batch: cached summed reference log-probs of its
  answers (reference outputs that never change need computing once).

Reference outputs come from the frozen reference model handed over by the step (the same
base params with adapters off under LoRA) and are wrapped in ``stop_gradient``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from offside_jax.train import losses as train_losses
from offside_jax.unlearn import objectives as obj

Method = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Method
    needs_reference: bool
    splits: tuple[str, ...]

    def defaults(self) -> dict[str, Any]:
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}


METHODS: dict[str, MethodSpec] = {}


def unlearning_method(name: str, *, needs_reference: bool = False, splits: tuple[str, ...] = ("forget",)):
    """Register ``fn(outputs, **hyperparameters) -> (loss, aux)`` under ``name``."""

    def add(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, fn, needs_reference, splits)
        return fn

    return add


class Outputs:
    """Lazily computed, memoised model outputs for the sub-batches of one micro-batch.

    Answer NLLs and sequence log-probs go through the fused, chunked cross-entropy of
    ``offside_jax.train.losses`` (``chunk_tokens`` tokens at a time, no ``[B, T, V]`` logits)
    when the model's head is a plain matrix and that sub-batch's full logits are not needed
    anyway; the values are the same as from full logits.
    """

    def __init__(self, model: nnx.Module, reference: nnx.Module | None, batch: Mapping[str, Mapping[str, jax.Array]],
                 chunk_tokens: int = 0):
        self.model, self.reference, self.batch = model, reference, batch
        self.chunk_tokens = chunk_tokens
        self._memo: dict[tuple, Any] = {}

    def sub(self, split: str) -> Mapping[str, jax.Array]:
        if split not in self.batch:
            raise KeyError(f"this method needs a {split!r} sub-batch; the batch has {sorted(self.batch)}")
        return self.batch[split]

    def _module(self, which: str) -> nnx.Module:
        return self.model if which == "policy" else self._reference()

    def _hidden(self, which: str, split: str, collect_hidden: bool = False):
        key = ("hidden", which, split, collect_hidden)
        if key not in self._memo:
            model = self._module(which)
            if collect_hidden:
                result = model.hidden_states(self.sub(split), collect_hidden=True)
            else:
                result = (model.hidden_states(self.sub(split)), [])
            if which == "reference":
                result = jax.lax.stop_gradient(result)
            self._memo[key] = result
        return self._memo[key]

    def _logits(self, which: str, split: str) -> jax.Array:
        key = ("logits", which, split)
        if key not in self._memo:
            logits = self._module(which).logits(self._hidden(which, split)[0])
            self._memo[key] = jax.lax.stop_gradient(logits) if which == "reference" else logits
        return self._memo[key]

    def _fused(self, which: str, split: str) -> bool:
        # A head that is not a plain matrix is handled inside train_losses (full logits there).
        return self.chunk_tokens > 0 and ("logits", which, split) not in self._memo

    def _reference(self) -> nnx.Module:
        if self.reference is None:
            raise ValueError("this unlearning method needs a reference model, but the step was built without one")
        return self.reference

    def logits(self, split: str) -> jax.Array:
        return self._logits("policy", split)

    def ref_logits(self, split: str) -> jax.Array:
        return self._logits("reference", split)

    def depth(self, split: str) -> int:
        """The number of decoder layers (hidden states collected from the policy)."""
        return len(self._hidden("policy", split, collect_hidden=True)[1])

    def hidden_after_layer(self, split: str, layer: int, reference: bool = False) -> jax.Array:
        return self._hidden("reference" if reference else "policy", split, collect_hidden=True)[1][layer]

    def _nll(self, which: str, split: str) -> jax.Array:
        sub = self.sub(split)
        if not self._fused(which, split):
            return obj.batch_mean_nll(self._logits(which, split), sub)
        targets, weights = train_losses.next_token_targets(sub)
        total = train_losses.nll_sum(self._module(which), self._hidden(which, split)[0], targets, weights, self.chunk_tokens)
        return total / jnp.maximum(jnp.sum(weights), 1.0)

    def _logp_seq(self, which: str, split: str) -> jax.Array:
        sub = self.sub(split)
        if not self._fused(which, split):
            return obj.logits_sequence_logprob(self._logits(which, split), sub)
        return train_losses.hidden_sequence_logprob(self._module(which), self._hidden(which, split)[0], sub, self.chunk_tokens)

    def nll(self, split: str) -> jax.Array:
        return self._nll("policy", split)

    def ref_nll(self, split: str) -> jax.Array:
        sub = self.sub(split)
        if "ref_logp" in sub:  # cached summed log-probs: the batch-mean NLL is their sum over the tokens
            return -jnp.sum(sub["ref_logp"]) / jnp.maximum(jnp.sum(obj.answer_lengths(sub)), 1.0)
        return jax.lax.stop_gradient(self._nll("reference", split))

    def logp_seq(self, split: str) -> jax.Array:
        return self._logp_seq("policy", split)

    def ref_logp_seq(self, split: str) -> jax.Array:
        sub = self.sub(split)
        if "ref_logp" in sub:
            return sub["ref_logp"]
        return jax.lax.stop_gradient(self._logp_seq("reference", split))


def _retain_term(out: Outputs, kind: str) -> jax.Array:
    if kind == "nll":
        return out.nll("retain")
    if kind == "kl":
        return obj.kl_to_reference(out.logits("retain"), out.ref_logits("retain"), obj.position_weights(out.sub("retain")))
    raise ValueError(f"retain_loss must be 'nll' or 'kl', got {kind!r}")


# -- the methods ---------------------------------------------------------------------------------


@unlearning_method("ga")
def gradient_ascent(out: Outputs):
    """GA: ``-NLL(forget)``."""
    nll = out.nll("forget")
    return -nll, {"forget_nll": nll}


@unlearning_method("grad_diff", splits=("forget", "retain"))
def grad_diff(out: Outputs, gamma: float = 1.0, alpha: float = 1.0, retain_loss: str = "nll"):
    """GradDiff: ``gamma * -NLL(f) + alpha * retain``, the retain term NLL or (``"kl"``)
    ``KL(ref || cur)`` on retain, as open-unlearning computes its KL variant.

    OFFSIDE's GD is ``gamma=0.25, alpha=0.75`` with 1:3 forget:retain batches.
    """
    forget_nll = out.nll("forget")
    retain = _retain_term(out, retain_loss)
    return gamma * -forget_nll + alpha * retain, {"forget_nll": forget_nll, "retain_term": retain}


@unlearning_method("kl", needs_reference=True, splits=("forget", "retain"))
def kl_min(out: Outputs, alpha: float = 1.0):
    """KL-min: ``-NLL(f) + alpha * KL(ref || cur)`` over all real positions of retain."""
    forget_nll = out.nll("forget")
    kl = _retain_term(out, "kl")
    return -forget_nll + alpha * kl, {"forget_nll": forget_nll, "retain_kl": kl}


@unlearning_method("idk", splits=("forget_idk", "retain"))
def idk(out: Outputs, alpha: float = 1.0):
    """IdK / PO: NLL of a refusal on the forget questions, plus ``alpha * NLL(r)``."""
    refusal = out.nll("forget_idk")
    retain = out.nll("retain")
    return refusal + alpha * retain, {"refusal_nll": refusal, "retain_nll": retain}


@unlearning_method("dpo", needs_reference=True, splits=("forget", "forget_alt", "retain"))
def dpo(out: Outputs, beta: float = 0.1, alpha: float = 1.0, gamma: float = 1.0, win: str = "forget_alt"):
    """DPO: prefer the ``win`` answer (alternate, or refusal for IdkDPO) over the forget answer."""
    loss = obj.dpo_loss(out.logp_seq(win), out.ref_logp_seq(win), out.logp_seq("forget"), out.ref_logp_seq("forget"), beta)
    retain = out.nll("retain") if alpha else jnp.zeros(())
    return gamma * loss + alpha * retain, {"dpo": loss, "retain_nll": retain}


@unlearning_method("idk_dpo", needs_reference=True, splits=("forget", "forget_idk", "retain"))
def idk_dpo(out: Outputs, beta: float = 0.1, alpha: float = 1.0, gamma: float = 1.0):
    """IdkDPO: DPO with the refusal as the preferred answer."""
    return dpo(out, beta=beta, alpha=alpha, gamma=gamma, win="forget_idk")


@unlearning_method("npo", needs_reference=True, splits=("forget", "retain"))
def npo(out: Outputs, beta: float = 0.1, alpha: float = 1.0, gamma: float = 1.0, variant: str = "sum"):
    """NPO (+ retain NLL when ``alpha > 0``).

    ``variant="sum"``: open-unlearning, per-sequence summed log-probs, beta 0.1.
    ``variant="offside"``: OFFSIDE's public code, batch-mean NLLs (use beta 0.9).
    """
    if variant == "sum":
        loss = obj.npo_loss(out.logp_seq("forget"), out.ref_logp_seq("forget"), beta)
    elif variant == "offside":
        loss = obj.offside_npo_loss(out.nll("forget"), out.ref_nll("forget"), beta)
    else:
        raise ValueError(f"npo variant must be 'sum' or 'offside', got {variant!r}")
    retain = out.nll("retain") if alpha else jnp.zeros(())
    return gamma * loss + alpha * retain, {"npo": loss, "retain_nll": retain}


@unlearning_method("simnpo", splits=("forget", "retain"))
def simnpo(out: Outputs, beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, alpha: float = 1.0):
    """SimNPO (reference-free), ``gamma * simnpo + alpha * NLL(r)`` as open-unlearning weighs it."""
    forget = out.sub("forget")
    loss = obj.simnpo_loss(out.logp_seq("forget"), obj.answer_lengths(forget), beta, delta)
    retain = out.nll("retain") if alpha else jnp.zeros(())
    return gamma * loss + alpha * retain, {"simnpo": loss, "retain_nll": retain}


@unlearning_method("wga", splits=("forget", "retain"))
def wga(out: Outputs, beta: float = 1.0, gamma: float = 1.0, alpha: float = 1.0):
    """WGA: ascent weighted by the (detached) token probability to the power beta."""
    loss = obj.wga_loss(out.logits("forget"), out.sub("forget"), beta)
    retain = out.nll("retain") if alpha else jnp.zeros(())
    return gamma * loss + alpha * retain, {"wga": loss, "retain_nll": retain}


@unlearning_method("undial", needs_reference=True, splits=("forget", "retain"))
def undial(out: Outputs, beta: float = 10.0, gamma: float = 1.0, alpha: float = 0.0):
    """UNDIAL: distil from the reference with the forget token's logit lowered by beta."""
    loss = obj.undial_loss(out.logits("forget"), out.ref_logits("forget"), out.sub("forget"), beta)
    retain = out.nll("retain") if alpha else jnp.zeros(())
    return gamma * loss + alpha * retain, {"undial": loss, "retain_nll": retain}


def rmu_direction(hidden_size: int, seed: int) -> jax.Array:
    """RMU's fixed random unit vector u (uniform in [0, 1) then normalised, as in WMDP)."""
    u = jax.random.uniform(jax.random.key(seed), (hidden_size,), jnp.float32)
    return u / jnp.linalg.norm(u)


def rmu_layer_index(layer: float, depth: int) -> int:
    """RMU's layer L of a ``depth``-layer model from ``layer``, a fraction of the depth."""
    if not 0 <= layer < 1:
        raise ValueError(f"methods.rmu.layer={layer}: a fraction of the model's depth in [0, 1)")
    return min(int(layer * depth), depth - 1)


def rmu_trainable_pattern(layer: int) -> str:
    """Regex of the params RMU updates by default: MLP down projections of layers L-2..L."""
    layers = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
    return rf"model\.layers\.({layers})\.mlp\.down_proj"


@unlearning_method("rmu", needs_reference=True, splits=("forget", "retain"))
def rmu(out: Outputs, layer: float = 0.21875, steering_coeff: float = 2.0, alpha: float = 1.0, seed: int = 0):
    """RMU: push layer-L activations on forget towards ``c * u``; keep retain activations.

    L is ``floor(layer * depth)`` (:func:`rmu_layer_index`). Train only the params of
    :func:`rmu_trainable_pattern` (set the step's trainable regex).
    """
    forget, retain = out.sub("forget"), out.sub("retain")
    index = rmu_layer_index(layer, out.depth("forget"))
    h_forget = out.hidden_after_layer("forget", index)
    u = rmu_direction(h_forget.shape[-1], seed)
    forget_loss = obj.masked_mse(h_forget, steering_coeff * u, _real_tokens(forget))
    retain_loss = obj.masked_mse(
        out.hidden_after_layer("retain", index), out.hidden_after_layer("retain", index, reference=True), _real_tokens(retain)
    )
    return forget_loss + alpha * retain_loss, {"rmu_forget": forget_loss, "rmu_retain": retain_loss}


def _real_tokens(sub: Mapping[str, jax.Array]) -> jax.Array:
    mask = sub.get("attention_mask")
    return jnp.ones(sub["input_ids"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


# -- binding to the training core's protocol -------------------------------------------------------


def build_loss(name: str, *, chunk_tokens: int = 256, **hyperparameters: Any):
    """A training-core loss for method ``name`` with its hyperparameters bound.

    ``chunk_tokens``: answer NLLs and sequence log-probs use the fused cross-entropy over
    chunks of this many tokens (0: full logits; same values). Unknown methods or
    hyperparameters raise a ``ValueError`` listing the valid ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; registered: {', '.join(sorted(METHODS))}")
    spec = METHODS[name]
    valid = spec.defaults()
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for {name!r}; valid: {sorted(valid)}")

    needs_reference = spec.needs_reference or hyperparameters.get("retain_loss") == "kl"
    return bind(spec.fn, f"unlearn_{name}", splits=spec.splits, needs_reference=needs_reference,
                chunk_tokens=chunk_tokens, **hyperparameters)


def bind(fn: Method, name: str, *, splits: tuple[str, ...], needs_reference: bool = False, chunk_tokens: int = 256,
         **hyperparameters: Any):
    """``fn(outputs, **hyperparameters) -> (loss, aux)`` as a training-core loss (weight 1)."""

    def loss_fn(model, batch, rng, reference):
        del rng
        loss, aux = fn(Outputs(model, reference, batch, chunk_tokens), **hyperparameters)
        return loss, jnp.ones((), jnp.float32), aux

    loss_fn.needs_reference = needs_reference  # type: ignore[attr-defined]
    loss_fn.splits = splits  # type: ignore[attr-defined]
    loss_fn.__name__ = name
    return loss_fn


# OFFSIDE's GD_forget.py as a loss method of this registry (its other baselines alternate).
from offside_jax.unlearn import offside_baselines as _offside_baselines  # noqa: E402,F401
