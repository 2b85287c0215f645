"""Typed config schema: one dataclass per Hydra group, validated in one place.

Hydra merges the YAML presets in ``configs/`` onto these dataclasses (struct mode),
so an unknown key fails at start-up with the key's path. ``validate`` then checks
value ranges and combinations that a type cannot express and names the key to
change. Model code receives these dataclasses, never a ``DictConfig``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from moe_vlm.errors import ConfigError  # noqa: F401 - re-exported: the schema's error

GATES = ("softmax_topk", "sigmoid_topk", "expert_choice")
AUX_SCOPES = ("micro_batch", "sequence", "global_batch")
BACKENDS = ("auto", "torch", "grouped_mm", "triton")
ROPE_SCALINGS = ("none", "linear", "llama3")
UPCYCLE_METHODS = ("none", "copy", "split", "drop", "noise")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
NAN_POLICIES = ("stop", "skip")
ENGINES = ("torch", "deepspeed")




@dataclass
class ModelConfig:
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
    # RoPE frequency scaling as in transformers' rope_scaling: none | linear | llama3
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class VisionConfig:
    """Vision tower. ``name``: ``none`` (text-only model), ``vit`` (built from this
    config), ``hf`` (a local Hugging Face SigLIP/CLIP vision checkpoint at ``hf_path``;
    its own config then overrides the sizes here)."""

    name: str = "none"
    hf_path: Optional[str] = None
    image_size: int = 32
    patch_size: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    act: str = "gelu_tanh"  # gelu | gelu_tanh | quick_gelu
    norm_eps: float = 1e-6
    cls_token: bool = False  # CLIP: a class token in front of the patches
    pre_norm: bool = False  # CLIP: LayerNorm on the embeddings before the blocks
    post_norm: bool = True  # SigLIP: LayerNorm on the last layer's output
    pos_emb: str = "learned"  # learned | rope2d
    select_layer: int = -1  # which block's output feeds the projector (LLaVA uses -2)
    drop_cls: bool = True  # drop the class token from the features (if any)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ProjectorConfig:
    """Vision features -> decoder embeddings. ``merge=2`` concatenates each 2x2 patch
    neighbourhood first (pixel shuffle), giving 4x fewer image tokens."""

    type: str = "mlp2x_gelu"
    merge: int = 1


@dataclass
class MoEConfig:
    """Expert sizes at granularity 1; ``granularity=m`` splits each expert m ways.

    The resolved layer has ``m * n_experts`` routed experts of width ``d_expert / m``
    with ``m * routing.top_k`` active (same active FLOPs), see ``model.granularity``.
    Shared experts keep total width ``n_shared * d_expert``.
    """

    n_experts: int = 8
    n_shared: int = 0
    d_expert: int = 128
    granularity: int = 1
    backend: str = "auto"


@dataclass
class RoutingConfig:
    """Gate, balancing losses and capacity. ``capacity_factor=None`` is dropless."""

    name: str = "mixtral_top2"
    gate: str = "softmax_topk"
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
    aux_loss_scope: str = "micro_batch"
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    capacity_factor: Optional[float] = None  # None = dropless


@dataclass
class DataConfig:
    """Which dataset and how long each sample is."""

    name: str = "synthetic_text"  # synthetic_text | synthetic_vlm | llava
    seq_len: int = 128
    n_eval_samples: int = 64
    seed: int = 1234  # data seed, independent of the model seed
    tokenizer: str = "byte"  # byte | bpe (trained on the embedded corpus) | hf (local dir)
    tokenizer_path: Optional[str] = None  # tokenizer=hf: a local Hugging Face tokenizer dir
    bpe_vocab_size: int = 512
    path: Optional[str] = None  # llava: conversation JSON/JSONL file
    image_dir: Optional[str] = None  # llava: folder the rows' "image" paths are relative to
    eval_path: Optional[str] = None  # llava: held-out JSON/JSONL (default: last n_eval_samples rows)
    streaming: bool = False  # llava: stream rows instead of loading the file
    # llava: image paths that leave data.image_dir ("../", absolute, a symlink out) are
    # refused unless this is true (a shared dataset file must not read arbitrary files)
    allow_outside_image_dir: bool = False
    pack: bool = False  # pack several samples into each sequence
    max_images_per_seq: int = 4  # packing budget: images per packed sequence


@dataclass
class TrainConfig:
    """Optimiser, schedule, batch sizes (global, in samples) and run cadence."""

    max_steps: int = 300
    batch_size: int = 16  # global batch, samples per optimiser step
    micro_batch_size: Optional[int] = None  # None = batch_size (no accumulation)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    wsd_decay_frac: float = 0.2  # WSD: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto: bf16 autocast on CUDA with bf16, else fp32
    device: str = "auto"
    eval_every: int = 50
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    nan_policy: str = "stop"
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
class ParallelConfig:
    """Process layout (``moe_vlm.parallel``). The launcher (``torchrun`` or ``deepspeed``)
    decides how many processes run; every process is a data-parallel replica reading its
    slice of the (global) batch, and experts are sharded over groups of ``ep`` of them."""

    engine: str = "torch"  # torch (DDP + our EP) | deepspeed (ZeRO-1/2 + our EP)
    dp: Optional[int] = None  # data-parallel size; None = all launched processes (a check)
    ep: int = 1  # expert-parallel size: divides the process count and the routed experts
    zero_stage: int = 2  # engine=deepspeed: 1 (optimizer state) or 2 (+ gradients) partitioned
    fsdp: bool = False  # engine=torch: shard dense weights/grads/optimizer state (FSDP2) instead of DDP


@dataclass
class UpcycleConfig:
    """Start the MoE model from a dense checkpoint (``moe_vlm.upcycling``). Applied when
    a run starts fresh (not on resume); ``none`` trains from scratch."""

    method: str = "none"  # none | copy | split | drop | noise
    source: Optional[str] = None  # our run dir / checkpoint .pt, or a local HF directory
    base: str = "auto"  # drop/noise start from copy or split (auto: copy when widths allow)
    shared: str = "slice"  # shared experts from the dense FFN: slice | whole | random
    permute: bool = False  # shuffle the dense hidden units before slicing (Qwen1.5-MoE)
    drop_ratio: float = 0.5  # drop: fraction of each expert's units re-initialised
    noise_std: float = 0.01  # noise: std relative to each weight matrix's std
    router_std: Optional[float] = None  # None: model.init_std
    seed: Optional[int] = None  # None: the run's seed


@dataclass
class RunConfig:
    """Where the run writes. ``dir=None`` uses Hydra's output directory of the job."""

    dir: Optional[str] = None
    name: str = "run"


