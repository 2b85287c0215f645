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
    members = [(v, v) for v in values.split()]
    return Choice(name, members, module=__name__, qualname=name)  # type: ignore[return-value]


RopeScaling = _choices("RopeScaling", "none linear llama3")
VisionName = _choices("VisionName", "none vit hf patch")
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
Checkpointing = _choices("Checkpointing", "none moe full")
ModalityRouting = _choices("ModalityRouting", "shared groups routers")
RoutingReplay = _choices("RoutingReplay", "none record replay")
UpcycleMethod = _choices("UpcycleMethod", "none copy split drop noise")
UpcycleBase = _choices("UpcycleBase", "auto copy split")
SharedInit = _choices("SharedInit", "slice whole random")
WandbMode = _choices("WandbMode", "offline online disabled")


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

    name: str = "tiny"  # a label for result tables (the model preset's name)
    vocab_size: int = 320  # token ids; must cover the tokenizer's
    d_model: int = 64  # residual stream width
    n_layers: int = 2  # decoder blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); divides n_heads
    head_dim: Optional[int] = None  # per-head width (null: d_model // n_heads)
    d_ff: int = 256  # width of the dense SwiGLU MLP
    n_dense_layers: int = 0  # the first n layers are dense
    moe_every: int = 1  # after those, every n-th layer is MoE (0 = none)
    max_seq_len: int = 256  # longest sequence (the rotary cache's length)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3 style)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2 style)
    # RoPE frequency scaling as in transformers' rope_scaling
    rope_scaling: RopeScaling = RopeScaling.none
    rope_factor: float = 1.0  # linear / llama3: how much longer the context gets
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings
    tie_embeddings: bool = True  # the output head reuses the token embedding
    init_std: float = 0.02  # std of the normal init of every weight (output projections scaled down)
    # Training loss over this many positions at a time, each chunk's logits recomputed in
    # the backward (memory for large vocabularies); 0 = all at once. Same loss to rounding
    loss_chunk: int = 0


@dataclass
class VisionConfig(_Section):
    """Vision tower. ``name``: ``none`` (text-only model), ``vit`` (built from this
    config), ``hf`` (a local Hugging Face SigLIP/CLIP vision checkpoint at ``hf_path``;
    its own config then overrides the sizes here), ``patch`` (encoder-free, SOLO: each
    image_size/patch_size patch goes through one linear map into the decoder, no tower
    and no projector; the keys of the tower's shape are unused).

    ``moe_every > 0`` makes the tower's MLPs MoE layers (V-MoE), with the decoder's router,
    experts and backends (``moe.backend``); their router is ``routing.*`` with the
    ``moe_*`` keys below in place of gate, top_k, renormalize and aux_loss_coef, and no
    routed scaling. ``vision.name=hf`` then upcycles: every expert starts as the
    checkpoint's MLP of its block."""

    # none: text-only; vit: built from this config; hf: hf_path; patch: encoder-free
    name: VisionName = VisionName.none
    hf_path: Optional[str] = None  # name=hf: a local SigLIP/CLIP checkpoint directory
    image_size: int = 32  # images are resized to image_size x image_size
    patch_size: int = 8  # square patches; divides image_size
    d_model: int = 64  # ViT width
    n_layers: int = 2  # ViT blocks
    n_heads: int = 4  # ViT attention heads
    d_ff: int = 256  # ViT MLP width
    act: Activation = Activation.gelu_tanh  # ViT MLP activation
    norm_eps: float = 1e-6  # LayerNorm epsilon
    cls_token: bool = False  # CLIP: a class token in front of the patches
    pre_norm: bool = False  # CLIP: LayerNorm on the embeddings before the blocks
    post_norm: bool = True  # SigLIP: LayerNorm on the last layer's output
    pos_emb: PosEmb = PosEmb.learned  # patch positions: learned table or 2-D rotary
    select_layer: int = -1  # which block's output feeds the projector (LLaVA uses -2)
    drop_cls: bool = True  # drop the class token from the features (if any)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # RGB, subtracted
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # RGB, divided by
    # V-MoE: every k-th block's MLP is an MoE layer (the last of each k: blocks k-1, 2k-1,
    # ...; V-MoE uses 2); 0 = a dense ViT
    moe_every: int = 0
    moe_experts: int = 8  # routed experts per vision MoE layer
    moe_top_k: int = 2  # experts per image token (capacity per expert for expert_choice)
    moe_d_expert: Optional[int] = None  # width of a vision expert (null: vision.d_ff, the MLP's)
    moe_gate: Gate = Gate.softmax_topk  # the vision routers' gate (routing.gate's choices)
    # Renormalise the k kept softmax weights to sum 1 (false: V-MoE's raw softmax weights;
    # true: experts copied from one MLP then compute it exactly, e.g. when upcycling)
    moe_renormalize: bool = False
    moe_aux_loss_coef: float = 0.01  # weight of the vision layers' Switch balance loss


