"""The training session never loses a record: each case of issue 13's "Why" as a test of its
message and exit code, and that nothing already written changed.

Fine-tuning runs a tiny model for a few steps (seconds); the unlearning cases reuse the
fixtures of ``test_unlearn_run``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from offside_jax import cli
from offside_jax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "finetune_tiny.yaml"
QUICK = ["train.steps=4", "train.eval_every=0", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false",
         "data.micro_batches=1", "data.eval_file=null", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"]


def finetune(out: Path, *overrides: str) -> int:
    return cli.main(["finetune", "--config", str(CONFIG), f"output_dir={out}", *QUICK, *overrides])


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_impossible_values_are_refused_at_config_load(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps=-5: must be >= 0"):
        load_config(CONFIG, [f"output_dir={tmp_path}", "train.steps=-5"])
    with pytest.raises(ConfigError, match=r"data.batch_size=0: must be >= 1"):
        load_config(CONFIG, [f"output_dir={tmp_path}", "data.batch_size=0"])
    with pytest.raises(ConfigError, match=r"optim.schedule='cosin' is not one of cosine, linear, constant"):
        load_config(CONFIG, [f"output_dir={tmp_path}", "optim.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"model.source='tiny-vl' is not one of hf, gguf, tiny, tiny_vl"):
        load_config(CONFIG, [f"output_dir={tmp_path}", "model.source=tiny-vl"])
    assert not tmp_path.joinpath("config.yaml").exists()


def test_a_rerun_with_another_config_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(out) == 0
    saved = (out / "config.yaml").read_text()
    weights = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()

    # A changed learning rate: refused, one message, exit 2, nothing written.
    assert finetune(out, "optim.lr=1e-2") == 2
    err = capsys.readouterr().err
    assert "optim.lr (0.003 -> 0.01)" in err and "resume=force" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == saved
    assert (out / "model" / "model.safetensors").read_bytes() == weights

    # A bad release: refused before anything is read (the config differs), nothing written.
    assert finetune(out, "data.release=/nonexistent", "data.train_file=null") == 2
    assert "data.release" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved

    # More steps are a resumption, not another run; resume=force takes a deliberate change.
    assert finetune(out, "train.steps=6", "optim.lr=1e-2", "resume=force") == 0
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    assert (out / "config.previous.yaml").read_text() == saved
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


def test_a_failed_run_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(out, "data.train_file=/nonexistent.jsonl") == 2
    assert not out.exists()
    release = tmp_path / "no-release"
    assert finetune(out, f"data.release={release}", "data.train_file=null") == 2
    assert not out.exists()


def test_mesh_and_batch_user_errors_are_one_message(tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(out, "mesh.data=3", "mesh.fsdp=3") == 2  # 9 devices asked of 8
    err = capsys.readouterr().err
    assert "mesh (data=3, fsdp=3, tensor=1) on 8 device(s)" in err and "Traceback" not in err
    assert finetune(out, "mesh.fsdp=3", "data.batch_size=16") == 2  # 16 rows over 3 devices
    err = capsys.readouterr().err
    assert "data.batch_size / data.micro_batches" in err and "3" in err and "Traceback" not in err
    assert not out.exists()


def test_corrupt_newest_checkpoint_falls_back_and_metrics_do_not_repeat(tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(out) == 0
    newest = out / "checkpoints" / "4"
    for f in (newest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="falling back to step 2"):
        assert finetune(out, "train.steps=6") == 0
    captured = capsys.readouterr()
    assert "resuming from step 2" in captured.out
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 run again, logged once


def test_a_checkpoint_of_another_model_size_is_one_message(tmp_path, capsys):
    shared = tmp_path / "ckpt"
    assert finetune(tmp_path / "a", f"checkpoint.directory={shared}") == 0
    capsys.readouterr()
    code = finetune(tmp_path / "b", f"checkpoint.directory={shared}", "model.tiny.hidden_size=64")
    err = capsys.readouterr().err
    assert code == 2
    assert "is of another model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "model").exists()


# -- unlearning ------------------------------------------------------------------------------------

from test_unlearn_run import QUIET, release, text_model  # noqa: E402,F401  (module fixtures)


def unlearn_args(out, model, rel, *overrides):
    return ["unlearn", "--config", str(ROOT / "configs" / "unlearn_tiny.yaml"), f"output_dir={out}",
            f"model.path={model}", f"data.release={rel}", *QUIET, *overrides]


def test_over_budget_unlearn_stops_naming_bytes_and_writes_nothing(tmp_path, release, text_model, capsys):  # noqa: F811
    out = tmp_path / "run"
    code = cli.main(unlearn_args(out, text_model, release, "method=npo", "lora.enabled=true", "eval.enabled=false",
                                 "train.memory_budget_gib=1e-5", "train.steps=2"))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"needs [\d,]+ bytes per device .* only [\d,]+ bytes", err), err
    assert not out.exists()


@pytest.mark.slow
def test_unlearn_killed_mid_run_resumes_bitwise_equal(tmp_path, release, text_model):  # noqa: F811
    from safetensors.numpy import load_file

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["method=npo", "lora.enabled=true", "eval.enabled=false", "train.steps=8", "checkpoint.every=1",
              "checkpoint.keep=3", "checkpoint.async_save=false", "optim.lr=1e-2", "mesh.fsdp=-1"]

    def command(out):
        return [sys.executable, "-m", "offside_jax.cli", *unlearn_args(out, text_model, release, *common)]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(command(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (killed / "checkpoints" / "3").is_dir():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it was killed"
    done = subprocess.run(command(killed), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step" in done.stdout
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(killed / "model" / "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps = [json.loads(x)["step"] for x in (killed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    shutil.rmtree(tmp_path)