@dataclass
class Config:
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


# Sanity limits for sizes: beyond them a run only ends in an allocation failure (or an
# int32 index overflow) after its run directory was written, so refuse them up front.
MAX_VOCAB_SIZE = 2**31 - 1  # token ids are indexed as int32 by many kernels and tokenizers
MAX_SEQ_LEN = 2**24  # 16M positions; the rotary cache is max_seq_len x head_dim floats
MAX_TENSOR_BYTES = 2**40  # 1 TiB: no single weight or activation of a real run is this big
MAX_SEED = 2**32  # seeds must be non-negative for torch/numpy; data seeds are scaled up
BPE_MIN_VOCAB = 256 + 4  # byte symbols + <pad> <bos> <eos> <image> (moe_vlm.data.tokenizers)
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _need(value in choices, key, f"unknown value {value!r}; choose one of {list(choices)}")


def _at_least(low: int | float, pairs: list[tuple[str, Any]]) -> None:
    for key, v in pairs:
        _need(v >= low, key, f"must be >= {low}, got {v}")


def _positive(pairs: list[tuple[str, Any]]) -> None:
    for key, v in pairs:
        _need(v > 0, key, f"must be > 0, got {v}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """Refuse NaN and +-inf in every float field (and float lists such as
    ``vision.image_mean``): ``inf`` passes every ``>= 0`` check and then turns the loss or
    the weights into NaN, and ``nan`` fails comparisons with a misleading message."""
    for f in fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float):
            _need(math.isfinite(value), key, f"must be a finite number, got {value}")
        elif isinstance(value, (list, tuple)):
            bad = [x for x in value if isinstance(x, float) and not math.isfinite(x)]
            _need(not bad, key, f"must hold finite numbers, got {list(value)}")


def device_ok(name: str) -> bool:
    """Whether ``train.device`` names a device kind this repo runs on (``DEVICES``);
    whether that hardware is present is ``moe_vlm.config.environment``'s check."""
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    kind, _, index = name.partition(":")
    return kind == "cuda" and index.isdigit()


def _check_seed(key: str, seed: Optional[int]) -> None:
    if seed is not None:
        _need(0 <= seed < MAX_SEED, key, f"must be in [0, 2**32), got {seed}")


def _validate_vision(cfg: Config) -> None:
    v, d = cfg.vision, cfg.data
    _one_of(v.name, "vision.name", ("none", "vit", "hf"))
    _one_of(d.name, "data.name", ("synthetic_text", "synthetic_vlm", "llava"))
    _one_of(d.tokenizer, "data.tokenizer", ("byte", "bpe", "hf"))
    if d.tokenizer == "hf":
        _need(bool(d.tokenizer_path), "data.tokenizer_path", "data.tokenizer=hf needs a local tokenizer directory")
    # Checked whatever the tokenizer: BPETokenizer.train refuses it only after the run
    # directory was written.
    _need(d.bpe_vocab_size >= BPE_MIN_VOCAB, "data.bpe_vocab_size",
          f"must be >= {BPE_MIN_VOCAB} (256 byte symbols + 4 special tokens), got {d.bpe_vocab_size}")
    if d.name == "llava":
        _need(bool(d.path), "data.path", "data=llava needs the conversation JSON/JSONL file")
    if d.name != "synthetic_text":
        _need(v.name != "none", "vision.name",
              f"data.name={d.name} needs a vision tower; pick e.g. vision=vit_tiny or vision=hf")
    _one_of(cfg.projector.type, "projector.type", ("mlp2x_gelu",))
    _need(cfg.projector.merge >= 1, "projector.merge", f"must be >= 1, got {cfg.projector.merge}")
    _need(d.max_images_per_seq >= 1, "data.max_images_per_seq", "must be >= 1")
    if v.name == "hf":  # sizes, statistics and layer count come from the checkpoint
        _need(bool(v.hf_path), "vision.hf_path", "vision.name=hf needs a local SigLIP/CLIP directory")
        return
    if v.name == "none":
        return
    # The tower is built from these values (moe_vlm.model.vision checks them again, but
    # only after the run directory was written); sizes first, they are divisors below.
    _at_least(1, [(f"vision.{k}", getattr(v, k))
                  for k in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff")])
    _one_of(v.act, "vision.act", ("gelu", "gelu_tanh", "quick_gelu"))
    _one_of(v.pos_emb, "vision.pos_emb", ("learned", "rope2d"))
    _need(v.image_size % v.patch_size == 0, "vision.image_size",
          f"{v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
    _need(v.d_model % v.n_heads == 0, "vision.d_model",
          f"{v.d_model} is not divisible by vision.n_heads={v.n_heads}")
    if v.pos_emb == "rope2d":
        _need((v.d_model // v.n_heads) % 4 == 0, "vision.pos_emb",
              f"rope2d splits the head dim over rows and columns and needs it divisible by 4, "
              f"got vision.d_model / vision.n_heads = {v.d_model // v.n_heads}")
    _need(-v.n_layers <= v.select_layer < v.n_layers, "vision.select_layer",
          f"{v.select_layer} is out of range for vision.n_layers={v.n_layers}; use "
          f"-{v.n_layers} .. {v.n_layers - 1} (-1 = last block)")
    _positive([("vision.norm_eps", v.norm_eps)])
    _need(len(v.image_mean) == 3 and len(v.image_std) == 3, "vision.image_mean",
          "image_mean and image_std need 3 values (RGB)")
    _need(all(x > 0 for x in v.image_std), "vision.image_std",
          f"pixels are divided by it: every value must be > 0, got {list(v.image_std)}")
    side = v.image_size // v.patch_size
    if cfg.projector.merge > 1:
        _need(side % cfg.projector.merge == 0 and (v.drop_cls or not v.cls_token), "projector.merge",
              f"merge {cfg.projector.merge} needs the {side}x{side} patch grid side to divide by it "
              "and the class token dropped")


def n_moe_layers(m: ModelConfig) -> int:
    """How many decoder layers are MoE (``moe_vlm.model.decoder.ffn_schedule``)."""
    return 0 if m.moe_every <= 0 else len(range(m.n_dense_layers, m.n_layers, m.moe_every))


def _validate_sizes(cfg: Config, head_dim: int) -> None:
    """Refuse absurd sizes with a plain estimate of the biggest tensors (fp32 bytes) and of
    the whole model, instead of a ``RuntimeError``/``MemoryError`` from the allocator once
    the run directory exists. The limits are far above any real run (``MAX_*``)."""
    m, moe, v, t = cfg.model, cfg.moe, cfg.vision, cfg.train
    _need(m.vocab_size <= MAX_VOCAB_SIZE, "model.vocab_size",
          f"{m.vocab_size} exceeds {MAX_VOCAB_SIZE} (2**31 - 1), the largest id int32 indexing allows")
    _need(m.max_seq_len <= MAX_SEQ_LEN, "model.max_seq_len",
          f"{m.max_seq_len} exceeds {MAX_SEQ_LEN} (2**24) positions; lower it")
    micro, micro_key = (t.batch_size, "train.batch_size") if t.micro_batch_size is None \
        else (t.micro_batch_size, "train.micro_batch_size")
    tensors = [  # (key to change, what, number of fp32 elements)
        ("model.vocab_size", "the token embedding (vocab_size x d_model)", m.vocab_size * m.d_model),
        ("model.max_seq_len", "the rotary cache (max_seq_len x head_dim)", m.max_seq_len * head_dim),
        ("model.d_model", "an attention projection (d_model x n_heads * head_dim)",
         m.d_model * m.n_heads * head_dim),
        ("model.d_ff", "a dense MLP weight (d_model x 2 * d_ff)", m.d_model * 2 * m.d_ff),
        ("moe.n_experts", "the stacked expert weights (n_experts x d_model x 2 * d_expert)",
         moe.n_experts * m.d_model * 2 * moe.d_expert),
        ("moe.n_shared", "the shared experts (d_model x 2 * n_shared * d_expert)",
         m.d_model * 2 * moe.n_shared * moe.d_expert),
        (micro_key, f"a micro-batch's logits ({micro_key} x data.seq_len x model.vocab_size = "
                    f"{micro} x {cfg.data.seq_len} x {m.vocab_size})",
         micro * cfg.data.seq_len * m.vocab_size),
    ]
    vision = 0
    if v.name == "vit":
        patches = (v.image_size // v.patch_size) ** 2
        tensors += [("vision.image_size", "the patch positions ((image_size / patch_size)**2 x d_model)",
                     patches * v.d_model),
                    ("vision.d_ff", "a vision MLP weight (d_model x d_ff)", v.d_model * v.d_ff)]
        vision = 3 * v.patch_size**2 * v.d_model + patches * v.d_model \
            + v.n_layers * (4 * v.d_model**2 + 2 * v.d_model * v.d_ff)
    for key, what, n in tensors:
        _need(4 * n <= MAX_TENSOR_BYTES, key,
              f"{what} would take ~{4 * n:.3g} bytes in fp32, beyond the 1 TiB (2**40 bytes) "
              "sanity limit; lower the sizes it names")
    n_moe = n_moe_layers(m)
    attn = m.d_model * head_dim * 2 * (m.n_heads + m.n_kv_heads)
    moe_ffn = 3 * m.d_model * moe.d_expert * (moe.n_experts + moe.n_shared)
    params = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.n_layers * attn \
        + n_moe * moe_ffn + (m.n_layers - n_moe) * 3 * m.d_model * m.d_ff + vision
    _need(4 * params <= MAX_TENSOR_BYTES, "model.n_layers",
          f"the model would hold ~{params:.3g} parameters (~{4 * params:.3g} bytes in fp32), beyond "
          "the 1 TiB (2**40 bytes) sanity limit; shrink model.n_layers, model.d_model, "
          "moe.n_experts or moe.d_expert")


def validate(cfg: Config) -> Config:
    """Check ranges and combinations; raise ``ConfigError`` naming the key to change.

    Pure checks of the values (no files, no hardware: those are
    ``moe_vlm.config.environment.check_runnable``), so a finished run's ``config.yaml``
    validates on any machine. Every value a run would crash on, or silently misuse, is
    refused here, before anything is written."""
    _check_finite(cfg)
    m, moe, r, t = cfg.model, cfg.moe, cfg.routing, cfg.train
    _at_least(1, [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
                  ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                  ("model.n_kv_heads", m.n_kv_heads), ("model.d_ff", m.d_ff),
                  ("model.max_seq_len", m.max_seq_len),
                  ("model.rope_original_max_len", m.rope_original_max_len),
                  ("moe.n_experts", moe.n_experts),
                  ("moe.d_expert", moe.d_expert), ("moe.granularity", moe.granularity),
                  ("routing.top_k", r.top_k), ("data.seq_len", cfg.data.seq_len),
                  ("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                  ("train.eval_every", t.eval_every), ("data.n_eval_samples", cfg.data.n_eval_samples),
                  ("train.ckpt_every", t.ckpt_every), ("train.log_every", t.log_every),
                  ("parallel.dp", 1 if cfg.parallel.dp is None else cfg.parallel.dp),
                  ("parallel.ep", cfg.parallel.ep)])
    if m.head_dim is not None:
        _at_least(1, [("model.head_dim", m.head_dim)])
    _at_least(0, [("model.n_dense_layers", m.n_dense_layers), ("model.moe_every", m.moe_every),
                  ("model.init_std", m.init_std),
                  ("moe.n_shared", moe.n_shared), ("train.warmup_steps", t.warmup_steps),
                  ("routing.aux_loss_coef", r.aux_loss_coef), ("routing.z_loss_coef", r.z_loss_coef),
                  ("routing.bias_update_rate", r.bias_update_rate),
                  ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                  ("train.max_skipped_steps", t.max_skipped_steps)])
    # theta and the frequency factors are divisors of the rotary frequencies; eps divides
    # in RMSNorm and AdamW: 0 or a negative value gives inf/NaN on the first step.
    _positive([("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps),
               ("model.rope_factor", m.rope_factor),
               ("model.rope_low_freq_factor", m.rope_low_freq_factor),
               ("model.rope_high_freq_factor", m.rope_high_freq_factor), ("train.eps", t.eps)])
    _need(m.n_dense_layers <= m.n_layers, "model.n_dense_layers",
          f"{m.n_dense_layers} exceeds model.n_layers={m.n_layers}; lower it (or set "
          "model.moe_every=0 for a dense model)")
    _need(m.d_model % m.n_heads == 0 or m.head_dim is not None, "model.d_model",
          f"{m.d_model} is not divisible by model.n_heads={m.n_heads}; change one or set model.head_dim")
    _need(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
          f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    hd = m.head_dim if m.head_dim is not None else m.d_model // m.n_heads
    _need(hd % 2 == 0, "model.head_dim", f"rotary embeddings need an even head dim, got {hd}")
    _need(cfg.data.seq_len <= m.max_seq_len, "data.seq_len",
          f"{cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _one_of(m.rope_scaling, "model.rope_scaling", ROPE_SCALINGS)
    if m.rope_scaling == "llama3":
        _need(m.rope_high_freq_factor > m.rope_low_freq_factor, "model.rope_high_freq_factor",
              "must exceed model.rope_low_freq_factor")
    _one_of(moe.backend, "moe.backend", BACKENDS)
    _need(moe.d_expert % moe.granularity == 0, "moe.granularity",
          f"moe.d_expert={moe.d_expert} must be divisible by the granularity {moe.granularity}")
    _one_of(r.gate, "routing.gate", GATES)
    _one_of(r.aux_loss_scope, "routing.aux_loss_scope", AUX_SCOPES)
    n_exp, k = moe.n_experts * moe.granularity, r.top_k * moe.granularity
    _need(k <= n_exp, "routing.top_k",
          f"top_k={r.top_k} (x granularity {moe.granularity} = {k}) exceeds the "
          f"{n_exp} routed experts (moe.n_experts x moe.granularity)")
    _need(r.routed_scaling > 0, "routing.routed_scaling", f"must be > 0, got {r.routed_scaling}")
    if r.capacity_factor is not None:
        _need(r.capacity_factor > 0, "routing.capacity_factor",
              f"must be > 0 (or null for dropless), got {r.capacity_factor}")
    if r.gate != "expert_choice" and k == 1 and r.normalize_top1 and (
            r.renormalize or r.gate == "sigmoid_topk"):
        warnings.warn(f"routing: top_k={r.top_k} x granularity {moe.granularity} = 1 expert per "
                      f"token with {r.gate} weights normalised: every weight is 1, so the router "
                      "gets no gradient from the LM loss (only from the balance losses). Set "
                      "routing.normalize_top1=false to keep the raw weight (Megatron-Core), or "
                      "routing.renormalize=false", stacklevel=2)
    if r.gate == "expert_choice":
        _need(r.bias_update_rate == 0, "routing.bias_update_rate",
              "expert_choice is balanced by construction; set routing.bias_update_rate=0")
    u = cfg.upcycle
    _one_of(u.method, "upcycle.method", UPCYCLE_METHODS)
    _one_of(u.base, "upcycle.base", ("auto", "copy", "split"))
    _one_of(u.shared, "upcycle.shared", ("slice", "whole", "random"))
    if u.method != "none":
        _need(u.source is not None, "upcycle.source",
              f"upcycle.method={u.method} needs the dense checkpoint: set upcycle.source=PATH")
        _need(t.init_from is None, "train.init_from",
              "set either train.init_from or upcycle.method, not both (a checkpoint "
              "directory's config.yaml points train.init_from at itself: add "
              "train.init_from=null to upcycle from it)")
        _need(m.moe_every > 0, "model.moe_every",
              "upcycling makes MoE layers: set model.moe_every >= 1 (1 = every layer)")
    _need(0 <= u.drop_ratio <= 1, "upcycle.drop_ratio", f"must be in [0, 1], got {u.drop_ratio}")
    _need(u.noise_std >= 0, "upcycle.noise_std", f"must be >= 0, got {u.noise_std}")
    if u.router_std is not None:
        _need(u.router_std >= 0, "upcycle.router_std", f"must be >= 0 (or null), got {u.router_std}")
    for key, seed in (("seed", cfg.seed), ("data.seed", cfg.data.seed), ("upcycle.seed", u.seed)):
        _check_seed(key, seed)
    _one_of(t.schedule, "train.schedule", SCHEDULES)
    _one_of(t.precision, "train.precision", PRECISIONS)
    _one_of(t.nan_policy, "train.nan_policy", NAN_POLICIES)
    _need(device_ok(t.device), "train.device",
          f"unknown device {t.device!r}; choose one of {list(DEVICES)} (N = GPU index)")
    _need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _need(0 < t.wsd_decay_frac <= 1, "train.wsd_decay_frac", f"must be in (0, 1], got {t.wsd_decay_frac}")
    for key, beta in (("train.beta1", t.beta1), ("train.beta2", t.beta2)):
        _need(0 <= beta < 1, key, f"AdamW needs a decay rate in [0, 1), got {beta}")
    mb = t.micro_batch_size if t.micro_batch_size is not None else t.batch_size
    _need(mb >= 1 and t.batch_size % mb == 0, "train.micro_batch_size",
          f"train.batch_size={t.batch_size} must be a positive multiple of the micro batch {mb}")
    _need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    if t.stop_after_steps is not None:
        _need(t.stop_after_steps >= 1, "train.stop_after_steps", "must be >= 1 (or null)")
    _need(len(t.trainable) >= 1, "train.trainable",
          "names no group, so nothing would train; use [all] or e.g. [projector]")
    _validate_vision(cfg)
    _one_of(cfg.parallel.engine, "parallel.engine", ENGINES)
    par = cfg.parallel
    if par.dp is not None:
        _need(par.dp % par.ep == 0, "parallel.ep", f"{par.ep} must divide parallel.dp={par.dp}")
        _need(t.batch_size % par.dp == 0, "train.batch_size",
              f"{t.batch_size} is global and must be divisible by parallel.dp={par.dp}")
    if par.engine == "deepspeed":
        _need(par.zero_stage in (1, 2), "parallel.zero_stage",
              f"engine=deepspeed runs ZeRO stage 1 or 2, got {par.zero_stage} "
              "(stage 0 is plain data parallelism: use parallel.engine=torch)")
        _need(not par.fsdp, "parallel.fsdp",
              "FSDP is the torch engine's sharding; with engine=deepspeed use parallel.zero_stage")
        _need(t.nan_policy == "stop", "train.nan_policy",
              "engine=deepspeed steps inside DeepSpeed and cannot skip a step; use stop "
              "(or parallel.engine=torch)")
    _validate_sizes(cfg, hd)
    return cfg
