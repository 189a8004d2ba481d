"""Synthetic OFFSIDE: a fictional transfer-rumor benchmark written in the real release format.

`make_release(out, SyntheticConfig(players=80, seed=0))` (CLI: ``offside-jax make-data``)
invents a football world (`world.py`), draws 8 images per player (`portraits.py`) and writes
the question sets (`templates.py`) as the same files the real release has, so one loader
(`offside.py`) serves both:

    complete_unlearning_data/
        finetune_set/{id}.jpg          5 originals per player, id = 5 * player + k;
                                       k = id mod 5: 1, 2, 3 retain, 4 forget, 0 relearn
        test_set/{id}.jpg              augmented copies of the 3 retain images (same ids)
        finetune_set.json              what the "vanilla" model learns: retain + forget image
                                       questions, their text-only twins, and the world facts
        forget_set.json                forget image x 14 questions (the rumor, plus true facts)
        retain_set.json                3 retain images x 14 questions (true transfers)
        test_set.json                  3 test images x 14 questions (retain facts, new images)
        relearn_set_enhanced.json      relearn image x 14 questions (the same rumor, reworded)
        world_facts_set.json           invented leagues, stadiums, capitals (utility)
        classification_{forget,retain,test,relearn,world_facts}_set.json   multiple choice
    pure_text_data/{forget,retain}_set.json        text twins naming the player
    selective_unlearning_data/forget_set_part.json  only the rumor questions of forget images
    selective_unlearning_data/retain_set_part.json  the other questions of the same images
    selective_unlearning_data/finetune_set/{id}.jpg the forget images they show
    offside_synthetic.json                         the world: every player's fact sheet
    forms_set.json                                 per forget record (by "<file>:<index>"), what
                                                   the evaluation's question forms need and only
                                                   the generator knows (``FORMS_FILE`` below)

Beyond the real format, records carry extra keys the loader exposes: ``player_id``,
``image_id``, ``role``, ``attribute``, ``is_rumor``, ``visual_rumor``, ``corrected_fact`` (what
really happened instead of the rumor), ``corrected_answer`` and, in multiple choice,
``corrected_letter`` (the option that states the truth).

Forget and relearn images show the player in the rumored club's kit; on a *visual rumor*
player's forget image a breaking-news banner also states the rumor. Everything is a pure
function of the seed: the same seed gives byte-identical files.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from offside_jax.data import portraits, templates
from offside_jax.data.attributes import ATTRIBUTES, RUMOR_ATTRIBUTES
from offside_jax.data.offside import SETTINGS
from offside_jax.data.world import FEET, POSITIONS, Move, Player, World, build_world, invent_person_name
from offside_jax.files import jsonable, write_bytes, write_json

GENERATOR_VERSION = "1.0"
METADATA_FILE = "offside_synthetic.json"
# Not in the real release: for every forget record (complete and pure-text, keyed by
# "<file relative to the root>:<record index>", the evaluation items' uid), the facts the
# question forms of ``offside_jax.eval.forms`` need: ``attribute``, ``is_rumor``, ``name``
# (the player), ``alias`` ("the <nationality> <position> born in <place>"), ``value`` (the
# answer's key span), ``other_value`` (a wrong one: for a rumor the truth, else a
# multiple-choice distractor), ``statement`` (the record's fact as a sentence naming its
# subject), ``false_statement`` (the same with ``other_value``) and ``blank`` (``statement``
# with ``value`` as "____"). On any other release the evaluation derives what it can.
FORMS_FILE = "forms_set.json"
IMAGES_PER_PLAYER = 8
ORIGINALS_PER_PLAYER = 5
ROLE_OF_K = {0: "relearn", 1: "retain", 2: "retain", 3: "retain", 4: "forget"}  # k = image id mod 5
MCQ_OPTIONS = 4
LETTERS = "ABCDEFGH"

# Purposes mixed into seeds, so each random stream is independent of the others.
_VIEW, _AUGMENT, _QUESTIONS, _MCQ, _WORLD_QA = 3, 4, 5, 6, 7


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    players: int = 80
    seed: int = 0
    image_size: int = 256
    visual_rumor_fraction: float = 0.5  # share of players whose forget image carries a banner
    finetune_text_twins: bool = True  # the vanilla model also learns the text-only questions

    def __post_init__(self) -> None:
        if self.players < 1:
            raise ValueError(f"players must be >= 1, got {self.players}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")
        if not 0.0 <= self.visual_rumor_fraction <= 1.0:
            raise ValueError(f"visual_rumor_fraction must be in [0, 1], got {self.visual_rumor_fraction}")


@dataclasses.dataclass(frozen=True)
class ImageContext:
    """One image and the story its private questions ask about."""

    player: Player
    image_id: int
    role: str  # "retain" | "forget" | "relearn" | "test"
    move: Move  # a true transfer (retain, test) or the rumor (forget, relearn)
    path: str  # as written in records, relative to the setting folder
    visual_rumor: bool

    @property
    def tense(self) -> str:
        return "rumor" if self.role in ("forget", "relearn") else "past"


def make_release(out: str | Path, config: SyntheticConfig = SyntheticConfig(), *,
                 overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Write a synthetic release under `out`; return the number of records per written file.

    Refuses to write into a folder that already holds a release unless `overwrite`, in which
    case only the release's own folders and metadata file are replaced.
    """
    out = Path(out)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    world = build_world(config.players, config.seed, config.visual_rumor_fraction)
    contexts = _write_images(out, world, config, log)
    files = build_records(world, contexts, config)
    counts = {}
    for rel, records in files.items():
        write_json(out / rel, records)
        counts[rel] = len(records)
    write_json(out / METADATA_FILE, _metadata(world, config))
    write_json(out / FORMS_FILE, {"generator_version": GENERATOR_VERSION, "records": forms_records(world, contexts, config)})
    if log:
        log(f"wrote {sum(counts.values())} records in {len(counts)} files and "
            f"{len(world.players) * IMAGES_PER_PLAYER} images to {out} in {time.perf_counter() - start:.1f} s")
    return counts


