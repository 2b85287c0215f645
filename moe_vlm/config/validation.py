"""Value checks of a ``Config``: ranges, finiteness, combinations and sizes, each failure
a ``ConfigError`` naming the key to change. Pure (no files, no hardware: those are
``moe_vlm.config.environment``), so a finished run's ``config.yaml`` validates anywhere."""

from __future__ import annotations

import math
import warnings
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Any, Optional, get_type_hints

from moe_vlm.config.schema import Choice, Config, DataName, ModelConfig, v2pe_enabled
from moe_vlm.config.sizes import MoESizes, image_experts, resolve_moe_sizes
from moe_vlm.config.vision_moe import vision_moe_schedule, vision_moe_sizes
from moe_vlm.errors import ConfigError

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


def choice_error(err: Optional[BaseException]) -> Optional[ConfigError]:
    """OmegaConf's refusal of a value for a ``Choice`` field (``err`` or any error in its
    cause chain, as Hydra wraps it) in this module's words, one line naming the key and
    the choices; None for any other error."""
    while err is not None:
        key, owner = getattr(err, "full_key", None), getattr(err, "object_type", None)
        kind = choice_fields(owner).get(str(key).rsplit(".", 1)[-1]) \
            if key and isinstance(owner, type) and is_dataclass(owner) else None
        if kind is not None and "expected one of" in str(err):
            value = getattr(err, "value", None)
            return ConfigError(f"{key}: unknown value {value!r}; choose one of {list(kind.values())}")
        err = err.__cause__
    return None


def _at_least(low: int | float, pairs: list[tuple[str, Any]]) -> None:
    for key, v in pairs:
        _need(v >= low, key, f"must be >= {low}, got {v}")


def _positive(pairs: list[tuple[str, Any]]) -> None:
    for key, v in pairs:
        _need(v > 0, key, f"must be > 0, got {v}")


@lru_cache(maxsize=None)
def choice_fields(cls: type) -> dict[str, type[Choice]]:
    """The fields of config dataclass ``cls`` whose type is a ``Choice`` enum, with it."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Choice)}


def _check_choices(node: Any, prefix: str = "") -> None:
    """Every ``Choice`` field holds one of its type's values. OmegaConf refuses the others
    when it composes; this catches a config built in Python (``RoutingConfig(gate=...)``)."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
    for name, kind in choice_fields(type(node)).items():
        _one_of(getattr(node, name), f"{prefix}{name}", kind.values())


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


def _check_modality_routing(cfg: Config, sizes: MoESizes) -> None:
    """``routing.modality=groups|routers`` (Uni-MoE): image-text data, a gate and balance
    scope that split by modality, and groups each large enough for top-k."""
    r = cfg.routing
    _need(cfg.vision.name != "none", "routing.modality",
          f"{r.modality} routes image and text tokens apart: it needs a vision tower and "
          "image-text data (e.g. vision=vit_tiny data=synthetic_vlm)")
    _need(r.aux_loss_scope != "sequence", "routing.aux_loss_scope",
          f"sequence scope with routing.modality={r.modality} is not supported: the balance "
          "loss is taken per modality; use micro_batch or global_batch")
    if r.modality == "groups":
        _need(r.gate != "expert_choice", "routing.gate",
              "expert_choice with routing.modality=groups: an expert would pick tokens of the "
              "other modality when its own run out; use softmax_topk or sigmoid_topk")
        _need(0 < r.image_experts < 1, "routing.image_experts",
              f"must be in (0, 1) (the fraction of routed experts for image tokens), got "
              f"{r.image_experts}")
        n_img = sum(image_experts(sizes.n_experts, r.image_experts))
        for name, n in (("image", n_img), ("text", sizes.n_experts - n_img)):
            _need(n >= sizes.top_k, "routing.image_experts",
                  f"gives the {name} tokens {n} of the {sizes.n_experts} routed experts, fewer "
                  f"than the {sizes.top_k} each token picks; change the fraction or "
                  "moe.n_experts")


