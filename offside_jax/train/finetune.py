"""Supervised fine-tuning (full or LoRA) on chat JSON-lines or an OFFSIDE release: wires
config -> model -> loop. With ``data.release`` the vanilla model of the benchmark learns facts
and rumors (the finetune split; a text-only model keeps the text records), encoded by
``offside_jax.data.batches`` (chat template for text models, images for Qwen-VL ones).

``run_finetune(cfg)`` builds the mesh, loads (or randomly initialises) the model onto it,
attaches LoRA adapters if asked, encodes the data, resumes from the latest checkpoint in
``output_dir/checkpoints`` if there is one, trains, and exports the final merged model as
an HF checkpoint (``output_dir/model``). The resolved config is written to
``output_dir/config.yaml`` and into every checkpoint.

Several processes (``distributed.*``, ``offside_jax.train.distributed``): joined first thing;
each reads only its rows of every batch; checkpoints are collective; config, logs, progress
and the export come from process 0. Before the first step the step is compiled ahead of time
and its device memory checked against ``train.memory_budget_gib`` (``offside_jax.train.aot``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from offside_jax import config as config_lib
from offside_jax.config import FinetuneConfig
from offside_jax.data.bpe import train_bpe_tokenizer
from offside_jax.files import write_yaml
from offside_jax.models import lora
from offside_jax.train import aot, distributed, losses, mesh as mesh_lib, sft_data
from offside_jax.train.checkpoint import Checkpointer
from offside_jax.train.loop import IndexedBatches, MetricLogger, start_or_resume, train
from offside_jax.train.optim import make_optimizer
from offside_jax.train.step import TrainState, TrainStep, partition, place_model_on_mesh

MODEL_SOURCES = ("tiny", "hf", "gguf")


@dataclasses.dataclass
class FinetuneResult:
    state: TrainState
    step_fn: TrainStep
    tokenizer: Any
    hf_config: Any
    output_dir: Path

    def model(self) -> nnx.Module:
        """The fine-tuned model (adapters attached when LoRA was used)."""
        return self.step_fn.model(self.state)


def tiny_hf_config(cfg: config_lib.TinyModelConfig, tokenizer: Any) -> Any:
    """A transformers config for a random-init model of the tiny shape and the tokenizer's ids."""
    from transformers import AutoConfig

    values = dataclasses.asdict(cfg)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        **values,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def load_model(cfg: FinetuneConfig, mesh, conversations) -> tuple[nnx.Module, Any, Any]:
    """``(model placed on the mesh, hf_config, tokenizer)`` for ``cfg.model``."""
    from offside_jax.models import hf
    from offside_jax.models.auto import create_model

    m = cfg.model
    kwargs = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat_policy if m.remat else False)
    if m.source not in MODEL_SOURCES:
        raise config_lib.ConfigError(f"model.source {m.source!r} is not one of {', '.join(MODEL_SOURCES)}")
    if m.source == "tiny":
        saved = Path(cfg.output_dir) / "tokenizer"
        resuming = (saved / "tokenizer.json").exists()
        distributed.barrier("tiny-tokenizer")  # every process looked before process 0 may write
        if m.tokenizer:
            tokenizer = _auto_tokenizer(m.tokenizer)
        elif resuming:  # the tokenizer of the first run
            tokenizer = _auto_tokenizer(saved)
        else:  # training is deterministic: every process gets the same tokenizer
            texts = sft_data.conversation_texts(conversations)
            tokenizer = train_bpe_tokenizer(texts, m.tiny.vocab_size)
            if distributed.is_primary():
                tokenizer.save_pretrained(str(saved))
        hf_config = tiny_hf_config(m.tiny, tokenizer)
        model = place_model_on_mesh(create_model(hf_config, seed=cfg.seed, **kwargs), mesh)
        return model, hf_config, tokenizer
    if not m.path:
        raise config_lib.ConfigError(f"model.path is required for model.source={m.source!r}")
    if m.source == "hf":
        hf_config = hf.load_hf_config(m.path)
        model = hf.load_pretrained(m.path, sharding_fn=mesh_lib.sharding_fn(mesh), **kwargs)
        tokenizer = _auto_tokenizer(m.tokenizer or m.path)
        return model, hf_config, tokenizer
    from offside_jax.models import gguf

    model, hf_config = gguf.load_gguf(m.path, sharding_fn=mesh_lib.sharding_fn(mesh), **kwargs)
    tokenizer = _auto_tokenizer(m.tokenizer) if m.tokenizer else gguf.load_gguf_tokenizer(m.path)
    return model, hf_config, tokenizer


