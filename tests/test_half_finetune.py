"""Half Fine-Tuning: the mask rule, frozen weights bitwise unchanged under AdamW with weight
decay (full and LoRA), and a run resumed from a checkpoint equal to an uninterrupted one."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from transformers import LlamaConfig

from offside_jax.config import ConfigError, HalfFinetuneConfig, OptimConfig
from offside_jax.models import lora
from offside_jax.models.auto import create_model
from offside_jax.models.hf import path_to_str
from offside_jax.train import losses
from offside_jax.train.half_finetune import HalfFinetuneState, Plan, classify, half_finetune, hft_mask
from offside_jax.train.checkpoint import Checkpointer
from offside_jax.train.loop import IndexedBatches, start_or_resume
from offside_jax.train.session import Session
from offside_jax.train.step import partition

VOCAB = 64


def tiny(layers: int = 2):
    return create_model(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=3000.0, max_position_embeddings=32, tie_word_embeddings=False), seed=0)


def named(tree) -> dict:
    return {path_to_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def copied(tree) -> dict:
    return {k: np.array(v, copy=True) for k, v in named(tree).items()}


def batch_at(index: int) -> dict:
    rng = np.random.default_rng(50 + index)
    ids = rng.integers(1, VOCAB, (4, 12)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, 3:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def block_counts(mask: dict, layer: int) -> dict[str, int]:
    counts = {"attention": 0, "mlp": 0, "norm": 0}
    for name, trains in mask.items():
        found = classify(name)
        if found and found[0] == layer:
            counts[found[1]] += int(trains)
    return counts


def test_mask_rule_per_block_alternating_mlp_and_seeded_redraws():
    params = partition(tiny(layers=4)).trainable
    masks = {(seed, r): named(hft_mask(params, seed, r)) for seed in (0, 1) for r in range(4)}
    for (seed, r), mask in masks.items():
        for name in ("lm_head.kernel", "model.embed_tokens.embedding", "model.norm.weight"):
            assert mask[name] is True, (seed, r, name)
        mlp = []
        for layer in range(4):
            counts = block_counts(mask, layer)
            assert counts["attention"] == 2 and counts["norm"] == 1, (seed, r, layer, counts)
            mlp.append(counts["mlp"])
        assert mlp == ([2, 1, 2, 1] if r % 2 == 0 else [1, 2, 1, 2]), (seed, r)  # 2/1 alternating across layers
    # Same seed and round: the same mask; new rounds and other seeds: other draws.
    assert masks[(0, 3)] == named(hft_mask(params, 0, 3))
    assert len({tuple(m.values()) for (seed, _), m in masks.items() if seed == 0}) >= 3
    assert any(masks[(0, r)] != masks[(1, r)] for r in range(4))


def test_classify_groups_biases_adapters_and_leaves_the_rest_trainable():
    assert classify("model.layers.3.self_attn.q_proj.bias") == (3, "attention", "self_attn.q_proj")
    assert classify("model.layers.3.self_attn.q_proj.lora_b") == (3, "attention", "self_attn.q_proj")
    assert classify("model.layers.0.mlp.down_proj.kernel") == (0, "mlp", "mlp.down_proj")
    assert classify("model.layers.1.self_attn.k_norm.weight") == (1, "norm", "self_attn.k_norm")  # Qwen3
    for outside in ("visual.blocks.0.attn.qkv.kernel", "model.norm.weight", "lm_head.kernel",
                    "model.embed_tokens.embedding"):
        assert classify(outside) is None
    # Qwen3's four norms per block: two train.
    plan = Plan.from_paths([f"model.layers.0.{n}.weight" for n in
                            ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")])
    assert int(np.sum(plan.draw(0, 0)[(0, "norm")])) == 2


OPTIM = OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.1)


def _hft(rounds=2, seed=3):
    return HalfFinetuneConfig(enabled=True, rounds=rounds, seed=seed)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Full fine-tuning with HFT (rounds of 2 updates), AdamW with weight decay: the params at
    steps 0, 2, 4 and 5, Adam's first moments at steps 2 and 4, and a checkpoint of step 3
    (inside round 1) in ``directory``."""
    session = Session((1, 1, 1))
    step_fn = session.step(tiny(), losses.answer_nll, OPTIM, 5, half_finetune=_hft())
    state = step_fn.init_state(0)
    params, mu = {0: copied(state.params)}, {}
    directory = tmp_path_factory.mktemp("hft") / "checkpoints"
    for start, end in ((0, 2), (2, 3), (3, 4), (4, 5)):
        state = session.fit(step_fn, batch_at, steps=end, seed=0, state=state, start_step=start, progress=False)
        params[end], mu[end] = copied(state.params), copied(state.opt_state.inner[1][0].mu)
        if end == 3:
            checkpointer = Checkpointer(directory, async_save=False)
            checkpointer.save(3, state, data_state=IndexedBatches(batch_at, 3).get_state())
            checkpointer.close()
    assert isinstance(state.opt_state, HalfFinetuneState) and int(state.opt_state.count) == 5
    return session, step_fn, params, mu, directory


