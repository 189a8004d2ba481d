"""Typed experiment configs: dataclass schemas, YAML files, dotted command-line overrides.

Every field has a typed default here; a YAML file (``configs/*.yaml``) and ``key.sub=value``
overrides only change fields. Validation is OmegaConf's structured configs (types, missing
values) plus one check of our own up front: an unknown key is an error that names the key,
where it came from, and the valid keys at that level.

    cfg = load_config("configs/finetune_tiny.yaml", ["optim.lr=1e-4", "lora.enabled=false"])
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or override and the key."""


# -- declared constraints, checked when a config loads (validate) -------------------------------


def one_of(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of ``choices`` (an enum, checked at load)."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def at_least(default: Any, low: float) -> Any:
    """A numeric field that must be ``>= low`` (``None`` allowed where the type allows it)."""
    return dataclasses.field(default=default, metadata={"min": low})


MODEL_SOURCES = ("hf", "gguf", "tiny", "tiny_vl")  # offside_jax.models.loader.SOURCES
RESUME_MODES = ("auto", "force")


@dataclasses.dataclass
class TinyModelConfig:
    """A random-init Llama-family model built from these numbers (tests, examples, CPU runs)."""

    model_type: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclasses.dataclass
class ModelConfig:
    """Where the model comes from: ``tiny`` (random init), ``hf`` (checkpoint dir), ``gguf`` (file)."""

    source: str = one_of("tiny", *MODEL_SOURCES)
    path: str | None = None
    tokenizer: str | None = None  # HF tokenizer dir; default: ``path`` (hf/gguf) or one trained on the data (tiny)
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    # What a rematerialised layer keeps for the backward pass (offside_jax.models.layers.REMAT_POLICIES):
    # full (nothing: recompute the whole layer), dots_saveable, dots_with_no_batch_dims_saveable, ...
    remat_policy: str = "full"
    # Attention implementation (offside_jax.models.attention): auto (cuDNN flash attention on GPU,
    # splash attention on TPU, XLA elsewhere), or xla | cudnn | splash by name.
    attention: str = "auto"

    def __post_init__(self):
        from offside_jax.models.attention import IMPLEMENTATIONS

        if self.attention not in IMPLEMENTATIONS:
            raise ConfigError(f"model.attention {self.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}")


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; -1 takes the devices the other axes leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup, then a cosine/linear decay (or constant), and clipping."""

    lr: float = 1e-4
    schedule: str = one_of("cosine", "cosine", "linear", "constant")
    warmup_steps: int = at_least(0, 0)
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # Weight decay applies to parameters with >= 2 dims whose dotted path does not match this.
    no_decay: str | None = None


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = False
    target: str = r"q_proj|v_proj"
    rank: int = at_least(8, 1)
    alpha: float = 16.0
    dropout: float = at_least(0.0, 0.0)


@dataclasses.dataclass
class DataConfig:
    """Training data: a JSON-lines file of chat conversations (``{"messages": [{"role",
    "content"}, ...]}``) or the splits of an OFFSIDE release (``release``; exactly one of the two)."""

    train_file: str | None = None
    eval_file: str | None = None
    # OFFSIDE release directory (e.g. from `offside-jax make-data`): the vanilla model learns
    # facts and rumors from `release_setting`/`release_splits` (the finetune split).
    release: str | None = None
    release_setting: str = "complete"
    release_splits: list[str] = dataclasses.field(default_factory=lambda: ["finetune"])
    # Records to keep: "auto" (text records for a text-only model, all for a vision-language one) | "text" | "image" | "all".
    release_modality: str = one_of("auto", "auto", "text", "image", "all")
    max_pixels: int = at_least(256 * 256, 1)  # image budget per record (vision-language models)
    max_length: int = at_least(128, 0)  # tokens per row; release data: 0 measures the longest record
    batch_size: int = at_least(8, 1)
    micro_batches: int = at_least(1, 1)
    shuffle: bool = True


@dataclasses.dataclass
class HalfFinetuneConfig:
    """Half Fine-Tuning (``offside_jax.train.half_finetune``): every ``rounds`` optimizer updates,
    re-draw which half of each decoder block trains (2 of 4 attention projections, 2 or 1 of 3
    MLP projections alternating across layers, half the norms; embeddings and lm_head always
    train); the other half stays bitwise unchanged. The masks are a function of ``seed`` and the
    round, so a resumed run re-draws the same ones. Works with full fine-tuning and with LoRA
    (an adapter pair trains when its matrix is in this round's half)."""

    enabled: bool = False
    rounds: int = at_least(100, 1)  # optimizer updates per round (the paper's round: an epoch)
    seed: int = 0
    # Adam moments of a matrix while frozen: kept as they were, resumed when it trains again
    # (PyTorch's requires_grad=False; the paper is silent). The only choice implemented.
    moments: str = one_of("keep", "keep")


@dataclasses.dataclass
class TrainConfig:
    steps: int = at_least(100, 0)
    loss: str = "nll"
    eval_every: int = at_least(0, 0)  # 0: no periodic evaluation
    log_every: int = at_least(1, 1)
    loss_chunk_tokens: int = at_least(1024, 0)  # fused cross-entropy chunk (tokens); 0: plain logits
    # bf16 (or fp16) params: the optimizer updates a float32 master copy, the model computes in param_dtype.
    fp32_master_weights: bool = False
    # Compile the step ahead of time and stop before training when it needs more device memory than
    # this (GiB per device); None: the device's own limit where JAX reports one (GPU/TPU), else no check.
    memory_budget_gib: float | None = None
    aot_memory_check: bool = True
    half_finetune: HalfFinetuneConfig = dataclasses.field(default_factory=HalfFinetuneConfig)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = at_least(0, 0)  # 0: only at the end
    keep: int = at_least(2, 1)
    async_save: bool = True
    resume: bool = True
    # Default: <output_dir>/checkpoints. Multi-host runs need a place every host sees: a shared
    # filesystem or a gs://bucket/path URL (orbax writes to GCS directly; install gcsfs).
    directory: str | None = None


@dataclasses.dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass
class DistributedConfig:
    """Joining the processes of a multi-host run (``offside_jax.train.distributed``).

    ``auto`` initializes when a coordinator address is configured (here or in
    ``JAX_COORDINATOR_ADDRESS``) or SLURM runs several tasks; ``on`` always does, leaving unset
    fields to JAX's cluster detection (Cloud TPU VMs, SLURM, Open MPI, Kubernetes); ``off`` never.
    """

    mode: str = one_of("auto", "off", "auto", "on")
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None
    cluster_detection: str | None = None  # force one of JAX's cluster detection methods
    timeout_s: int = 300
    cpu_collectives: str = "gloo"


@dataclasses.dataclass
class FinetuneConfig:
    """Supervised fine-tuning (full or LoRA) on chat data; ``output_dir`` holds checkpoints,
    logs, the resolved config and the exported model."""

    output_dir: str = MISSING
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    export_merged: bool = True  # write HF safetensors of the final (merged) model
    # A rerun into an output_dir whose config.yaml differs (beyond steps, logging, mesh, ...)
    # is refused naming the keys; force: continue that run with the new values anyway.
    resume: str = one_of("auto", *RESUME_MODES)


# -- unlearning (`offside-jax unlearn`; offside_jax.unlearn.run) --------------------------------
# One section per method, named as the method; `method=<name>` picks the section in effect.
# The loss methods' fields are the keyword arguments (and defaults) of their registered
# functions in offside_jax.unlearn.losses (a test keeps the two in step).


@dataclasses.dataclass
class GAConfig:
    """Gradient ascent on the forget answers (no hyperparameters)."""


@dataclasses.dataclass
class GradDiffConfig:
    gamma: float = 1.0  # forget term weight (OFFSIDE's GD: 0.25, with retain_ratio 3)
    alpha: float = 1.0  # retain term weight (OFFSIDE's GD: 0.75)
    retain_loss: str = one_of("nll", "nll", "kl")


@dataclasses.dataclass
class KLConfig:
    alpha: float = 1.0


@dataclasses.dataclass
class IdkConfig:
    alpha: float = 1.0


@dataclasses.dataclass
class DPOConfig:
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0
    win: str = one_of("forget_alt", "forget_alt", "forget_idk")  # the corrected fact | a refusal


@dataclasses.dataclass
class IdkDPOConfig:
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0


@dataclasses.dataclass
class NPOConfig:
    beta: float = 0.1
    alpha: float = 1.0  # retain NLL weight (NPO+RT); 0: plain NPO
    gamma: float = 1.0
    variant: str = one_of("sum", "sum", "offside")  # open-unlearning | batch-mean NLLs (use beta 0.9)


@dataclasses.dataclass
class SimNPOConfig:
    beta: float = 4.5
    delta: float = 0.0
    gamma: float = 0.125
    alpha: float = 1.0


@dataclasses.dataclass
class WGAConfig:
    beta: float = 1.0
    gamma: float = 1.0
    alpha: float = 1.0


@dataclasses.dataclass
class UndialConfig:
    beta: float = 10.0
    gamma: float = 1.0
    alpha: float = 0.0


@dataclasses.dataclass
class RMUConfig:
    """Only the MLP down projections of layers L-2..L move unless ``train.params`` says otherwise.

    ``layer`` is a fraction of the model's depth, so one default fits every size: L is
    ``floor(layer * num_hidden_layers)``. 0.21875 is WMDP's and open-unlearning's layer 7 of
    a 32-layer 7B model (layer 0 of a 2-layer tiny model). ``steering_coeff`` 2 and ``alpha`` 1
    are open-unlearning's RMU (configs/trainer/RMU.yaml); WMDP's Zephyr-7B run used 6.5 and
    1200, which on small models leave the forget answers untouched.

    ``lr_scale`` multiplies ``optim.lr`` for RMU alone: its activation MSE moves one to three
    matrices, and at the shared learning rate of the loss methods it barely moves them (tiny
    recipe, 20 steps at lr 5e-4: forget answer probability 0.99 -> 0.99 at x1, 0.74 at x5,
    0.32 at x10 with retain 0.92). WMDP's own RMU ran Zephyr-7B at 5e-5, 1 to 2.5 times
    OFFSIDE's unlearning rates (2e-5 to 5e-5); whether x10 overshoots at that size is not
    measured here.
    """

    layer: float = 0.21875
    steering_coeff: float = 2.0
    alpha: float = 1.0
    seed: int = 0
    lr_scale: float = 10.0

    def check(self, where: str) -> None:
        if self.lr_scale <= 0:
            raise ConfigError(f"{where}lr_scale={self.lr_scale}: a positive multiple of optim.lr")
        if not 0 <= self.layer < 1:
            raise ConfigError(f"{where}layer={self.layer}: a fraction of the model's depth in [0, 1) "
                              "(0.5: the middle layer); the layer used is floor(layer * num_hidden_layers)")


@dataclasses.dataclass
class SSDConfig:
    """Selective synaptic dampening (no training steps); LFSSD with objective=output_norm, ASSD with adaptive."""

    alpha: float = 10.0  # selection: I_forget > alpha * I_full
    lam: float = 1.0  # dampening: theta * min(lam * I_full / I_forget, 1)
    estimator: str = one_of("batch_mean", "batch_mean", "per_example")  # the official code | vmap
    objective: str = one_of("loss", "loss", "output_norm")  # SSD | LFSSD
    adaptive: bool = False  # ASSD: alpha from the ratio percentile
    forget_fraction: float | None = None  # ASSD; None: forget records / all records
    params: str | None = None  # regex over parameter paths; None: all
    per_example_chunk: int = at_least(8, 1)
    batch_size: int = at_least(8, 1)  # rows per importance batch

    def check(self, where: str) -> None:
        if self.estimator == "per_example" and self.batch_size % self.per_example_chunk:
            raise ConfigError(f"{where}batch_size={self.batch_size} must be a multiple of "
                              f"per_example_chunk={self.per_example_chunk}")


@dataclasses.dataclass
class MMUnlearnerConfig:
    """Fisher-ratio masked gradient ascent alternating with retain NLL (offside_jax.unlearn.saliency).

    ``threshold``: mask = (F_forget + eps) / (F_preserve + eps) >= threshold. The paper and its
    released code use 1; ``threshold=1`` reproduces them. On the README's tiny recipe that mask
    holds 2.7% of the projections and 20 steps (10 of them ascent) leave the forget answers as they
    were (answer probability 0.99 -> 0.99). The default 0.02 (our choice, measured there, not from
    a source) keeps the weights whose forget Fisher is at least 2% of their preserve Fisher: 56% of
    the projections, forget 0.99 -> 0.28 with retain 0.97 -> 0.94, where the unmasked ascent
    (threshold 0) takes retain to 0.87 and 0.1 / 0.05 still leave forget at 0.82 / 0.58.
    """

    threshold: float = 0.02
    eps: float = 1e-15
    # Which tensors ascent may move (attention/MLP projections, the merger MLP) and the module groups.
    targets: str = r"(self_attn\.(q|k|v|o)_proj|attn\.(qkv|proj)|mlp\.(gate|up|down)_proj|merger\.mlp\.\d+)\."
    groups: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "vision": r"^visual\.(blocks|patch_embed)\.",
        "projector": r"^visual\.merger\.",
        "language": r"^(model|lm_head)\.",
    })
    gamma: float = 1.0  # weight of the ascent loss
    # paper: strict alternation, only the masked projections ascend, mask then clip (the optimizer's);
    # official: the released code's update: tensors outside the projections ascend unmasked, the
    # gradient is clipped (optim.max_grad_norm) before masking, and a forget step comes before every
    # len(retain batches) // len(forget batches)-th retain step.
    variant: str = one_of("paper", "paper", "official")
    fisher_batch_size: int = at_least(8, 1)
    preserve_text: bool = True  # a vision-language model also preserves the text-only retain twins


