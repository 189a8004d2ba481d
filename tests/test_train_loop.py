"""The finetune command end to end: a tiny model learns 20 facts; logs, config and export;
config errors name the key."""
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from offside_jax import cli
from offside_jax.config import ConfigError, load_config
from offside_jax.data.bpe import train_bpe_tokenizer
from offside_jax.models import hf
from offside_jax.models.generate import SamplingConfig, chat
from offside_jax.train import sft_data
from offside_jax.train.finetune import run_finetune

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "finetune_tiny.yaml"
FACTS = ROOT / "configs" / "data" / "tiny_facts.jsonl"


def answer_nll_per_record(model, tokenizer, conversations, max_length):
    """Mean answer-token NLL of each record, from the model's logits in float64 numpy."""
    ids, attention, mask = sft_data.encode_all(tokenizer, conversations, max_length)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(attention)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    w = (mask * attention)[:, 1:]
    return -(picked * w).sum(1) / w.sum(1)


def test_finetune_memorises_twenty_facts(tmp_path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "train.steps=150", "log.progress=false", "checkpoint.every=50",
                                   "mesh.fsdp=1"])
    result = run_finetune(cfg)
    conversations = sft_data.read_chat_jsonl(FACTS)
    assert len(conversations) == 20
    model = result.model()
    nll = answer_nll_per_record(model, result.tokenizer, conversations, cfg.data.max_length)
    assert nll.max() < 0.05, nll

    questions = [c[0]["content"] for c in conversations]
    sampling = SamplingConfig(max_new_tokens=24, eos_token_ids=(result.tokenizer.eos_token_id,), pad_token_id=result.tokenizer.pad_token_id)
    answers, _ = chat(model, result.tokenizer, questions, sampling=sampling)
    assert answers == [c[1]["content"] for c in conversations]

    # Metrics as JSON lines and TensorBoard events; config beside the checkpoints; HF export.
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == list(range(1, 151))
    assert {"loss", "grad_norm", "learning_rate", "tokens", "answer_tokens", "tokens_per_second"} <= set(train_lines[0])
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] / 20
    assert any("eval/loss" in x for x in lines)
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert "lr: 0.003" in (tmp_path / "config.yaml").read_text()
    # Saved at 50, 100, 150; keep=2 pruned the oldest.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["100", "150"]
    exported = hf.load_pretrained(tmp_path / "model")
    ids = jnp.asarray([[1, 5, 9, 11]])
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(model(ids)), atol=1e-5)


def test_finetune_cli_with_lora_resumes_and_exports(tmp_path, capsys):
    args = ["finetune", "--config", str(CONFIG), f"output_dir={tmp_path}", "lora.enabled=true",
            "train.steps=4", "train.eval_every=0", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false",
            "data.micro_batches=1", "data.eval_file=null"]
    assert cli.main(args) == 0
    assert cli.main(args[:5] + ["train.steps=6"] + args[6:]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 4" in out and "done: step 6" in out
    # The export is plain HF weights: no adapter tensors.
    from safetensors.numpy import load_file

    names = load_file(str(tmp_path / "model" / "model.safetensors")).keys()
    assert names and not any("lora" in n for n in names)


def test_config_errors_name_the_key(tmp_path, capsys):
    assert cli.main(["finetune", "--config", str(CONFIG), "optim.lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "lr, max_grad_norm" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ndata:\n  train_file: f\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.batchsize'; valid keys at data: batch_size"):
        load_config(bad)
    with pytest.raises(ConfigError, match="could not be converted"):
        load_config(CONFIG, ["optim.lr=fast"])


def test_chat_data_masks_only_answers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                 {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}) + "\n"
    )
    convs = sft_data.read_chat_jsonl(path)
    tok = train_bpe_tokenizer(sft_data.conversation_texts(convs) * 3, 300)
    ids, attention, mask = sft_data.encode_all(tok, convs, 64)
    answer_text = tok.decode(ids[0][mask[0] == 1])
    assert answer_text == "A1<|im_end|>\nA2<|im_end|>\n"
    assert tok.decode(ids[0][(mask[0] == 0) & (attention[0] == 1)]).count("<|im_start|>") == 4
    path.write_text('{"messages": [{"role": "user", "content": "Q"}]}\n')
    with pytest.raises(sft_data.DataError, match=r"d.jsonl:1: no assistant message"):
        sft_data.read_chat_jsonl(path)


class _RecordedValue:
    """A metric whose fetch (``float``) is recorded, standing in for an array on the device."""

    def __init__(self, events: list, step: int, value: float):
        self.events, self.step, self.value = events, step, value

    def __float__(self) -> float:
        self.events.append(("fetch", self.step))
        return self.value


def test_loop_fetches_each_steps_metrics_only_after_dispatching_the_next(tmp_path):
    """No host sync inside the step loop: step N's metrics are read after step N+1 was
    dispatched; a NaN is still reported with its own step number."""
    import itertools

    from offside_jax.train.loop import MetricLogger, NonFiniteLossError, train

    events: list = []

    class Step:
        def shard_batch(self, batch):
            return batch

        def __call__(self, state, batch):
            state += 1
            events.append(("step", state))
            return state, {"loss": _RecordedValue(events, state, float("nan") if state == 4 and batch else 0.5)}

    logger = MetricLogger(tmp_path, tensorboard=False)
    train(Step(), 0, itertools.repeat(False), num_steps=3, logger=logger, progress=False)
    assert events == [("step", 1), ("step", 2), ("fetch", 1), ("step", 3), ("fetch", 2), ("fetch", 3)]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    events.clear()
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        train(Step(), 0, itertools.repeat(True), num_steps=6, progress=False)
    assert events[-2:] == [("step", 5), ("fetch", 4)]
