"""offside_jax.train: the engine that fine-tuning, unlearning and RL updates run on.

- ``mesh``: ``make_mesh((data, fsdp, tensor))`` with ``AxisType.Auto``; ``LOGICAL_AXIS_RULES``
  (the one table from logical axis names to mesh axes); ``state_shardings``,
  ``batch_sharding``, ``sharding_fn`` (for ``models.hf.load_params_into``).
- ``losses``: the loss protocol ``loss_fn(model, batch, rng, reference) -> (loss_sum, weight,
  aux)``, ``register_loss``/``get_loss``, the answer-only NLL (``"nll"``) with a fused,
  chunked cross-entropy, ``next_token_targets``, ``final_hidden``, ``model_token_logprobs``.
- ``optim``: ``make_optimizer(OptimConfig, total_steps)``: clipping + AdamW on a warmup +
  cosine/linear/constant schedule, weight decay on matrices only.
- ``step``: ``partition(model)`` (trainable vs frozen arrays; LoRA-aware), ``TrainState``,
  ``TrainStep`` (the jitted, donated, sharded step with token-weighted micro-batch
  accumulation; ``init_state``, ``shard_batch``, ``evaluate``, ``abstract_state``, ``model``).
- ``half_finetune``: Half Fine-Tuning (HFT): ``half_finetune(optimizer, params, cfg)`` trains a
  random half of every decoder block per round (the others' updates zeroed after AdamW, their
  moments kept); ``hft_mask(params, seed, round)`` (``Session.step(..., half_finetune=cfg)``,
  ``train.half_finetune`` in configs).
- ``checkpoint``: ``Checkpointer`` (orbax; async, keep-last-K, atomic, restore onto any mesh).
- ``loop``: ``train`` (progress, JSON-lines + TensorBoard metrics, periodic eval and
  checkpoints, NaN stop), ``start_or_resume``, ``IndexedBatches``, ``MetricLogger``.
- ``sft_data`` / ``finetune``: chat JSON-lines to batches, and ``run_finetune`` behind
  ``offside-jax finetune --config configs/<x>.yaml key=value ...``.
- ``distributed``: ``initialize`` (``jax.distributed`` from config or environment, first
  thing in a command), ``process_rows`` (which rows of a global batch this process reads),
  ``is_primary``, ``barrier``, ``to_host``.
- ``aot``: ``TrainStep.compile`` ahead of time, ``memory_estimate`` (per-device bytes from
  XLA), ``check_memory`` / ``check_train_step`` (stop before training when it does not fit).
- ``perf``: MaxText's training FLOPs, ``mfu``, KV-cache bytes and the decode roofline.

A minimal custom training run::

    model = create_model(hf_config)                      # or hf.load_pretrained(dir, sharding_fn=...)
    lora.apply(model, lora.LoRASpec("q_proj|v_proj"))    # optional
    tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-4), total_steps=1000)
    step = TrainStep(partition(model), losses.answer_nll, tx, mesh=make_mesh((1, -1, 1)),
                     micro_batches=4, schedule=schedule)
    state = step.init_state(seed=0)
    state, metrics = step(state, step.shard_batch(host_batch))
"""