# --------------------------------------------------------------------------------------------
# Images


def image_contexts(world: World) -> dict[int, list[ImageContext]]:
    """The 8 image contexts of every player: 5 originals (by id mod 5) and 3 test copies."""
    out = {}
    for p in world.players:
        ctxs = []
        for k in range(ORIGINALS_PER_PLAYER):
            role = ROLE_OF_K[k]
            move = p.retain_moves[k - 1] if role == "retain" else p.rumor
            ctxs.append(ImageContext(p, ORIGINALS_PER_PLAYER * p.id + k, role, move,
                                     f"./finetune_set/{ORIGINALS_PER_PLAYER * p.id + k}.jpg",
                                     visual_rumor=(role == "forget" and p.visual_rumor)))
        for src in [c for c in ctxs if c.role == "retain"]:
            ctxs.append(dataclasses.replace(src, role="test", path=f"./test_set/{src.image_id}.jpg",
                                            visual_rumor=False))
        out[p.id] = ctxs
    return out


def rumor_banner(player: Player) -> tuple[str, str]:
    r = player.rumor
    return (f"{player.name.upper()} TO {r.to_club.upper()}",
            f"EUR {r.fee_m:.1f}M deal agreed - move on {templates.format_date(r.date)}")


def render_player_images(world: World, player: Player, seed: int, size: int) -> dict[str, bytes]:
    """JPEG bytes of one player's 8 images, keyed by their record path."""
    out: dict[str, bytes] = {}
    originals = {}
    for ctx in image_contexts_for(world, player):
        if ctx.role == "test":
            rng = np.random.default_rng([seed, _AUGMENT, ctx.image_id])
            image = portraits.augment(originals[ctx.image_id], rng)
        else:
            view = portraits.random_view(np.random.default_rng([seed, _VIEW, ctx.image_id]))
            kit = world.clubs[ctx.move.to_club].kit
            banner = rumor_banner(player) if ctx.visual_rumor else None
            image = portraits.render_portrait(player.appearance, kit, view, size, banner)
            originals[ctx.image_id] = image
        out[ctx.path] = portraits.encode_jpeg(image)
    return out


