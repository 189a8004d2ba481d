"""scripts/unlearn_budgets.py: the bar it marks and the table it writes, on cells made by hand."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "unlearn_budgets.py"


@pytest.fixture(scope="module")
def budgets():
    spec = importlib.util.spec_from_file_location("unlearn_budgets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(method, steps, forget_after, retain_after, meets):
    return {"method": method, "steps": steps, "forget": {"before": 0.8, "after": forget_after},
            "retain": {"before": 0.9, "after": retain_after}, "meets_bar": meets}


def test_the_bar_is_the_defaults_test_s(budgets):
    # forget at most half of 0.8 (the edge included), retain within 20% of 0.9 (0.72 .. 1.08)
    assert budgets.meets_bar({"before": 0.8, "after": 0.4}, {"before": 0.9, "after": 0.73})
    assert not budgets.meets_bar({"before": 0.8, "after": 0.41}, {"before": 0.9, "after": 0.9})
    assert not budgets.meets_bar({"before": 0.8, "after": 0.1}, {"before": 0.9, "after": 0.71})


def test_table_has_a_row_per_method_and_a_column_per_budget(budgets):
    cells = [cell("ga", 10, 0.1, 0.85, True), cell("ga", 20, 0.0, 0.1, False),
             cell("npo", 10, 0.5, 0.9, False), cell("npo", 20, 0.05, 0.88, True)]
    lines = budgets.table(cells, ["ga", "npo"], [10, 20]).splitlines()
    assert "vanilla: 0.80 / 0.90" in lines[0]
    assert lines[2:] == ["| method | 10 steps | 20 steps |", "|---|---:|---:|",
                         "| ga | 0.10 / 0.85 ✓ | 0.00 / 0.10 |", "| npo | 0.50 / 0.90 | 0.05 / 0.88 ✓ |"]
