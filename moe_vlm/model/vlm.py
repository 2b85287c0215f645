"""Vision-language model: vision tower -> projector -> image embeddings spliced into the
decoder's token embeddings at the image placeholder tokens (LLaVA / MoE-LLaVA style).

Legend: B batch, S sequence, N images in the batch, P vision tokens per image,
P' = P / merge^2 image tokens per image after the projector, Dv vision width,
D decoder width.

Attention stays causal over the whole sequence (image tokens included); each sample may
hold any number of images (0 too): the ``N`` images of a batch fill its placeholder runs
in row-major order (sample by sample, left to right).
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
from moe_vlm.model.vision import VisionTransformer, build_vision
from moe_vlm.routing.loss_norm import LossNorm


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
        n, p, dv = feats.shape
        m = self.merge
        if m > 1:
            side = math.isqrt(p)
            self.n_tokens(p)  # validates the grid
            g = feats.reshape(n, side // m, m, side // m, m, dv)  # [N, h, m, w, m, Dv]
            feats = g.permute(0, 1, 3, 2, 4, 5).reshape(n, (side // m) ** 2, m * m * dv)
        return self.fc2(F.gelu(self.fc1(feats)))


class VisionLanguageModel(nn.Module):
    def __init__(self, decoder: DecoderLM, vision: VisionTransformer, projector_cfg: ProjectorConfig,
                 image_token_id: int):
        super().__init__()
        self.decoder = decoder
        self.vision = vision
        self.projector = Projector(vision.cfg.d_model, decoder.cfg.d_model, projector_cfg.merge)
        self.image_token_id = image_token_id
        self.n_image_tokens = self.projector.n_tokens(vision.n_output_tokens)

    # The decoder's interface, so training code treats both models alike.
    @property
    def cfg(self):
        return self.decoder.cfg

    def moe_layers(self) -> list[MoELayer]:
        return self.decoder.moe_layers()

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] -> [N, P', D]."""
        return self.projector(self.vision(pixel_values))

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                pixel_values: Optional[Tensor] = None, token_mask: Optional[Tensor] = None,
                loss_norm: Optional[LossNorm] = None, token_rows: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> ModelOutput:
        """input_ids [B, S] with runs of ``n_image_tokens`` placeholder ids per image;
        pixel_values [N, 3, H, W] for the N images in placeholder order; ``token_mask``,
        ``loss_norm``, ``token_rows`` and ``position_ids`` (V2PE's, ``moe_vlm.data.v2pe``) as
        in ``DecoderLM.forward``."""
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
        if n_img:
            feats = self.image_embeddings(pixel_values)  # [N, P', D]
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))
        return self.decoder(inputs_embeds=embeds, labels=labels, token_mask=token_mask,
                            loss_norm=loss_norm, token_rows=token_rows,
                            position_ids=position_ids, image_mask=is_image)


def build_vlm(cfg: Config, image_token_id: int, device: Union[str, torch.device] = "cpu",
              seed: int = 0) -> VisionLanguageModel:
    """Decoder from config (meta device, then one ``init_weights``), projector freshly
    initialised, and the vision tower from config or from a local Hugging Face checkpoint
    (``vision.name=hf``, whose weights are kept)."""
    decoder = build_model(cfg.model, cfg.moe, cfg.routing, device=device, seed=seed)
    vision = build_vision(cfg.vision, device=device, seed=seed + 1)
    model = VisionLanguageModel(decoder, vision, cfg.projector, image_token_id)
    model.projector.to(device)
    g = torch.Generator(device=model.projector.fc1.weight.device).manual_seed(seed + 2)
    model.projector.init_weights(cfg.model.init_std, generator=g)
    return model