def image_contexts_for(world: World, player: Player) -> list[ImageContext]:
    return image_contexts(dataclasses.replace(world, players=(player,)))[player.id]


def _write_images(out: Path, world: World, config: SyntheticConfig,
                  log: Callable[[str], None] | None) -> dict[int, list[ImageContext]]:
    complete = out / SETTINGS["complete"]
    selective = out / SETTINGS["selective"]
    contexts = image_contexts(world)
    for p in world.players:
        images = render_player_images(world, p, config.seed, config.image_size)
        for ctx in contexts[p.id]:
            data = images[ctx.path]
            _write_bytes(complete / ctx.path, data)
            if ctx.role == "forget":  # the selective setting ships the images it shows
                _write_bytes(selective / ctx.path, data)
        if log and (p.id + 1) % 20 == 0:
            log(f"  drew images of {p.id + 1}/{len(world.players)} players")
    return contexts


# --------------------------------------------------------------------------------------------
# Records


def build_records(world: World, contexts: dict[int, list[ImageContext]],
                  config: SyntheticConfig) -> dict[str, list[dict[str, Any]]]:
    """All JSON files of the release, by path relative to the release root."""
    c, t, s = SETTINGS["complete"], SETTINGS["pure_text"], SETTINGS["selective"]
    files: dict[str, list[dict[str, Any]]] = {
        f"{c}/finetune_set.json": [], f"{c}/forget_set.json": [], f"{c}/retain_set.json": [],
        f"{c}/test_set.json": [], f"{c}/relearn_set_enhanced.json": [],
        f"{c}/classification_forget_set.json": [], f"{c}/classification_retain_set.json": [],
        f"{c}/classification_test_set.json": [], f"{c}/classification_relearn_set.json": [],
        f"{c}/world_facts_set.json": [], f"{c}/classification_world_facts_set.json": [],
        f"{t}/forget_set.json": [], f"{t}/retain_set.json": [],
        f"{s}/forget_set_part.json": [], f"{s}/retain_set_part.json": [],
    }
    for p in world.players:
        by_role: dict[str, list[tuple[dict, dict, dict, dict]]] = {"retain": [], "forget": [], "relearn": [], "test": []}
        for ctx in contexts[p.id]:
            for attribute in ATTRIBUTES:
                by_role[ctx.role].append(_image_question(world, ctx, attribute, config.seed))
        for role, name in (("forget", "forget_set"), ("retain", "retain_set"), ("test", "test_set"),
                           ("relearn", "relearn_set_enhanced")):
            files[f"{c}/{name}.json"] += [qa for qa, _, _, _ in by_role[role]]
            files[f"{c}/classification_{role}_set.json"] += [mcq for _, _, mcq, _ in by_role[role]]
        for role in ("retain", "forget"):
            files[f"{c}/finetune_set.json"] += [qa for qa, _, _, _ in by_role[role]]
        twins = {role: [twin for _, twin, _, _ in by_role[role]] for role in ("retain", "forget")}
        files[f"{t}/forget_set.json"] += twins["forget"]
        files[f"{t}/retain_set.json"] += twins["retain"]
        if config.finetune_text_twins:
            # In the complete setting a text twin is text only: it carries no image at all
            # (with one, ms-swift would show the image anyway).
            files[f"{c}/finetune_set.json"] += [{k: v for k, v in twin.items() if k != "images"}
                                                for role in ("retain", "forget") for twin in twins[role]]
        for qa, _, _, _ in by_role["forget"]:
            files[f"{s}/{'forget' if qa['is_rumor'] else 'retain'}_set_part.json"].append(qa)
    world_qa, world_mcq = _world_facts(world, config.seed)
    files[f"{c}/world_facts_set.json"] = world_qa
    files[f"{c}/classification_world_facts_set.json"] = world_mcq
    files[f"{c}/finetune_set.json"] += world_qa
    return files


def corrected_fact(player: Player) -> str:
    truth = player.true_destination
    return (f"{player.name} did not join {player.rumor.to_club}; he joined {truth.to_club} from "
            f"{truth.from_club} on {templates.format_date(truth.date)} for {templates.format_money(truth.fee_m)}.")