def _check_replay_and_forced_balance(cfg: Config) -> None:
    """``routing.replay`` / ``routing.force_balance`` override a token-choice selection:
    expert choice (decoder or vision tower) has none to override, and replaying a record
    while forcing balance would route by neither."""
    r, v = cfg.routing, cfg.vision
    gates = {"routing.gate": r.gate}
    if v.moe_every > 0:
        gates["vision.moe_gate"] = v.moe_gate
    for flag, on in (("routing.replay", r.replay != "none"), ("routing.force_balance", r.force_balance)):
        for key, gate in gates.items():
            _need(not on or gate != "expert_choice", key,
                  f"expert_choice has no per-token selection for {flag} to record, replay or "
                  f"balance (it is balanced by construction); use a token-choice gate or turn "
                  f"{flag} off")
    if r.replay != "none":
        _need(bool(r.replay_path), "routing.replay_path",
              f"routing.replay={r.replay} needs the record's directory: set routing.replay_path=DIR")
    _need(not (r.force_balance and r.replay == "replay"), "routing.force_balance",
          "routing.replay=replay already fixes the selection; turn one of them off")
    _need(not (r.force_balance and r.modality == "groups"), "routing.force_balance",
          "round-robin experts ignore routing.modality=groups (image tokens would reach text "
          "experts); use routing.modality=shared or routers")


def _check_seed(key: str, seed: Optional[int]) -> None:
    if seed is not None:
        _need(0 <= seed < MAX_SEED, key, f"must be in [0, 2**32), got {seed}")


