"""Typed config schema: one dataclass per Hydra group, validated in one place.

Hydra merges the YAML presets in ``configs/`` onto these dataclasses (struct mode),
so an unknown key fails at start-up with the key's path. ``validation.validate`` then
checks value ranges and combinations that a type cannot express and names the key to
change. Model code receives these dataclasses, never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Optional

from moe_vlm.errors import ConfigError  # noqa: F401 - re-exported: the schema's error


class Choice(str, Enum):
    """A config value from a fixed set. The field's type is what OmegaConf checks a YAML or
    command-line value against (by member *name*, so every member is named as its value),
    and where ``validation`` and ``moe-vlm train --help`` read the choices from.

    A member is a ``str``: it equals its value (``cfg.routing.gate == "expert_choice"``)
    and prints as it. The config dataclasses store the plain string (``_Section``), so
    ``asdict(cfg)``, summary.json and checkpoints (``torch.load(weights_only=True)``
    refuses any class it does not know) hold builtins only."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)


def _choices(name: str, values: str) -> type[Choice]:
    """A ``Choice`` enum whose members are the space-separated ``values``, each named as itself."""
    return Choice(name, [(v, v) for v in values.split()], module=__name__, qualname=name)  # type: ignore[return-value]


RopeScaling = _choices("RopeScaling", "none linear llama3")
VisionName = _choices("VisionName", "none vit hf")
Activation = _choices("Activation", "gelu gelu_tanh quick_gelu")
PosEmb = _choices("PosEmb", "learned rope2d")
ProjectorType = _choices("ProjectorType", "mlp2x_gelu")
Backend = _choices("Backend", "auto torch grouped_mm triton")
Gate = _choices("Gate", "softmax_topk sigmoid_topk expert_choice")
AuxScope = _choices("AuxScope", "micro_batch sequence global_batch")
DataName = _choices("DataName", "synthetic_text synthetic_vlm llava text stdlib mixture")
Tokenizer = _choices("Tokenizer", "byte bpe hf")
Schedule = _choices("Schedule", "cosine wsd constant")
Precision = _choices("Precision", "auto fp32 bf16")
NanPolicy = _choices("NanPolicy", "stop skip")
Engine = _choices("Engine", "torch deepspeed")
UpcycleMethod = _choices("UpcycleMethod", "none copy split drop noise")
UpcycleBase = _choices("UpcycleBase", "auto copy split")
SharedInit = _choices("SharedInit", "slice whole random")


