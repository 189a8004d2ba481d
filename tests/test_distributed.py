"""Multi-process training: 2 processes x 4 CPU devices (gloo) against 1 process x 8 devices.

Every run is the real ``offside-jax finetune`` command in fresh subprocesses (each sets its
own device count; the pytest process keeps its 8 fake devices). The mesh (data 2, fsdp 2,
tensor 2) spans both processes on every axis, so batches, FSDP gathers and tensor-parallel
reductions all cross the process boundary.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file

import test_unlearn_run
from offside_jax.train import distributed, mesh as mesh_lib

# The small release and text model of the unlearning tests (module-scoped fixtures).
release, text_model = test_unlearn_run.release, test_unlearn_run.text_model

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO / "configs" / "data" / "tiny_facts.jsonl"
RUN_TIMEOUT_S = 240

CONFIG = """\
seed: 0
model:
  source: tiny
  tiny: {{vocab_size: 320, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
          num_attention_heads: 4, num_key_value_heads: 2}}
mesh: {{data: 2, fsdp: 2, tensor: 2}}
optim: {{lr: 3.0e-3, warmup_steps: 0, schedule: constant}}
data: {{train_file: "{facts}", max_length: 48, batch_size: 8, micro_batches: 2}}
train: {{steps: 3}}
checkpoint: {{every: 3, keep: 3}}
log: {{tensorboard: false, progress: false}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config: Path, output_dir: Path, processes: int, *overrides: str) -> list[subprocess.Popen]:
    """Start finetune in ``processes`` processes of 8 / processes CPU devices each."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    command = [sys.executable, "-m", "offside_jax.cli", "finetune", "--config", str(config), f"output_dir={output_dir}", *overrides]
    if processes > 1:
        command += [f"distributed.coordinator_address=127.0.0.1:{free_port()}", f"distributed.num_processes={processes}",
                    "distributed.timeout_s=120"]
    return [
        subprocess.Popen(
            command + ([f"distributed.process_id={i}"] if processes > 1 else []),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(processes)
    ]


def finish(*runs: list[subprocess.Popen]) -> list[list[str]]:
    """Wait for runs started by :func:`start` (bounded); their processes' logs."""
    procs = [p for run in runs for p in run]
    try:
        outputs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"finetune runs did not finish in {RUN_TIMEOUT_S} s")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{' '.join(p.args[-3:])} failed:\n{out[-4000:]}"
    logs, i = [], 0
    for run in runs:
        logs.append(outputs[i : i + len(run)])
        i += len(run)
    return logs


def logged_steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def logged_losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def exported(output_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(output_dir / "model" / "model.safetensors"))


def assert_same_params(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(facts=FACTS))
    one, two = tmp_path / "one", tmp_path / "two"

    _, two_logs = finish(start(config, one, 1), start(config, two, 2))  # concurrently

    # The same 3 steps: the same losses on the way and the same params at the end.
    assert_same_params(exported(one), exported(two))
    assert logged_steps(one) == logged_steps(two) == [1, 2, 3]  # process 0 alone wrote metrics
    np.testing.assert_allclose(logged_losses(one), logged_losses(two), rtol=1e-6)
    assert logged_losses(one)[-1] < logged_losses(one)[0]
    assert sum("done: step 3" in log for log in two_logs) == 1

    # Cross over: the 2-process checkpoint resumes in 1 process, and vice versa, for 2 more steps.
    one_from_two, two_from_one = tmp_path / "one_from_two", tmp_path / "two_from_one"
    shutil.copytree(two, one_from_two)
    shutil.copytree(one, two_from_one)
    for d in (one_from_two, two_from_one):
        shutil.rmtree(d / "model")
        (d / "logs" / "metrics.jsonl").unlink()
    finish(start(config, one_from_two, 1, "train.steps=5"), start(config, two_from_one, 2, "train.steps=5"))
    assert logged_steps(one_from_two) == logged_steps(two_from_one) == [4, 5]  # resumed at step 3
    resumed = exported(one_from_two)
    assert_same_params(resumed, exported(two_from_one))
    moved = max(float(np.abs(resumed[k] - exported(one)[k]).max()) for k in resumed)
    assert moved > 1e-4, "steps 4 and 5 changed nothing: the runs did not train after resuming"