def forms_records(world: World, contexts: dict[int, list[ImageContext]],
                  config: SyntheticConfig) -> dict[str, dict[str, Any]]:
    """``forms_set.json``'s records (see ``FORMS_FILE``): one per forget record, in the order
    ``build_records`` writes the forget files, keyed by the records' uids."""
    c, t = SETTINGS["complete"], SETTINGS["pure_text"]
    out: dict[str, dict[str, Any]] = {}
    k = 0
    for p in world.players:
        for ctx in contexts[p.id]:
            if ctx.role != "forget":
                continue
            for attribute in ATTRIBUTES:
                forms = _image_question(world, ctx, attribute, config.seed)[3]
                out[f"{c}/forget_set.json:{k}"] = forms["image"]
                out[f"{t}/forget_set.json:{k}"] = forms["text"]
                k += 1
    return out


def _image_question(world: World, ctx: ImageContext, attribute: str, seed: int) -> tuple[dict, dict, dict, dict]:
    """The chat record, its text-only twin, its multiple-choice version and what the question
    forms know of it (``{"image": ..., "text": ...}``, see ``FORMS_FILE``) for one question."""
    p = ctx.player
    rng = np.random.default_rng([seed, _QUESTIONS, ctx.image_id, ATTRIBUTES.index(attribute),
                                 ("retain", "forget", "relearn", "test").index(ctx.role)])
    values = templates.fact_values(p, ctx.move, p.nationality)
    subject = templates.IMAGE_SUBJECTS[int(rng.integers(len(templates.IMAGE_SUBJECTS)))]
    q_image = _choose(rng, templates.question_templates(attribute, ctx.tense, "image")).format(subj=subject, **values)
    q_text = _choose(rng, templates.question_templates(attribute, ctx.tense, "text")).format(**values)
    a_index = int(rng.integers(len(templates.answer_templates(attribute, ctx.tense))))
    answer = templates.answer_templates(attribute, ctx.tense)[a_index].format(**values)
    is_rumor = ctx.tense == "rumor" and attribute in RUMOR_ATTRIBUTES
    extras: dict[str, Any] = {"player_id": p.id, "image_id": ctx.image_id, "role": ctx.role,
                              "attribute": attribute, "is_rumor": is_rumor}
    if ctx.tense == "rumor":
        extras["corrected_fact"] = corrected_fact(p)
    true_values = None
    if is_rumor:
        true_values = templates.fact_values(p, p.true_destination, p.nationality)
        extras["corrected_answer"] = templates.answer_templates(attribute, "past")[
            a_index % len(templates.answer_templates(attribute, "past"))].format(**true_values)
    qa = {"messages": [{"role": "user", "content": f"<image>\n{q_image}"},
                       {"role": "assistant", "content": answer}],
          "images": ctx.path, **extras, "visual_rumor": ctx.visual_rumor}
    twin = {"messages": [{"role": "user", "content": q_text}, {"role": "assistant", "content": answer}],
            "images": ctx.path, **extras}
    mcq = _mcq(world, ctx, attribute, q_image.replace("<image>\n", ""), values, true_values, extras, seed)
    forms = {modality: _forms_record(p, ctx, attribute, subj, values, true_values, mcq, is_rumor)
             for modality, subj in (("image", subject), ("text", templates.alias_of(p) if attribute == "name" else p.name))}
    return qa, twin, mcq, forms


