"""offside_jax.unlearn: unlearning methods, Fisher dampening, and the `offside-jax unlearn` run.

- ``losses``: the registry of unlearning losses (GA, GradDiff, KL, IdK, DPO, IdkDPO, NPO,
  SimNPO, WGA, UNDIAL, RMU) over ``forget``/``retain``/``forget_idk``/``forget_alt``
  sub-batches; ``build_loss(name, **hp)`` gives a training-core loss. ``objectives``: their math.
- ``dampening``: SSD / LFSSD / ASSD (``ssd(model, full_batches, forget_batches, config)``),
  streamed and sharded importances, corrective subsets (``identified_subset``).
- ``saliency``: MMUnlearner's Fisher-ratio masks per module group (``saliency_masks``) and the
  alternating masked-ascent / retain schedule (``AlternatingStep``, masks applied in the jitted step).
- ``settings``: the OFFSIDE settings (multimodal, unimodal, selective; by attribute; corrective)
  as data selection (``select``) and the batches a method reads (``UnlearningBatches``).
- ``probe``: answer probability of records under a model (before/after summaries).
- ``run``: ``run_unlearning(UnlearnConfig) -> UnlearnResult`` behind ``offside-jax unlearn``.

From Python::

    from offside_jax.config import UnlearnConfig, load_config
    from offside_jax.unlearn.run import run_unlearning
    cfg = load_config("configs/unlearn_tiny.yaml", ["method=simnpo"], schema=UnlearnConfig)
    result = run_unlearning(cfg)   # result.model, result.model_dir, result.summary["answer_probability"]
"""
