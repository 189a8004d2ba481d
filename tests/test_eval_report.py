"""Reports: every file written, every number in report.md equal to results.json, plots are
real images, several runs compared; built from real suite runs of the tiny Qwen2.5-VL."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from offside_jax.eval import report
from offside_jax.eval.attacks import AttackConfig, run_attacks
from offside_jax.eval.suite import Suite
from offside_jax.eval.tuning import TuneConfig

import eval_fixtures as fx


def _table(markdown: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    lines = markdown.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return header, rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A benchmark run over the vanilla and GA models: suite, attacks, forget quality, report."""
    out = tmp_path_factory.mktemp("run")
    suite = Suite(fx.release(), fx.processor(), fx.suite_config(test_sets=["forget", "retain", "world"], max_examples=8))
    methods = {}
    examples = {}
    for name, model, role in (("vanilla", fx.vanilla(), "reference"), ("ga", fx.ga_unlearned(), "method")):
        res = suite.run(model, out / name / "eval", name=name, progress=False)
        methods[name] = {"role": role, "summary": res["summary"]}
        rows = (out / name / "eval" / "examples" / "forget_image_gen.jsonl").read_text().splitlines()
        examples[name] = [json.loads(r) for r in rows]
    attacks = AttackConfig(prompt=["in_context_rumor"], quantize_bits=[8],
                           relearn_tune=TuneConfig(steps=8, batch_size=16, lr=3e-3, mesh=[1, 1, 1]), relearn_curve_every=4)
    methods["ga"]["attacks"] = run_attacks(fx.ga_unlearned(), suite, attacks, out_dir=out / "ga" / "attacks", name="ga",
                                           progress=False)
    methods["ga"]["forget_quality"] = report.forget_quality_of_rows(examples["ga"], examples["vanilla"])
    results = {"run": "tiny", "modality": "image", "methods": methods, "timing": {"total": 1.0}}
    report.write_report(out, results)
    return out


def test_every_report_file_is_written(run_dir):
    assert (run_dir / "report.md").is_file() and (run_dir / "results.json").is_file()
    import matplotlib.image

    for name in report.PLOTS:
        path = run_dir / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01  # not blank
    assert not list((run_dir / "plots").glob(".*"))  # no temporary files left


def test_report_numbers_equal_results_json(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    markdown = (run_dir / "report.md").read_text()
    header, rows = _table(markdown, "| method |")
    cols = report.columns_for(results)
    assert header[1:] == [f"{label} {'↓' if b == 'lower' else '↑'}" for label, _, b in cols]
    assert [r[0] for r in rows] == ["vanilla", "ga"]
    checked = 0
    for row in rows:
        entry = results["methods"][row[0]]
        for text, (_, key, _) in zip(row[1:], cols):
            value = entry.get("forget_quality") if key == "forget_quality" else entry["summary"].get(key)
            assert text == ("-" if value is None else f"{value:.3f}"), (row[0], key)
            checked += value is not None
    assert checked >= 12
    header, rows = _table(markdown, "| method | none |")
    ga = dict(zip(header, next(r for r in rows if r[0] == "ga")))
    attacks = results["methods"]["ga"]["attacks"]
    for name in ("prompt_in_context_rumor", "int8", "relearn"):
        assert ga[name] == f"{attacks[name]['summary']['forget/image/gen.overall']:.3f}"


def test_forget_quality_pairs_rows_by_uid():
    from scipy import stats

    a = [{"uid": str(i), "truth_ratio": r} for i, r in enumerate([0.1, 0.5, 0.9, 2.0])]
    b = [{"uid": str(i), "truth_ratio": r} for i, r in enumerate([0.3, 0.4, 0.8, 1.5])]
    expected = stats.ks_2samp([0.1, 0.5, 0.9, 2.0], [0.3, 0.4, 0.8, 1.5]).pvalue
    assert report.forget_quality_of_rows(a[::-1], b + [{"uid": "9", "truth_ratio": 7.0}]) == pytest.approx(expected)
    assert report.forget_quality_of_rows(a[:1], b) is None


def test_compare_runs(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    data = json.loads((other / "results.json").read_text())
    data["run"] = "second"
    (other / "results.json").write_text(json.dumps(data))
    table = report.compare_runs([run_dir, other])
    header, rows = _table(table, "| run |")
    assert [(r[0], r[1]) for r in rows] == [("tiny", "vanilla"), ("tiny", "ga"), ("second", "vanilla"), ("second", "ga")]
    col = header.index("forget gen ↓")
    assert rows[1][col] == f"{data['methods']['ga']['summary']['forget/image/gen.overall']:.3f}" == rows[3][col]
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report.compare_runs([tmp_path])


def test_tradeoff_points_are_the_methods_scores(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    ga = results["methods"]["ga"]["summary"]
    assert report.utility(results["methods"]["ga"], "image") == pytest.approx(
        np.mean([ga["retain/image/gen.overall"], ga["world/text/gen.overall"]]))
