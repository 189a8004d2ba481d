"""Every file in configs/ loads through the package's own loader with no unknown key.

A config file that no test parses rots silently when a schema changes; here each file is
matched to the loader of the command that reads it, and a file no rule claims fails.
"""
from pathlib import Path

import pytest

from offside_jax.benchmark import load_benchmark_config
from offside_jax.config import ConfigError, CorrectConfig, FinetuneConfig, UnlearnConfig, load_config
from offside_jax.train.sft_data import read_chat_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _benchmark(path):
    return load_benchmark_config(path)


def _schema(schema):
    return lambda path: load_config(path, schema=schema)


# (glob under configs/, loader): the command each file is written for.
LOADERS = [
    ("demo*.yaml", _benchmark),
    ("findings/*.yaml", _benchmark),
    ("finetune_*.yaml", _schema(FinetuneConfig)),
    ("unlearn_*.yaml", _schema(UnlearnConfig)),
    ("score_*.yaml", _schema(CorrectConfig)),
    ("compare_*.yaml", _schema(CorrectConfig)),
    ("scl_*.yaml", _schema(CorrectConfig)),
    ("data/*.jsonl", read_chat_jsonl),
]


def _loader_of(path: Path):
    rel = path.relative_to(CONFIGS)
    matches = [load for pattern, load in LOADERS if rel.match(pattern) and len(rel.parts) == len(Path(pattern).parts)]
    assert len(matches) == 1, f"configs/{rel}: {len(matches)} loader rules match; add it to LOADERS in {__file__}"
    return matches[0]


FILES = sorted(p for p in CONFIGS.rglob("*") if p.is_file())


def test_there_are_configs():
    assert len(FILES) >= 10 and any(p.parent.name == "findings" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_loads(path):
    assert _loader_of(path)(path)


YAML_LOADERS = [(p, f) for p, f in LOADERS if p.endswith(".yaml")]


# Ids from the patterns alone: the same in every test worker (a function's repr is not).
@pytest.mark.parametrize("pattern, load", YAML_LOADERS, ids=[p for p, _ in YAML_LOADERS])
def test_an_unknown_key_is_refused(tmp_path, pattern, load):
    """The same loaders refuse a key their schema lacks, naming it (so the test above can fail)."""
    original = next(p for p in FILES if p.relative_to(CONFIGS).match(pattern))
    bad = tmp_path / original.relative_to(CONFIGS)
    bad.parent.mkdir(parents=True, exist_ok=True)
    text = original.read_text(encoding="utf-8")
    if "base:" in text:  # keep a `base:` path resolvable from the copy
        text = text.replace("base: ../", f"base: {CONFIGS}/")
    bad.write_text(text + "\nnot_a_key_of_any_schema: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not_a_key_of_any_schema"):
        load(bad)


def test_an_empty_override_is_the_empty_string():
    """`scl_vl.release=""` reaches the program as `scl_vl.release=` once the shell drops the
    quotes: it means the empty string, and a field that is no string says so, naming the override."""
    cfg = load_config(CONFIGS / "scl_vl_tiny.yaml", ["scl_vl.release=/x", "scl_vl.release="], schema=CorrectConfig)
    assert cfg.scl_vl.release == ""
    with pytest.raises(ConfigError, match="override 'scl_vl.layers='"):
        load_config(CONFIGS / "scl_vl_tiny.yaml", ["scl_vl.layers="], schema=CorrectConfig)
