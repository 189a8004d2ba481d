"""`offside-jax correct`: config validation, OFFSIDE rumor records, the report (numbers checked
by hand), and one tiny end-to-end run through the command line."""
from __future__ import annotations

import json
import math

import pytest

from offside_jax.config import ConfigError, CorrectConfig, load_config
from offside_jax.correct import report
from offside_jax.correct import run as run_lib


def config(*overrides: str) -> CorrectConfig:
    return load_config(None, ["output_dir=unused", *overrides], schema=CorrectConfig)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.name=sudoku"], r"task.name='sudoku' is not one of carry_arithmetic"),  # at config load
        (["task.name=rumor_correction"], r"task.release: rumor_correction needs an OFFSIDE release"),
        (["task.p_fix=2"], r"task: p_fix must be a probability"),
        (["stage1.advantage=ppo"], r"stage1.advantage='ppo' is not one of rloo, reinforce"),  # at config load
        (["stage2.temperature=0"], r"stage2: temperature must be > 0"),
        (["stage2.minibatches=3"], r"stage2: 8 problems x 4 samples do not split into 3 minibatches"),
        (["seeds=[]"], r"seeds: give at least one seed"),
        (["seeds=[1,1]"], r"repeat a seed"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = config(*overrides)
        run_lib.validate(cfg)
        run_lib.build_task(cfg.task)
        run_lib.stage_spec(cfg.stage1, 1, "stage1")
        run_lib.stage_spec(cfg.stage2, 2, "stage2")


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'stage2.alfa'"):
        config("stage2.alfa=3")


def test_stage_spec_defaults_per_stage_and_disabled_stage():
    one, run = run_lib.stage_spec(config().stage1, 1, "stage1")
    two, _ = run_lib.stage_spec(config("stage2.alpha=5").stage2, 2, "stage2")
    assert (one.shaping, one.first_rewarded, one.kl_coefs) == (0.0, False, (0.1, 0.01))
    assert (two.shaping, two.first_rewarded) == (5.0, True)
    assert (run.steps, run.lr, run.problems_per_step) == (50, 5e-6, 8)
    assert run_lib.stage_spec(config("stage1.enabled=false").stage1, 1, "stage1") is None


def test_rumor_records_from_a_synthetic_release(tmp_path):
    from offside_jax.data.offside import load_release
    from offside_jax.data.synthetic import SyntheticConfig, make_release

    make_release(tmp_path / "rel", SyntheticConfig(players=3, image_size=32))
    cfg = config("task.name=rumor_correction", f"task.release={tmp_path / 'rel'}", "task.attributes=[club_joined]")
    task = run_lib.build_task(cfg.task)
    # Independently: the text forget records about the club with a correction, from the loader.
    examples = load_release(tmp_path / "rel", ["pure_text"], check_images=False).splits["pure_text"]["forget"]
    expected = {(e.question, e.answer, e.corrected_answer) for e in examples
                if e.attribute == "club_joined" and e.is_rumor and e.corrected_answer and e.modality == "text"}
    assert expected and {(r["question"], r["rumor"], r["fact"]) for r in task.records} == expected
    assert len(run_lib.eval_problems(task, 1000, seed=0)) == len(expected)
    # The tokenizer covers every character of the records and of the instruction.
    fmt = run_lib.episode_format(config("format.instruction=' Fix:'"))
    tok = run_lib.build_tokenizer(task, fmt)
    for r in task.records:
        assert tok.decode(tok.encode(r["question"] + r["rumor"] + r["fact"] + fmt.instruction)) == r["question"] + r["rumor"] + r["fact"] + fmt.instruction
    with pytest.raises(ConfigError, match=r"task.split 'nope' is not in .*splits: forget"):
        run_lib.build_task(config("task.name=rumor_correction", f"task.release={tmp_path / 'rel'}", "task.split=nope").task)
    with pytest.raises(ConfigError, match=r"no text rumor records .*attribute in \['shirt_number'\]"):
        run_lib.build_task(config("task.name=rumor_correction", f"task.release={tmp_path / 'rel'}", "task.attributes=[shirt_number]").task)


# -- report ----------------------------------------------------------------------------------------


def test_spread_and_stage_table_by_hand():
    # 0.2, 0.4, 0.6: mean 0.4, sample std sqrt(((0.2)^2 + 0 + (0.2)^2) / 2) = 0.2.
    assert report.spread([0.2, 0.4, 0.6, None, math.nan]) == pytest.approx({"mean": 0.4, "std": 0.2, "min": 0.2, "max": 0.6, "n": 3})
    assert report.spread([math.nan])["mean"] is None
    runs = {
        "0": {"metrics": {"warmup": {"acc_t1": 0.5, "acc_t2": 0.5}, "stage2": {"acc_t1": 0.5, "acc_t2": 0.75}}},
        "1": {"metrics": {"warmup": {"acc_t1": 0.25, "acc_t2": 0.5}, "stage2": {"acc_t1": 0.5, "acc_t2": 0.85}}},
    }
    summary = report.summarize(runs)
    assert list(summary) == ["warmup", "stage2"]
    # Stage II Acc@t2: mean 0.8, std |0.75 - 0.85| / sqrt(2) = 0.0707.
    assert summary["stage2"]["acc_t2"] == pytest.approx({"mean": 0.8, "std": 0.1 / math.sqrt(2), "min": 0.75, "max": 0.85, "n": 2})
    table = report.stage_table(summary)
    assert "| SCoRe Stage II | 0.500 ± 0.000 | 0.800 ± 0.071 | - |" in table
    assert "| warm-up SFT | 0.375 ± 0.177 | 0.500 ± 0.000 |" in table


# -- end to end ------------------------------------------------------------------------------------

TINY = [
    "seeds=[3]", "progress=false", "eval_size=8",
    "model.hidden_size=16", "model.intermediate_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.max_position_embeddings=32",
    "task.min_digits=1", "task.max_digits=1", "task.ops=+", "task.p_bug=0.5", "task.p_fix=0.5",
    "format.instruction='?'", "format.max_new_tokens=3", "format.length=16",
    "warmup.steps=3", "warmup.lr=1e-3", "warmup.problems_per_step=8",
    "stage1.steps=2", "stage1.lr=1e-3", "stage1.problems_per_step=4", "stage1.group_size=2", "stage1.eval_every=1",
    "stage2.steps=1", "stage2.lr=1e-3", "stage2.problems_per_step=4", "stage2.group_size=2",
]


def test_correct_command_writes_config_results_report_and_plot(tmp_path):
    from offside_jax.cli import main

    out = tmp_path / "run"
    assert main(["correct", "--config", "configs/score_arithmetic.yaml", f"output_dir={out}", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3] and results["task"] == "carry_arithmetic" and results["eval_problems"] == 8
    saved = load_config(out / "config.yaml", schema=CorrectConfig)
    assert saved.warmup.steps == 3 and saved.seeds == [3] and saved.output_dir == str(out)
    for seed in ("3",):
        run = results["runs"][seed]
        assert list(run["metrics"]) == ["warmup", "stage1", "stage2"]
        assert [(h["stage"], h["rl_step"]) for h in run["history"]] == [("warmup", 0), ("stage1", 1), ("stage1", 2), ("stage2", 3)]
        for m in run["metrics"].values():
            # Rates over 8 problems, and the identity Delta = i->c - c->i.
            assert all(abs(m[k] * 8 - round(m[k] * 8)) < 1e-9 for k in ("acc_t1", "acc_t2", "delta_i_to_c", "delta_c_to_i"))
            assert m["delta"] == pytest.approx(m["delta_i_to_c"] - m["delta_c_to_i"])
        # Stage II's metrics come from the evaluation after its last step (1 step after stage I's 2),
        # and every stage reports exactly the report's metric columns.
        assert (run["history"][-1]["stage"], run["history"][-1]["step"], run["history"][-1]["rl_step"]) == ("stage2", 1, 3)
        assert all(set(m) == {key for key, _ in report.METRICS} for m in run["metrics"].values())
    # The report's Stage II row holds the run's numbers (one seed: no spread).
    stage2 = results["runs"]["3"]["metrics"]["stage2"]
    assert results["summary"]["stage2"]["acc_t2"]["mean"] == pytest.approx(stage2["acc_t2"])
    assert f"| SCoRe Stage II | {stage2['acc_t1']:.3f} | {stage2['acc_t2']:.3f} | {stage2['delta']:.3f} |" in (out / "report.md").read_text()
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000


def test_an_interrupted_run_leaves_the_previous_results(tmp_path, monkeypatch):
    from offside_jax.correct import driver

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("previous")
    calls = []
    real = driver.run_score

    def fail_on_second_seed(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "run_score", fail_on_second_seed)
    cfg = load_config("configs/score_arithmetic.yaml", [f"output_dir={out}", *TINY, "seeds=[3,4]", "stage1.enabled=false", "stage2.enabled=false"], schema=CorrectConfig)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run_correct(cfg, log=lambda *_: None)
    assert calls == [3, 4] and (out / "results.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _runs_without_times(out) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    for run in runs.values():
        run.pop("seconds")
    return runs


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Killed in Stage I's second RL step (after the checkpoint of the first), the same command
    resumes the warm-up's and Stage I's checkpoints and ends with an uninterrupted run's numbers."""
    from offside_jax.correct import driver

    # Two updates per RL step (minibatches): checkpoints fall only between RL steps.
    args = ["--config", "configs/score_arithmetic.yaml", *TINY, "checkpoint_every=1", "stage1.minibatches=2",
            "stage1.clip_eps=0.2"]
    from offside_jax.cli import main

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["correct", *args, f"output_dir={whole}"]) == 0
    rollouts, real = [], driver.rl_batch

    def interrupted(*a, **kw):
        rollouts.append(1)
        if len(rollouts) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(driver, "rl_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["correct", *args, f"output_dir={cut}"])
    assert not (cut / "results.json").exists()
    assert (cut / "checkpoints" / "seed3" / "stage1" / "history.json").is_file()
    monkeypatch.setattr(driver, "rl_batch", real)
    capsys.readouterr()
    assert main(["correct", *args, f"output_dir={cut}"]) == 0
    log = capsys.readouterr().out
    assert "resuming from step 3" in log and "resuming from step 2" in log  # warm-up done; Stage I after 1 RL step
    assert _runs_without_times(cut) == _runs_without_times(whole)
    assert not (cut / "checkpoints").exists()  # the finished run's directory holds its results only
    # A rerun of an interrupted run with other settings is refused, naming the key.
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(driver, "rl_batch", interrupted)
        rollouts.clear()
        main(["correct", *args, f"output_dir={tmp_path / 'third'}"])
    monkeypatch.setattr(driver, "rl_batch", real)
    assert main(["correct", *args, f"output_dir={tmp_path / 'third'}", "stage1.lr=2e-3"]) == 2
    assert "stage1.lr" in capsys.readouterr().err