def _validate_vision(cfg: Config) -> None:
    v, d = cfg.vision, cfg.data
    if d.name == "mixture":
        sources = tuple(n for n in DataName.values() if n != "mixture")
        for name, w in d.mixture.items():
            _need(name in sources, "data.mixture", f"unknown source {name!r}; choose from {list(sources)}")
            _need(w >= 0, "data.mixture", f"the weight of {name} must be >= 0 (0 = off), got {w}")
        on = {n for n, w in d.mixture.items() if w > 0}
        _need(bool(on), "data.mixture", "data=mixture needs at least one source with a weight "
              "> 0, e.g. data.mixture.stdlib=0.7 data.mixture.synthetic_vlm=0.3")
        _need(not {"text", "llava"} <= on, "data.mixture",
              "text and llava both read data.path; mix one of them")
        if on & {"text", "llava"}:
            _need(bool(d.path), "data.path", "the mixture's text/llava source needs data.path")
        if on & {"synthetic_vlm", "llava"}:
            _need(v.name != "none", "vision.name", "a mixture with image-text sources needs a "
                  "vision tower; pick e.g. vision=vit_tiny")
    if d.name == "text":
        _need(bool(d.path), "data.path", "data=text needs the corpus: a file, a folder or a glob")
    _need(0 < d.eval_fraction < 1, "data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}")
    _need(d.tokenize_workers >= 0, "data.tokenize_workers", f"must be >= 0, got {d.tokenize_workers}")
    if d.doc_mask:
        _need(d.name in ("text", "stdlib") and v.name == "none", "data.doc_mask",
              "masks attention at document boundaries of text corpora: use it with data=text or "
              "data=stdlib and vision=none")
    for delta in [d.v2pe_delta, *d.v2pe_train_deltas]:
        _need(0 < delta <= 1, "data.v2pe_delta" if delta == d.v2pe_delta else
              "data.v2pe_train_deltas", f"V2PE deltas must be in (0, 1], got {delta}")
    if v2pe_enabled(d):
        _need(v.name != "none", "data.v2pe_delta", "V2PE sets the positions of image tokens: "
              "it needs a vision tower (e.g. vision=vit_tiny) and image-text data")
    if d.tokenizer == "hf":
        _need(bool(d.tokenizer_path), "data.tokenizer_path", "data.tokenizer=hf needs a local tokenizer directory")
    # Checked whatever the tokenizer: BPETokenizer.train refuses it only after the run
    # directory was written.
    _need(d.bpe_vocab_size >= BPE_MIN_VOCAB, "data.bpe_vocab_size",
          f"must be >= {BPE_MIN_VOCAB} (256 byte symbols + 4 special tokens), got {d.bpe_vocab_size}")
    if d.name == "llava":
        _need(bool(d.path), "data.path", "data=llava needs the conversation JSON/JSONL file")
    if d.name in ("synthetic_vlm", "llava"):
        _need(v.name != "none", "vision.name",
              f"data.name={d.name} needs a vision tower; pick e.g. vision=vit_tiny or vision=hf")
    _need(cfg.projector.merge >= 1, "projector.merge", f"must be >= 1, got {cfg.projector.merge}")
    _need(d.max_images_per_seq >= 1, "data.max_images_per_seq", "must be >= 1")
    _validate_vision_moe(cfg)
    if v.name == "hf":  # sizes, statistics and layer count come from the checkpoint
        _need(bool(v.hf_path), "vision.hf_path", "vision.name=hf needs a local SigLIP/CLIP directory")
        return
    if v.name == "none":
        return
    # The tower is built from these values (moe_vlm.model.vision checks them again, but
    # only after the run directory was written); sizes first, they are divisors below.
    _at_least(1, [(f"vision.{k}", getattr(v, k))
                  for k in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff")])
    _need(v.image_size % v.patch_size == 0, "vision.image_size",
          f"{v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
    _need(v.d_model % v.n_heads == 0, "vision.d_model",
          f"{v.d_model} is not divisible by vision.n_heads={v.n_heads}")
    if v.name == "patch":
        _need(v.pos_emb == "learned", "vision.pos_emb", "vision.name=patch has no attention of "
              "its own for 2-D rotary positions: use learned (a table added to the patch "
              "embeddings; the decoder's rotary positions apply too)")
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


def _validate_vision_moe(cfg: Config) -> None:
    """``vision.moe_*``: MoE layers in the vision tower (``moe_vlm.config.vision_moe``)."""
    v, r = cfg.vision, cfg.routing
    _at_least(0, [("vision.moe_every", v.moe_every), ("vision.moe_aux_loss_coef", v.moe_aux_loss_coef)])
    _at_least(1, [("vision.moe_experts", v.moe_experts), ("vision.moe_top_k", v.moe_top_k)])
    if v.moe_d_expert is not None:
        _at_least(1, [("vision.moe_d_expert", v.moe_d_expert)])
    if v.moe_every == 0:
        return
    _need(v.name in ("vit", "hf"), "vision.moe_every",
          f"vision.name={v.name} has no vision tower to put MoE layers in (vision=patch sends "
          "patches straight to the decoder's MoE layers); set vision.moe_every=0")
    if v.moe_gate != "expert_choice":
        _need(v.moe_top_k <= v.moe_experts, "vision.moe_top_k",
              f"{v.moe_top_k} exceeds vision.moe_experts={v.moe_experts}")
    else:
        _need(r.bias_update_rate == 0, "vision.moe_gate",
              "expert_choice is balanced by construction, but the vision routers take "
              "routing.bias_update_rate > 0; use another vision.moe_gate or routing.bias_update_rate=0")
    _need(cfg.moe.backend != "triton", "moe.backend",
          "triton runs the decoder's fused SwiGLU experts only, not the vision tower's GELU "
          "MLP experts (vision.moe_every > 0): use moe.backend=auto (triton for the decoder "
          "where it runs, grouped_mm or torch for the vision experts)")
    if v.name == "vit":  # an hf tower's depth comes from its checkpoint (checked on loading)
        _need(v.moe_every <= v.n_layers, "vision.moe_every",
              f"{v.moe_every} exceeds vision.n_layers={v.n_layers}: no block would be MoE")
        runs = v.select_layer % v.n_layers + 1 if -v.n_layers <= v.select_layer < v.n_layers else 0
        _need(any(vision_moe_schedule(runs, v.moe_every)), "vision.moe_every",
              f"every MoE block comes after vision.select_layer={v.select_layer}, whose output "
              "the decoder reads, so none would run; lower vision.moe_every")
    if v.moe_gate != "expert_choice" and v.moe_top_k == 1 and r.normalize_top1 and (
            v.moe_renormalize or v.moe_gate == "sigmoid_topk"):
        warnings.warn(f"vision.moe_top_k=1 with {v.moe_gate} weights normalised: every weight "
                      "is 1, so the vision routers get no gradient from the LM loss (only from "
                      "the balance losses). Set vision.moe_renormalize=false (softmax) or "
                      "routing.normalize_top1=false", stacklevel=3)


def _check_recurrent_router(cfg: Config) -> None:
    """``routing.recurrent`` (RMoE): a state width and decoder MoE layers to carry it through."""
    r = cfg.routing
    _need(r.recurrent_dim >= 1, "routing.recurrent_dim",
          f"the recurrent router's state width must be >= 1, got {r.recurrent_dim} (the paper uses 128)")
    _need(n_moe_layers(cfg.model) > 0, "routing.recurrent",
          "the recurrent router runs through the decoder's MoE layers and this model has none "
          "(model.moe_every=0 or model.n_dense_layers >= model.n_layers); set routing.recurrent=false")


def n_moe_layers(m: ModelConfig) -> int:
    """How many decoder layers are MoE (``moe_vlm.model.decoder.ffn_schedule``)."""
    return 0 if m.moe_every <= 0 else len(range(m.n_dense_layers, m.n_layers, m.moe_every))


def _validate_sizes(cfg: Config, head_dim: int, sizes: MoESizes) -> None:
    """Refuse absurd sizes with a plain estimate of the biggest tensors (fp32 bytes) and of
    the whole model, instead of a ``RuntimeError``/``MemoryError`` from the allocator once
    the run directory exists. The limits are far above any real run (``MAX_*``). ``sizes``:
    the MoE layer as the model resolves it (``moe_vlm.config.sizes``)."""
    m, v, t = cfg.model, cfg.vision, cfg.train
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
         sizes.n_experts * m.d_model * 2 * sizes.d_expert),
        ("moe.n_shared", "the shared experts (d_model x 2 * n_shared * d_expert)",
         m.d_model * 2 * sizes.d_shared),
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
        n_vmoe = sum(vision_moe_schedule(v.n_layers, v.moe_every))
        vmoe = vision_moe_sizes(v)
        tensors.append(("vision.moe_experts", "the stacked vision expert weights (moe_experts x "
                        "d_model x moe_d_expert)", vmoe.n_experts * v.d_model * vmoe.d_expert))
        vision = 3 * v.patch_size**2 * v.d_model + patches * v.d_model \
            + v.n_layers * 4 * v.d_model**2 + (v.n_layers - n_vmoe) * 2 * v.d_model * v.d_ff \
            + n_vmoe * 2 * v.d_model * vmoe.d_expert * vmoe.n_experts
    elif v.name == "patch":
        side = v.patch_size * cfg.projector.merge
        patches = (v.image_size // side) ** 2
        vision = (3 * side**2 + patches) * m.d_model
        tensors.append(("vision.image_size", "the patch embedding and positions ((3 * patch_size**2 "
                        "+ (image_size / patch_size)**2) x model.d_model)", vision))
    for key, what, n in tensors:
        _need(4 * n <= MAX_TENSOR_BYTES, key,
              f"{what} would take ~{4 * n:.3g} bytes in fp32, beyond the 1 TiB (2**40 bytes) "
              "sanity limit; lower the sizes it names")
    n_moe = n_moe_layers(m)
    attn = m.d_model * head_dim * 2 * (m.n_heads + m.n_kv_heads)
    moe_ffn = 3 * m.d_model * (sizes.n_experts * sizes.d_expert + sizes.d_shared)
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
    _check_choices(cfg)
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
                  ("model.init_std", m.init_std), ("model.loss_chunk", m.loss_chunk),
                  ("moe.n_shared", moe.n_shared), ("train.warmup_steps", t.warmup_steps),
                  ("routing.aux_loss_coef", r.aux_loss_coef), ("routing.z_loss_coef", r.z_loss_coef),
                  ("routing.bias_update_rate", r.bias_update_rate),
                  ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                  ("train.max_skipped_steps", t.max_skipped_steps),
                  ("data.count_questions_after", cfg.data.count_questions_after),
                  ("data.vision_pretrain_steps", cfg.data.vision_pretrain_steps)])
    # theta and the frequency factors are divisors of the rotary frequencies; eps divides
    # in RMSNorm and AdamW: 0 or a negative value gives inf/NaN on the first step.
    _positive([("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps),
               ("model.rope_factor", m.rope_factor),
               ("model.rope_low_freq_factor", m.rope_low_freq_factor),
               ("model.rope_high_freq_factor", m.rope_high_freq_factor), ("train.eps", t.eps),
               ("train.vision_lr_scale", t.vision_lr_scale)])
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
    if m.rope_scaling == "llama3":
        _need(m.rope_high_freq_factor > m.rope_low_freq_factor, "model.rope_high_freq_factor",
              "must exceed model.rope_low_freq_factor")
    _need(moe.d_expert % moe.granularity == 0, "moe.granularity",
          f"moe.d_expert={moe.d_expert} must be divisible by the granularity {moe.granularity}")
    sizes = resolve_moe_sizes(moe, r)  # what the model builds: m*E experts, m*K per token
    k = sizes.top_k
    _need(k <= sizes.n_experts, "routing.top_k",
          f"top_k={r.top_k} (x granularity {moe.granularity} = {k}) exceeds the "
          f"{sizes.n_experts} routed experts (moe.n_experts x moe.granularity)")
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
    if r.modality != "shared":
        _check_modality_routing(cfg, sizes)
    _check_replay_and_forced_balance(cfg)
    if r.recurrent:
        _check_recurrent_router(cfg)
    u = cfg.upcycle
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
    if par.lsh:
        _validate_lsh(cfg, sizes.n_experts)
    _validate_sizes(cfg, hd, sizes)
    _validate_ternary(cfg)
    return cfg


def _validate_ternary(cfg: Config) -> None:
    """MoTE's keys: ``moe.ternary`` needs decoder MoE layers; ``moe.ternary_act_bits`` is 0
    (full-precision activations) or 2-16 bits."""
    moe = cfg.moe
    bits = moe.ternary_act_bits
    _need(bits == 0 or 2 <= bits <= 16, "moe.ternary_act_bits",
          f"must be 0 (full-precision activations) or 2 to 16 bits (MoTE: 8), got {bits}")
    if moe.ternary:
        _need(cfg.model.moe_every > 0, "moe.ternary",
              "makes the decoder's routed experts ternary, but model.moe_every=0 builds no MoE "
              "layer; set model.moe_every >= 1 or moe.ternary=false")


def _validate_lsh(cfg: Config, n_experts: int) -> None:
    """LSH-MoE (``parallel.lsh``): hash sizes, the (expert, code) key fitting int64, and
    no compilation (the bucketing's data-dependent sizes are not tested compiled)."""
    par = cfg.parallel
    _at_least(1, [("parallel.lsh_hashes", par.lsh_hashes), ("parallel.lsh_dim", par.lsh_dim)])
    _need(par.lsh_dim <= cfg.model.d_model, "parallel.lsh_dim",
          f"{par.lsh_dim} exceeds model.d_model={cfg.model.d_model}: each hash keeps lsh_dim of "
          "the token's dimensions; lower it")
    bits = par.lsh_hashes * math.log2(2 * par.lsh_dim) + math.log2(max(2, n_experts))
    _need(bits <= 62, "parallel.lsh_hashes",
          f"{par.lsh_hashes} hashes of {2 * par.lsh_dim} vertices x {n_experts} experts need "
          f"{bits:.0f} bits of bucket key (at most 62); lower parallel.lsh_hashes or parallel.lsh_dim")
    _check_seed("parallel.lsh_seed", par.lsh_seed)
    _need(not par.compile, "parallel.compile",
          "LSH compression (parallel.lsh) is not tested compiled; set parallel.compile=false")
