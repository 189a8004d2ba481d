"""Ahead-of-time memory estimates: per-device bytes against a hand count, and the early stop."""
import math
import re

import jax
import numpy as np
import pytest
from transformers import LlamaConfig

from offside_jax import cli
from offside_jax.config import OptimConfig
from offside_jax.models.auto import create_model
from offside_jax.train import aot, mesh as mesh_lib, optim
from offside_jax.train.losses import answer_nll
from offside_jax.train.step import TrainStep, partition

# Every matrix dimension divides by 8, so FSDP/TP shard every matrix evenly.
D, FF, V, LAYERS, HEADS, KV, HEAD_DIM = 64, 128, 256, 2, 4, 2, 16
ROWS, LENGTH = 8, 32


def tiny_step(mesh_shape) -> TrainStep:
    config = LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV, max_position_embeddings=64, tie_word_embeddings=False,
    )
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), 10)
    return TrainStep(partition(create_model(config, seed=0)), answer_nll, tx, mesh=mesh, schedule=schedule)


def host_batch():
    ids = np.random.default_rng(0).integers(0, V, (ROWS, LENGTH)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}


def hand_count_argument_bytes(matrix_split: int, batch_split: int) -> int:
    """Bytes of the step's arguments on one device, counted from the architecture.

    Matrices (embedding, projections, MLP, head) are split ``matrix_split`` ways, the norm
    scales are replicated; params, Adam's mu and nu each hold one fp32 copy. Scalars: the
    step, Adam's count, the schedule's count (int32) and the 2 x uint32 key. The batch has
    3 int32 arrays of ROWS x LENGTH split over the batch devices.
    """
    per_layer = D * HEADS * HEAD_DIM * 2 + D * KV * HEAD_DIM * 2 + 3 * D * FF
    matrices = V * D * 2 + LAYERS * per_layer
    norms = (2 * LAYERS + 1) * D
    state = 3 * 4 * (matrices // matrix_split + norms)
    scalars = 4 + 4 + 4 + 8
    batch = 3 * 4 * ROWS * LENGTH // batch_split
    return state + scalars + batch


@pytest.mark.parametrize("mesh_shape, matrix_split, batch_split", [((1, 1, 1), 1, 1), ((1, 8, 1), 8, 8), ((1, 4, 2), 8, 4)])
def test_per_device_argument_bytes_match_the_hand_count(mesh_shape, matrix_split, batch_split):
    """FSDP x TP shards params and both Adam moments: each device holds 1/8 of every matrix."""
    step = tiny_step(mesh_shape)
    estimate = aot.memory_estimate(step.compile(step.abstract_batch(host_batch())))
    assert estimate.argument_bytes == hand_count_argument_bytes(matrix_split, batch_split)
    # The donated state comes back in place: every state byte is aliased, none of the batch.
    state_bytes = hand_count_argument_bytes(matrix_split, batch_split) - 3 * 4 * ROWS * LENGTH // batch_split
    assert estimate.alias_bytes == state_bytes
    assert estimate.temp_bytes > 0
    assert estimate.required_bytes == estimate.argument_bytes + estimate.output_bytes + estimate.temp_bytes - estimate.alias_bytes


def test_check_memory_names_required_and_available_bytes():
    estimate = aot.MemoryEstimate(argument_bytes=3000, output_bytes=2000, temp_bytes=1500, alias_bytes=1000, code_bytes=7)
    assert estimate.required_bytes == 5500
    aot.check_memory(estimate, 5500)  # exactly fits
    aot.check_memory(estimate, None)  # no budget: no check
    with pytest.raises(aot.MemoryBudgetError, match=r"needs 5,500 bytes per device .* only 5,499 bytes"):
        aot.check_memory(estimate, 5499)


def test_budget_comes_from_config_else_the_device():
    assert aot.memory_budget(0.5) == (1 << 29, "train.memory_budget_gib")
    assert aot.device_memory_limit(jax.devices("cpu")[0]) is None  # CPU reports no limit
    budget, source = aot.memory_budget(None, jax.devices("cpu")[0])
    assert budget is None and "set train.memory_budget_gib" in source

    class FakeAccelerator:
        def memory_stats(self):
            return {"bytes_in_use": 5, "bytes_limit": 80 * (1 << 30)}

    assert aot.memory_budget(None, FakeAccelerator()) == (80 * (1 << 30), "the device's bytes_limit")
    with pytest.raises(ValueError, match="memory_budget_gib must be positive"):
        aot.memory_budget(0.0)


def test_finetune_that_cannot_fit_stops_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    budget_gib = 1e-4  # ~105 KiB per device; the tiny model's step needs more than 1 MiB
    code = cli.main([
        "finetune", "--config", "configs/finetune_tiny.yaml", f"output_dir={out}", "train.steps=2",
        f"train.memory_budget_gib={budget_gib}", "data.eval_file=null", "data.micro_batches=1", "log.progress=false",
    ])
    err = capsys.readouterr().err
    assert code == 2
    match = re.search(r"needs ([\d,]+) bytes per device .* only ([\d,]+) bytes", err)
    assert match, err
    required, available = (int(g.replace(",", "")) for g in match.groups())
    assert available == int(budget_gib * (1 << 30))
    assert required > available
    assert "Traceback" not in err
    # Before training: no checkpoint, no metrics, no exported model.
    assert not (out / "checkpoints").exists()
    assert not (out / "logs").exists()
    assert not (out / "model").exists()