# OFFSIDE's baselines as its public code runs them (offside_jax.unlearn.offside_baselines);
# the numbers are its scripts' defaults as its bash.sh calls them.


@dataclasses.dataclass
class OffsideGDConfig:
    """GD_forget.py: ``w_f * -NLL(f) + w_r * NLL(r)``, each weight its sub-batch's share of the rows
    (1 forget : 3 retain rows, the retain_ratio this method defaults to: 0.25 / 0.75)."""


@dataclasses.dataclass
class OffsideKLConfig:
    """KL_min.py: forget micro-steps ``-NLL(f)`` alternate with retain micro-steps
    ``NLL(r) + kl_weight * KL(ref || cur)``, the KL summed over positions and divided by the rows."""

    kl_weight: float = 0.1
    # accelerate's gradient_accumulation_steps (the script's default, which bash.sh keeps): with 2,
    # each update averages the gradients of one forget and one retain micro-step.
    accumulation: int = at_least(2, 1)


@dataclasses.dataclass
class OffsidePOConfig:
    """PO.py: forget micro-steps learn the refusal, alternating with retain NLL micro-steps."""

    refusal: str = "I do not know the answer"  # PO.py's --idk_text
    accumulation: int = at_least(2, 1)  # as in OffsideKLConfig


@dataclasses.dataclass
class OffsideNPOConfig:
    """NPO.py: ``-(2/beta) log sigmoid(beta * (NLL(f) - NLL_ref(f)))`` on batch-mean NLLs, no retain
    term; the reference is fine-tuned on the retain set first (NPO_reference_model_FT.py)."""

    beta: float = 0.9
    reference: str = one_of("retain_finetune", "retain_finetune", "frozen")  # frozen: the starting model
    # Where the reference's fine-tune starts: "" the model being unlearned; or an HF model directory
    # (OFFSIDE starts from the pretrained base, which never saw the rumors).
    reference_from: str = ""
    reference_steps: int = at_least(100, 0)
    reference_lr: float = 1e-4  # NPO_reference_model_FT.py
    reference_batch_size: int = at_least(16, 1)  # its 4 rows x 4 accumulation steps


