"""Supervised fine-tuning (full or LoRA) on chat JSON-lines or an OFFSIDE release: wires
config -> model -> loop. With ``data.release`` the vanilla model of the benchmark learns facts
and rumors (the finetune split; a text-only model keeps the text records), encoded by
``offside_jax.data.batches`` (chat template for text models, images for Qwen-VL ones).

``run_finetune(cfg)`` is a recipe for the training session (``offside_jax.train.session``):
the answer NLL over this process's rows of the chat or release batches. The session builds
the mesh, loads (or randomly initialises) the model onto it, attaches LoRA adapters if asked,
resumes from the latest checkpoint in ``output_dir/checkpoints`` if there is one, trains, and
exports the final merged model as an HF checkpoint (``output_dir/model``). The resolved config
is written to ``output_dir/config.yaml`` (when training starts) and into every checkpoint.

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
from offside_jax.train import losses, sft_data
from offside_jax.train.session import RunDir, Session
from offside_jax.train.step import TrainState, TrainStep

MODEL_SOURCES = ("tiny", "hf", "gguf")  # of offside_jax.models.loader.SOURCES, those finetune takes


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


def tiny_tokenizer(cfg: FinetuneConfig, conversations) -> tuple[Any, bool]:
    """``(tokenizer, whether it is new)`` of a tiny model: ``model.tokenizer``, the one a first
    run saved in ``output_dir/tokenizer``, else one trained on the data (deterministic, so every
    process trains the same)."""
    from offside_jax.models.loader import auto_tokenizer

    saved = Path(cfg.output_dir) / "tokenizer"
    if cfg.model.tokenizer:
        return auto_tokenizer(cfg.model.tokenizer), False
    if (saved / "tokenizer.json").exists():
        return auto_tokenizer(saved), False
    texts = sft_data.conversation_texts(conversations)
    return train_bpe_tokenizer(texts, cfg.model.tiny.vocab_size), True


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
    resolved = config_lib.to_dict(cfg)
    out = Path(cfg.output_dir)
    session = Session(cfg.mesh, distributed_cfg=cfg.distributed, run=RunDir(out, resolved, resume=cfg.resume),
                      checkpoint=cfg.checkpoint, log=cfg.log)
    if cfg.model.source not in MODEL_SOURCES:
        raise config_lib.ConfigError(f"finetune: model.source {cfg.model.source!r} is not one of {', '.join(MODEL_SOURCES)}")
    conversations, examples = training_records(cfg)
    tokenizer, new_tokenizer = (tiny_tokenizer(cfg, conversations) if cfg.model.source == "tiny" else (None, False))
    loaded = session.load(cfg.model, seed=cfg.seed, tokenizer=tokenizer)
    model, hf_config, tokenizer = loaded.model, loaded.hf_config, loaded.tokenizer
    session.add_lora(model, cfg.lora, seed=cfg.seed)

    loss_fn = losses.make_answer_nll(cfg.train.loss_chunk_tokens) if cfg.train.loss == "nll" else losses.get_loss(cfg.train.loss)
    step_fn = session.step(model, loss_fn, cfg.optim, cfg.train.steps, micro_batches=cfg.data.micro_batches,
                           fp32_master_weights=cfg.train.fp32_master_weights, reference=False,
                           half_finetune=cfg.train.half_finetune)
    del model, loaded  # its trainable arrays now belong to the training state

    try:
        rows = step_fn.process_rows(cfg.data.batch_size) if jax.process_count() > 1 else None
    except ValueError as e:
        raise config_lib.ConfigError(f"data.batch_size / data.micro_batches: {e}") from None
    if examples is not None:  # an OFFSIDE release: text or image records, encoded per batch
        batches = release_batches(cfg, examples, hf_config, tokenizer, rows)
    else:
        ids, attention, loss_mask = sft_data.encode_all(tokenizer, conversations, cfg.data.max_length, cfg.data.train_file)
        arrays = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
        batches = sft_data.EpochBatches(arrays, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, rows=rows)
    session.check_batches(step_fn, [batches(0)], "data.batch_size / data.micro_batches")
    session.check_memory(step_fn, [batches(0)], cfg.train)

    eval_fn = None
    if cfg.data.eval_file:
        from offside_jax.train import mesh as mesh_lib

        eval_convs = sft_data.read_chat_jsonl(cfg.data.eval_file)
        e_ids, e_att, e_mask = sft_data.encode_all(tokenizer, eval_convs, cfg.data.max_length, cfg.data.eval_file)
        usable = len(e_ids) - len(e_ids) % mesh_lib.batch_divisor(session.mesh)
        if usable == 0:
            raise sft_data.DataError(f"{cfg.data.eval_file}: fewer records than the mesh's "
                                     f"{mesh_lib.batch_divisor(session.mesh)} batch devices")
        mine = step_fn.process_rows(usable, micro_batches=1)  # this process's rows of the eval set
        eval_batch = step_fn.shard_batch(
            {"input_ids": e_ids[mine], "attention_mask": e_att[mine], "loss_mask": e_mask[mine]}, micro_batches=1
        )
        eval_fn = lambda state: step_fn.evaluate(state, eval_batch)  # noqa: E731

    session.run.begin()  # training starts: config.yaml, then the tokenizer a resume needs
    if new_tokenizer and session.primary:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    state = session.fit(step_fn, batches, steps=cfg.train.steps, seed=cfg.seed, eval_fn=eval_fn,
                        eval_every=cfg.train.eval_every, log_every=cfg.train.log_every)
    result = FinetuneResult(state, step_fn, tokenizer, hf_config, out)
    if cfg.export_merged:
        session.export(result.model(), hf_config, tokenizer, out / "model")
    return result