@dataclass
class ProjectorConfig(_Section):
    """Vision features -> decoder embeddings. ``merge=2`` concatenates each 2x2 patch
    neighbourhood first (pixel shuffle), giving 4x fewer image tokens."""

    type: ProjectorType = ProjectorType.mlp2x_gelu  # LLaVA-1.5's two-layer GELU MLP
    # concatenate merge x merge patches first (1 = off); vision=patch: patches merge*patch_size wide
    merge: int = 1


@dataclass
class MoEConfig(_Section):
    """Expert sizes at granularity 1; ``granularity=m`` splits each expert m ways.

    The resolved layer has ``m * n_experts`` routed experts of width ``d_expert / m``
    with ``m * routing.top_k`` active (same active FLOPs), see ``config.sizes``.
    Shared experts keep total width ``n_shared * d_expert``. The ``moe/`` presets set
    ``d_expert`` to half the model's ``d_ff``.
    """

    n_experts: int = 8  # routed experts at granularity 1
    n_shared: int = 0  # shared experts (each d_expert wide) that see every token
    d_expert: int = 128  # width of a routed expert at granularity 1 (presets: model.d_ff / 2)
    granularity: int = 1  # m: each expert split m ways (m*n_experts of width d_expert/m)
    # expert compute: torch (per-expert loop, the reference), grouped_mm, triton (CUDA),
    # auto (the fastest that runs here)
    backend: Backend = Backend.auto
    # MoTE (Wang et al. 2025): the decoder's routed experts compute with ternary weights
    # {-1,0,1} x an absmean scale per expert and matrix, trained by straight-through estimation
    ternary: bool = False
    # with moe.ternary: bits of the per-token absmax quantisation of the ternary experts'
    # matmul inputs (MoTE/BitNet: 8); 0 keeps them full precision
    ternary_act_bits: int = 8


@dataclass
class RoutingConfig(_Section):
    """Gate, balancing losses and capacity. ``capacity_factor=None`` is dropless."""

    name: str = "mixtral_top2"  # a label for result tables (the routing preset's name)
    gate: Gate = Gate.softmax_topk  # softmax / sigmoid (DeepSeek-V3) top-k, or expert choice
    top_k: int = 2  # experts per token at granularity 1 (the layer routes m * top_k)
    renormalize: bool = True  # softmax_topk: renormalise the k kept weights to sum 1
    # At k=1 a normalised weight is always 1, so the LM loss gives the router no gradient;
    # false skips the normalisation at k=1 (Megatron-Core does), true keeps it (and warns).
    normalize_top1: bool = True
    # With capacity dropping: false renormalises over the k chosen experts before the drop
    # (a dropped expert's share is lost), true over the kept ones after it (DeepSpeed, GShard).
    renormalize_after_drop: bool = False
    routed_scaling: float = 1.0  # multiplies routed weights (DeepSeek-V3 uses 2.5)
    aux_loss_coef: float = 0.01  # weight of the Switch balance loss (1.0 when balanced)
    aux_loss_scope: AuxScope = AuxScope.micro_batch  # over which tokens the loads are counted
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE)
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: Optional[float] = None  # slots per expert: ceil(cf * T * k / E); null = dropless
    # Modality-aware experts (Uni-MoE): shared = one router over all experts; groups = image
    # tokens routed only among the image experts and text tokens among the others (shared
    # experts serve both); routers = one router per modality over the same experts. With
    # groups or routers the balance loss balances each modality's tokens apart
    modality: ModalityRouting = ModalityRouting.shared
    image_experts: float = 0.5  # modality=groups: the fraction of routed experts for image tokens
    # Router replay (Megatron-Core): record writes every MoE layer's selected experts per
    # step to routing.replay_path; replay routes by that record instead of top-k (combine
    # weights still from this run's router scores at the recorded experts)
    replay: RoutingReplay = RoutingReplay.none
    replay_path: Optional[str] = None  # routing.replay=record|replay: the record's directory
    # Benchmarks only: round-robin experts regardless of the scores (torchtitan's
    # _debug_force_load_balance); equal loads, meaningless training
    force_balance: bool = False
    # Layerwise recurrent router (RMoE, Qiu et al. 2024): each MoE layer's logits read a GRU
    # state carried from MoE layer to MoE layer (one GRU shared by all layers) instead of x
    recurrent: bool = False
    recurrent_dim: int = 128  # routing.recurrent: width R of the projection and GRU state (paper: 128)


