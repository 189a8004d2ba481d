"""`offside-jax correct`: a :class:`~offside_jax.config.CorrectConfig` in, SCoRe run per seed, a
report out.

For each seed: a random-init tiny model over a character tokenizer of the task's alphabet (or a
fresh copy of a ``pretrained`` model with its own tokenizer), warm-up SFT on the task's buggy-first traces, Stage I, Stage II
(:func:`offside_jax.correct.driver.run_score`), greedy two-turn evaluation after each stage.
``output_dir`` receives, all at once when every seed is done (an interrupted run leaves the
previous results or none), the resolved ``config.yaml``, ``results.json``, ``report.md`` and
``plots/accuracy.png`` (:mod:`offside_jax.correct.report`). Until then it holds each phase's
checkpoints (``checkpoints/seed<s>/{warmup,stage1,stage2}``, every ``checkpoint_every``
steps): the same command resumes an interrupted run where it stopped.

``mode: compare`` runs every strategy of the ``compare`` section on the task's step format
instead (:mod:`offside_jax.correct.compare`: plain SFT, mistake tuning, LEMMA, intrinsic
self-refine, verifier feedback, SCoRe, SCL) and writes one report (``report.md`` with accuracy
per turn, Δ, Δi→c, Δc→i, CL/CS/RSS and cost, ``results.json``, ``plots/compare.png``,
``config.yaml``) at once; it keeps no checkpoints (a rerun starts over).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

from offside_jax import config as config_lib
from offside_jax.config import ConfigError, CorrectConfig, CorrectTaskConfig, ScoreStageConfig
from offside_jax.correct.tasks import TASKS


# -- building blocks from the config ------------------------------------------------------------------


def rumor_records(cfg: CorrectTaskConfig) -> tuple[dict[str, str], ...]:
    """``{question, rumor, fact}`` of the text records of ``cfg.release`` / ``cfg.setting`` /
    ``cfg.split`` that state a rumor with a verified correction (``attributes`` filters),
    one per question."""
    from offside_jax.data.offside import OffsideDataError, load_release
    from offside_jax.correct.tasks import rumor_record_from_offside

    if not cfg.release:
        raise ConfigError("task.release: rumor_correction needs an OFFSIDE release directory (e.g. from `offside-jax make-data --out DIR`)")
    try:
        release = load_release(cfg.release, [cfg.setting], check_images=False)
    except (OffsideDataError, FileNotFoundError) as e:
        raise ConfigError(f"task.release {cfg.release!r}: {e}") from None
    splits = release.splits.get(cfg.setting, {})
    if cfg.split not in splits:
        raise ConfigError(f"task.split {cfg.split!r} is not in {cfg.release}/{cfg.setting}; splits: {', '.join(sorted(splits))}")
    records: dict[str, dict[str, str]] = {}
    for example in splits[cfg.split]:
        if example.modality != "text" or (cfg.attributes and example.attribute not in cfg.attributes):
            continue
        record = rumor_record_from_offside(dataclasses.asdict(example))
        if record is not None:
            records.setdefault(record["question"], record)
    if not records:
        wanted = f" with attribute in {cfg.attributes}" if cfg.attributes else ""
        raise ConfigError(f"task: no text rumor records with a corrected answer{wanted} in {cfg.release}/{cfg.setting}/{cfg.split}")
    return tuple(records.values())


def build_task(cfg: CorrectTaskConfig):
    """The :mod:`offside_jax.correct.tasks` task named by ``cfg.name``."""
    from offside_jax.correct import tasks

    common = dict(p_bug=cfg.p_bug, p_fix=cfg.p_fix)
    try:
        if cfg.name == "carry_arithmetic":
            return tasks.CarryArithmetic(min_digits=cfg.min_digits, max_digits=cfg.max_digits, ops=cfg.ops, **common)
        if cfg.name == "countdown_mini":
            return tasks.CountdownMini(min_numbers=cfg.min_numbers, max_numbers=cfg.max_numbers, **common)
        if cfg.name == "rumor_correction":
            return tasks.RumorCorrection(rumor_records(cfg), **common)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task: {e}") from None
    raise ConfigError(f"task.name {cfg.name!r} is not one of {', '.join(TASKS)}")


def episode_format(cfg: CorrectConfig):
    from offside_jax.correct.driver import TwoTurnFormat

    fmt = TwoTurnFormat(max_new_tokens=cfg.format.max_new_tokens, length=cfg.format.length)
    if cfg.format.instruction is not None:
        fmt = dataclasses.replace(fmt, instruction=cfg.format.instruction)
    if fmt.max_new_tokens < 1:
        raise ConfigError(f"format.max_new_tokens must be >= 1, got {fmt.max_new_tokens}")
    return fmt


def build_tokenizer(task, fmt, pretrained: str = "", extra_texts: tuple[str, ...] = ()):
    """The ``pretrained`` model's own tokenizer, or characters of the task's alphabet, of the
    instruction and of ``extra_texts``."""
    from offside_jax.correct.chars import CharTokenizer

    if pretrained:
        from offside_jax.correct.pretrained import load_tokenizer

        return load_tokenizer(pretrained)
    return CharTokenizer.for_texts([task.alphabet, fmt.instruction, *extra_texts])


def tokenizer_info(tokenizer) -> dict[str, Any]:
    from offside_jax.correct.chars import CharTokenizer

    kind = "characters" if isinstance(tokenizer, CharTokenizer) else "pretrained"
    return {"kind": kind, "vocab_size": tokenizer.vocab_size}


def build_model(cfg: CorrectConfig, tokenizer, seed: int):
    """A fresh copy of ``cfg.pretrained``, or a random-init tiny model with the tokenizer's vocabulary."""
    from offside_jax.models.auto import create_model
    from offside_jax.models.loader import tiny_hf_config

    if cfg.pretrained:
        from offside_jax.correct.pretrained import load_model

        return load_model(cfg.pretrained, tokenizer)
    try:
        hf_config = tiny_hf_config(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size), tokenizer)
        return create_model(hf_config, seed=seed)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def stage_spec(cfg: ScoreStageConfig, stage: int, where: str):
    """``(ScoreStage, StageRun)`` for the driver, or ``None`` when the stage is disabled."""
    from offside_jax.correct.driver import StageRun
    from offside_jax.correct.score import ScoreStage

    if not cfg.enabled:
        return None
    try:
        objective = ScoreStage(
            stage=stage, alpha=cfg.alpha, beta1=cfg.beta1, beta2=cfg.beta2, reward_first=cfg.reward_first,
            advantage=cfg.advantage, group_size=cfg.group_size, first_attempt_baseline=cfg.first_attempt_baseline,
            kl_in_reward=cfg.kl_in_reward, kl_estimator=cfg.kl_estimator, clip_eps=cfg.clip_eps, lr=cfg.lr,
            temperature=cfg.temperature,
        )
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.steps < 1 or cfg.problems_per_step < 1:
        raise ConfigError(f"{where}: steps and problems_per_step must be >= 1 (got {cfg.steps}, {cfg.problems_per_step}); set {where}.enabled=false to skip the stage")
    if (cfg.problems_per_step * cfg.group_size) % cfg.minibatches:
        raise ConfigError(f"{where}: {cfg.problems_per_step} problems x {cfg.group_size} samples do not split into {cfg.minibatches} minibatches")
    run = StageRun(steps=cfg.steps, lr=cfg.lr, problems_per_step=cfg.problems_per_step, epochs=cfg.epochs,
                   minibatches=cfg.minibatches, eval_every=cfg.eval_every, max_grad_norm=cfg.max_grad_norm)
    return objective, run