class _Section:
    """Base of the config dataclasses: a ``Choice`` member passed in (OmegaConf passes
    members, code may pass either) is stored as its plain string; see ``Choice``."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type] - subclasses are dataclasses
            value = getattr(self, f.name)
            if isinstance(value, Choice):
                setattr(self, f.name, str(value.value))


@dataclass
class ModelConfig(_Section):
    """Decoder shape. ``moe_every=0`` gives a dense model."""

    name: str = "tiny"
    vocab_size: int = 320
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # None -> d_model // n_heads
    d_ff: int = 256  # width of the dense SwiGLU MLP
    n_dense_layers: int = 0  # the first n layers are dense
    moe_every: int = 1  # after those, every n-th layer is MoE (0 = none)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3 style)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2 style)
    # RoPE frequency scaling as in transformers' rope_scaling
    rope_scaling: RopeScaling = RopeScaling.none
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class VisionConfig(_Section):
    """Vision tower. ``name``: ``none`` (text-only model), ``vit`` (built from this
    config), ``hf`` (a local Hugging Face SigLIP/CLIP vision checkpoint at ``hf_path``;
    its own config then overrides the sizes here)."""

    name: VisionName = VisionName.none
    hf_path: Optional[str] = None
    image_size: int = 32
    patch_size: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    act: Activation = Activation.gelu_tanh
    norm_eps: float = 1e-6
    cls_token: bool = False  # CLIP: a class token in front of the patches
    pre_norm: bool = False  # CLIP: LayerNorm on the embeddings before the blocks
    post_norm: bool = True  # SigLIP: LayerNorm on the last layer's output
    pos_emb: PosEmb = PosEmb.learned
    select_layer: int = -1  # which block's output feeds the projector (LLaVA uses -2)
    drop_cls: bool = True  # drop the class token from the features (if any)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ProjectorConfig(_Section):
    """Vision features -> decoder embeddings. ``merge=2`` concatenates each 2x2 patch
    neighbourhood first (pixel shuffle), giving 4x fewer image tokens."""

    type: ProjectorType = ProjectorType.mlp2x_gelu
    merge: int = 1


@dataclass
class MoEConfig(_Section):
    """Expert sizes at granularity 1; ``granularity=m`` splits each expert m ways.

    The resolved layer has ``m * n_experts`` routed experts of width ``d_expert / m``
    with ``m * routing.top_k`` active (same active FLOPs), see ``model.granularity``.
    Shared experts keep total width ``n_shared * d_expert``.
    """

    n_experts: int = 8
    n_shared: int = 0
    d_expert: int = 128
    granularity: int = 1
    backend: Backend = Backend.auto


@dataclass
class RoutingConfig(_Section):
    """Gate, balancing losses and capacity. ``capacity_factor=None`` is dropless."""

    name: str = "mixtral_top2"
    gate: Gate = Gate.softmax_topk
    top_k: int = 2
    renormalize: bool = True  # softmax_topk: renormalise the k kept weights to sum 1
    # At k=1 a normalised weight is always 1, so the LM loss gives the router no gradient;
    # false skips the normalisation at k=1 (Megatron-Core does), true keeps it (and warns).
    normalize_top1: bool = True
    # With capacity dropping: false renormalises over the k chosen experts before the drop
    # (a dropped expert's share is lost), true over the kept ones after it (DeepSpeed, GShard).
    renormalize_after_drop: bool = False
    routed_scaling: float = 1.0  # multiplies routed weights (DeepSeek-V3 uses 2.5)
    aux_loss_coef: float = 0.01
    aux_loss_scope: AuxScope = AuxScope.micro_batch
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: Optional[float] = None  # None = dropless


@dataclass
class DataConfig(_Section):
    """Which dataset and how long each sample is."""

    name: DataName = DataName.synthetic_text
    seq_len: int = 128
    n_eval_samples: int = 64
    seed: int = 1234  # data seed, independent of the model seed
    tokenizer: Tokenizer = Tokenizer.byte  # bpe: trained on the embedded corpus; hf: a local dir
    tokenizer_path: Optional[str] = None  # tokenizer=hf: a local Hugging Face tokenizer dir
    bpe_vocab_size: int = 512
    path: Optional[str] = None  # llava: conversation JSON/JSONL file; text: a file, folder or glob
    image_dir: Optional[str] = None  # llava: folder the rows' "image" paths are relative to
    eval_path: Optional[str] = None  # llava: held-out JSON/JSONL (default: last n_eval_samples rows)
    streaming: bool = False  # llava: stream rows instead of loading the file
    # llava: image paths that leave data.image_dir ("../", absolute, a symlink out) are
    # refused unless this is true (a shared dataset file must not read arbitrary files)
    allow_outside_image_dir: bool = False
    pack: bool = False  # pack several samples into each sequence
    # text / stdlib (moe_vlm.data.text_corpus): the row field holding a document's text,
    # where token caches live (null: $MOE_VLM_CACHE or ~/.cache/moe_vlm), the fraction of
    # documents held out (stdlib: a fixed list of files instead), tokenizer processes (0: all cores)
    text_key: str = "text"
    cache_dir: Optional[str] = None
    eval_fraction: float = 0.02
    tokenize_workers: int = 0
    # text / stdlib: attention stays inside each document and positions restart at every
    # document start (documents packed into one window do not see each other)
    doc_mask: bool = False
    # data=mixture: {source: weight}, sources among synthetic_text, synthetic_vlm, stdlib,
    # text, llava, each built with this config's other keys; exact proportions per block
    mixture: dict[str, float] = field(default_factory=dict)
    max_images_per_seq: int = 4  # packing budget: images per packed sequence


@dataclass
class TrainConfig(_Section):
    """Optimiser, schedule, batch sizes (global, in samples) and run cadence."""

    max_steps: int = 300
    batch_size: int = 16  # global batch, samples per optimiser step
    micro_batch_size: Optional[int] = None  # None = batch_size (no accumulation)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Schedule = Schedule.cosine
    wsd_decay_frac: float = 0.2  # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    precision: Precision = Precision.auto  # auto: bf16 autocast on CUDA with bf16, else fp32
    device: str = "auto"
    eval_every: int = 50
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    nan_policy: NanPolicy = NanPolicy.stop
    max_skipped_steps: int = 10  # nan_policy=skip: give up after this many
    stop_after_steps: Optional[int] = None  # exit (resumable) after N steps this call
    # CUDA: deterministic kernels (torch.use_deterministic_algorithms + the cuBLAS
    # workspace setting), bit-identical reruns at some speed cost. CPU runs are always
    # deterministic and ignore it.
    deterministic: bool = False
    trainable: list[str] = field(default_factory=lambda: ["all"])  # groups: moe_vlm.train.freeze
    init_from: Optional[str] = None  # start from this run dir's (or file's) checkpoint weights
    # Resume refuses a config that differs from the run's saved one in anything but run
    # cadence and layout; list keys (or groups: "train", "routing.gate") to change them
    # deliberately. Applied and recorded in summary.json as changed_on_resume.
    allow_changes: list[str] = field(default_factory=list)
    # Read checkpoints written before checksums (pickled, weights_only=False): only for
    # files you trust, since unpickling a file can run code.
    trust_checkpoint: bool = False
    progress: bool = True


@dataclass
class ParallelConfig(_Section):
    """Process layout (``moe_vlm.parallel``). The launcher (``torchrun`` or ``deepspeed``)
    decides how many processes run; every process is a data-parallel replica reading its
    slice of the (global) batch, and experts are sharded over groups of ``ep`` of them."""

    engine: Engine = Engine.torch  # torch (DDP + our EP) | deepspeed (ZeRO-1/2 + our EP)
    dp: Optional[int] = None  # data-parallel size; None = all launched processes (a check)
    ep: int = 1  # expert-parallel size: divides the process count and the routed experts
    zero_stage: int = 2  # engine=deepspeed: 1 (optimizer state) or 2 (+ gradients) partitioned
    fsdp: bool = False  # engine=torch: shard dense weights/grads/optimizer state (FSDP2) instead of DDP


@dataclass
class UpcycleConfig(_Section):
    """Start the MoE model from a dense checkpoint (``moe_vlm.upcycling``). Applied when
    a run starts fresh (not on resume); ``none`` trains from scratch."""

    method: UpcycleMethod = UpcycleMethod.none
    source: Optional[str] = None  # our run dir / checkpoint .pt, or a local HF directory
    base: UpcycleBase = UpcycleBase.auto  # drop/noise start from copy or split (auto: copy when widths allow)
    shared: SharedInit = SharedInit.slice  # shared experts from the dense FFN
    permute: bool = False  # shuffle the dense hidden units before slicing (Qwen1.5-MoE)
    drop_ratio: float = 0.5  # drop: fraction of each expert's units re-initialised
    noise_std: float = 0.01  # noise: std relative to each weight matrix's std
    router_std: Optional[float] = None  # None: model.init_std
    seed: Optional[int] = None  # None: the run's seed


@dataclass
class RunConfig(_Section):
    """Where the run writes. ``dir=None`` uses Hydra's output directory of the job."""

    dir: Optional[str] = None
    name: str = "run"


@dataclass
class Config(_Section):
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    run: RunConfig = field(default_factory=RunConfig)