# Training-free edits and generation-time unlearning (issue: beyond loss-based unlearning).


@dataclasses.dataclass
class RocrEditConfig:
    """ROCR (offside_jax.unlearn.rocr): redirect each forget subject to ``replacement`` with a
    closed-form edit of early ``down_proj`` kernels, null-space projected against the keys of
    ``general_data``. ``l2`` and ``nullspace_threshold`` are the official hparams (absolute)."""

    layers: list[int] | None = None  # None: the official layers 4-6 of 32 at the same relative depth
    l2: float = at_least(1.0, 0)
    nullspace_threshold: float = at_least(2e-2, 0)
    # The official code redirects to a fixed real person; ours: a fictional player no release names.
    replacement: str = "Tomas Verlind"
    subjects: list[str] = dataclasses.field(default_factory=list)  # []: the players the forget questions name
    # C0's data: the release's world facts (they name no player), the retain set, or none (P = I).
    general_data: str = one_of("world", "world", "retain", "none")
    batch_size: int = at_least(8, 1)

    def check(self, where: str) -> None:
        if self.l2 <= 0:
            raise ConfigError(f"{where}l2={self.l2}: must be > 0 (the closed-form solve is singular without it)")
        if self.layers is not None and (not self.layers or self.layers != sorted(set(self.layers))):
            raise ConfigError(f"{where}layers={self.layers}: increasing, distinct layer indices (null: the default)")


