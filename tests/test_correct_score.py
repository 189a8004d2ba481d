"""SCoRe end to end on carry arithmetic with a tiny model (the shipped
``configs/score_arithmetic.yaml``): after Stage II, self-correction must be better than the
warm-up's, and the same pipeline with the update switched off must not be.

The warm-up prior is known (``task.p_bug``, ``task.p_fix`` in the config): first attempts drop
a carry on most problems that have one, and the second attempt fixes a wrong first attempt
only 30% of the time in the warm-up traces, else repeats it, so greedy decoding mostly repeats
the mistake. The RL stages have to turn that weak habit into reliable correction.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "score_arithmetic.yaml"
SEEDS = (0, 1, 2)
# "Delta_c->i does not grow" is checked up to 0.02 (5 of 256 problems per seed). The warm-up
# repeats a right first attempt almost always (Delta_c->i ~ 0.001), so any policy that revises
# pays a little here: with this config the 3-seed mean grows by ~0.008 (a revision heuristic
# learned while first attempts were mostly buggy, applied to a right one), which a tolerance
# of one problem in 100 would make a coin flip.
C_TO_I_TOLERANCE = 0.02


def improves(warm: list[dict], after: list[dict]) -> dict[str, bool]:
    """The issue's criterion on means over seeds: Acc@t2 and Delta each up by >= 0.05 (absolute),
    Delta_c->i not up."""
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {
        "acc_t2": mean(after, "acc_t2") - mean(warm, "acc_t2") >= 0.05,
        "delta": mean(after, "delta") - mean(warm, "delta") >= 0.05,
        "delta_c_to_i": mean(after, "delta_c_to_i") <= mean(warm, "delta_c_to_i") + C_TO_I_TOLERANCE,
    }


def test_criterion_on_constructed_rows():
    warm = [{"acc_t2": 0.40, "delta": 0.02, "delta_c_to_i": 0.00}] * 2
    # Means: Acc@t2 0.46 (+0.06), Delta 0.08 (+0.06), c->i 0.005 (+0.005, within the tolerance).
    good = [{"acc_t2": 0.47, "delta": 0.09, "delta_c_to_i": 0.00}, {"acc_t2": 0.45, "delta": 0.07, "delta_c_to_i": 0.01}]
    assert improves(warm, good) == {"acc_t2": True, "delta": True, "delta_c_to_i": True}
    # Means 0.44 / 0.06 (+0.04 each), and c->i up by 0.025: all three fail.
    short = [{"acc_t2": 0.44, "delta": 0.06, "delta_c_to_i": 0.025}] * 2
    assert improves(warm, short) == {"acc_t2": False, "delta": False, "delta_c_to_i": False}


@pytest.mark.slow
def test_score_stage_two_beats_the_warmup_and_an_lr0_control_does_not(tmp_path):
    # The command users run, in its own process (one CPU device) with a persistent compilation
    # cache: the seeds and the control compile the same programs, so later ones skip XLA.
    out = tmp_path / "score"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)}
    command = [sys.executable, "-m", "offside_jax.cli", "correct", "--config", str(CONFIG), f"output_dir={out}",
               f"seeds=[{','.join(map(str, SEEDS))}]", "lr0_control=true", "progress=false"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    warm = [results["runs"][str(s)]["metrics"]["warmup"] for s in SEEDS]
    after = [results["runs"][str(s)]["metrics"]["stage2"] for s in SEEDS]
    table = "\n".join(f"seed {s}: warm-up {w} -> stage II {a}" for s, w, a in zip(SEEDS, warm, after))
    assert all(improves(warm, after).values()), f"{improves(warm, after)}\n{table}"
    # The control: seed 0's warm-up (the same model: warm-up metrics agree), both stages with
    # the learning rate at 0. Nothing moves, so the improvement checks fail (c->i trivially holds).
    control = results["control"]
    assert control["seed"] == SEEDS[0] and control["metrics"]["warmup"] == warm[0]
    still_ok = improves(warm[:1], [control["metrics"]["stage2"]])
    assert not still_ok["acc_t2"] and not still_ok["delta"], f"the lr=0 control passes: {control['metrics']}"
    assert "lr = 0" in (out / "report.md").read_text() and (out / "plots" / "accuracy.png").is_file()