def test_frozen_weights_stay_bitwise_equal_under_adamw_with_weight_decay(full_run):
    _, step_fn, params, mu, _ = full_run
    trainable = step_fn.parts.trainable
    first = named(hft_mask(trainable, 3, 0))
    for r in (0, 1):  # updates 0-1 are round 0, updates 2-3 round 1
        mask = named(hft_mask(trainable, 3, r))
        start, end = params[2 * r], params[2 * r + 2]
        for name, trains in mask.items():
            if trains:
                assert not np.array_equal(start[name], end[name]), (r, name)
            else:  # weight decay and (in round 1) momentum from round 0 would move it
                np.testing.assert_array_equal(end[name], start[name], err_msg=f"round {r}: {name}")
                if r == 1:  # its Adam moments are kept as they were
                    np.testing.assert_array_equal(mu[4][name], mu[2][name], err_msg=name)
    # Some matrices frozen in round 1 trained in round 0, and carried momentum into round 1.
    carried = [n for n, t in mask.items() if not t and first[n]]
    assert carried and all(np.abs(mu[2][n]).max() > 0 for n in carried)


def test_lora_adapters_of_frozen_matrices_stay_bitwise_equal():
    model = tiny()
    lora.apply(model, lora.LoRASpec(r"(q|k|v|o|gate|up|down)_proj", 4, 8.0))
    session = Session((1, 1, 1))
    step_fn = session.step(model, losses.answer_nll, OPTIM, 3, half_finetune=_hft(rounds=3))
    state = step_fn.init_state(0)
    before = copied(state.params)
    after = copied(session.fit(step_fn, batch_at, steps=3, seed=0, state=state, progress=False).params)
    mask = named(hft_mask(step_fn.parts.trainable, 3, 0, model_params=step_fn.parts.frozen))
    full = named(hft_mask(partition(tiny()).trainable, 3, 0))
    for name, trains in mask.items():
        assert trains == full[name.rsplit(".", 1)[0] + ".kernel"], name  # the draw of the adapted matrix
        if trains:
            assert not np.array_equal(after[name], before[name]), name
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_a_step_without_any_block_parameter_is_refused():
    tx = OptimConfig()
    from offside_jax.train.optim import make_optimizer

    with pytest.raises(ConfigError, match="half_finetune"):
        half_finetune(make_optimizer(tx, 2)[0], {"lm_head": {"kernel": np.zeros((2, 2))}}, _hft())


def test_a_resumed_run_equals_an_uninterrupted_one(full_run):
    """Restored from the checkpoint of step 3 (inside round 1), the run re-draws round 1's mask
    from the optimizer state and ends bitwise where the uninterrupted run did."""
    session, step_fn, params, _, directory = full_run
    checkpointer = Checkpointer(directory)
    try:
        state, start = start_or_resume(step_fn, checkpointer, seed=0, data=IndexedBatches(batch_at))
    finally:
        checkpointer.close()
    assert start == 3 and int(state.opt_state.count) == 3
    resumed = copied(session.fit(step_fn, batch_at, steps=5, seed=0, state=state, start_step=3, progress=False).params)
    assert resumed.keys() == params[5].keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], params[5][name], err_msg=name)


def test_config_keys_of_finetune_and_corrective_relearning():
    from offside_jax.benchmark import BenchmarkConfig
    from offside_jax.config import FinetuneConfig, load_config

    cfg = load_config(None, ["output_dir=x", "train.half_finetune.enabled=true", "train.half_finetune.rounds=7"])
    assert isinstance(cfg, FinetuneConfig) and cfg.train.half_finetune == HalfFinetuneConfig(enabled=True, rounds=7)
    bench = load_config(None, ["correction.tune.half_finetune.enabled=true"], BenchmarkConfig)
    assert bench.correction.tune.half_finetune.enabled
    with pytest.raises(ConfigError, match="moments"):
        load_config(None, ["output_dir=x", "train.half_finetune.moments=reset"])
    with pytest.raises(ConfigError, match="rounds"):
        load_config(None, ["output_dir=x", "train.half_finetune.rounds=0"])