@dataclasses.dataclass
class CurvatureEditConfig:
    """Curvature editing (offside_jax.unlearn.curvature): keep the K-FAC eigen-pairs holding a
    fraction ``rho`` of the curvature of ``statistics`` and project the chosen matrices onto them.
    The paper takes statistics over general text; ours by default over the retain set, so the
    directions the retained answers need are the ones kept (a label-free variant)."""

    layers: list[int] | None = None  # None: the paper's OLMo-2-7B layers 23-25 of 32 at the same relative depth
    matrices: list[str] = dataclasses.field(default_factory=lambda: ["mlp.gate_proj", "mlp.up_proj"])
    rho: float = 0.6
    labels: str = one_of("sampled", "sampled", "gold")  # sampled: the true Fisher (the paper); gold: the code's default
    statistics: str = one_of("retain", "retain", "full", "world")
    seed: int = 0
    batch_size: int = at_least(8, 1)

    def check(self, where: str) -> None:
        if not 0 < self.rho <= 1:
            raise ConfigError(f"{where}rho={self.rho}: the fraction of curvature kept, in (0, 1]")
        if not self.matrices:
            raise ConfigError(f"{where}matrices: at least one linear layer of a block (e.g. mlp.up_proj)")


@dataclasses.dataclass
class ConceptAblationConfig:
    """ConceptVectors' "needle" ablation (offside_jax.unlearn.concept_vectors): locate each forget
    subject's traces (the ``down_proj`` rows whose vocabulary projection ranks its name's tokens
    highest), add N(0, sigma^2) noise to them, then train only those rows with ``loss``."""

    top: int = at_least(10, 1)  # traces per subject
    subjects: list[str] = dataclasses.field(default_factory=list)  # []: the players the forget questions name
    layers: list[int] | None = None  # where to look; None: every layer
    order: str = one_of("rank", "rank", "mass")
    sigma: float = at_least(0.1, 0)
    loss: str = one_of("npo", "npo", "ga", "grad_diff")  # the official default is NPO-KL; NPO+RT here
    beta: float = 0.1  # NPO
    alpha: float = 1.0  # retain NLL weight (npo, grad_diff)
    # The official needle runs train the vectors alone at lr 0.1-0.5 (7B models); on the tiny
    # recipe 0.1 takes retain 0.97 -> 0.46 and 0.01 forgets (0.99 -> 0.45) keeping retain at 0.87.
    lr: float = 0.01
    seed: int = 0


@dataclasses.dataclass
class GuardConfig:
    """GUARD (offside_jax.unlearn.guard): no weight change; a prompt classifier on pooled hidden
    states flags questions about forget targets and the sampler steers away from spans of the
    forget answers. The paper's penalty, thresholds and span extraction are unsourced: these are
    our documented choices."""

    layer: int = -2  # pooled hidden states after this decoder block (-2: the penultimate)
    threshold: float = 0.5  # flagged when p(forget) >= threshold
    classifier_steps: int = at_least(500, 1)
    classifier_lr: float = 0.05
    classifier_l2: float = 1e-3
    token_penalty: float = at_least(5.0, 0)
    semantic_penalty: float = at_least(5.0, 0)
    semantic_threshold: float = 0.8
    semantic_top_k: int = at_least(32, 0)
    retrieve: int = at_least(0, 0)  # spans of the k closest forget answers per prompt; 0: every span
    batch_size: int = at_least(8, 1)

    def check(self, where: str) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError(f"{where}threshold={self.threshold}: a probability in (0, 1)")
        if not -1 <= self.semantic_threshold < 1:
            raise ConfigError(f"{where}semantic_threshold={self.semantic_threshold}: a cosine in [-1, 1)")