def eval_problems(task, n: int, seed: int):
    """Held-out problems: every record of a finite task (rumors; up to ``n``), else ``n`` draws
    from a seed apart from the training draws."""
    from offside_jax.correct.tasks import make_problems

    if hasattr(task, "records"):
        return [task.problem(i) for i in range(min(n, len(task.records)))]
    return make_problems(task, n, seed=10_000 + seed)


# -- the command --------------------------------------------------------------------------------------


def validate(cfg: CorrectConfig) -> None:
    """Fail before any training on what the config alone shows to be wrong."""
    if not cfg.seeds:
        raise ConfigError("seeds: give at least one seed, e.g. seeds=[0,1,2]")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds {list(cfg.seeds)} repeat a seed")
    if cfg.eval_size < 1:
        raise ConfigError(f"eval_size must be >= 1, got {cfg.eval_size}")
    if cfg.warmup.steps < 1 or cfg.warmup.problems_per_step < 1:
        raise ConfigError(f"warmup: steps and problems_per_step must be >= 1 (got {cfg.warmup.steps}, {cfg.warmup.problems_per_step})")
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name {cfg.task.name!r} is not one of {', '.join(TASKS)}")


def run_correct(cfg: CorrectConfig, log=print) -> dict[str, Any]:
    """Run every seed and write the report; returns the results (``results.json``)."""
    if cfg.mode == "scl_vl":
        if cfg.pretrained:
            raise ConfigError("pretrained: mode=scl_vl trains its own tiny vision-language model (scl_vl.*); "
                              "pretrained applies to modes score and compare")
        if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
            raise ConfigError(f"seeds {list(cfg.seeds)}: give at least one seed, none repeated")
        from offside_jax.correct import scl_vl

        return scl_vl.run(cfg, log)
    validate(cfg)
    if cfg.mode == "compare":
        return run_compare(cfg, log)
    task = build_task(cfg.task)
    fmt = episode_format(cfg)
    stages = (stage_spec(cfg.stage1, 1, "stage1"), stage_spec(cfg.stage2, 2, "stage2"))

    import jax

    from offside_jax.correct import driver
    from offside_jax.correct.report import summarize, write_report
    from offside_jax.files import staged_dir, write_yaml
    from offside_jax.train import mesh as mesh_lib

    tokenizer = build_tokenizer(task, fmt, cfg.pretrained)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    warmup = driver.StageRun(steps=cfg.warmup.steps, lr=cfg.warmup.lr, problems_per_step=cfg.warmup.problems_per_step,
                      max_grad_norm=cfg.warmup.max_grad_norm)
    # What the phases depend on: a rerun into an interrupted run's output_dir resumes it, one
    # with other settings is refused (driver.Resumable).
    recipe = {k: v for k, v in config_lib.to_dict(cfg).items()
              if k not in ("output_dir", "seeds", "lr0_control", "checkpoint_every", "progress")}
    checkpoints = Path(cfg.output_dir) / "checkpoints"

    def where(name: str) -> driver.Resumable:
        return driver.Resumable(checkpoints / name, recipe, cfg.checkpoint_every)

    runs: dict[str, Any] = {}
    began = time.perf_counter()
    cpu_began = time.process_time()
    control: dict[str, Any] | None = None
    for seed in cfg.seeds:
        log(f"seed {seed}: warm-up {cfg.warmup.steps} steps, stage I {cfg.stage1.steps if stages[0] else 0}, "
            f"stage II {cfg.stage2.steps if stages[1] else 0} on {task.name}")
        problems = eval_problems(task, cfg.eval_size, seed)
        kw = dict(eval_problems=problems, seed=seed, progress=cfg.progress)
        warmed_at = time.perf_counter()
        warmed = driver.run_warmup(build_model(cfg, tokenizer, seed), task, tokenizer, fmt, warmup, mesh, seed=seed,
                                   progress=cfg.progress, where=where(f"seed{seed}"))
        warmup_seconds = time.perf_counter() - warmed_at
        # The stages donate the parameters they train: give each run its own copy.
        result = driver.run_score(driver.frozen_copy(warmed), task, tokenizer, fmt, mesh, warmup=None,
                                  stage1=stages[0], stage2=stages[1], where=where(f"seed{seed}"), **kw)
        result.seconds["warmup"] += warmup_seconds
        runs[str(seed)] = {"metrics": result.metrics, "history": result.history, "seconds": result.seconds}
        log(f"seed {seed}: " + "; ".join(f"{stage} acc_t1 {m['acc_t1']:.3f} acc_t2 {m['acc_t2']:.3f} delta {m['delta']:+.3f}"
                                          for stage, m in result.metrics.items()))
        if cfg.lr0_control and control is None:
            frozen = [None if s is None else (s[0], dataclasses.replace(s[1], lr=0.0)) for s in stages]
            still = driver.run_score(warmed, task, tokenizer, fmt, mesh, warmup=None, stage1=frozen[0], stage2=frozen[1],
                                     where=where("control"), **kw)
            control = {"seed": seed, "metrics": still.metrics, "history": still.history, "seconds": still.seconds}
            log(f"seed {seed}, lr = 0 control: " + "; ".join(f"{stage} acc_t2 {m['acc_t2']:.3f} delta {m['delta']:+.3f}"
                                                             for stage, m in still.metrics.items()))
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    control_wall = sum(control["seconds"].values()) if control is not None else 0.0
    timing = {"total wall": wall, "total CPU (process)": cpu, "wall per seed": (wall - control_wall) / len(cfg.seeds)}
    if control is not None:
        timing["lr = 0 control"] = control_wall
    results = {
        "run": Path(cfg.output_dir).name,
        "task": task.name,
        "seeds": list(cfg.seeds),
        "eval_problems": len(problems),
        "runs": runs,
        **({"control": control} if control is not None else {}),
        "tokenizer": tokenizer_info(tokenizer),
        "timing": timing,
        "machine": {"devices": f"{len(jax.devices())} x {jax.devices()[0].platform}", "cpu cores": os.cpu_count(),
                    "python": platform.python_version(), "jax": jax.__version__},
    }
    with staged_dir(cfg.output_dir) as tmp:
        write_yaml(tmp / "config.yaml", config_lib.to_dict(cfg))
        write_report(tmp, results)
    return {**results, "summary": summarize(runs)}