@dataclass
class DataConfig(_Section):
    """Which dataset and how long each sample is."""

    name: DataName = DataName.synthetic_text  # the data source (a data=NAME preset sets it)
    seq_len: int = 128  # tokens per sample (<= model.max_seq_len)
    n_eval_samples: int = 64  # held-out samples per evaluation
    seed: int = 1234  # data seed, independent of the model seed
    tokenizer: Tokenizer = Tokenizer.byte  # bpe: trained on the embedded corpus; hf: a local dir
    tokenizer_path: Optional[str] = None  # tokenizer=hf: a local Hugging Face tokenizer dir
    bpe_vocab_size: int = 512  # tokenizer=bpe: vocabulary size to train
    path: Optional[str] = None  # llava: conversation JSON/JSONL file; text: a file, folder or glob
    image_dir: Optional[str] = None  # llava: folder the rows' "image" paths are relative to
    eval_path: Optional[str] = None  # llava: held-out JSON/JSONL (default: last n_eval_samples rows)
    streaming: bool = False  # llava: stream rows instead of loading the file
    # llava: image paths that leave data.image_dir ("../", absolute, a symlink out) are
    # refused unless this is true (a shared dataset file must not read arbitrary files)
    allow_outside_image_dir: bool = False
    pack: bool = False  # pack several samples into each sequence
    text_key: str = "text"  # text: the row field holding a document's text (.jsonl, .parquet)
    cache_dir: Optional[str] = None  # text/stdlib token caches (null: $MOE_VLM_CACHE or ~/.cache/moe_vlm)
    eval_fraction: float = 0.02  # text: documents held out (stdlib holds out a fixed list of files)
    tokenize_workers: int = 0  # tokenizer processes (0: all cores)
    # text / stdlib: attention stays inside each document and positions restart at every
    # document start (documents packed into one window do not see each other)
    doc_mask: bool = False
    # data=mixture: {source: weight}, sources among synthetic_text, synthetic_vlm, stdlib,
    # text, llava, each built with this config's other keys; exact proportions per block
    mixture: dict[str, float] = field(default_factory=dict)
    max_images_per_seq: int = 4  # packing budget: images per packed sequence
    # V2PE (InternVL3): an image token advances the rotary position by this delta (text
    # tokens by 1), in evaluation and inference; 1 = plain positions (off)
    v2pe_delta: float = 1.0
    # V2PE in training: each image's delta drawn from these (InternVL3: 1, 1/2, ..., 1/256);
    # empty = data.v2pe_delta
    v2pe_train_deltas: list[float] = field(default_factory=list)
    # synthetic_vlm: training samples before this global index ask no "how many shapes"
    # questions (a curriculum: counting, learned first, locks the image tokens into shape
    # presence and the colour/shape lookups never form; README "The default job")
    count_questions_after: int = 0
    # synthetic_vlm: steps of pre-training the vision tower and projector on the scenes'
    # attributes (kind, colour, size per quadrant) before the run's first step, the set's
    # stand-in for a pre-trained image encoder (moe_vlm.train.vision_pretrain); 0 = off.
    # Other data sets have no scene attributes and ignore it (as count_questions_after).
    vision_pretrain_steps: int = 0


def v2pe_enabled(d: DataConfig) -> bool:
    """Whether image tokens get V2PE's variable positions (``data.v2pe_*``)."""
    return d.v2pe_delta != 1.0 or bool(d.v2pe_train_deltas)


