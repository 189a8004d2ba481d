"""SCL on images: two-turn self-correction episodes of a vision-language model on OFFSIDE rumor
items, flips kept as DPO pairs, DPO on LoRA adapters through the training session.

An episode (:func:`episodes`) is SCL's turn-1 prompt (question, options, step-by-step sentence,
``## X ##`` instruction; :mod:`offside_jax.correct.scl`) after the record's image, the model's
answer, then the review prompt in the same conversation and the second answer, both generated
through :func:`offside_jax.models.generate.generate` with the encoder's ``prompt_batch`` (images
included). Flips become :class:`~offside_jax.correct.records.PreferenceRecord` s exactly as
:func:`offside_jax.correct.scl.scl_pairs` selects them (the DPO prompt is the bare question and
the image); :func:`dpo_batch` turns them into chosen/rejected rows with the image through the
one encoder (:func:`offside_jax.data.batches.preference_answer_batch`); :func:`train_dpo` runs
SCL's DPO (β 0.1, ``sft_beta`` 0.1) on LoRA adapters with ``Session.step`` / ``Session.fit``.

:func:`run` is ``offside-jax correct`` with ``mode: scl_vl``: a tiny Qwen2.5-VL fine-tuned on a
release (its vanilla model, with a two-turn warm-up so it answers in SCL's format), the metrics
of held-out rumor items before and after SCL (all of them and the visual-rumor slice). With
``chosen_sft_control`` the same pairs also train a control with the preference term off (SFT on the
chosen answers, same session, LoRA and draws): what SCL gains over it is the preference's share,
not the answer format the chosen answers teach. The report gives mean ± sd over seeds.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import string
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from offside_jax.correct import scl as scl_lib
from offside_jax.correct.records import PreferenceRecord
from offside_jax.correct.report import spread

IMAGE_TAG = "<image>"


@dataclasses.dataclass(frozen=True)
class ChatItem:
    """A conversation (ending in a user turn) with its images, in the shape the encoders read
    (``uid``, ``prompt``, ``images``, ``messages()``)."""

    uid: str
    turns: tuple[tuple[str, str], ...]  # (role, content); the first user turn carries the image tags
    images: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        return "\n".join(content for _, content in self.turns)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]


def _tagged(messages: Sequence[Mapping[str, str]], images: Sequence[str]) -> tuple[tuple[str, str], ...]:
    turns = [(m["role"], m["content"]) for m in messages]
    if images:
        first = next(i for i, (role, _) in enumerate(turns) if role == "user")
        turns[first] = (turns[first][0], IMAGE_TAG * len(images) + turns[first][1])
    return tuple(turns)


def _images(item: scl_lib.ChoiceItem, root: str | os.PathLike | None) -> tuple[str, ...]:
    if item.image is None:
        return ()
    return (str(Path(root) / item.image) if root is not None else item.image,)


def turn_chat(item: scl_lib.ChoiceItem, response1: str | None = None, prompt_id: int = 0,
              root: str | os.PathLike | None = None, uid: str = "") -> ChatItem:
    """Turn 1 (``response1`` None) or turn 2 of SCL's conversation, the image before the question."""
    images = _images(item, root)
    return ChatItem(uid or item.question, _tagged(scl_lib.conversation(item, response1, prompt_id), images), images)


def prompt_chat(record: PreferenceRecord) -> ChatItem:
    """The DPO prompt of a pair: its prompt text after its image."""
    images = (record.image,) if record.image else ()
    return ChatItem(str(record.meta.get("item", record.prompt)), _tagged([{"role": "user", "content": record.prompt}], images),
                    images)


# -- generation -----------------------------------------------------------------------------------