@dataclasses.dataclass
class UnlearnMethodsConfig:
    ga: GAConfig = dataclasses.field(default_factory=GAConfig)
    grad_diff: GradDiffConfig = dataclasses.field(default_factory=GradDiffConfig)
    kl: KLConfig = dataclasses.field(default_factory=KLConfig)
    idk: IdkConfig = dataclasses.field(default_factory=IdkConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    idk_dpo: IdkDPOConfig = dataclasses.field(default_factory=IdkDPOConfig)
    npo: NPOConfig = dataclasses.field(default_factory=NPOConfig)
    simnpo: SimNPOConfig = dataclasses.field(default_factory=SimNPOConfig)
    wga: WGAConfig = dataclasses.field(default_factory=WGAConfig)
    undial: UndialConfig = dataclasses.field(default_factory=UndialConfig)
    rmu: RMUConfig = dataclasses.field(default_factory=RMUConfig)
    ssd: SSDConfig = dataclasses.field(default_factory=SSDConfig)
    mmunlearner: MMUnlearnerConfig = dataclasses.field(default_factory=MMUnlearnerConfig)
    offside_gd: OffsideGDConfig = dataclasses.field(default_factory=OffsideGDConfig)
    offside_kl: OffsideKLConfig = dataclasses.field(default_factory=OffsideKLConfig)
    offside_po: OffsidePOConfig = dataclasses.field(default_factory=OffsidePOConfig)
    offside_npo: OffsideNPOConfig = dataclasses.field(default_factory=OffsideNPOConfig)
    rocr: RocrEditConfig = dataclasses.field(default_factory=RocrEditConfig)
    curvature_edit: CurvatureEditConfig = dataclasses.field(default_factory=CurvatureEditConfig)
    concept_ablation: ConceptAblationConfig = dataclasses.field(default_factory=ConceptAblationConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)


@dataclasses.dataclass
class UnlearnDataConfig:
    """Which OFFSIDE records to forget and keep (offside_jax.unlearn.settings) and how to batch them."""

    release: str = MISSING  # release directory (e.g. from `offside-jax make-data`)
    setting: str = one_of("multimodal", "multimodal", "unimodal", "selective")  # unimodal: text twins
    forget_attributes: list[str] = dataclasses.field(default_factory=list)  # e.g. [rumor] or [club_joined]; []: all
    identified_fraction: float = 1.0  # corrective unlearning: the share of the forget set a method sees
    forget_batch_size: int = at_least(4, 1)
    retain_ratio: int | None = at_least(None, 0)  # retain rows per forget row; None: the method's (1; OFFSIDE's: 3)
    micro_batches: int = at_least(1, 1)
    max_length: int = at_least(0, 0)  # tokens per row; 0: the longest record, measured
    max_pixels: int = 256 * 256
    shuffle: bool = True
    refusals: list[str] = dataclasses.field(default_factory=list)  # IdK answers; []: the built-in list


@dataclasses.dataclass
class UnlearnTrainConfig:
    steps: int = at_least(20, 0)  # optimizer updates (an alternating recipe that accumulates runs more micro-steps)
    log_every: int = at_least(1, 1)
    params: str | None = None  # full-parameter runs: regex of the params that move (None: all; RMU: its layers)
    loss_chunk_tokens: int = at_least(256, 0)  # fused cross-entropy chunk (tokens) of NLLs and sequence log-probs; 0: full logits
    # bf16 (or fp16) params: the optimizer updates a float32 master copy (see TrainConfig).
    fp32_master_weights: bool = False
    memory_budget_gib: float | None = None  # the AOT memory check's budget (see TrainConfig)
    aot_memory_check: bool = True
    # HFT as a retention regularizer: each round only half of every block moves (loss and
    # alternating methods; the training-free edits ignore it)
    half_finetune: HalfFinetuneConfig = dataclasses.field(default_factory=HalfFinetuneConfig)


@dataclasses.dataclass
class UnlearnEvalConfig:
    """Answer probability (exp(-mean NLL)) of the evaluation sets before and after unlearning."""

    enabled: bool = True
    sets: list[str] = dataclasses.field(default_factory=list)  # e.g. [forget, retain]; []: every set of the setting
    batch_size: int = at_least(8, 1)
    max_records: int = at_least(0, 0)  # per set; 0: all
    # ConceptVectors' "trace kept": how much each forget subject's down_proj traces changed
    trace_kept: bool = True
    trace_top: int = at_least(10, 1)  # traces per subject


@dataclasses.dataclass
class UnlearnConfig:
    """Unlearning on top of a vanilla model (``model.source: hf`` pointing at `offside-jax
    finetune`'s exported ``model`` directory): ``output_dir`` gets the resolved config,
    checkpoints, logs, the unlearned model (``model``) and ``summary.json``."""

    output_dir: str = MISSING
    seed: int = 0
    method: str = "npo"  # a registered method (offside_jax.unlearn.methods), with a section in `methods`
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(source="hf"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant"))
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    data: UnlearnDataConfig = dataclasses.field(default_factory=UnlearnDataConfig)
    train: UnlearnTrainConfig = dataclasses.field(default_factory=UnlearnTrainConfig)
    methods: UnlearnMethodsConfig = dataclasses.field(default_factory=UnlearnMethodsConfig)
    eval: UnlearnEvalConfig = dataclasses.field(default_factory=UnlearnEvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    export_merged: bool = True  # write HF safetensors of the unlearned (merged) model
    resume: str = one_of("auto", *RESUME_MODES)  # see FinetuneConfig.resume

    def check(self, where: str) -> None:
        """The method is registered, and LoRA only where the method's kind trains adapters."""
        from offside_jax.unlearn import methods

        method = methods.get(self.method)
        if self.lora.enabled and not method.lora:
            raise ConfigError(f"{where}method={self.method} ({method.kind}) works on the weights themselves: "
                              "set lora.enabled=false")


# -- RL self-correction (`offside-jax correct`) ---------------------------------------------------


@dataclasses.dataclass
class CorrectTaskConfig:
    """The verifiable task (``offside_jax.correct.tasks``) and the prior its warm-up traces teach."""

    name: str = one_of("carry_arithmetic", "carry_arithmetic", "countdown_mini", "rumor_correction")
    p_bug: float = 0.3  # warm-up first attempts that are wrong
    p_fix: float = 1.0  # warm-up second attempts that fix a wrong first attempt (else repeat it)
    # carry_arithmetic
    min_digits: int = 2
    max_digits: int = 4
    ops: str = "+-"
    # countdown_mini
    min_numbers: int = 3
    max_numbers: int = 4
    # rumor_correction: the text records with a verified correction of an OFFSIDE release
    release: str | None = None  # release directory (e.g. from `offside-jax make-data`)
    setting: str = "pure_text"
    split: str = "forget"
    attributes: list[str] = dataclasses.field(default_factory=list)  # e.g. [club_joined]; []: all


@dataclasses.dataclass
class EpisodeFormatConfig:
    """How two-turn episodes are written: ``[problem, attempt 1, instruction, attempt 2]``."""

    instruction: str | None = None  # None: SCoRe's correction instruction between newlines
    max_new_tokens: int = 8  # per attempt
    length: int = 0  # every episode padded to this many tokens (one compiled step); 0: per batch


@dataclasses.dataclass
class CorrectWarmupConfig:
    """Supervised warm-up on ``[problem, buggy-or-right attempt, instruction, fix-or-repeat]``."""

    steps: int = 1000
    lr: float = 1e-3
    problems_per_step: int = 32
    max_grad_norm: float | None = 1.0


@dataclasses.dataclass
class ScoreStageConfig:
    """One SCoRe stage (``offside_jax.correct.score.ScoreStage`` plus how long and how fast it
    trains). ``alpha``/``reward_first`` unset take the stage's defaults (I: 0 / no; II: 10 / yes).
    Defaults are the paper's (MATH); tiny models need a larger ``lr``."""

    enabled: bool = True
    steps: int = 50
    lr: float = 5e-6
    problems_per_step: int = 8
    group_size: int = 4
    temperature: float = 1.0
    alpha: float | None = None
    reward_first: bool | None = None
    beta1: float = 0.01
    beta2: float = 0.1
    advantage: str = one_of("rloo", "rloo", "reinforce")
    first_attempt_baseline: bool = True
    kl_in_reward: bool = True
    kl_estimator: str = "k3"  # the KL in the loss (kl_in_reward: false)
    clip_eps: float | None = None  # set when epochs * minibatches > 1
    epochs: int = 1
    minibatches: int = 1
    eval_every: int = 10  # RL steps between greedy evaluations (0: only at the end)
    max_grad_norm: float | None = 1.0


COMPARE_STRATEGIES = ("sft", "self_refine", "verifier_feedback", "score", "scl", "rise", "ufo", "mistake_tuning", "lemma")


@dataclasses.dataclass
class CompareConfig:
    """``mode: compare`` (``offside_jax.correct.compare``): correction strategies on the same
    step-format task, the same architecture and initialisation, scored by one greedy two-turn
    evaluation. ``train`` is the budget (steps x sequences per step, lr) that plain SFT, mistake
    tuning and LEMMA each get from the random init; ``warmup`` (the top-level key) trains the
    two-turn model that self-refine, verifier feedback, SCoRe, SCL, RISE and UFO start from."""

    strategies: list[str] = dataclasses.field(default_factory=lambda: list(COMPARE_STRATEGIES))
    train: CorrectWarmupConfig = dataclasses.field(default_factory=lambda: CorrectWarmupConfig(steps=600))
    # Where plain SFT, mistake tuning and LEMMA start: "init" (the random init) or "base" (as the
    # papers: a model that already partly solves the task, here plain SFT on the reference
    # solutions for base_steps steps of train's sequences and lr, trained once per seed); with
    # "base" LEMMA's data is built on the base model's own wrong samples (student_* below).
    start: str = one_of("init", "init", "base")
    base_steps: int = at_least(300, 1)
    # LEMMA's student (start=base): student_samples samples at student_temperature (the paper's
    # 0.7) of each of student_problems fresh problems; the problems it gets wrong at least once
    # get the trajectories
    student_problems: int = at_least(256, 1)
    student_samples: int = at_least(4, 1)
    student_temperature: float = at_least(0.7, 0.0)
    # Share of LEMMA's pool (start=base) that is plain reference solutions of fresh problems, so
    # the model also sees answers with no reflection; 0 (the default) is the paper's pool of
    # trajectories only; a share is our choice, unsourced; below 1
    lemma_reference_share: float = at_least(0.0, 0.0)
    # mistake tuning: wrong rationales per correct one; self-rethinking rounds and mistakes shown
    incorrect_per_correct: float = at_least(1.0, 0.0)
    rethink_k: int = at_least(1, 0)
    rethink_shown: int = at_least(1, 1)
    # LEMMA: injections per error type and problem, connections
    lemma_per_type: int = at_least(1, 1)
    lemma_connections: list[str] = dataclasses.field(default_factory=lambda: ["fix_and_continue", "fresh_and_restart"])
    # SCL on the warm-up model: sampled two-turn episodes, flips kept as pairs, DPO (full weights)
    scl_problems: int = at_least(128, 1)
    scl_samples: int = at_least(4, 1)  # two-turn episodes per problem
    scl_temperature: float = 1.0
    scl_steps: int = at_least(20, 0)
    scl_lr: float = 1e-4
    scl_pairs_per_step: int = at_least(16, 1)
    scl_beta: float = 0.1
    scl_sft_beta: float = 0.1
    # RISE on the warm-up model: multi-turn rollouts with RISE's feedback, the best of
    # rise_samples candidates per turn (the paper: 16), reward-weighted regression exp(r / tau)
    # on each prefix's last turn
    rise_problems: int = at_least(64, 1)
    rise_samples: int = at_least(4, 1)
    rise_turns: int = at_least(2, 1)
    rise_temperature: float = 1.0
    rise_tau: float = 0.4
    rise_steps: int = at_least(20, 0)
    rise_lr: float = 1e-4
    rise_rows_per_step: int = at_least(16, 1)
    # UFO on the warm-up model: up to ufo_turns attempts with the unary feedback (the paper: 5),
    # trajectory reward (gamma, repetition penalty lambda, malformed penalty), GRPO over
    # ufo_samples episodes per problem, on-policy (no KL term)
    ufo_turns: int = at_least(3, 1)
    ufo_samples: int = at_least(4, 2)
    ufo_problems_per_step: int = at_least(8, 1)
    ufo_steps: int = at_least(12, 0)
    ufo_lr: float = 1e-4
    ufo_temperature: float = 1.0
    ufo_gamma: float = 0.5
    ufo_repetition: float = at_least(0.5, 0.0)
    ufo_malformed: float = at_least(0.1, 0.0)

    def check(self, where: str) -> None:
        for key in ("rise_temperature", "rise_tau", "ufo_temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}{key}={getattr(self, key)}: must be > 0")
        if not 0 < self.ufo_gamma <= 1:
            raise ConfigError(f"{where}ufo_gamma={self.ufo_gamma}: the per-turn discount, in (0, 1]")
        for key in ("rise_lr", "ufo_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}{key}={getattr(self, key)}: must be >= 0")


@dataclasses.dataclass
class SclVLConfig:
    """``mode: scl_vl`` (``offside_jax.correct.scl_vl``): SCL on OFFSIDE images with a tiny
    Qwen2.5-VL trained from scratch. The vanilla model is fine-tuned on the release's image
    questions plus a two-turn warm-up in SCL's format (turn-1 answers state the rumor with
    ``p_rumor``, turn-2 answers the fact with ``p_fix``); SCL then samples two-turn episodes on
    the training rumor items, keeps the flips as DPO pairs (prompt: bare question + image) and
    trains LoRA adapters with DPO; held-out rumor items are scored before and after (and after
    the SFT-on-chosen control with ``chosen_sft_control``)."""

    release: str = ""  # an OFFSIDE release root; "" makes a synthetic one in output_dir/release
    players: int = at_least(3, 1)  # synthetic release size
    image_size: int = at_least(56, 28)
    setting: str = "complete"
    splits: list[str] = dataclasses.field(default_factory=lambda: ["forget", "relearn", "classification_forget",
                                                                   "classification_relearn"])
    eval_fraction: float = 0.5  # rumor items held out for the before/after metrics
    # tiny model and its vanilla fine-tuning (release image questions + the two-turn warm-up)
    vocab_size: int = at_least(512, 64)
    hidden_size: int = at_least(64, 8)
    layers: int = at_least(2, 1)
    vanilla_steps: int = at_least(400, 1)  # 200 leaves most starting answers without an option letter
    vanilla_lr: float = 5e-3
    batch_size: int = at_least(16, 1)
    warmup_copies: int = at_least(4, 0)  # warm-up conversations per training rumor item
    p_rumor: float = 0.5
    p_fix: float = 0.5
    # episodes
    samples: int = at_least(4, 1)  # sampled two-turn episodes per training item
    temperature: float = 0.7
    max_new_tokens: int = at_least(32, 1)
    review_prompt: int = at_least(0, 0)
    generate_batch: int = at_least(16, 1)
    # DPO on LoRA adapters
    beta: float = 0.1
    sft_beta: float = 0.1
    lr: float = 1e-3
    steps: int = at_least(30, 1)
    pairs_per_step: int = at_least(4, 1)
    lora_rank: int = at_least(8, 1)
    lora_alpha: float = 16.0
    lora_target: str = r"(q|k|v|o|gate|up|down)_proj"
    # also train the same pairs with the preference term off (SFT on the chosen answers, same
    # session, LoRA and draws) and score it: separates correction from the answer format
    chosen_sft_control: bool = False


@dataclasses.dataclass
class CorrectConfig:
    """SCoRe on a verifiable task with a tiny random-init model and a character tokenizer
    (``model.vocab_size`` is the tokenizer's) or a ``pretrained`` model: warm-up, Stage I,
    Stage II, once per seed; or,
    with ``mode: compare``, every strategy of ``compare`` (:class:`CompareConfig`).
    ``output_dir`` gets the resolved config, ``results.json``, ``report.md`` and plots."""

    output_dir: str = MISSING
    # score: warm-up, Stage I, Stage II; compare: every strategy of ``compare`` on the task's
    # step format, one report (offside_jax.correct.compare)
    mode: str = one_of("score", "score", "compare", "scl_vl")
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    model: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    # A pretrained Llama-family model to start every run from instead of the random-init
    # ``model`` and its character tokenizer (modes score and compare): an HF model directory, a
    # GGUF file or smollm2 (the packaged SmolLM2-135M-Instruct), with its own tokenizer; the
    # episodes are the same plain text.
    pretrained: str = ""
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(data=1, fsdp=1, tensor=1))
    task: CorrectTaskConfig = dataclasses.field(default_factory=CorrectTaskConfig)
    format: EpisodeFormatConfig = dataclasses.field(default_factory=EpisodeFormatConfig)
    warmup: CorrectWarmupConfig = dataclasses.field(default_factory=CorrectWarmupConfig)
    stage1: ScoreStageConfig = dataclasses.field(default_factory=ScoreStageConfig)
    stage2: ScoreStageConfig = dataclasses.field(default_factory=ScoreStageConfig)
    eval_size: int = 256  # held-out problems (rumor_correction: every record, up to this many)
    # Also run both stages with the learning rate at 0 from the first seed's warm-up (the same
    # rollouts, rewards and steps, no update): the report's control row.
    lr0_control: bool = False
    # Checkpoints of every phase under output_dir/checkpoints (every this many warm-up steps or
    # RL steps, and at the end of each phase): an interrupted run resumes where it stopped.
    checkpoint_every: int = at_least(10, 0)
    progress: bool = True
    compare: CompareConfig = dataclasses.field(default_factory=CompareConfig)
    scl_vl: SclVLConfig = dataclasses.field(default_factory=SclVLConfig)


# -- unknown-key check ---------------------------------------------------------------------------


def check_known_keys(schema: type, values: Any, where: str, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first key of ``values`` (a nested dict, e.g. one YAML
    file) that ``schema`` has no field for, naming ``where`` and the valid keys at that level."""
    if not isinstance(values, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            level = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"{where}: unknown key {dotted!r}; valid keys at {level}: {', '.join(sorted(fields))}")
        sub_type = _dataclass_type(schema, key)
        if sub_type is not None:
            check_known_keys(sub_type, value, where, dotted + ".")


def _dataclass_type(schema: type, name: str) -> type | None:
    import typing

    hint = typing.get_type_hints(schema)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _nest(dotted_key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted_key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | Path | None, overrides: Sequence[str] = (), schema: type = FinetuneConfig) -> Any:
    """Load ``path`` (YAML) over the schema's defaults, apply ``key=value`` overrides, validate.

    Returns an instance of ``schema`` (a plain dataclass). Raises :class:`ConfigError`
    naming the file/override and key for unknown keys, bad types or missing values.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry their own line numbers
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        check_known_keys(schema, OmegaConf.to_container(loaded), str(path))
        layers.append((str(path), loaded))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        # `key=""` reaches us as `key=` once the shell drops the quotes: the empty string
        dotted = f"{key}=''" if value == "" else item
        try:
            parsed = OmegaConf.from_dotlist([dotted])
        except Exception as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        check_known_keys(schema, _nest(key, None), f"override {item!r}")
        layers.append((f"override {item!r}", parsed))
    merged = base
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {_first_line(e)}") from None
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e)) from None
    return validate(config)


def validate(config: Any, prefix: str = "") -> Any:
    """Check every declared constraint (:func:`one_of`, :func:`at_least`) and ``check`` hook of
    ``config`` and its sections; a violation is a :class:`ConfigError` naming the key. Returns
    ``config``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, dotted + ".")
        elif isinstance(value, dict):
            for key, item in value.items():
                if dataclasses.is_dataclass(item):
                    validate(item, f"{dotted}.{key}.")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(map(str, choices))}")
        low = f.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise ConfigError(f"{dotted}={value}: must be >= {low}")
    check = getattr(config, "check", None)
    if callable(check):
        check(prefix)
    return config


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def to_dict(config: Any) -> dict:
    """The config as plain JSON-able data (saved beside every checkpoint)."""
    return dataclasses.asdict(config)


def from_dict(data: dict, schema: type = FinetuneConfig) -> Any:
    """Rebuild a config saved with :func:`to_dict` (validated like a YAML file)."""
    check_known_keys(schema, data, "saved config")
    return validate(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))))
