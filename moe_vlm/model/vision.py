"""Vision tower: a pre-norm ViT built from ``VisionConfig`` or loaded from a local
Hugging Face SigLIP / CLIP checkpoint, returning per-patch features for the projector.

Legend: N images, C channels (3), H/W image height/width in pixels, g patches per
side (image_size // patch_size), P patches (g * g), T tokens in the encoder (P, or
P + 1 with a class token), Dv vision width, Hh heads, Hd head dim, F MLP width,
L blocks.

Build with ``build_vision`` (meta device, then ``init_weights`` in one place; or the
checkpoint's weights for ``vision.name=hf``). ``forward`` returns the output of block
``cfg.select_layer`` as ``[N, n_output_tokens, Dv]``; ``forward_routed`` also returns the
router outputs of the blocks whose MLP is an MoE layer (``vision.moe_every``, V-MoE:
``moe_vlm.model.vision_moe``).

Hugging Face parity: our ``select_layer=k`` (python index into the L block outputs)
equals HF's ``hidden_states[k]`` for ``-L <= k < -1`` (HF's tuple has the embeddings
in front, so negative indices line up) and HF's ``last_hidden_state`` for ``k=-1``
(post-normed for SigLIP, not for CLIP, whose ``post_layernorm`` only feeds the pooled
output). The attention-pooling head of SigLIP and CLIP's projection are not loaded.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_vlm.config.schema import ConfigError, RoutingConfig, VisionConfig
from moe_vlm.config.vision_moe import vision_moe_schedule
from moe_vlm.hf_io import read_json, weight_files
from moe_vlm.model.layers import GELU_ACTS, apply_rotary, gelu_act
from moe_vlm.model.moe import MoELayer
from moe_vlm.model.vision_moe import upcycle_tower_state, vision_moe_layer
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.router import RouterOutput

IN_CHANNELS = 3  # RGB; grayscale / RGBA images are converted before the tower
INIT_STD = 0.02  # truncated normal at +-2 std, as ViT / timm
ROPE2D_THETA = 10000.0
ACTS = GELU_ACTS
POS_EMBS = ("learned", "rope2d")

# Hugging Face ``hidden_act`` -> our ``act``. ``gelu_new`` is the same tanh approximation.
HF_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "quick_gelu": "quick_gelu"}
# model_type in config.json -> family; the two-tower types keep the tower in ``vision_config``.
HF_MODEL_TYPES = {"siglip_vision_model": "siglip", "siglip": "siglip",
                  "clip_vision_model": "clip", "clip": "clip"}
# Defaults of transformers' SiglipVisionConfig / CLIPVisionConfig: config.json files
# saved by older versions omit keys left at their default.
HF_DEFAULTS = {
    "siglip": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, num_channels=3,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "clip": dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, num_channels=3,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5),
}
HF_IMAGE_STATS = {  # (image_mean, image_std) when no preprocessor_config.json is given
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}
_PATCH_ANCHOR = "embeddings.patch_embedding.weight"  # finds the tower's key prefix


def _act_fn(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTS:
        raise ConfigError(f"vision.act: unknown value {name!r}; choose one of {list(ACTS)}")
    return gelu_act(name)


def rope2d_tables(head_dim: int, grid: int, n_prefix: int = 0, theta: float = ROPE2D_THETA,
                  device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables ``[n_prefix + g*g, Hd/2]`` in fp32 for axis-split 2-D rotary.

    Laid out for ``layers.apply_rotary`` (rotate-half): the first Hd/4 rotation pairs
    turn with the patch's row, the last Hd/4 with its column, so ``q . k`` depends only
    on the (row, column) offset between two patches. Patches are row-major, as
    ``Conv2d`` output flattens. The ``n_prefix`` leading tokens (the class token) get
    angle 0, i.e. no rotation: they carry no spatial position."""
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, device=device).float() / quarter)  # [Hd/4]
    idx = torch.arange(grid, device=device).float()
    rows, cols = idx.repeat_interleave(grid), idx.repeat(grid)  # [P] each
    ang = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)  # [P, Hd/2]
    ang = torch.cat([ang.new_zeros(n_prefix, ang.shape[1]), ang])  # [T, Hd/2]
    return ang.cos(), ang.sin()


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased projections (SigLIP / CLIP)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        n, t, _ = x.shape
        q = self.q_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # [N, Hh, T, Hd]
        k = self.k_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # [N, Hh, T, Hd]
        v = self.v_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # [N, Hh, T, Hd]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v)  # [N, Hh, T, Hd], no mask: all see all
        return self.out_proj(y.transpose(1, 2).reshape(n, t, self.n_heads * self.head_dim))  # [N, T, Dv]


class VisionMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = _act_fn(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [N, T, Dv] (via [N, T, F])


class VisionBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; the MLP is
    dense, or an MoE layer of MLP experts (``moe``, V-MoE)."""

    def __init__(self, cfg: VisionConfig, moe: Optional[MoELayer] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg.d_model, cfg.n_heads)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp: Union[VisionMLP, MoELayer] = moe if moe is not None else \
            VisionMLP(cfg.d_model, cfg.d_ff, cfg.act)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None,
                loss_norm: Optional[LossNorm] = None) -> tuple[Tensor, Optional[RouterOutput]]:
        """x [N, T, Dv] -> ([N, T, Dv], the MoE layer's router output or None). Image
        tokens have no padding: every token is routed."""
        x = x + self.attn(self.norm1(x), rope)  # [N, T, Dv]
        if isinstance(self.mlp, MoELayer):
            y, r = self.mlp(self.norm2(x), loss_norm=loss_norm)
            return x + y, r
        return x + self.mlp(self.norm2(x)), None  # [N, T, Dv]


def _check_vision_config(cfg: VisionConfig) -> None:
    """Raise ``ConfigError`` (a ValueError) naming the ``vision.*`` key to change."""
    for key in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff"):
        v = getattr(cfg, key)
        if v < 1:
            raise ConfigError(f"vision.{key}: must be >= 1, got {v}")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"vision.image_size: {cfg.image_size} is not divisible by "
                          f"vision.patch_size={cfg.patch_size}; change one of them")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"vision.d_model: {cfg.d_model} is not divisible by "
                          f"vision.n_heads={cfg.n_heads}; change one of them")
    if cfg.act not in ACTS:
        raise ConfigError(f"vision.act: unknown value {cfg.act!r}; choose one of {list(ACTS)}")
    if cfg.pos_emb not in POS_EMBS:
        raise ConfigError(f"vision.pos_emb: unknown value {cfg.pos_emb!r}; "
                          f"choose one of {list(POS_EMBS)}")
    hd = cfg.d_model // cfg.n_heads
    if cfg.pos_emb == "rope2d" and hd % 4:
        raise ConfigError(f"vision.pos_emb: rope2d splits the head dim over rows and columns "
                          f"and needs it divisible by 4, got vision.d_model / vision.n_heads = {hd}")
    if not -cfg.n_layers <= cfg.select_layer < cfg.n_layers:
        raise ConfigError(f"vision.select_layer: {cfg.select_layer} is out of range for "
                          f"vision.n_layers={cfg.n_layers}; use -{cfg.n_layers} .. {cfg.n_layers - 1} "
                          f"(-1 = last block)")
    if cfg.norm_eps <= 0:
        raise ConfigError(f"vision.norm_eps: must be > 0, got {cfg.norm_eps}")
    if cfg.moe_every > cfg.n_layers:
        raise ConfigError(f"vision.moe_every: {cfg.moe_every} exceeds the tower's "
                          f"{cfg.n_layers} blocks: no block would be MoE")
    runs = vision_moe_schedule(cfg.select_layer % cfg.n_layers + 1, cfg.moe_every)
    if cfg.moe_every and not any(runs):
        raise ConfigError(f"vision.moe_every: every MoE block comes after vision.select_layer="
                          f"{cfg.select_layer}, whose output the decoder reads, so none would "
                          "run; lower vision.moe_every")


class VisionTransformer(nn.Module):
    """ViT encoder: patchify (Conv2d), optional class token, learned or 2-D rotary
    positions, optional pre-norm, L pre-norm blocks, optional post-norm.

    Only blocks ``0 .. select_layer`` run: the later blocks (and ``post_norm`` unless
    the last block is selected) get no gradient, which matters for DDP's
    ``find_unused_parameters`` and for optimiser param groups.

    With ``cfg.moe_every > 0`` the MLPs of the blocks ``moe_vlm.config.vision_moe`` names
    are MoE layers routed by ``routing`` (the decoder's ``routing.*``, with the
    ``vision.moe_*`` keys in place) on the experts backend ``backend``."""

    def __init__(self, cfg: VisionConfig, routing: Optional[RoutingConfig] = None,
                 backend: str = "auto"):
        super().__init__()
        _check_vision_config(cfg)
        self.cfg = cfg
        self.schedule = vision_moe_schedule(cfg.n_layers, cfg.moe_every)  # is_moe per block
        routing = routing if routing is not None else RoutingConfig()
        self.grid = cfg.image_size // cfg.patch_size
        self.n_patches = self.grid * self.grid
        self.head_dim = cfg.d_model // cfg.n_heads
        self.layer_index = cfg.select_layer % cfg.n_layers  # 0-based index of the output block
        n_tokens = self.n_patches + int(cfg.cls_token)
        self.patch_embed = nn.Conv2d(IN_CHANNELS, cfg.d_model, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        self.cls_embed = nn.Parameter(torch.empty(cfg.d_model)) if cfg.cls_token else None
        self.pos_embed = nn.Embedding(n_tokens, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.pre_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList([
            VisionBlock(cfg, vision_moe_layer(cfg, routing, backend) if is_moe else None)
            for is_moe in self.schedule])
        self.post_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.post_norm else None
        if cfg.pos_emb == "rope2d":
            cos, sin = rope2d_tables(self.head_dim, self.grid, int(cfg.cls_token))
            self.register_buffer("rope_cos", cos, persistent=False)  # [T, Hd/2]
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    @property
    def n_output_tokens(self) -> int:
        """Tokens per image in ``forward``'s output: P, plus 1 if a class token is kept."""
        return self.n_patches + int(self.cfg.cls_token and not self.cfg.drop_cls)

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def n_tokens(self) -> int:
        """Tokens per image inside the tower (its MoE layers route them): P, plus 1 with
        a class token."""
        return self.n_patches + int(self.cfg.cls_token)

    @property
    def moe_block_ids(self) -> list[int]:
        """Indices of the blocks whose MLP is an MoE layer and runs (``select_layer``)."""
        return [i for i, is_moe in enumerate(self.schedule[: self.layer_index + 1]) if is_moe]

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers that run, in block order (``forward_routed``'s router outputs)."""
        return [self.blocks[i].mlp for i in self.moe_block_ids]

    def _norms(self) -> list[nn.LayerNorm]:
        norms = [n for blk in self.blocks for n in (blk.norm1, blk.norm2)]
        return norms + [n for n in (self.pre_norm, self.post_norm) if n is not None]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Every parameter and buffer is initialised here, deterministically from seed.

        Truncated normal (std 0.02, cut at +-2 std) for the patch, class, position and
        linear weights, the experts' weights included; all biases 0; LayerNorms to weight
        1, bias 0; routers normal (std 0.02) with zero balance bias. A dense tower draws
        exactly as before MoE blocks existed."""
        g = torch.Generator(device=self.patch_embed.weight.device).manual_seed(seed)

        def trunc(t: Tensor) -> None:
            nn.init.trunc_normal_(t, 0.0, INIT_STD, -2 * INIT_STD, 2 * INIT_STD, generator=g)

        trunc(self.patch_embed.weight)
        self.patch_embed.bias.zero_()
        if self.cls_embed is not None:
            trunc(self.cls_embed)
        if self.pos_embed is not None:
            trunc(self.pos_embed.weight)
        for blk in self.blocks:
            moe = blk.mlp if isinstance(blk.mlp, MoELayer) else None
            mlp = () if moe is not None else (blk.mlp.fc1, blk.mlp.fc2)
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.attn.out_proj, *mlp):
                trunc(lin.weight)
                lin.bias.zero_()
            if moe is not None:
                moe.router.init_weights(INIT_STD, generator=g)
                trunc(moe.experts.w_in)
                trunc(moe.experts.w_out)
                moe.experts.b_in.zero_()
                moe.experts.b_out.zero_()
        for norm in self._norms():
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        if self.rope_cos is not None:
            cos, sin = rope2d_tables(self.head_dim, self.grid, int(self.cfg.cls_token),
                                     device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] (normalised floats) -> features [N, n_output_tokens, Dv]
        from block ``select_layer`` (post-normed only if that is the last block)."""
        return self.forward_routed(pixel_values)[0]

    def forward_routed(self, pixel_values: Tensor, loss_norm: Optional[LossNorm] = None
                       ) -> tuple[Tensor, list[RouterOutput]]:
        """``forward``, plus the router output of each MoE layer that ran (in block order,
        [] for a dense tower). ``loss_norm``: the step's totals as the vision routers count
        them (``vision_moe.vision_loss_norm``), so their losses are shares of the step's."""
        check_pixel_values(pixel_values, self.cfg.image_size)
        n = pixel_values.shape[0]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, Dv, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, P, Dv], row-major patches
        if self.cls_embed is not None:
            cls = self.cls_embed.to(x.dtype).expand(n, 1, -1)  # [N, 1, Dv]
            x = torch.cat([cls, x], dim=1)  # [N, T, Dv]
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight  # [N, T, Dv]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        routing: list[RouterOutput] = []
        for blk in self.blocks[: self.layer_index + 1]:
            x, r = blk(x, rope, loss_norm)  # [N, T, Dv]
            if r is not None:
                routing.append(r)
        if self.post_norm is not None and self.layer_index == len(self.blocks) - 1:
            x = self.post_norm(x)
        if self.cls_embed is not None and self.cfg.drop_cls:
            x = x[:, 1:]  # [N, P, Dv]
        return x, routing


def check_pixel_values(pixel_values: Tensor, image_size: int) -> None:
    """Refuse what an image input [N, 3, image_size, image_size] of floats is not, saying
    how to fix it."""
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a [N, {IN_CHANNELS}, H, W] tensor, got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values has dtype {pixel_values.dtype}; convert images to "
                         f"float and normalise them with vision.image_mean / image_std first")
    c, h, w = pixel_values.shape[1:]
    if c != IN_CHANNELS:
        raise ValueError(f"pixel_values has {c} channels; the vision tower takes "
                         f"{IN_CHANNELS} (RGB): convert grayscale / RGBA images to RGB")
    s = image_size
    if (h, w) != (s, s):
        raise ValueError(f"pixel_values are {h}x{w} pixels; this vision tower takes {s}x{s} "
                         f"(vision.image_size={s}): resize / crop the images to {s}x{s}")


def build_vision(cfg: VisionConfig, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, routing: Optional[RoutingConfig] = None,
                 backend: str = "auto") -> VisionTransformer:
    """``vision.name=vit``: construct on the meta device, materialise on ``device``, then
    initialise every weight once in ``init_weights``. ``vision.name=hf``: load the local
    checkpoint at ``vision.hf_path`` (its config.json overrides the sizes in ``cfg``;
    ``select_layer``, ``drop_cls`` and the ``moe_*`` keys are kept; with ``moe_every > 0``
    the dense tower is upcycled, ``upcycle_vision``); the resolved config is ``model.cfg``.
    ``routing``, ``backend``: the vision MoE layers' (``routing.*``, ``moe.backend``)."""
    if cfg.name == "vit":
        with torch.device("meta"):
            model = VisionTransformer(cfg, routing, backend)
        model.to_empty(device=device)
        model.init_weights(seed)
        return model
    if cfg.name == "hf":
        if not cfg.hf_path:
            raise ConfigError("vision.hf_path: vision.name=hf needs the path of a local "
                              "Hugging Face SigLIP/CLIP checkpoint directory")
        model, _ = load_hf_vision(cfg.hf_path, cfg.select_layer, cfg.drop_cls, device=device)
        if cfg.moe_every > 0:
            model = upcycle_vision(model, cfg, routing, backend, seed)
        return model
    if cfg.name == "none":
        raise ConfigError("vision.name: 'none' is a text-only model; there is no vision "
                          "tower to build (use 'vit' or 'hf')")
    if cfg.name == "patch":
        raise ConfigError("vision.name: 'patch' is encoder-free: there is no vision tower "
                          "(moe_vlm.model.patch_embed.PatchEmbed, built by build_vlm)")
    raise ConfigError(f"vision.name: unknown value {cfg.name!r}; choose one of "
                      f"['none', 'vit', 'hf', 'patch']")


def upcycle_vision(dense: VisionTransformer, cfg: VisionConfig,
                   routing: Optional[RoutingConfig] = None, backend: str = "auto",
                   seed: int = 0) -> VisionTransformer:
    """Sparse upcycling of a dense tower (ours or a loaded SigLIP/CLIP one): the same tower
    with the MoE blocks ``cfg.moe_*`` asks for, every expert a copy of its block's MLP, the
    routers initialised from ``seed``, everything else copied. At step 0 it computes the
    dense tower's function where the kept weights sum to 1 (one expert, or
    ``vision.moe_renormalize=true``). Same device, dtype and train/eval mode as ``dense``."""
    moe_keys = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name.startswith("moe_")}
    moe_cfg = replace(dense.cfg, **moe_keys)
    if moe_cfg.moe_d_expert not in (None, moe_cfg.d_ff):
        raise ConfigError(f"vision.moe_d_expert: upcycling copies the tower's MLP (width "
                          f"{moe_cfg.d_ff}) into each expert; leave it null or set it to {moe_cfg.d_ff}")
    w = dense.patch_embed.weight
    with torch.device("meta"):
        model = VisionTransformer(moe_cfg, routing, backend)
    model.to_empty(device=w.device)
    model.init_weights(seed)
    model.load_state_dict(upcycle_tower_state(dense.state_dict(), model.state_dict(),
                                              [i for i, m in enumerate(model.schedule) if m]))
    return model.to(w.dtype).train(dense.training)