def test_process_rows_cover_each_micro_batch_in_order():
    """One process: every row, in order, whatever the micro-batching (the reshape in
    ``shard_batch`` then puts rows m*B/M ... (m+1)*B/M - 1 in micro-batch m)."""
    mesh = mesh_lib.make_mesh((2, 2, 2))
    sharding = mesh_lib.batch_sharding(mesh)
    np.testing.assert_array_equal(distributed.process_rows(sharding, 16, 2), np.arange(16))
    with pytest.raises(ValueError, match="rows per micro-batch do not split"):
        distributed.process_rows(sharding, 12, 2)  # 6 rows over 4 batch devices


def test_process_rows_of_a_process_holding_the_second_half():
    """Devices that hold the second half of every micro-batch's rows supply rows 4..7 of
    micro-batch 0 and 12..15 of micro-batch 1 (rows of a batch of 16 in 2 micro-batches)."""

    class SecondHalf:  # the addressable-shard map a process holding rows 4..7 would see
        def addressable_devices_indices_map(self, shape):
            half = shape[1] // 2
            return {0: (slice(None), slice(half, half + half // 2)), 1: (slice(None), slice(half + half // 2, shape[1]))}

    np.testing.assert_array_equal(distributed.process_rows(SecondHalf(), 16, 2), [4, 5, 6, 7, 12, 13, 14, 15])


def test_auto_mode_needs_a_sign_of_a_multi_process_launch(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)

    class Cfg:
        mode, coordinator_address = "auto", None

    assert distributed.multi_process_signs(Cfg()) == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.multi_process_signs(Cfg()) == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.multi_process_signs(Cfg()) == ["SLURM step with 4 tasks"]
    # Nothing to join: one process, as before (the test process must stay un-initialized).
    monkeypatch.delenv("SLURM_NTASKS")
    info = distributed.initialize(Cfg())
    assert (info.index, info.count, info.initialized) == (0, 1, False)
    assert info.global_devices == len(jax.devices())
    Cfg.mode = "sometimes"
    with pytest.raises(distributed.DistributedError, match="distributed.mode 'sometimes'"):
        distributed.initialize(Cfg())


def test_to_host_returns_complete_numpy_arrays():
    mesh = mesh_lib.make_mesh((1, 8, 1))
    x = jax.device_put(np.arange(32.0).reshape(8, 4), NamedSharding(mesh, PartitionSpec("fsdp")))
    host = distributed.to_host({"x": x})
    assert isinstance(host["x"], np.ndarray)
    np.testing.assert_array_equal(host["x"], np.arange(32.0).reshape(8, 4))


def test_a_process_that_cannot_join_is_named():
    class Cfg:
        mode, coordinator_address, num_processes, process_id = "on", "127.0.0.1:1", 2, 5
        cpu_collectives, timeout_s = "", 5

    with pytest.raises(distributed.DistributedError, match=r"process 5 of 2 could not join the run at 127.0.0.1:1"):
        distributed.initialize(Cfg())
    assert not jax.distributed.is_initialized()


# -- unlearning and its evaluation on several processes (issue 13) ---------------------------------

# Rows of every sub-batch over fsdp (2: one per process), tensor parallel within each process.
UNLEARN = ["log.tensorboard=false", "log.progress=false", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4",
           "data.setting=unimodal", "data.forget_batch_size=2", "train.steps=3", "optim.lr=1e-2",
           "eval.batch_size=2", "eval.max_records=4", "eval.sets=[forget,retain]", "checkpoint.every=0"]


def start_unlearn(output_dir: Path, processes: int, model: Path, release: Path, *overrides: str) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    command = [sys.executable, "-m", "offside_jax.cli", "unlearn", "--config", str(REPO / "configs" / "unlearn_tiny.yaml"),
               f"output_dir={output_dir}", f"model.path={model}", f"data.release={release}", *UNLEARN, *overrides]
    if processes > 1:
        command += [f"distributed.coordinator_address=127.0.0.1:{free_port()}", f"distributed.num_processes={processes}",
                    "distributed.timeout_s=120"]
    return [subprocess.Popen(command + ([f"distributed.process_id={i}"] if processes > 1 else []), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]


def assert_same_unlearning(one: Path, two: Path) -> None:
    assert_same_params(exported(one), exported(two))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for name in a["answer_probability"]:
        np.testing.assert_allclose(b["per_record"][name]["after"], a["per_record"][name]["after"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b["per_record"][name]["before"], a["per_record"][name]["before"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_unlearn_npo_lora_two_processes_like_one(tmp_path, release, text_model):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(start_unlearn(one, 1, text_model, release, "method=npo", "lora.enabled=true"),
           start_unlearn(two, 2, text_model, release, "method=npo", "lora.enabled=true"))
    assert_same_unlearning(one, two)
    assert logged_steps(one) == logged_steps(two) == [1, 2, 3]
    np.testing.assert_allclose(logged_losses(one), logged_losses(two), rtol=1e-5)


@pytest.mark.slow
def test_unlearn_ssd_two_processes_like_one(tmp_path, release, text_model):
    one, two = tmp_path / "one", tmp_path / "two"
    ssd = ["method=ssd", "lora.enabled=false", "methods.ssd.batch_size=2", "methods.ssd.alpha=1.0"]
    finish(start_unlearn(one, 1, text_model, release, *ssd), start_unlearn(two, 2, text_model, release, *ssd))
    assert_same_unlearning(one, two)
    a, b = (json.loads((d / "summary.json").read_text())["report"]["dampening"] for d in (one, two))
    assert a["selected"] == b["selected"] > 0


# The suite's mesh crosses the processes on fsdp (rows of every batch: one per process) and
# keeps tensor parallelism within each; a few records of two test sets, both formats.
EVALUATE = ["suite.modalities=[text]", "suite.mesh=[1,2,4]", "suite.batch_size=2", "suite.max_examples=2",
            "suite.test_sets=[forget,retain]"]


def start_evaluate(output_dir: Path, processes: int, model: Path, release: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    command = [sys.executable, "-m", "offside_jax.cli", "evaluate", "--config", os.devnull, f"output_dir={output_dir}",
               f"model.path={model}", f"release={release}", *EVALUATE]
    if processes > 1:
        command += [f"distributed.coordinator_address=127.0.0.1:{free_port()}", f"distributed.num_processes={processes}",
                    "distributed.timeout_s=120"]
    return [subprocess.Popen(command + ([f"distributed.process_id={i}"] if processes > 1 else []), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]


def examples(output_dir: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((output_dir / "examples").glob("*.jsonl"))}


@pytest.mark.slow
def test_evaluate_two_processes_like_one(tmp_path, release, text_model):
    """Generation, multiple choice and likelihoods of the evaluation suite: each process
    generates its rows and scores its share, process 0 writes what one process would."""
    one, two = tmp_path / "one", tmp_path / "two"
    _, two_logs = finish(start_evaluate(one, 1, text_model, release), start_evaluate(two, 2, text_model, release))
    assert sum("done: outputs in" in log for log in two_logs) == 1  # process 0 alone reports
    a, b = (json.loads((d / "results.json").read_text())["summary"] for d in (one, two))
    assert sorted(a) == sorted(b) and "forget/text/gen.answer_prob" in a and "retain/text/mcq.accuracy" in a
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    rows_one, rows_two = examples(one), examples(two)
    assert sorted(rows_one) == sorted(rows_two) == ["forget_text_gen.jsonl", "forget_text_mcq.jsonl",
                                                    "retain_text_gen.jsonl", "retain_text_mcq.jsonl"]
    for task, rows in rows_one.items():
        # Every record once, in the same order, with the same greedy output and likelihood.
        assert [r["uid"] for r in rows_two[task]] == [r["uid"] for r in rows] and len(rows) == 2
        assert [r["output"] for r in rows_two[task]] == [r["output"] for r in rows]
        if task.endswith("gen.jsonl"):
            np.testing.assert_allclose([r["answer_nll"] for r in rows_two[task]], [r["answer_nll"] for r in rows],
                                       rtol=1e-5)



# The whole benchmark, as small as it goes: a one-player release, a tiny vision-language model
# trained for two steps, one unlearning method for one step, two evaluated test sets.
BENCHMARK = ["data.players=1", "model.tiny.vocab_size=512",
             "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1",
             "model.tiny.vision_depth=1", "model.tiny.vision_hidden_size=32", "model.tiny.vision_intermediate_size=64",
             "vanilla.retain_first_steps=0", "vanilla.tune.steps=2", "vanilla.tune.batch_size=8",
             "vanilla.retain_only=false", "methods=[ga]", "unlearn.steps=1", "attack_methods=[]",
             "correction_methods=[]", "attack_vanilla=false", "suite.max_examples=2", "suite.batch_size=8",
             "suite.test_sets=[forget,retain]", "progress=false", "compile_cache=''"]


def start_benchmark(output_dir: Path, processes: int) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    command = [sys.executable, "-m", "offside_jax.cli", "benchmark", "--config", str(REPO / "configs" / "demo.yaml"),
               f"output_dir={output_dir}", *BENCHMARK]
    if processes > 1:
        command += [f"distributed.coordinator_address=127.0.0.1:{free_port()}", f"distributed.num_processes={processes}",
                    "distributed.timeout_s=120"]
    return [subprocess.Popen(command + ([f"distributed.process_id={i}"] if processes > 1 else []), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]


@pytest.mark.slow
def test_benchmark_two_processes_like_one(tmp_path):
    """Reference model, unlearning and evaluation: 2 processes give one process's numbers;
    process 0 alone writes the release, the model, the outputs and the report."""
    one, two = tmp_path / "one", tmp_path / "two"
    _, two_logs = finish(start_benchmark(one, 1), start_benchmark(two, 2))
    assert sum("done in" in log for log in two_logs) == 1
    a, b = (json.loads((d / "results.json").read_text())["methods"] for d in (one, two))
    assert sorted(a) == sorted(b) == ["ga", "vanilla"]
    for name in a:
        assert sorted(a[name]["summary"]) == sorted(b[name]["summary"]) and a[name]["summary"]
        for key, value in a[name]["summary"].items():
            np.testing.assert_allclose(b[name]["summary"][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    assert (two / "report.md").is_file()
    (saved,) = (two / "models").iterdir()  # the vanilla model, gathered and written once
    assert saved.name.startswith("vanilla-") and (saved / "model.safetensors").is_file()


def test_objects_travel_between_processes_as_json_with_nan_and_numpy_scalars():
    """What gather_objects sends: plain JSON (no pickle), numpy scalars as Python numbers, NaN kept."""
    import json

    from offside_jax.train.distributed import _numpy_to_python

    rows = [{"bleu": np.float32(0.25), "n": np.int64(3), "nll": float("nan"), "text": "Réal"}]
    back = json.loads(json.dumps(rows, default=_numpy_to_python))
    assert back[0]["bleu"] == 0.25 and back[0]["n"] == 3 and back[0]["text"] == "Réal" and np.isnan(back[0]["nll"])
    with pytest.raises(TypeError, match="object"):
        json.dumps({"x": object()}, default=_numpy_to_python)