# -- `mode: compare` ----------------------------------------------------------------------------------


def compare_task(cfg: CorrectTaskConfig):
    """The configured task in its step format (what LEMMA and mistake tuning need)."""
    from offside_jax.correct.step_task import StepTask

    if cfg.name not in ("carry_arithmetic", "countdown_mini"):
        raise ConfigError(f"task.name {cfg.name!r}: mode=compare runs on the step formats of carry_arithmetic and countdown_mini")
    return StepTask(build_task(cfg))


def learners_start(cfg, pretrained: str = "") -> str:
    """Where plain SFT, mistake tuning and LEMMA start (``compare.start``, from ``pretrained``
    or a random init), for the report's notes."""
    weights = f"the pretrained {pretrained}" if pretrained else "the same random init"
    if cfg.start == "base":
        return (f"one base model per seed (from {weights}, plain SFT on the reference solutions for {cfg.base_steps} "
                f"steps; LEMMA's trajectories built on its wrong samples, {cfg.student_samples} at temperature "
                f"{cfg.student_temperature} on each of {cfg.student_problems} problems)")
    return weights


def run_compare(cfg: CorrectConfig, log=print) -> dict[str, Any]:
    """Every strategy of ``cfg.compare`` per seed (:mod:`offside_jax.correct.compare`), then one
    report (``report.md``, ``results.json``, ``plots/compare.png``, ``config.yaml``) written at once."""
    from offside_jax.config import COMPARE_STRATEGIES

    unknown = [s for s in cfg.compare.strategies if s not in COMPARE_STRATEGIES]
    if unknown or not cfg.compare.strategies:
        raise ConfigError(f"compare.strategies {list(cfg.compare.strategies)}: choose from {', '.join(COMPARE_STRATEGIES)}")
    if cfg.format.length < 1:
        raise ConfigError("format.length: mode=compare pads every training batch to one length; set it (e.g. 256)")
    if cfg.compare.lemma_reference_share >= 1:
        raise ConfigError(f"compare.lemma_reference_share {cfg.compare.lemma_reference_share}: a share below 1 (LEMMA's "
                          "pool needs trajectories)")
    task = compare_task(cfg.task)
    fmt = episode_format(cfg)
    stages = (stage_spec(cfg.stage1, 1, "stage1"), stage_spec(cfg.stage2, 2, "stage2"))

    import jax

    from offside_jax.correct import compare, driver
    from offside_jax.correct.report import compare_table, summarize_compare, write_compare_report
    from offside_jax.files import staged_dir, write_yaml
    from offside_jax.train import mesh as mesh_lib

    tokenizer = build_tokenizer(task, fmt, cfg.pretrained, tuple(compare.extra_texts()))
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    warmup = driver.StageRun(steps=cfg.warmup.steps, lr=cfg.warmup.lr, problems_per_step=cfg.warmup.problems_per_step,
                             max_grad_norm=cfg.warmup.max_grad_norm)
    strategies = list(cfg.compare.strategies)
    runs: dict[str, Any] = {}
    began, cpu_began = time.perf_counter(), time.process_time()
    for seed in cfg.seeds:
        log(f"seed {seed}: {', '.join(strategies)} on {task.name}")
        problems = eval_problems(task, cfg.eval_size, seed)
        seed_began = time.perf_counter()
        run = compare.run_seed(functools.partial(build_model, cfg, tokenizer, seed), task, tokenizer, fmt, cfg.compare, warmup=warmup,
                               stages=stages, eval_problems=problems, mesh=mesh, seed=seed, length=cfg.format.length,
                               log=log, progress=cfg.progress)
        run["seconds"] = time.perf_counter() - seed_began
        runs[str(seed)] = run
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    results = {
        "run": Path(cfg.output_dir).name,
        "mode": "compare",
        "task": task.name,
        "seeds": list(cfg.seeds),
        "strategies": strategies,
        "eval_problems": len(problems),
        "runs": runs,
        "not_run": dict(compare.NOT_RUN),
        "notes": [
            "self-refine, verifier feedback, SCoRe, SCL, RISE and UFO start from one two-turn warm-up per seed "
            f"({cfg.warmup.steps} steps x {cfg.warmup.problems_per_step} traces, first attempts wrong with p_bug "
            f"{cfg.task.p_bug}, fixed with p_fix {cfg.task.p_fix}); plain SFT, mistake tuning and LEMMA each train from "
            f"{learners_start(cfg.compare, cfg.pretrained)} for {cfg.compare.train.steps} steps x {cfg.compare.train.problems_per_step} "
            f"sequences (lr {cfg.compare.train.lr}).",
            "verifier feedback uses the task's checker (an oracle): a right first answer is told so and stands, a "
            "wrong one gets the review prompt (the warm-up model knows no other feedback text), so its turn 2 cannot "
            "turn a right answer wrong and it spends one model call fewer per right answer.",
            f"SCoRe here is short ({cfg.stage1.steps} + {cfg.stage2.steps} RL steps of {cfg.stage1.problems_per_step} "
            f"problems x {cfg.stage1.group_size} samples) to fit the comparison on CPU.",
            "SCL trains the full weights of the tiny model (LoRA is for the large VLMs of the paper); its DPO prompt is "
            "the bare problem, as SCL's.",
            f"RISE: one round of {cfg.compare.rise_problems} problems x up to {cfg.compare.rise_turns} turns, best of "
            f"{cfg.compare.rise_samples} samples per turn (the paper: 16), {cfg.compare.rise_steps} steps of "
            f"reward-weighted regression (tau {cfg.compare.rise_tau}); UFO: {cfg.compare.ufo_steps} GRPO steps of "
            f"{cfg.compare.ufo_problems_per_step} problems x {cfg.compare.ufo_samples} episodes of up to "
            f"{cfg.compare.ufo_turns} attempts (the paper: 5). Both are scored like verifier feedback (oracle "
            "feedback: turn 2 only after a wrong turn 1) but with their own feedback text.",
            "mistake tuning's turn 2 is self-rethinking; its check prompt is one the tiny model never saw, so a reply "
            "other than 'yes' keeps the answer.",
        ],
        "tokenizer": tokenizer_info(tokenizer),
        "timing": {"total wall": wall, "total CPU (process)": cpu, "wall per seed": wall / len(cfg.seeds)},
        "machine": {"devices": f"{len(jax.devices())} x {jax.devices()[0].platform}", "cpu cores": os.cpu_count(),
                    "python": platform.python_version(), "jax": jax.__version__},
    }
    with staged_dir(cfg.output_dir) as tmp:
        write_yaml(tmp / "config.yaml", config_lib.to_dict(cfg))
        write_compare_report(tmp, results)
    summary = summarize_compare(runs, strategies)
    return {**results, "summary": summary, "table": compare_table(summary)}
