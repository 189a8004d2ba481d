"""OFFSIDE's baselines as its public code runs them (``baselines/*.py`` called by ``bash.sh``).

Selected by name (``method=offside_gd`` ...); the formulations of ``offside_jax.unlearn.losses``
stay the open-unlearning ones. ``ga`` already is OFFSIDE's GA_forget.py (``-NLL(f)``, the
token-mean NLL of the batch, as Hugging Face's ``outputs.loss``).

- ``offside_gd`` (GD_forget.py): one update of ``w_f * -NLL(f) + w_r * NLL(r)`` where each
  weight is its sub-batch's share of the rows: bash.sh's 1 forget and 3 retain rows give
  0.25 / 0.75 (the method's default ``data.retain_ratio`` is 3). The script accumulates 4
  such micro-batches per update: ``data.micro_batches=4`` with ``data.forget_batch_size=4``.
- ``offside_kl`` (KL_min.py): micro-step ``s`` of an epoch is a forget step ``-NLL(f)`` when
  ``s`` is even and a retain step ``NLL(r) + kl_weight * KL(ref || cur)`` when odd, the epoch
  ``max(forget batches, retain batches)`` micro-steps long; the KL is PyTorch's
  ``kl_div(..., reduction="batchmean")``: summed over every position and the vocabulary,
  divided by the rows. The script runs under accelerate with ``gradient_accumulation_steps=2``,
  so an optimizer update averages the gradients of a forget and the following retain
  micro-step (``accumulation``; 1 gives an update per micro-step). ``train.steps`` counts
  updates, as for every method: ``train.steps * accumulation`` micro-steps.
- ``offside_po`` (PO.py): the same schedule; the forget micro-step learns the refusal
  ("I do not know the answer"), the retain micro-step is ``NLL(r)``.
- ``offside_npo`` (NPO.py): ``-(2/beta) log sigmoid(beta * (NLL(f) - NLL_ref(f)))`` on the
  batch-mean NLLs, beta 0.9, no retain term; the reference is the model fine-tuned on the
  retain set (NPO_reference_model_FT.py) by the training session before unlearning, its
  answer log-probs cached in the forget batches (no second model in memory while unlearning).

Padding: OFFSIDE pads each batch to its longest row and its KL also covers those padded
positions; ours are padded to one fixed length, so the KL covers the real tokens only (equal
on a batch without padding).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from offside_jax.unlearn import objectives as obj
from offside_jax.unlearn.losses import Outputs, bind, build_loss, unlearning_method

OFFSIDE_RATIO = 3  # bash.sh: 1 forget : 3 retain rows (GD, KL_min's defaults; PO's 2 : 6)


def _rows(out: Outputs, split: str) -> int:
    return out.sub(split)["input_ids"].shape[0]


@unlearning_method("offside_gd", splits=("forget", "retain"))
def offside_gd(out: Outputs):
    """GD_forget.py: ``w_f * -NLL(f) + w_r * NLL(r)``, weights the sub-batches' shares of the rows."""
    forget_rows, retain_rows = _rows(out, "forget"), _rows(out, "retain")
    forget_weight = forget_rows / (forget_rows + retain_rows)
    forget_nll, retain_nll = out.nll("forget"), out.nll("retain")
    loss = forget_weight * -forget_nll + (1.0 - forget_weight) * retain_nll
    return loss, {"forget_nll": forget_nll, "retain_nll": retain_nll}


def kl_retain_step(out: Outputs, kl_weight: float):
    """KL_min.py's retain micro-step: ``NLL(r) + kl_weight * KL_batchmean(ref || cur)``."""
    retain = out.sub("retain")
    kl = obj.batchmean_kl(out.logits("retain"), out.ref_logits("retain"), _real_tokens(retain))
    nll = out.nll("retain")
    return nll + kl_weight * kl, {"retain_nll": nll, "retain_kl": kl}


