"""The one file writer: whole files or nothing, nothing left behind."""
import json

import pytest

from offside_jax import files


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(path, {"score": 1})
    with pytest.raises(RuntimeError, match="interrupted"):
        with files.atomic_open(path) as f:
            f.write('{"score": ')
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text(encoding="utf-8")) == {"score": 1}
    assert leftovers(tmp_path) == []


def test_writers_create_parents_and_replace_whole_files(tmp_path):
    path = tmp_path / "a" / "b" / "rows.jsonl"
    files.write_jsonl(path, [{"x": 1}, {"x": float("nan")}])
    assert path.read_text(encoding="utf-8") == '{"x": 1}\n{"x": null}\n'
    files.write_text(path, "short\n")
    assert path.read_text(encoding="utf-8") == "short\n"
    files.write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert leftovers(path.parent) == []


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_open("x", "a"):
            pass


def test_save_figure_writes_a_png_atomically(tmp_path):
    plt = files.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = files.save_figure(fig, tmp_path / "plots" / "line.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(path.parent) == []
    assert not plt.fignum_exists(fig.number), "the figure is closed"
