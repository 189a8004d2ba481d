"""The OFFSIDE benchmark pipeline: data, reference models, unlearning methods, evaluation,
attacks, corrective relearning and the report, from one config.

    cfg = load_benchmark_config("configs/demo.yaml", ["methods=[ga,npo]"])
    results = run_benchmark(cfg)          # writes cfg.output_dir/{report.md, results.json, plots/, ...}

Stages (each reports its time; models are cached on disk and reused when their recipe is
unchanged):

1. **data**: a synthetic release (``offside-jax make-data``) or an existing one;
2. **vanilla**: a model that learned the facts *and* the rumors: a tiny Qwen2.5-VL trained
   from scratch, or a pretrained model (e.g. SmolLM2 from its GGUF) fine-tuned with LoRA;
3. **retain-only twin**: the same recipe without the forget records, the gold standard for
   forget quality (TOFU's KS test) and what "never learned it" looks like;
4. **methods**: each unlearning method from the vanilla model through
   ``offside_jax.unlearn.run.run_unlearning`` (LoRA for the loss methods; SSD on the weights);
5. **evaluation** of every model on every test set (``eval.suite``), the **attacks**
   (``eval.attacks``) and **corrective relearning** (``correct.relearn``) on the methods;
6. **report**: ``results.json``, ``report.md`` and plots (``eval.report``), with the resolved
   config beside them (``config.yaml``).

Output layout::

    output_dir/config.yaml  results.json  report.md  plots/*.png
    work_dir/data/                       the generated release (work_dir defaults to output_dir)
    work_dir/models/<name>-<digest>/     vanilla, retain_only (and their shared retain_first
                                         start): HF safetensors + tokenizer + recipe.json
    output_dir/<model>/eval/             suite outputs (results.json, examples/*.jsonl)
    output_dir/<method>/unlearn/         the unlearning run (config, logs, summary)
    output_dir/<method>/attacks/<attack>/, output_dir/<method>/correction/
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offside_jax import config as config_lib
from offside_jax.config import ConfigError, DistributedConfig, LoRAConfig, UnlearnMethodsConfig
from offside_jax.correct.relearn import CorrectionConfig
from offside_jax.eval.attacks import AttackConfig
from offside_jax.eval.suite import SuiteConfig
from offside_jax.eval.tuning import TuneConfig
from offside_jax.models.tiny_vl import TinyVLConfig
from offside_jax.chat_demo import resolve_gguf
from offside_jax.train import distributed

MODEL_SOURCES = ("tiny_vl", "gguf", "hf")  # of the one vocabulary, offside_jax.config.MODEL_SOURCES


@dataclasses.dataclass
class DataSection:
    """The release: an existing directory, or a synthetic one generated into output_dir/data."""

    release: str | None = None
    players: int = 20
    image_size: int = 112
    visual_rumor_fraction: float = 0.5
    seed: int = 0


@dataclasses.dataclass
class ModelSection:
    """``tiny_vl``: a Qwen2.5-VL of the ``tiny`` shape trained from scratch; ``gguf``: a GGUF
    file (``path: smollm2`` = the packaged SmolLM2-135M-Instruct); ``hf``: a checkpoint dir."""

    source: str = "tiny_vl"
    path: str | None = None
    tiny: TinyVLConfig = dataclasses.field(default_factory=TinyVLConfig)


@dataclasses.dataclass
class VanillaSection:
    """How the reference models learn the release. ``records`` are ``setting/split`` names,
    optionally ``:image`` / ``:text`` to keep one modality; multiple-choice splits teach the
    letter answer. The retain-only twin uses the same records minus the forget records."""

    records: list[str] = dataclasses.field(default_factory=lambda: ["complete/finetune:image", "complete/world_facts"])
    tune: TuneConfig = dataclasses.field(default_factory=lambda: TuneConfig(
        steps=600, batch_size=32, lr=5e-3, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, lora=False))
    retain_only: bool = True
    # Steps on the records without the forget set before ``tune`` (same settings otherwise),
    # shared by the vanilla model and its retain-only twin: both then continue for
    # ``tune.steps``, the vanilla model on every record, the twin on the same records as
    # before. The twin still never sees a forget record; the shared start saves time.
    retain_first_steps: int = 0


@dataclasses.dataclass
class UnlearnSection:
    """Shared settings of every method's run (``offside_jax.config.UnlearnConfig`` fields)."""

    setting: str = "multimodal"  # multimodal | unimodal | selective
    forget_attributes: list[str] = dataclasses.field(default_factory=list)
    steps: int = 30
    lr: float = 1e-3
    forget_batch_size: int = 8
    retain_ratio: int | None = 1  # None: each method's own (OFFSIDE's offside_* methods: 3)
    lora: LoRAConfig = dataclasses.field(default_factory=lambda: LoRAConfig(
        enabled=True, target=r"(q|k|v|o|gate|up|down)_proj", rank=8, alpha=32.0))
    methods: UnlearnMethodsConfig = dataclasses.field(default_factory=UnlearnMethodsConfig)