def generate_chats(model: Any, encoder: Any, chats: Sequence[ChatItem], *, max_new_tokens: int, temperature: float = 0.0,
                   seed: int = 0, batch_size: int = 16) -> list[str]:
    """One answer per conversation (greedy at temperature 0, else sampled), decoded without
    special tokens; batches of ``batch_size`` rows (a short last batch is filled with copies)."""
    import jax

    from offside_jax.models.generate import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              eos_token_ids=tuple(encoder.eos_token_ids), pad_token_id=encoder.pad_token_id)
    out: list[str] = []
    for start in range(0, len(chats), batch_size):
        rows = list(chats[start: start + batch_size])
        real = len(rows)
        rows += [rows[0]] * (batch_size - real)
        rng = jax.random.fold_in(jax.random.key(seed), start) if temperature > 0 else None
        result = generate(model, encoder.prompt_batch(rows, 16), sampling, rng=rng)
        for row in range(real):
            ids = result.tokens[row, : result.lengths[row]].tolist()
            out.append(encoder.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return out


@dataclasses.dataclass
class Episodes:
    items: list[scl_lib.ChoiceItem]  # one per episode (an item repeats once per sample)
    responses1: list[str]
    responses2: list[str]

    def metrics(self) -> dict[str, float]:
        return scl_lib.turn_metrics(self.items, self.responses1, self.responses2)

    def pairs(self, root: str | os.PathLike | None = None) -> list[PreferenceRecord]:
        """SCL's flip pairs (:func:`offside_jax.correct.scl.scl_pairs`), images resolved against ``root``."""
        records = scl_lib.scl_pairs(self.items, self.responses1, self.responses2)
        return [dataclasses.replace(r, image=_images(self.items[r.meta["item"]], root)[0] if r.image else None)
                for r in records]


def episodes(model: Any, encoder: Any, items: Sequence[scl_lib.ChoiceItem], *, root: str | os.PathLike | None = None,
             samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 32, prompt_id: int = 0, seed: int = 0,
             batch_size: int = 16) -> Episodes:
    """Two-turn episodes: each item ``samples`` times, turn 1 on the image, then the review
    prompt in the same conversation."""
    expanded = [item for item in items for _ in range(samples)]
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    first = generate_chats(model, encoder, [turn_chat(it, None, prompt_id, root, str(i)) for i, it in enumerate(expanded)],
                           seed=2 * seed, **kw)
    second = generate_chats(model, encoder, [turn_chat(it, r1, prompt_id, root, str(i))
                                             for i, (it, r1) in enumerate(zip(expanded, first))], seed=2 * seed + 1, **kw)
    return Episodes(expanded, first, second)


def sliced_metrics(eps: Episodes) -> dict[str, Any]:
    """The self-correction metrics of all episodes and of the visual-rumor slice (the image
    states the rumor) and the rest."""
    def summary(e: Episodes) -> dict[str, Any]:
        # answers whose extraction gives no option letter (nothing, "" from "## ##", other text)
        unparsed = {f"no_letter_t{t}": float(np.mean([scl_lib.extract_answer(r) not in tuple(string.ascii_uppercase[: len(it.options)])
                                                      for r, it in zip(rs, e.items)]))
                    for t, rs in ((1, e.responses1), (2, e.responses2))}
        return {**e.metrics(), **unparsed, "n": len(e.items)}

    out: dict[str, Any] = {"all": summary(eps)}
    for name, want in (("visual_rumor", True), ("other", False)):
        idx = [i for i, it in enumerate(eps.items) if bool(it.meta.get("visual_rumor")) == want]
        if idx:
            out[name] = summary(Episodes([eps.items[i] for i in idx], [eps.responses1[i] for i in idx],
                                         [eps.responses2[i] for i in idx]))
    return out


# -- DPO ------------------------------------------------------------------------------------------


def dpo_batch(encoder: Any, records: Sequence[PreferenceRecord], length: int | None = None) -> dict[str, np.ndarray]:
    """Chosen rows then rejected rows of ``records``, prompt = bare question + image."""
    from offside_jax.data.batches import preference_answer_batch

    return preference_answer_batch(encoder, [prompt_chat(r) for r in records], [r.chosen for r in records],
                                   [r.rejected for r in records], pad_to=length)


def pair_length(encoder: Any, records: Sequence[PreferenceRecord], multiple: int = 16) -> int:
    """The token length every DPO batch of ``records`` is padded to (one compiled shape)."""
    from offside_jax.data.batches import row_length

    longest = max(row_length(encoder, encoder.encode_answer(prompt_chat(r), a)) for r in records for a in (r.chosen, r.rejected))
    return -(-longest // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    sft_beta: float = 0.1
    lr: float = 5e-5
    steps: int = 30
    pairs_per_step: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target: str = r"(q|k|v|o|gate|up|down)_proj"
    seed: int = 0
    dpo_weight: float = 1.0  # 0: SFT on the chosen answers only (the control)


def train_dpo(model: Any, encoder: Any, records: Sequence[PreferenceRecord], settings: DPOSettings, mesh: Any = (1, 1, 1),
              progress: bool = False, losses_out: list[float] | None = None) -> Any:
    """SCL's DPO on fresh LoRA adapters of a copy of ``model`` (the frozen reference is the
    model with adapters off); returns the adapters merged. ``pairs_per_step`` pairs per step,
    drawn with replacement."""
    from offside_jax.config import LoRAConfig, OptimConfig
    from offside_jax.correct.preference import make_scl_dpo_loss
    from offside_jax.models import lora
    from offside_jax.train.session import Session
    from offside_jax.train.step import frozen_copy

    if not records:
        raise ValueError("no flips among the episodes: nothing to train SCL on")
    session = Session(list(mesh) if isinstance(mesh, tuple) else mesh)
    work = frozen_copy(model)
    if lora.has_adapters(work):
        work = lora.merge(work)
    session.add_lora(work, LoRAConfig(enabled=True, target=settings.lora_target, rank=settings.lora_rank,
                                      alpha=settings.lora_alpha), seed=settings.seed)
    optim = OptimConfig(lr=settings.lr, schedule="constant", max_grad_norm=1.0)
    loss = make_scl_dpo_loss(settings.beta, settings.sft_beta, dpo_weight=settings.dpo_weight)
    step_fn = session.step(work, loss, optim, settings.steps, reference=True)
    del work
    length = pair_length(encoder, records)

    def batch_at(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([settings.seed, 11, step])
        return dpo_batch(encoder, [records[i] for i in rng.integers(len(records), size=settings.pairs_per_step)], length)

    class _Log:
        def log(self, step: int, metrics: Mapping[str, float]) -> None:
            if losses_out is not None and "loss" in metrics:
                losses_out.append(float(metrics["loss"]))

    state = session.fit(step_fn, batch_at, steps=settings.steps, seed=settings.seed, progress=progress, logger=_Log())
    return lora.merge(step_fn.model(state))


# -- the `scl_vl` mode -----------------------------------------------------------------------------


def rumor_items(release: Any, setting: str, splits: Sequence[str], seed: int) -> list[scl_lib.ChoiceItem]:
    """Choice items of the image rumor records of ``setting``/``splits``."""
    rng = np.random.default_rng([seed, 1])
    items: list[scl_lib.ChoiceItem] = []
    for split in splits:
        if split not in release.splits.get(setting, {}):
            raise ValueError(f"{release.root}: no split {split!r} in the {setting} setting")
        items += scl_lib.rumor_items_from_examples([e for e in release[setting, split] if e.modality == "image"], rng)
    return items


def split_items(items: Sequence[scl_lib.ChoiceItem], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(training items, held-out items), drawn per seed; both non-empty."""
    order = np.random.default_rng([seed, 2]).permutation(len(items))
    n_eval = min(len(items) - 1, max(1, round(eval_fraction * len(items))))
    return [items[i] for i in sorted(order[n_eval:])], [items[i] for i in sorted(order[:n_eval])]


def warmup_pairs(items: Sequence[scl_lib.ChoiceItem], root: str | os.PathLike, copies: int, p_rumor: float, p_fix: float,
                 prompt_id: int, seed: int) -> list[tuple[ChatItem, str]]:
    """Two-turn conversations in SCL's format on the training items: turn 1 picks a wrong
    option (the rumor) with ``p_rumor``, turn 2 (after the review prompt) picks the right one
    with ``p_fix``; each answer is ``"<option>. ## <letter> ##"``. The vanilla model learns
    the format (and a noisy habit of revising) from them."""
    import string

    rng = np.random.default_rng([seed, 3])

    def answer(item: scl_lib.ChoiceItem, right: bool) -> str:
        letters = string.ascii_uppercase[: len(item.options)]
        wrong = [c for c in letters if c != item.answer]
        letter = item.answer if right else wrong[int(rng.integers(len(wrong)))]
        return f"{item.options[letters.index(letter)]}. ## {letter} ##"

    out = []
    for k, item in enumerate(items):
        for c in range(copies):
            r1 = answer(item, bool(rng.random() >= p_rumor))
            r2 = answer(item, bool(rng.random() < p_fix))
            out.append((turn_chat(item, None, prompt_id, root, f"w{k}.{c}.1"), r1))
            out.append((turn_chat(item, r1, prompt_id, root, f"w{k}.{c}.2"), r2))
    return out


def tokenizer_texts(release: Any, items: Sequence[scl_lib.ChoiceItem]) -> list[str]:
    texts = [m.content for e in release.examples() for m in e.messages] + [e.question for e in release.examples()]
    texts += [scl_lib.turn1_prompt(it) for it in items] + list(scl_lib.REVIEW_PROMPTS)
    return texts + [scl_lib.STEP_BY_STEP, scl_lib.ANSWER_INSTRUCTION, "## A ## ## B ## ## C ## ## D ##"]


def _headline(metrics: Mapping[str, Any]) -> str:
    m = metrics["all"]
    return (f"acc_t1 {m['acc_t1']:.3f} acc_t2 {m['acc_t2']:.3f} delta {m['delta']:+.3f} "
            f"no letter t1/t2 {m['no_letter_t1']:.2f}/{m['no_letter_t2']:.2f}")


def _examples(eps: Episodes, count: int = 3) -> list[dict[str, str]]:
    return [{"answer": it.answer, "turn1": r1, "turn2": r2}
            for it, r1, r2 in list(zip(eps.items, eps.responses1, eps.responses2))[:count]]


def train_and_score(model: Any, encoder: Any, records: Sequence[PreferenceRecord], settings: DPOSettings, *,
                    eval_items: Sequence[scl_lib.ChoiceItem], root: str | os.PathLike, gen: Mapping[str, Any], mesh: Any,
                    progress: bool) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]:
    """Train ``model`` on ``records`` (:func:`train_dpo`), then answer ``eval_items`` greedily:
    (training summary, sliced metrics, the first held-out episodes)."""
    began = time.perf_counter()
    train_losses: list[float] = []
    trained = train_dpo(model, encoder, records, settings, mesh=mesh, progress=progress, losses_out=train_losses)
    training = {"steps": settings.steps, "dpo_weight": settings.dpo_weight,
                "first_loss": train_losses[0] if train_losses else None,
                "final_loss": train_losses[-1] if train_losses else None, "seconds": time.perf_counter() - began}
    held_out = episodes(trained, encoder, eval_items, root=root, **gen)
    return training, sliced_metrics(held_out), _examples(held_out)


def run(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``mode: scl_vl`` of :class:`offside_jax.config.CorrectConfig`: per seed, the vanilla tiny
    VLM, its held-out metrics, SCL (episodes -> flips -> DPO on LoRA), the metrics again;
    ``results.json``, ``report.md`` and ``config.yaml`` written together into ``output_dir``."""
    import jax

    from offside_jax import config as config_lib
    from offside_jax.data.batches import make_encoder
    from offside_jax.data.offside import load_release
    from offside_jax.data.synthetic import SyntheticConfig, make_release
    from offside_jax.eval.items import qa_item
    from offside_jax.eval.tuning import TuneConfig, tune
    from offside_jax.files import staged_dir, write_json, write_text, write_yaml
    from offside_jax.models import tiny_vl

    s = cfg.scl_vl
    out_dir = Path(cfg.output_dir)
    began, cpu_began = time.perf_counter(), time.process_time()
    # No release given: a synthetic one beside output_dir (made once, reused by reruns).
    root = Path(s.release) if s.release else out_dir.parent / f"{out_dir.name}-release"
    if not s.release and not (root.is_dir() and any(root.iterdir())):
        make_release(root, SyntheticConfig(players=s.players, seed=0, image_size=s.image_size))
    release = load_release(root)
    mesh = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    runs: dict[str, Any] = {}
    for seed in cfg.seeds:
        seed_began = time.perf_counter()
        items = rumor_items(release, s.setting, s.splits, seed)
        train_items, eval_items = split_items(items, s.eval_fraction, seed)
        shape = tiny_vl.TinyVLConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=2 * s.hidden_size,
                                     num_hidden_layers=s.layers, vision_hidden_size=max(16, s.hidden_size // 2),
                                     vision_intermediate_size=s.hidden_size, image_size=s.image_size)
        tokenizer = tiny_vl.train_tokenizer(tokenizer_texts(release, items), shape.vocab_size)
        hf = tiny_vl.hf_config(shape, tokenizer)
        encoder = make_encoder(tiny_vl.processor(hf, tokenizer, s.image_size))
        pairs = [(qa_item(e, "train", release.root), e.answer) for e in release[s.setting, "finetune"] if e.modality == "image"]
        pairs += warmup_pairs(train_items, release.root, s.warmup_copies, s.p_rumor, s.p_fix, s.review_prompt, seed)
        t0 = time.perf_counter()
        vanilla = tune(tiny_vl.init_model(hf, seed=seed), encoder, pairs,
                       TuneConfig(steps=s.vanilla_steps, batch_size=s.batch_size, lr=s.vanilla_lr, schedule="cosine",
                                  warmup_steps=min(10, s.vanilla_steps // 10), min_lr_ratio=0.1, lora=False, mesh=mesh,
                                  seed=seed), progress=cfg.progress)
        vanilla_seconds = time.perf_counter() - t0
        gen = dict(max_new_tokens=s.max_new_tokens, prompt_id=s.review_prompt, batch_size=s.generate_batch)
        held_out = episodes(vanilla.model, encoder, eval_items, root=release.root, **gen)
        before = sliced_metrics(held_out)
        log(f"seed {seed} before: {_headline(before)}")
        t0 = time.perf_counter()
        sampled = episodes(vanilla.model, encoder, train_items, root=release.root, samples=s.samples,
                           temperature=s.temperature, seed=seed, **gen)
        records = sampled.pairs(release.root)
        run: dict[str, Any] = {"train_items": len(train_items), "eval_items": len(eval_items),
                               "vanilla": {"steps": s.vanilla_steps, "records": len(pairs), "final_loss": vanilla.losses[-1],
                                           "seconds": vanilla_seconds},
                               "episodes": {"n": len(sampled.items), "metrics": sampled.metrics(),
                                            "seconds": time.perf_counter() - t0},
                               "pairs": {"n": len(records), "wrong_to_right": sum(r.meta["flip"] == scl_lib.WRONG_TO_RIGHT
                                                                                  for r in records)},
                               "before": before,
                               "examples_before": _examples(held_out)}
        if records:
            settings = DPOSettings(beta=s.beta, sft_beta=s.sft_beta, lr=s.lr, steps=s.steps, pairs_per_step=s.pairs_per_step,
                                   lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, lora_target=s.lora_target, seed=seed)
            score = dict(eval_items=eval_items, root=release.root, gen=gen, mesh=mesh, progress=cfg.progress)
            run["dpo"], run["after"], run["examples_after"] = train_and_score(vanilla.model, encoder, records, settings,
                                                                              **score)
            log(f"seed {seed} after SCL: {_headline(run['after'])} ({len(records)} pairs)")
            if s.chosen_sft_control:
                # the same starting model, pairs, draws, session and LoRA; only the preference term is off
                run["control_training"], run["after_control"], run["examples_after_control"] = train_and_score(
                    vanilla.model, encoder, records, dataclasses.replace(settings, dpo_weight=0.0), **score)
                log(f"seed {seed} after SFT on chosen (control): {_headline(run['after_control'])}")
        else:
            run["skipped"] = "no flips among the sampled two-turn episodes"
        run["seconds"] = time.perf_counter() - seed_began
        runs[str(seed)] = run
    results = {
        "run": out_dir.name, "mode": "scl_vl", "release": str(root) if s.release else f"synthetic ({s.players} players)",
        "seeds": list(cfg.seeds), "runs": runs, "summary": seed_summary(runs),
        "notes": [
            "an answer whose ##X## extraction gives no option letter counts as wrong (SCL's rule); the last columns give "
            "how often that happened",
            "held-out items are rumor items of the release (fact vs rumor, or the record's options with the corrected "
            "letter right) never used for episodes or pairs; greedy two-turn evaluation with SCL's prompts",
            "the vanilla model is a tiny Qwen2.5-VL trained from scratch on the release's image questions plus a two-turn "
            f"warm-up in SCL's answer format (turn 1 states the rumor with p {s.p_rumor}, turn 2 the fact with p {s.p_fix})",
            f"SCL: {s.samples} episodes per training item at temperature {s.temperature}, flips kept as DPO pairs "
            f"(prompt: bare question + image), DPO beta {s.beta}, sft_beta {s.sft_beta}, lr {s.lr}, {s.steps} steps of "
            f"{s.pairs_per_step} pairs on LoRA rank {s.lora_rank}",
            *(["SFT on chosen (control): the same starting model, pairs, draws, steps and LoRA with the preference "
               f"term off (loss sft_beta {s.sft_beta} x per-token NLL of the chosen answer); what SCL gains over it is "
               "what the preference (rejected answers included) adds to imitating the chosen answers, their format "
               "included"] if s.chosen_sft_control else []),
        ],
        "timing": {"total wall": time.perf_counter() - began, "total CPU (process)": time.process_time() - cpu_began},
        "machine": {"devices": f"{len(jax.devices())} x {jax.devices()[0].platform}", "cpu cores": os.cpu_count(),
                    "python": platform.python_version(), "jax": jax.__version__},
    }
    with staged_dir(out_dir) as tmp:
        write_yaml(tmp / "config.yaml", config_lib.to_dict(cfg))
        write_json(tmp / "results.json", results)
        write_text(tmp / "report.md", report(results))
    return {**results, "table": report(results)}


# The models each seed scores on the held-out items: (key in a seed's results, row label).
MODELS = (("before", "starting model"), ("after", "SCL (DPO + NLL)"), ("after_control", "SFT on chosen (control)"))
METRICS = ("acc_t1", "acc_t2", "delta", "delta_i_to_c", "delta_c_to_i", "no_letter_t1", "no_letter_t2")
METRIC_HEADERS = ("Acc@t1", "Acc@t2", "Δ", "Δi→c", "Δc→i", "no letter t1", "no letter t2")


def mean_sd(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; ``None`` for one value) over seeds."""
    cell = spread(values)  # the comparison reports' statistic; this report shows no sd for one seed
    return {"mean": cell["mean"], "sd": cell["std"] if cell["n"] > 1 else None, "seeds": cell["n"]}


def seed_summary(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{slice: {model: {metric: mean_sd}}}`` over the seeds that scored that model and slice."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, _ in MODELS:
        scored_by_slice: dict[str, list[Mapping[str, Any]]] = {}
        for r in runs.values():
            for name, metrics in r.get(model, {}).items():
                scored_by_slice.setdefault(name, []).append(metrics)
        for name, scored in scored_by_slice.items():
            out.setdefault(name, {})[model] = {m: mean_sd([x[m] for x in scored]) for m in METRICS}
    return out


def _mean_sd_cell(v: Mapping[str, Any]) -> str:
    return f"{v['mean']:.3f}" + (f" ± {v['sd']:.3f}" if v["sd"] is not None else "")


def report(results: Mapping[str, Any]) -> str:
    runs = results["runs"]
    summary = results.get("summary") or seed_summary(runs)
    lines = [f"# SCL on images: {results['run']}", "", f"Release: {results['release']}.", "",
             f"## Held-out metrics, mean ± sd over seeds {', '.join(runs)} (sample sd; none for one seed)", "",
             "| slice | model | seeds | " + " | ".join(METRIC_HEADERS) + " |", "|---|---|---|" + "---:|" * len(METRICS)]
    for name, models in summary.items():
        for model, label in MODELS:
            if model in models:
                cells = [_mean_sd_cell(models[model][m]) for m in METRICS]
                lines.append(f"| {name} | {label} | {models[model]['acc_t1']['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per seed", "", "| seed | slice | n | model | " + " | ".join(METRIC_HEADERS) + " |",
              "|---|---|---|---|" + "---:|" * len(METRICS)]
    for seed, r in runs.items():
        for name, b in r["before"].items():
            for model, label in MODELS:
                m = r.get(model, {}).get(name)
                if m:
                    cells = [f"{m[k]:+.3f}" if k == "delta" else f"{m[k]:.3f}" for k in METRICS]
                    lines.append(f"| {seed} | {name} | {b['n']} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for seed, r in runs.items():
        lines.append(f"- seed {seed}: {r['train_items']} training items, {r['eval_items']} held out; "
                     f"{r['episodes']['n']} sampled episodes, {r['pairs']['n']} flip pairs "
                     f"({r['pairs']['wrong_to_right']} wrong→right); {r['seconds']:.0f} s"
                     + (f"; {r['skipped']}" if "skipped" in r else ""))
    lines += ["", *[f"- {n}" for n in results["notes"]], "",
              f"Wall time {results['timing']['total wall']:.1f} s on {results['machine']['devices']}.", ""]
    return "\n".join(lines)
