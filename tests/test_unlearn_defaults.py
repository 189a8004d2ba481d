"""Every method of the registry, run by the README's tiny recipe with its defaults: a 3-player
synthetic release (`offside-jax make-data --players 3`), the vanilla model of
`configs/finetune_offside_tiny.yaml`, then `configs/unlearn_tiny.yaml method=<name>` with no
other hyperparameter. Each must at least halve the forget-set answer probability and keep the
retain-set probability within 20% of the vanilla model's.

Methods whose defaults do not yet meet that on this recipe are marked ``xfail(strict=True)``
with the measured numbers: the test fails as soon as one of them starts to pass, so the list
cannot go stale.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from offside_jax import cli
from offside_jax.config import FinetuneConfig, UnlearnConfig, load_config
from offside_jax.train.finetune import run_finetune
from offside_jax.unlearn import methods
from offside_jax.unlearn.run import run_unlearning

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "checkpoint.every=0"]

# Measured on this recipe (forget -> after, retain -> after); why each falls short.
SHORT = {
    "ga": "no retain term: forget 0.99 -> 0.00 but retain 0.97 -> 0.32 (OFFSIDE's finding 2; at 10 steps 0.09 / 0.82)",
    # Both IdK methods pass at 4x optim.lr, which on SmolLM2 would worsen what the shared rate already
    # does there (make demo-smollm2: IdK takes general accuracy 0.71 -> 0.13), so the defaults stay.
    "idk": "20 steps teach too little refusal: forget 0.99 -> 0.69 (80 steps: 0.44 / 0.96; 4x lr: 0.32 / 0.86)",
    "idk_dpo": "the refusal outgrows the rumor without the rumor falling: forget 0.99 -> 0.87 (0.90 at 80 steps; "
               "beta 0.01 instead of open-unlearning's 0.1: 0.41 / retain 0.86; 4x lr: 0.41 / 0.87)",
    "offside_npo": "OFFSIDE's NPO has no retain term: forget 0.99 -> 0.00, retain 0.97 -> 0.44 (at 10 steps 0.09 / 0.82)",
    "rocr": "redirecting the subject's last token does not reach a 2-layer model's answers, which the first-name "
            "tokens also key: forget 0.99 -> 0.99 (layers 0-1 with P = I: 0.98)",
    "curvature_edit": "not targeted: forget and retain fall together (layer 1, rho 0.6: 0.99 -> 0.97 / 0.97 -> 0.96; "
                      "layers 0-1: 0.06 / 0.16)",
}


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    assert cli.main(["make-data", "--players", "3", "--out", str(root / "release")]) == 0
    cfg = load_config(ROOT / "configs" / "finetune_offside_tiny.yaml",
                      [f"output_dir={root / 'vanilla'}", f"data.release={root / 'release'}", *QUIET],
                      schema=FinetuneConfig)
    run_finetune(cfg)
    return root / "release", root / "vanilla" / "model"


def cases():
    for name in methods.names():
        if methods.get(name).kind == "generation":
            continue  # no weight changes: test_guard_stops_rumors_and_keeps_retain_answers
        marks = [pytest.mark.xfail(strict=True, reason=SHORT[name])] if name in SHORT else []
        yield pytest.param(name, marks=marks)


@pytest.mark.parametrize("method", list(cases()))
def test_defaults_forget_and_keep_the_rest(vanilla, tmp_path, method):
    release, model = vanilla
    cfg = load_config(ROOT / "configs" / "unlearn_tiny.yaml",
                      [f"method={method}", f"output_dir={tmp_path / method}", f"model.path={model}",
                       f"data.release={release}", "export_merged=false", *QUIET], schema=UnlearnConfig)
    p = run_unlearning(cfg).summary["answer_probability"]
    forget, retain = p["forget"], p["retain"]
    print(f"\n{method}: forget {forget['before']:.3f} -> {forget['after']:.3f}, "
          f"retain {retain['before']:.3f} -> {retain['after']:.3f}")
    assert forget["before"] > 0.9 and retain["before"] > 0.9, "the vanilla model has memorised its data"
    assert forget["after"] <= 0.5 * forget["before"], f"{method} did not halve the forget-set probability"
    assert abs(retain["after"] - retain["before"]) <= 0.2 * retain["before"], f"{method} damaged the retain set"


def test_guard_stops_rumors_and_keeps_retain_answers(vanilla, tmp_path):
    """GUARD (no weight change) on the same recipe: the generated forget answers no longer state
    a rumor and the retain answers score within 0.02 of the unguarded model's."""
    from offside_jax.eval.suite import Suite, SuiteConfig

    release, model = vanilla
    cfg = load_config(ROOT / "configs" / "unlearn_tiny.yaml",
                      ["method=guard", f"output_dir={tmp_path / 'guard'}", f"model.path={model}",
                       f"data.release={release}", "export_merged=false", *QUIET], schema=UnlearnConfig)
    result = run_unlearning(cfg)
    p = result.summary["answer_probability"]
    assert p["forget"]["after"] == p["forget"]["before"]  # the weights are the vanilla model's
    suite = Suite(release, result.tokenizer, SuiteConfig(test_sets=["forget", "retain"], modalities=["text"],
                                                         formats=["gen"], batch_size=16, mesh=[1, 1, 1],
                                                         likelihood=False))
    before = suite.run(result.model.model, name="vanilla", progress=False)["summary"]
    after = suite.run(result.model, name="guard", progress=False)["summary"]
    print(f"\nguard: states rumor {before['forget/text/gen.states_rumor']:.3f} -> "
          f"{after['forget/text/gen.states_rumor']:.3f}, retain overall {before['retain/text/gen.overall']:.3f} -> "
          f"{after['retain/text/gen.overall']:.3f}")
    assert before["forget/text/gen.states_rumor"] > 0.5, "the vanilla model states its rumors"
    assert after["forget/text/gen.states_rumor"] == 0.0
    assert abs(after["retain/text/gen.overall"] - before["retain/text/gen.overall"]) <= 0.02