@dataclasses.dataclass
class VariantSection:
    """A named run of one method with some shared settings changed (``None``: unchanged),
    e.g. ``npo_text: {method: npo, setting: unimodal}`` or ``ga_60: {method: ga, steps: 60}``."""

    method: str = "ga"
    setting: str | None = None
    forget_attributes: list[str] | None = None
    steps: int | None = None
    lr: float | None = None
    identified_fraction: float | None = None


@dataclasses.dataclass
class BenchmarkConfig:
    run: str = "benchmark"
    output_dir: str = "results/benchmark"
    description: str = ""
    seed: int = 0
    data: DataSection = dataclasses.field(default_factory=DataSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    modality: str = "image"  # the prompts every model is evaluated with: image | text
    vanilla: VanillaSection = dataclasses.field(default_factory=VanillaSection)
    # Unlearning runs, by method name or by the name of a variant below.
    methods: list[str] = dataclasses.field(default_factory=lambda: ["ga", "grad_diff", "kl", "npo", "simnpo", "idk", "ssd"])
    unlearn: UnlearnSection = dataclasses.field(default_factory=UnlearnSection)
    variants: dict[str, VariantSection] = dataclasses.field(default_factory=dict)
    suite: SuiteConfig = dataclasses.field(default_factory=SuiteConfig)
    attacks: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    attack_methods: list[str] | None = None  # None: every method; []: no attacks
    # Also run the prompt attacks and quantization on the vanilla model: what each rewritten
    # prompt gets from a model that never unlearned (a small model may simply not understand it).
    attack_vanilla: bool = True
    correction: CorrectionConfig = dataclasses.field(default_factory=CorrectionConfig)
    correction_methods: list[str] = dataclasses.field(default_factory=list)
    # Where the generated release and the trained reference models live (default: output_dir).
    # Runs that share it share data and models: the findings configs reuse the demo's.
    work_dir: str | None = None
    reuse_models: bool = True  # reuse work_dir/models/<name>-<recipe digest> when present
    # JAX's persistent compilation cache: programs compiled once (e.g. the same relearning
    # step for every method) are loaded, not recompiled. None: output_dir/.jax_cache; "": off.
    compile_cache: str | None = None
    progress: bool = True
    # Several processes (a TPU slice, GPU hosts): every stage runs on a mesh over all of them;
    # process 0 writes the data, models, evaluation outputs and the report.
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


def load_benchmark_config(path: str | Path | None, overrides: Sequence[str] = ()) -> BenchmarkConfig:
    """A :class:`BenchmarkConfig` from YAML + ``key=value`` overrides (errors name the key).

    A file may start from another one with ``base: <path>`` (relative to the file): its own
    keys then change the base's, e.g. the findings configs are the demo's with a few changes.
    """
    path, layered = _resolve_base(Path(path) if path else None)
    cfg = config_lib.load_config(path, [*layered, *overrides], schema=BenchmarkConfig)
    if cfg.model.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source {cfg.model.source!r} is not one of {', '.join(MODEL_SOURCES)}")
    if cfg.modality not in ("image", "text"):
        raise ConfigError(f"modality {cfg.modality!r} must be image or text")
    if cfg.model.source == "tiny_vl" and cfg.modality != "image" and "image" in cfg.suite.modalities:
        raise ConfigError("modality text with a vision-language model: set suite.modalities=[text] too")
    known = _method_names()
    bad_variants = {n: v.method for n, v in cfg.variants.items() if v.method not in known}
    if bad_variants:
        raise ConfigError(f"variants {bad_variants}: method must be one of {', '.join(known)}")
    unknown = [m for m in cfg.methods if m not in known and m not in cfg.variants]
    if unknown:
        raise ConfigError(f"methods {unknown} are neither unlearning methods ({', '.join(known)}) nor variants "
                          f"({', '.join(cfg.variants) or 'none defined'})")
    if len(set(cfg.methods)) != len(cfg.methods) or set(cfg.methods) & {"vanilla", "retain_only", "retain_first"}:
        raise ConfigError(f"methods {cfg.methods}: names must be unique and not vanilla / retain_only / retain_first")
    for field, names in (("attack_methods", cfg.attack_methods or []), ("correction_methods", cfg.correction_methods)):
        missing = [m for m in names if m not in cfg.methods]
        if missing:
            raise ConfigError(f"{field} {missing} are not in methods {cfg.methods}")
    return cfg


def _resolve_base(path: Path | None, seen: tuple[Path, ...] = ()) -> tuple[Path | None, list[str]]:
    """(the root config file, the dotted overrides that the files based on it add, in order)."""
    if path is None:
        return None, []
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as e:  # yaml errors carry their own line numbers
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "base" not in data:
        return path, []
    base = (path.parent / str(data.pop("base"))).resolve()
    if base in seen:
        raise ConfigError(f"{path}: 'base' makes a cycle through {base}")
    config_lib.check_known_keys(BenchmarkConfig, data, str(path))
    root, layered = _resolve_base(base, (*seen, path.resolve()))
    return root, layered + [f"{key}={json.dumps(value)}" for key, value in _flatten(data)]


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted leaf keys; a mapping that is a field's value (a dict-typed field) stays whole."""
    out = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _is_dict_field(dotted):
            out += _flatten(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def _is_dict_field(dotted: str) -> bool:
    """Whether the schema types this key as a dict (its YAML mapping is one value)."""
    import typing

    schema: Any = BenchmarkConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(schema):
            return False
        hint = typing.get_type_hints(schema).get(part)
        if hint is None:
            return False
        schema = hint
    return typing.get_origin(schema) is dict


def _method_names() -> list[str]:
    from offside_jax.unlearn.methods import names as method_names

    return method_names()


# -- stages -----------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.stages: dict[str, float] = {}
        self.started = time.perf_counter()

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"[{time.perf_counter() - clock.started:7.1f} s] {name} ...", flush=True)

            def __exit__(self, *exc):
                clock.stages[name] = clock.stages.get(name, 0.0) + time.perf_counter() - self.t
                return False

        return _Stage()


def prepare_release(cfg: BenchmarkConfig, out: Path) -> Path:
    """The release directory: ``data.release``, or a synthetic one (reused when its
    generator settings are unchanged)."""
    from offside_jax.data.synthetic import FORMS_FILE, METADATA_FILE, SyntheticConfig, make_release

    if cfg.data.release:
        root = Path(cfg.data.release)
        if not root.is_dir():
            raise ConfigError(f"data.release {root}: no such directory")
        return root
    root = out / "data"
    try:
        synth = SyntheticConfig(players=cfg.data.players, seed=cfg.data.seed, image_size=cfg.data.image_size,
                                visual_rumor_fraction=cfg.data.visual_rumor_fraction)
    except ValueError as e:  # the generator's own bounds (image size, players, fractions)
        raise ConfigError(f"data: {e}") from None
    meta = root / METADATA_FILE
    if distributed.is_primary() and not (meta.is_file() and (root / FORMS_FILE).is_file()
                                         and json.loads(meta.read_text()).get("config") == dataclasses.asdict(synth)):
        make_release(root, synth, overwrite=True, log=print)
    distributed.barrier("release-ready")
    return root


def _records(release, spec: str) -> list:
    setting, _, rest = spec.partition("/")
    split, _, modality = rest.partition(":")
    try:
        examples = release[setting, split]
    except KeyError:
        raise ConfigError(f"vanilla.records: {spec!r}: the release has no {setting}/{split} split") from None
    return [e for e in examples if not modality or e.modality == modality]


def training_pairs(release, specs: Sequence[str], *, drop_forget: bool = False) -> list[tuple[Any, str]]:
    """(item, answer) pairs of the reference models (see :class:`VanillaSection`)."""
    from offside_jax.eval.items import mcq_item, qa_item

    root = Path(release.root)
    pairs = []
    for spec in specs:
        for e in _records(release, spec):
            if drop_forget and e.role == "forget":
                continue
            pairs.append((mcq_item(e, "train", root), e.correct) if e.kind == "mcq" else (qa_item(e, "train", root), e.answer))
    if not pairs:
        raise ConfigError(f"vanilla.records {list(specs)} select no records")
    return pairs


@dataclasses.dataclass
class Base:
    """The starting point of the reference models and everything needed to run them."""

    model: Any  # freshly initialised (tiny_vl) or pretrained
    hf_config: Any
    tokenizer: Any
    processor: Any  # a VisionProcessor, or the tokenizer for text-only models


def build_base(cfg: BenchmarkConfig, release) -> Base:
    """The starting model from the one loader (``offside_jax.models.loader``)."""
    from offside_jax.models import loader

    m = cfg.model

    def texts() -> list[str]:  # the corpus of a tiny_vl model's tokenizer
        return [t for e in release.examples() for t in ([msg.content for msg in e.messages] + [e.question]
                                                        + [v for _, v in e.options])]

    path = str(resolve_gguf(m.path, "model.path")) if m.source == "gguf" else m.path
    try:
        loaded = loader.load(m.source, path=path, tiny=m.tiny, texts=texts, seed=cfg.seed,
                             max_pixels=max(cfg.data.image_size, 28) ** 2)
    except loader.LoaderError as e:
        raise ConfigError(str(e)) from None
    return Base(loaded.model, loaded.hf_config, loaded.tokenizer, loaded.processor)


def _recipe(cfg: BenchmarkConfig, release_root: Path, name: str) -> dict[str, Any]:
    """What a reference model depends on (its cache key). The retain-first start does not
    depend on the steps that come after it."""
    vanilla = dataclasses.asdict(cfg.vanilla)
    if not vanilla["tune"]["half_finetune"]["enabled"]:  # off: the key models saved before it existed
        vanilla["tune"] = {k: v for k, v in vanilla["tune"].items() if k != "half_finetune"}
    if name == "retain_first":
        vanilla["tune"] = {**vanilla["tune"], "steps": None}
    vanilla.pop("retain_only")
    return {"name": name, "data": dataclasses.asdict(cfg.data), "release": str(release_root.resolve()),
            "model": dataclasses.asdict(cfg.model), "vanilla": vanilla, "seed": cfg.seed}


def _digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _load_saved(directory: Path, digest: str) -> tuple[Any, dict] | None:
    from offside_jax.files import read_json
    from offside_jax.models import hf

    marker = directory / "recipe.json"
    info = read_json(marker) if marker.is_file() else None
    if info is not None and info.get("digest") == digest:
        print(f"reusing {directory}")
        return hf.load_pretrained(directory), info
    return None


def _save(model: Any, base: Base, directory: Path, info: dict) -> None:
    """config.json + safetensors + tokenizer + recipe.json, written beside and renamed whole
    (by process 0, the weights gathered from every process)."""
    from offside_jax.files import staged_dir, write_json
    from offside_jax.models import hf
    from offside_jax.train.session import gathered

    model = gathered(model)
    if distributed.is_primary():
        with staged_dir(directory) as tmp:
            hf.save_pretrained(model, base.hf_config, tmp)
            base.tokenizer.save_pretrained(str(tmp))
            write_json(tmp / "recipe.json", info)
    distributed.barrier("model-saved")


def reference_model(cfg: BenchmarkConfig, base: Base, release, name: str, out: Path,
                    starts: dict[str, tuple[Any, dict]] | None = None) -> tuple[Any, Path, dict]:
    """Train (or reuse) the vanilla model or its retain-only twin; saved as an HF checkpoint
    in ``out/models/<name>`` (see :class:`VanillaSection` for the shared retain-first start).
    ``starts`` keeps retain-first starts in memory by recipe digest, so the twin of a vanilla
    model trained in the same run starts from it without training or loading it again."""
    from offside_jax.data.batches import make_encoder
    from offside_jax.eval.tuning import tune

    starts = {} if starts is None else starts
    recipe = _recipe(cfg, Path(release.root), name)
    directory = out / "models" / f"{name}-{_digest(recipe)}"
    if cfg.reuse_models and (saved := _load_saved(directory, _digest(recipe))) is not None:
        return saved[0], directory, saved[1]
    encoder = make_encoder(base.processor)
    start, first_info = base.model, {}
    v = cfg.vanilla
    if v.retain_first_steps > 0:
        first_recipe = _recipe(cfg, Path(release.root), "retain_first")
        first_digest = _digest(first_recipe)
        first_dir = out / "models" / f"retain_first-{first_digest}"
        saved = starts.get(first_digest) or (_load_saved(first_dir, first_digest) if cfg.reuse_models else None)
        if saved is None:
            pairs = training_pairs(release, v.records, drop_forget=True)
            first = tune(base.model, encoder, pairs, dataclasses.replace(v.tune, steps=v.retain_first_steps),
                         progress=cfg.progress)
            first_info = {"digest": first_digest, "recipe": first_recipe, "records": len(pairs),
                          "losses": first.losses[::10], "final_loss": first.losses[-1]}
            _save(first.model, base, first_dir, first_info)
            saved = (first.model, first_info)
        starts[first_digest] = saved
        start, first_info = saved
    pairs = training_pairs(release, v.records, drop_forget=name == "retain_only")
    result = tune(start, encoder, pairs, v.tune, progress=cfg.progress)
    info = {"digest": _digest(recipe), "recipe": recipe, "records": len(pairs),
            "steps": v.retain_first_steps + v.tune.steps, "losses": first_info.get("losses", []) + result.losses[::10],
            "final_loss": result.losses[-1] if result.losses else None}
    _save(result.model, base, directory, info)
    return result.model, directory, info


def variant(cfg: BenchmarkConfig, name: str) -> VariantSection:
    """The resolved settings of one entry of ``methods`` (a method name or a variant)."""
    u = cfg.unlearn
    v = cfg.variants.get(name) or VariantSection(method=name)
    return VariantSection(
        method=v.method, setting=v.setting or u.setting,
        forget_attributes=list(u.forget_attributes if v.forget_attributes is None else v.forget_attributes),
        steps=u.steps if v.steps is None else v.steps, lr=u.lr if v.lr is None else v.lr,
        identified_fraction=1.0 if v.identified_fraction is None else v.identified_fraction,
    )


def unlearn_config(cfg: BenchmarkConfig, name: str, vanilla_dir: Path, release_root: Path, out: Path):
    """The ``UnlearnConfig`` of one entry of ``methods``, starting from the vanilla checkpoint."""
    from offside_jax.config import (CheckpointConfig, LogConfig, MeshConfig, ModelConfig, OptimConfig, UnlearnConfig,
                                    UnlearnDataConfig, UnlearnEvalConfig, UnlearnTrainConfig)

    from offside_jax.unlearn import methods

    u, v = cfg.unlearn, variant(cfg, name)
    lora = dataclasses.replace(u.lora, enabled=u.lora.enabled and methods.get(v.method).lora)
    return UnlearnConfig(
        output_dir=str(out / name / "unlearn"), seed=cfg.seed, method=v.method,
        model=ModelConfig(source="hf", path=str(vanilla_dir)), mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(lr=v.lr, schedule="constant", weight_decay=0.0, max_grad_norm=1.0),
        lora=lora,
        data=UnlearnDataConfig(release=str(release_root), setting=v.setting, forget_attributes=v.forget_attributes,
                               identified_fraction=v.identified_fraction, forget_batch_size=u.forget_batch_size,
                               retain_ratio=u.retain_ratio, max_pixels=max(cfg.data.image_size, 28) ** 2),
        train=UnlearnTrainConfig(steps=v.steps),
        methods=u.methods, eval=UnlearnEvalConfig(enabled=False),
        checkpoint=CheckpointConfig(every=0, keep=1, async_save=False, resume=False),
        log=LogConfig(tensorboard=False, progress=cfg.progress), export_merged=False, distributed=cfg.distributed,
    )


def _forget_rows(out: Path, name: str, modality: str) -> list[dict]:
    path = out / name / "eval" / "examples" / f"forget_{modality}_gen.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _forms_entry(res: dict[str, Any], modality: str) -> dict[str, Any]:
    """``{"forms": {scores per form, worst form, counts, seconds}}`` when the suite ran its
    question forms (``suite.forms``), else {}."""
    from offside_jax.eval.forms import form_summary

    ran = res.get("forms")
    summary = form_summary(res["summary"], modality, ran.get("counts")) if ran else None
    return {"forms": {**summary, "seconds": ran.get("seconds")}} if summary else {}


def _compile_cache(cfg: BenchmarkConfig, out: Path) -> None:
    import jax

    if cfg.compile_cache == "":
        return
    path = Path(cfg.compile_cache) if cfg.compile_cache else out / ".jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run every stage (see the module docstring) and return the results written to
    ``output_dir/results.json``."""
    from offside_jax.correct.relearn import correct
    from offside_jax.data.offside import load_release
    from offside_jax.eval import findings, report
    from offside_jax.eval.attacks import run_attacks
    from offside_jax.files import write_yaml
    from offside_jax.eval.suite import Suite
    from offside_jax.unlearn.run import run_unlearning

    distributed.initialize(cfg.distributed)  # before anything touches a device
    primary = distributed.is_primary()
    out = Path(cfg.output_dir)
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / "config.yaml", config_lib.to_dict(cfg))
    _compile_cache(cfg, out)
    clock = _Clock()
    with clock.stage("data"):
        work = Path(cfg.work_dir) if cfg.work_dir else out
        release_root = prepare_release(cfg, work)
        release = load_release(release_root)
    with clock.stage("base model"):
        base = build_base(cfg, release)
        suite = Suite(release, base.processor, cfg.suite)
    methods: dict[str, Any] = {}
    info = {"model": dataclasses.asdict(cfg.model)}
    references = ["vanilla"] + (["retain_only"] if cfg.vanilla.retain_only else [])
    vanilla_dir = None
    starts: dict[str, tuple[Any, dict]] = {}  # the retain-first start the two references share
    for name in references:
        with clock.stage(f"train {name}"):
            model, directory, trained = reference_model(cfg, base, release, name, work, starts)
        vanilla_dir = directory if name == "vanilla" else vanilla_dir
        with clock.stage(f"evaluate {name}"):
            res = suite.run(model, out / name / "eval", name=name, info=info, progress=cfg.progress)
        methods[name] = {"role": "reference", "summary": res["summary"], "records": trained.get("records"),
                         "final_loss": trained.get("final_loss"), **_forms_entry(res, cfg.modality)}
        if name == "vanilla" and cfg.attack_vanilla and (cfg.attack_methods is None or cfg.attack_methods):
            with clock.stage("attack vanilla"):
                no_relearn = dataclasses.replace(cfg.attacks, relearn=False)
                methods[name]["attacks"] = run_attacks(model, suite, no_relearn, out_dir=out / name / "attacks",
                                                       name=name, progress=cfg.progress)
        del model
    del starts  # the methods start from the saved vanilla model
    attack_methods = cfg.methods if cfg.attack_methods is None else cfg.attack_methods
    # Only a twin evaluated in this run: a reused output_dir may hold an older one's rows.
    retain_rows = _forget_rows(out, "retain_only", cfg.modality) if cfg.vanilla.retain_only else []
    for method in cfg.methods:
        with clock.stage(f"unlearn {method}"):
            # A rerun starts the method afresh (its old checkpoints would be resumed or refused).
            if primary:
                shutil.rmtree(out / method / "unlearn", ignore_errors=True)
            distributed.barrier(f"unlearn-{method}")
            result = run_unlearning(unlearn_config(cfg, method, vanilla_dir, release_root, out))
        with clock.stage(f"evaluate {method}"):
            res = suite.run(result.model, out / method / "eval", name=method, info=info, progress=cfg.progress)
        v = variant(cfg, method)
        entry = {"role": "method", "method": v.method, "setting": v.setting, "steps": v.steps, "lr": v.lr,
                 "summary": res["summary"], "unlearn_seconds": result.summary.get("seconds"),
                 "trace_kept": result.summary.get("trace_kept"), **_forms_entry(res, cfg.modality)}
        if retain_rows:
            entry["forget_quality"] = report.forget_quality_of_rows(_forget_rows(out, method, cfg.modality), retain_rows)
        if method in attack_methods:
            with clock.stage(f"attack {method}"):
                entry["attacks"] = run_attacks(result.model, suite, cfg.attacks, out_dir=out / method / "attacks",
                                               name=method, progress=cfg.progress)
        if method in cfg.correction_methods:
            with clock.stage(f"correct {method}"):
                fixed = correct(result.model, suite, cfg.correction, before=res, out_dir=out / method / "correction",
                                name=method, progress=cfg.progress)
                fixed.pop("model")
                entry["correction"] = fixed
        methods[method] = entry
        del result
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timing = {**clock.stages, "total": time.perf_counter() - clock.started}
    results = {"run": cfg.run, "description": cfg.description, "modality": cfg.modality, "release": str(release_root),
               "methods": methods, "timing": timing, "peak_memory_mib": peak_mib,
               "notes": [f"peak resident memory {peak_mib:.0f} MiB; total {timing['total']:.0f} s"]}
    results["findings"] = findings.all_findings(results)
    if primary:
        with clock.stage("report"):
            report.write_report(out, results)
        print(f"done in {time.perf_counter() - clock.started:.0f} s; report: {out / 'report.md'}")
    distributed.barrier("report")
    return results