# --------------------------------------------------------------------------------------
# Hugging Face checkpoints (local files only; nothing is ever downloaded)


def _check_dir(path: Union[str, Path]) -> Path:
    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"vision checkpoint directory {d} does not exist (vision.hf_path "
                                f"must be a local directory; nothing is downloaded)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} not found: a Hugging Face checkpoint "
                                f"directory needs its config.json next to the weights")
    return d


def hf_vision_config(path: Union[str, Path], select_layer: int = -1,
                     drop_cls: bool = True) -> VisionConfig:
    """The ``VisionConfig`` of a local SigLIP / CLIP checkpoint, from its JSON files only
    (no weights read): use it to size the projector before loading."""
    d = _check_dir(path)
    raw = read_json(d / "config.json")
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{d / 'config.json'}: model_type {model_type!r} is not supported; "
                         f"supported: {sorted(HF_MODEL_TYPES)} (SigLIP / CLIP vision towers "
                         f"or two-tower models)")
    family = HF_MODEL_TYPES[model_type]
    if model_type in ("siglip", "clip"):
        raw = raw.get("vision_config") or {}
    hf = {**HF_DEFAULTS[family], **{k: v for k, v in raw.items() if v is not None}}
    if hf["num_channels"] != IN_CHANNELS:
        raise ValueError(f"{d / 'config.json'}: num_channels={hf['num_channels']}; only "
                         f"{IN_CHANNELS}-channel (RGB) towers are supported")
    if hf["hidden_act"] not in HF_ACTS:
        raise ValueError(f"{d / 'config.json'}: hidden_act {hf['hidden_act']!r} is not "
                         f"supported; supported: {sorted(HF_ACTS)}")
    if not isinstance(hf["image_size"], int) or not isinstance(hf["patch_size"], int):
        raise ValueError(f"{d / 'config.json'}: image_size and patch_size must be integers "
                         f"(square images), got {hf['image_size']!r}, {hf['patch_size']!r}")
    mean, std = HF_IMAGE_STATS[family]
    if (d / "preprocessor_config.json").is_file():
        pre = read_json(d / "preprocessor_config.json")
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        for key, v in (("image_mean", mean), ("image_std", std)):
            if not (isinstance(v, list) and len(v) == IN_CHANNELS):
                raise ValueError(f"{d / 'preprocessor_config.json'}: {key} must be a list of "
                                 f"{IN_CHANNELS} numbers, got {v!r}")
    clip = family == "clip"
    return VisionConfig(
        name="hf", hf_path=str(d), image_size=hf["image_size"], patch_size=hf["patch_size"],
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        act=HF_ACTS[hf["hidden_act"]], norm_eps=float(hf["layer_norm_eps"]),
        cls_token=clip, pre_norm=clip, post_norm=not clip, pos_emb="learned",
        select_layer=select_layer, drop_cls=drop_cls,
        image_mean=[float(x) for x in mean], image_std=[float(x) for x in std])