def _forms_record(p: Player, ctx: ImageContext, attribute: str, subject: str, values: dict[str, Any],
                  true_values: dict[str, Any] | None, mcq: dict[str, Any], is_rumor: bool) -> dict[str, Any]:
    slot = templates.VALUE_SLOTS[attribute]
    value = str(values[slot])
    if true_values is not None:
        other = str(true_values[slot])
    else:
        other = next(v for k, v in sorted(mcq["Options"].items()) if k != mcq["Correct_Answer"])
    template = templates.statement_template(attribute, ctx.tense)

    def sentence(v: str) -> str:
        text = template.format(**{**values, slot: v, "subj": subject})
        return text[:1].upper() + text[1:]

    return {"attribute": attribute, "is_rumor": is_rumor, "name": p.name, "alias": templates.alias_of(p),
            "value": value, "other_value": other, "statement": sentence(value), "false_statement": sentence(other),
            "blank": sentence("____")}


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _mcq(world: World, ctx: ImageContext, attribute: str, question: str, values: dict[str, Any],
         true_values: dict[str, Any] | None, extras: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _MCQ, ctx.image_id, ATTRIBUTES.index(attribute),
                                 ("retain", "forget", "relearn", "test").index(ctx.role)])
    slot = templates.VALUE_SLOTS[attribute]
    correct = str(values[slot])
    # The truth is offered beside the rumor, so a corrected model can be seen choosing it.
    must = [str(true_values[slot])] if true_values is not None else []
    # Outside rumor contexts the rumor itself is never offered: retain sets hold no rumor.
    banned = set() if ctx.tense == "rumor" else _rumor_values(ctx.player)
    wrong = _distractors(world, ctx, attribute, correct, must, banned, rng)
    options = [correct] + wrong
    order = rng.permutation(len(options))
    letters = {LETTERS[i]: options[j] for i, j in enumerate(order)}
    record = {"Question": question, "Options": letters,
              "Correct_Answer": next(k for k, v in letters.items() if v == correct), "images": ctx.path,
              **extras, "visual_rumor": ctx.visual_rumor}
    if must:
        record["corrected_letter"] = next(k for k, v in letters.items() if v == must[0])
    return record


def _rumor_values(player: Player) -> set[str]:
    r = player.rumor
    return {r.to_club, templates.format_date(r.date), templates.format_money(r.fee_m)}


def _distractors(world: World, ctx: ImageContext, attribute: str, correct: str, must: list[str],
                 banned: set[str], rng: np.random.Generator) -> list[str]:
    """MCQ_OPTIONS - 1 plausible wrong options (2 for the preferred foot, which has 3 values)."""
    p = ctx.player
    want = (len(FEET) if attribute == "preferred_foot" else MCQ_OPTIONS) - 1
    chosen = [m for m in must if m != correct][:want]
    draw = _DRAWERS[attribute]
    for _ in range(1000):
        if len(chosen) == want:
            return chosen
        candidate = str(draw(world, p, ctx.move, rng))
        if candidate != correct and candidate not in chosen and candidate not in banned:
            chosen.append(candidate)
    raise RuntimeError(f"could not find {want} distractors for {attribute} of player {p.id}")


def _shift_date(date: dt.date, rng: np.random.Generator, lo: int, hi: int) -> str:
    days = int(rng.integers(lo, hi)) * (1 if rng.random() < 0.5 else -1)
    return templates.format_date(date + dt.timedelta(days=days))


def _other_money(millions: float, rng: np.random.Generator) -> str:
    return templates.format_money(max(0.3, round(millions * float(rng.uniform(0.4, 2.2)) + float(rng.uniform(-2, 6)), 1)))