@dataclass
class TrainConfig(_Section):
    """Optimiser, schedule, batch sizes (global, in samples) and run cadence."""

    max_steps: int = 300  # optimiser steps of the whole run (the schedule's length)
    batch_size: int = 16  # global batch, samples per optimiser step
    micro_batch_size: Optional[int] = None  # None = batch_size (no accumulation)
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the schedule decays to min_lr_ratio * lr
    warmup_steps: int = 20  # linear warmup to lr
    schedule: Schedule = Schedule.cosine  # after warmup: cosine decay, warmup-stable-decay, constant
    wsd_decay_frac: float = 0.2  # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    # the vision tower's and projector's learning rate as a multiple of lr (same schedule).
    # Below 1 the image features change slowly: see README "The default job" for why
    vision_lr_scale: float = 1.0
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    precision: Precision = Precision.auto  # auto: bf16 autocast on CUDA with bf16, else fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: cuda when present)
    eval_every: int = 50  # steps between held-out evaluations
    ckpt_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl rows
    nan_policy: NanPolicy = NanPolicy.stop  # a non-finite loss: stop the run, or skip the step
    max_skipped_steps: int = 10  # nan_policy=skip: give up after this many
    stop_after_steps: Optional[int] = None  # exit (resumable) after N steps this call
    # CUDA: deterministic kernels (torch.use_deterministic_algorithms + the cuBLAS
    # workspace setting), bit-identical reruns at some speed cost. CPU runs are always
    # deterministic and ignore it.
    deterministic: bool = False
    # what trains: [all] or parameter groups such as projector, decoder, moe, router,
    # experts (moe_vlm.train.freeze); the rest is frozen
    trainable: list[str] = field(default_factory=lambda: ["all"])
    init_from: Optional[str] = None  # start from this run dir's (or file's) checkpoint weights
    # Resume refuses a config that differs from the run's saved one in anything but run
    # cadence and layout; list keys (or groups: "train", "routing.gate") to change them
    # deliberately. Applied and recorded in summary.json as changed_on_resume.
    allow_changes: list[str] = field(default_factory=list)
    # Read checkpoints written before checksums (pickled, weights_only=False): only for
    # files you trust, since unpickling a file can run code.
    trust_checkpoint: bool = False
    progress: bool = True  # a progress bar on the terminal
    # Build the next step's batches on a background thread during this step (same batches)
    prefetch: bool = True
    # CUDA: fp32 matmuls may use TF32 tensor cores (torch.set_float32_matmul_precision
    # "high"; our Triton kernels follow it). Faster fp32 runs, ~1e-3 relative rounding
    tf32: bool = False


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
    # Recompute activations in the backward instead of keeping them: none; moe (the routed
    # experts' compute in each MoE layer); full (each whole block: least memory, ~1/3 more
    # compute). Losses and gradients unchanged
    activation_checkpointing: Checkpointing = Checkpointing.none
    # torch.compile each block in place (grouped_mm needs bf16; triton not under expert
    # parallelism: moe_vlm.parallel.parallelize.apply_compile)
    compile: bool = False
    # LSH-MoE (Nie et al. 2024): hash the tokens bound for each expert into buckets, send and
    # compute only the bucket centroids, add each token's residual back (moe_vlm.model.lsh_dispatch)
    lsh: bool = False
    lsh_hashes: int = 2  # lsh: cross-polytope hashes per token; buckets per expert <= (2*lsh_dim)^lsh_hashes
    lsh_dim: int = 4  # lsh: dimensions kept by each hash's random rotation (2*lsh_dim vertices)
    lsh_seed: int = 0  # lsh: seed of the rotations (MoE layer i uses lsh_seed + i; same on every rank)
    lsh_compensate: bool = True  # lsh: residual-based error compensation (false: centroid output only)
    lsh_eval: bool = False  # lsh: compress in evaluation too (false: eval runs the exact, uncompressed layer)


@dataclass
class UpcycleConfig(_Section):
    """Start the MoE model from a dense checkpoint (``moe_vlm.upcycling``). Applied when
    a run starts fresh (not on resume); ``none`` trains from scratch."""

    # none: train from scratch; else how the experts start from the dense FFN (see README)
    method: UpcycleMethod = UpcycleMethod.none
    source: Optional[str] = None  # our run dir / checkpoint .pt, or a local HF directory
    # drop/noise start from copy or split (auto: copy when the widths allow)
    base: UpcycleBase = UpcycleBase.auto
    shared: SharedInit = SharedInit.slice  # shared experts from the dense FFN
    permute: bool = False  # shuffle the dense hidden units before slicing (Qwen1.5-MoE)
    drop_ratio: float = 0.5  # drop: fraction of each expert's units re-initialised
    noise_std: float = 0.01  # noise: std relative to each weight matrix's std
    router_std: Optional[float] = None  # None: model.init_std
    seed: Optional[int] = None  # None: the run's seed


@dataclass
class RunConfig(_Section):
    """Where the run writes. ``dir=None`` uses Hydra's output directory of the job."""

    dir: Optional[str] = None  # the run directory (again: resume); null: Hydra's job directory
    name: str = "run"  # a label for result tables and a sweep's directory


@dataclass
class LogConfig(_Section):
    """Experiment trackers mirroring ``metrics.jsonl`` (``moe_vlm.train.trackers``):
    optional extras, imported only when enabled (``pip install -e ".[trackers]"``)."""

    tensorboard: bool = False  # event files in <run.dir>/tensorboard
    wandb: bool = False  # a Weights & Biases run in <run.dir>/wandb
    wandb_mode: WandbMode = WandbMode.offline  # offline: nothing leaves the machine; online needs a login
    wandb_project: str = "moe-vlm"  # the W&B project
    wandb_entity: Optional[str] = None  # the W&B user or team (null: the login's default)
    name: Optional[str] = None  # the tracker run's name (null: run.name/<run dir name>)
    images: bool = True  # expert-load heatmaps (MoE layers x experts) on routing-metric rows


@dataclass
class Config(_Section):
    """The whole job: one section per config group, plus the seed."""

    seed: int = 0  # model init and everything random in training (data: data.seed)
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
    log: LogConfig = field(default_factory=LogConfig)