def _hf_names(cfg: VisionConfig) -> dict[str, str]:
    """Our state-dict name -> HF name relative to the tower prefix."""
    m = {"patch_embed.weight": "embeddings.patch_embedding.weight",
         "patch_embed.bias": "embeddings.patch_embedding.bias",
         "pos_embed.weight": "embeddings.position_embedding.weight"}
    if cfg.cls_token:
        m["cls_embed"] = "embeddings.class_embedding"
    if cfg.pre_norm:
        m.update({f"pre_norm.{p}": f"pre_layrnorm.{p}" for p in ("weight", "bias")})
    per_block = [("norm1", "layer_norm1"), ("attn.q_proj", "self_attn.q_proj"),
                 ("attn.k_proj", "self_attn.k_proj"), ("attn.v_proj", "self_attn.v_proj"),
                 ("attn.out_proj", "self_attn.out_proj"), ("norm2", "layer_norm2"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    for i in range(cfg.n_layers):
        for ours, theirs in per_block:
            for p in ("weight", "bias"):
                m[f"blocks.{i}.{ours}.{p}"] = f"encoder.layers.{i}.{theirs}.{p}"
    if cfg.post_norm:
        m.update({f"post_norm.{p}": f"post_layernorm.{p}" for p in ("weight", "bias")})
    return m


def _tower_prefix(keys: list[str], where: Path) -> str:
    """The prefix in front of ``embeddings.patch_embedding.weight``: '' (vision-only models
    saved by transformers 5), 'vision_model.' (older ones, two-tower models), or any
    wrapper such as 'model.vision_tower.vision_model.'."""
    found = sorted(k[: -len(_PATCH_ANCHOR)] for k in keys
                   if k == _PATCH_ANCHOR or k.endswith("." + _PATCH_ANCHOR))
    if not found:
        raise ValueError(f"{where}: no '{_PATCH_ANCHOR}' tensor; is this a SigLIP / CLIP "
                         f"vision checkpoint?")
    if len(found) > 1:
        raise ValueError(f"{where}: several vision towers (prefixes {found}); keep one")
    return found[0]


def load_hf_vision(path: Union[str, Path], select_layer: int = -1, drop_cls: bool = True,
                   device: Union[str, torch.device] = "cpu") -> tuple[VisionTransformer, VisionConfig]:
    """Load the vision tower of a local Hugging Face SigLIP / CLIP checkpoint directory.

    Reads ``config.json`` (+ ``preprocessor_config.json`` for image mean/std if present)
    and the weights in any layout ``moe_vlm.hf_io`` reads (safetensors or ``.bin``, one
    file or sharded); only the vision tower's tensors are read. Every expected tensor
    must be present with the shape config.json implies. Parameters are fp32 whatever the
    checkpoint's dtype. CLIP's patch embedding has no bias: ours is kept at 0.
    Returns the model (eval mode) and its config (also ``model.cfg``)."""
    cfg = hf_vision_config(path, select_layer, drop_cls)
    d = Path(cfg.hf_path)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    model.to_empty(device=device)
    model.init_weights(0)  # fills anything the checkpoint does not hold (CLIP patch bias)
    weights = weight_files(d)
    key_to_file, where = weights.files, weights.where
    prefix = _tower_prefix(list(key_to_file), where)
    names = _hf_names(cfg)
    ours = model.state_dict()
    if set(names) != set(ours):  # a module was added without its HF name
        raise RuntimeError(f"HF name map out of date: {sorted(set(names) ^ set(ours))}")
    family = HF_MODEL_TYPES[read_json(d / "config.json")["model_type"]]
    optional = {"patch_embed.bias"} if family == "clip" else set()  # CLIP: Conv2d(bias=False)
    wanted = {}
    for our_name, hf_name in names.items():
        key = prefix + hf_name
        if key in key_to_file:
            wanted[our_name] = key
        elif our_name not in optional:
            raise ValueError(f"{where}: missing tensor '{key}' (expected shape "
                             f"{tuple(ours[our_name].shape)} from {d / 'config.json'})")
    extra = f"{prefix}encoder.layers.{cfg.n_layers}.layer_norm1.weight"
    if extra in key_to_file:
        raise ValueError(f"{where}: has a tensor '{extra}' beyond num_hidden_layers="
                         f"{cfg.n_layers} in {d / 'config.json'}; the two disagree")
    tensors = weights.read(wanted.values())
    with torch.no_grad():
        for our_name, key in wanted.items():
            t, p = tensors[key], ours[our_name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key_to_file[key]}: tensor '{key}' has shape {tuple(t.shape)}, "
                                 f"expected {tuple(p.shape)} from {d / 'config.json'}")
            p.copy_(t)
    return model.eval(), model.cfg