def _auto_tokenizer(path: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def training_records(cfg: FinetuneConfig) -> tuple[list, list | None]:
    """``(conversations, examples)``: chat turns of every training record (they train a tiny
    model's tokenizer) and, for an OFFSIDE release, its ``Example`` records (else ``None``)."""
    from offside_jax.data import batches as release_data, pipeline

    if bool(cfg.data.train_file) == bool(cfg.data.release):
        raise config_lib.ConfigError("set exactly one of data.train_file (chat JSON lines) and data.release "
                                     "(an OFFSIDE release directory)")
    if cfg.data.train_file:
        return sft_data.read_chat_jsonl(cfg.data.train_file), None
    vision = False
    if cfg.model.source == "hf" and cfg.model.path:
        from offside_jax.models import hf

        vision = release_data.is_vision_language(hf.load_hf_config(cfg.model.path))
    examples = release_data.release_examples(cfg.data.release, cfg.data.release_setting, cfg.data.release_splits,
                                             cfg.data.release_modality, vision=vision)
    return [pipeline.conversation(e) for e in examples], examples


def release_batches(cfg: FinetuneConfig, examples: list, hf_config: Any, tokenizer: Any, rows=None):
    """``batch_at(i)`` over release examples, every batch padded to one measured shape."""
    from offside_jax.data import batches as release_data

    encoder = release_data.make_encoder(tokenizer, hf_config, image_root=cfg.data.release, max_length=cfg.data.max_length,
                                        max_pixels=cfg.data.max_pixels)
    release_data.fit_shape(encoder, examples)
    return release_data.ExampleBatches(examples, encoder, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                       rows=rows)


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    distributed.initialize(cfg.distributed)  # before anything touches a device
    primary = distributed.is_primary()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = config_lib.to_dict(cfg)
    if primary:
        write_yaml(out / "config.yaml", resolved)

    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    conversations, examples = training_records(cfg)
    model, hf_config, tokenizer = load_model(cfg, mesh, conversations)
    if cfg.lora.enabled:
        spec = lora.LoRASpec(cfg.lora.target, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        lora.apply(model, spec, seed=cfg.seed)
        place_model_on_mesh(model, mesh)

    loss_fn = losses.make_answer_nll(cfg.train.loss_chunk_tokens) if cfg.train.loss == "nll" else losses.get_loss(cfg.train.loss)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    step_fn = TrainStep(
        partition(model), loss_fn, optimizer, mesh=mesh, micro_batches=cfg.data.micro_batches, schedule=schedule,
        fp32_master_weights=cfg.train.fp32_master_weights,
    )
    del model  # its trainable arrays now belong to the training state

    rows = step_fn.process_rows(cfg.data.batch_size) if jax.process_count() > 1 else None
    if examples is not None:  # an OFFSIDE release: text or image records, encoded per batch
        batches = release_batches(cfg, examples, hf_config, tokenizer, rows)
    else:
        ids, attention, loss_mask = sft_data.encode_all(tokenizer, conversations, cfg.data.max_length, cfg.data.train_file)
        arrays = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
        batches = sft_data.EpochBatches(arrays, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, rows=rows)
    data = IndexedBatches(batches)
    if cfg.train.aot_memory_check:
        estimate, budget, _ = aot.check_train_step(step_fn, batches(0), cfg.train.memory_budget_gib)
        if primary:
            limit = "no budget set" if budget is None else f"budget {aot.format_bytes(budget)}"
            print(f"training step needs {estimate.describe()}; {limit}")

    eval_fn = None
    if cfg.data.eval_file:
        eval_convs = sft_data.read_chat_jsonl(cfg.data.eval_file)
        e_ids, e_att, e_mask = sft_data.encode_all(tokenizer, eval_convs, cfg.data.max_length, cfg.data.eval_file)
        usable = len(e_ids) - len(e_ids) % mesh_lib.batch_divisor(mesh)
        if usable == 0:
            raise sft_data.DataError(f"{cfg.data.eval_file}: fewer records than the mesh's {mesh_lib.batch_divisor(mesh)} batch devices")
        mine = step_fn.process_rows(usable, micro_batches=1)  # this process's rows of the eval set
        eval_batch = step_fn.shard_batch(
            {"input_ids": e_ids[mine], "attention_mask": e_att[mine], "loss_mask": e_mask[mine]}, micro_batches=1
        )
        eval_fn = lambda state: step_fn.evaluate(state, eval_batch)  # noqa: E731

    checkpointer = Checkpointer(cfg.checkpoint.directory or out / "checkpoints", every=cfg.checkpoint.every,
                                keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    logger = MetricLogger(out / "logs", tensorboard=cfg.log.tensorboard)
    try:
        state, start = start_or_resume(step_fn, checkpointer, seed=cfg.seed, data=data, resume=cfg.checkpoint.resume)
        if start and primary:
            print(f"resuming from step {start} ({checkpointer.directory})")
        state = train(
            step_fn,
            state,
            data,
            num_steps=cfg.train.steps,
            start_step=start,
            checkpointer=checkpointer,
            logger=logger,
            eval_fn=eval_fn,
            eval_every=cfg.train.eval_every,
            log_every=cfg.train.log_every,
            config=resolved,
            progress=cfg.log.progress,
        )
    finally:
        logger.close()
        checkpointer.close()

    result = FinetuneResult(state, step_fn, tokenizer, hf_config, out)
    if cfg.export_merged:
        model = result.model() if jax.process_count() == 1 else _gathered_model(step_fn, state)
        if primary:
            export = out / "model"
            lora.save_merged(model, hf_config, export)
            tokenizer.save_pretrained(str(export))
    return result


def _gathered_model(step_fn: TrainStep, state: TrainState) -> nnx.Module:
    """The model at ``state`` with every array complete on the host (collective: every
    process calls it), for process 0 to export weights sharded across processes."""
    graphdef, arrays = nnx.split(step_fn.model(state))
    nnx.replace_by_pure_dict(arrays, distributed.to_host(nnx.to_pure_dict(arrays)))
    return nnx.merge(graphdef, arrays)

