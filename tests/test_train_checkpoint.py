"""Checkpoints: bitwise resume in a new process, restore onto another mesh, NaN stops cleanly,
unfinished saves are never resumed from."""
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import LlamaConfig

from offside_jax.config import OptimConfig
from offside_jax.models.auto import create_model
from offside_jax.train import losses, mesh as mesh_lib, optim
from offside_jax.train.checkpoint import Checkpointer
from offside_jax.train.loop import IndexedBatches, NonFiniteLossError, start_or_resume, train
from offside_jax.train.step import TrainStep, partition

CFG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=3000.0, max_position_embeddings=32, tie_word_embeddings=True,
)
ROWS, LENGTH = 8, 12


def batch_at(index: int) -> dict:
    """Batch ``index`` of a deterministic stream (a resumed run must see the same ones)."""
    rng = np.random.default_rng(100 + index)
    ids = rng.integers(1, CFG.vocab_size, (ROWS, LENGTH)).astype(np.int32)
    attention = np.ones((ROWS, LENGTH), np.int32)
    loss_mask = np.zeros((ROWS, LENGTH), np.int32)
    loss_mask[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "scale": np.ones(ROWS, np.float32)}


def scaled_nll(model, batch, rng, reference):
    """Answer NLL times the batch's ``scale`` (how the NaN test injects a NaN)."""
    loss_sum, weight, aux = losses.answer_nll(model, batch, rng, reference)
    return loss_sum * batch["scale"][0], weight, aux


def make_step(mesh_shape=(2, 2, 2)) -> TrainStep:
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.01), 6)
    return TrainStep(partition(create_model(CFG, seed=0)), scaled_nll, tx, mesh=mesh, micro_batches=2, schedule=schedule)


def run(directory: str, num_steps: int, every: int = 3, mesh_shape=(2, 2, 2), data_fn=batch_at) -> int:
    """Train to ``num_steps`` (resuming from ``directory`` if it holds a checkpoint)."""
    step = make_step(mesh_shape)
    data = IndexedBatches(data_fn)
    checkpointer = Checkpointer(directory, every=every, keep=2)
    try:
        state, start = start_or_resume(step, checkpointer, seed=0, data=data)
        train(step, state, data, num_steps=num_steps, start_step=start, checkpointer=checkpointer,
              config={"run": "test"}, progress=False)
    finally:
        checkpointer.close()
    return start


def leaves(state):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(state)]


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(str(straight), 6) == 0
    assert run(str(split), 3) == 0
    # The second half runs in a fresh interpreter: nothing but the checkpoint carries over.
    code = (
        "import sys, jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_train_checkpoint as t; "
        f"print('resumed from', t.run({str(split)!r}, 6))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from 3" in proc.stdout

    step = make_step()
    a_ckpt, b_ckpt = Checkpointer(straight), Checkpointer(split)
    try:
        assert a_ckpt.latest_step() == b_ckpt.latest_step() == 6
        a, a_meta, a_config = a_ckpt.restore(step.abstract_state())
        b, b_meta, _ = b_ckpt.restore(step.abstract_state())
        # Step 3 of the straight run was saved asynchronously while step 4 went on with the
        # (donated) state; it must equal step 3 of the split run, which was its last.
        a3, _, _ = a_ckpt.restore(step.abstract_state(), step=3)
        b3, _, _ = b_ckpt.restore(step.abstract_state(), step=3)
    finally:
        a_ckpt.close()
        b_ckpt.close()
    assert a_meta == b_meta == {"step": 6, "data": {"index": 6}}
    assert a_config == {"run": "test"}
    assert int(a.step) == 6
    for (name, x), (_, y) in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=name)
    for (name, x), (_, y) in zip(leaves(a3), leaves(b3), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=name)
    # And training did change the params (bitwise equality is not trivially "nothing happened").
    init = step.init_state(0)
    assert any(np.abs(x - y).max() > 1e-4 for (_, x), (_, y) in zip(leaves(init.params), leaves(a.params)))


def test_checkpoint_from_8x1x1_restores_onto_2x2x2(tmp_path):
    wide = make_step((8, 1, 1))
    state = wide.init_state(0)
    batch = {k: np.concatenate([v, v]) for k, v in batch_at(0).items()}  # 16 rows: 8 per micro-batch
    state, _ = wide(state, wide.shard_batch(batch))
    expected = leaves(state)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state, data_state={"index": 1})
    ckpt.close()

    cube = make_step((2, 2, 2))
    ckpt = Checkpointer(tmp_path / "ckpt")
    restored, meta, _ = ckpt.restore(cube.abstract_state())
    ckpt.close()
    assert meta["data"] == {"index": 1}
    for (name, x), (_, y) in zip(expected, leaves(restored), strict=True):
        np.testing.assert_array_equal(y, x, err_msg=name)
    q = restored.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = restored.opt_state[1][0].mu["model"]["embed_tokens"]["embedding"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # The restored state trains on the new mesh.
    restored, metrics = cube(restored, cube.shard_batch(batch_at(1)))
    assert np.isfinite(float(metrics["loss"]))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    def poisoned(index):
        batch = batch_at(index)
        if index == 4:  # the 5th update
            batch["scale"][:] = np.nan
        return batch

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5.*last checkpoint \(step 4\)"):
        run(str(tmp_path), 8, every=2, data_fn=poisoned)
    step = make_step()
    ckpt = Checkpointer(tmp_path)
    try:
        assert ckpt.latest_step() == 4
        state, meta, _ = ckpt.restore(step.abstract_state())
    finally:
        ckpt.close()
    assert int(state.step) == 4 and meta["data"] == {"index": 4}
    assert all(np.isfinite(x).all() for _, x in leaves(state))


def test_unfinished_save_is_never_resumed(tmp_path):
    run(str(tmp_path), 3, every=3)
    # What an interrupted save leaves behind: orbax's temporary directory for step 9.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    ckpt = Checkpointer(tmp_path)
    try:
        assert ckpt.latest_step() == 3
    finally:
        ckpt.close()