def refusal_step(out: Outputs):
    """PO.py's forget micro-step: NLL of the refusal on the forget questions."""
    nll = out.nll("forget_idk")
    return nll, {"refusal_nll": nll}


def retain_step(out: Outputs):
    """PO.py's retain micro-step: ``NLL(r)``."""
    nll = out.nll("retain")
    return nll, {"retain_nll": nll}


def npo_step(out: Outputs, beta: float):
    """NPO.py: ``-(2/beta) log sigmoid(beta * (NLL(f) - NLL_ref(f)))`` on batch-mean NLLs."""
    nll = out.nll("forget")
    loss = obj.offside_npo_loss(nll, out.ref_nll("forget"), beta)
    return loss, {"npo": loss, "forget_nll": nll}


def _real_tokens(sub: Mapping[str, jax.Array]) -> jax.Array:
    mask = sub.get("attention_mask")
    return jnp.ones(sub["input_ids"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


# -- the alternation of KL_min.py / PO.py --------------------------------------------------------


def micro_step(index: int, epoch_steps: int) -> tuple[str, int]:
    """``(kind, n)`` of micro-step ``index``: ``"forget"`` on even steps of an epoch of
    ``epoch_steps``, else ``"retain"``; ``n`` counts the earlier micro-steps of that kind."""
    epoch, step = divmod(index, epoch_steps)
    forgets_per_epoch = (epoch_steps + 1) // 2
    if step % 2 == 0:
        return "forget", epoch * forgets_per_epoch + step // 2
    return "retain", epoch * (epoch_steps - forgets_per_epoch) + step // 2


def epoch_steps(n_forget: int, forget_rows: int, n_retain: int, retain_rows: int) -> int:
    """``max(len(forget_loader), len(retain_loader))`` (PyTorch loaders keep the last short batch)."""
    return max(-(-n_forget // forget_rows), -(-n_retain // retain_rows))


class OffsideAlternation:
    """``batch_at(i)`` of KL_min.py / PO.py: ``{forget_key: ...}`` or ``{"retain": ...}``."""

    def __init__(self, forget_at: Callable[[int], Mapping[str, Any]], retain_at: Callable[[int], Mapping[str, Any]],
                 steps_per_epoch: int, forget_key: str = "forget"):
        self.forget_at, self.retain_at = forget_at, retain_at
        self.steps_per_epoch, self.forget_key = max(1, steps_per_epoch), forget_key

    def __call__(self, index: int) -> dict[str, Any]:
        kind, n = micro_step(index, self.steps_per_epoch)
        if kind == "forget":
            return {self.forget_key: self.forget_at(n)[self.forget_key]}
        return {"retain": self.retain_at(n)["retain"]}


@dataclasses.dataclass
class Recipe:
    """What an alternating method hands the training session: its phases, batches, the batches
    of each distinct layout (compiled and checked first), a report and micro-steps per update."""

    phases: list
    batches: Callable[[int], Mapping[str, Any]]
    first: list
    report: dict
    accumulate: int = 1


def _alternating(run_cfg, sets, base, common, forget_key: str, forget_loss, retain_loss, accumulation: int,
                 refusal: str | None = None) -> Recipe:
    from offside_jax.train.session import Phase
    from offside_jax.unlearn import settings
    from offside_jax.unlearn.run import fitted_encoder

    common = dict(common, refusals=(refusal,) if refusal else common["refusals"])
    forget_at = settings.UnlearningBatches(sets, base, (forget_key,), **common)
    retain_at = settings.UnlearningBatches(sets, base, ("retain",), **common)
    encoder = fitted_encoder(base, forget_at.all_examples() + retain_at.all_examples(), run_cfg.data.max_length)
    forget_at.encoder = retain_at.encoder = encoder
    steps = epoch_steps(len(sets.forget), forget_at.forget_rows, len(sets.retain), retain_at.retain_rows)
    batches = OffsideAlternation(forget_at, retain_at, steps, forget_key)
    phases = [Phase(forget_key, forget_loss), Phase("retain", retain_loss)]
    return Recipe(phases, batches, [batches(0), batches(1)], {"epoch_micro_steps": steps}, accumulation)


def kl_recipe(run_cfg, hparams, model, sets, base, common, session) -> Recipe:
    del model, session
    chunk = run_cfg.train.loss_chunk_tokens
    retain = bind(kl_retain_step, "offside_kl_retain", splits=("retain",), needs_reference=True, chunk_tokens=chunk,
                  kl_weight=hparams["kl_weight"])
    return _alternating(run_cfg, sets, base, common, "forget", build_loss("ga", chunk_tokens=chunk), retain,
                        hparams["accumulation"])


def po_recipe(run_cfg, hparams, model, sets, base, common, session) -> Recipe:
    del model, session
    chunk = run_cfg.train.loss_chunk_tokens
    forget = bind(refusal_step, "offside_po_forget", splits=("forget_idk",), chunk_tokens=chunk)
    retain = bind(retain_step, "offside_po_retain", splits=("retain",), chunk_tokens=chunk)
    return _alternating(run_cfg, sets, base, common, "forget_idk", forget, retain, hparams["accumulation"],
                        refusal=hparams["refusal"])


# -- NPO's reference fine-tuned on the retain set ----------------------------------------------------


def npo_loss(hparams: dict, chunk_tokens: int):
    frozen = hparams["reference"] == "frozen"
    return bind(npo_step, "offside_npo", splits=("forget",), needs_reference=frozen, chunk_tokens=chunk_tokens,
                beta=hparams["beta"])


def npo_reference_logprobs(run_cfg, hparams, model, sets, base, session) -> dict[str, np.ndarray]:
    """Summed answer log-probs of every forget record under the reference (``{}``: the frozen
    starting model serves). The reference is fine-tuned on the retain set in memory, from a
    copy of ``model`` or from ``reference_from``, with the run's LoRA settings."""
    if hparams["reference"] == "frozen":
        return {}
    import copy

    from offside_jax.config import OptimConfig
    from offside_jax.train.session import Session
    from offside_jax.train.step import frozen_copy
    from offside_jax.unlearn import probe, settings
    from offside_jax.unlearn.run import fitted_encoder
    from offside_jax.unlearn.saliency import retain_nll

    if hparams["reference_from"]:
        model_cfg = dataclasses.replace(run_cfg.model, path=hparams["reference_from"])
        reference = session.load(model_cfg, seed=run_cfg.seed).model
    else:
        reference = frozen_copy(model)
    memory = Session(session.mesh)  # in memory: no run directory, no checkpoints
    memory.add_lora(reference, run_cfg.lora, seed=run_cfg.seed)
    rows = hparams["reference_batch_size"]
    batches = settings.UnlearningBatches(sets, base, ("retain",), forget_batch_size=1, retain_ratio=rows,
                                         seed=run_cfg.seed, shuffle=run_cfg.data.shuffle)
    batches.encoder = fitted_encoder(base, sets.retain, run_cfg.data.max_length)
    optim = dataclasses.replace(OptimConfig(), lr=hparams["reference_lr"])
    steps = hparams["reference_steps"]
    step_fn = memory.step(reference, retain_nll, optim, steps)
    state = memory.fit(step_fn, batches, steps=steps, seed=run_cfg.seed, progress=False)
    tuned = step_fn.model(state)
    encoder = fitted_encoder(copy.copy(base), sets.forget, run_cfg.data.max_length)
    logp = probe.sequence_logprobs(tuned, sets.forget, encoder, batch_size=run_cfg.eval.batch_size)
    return {"forget": logp}


__all__ = ["OFFSIDE_RATIO", "OffsideAlternation", "Recipe", "epoch_steps", "kl_recipe", "kl_retain_step", "micro_step",
           "npo_loss", "npo_reference_logprobs", "npo_step", "offside_gd", "po_recipe", "refusal_step", "retain_step"]