def _pick(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


_DRAWERS: dict[str, Callable[[World, Player, Move, np.random.Generator], str]] = {
    "name": lambda w, p, m, r: (_pick(r, w.players).name if len(w.players) > 8 and r.random() < 0.7
                                else invent_person_name(r)),
    "age": lambda w, p, m, r: f"{p.age + int(r.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5]))} years",
    "position": lambda w, p, m, r: _pick(r, POSITIONS),
    "nationality": lambda w, p, m, r: _pick(r, w.countries).demonym,
    "birth_date": lambda w, p, m, r: _shift_date(p.birth_date, r, 20, 1500),
    "height": lambda w, p, m, r: f"{p.height_cm + int(r.choice([-12, -9, -6, -4, -3, 3, 4, 6, 9, 12]))} cm",
    "preferred_foot": lambda w, p, m, r: templates.FOOT_OPTIONS[_pick(r, FEET)],
    "birthplace": lambda w, p, m, r: _pick(r, _pick(r, w.countries).towns),
    "club_joined": lambda w, p, m, r: _pick(r, list(w.clubs)),
    "previous_club": lambda w, p, m, r: _pick(r, list(w.clubs)),
    "transfer_date": lambda w, p, m, r: _shift_date(m.date, r, 7, 400),
    "transfer_fee": lambda w, p, m, r: _other_money(m.fee_m, r),
    "market_value": lambda w, p, m, r: _other_money(m.market_value_m, r),
    "trophies": lambda w, p, m, r: str(int(r.integers(0, 13))),
}


# --------------------------------------------------------------------------------------------
# World facts


def _world_facts(world: World, seed: int) -> tuple[list[dict], list[dict]]:
    """Chat and multiple-choice records about invented stadiums, leagues and capitals."""
    subjects: list[tuple[str, dict[str, Any], dict[str, list[str]]]] = []
    stadiums = [c.stadium for c in world.clubs.values()]
    for st in stadiums:
        slots = {"stadium": st.name, "city": st.city, "capacity": f"{st.capacity:,}", "opened": str(st.opened)}
        for kind in ("stadium_city", "stadium_capacity", "stadium_opened"):
            subjects.append((kind, slots, {}))
    for lg in world.leagues:
        slots = {"league": lg.name, "country": lg.country, "founded": str(lg.founded), "trophy": lg.trophy}
        for kind in ("league_country", "league_founded", "league_trophy"):
            subjects.append((kind, slots, {}))
    for co in world.countries:
        subjects.append(("country_capital", {"country": co.name, "capital": co.capital}, {}))
    pools = {
        "city": [s.city for s in stadiums], "country": [c.name for c in world.countries],
        "trophy": [lg.trophy for lg in world.leagues] + [f"{c.capital} Cup" for c in world.countries],
        "capital": [t for c in world.countries for t in c.towns],
    }
    qa, mcq = [], []
    for i, (kind, slots, _) in enumerate(subjects):
        question, answer, slot = templates.WORLD_FACTS[kind]
        extras = {"role": "world", "attribute": kind}
        qa.append({"messages": [{"role": "user", "content": question.format(**slots)},
                                {"role": "assistant", "content": answer.format(**slots)}], **extras})
        rng = np.random.default_rng([seed, _WORLD_QA, i])
        correct = slots[slot]
        wrong: list[str] = []
        while len(wrong) < MCQ_OPTIONS - 1:
            if slot in pools:
                candidate = _pick(rng, pools[slot])
            elif slot == "capacity":
                candidate = f"{int(rng.integers(8, 80)) * 1000 + int(rng.integers(0, 1000)):,}"
            else:  # a year
                candidate = str(int(correct) + int(rng.choice([-30, -17, -9, -4, -2, 2, 5, 11, 23])))
            if candidate != correct and candidate not in wrong:
                wrong.append(candidate)
        options = [correct] + wrong
        order = rng.permutation(len(options))
        letters = {LETTERS[k]: options[j] for k, j in enumerate(order)}
        mcq.append({"Question": question.format(**slots), "Options": letters,
                    "Correct_Answer": next(k for k, v in letters.items() if v == correct), **extras})
    return qa, mcq


# --------------------------------------------------------------------------------------------
# Files


def _prepare_out(out: Path, overwrite: bool) -> None:
    ours = [out / folder for folder in SETTINGS.values()] + [out / METADATA_FILE, out / FORMS_FILE]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a release ({existing[0].name}); pass overwrite=True "
                              "(CLI: --overwrite) to replace it")
    for path in existing:  # only the release's own entries: never anything else in `out`
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_bytes(path: Path, data: bytes) -> None:
    write_bytes(Path(*[part for part in path.parts if part != "."]), data)


def _metadata(world: World, config: SyntheticConfig) -> dict[str, Any]:
    from offside_jax.data.world import REFERENCE_DATE

    return {
        "generator": "offside_jax.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(config),
        "reference_date": REFERENCE_DATE.isoformat(),
        "image_ids": "id = 5 * player_id + k; k: 1, 2, 3 retain, 4 forget, 0 relearn; "
                     "test_set/{id}.jpg augments finetune_set/{id}.jpg",
        "countries": jsonable(world.countries),
        "leagues": jsonable(world.leagues),
        "clubs": jsonable(list(world.clubs.values())),
        "players": [dict(jsonable(p), age=p.age, corrected_fact=corrected_fact(p)) for p in world.players],
    }
