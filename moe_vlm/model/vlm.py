"""Vision-language model: vision tower -> projector -> image embeddings spliced into the
decoder's token embeddings at the image placeholder tokens (LLaVA / MoE-LLaVA style).

Legend: B batch, S sequence, N images in the batch, P vision tokens per image,
P' = P / merge^2 image tokens per image after the projector, Dv vision width,
D decoder width.

Attention stays causal over the whole sequence (image tokens included); each sample may
hold any number of images (0 too): the ``N`` images of a batch fill its placeholder runs
in row-major order (sample by sample, left to right).

Two variants: a vision tower with MoE layers (V-MoE, ``vision.moe_every``; their router
outputs come back as ``ModelOutput.vision_routing`` and their losses join
``routing_loss``), and an encoder-free model (``vision=patch``, SOLO: a linear patch
embedding, ``moe_vlm.model.patch_embed``, and no projector).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_vlm.config.schema import Config, ProjectorConfig
from moe_vlm.model.decoder import DecoderLM, ModelOutput, build_model
from moe_vlm.model.moe import MoELayer
from moe_vlm.model.patch_embed import PatchEmbed, build_patch_embed
from moe_vlm.model.vision import IN_CHANNELS, VisionTransformer, build_vision
from moe_vlm.model.vision_moe import vision_loss_norm
from moe_vlm.routing.loss_norm import LossNorm
from moe_vlm.routing.router import RouterOutput


def merge_patches(feats: Tensor, m: int) -> Tensor:
    """feats [N, P, C] on a square, row-major patch grid -> [N, P / m^2, m * m * C]: each
    m x m neighbourhood concatenated (pixel shuffle), neighbourhoods in row-major order."""
    n, p, c = feats.shape
    side = math.isqrt(p)
    g = feats.reshape(n, side // m, m, side // m, m, c)  # [N, h, m, w, m, C]
    return g.permute(0, 1, 3, 2, 4, 5).reshape(n, (side // m) ** 2, m * m * c)


class Projector(nn.Module):
    """2-layer MLP with GELU (LLaVA-1.5's ``mlp2x_gelu``). With ``merge=m`` each m x m
    neighbourhood of patches is concatenated first (pixel shuffle), so an image costs
    m^2 times fewer decoder tokens."""

    def __init__(self, d_vision: int, d_model: int, merge: int = 1):
        super().__init__()
        self.merge = merge
        self.fc1 = nn.Linear(d_vision * merge * merge, d_model)
        self.fc2 = nn.Linear(d_model, d_model)

    @torch.no_grad()
    def init_weights(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        for lin in (self.fc1, self.fc2):
            lin.weight.normal_(0.0, std, generator=generator)
            lin.bias.zero_()

    def n_tokens(self, n_vision_tokens: int) -> int:
        if self.merge == 1:
            return n_vision_tokens
        side = math.isqrt(n_vision_tokens)
        if side * side != n_vision_tokens or side % self.merge:
            raise ValueError(f"projector.merge={self.merge} needs a square patch grid whose side "
                             f"divides by {self.merge}; the vision tower gives {n_vision_tokens} "
                             "tokens (drop the class token: vision.drop_cls=true)")
        return n_vision_tokens // (self.merge * self.merge)

    def forward(self, feats: Tensor) -> Tensor:
        """feats [N, P, Dv] -> [N, P', D]."""
        if self.merge > 1:
            self.n_tokens(feats.shape[1])  # validates the grid
            feats = merge_patches(feats, self.merge)
        return self.fc2(F.gelu(self.fc1(feats)))


class VisionLanguageModel(nn.Module):
    """``vision``: a ViT (then a projector maps its features to the decoder) or, encoder-free,
    a ``PatchEmbed`` already in the decoder's width (no projector: ``projector`` is None)."""

    def __init__(self, decoder: DecoderLM, vision: Union[VisionTransformer, PatchEmbed],
                 projector_cfg: ProjectorConfig, image_token_id: int):
        super().__init__()
        self.decoder = decoder
        self.vision = vision
        if isinstance(vision, PatchEmbed):
            self.projector: Optional[Projector] = None
            self.n_image_tokens = vision.n_output_tokens
        else:
            self.projector = Projector(vision.cfg.d_model, decoder.cfg.d_model, projector_cfg.merge)
            self.n_image_tokens = self.projector.n_tokens(vision.n_output_tokens)
        self.image_token_id = image_token_id

    # The decoder's interface, so training code treats both models alike.
    @property
    def cfg(self):
        return self.decoder.cfg

    def moe_layers(self) -> list[MoELayer]:
        """The decoder's MoE layers (indexed by decoder layer everywhere they are used)."""
        return self.decoder.moe_layers()

    def vision_moe_layers(self) -> list[MoELayer]:
        """The vision tower's MoE layers that run, in block order ([] if none)."""
        return self.vision.moe_layers()

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] -> [N, P', D]."""
        return self.encode_images(pixel_values)[0]

    def encode_images(self, pixel_values: Tensor, loss_norm: Optional[LossNorm] = None
                      ) -> tuple[Tensor, list[RouterOutput]]:
        """pixel_values [N, 3, H, W] -> (image embeddings [N, P', D], the vision MoE layers'
        router outputs, [] without them). ``loss_norm``: the step's totals (the decoder's;
        turned into the vision routers' here)."""
        if self.projector is None:  # encoder-free: patches straight to the decoder's width
            return self.vision(pixel_values), []
        norm = vision_loss_norm(loss_norm, self.vision.n_tokens, pixel_values.shape[0]) \
            if self.vision.moe_layers() else loss_norm
        feats, routing = self.vision.forward_routed(pixel_values, norm)  # [N, P, Dv]
        return self.projector(feats), routing

    def embed_inputs(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None,
                     loss_norm: Optional[LossNorm] = None
                     ) -> tuple[Tensor, Tensor, list[RouterOutput]]:
        """input_ids [B, S] -> (embeddings [B, S, D] with the images' spliced in at their
        placeholder runs, the image tokens [B, S] bool, the vision MoE layers' router
        outputs); shared by ``forward`` and generation's prefill."""
        embeds = self.decoder.embed(input_ids)  # [B, S, D]
        is_image = input_ids == self.image_token_id  # [B, S]
        n_img = 0 if pixel_values is None else pixel_values.shape[0]
        want = n_img * self.n_image_tokens
        msg = (f"the batch's image placeholder tokens are not {n_img} images x "
               f"{self.n_image_tokens} tokens per image; each image needs exactly "
               f"{self.n_image_tokens} consecutive placeholder ids")
        if input_ids.device.type == "cpu":
            n_slots = int(is_image.sum())
            if n_slots != want:
                raise ValueError(f"{msg} (found {n_slots})")
        else:  # checked on the device, so the host does not wait for the count
            torch._assert_async(is_image.sum() == want, msg)
        vision_routing: list[RouterOutput] = []
        if n_img or self.vision_moe_layers():
            # A tower with MoE layers runs without images too (an empty batch): every
            # micro-batch then has the same router outputs, and under expert parallelism
            # every process joins its layers' all-to-alls.
            if not n_img:
                s = self.vision.cfg.image_size
                pixel_values = embeds.new_zeros(0, IN_CHANNELS, s, s)
            feats, vision_routing = self.encode_images(pixel_values, loss_norm)  # [N, P', D]
            if n_img:
                embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds, is_image, vision_routing

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                pixel_values: Optional[Tensor] = None, token_mask: Optional[Tensor] = None,
                loss_norm: Optional[LossNorm] = None, token_rows: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> ModelOutput:
        """input_ids [B, S] with runs of ``n_image_tokens`` placeholder ids per image;
        pixel_values [N, 3, H, W] for the N images in placeholder order; ``token_mask``,
        ``loss_norm``, ``token_rows`` and ``position_ids`` (V2PE's, ``moe_vlm.data.v2pe``) as
        in ``DecoderLM.forward``."""
        embeds, is_image, vision_routing = self.embed_inputs(input_ids, pixel_values, loss_norm)
        out = self.decoder(inputs_embeds=embeds, labels=labels, token_mask=token_mask,
                           loss_norm=loss_norm, token_rows=token_rows, position_ids=position_ids,
                           image_mask=is_image)
        if vision_routing:
            out.vision_routing = vision_routing
            if labels is not None:
                out.routing_loss = out.routing_loss + sum(r.loss for r in vision_routing)
                out.loss = out.lm_loss + out.routing_loss
        return out


def build_vlm(cfg: Config, image_token_id: int, device: Union[str, torch.device] = "cpu",
              seed: int = 0) -> VisionLanguageModel:
    """Decoder from config (meta device, then one ``init_weights``), projector freshly
    initialised, and the vision tower from config or from a local Hugging Face checkpoint
    (``vision.name=hf``, whose weights are kept; upcycled into MoE blocks when
    ``vision.moe_every > 0``). ``vision.name=patch``: a freshly initialised patch
    embedding and no projector."""
    decoder = build_model(cfg.model, cfg.moe, cfg.routing, device=device, seed=seed)
    if cfg.vision.name == "patch":
        patches = build_patch_embed(cfg.vision, cfg.model.d_model, cfg.projector.merge,
                                    cfg.model.init_std, device=device, seed=seed + 1)
        return VisionLanguageModel(decoder, patches, cfg.projector, image_token_id)
    vision = build_vision(cfg.vision, device=device, seed=seed + 1, routing=cfg.routing,
                          backend=cfg.moe.backend)
    model = VisionLanguageModel(decoder, vision, cfg.projector, image_token_id)
    model.projector.to(device)
    g = torch.Generator(device=model.projector.fc1.weight.device).manual_seed(seed + 2)
    model.projector.init_weights(cfg.model.init_std, generator=g)
    return model
