"""Encoder-free image input (SOLO, "A Single Transformer for Scalable Vision-Language
Modeling", 2024; Fuyu; HoVLE): raw image patches enter the decoder through one linear map,
with no vision tower and no projector, so the decoder's own layers (its MoE experts too)
are the vision encoder.

Legend: N images, g patches per side, p patch side in pixels, P = g*g patches (image
tokens per image), D decoder width.

``vision=patch``: patches of ``vision.patch_size * projector.merge`` pixels (merge m is the
same as concatenating m x m patches, as the projector's pixel shuffle does), each flattened
row-major as (row, column, channel), mapped to D; with ``vision.pos_emb=learned`` a learned
table of the P patch positions is added (the decoder's 1-D rotary positions apply as for
any token). The ``vision.*`` keys of a tower's shape (d_model, n_layers, ...) are unused.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from moe_vlm.config.schema import ConfigError, VisionConfig
from moe_vlm.model.moe import MoELayer
from moe_vlm.model.vision import IN_CHANNELS, check_pixel_values


class PatchEmbed(nn.Module):
    """pixel_values [N, 3, H, W] -> image embeddings [N, P, D] in the decoder's width.
    Holds the parts of a tower's interface the VLM and the data pipeline read (``cfg``,
    ``n_output_tokens``, ``moe_layers``)."""

    def __init__(self, cfg: VisionConfig, d_model: int, merge: int = 1):
        super().__init__()
        self.cfg, self.d_out = cfg, d_model
        self.patch = cfg.patch_size * merge  # p
        if cfg.image_size % self.patch:
            raise ConfigError(f"vision.image_size: {cfg.image_size} is not a multiple of the "
                              f"patch side vision.patch_size x projector.merge = {self.patch}")
        self.grid = cfg.image_size // self.patch  # g
        self.n_patches = self.grid * self.grid  # P
        self.patch_embed = nn.Linear(IN_CHANNELS * self.patch * self.patch, d_model)
        self.pos_embed = nn.Embedding(self.n_patches, d_model) if cfg.pos_emb == "learned" else None

    @property
    def n_output_tokens(self) -> int:
        """Image tokens per image: one per patch, (image_size / patch side)^2."""
        return self.n_patches

    def moe_layers(self) -> list[MoELayer]:
        """None: the decoder's MoE layers see the patches."""
        return []

    @torch.no_grad()
    def init_weights(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        """Normal(0, std) weights (the decoder's ``model.init_std``, as its token embedding
        and the projector), zero bias."""
        self.patch_embed.weight.normal_(0.0, std, generator=generator)
        self.patch_embed.bias.zero_()
        if self.pos_embed is not None:
            self.pos_embed.weight.normal_(0.0, std, generator=generator)

    def patchify(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, P, p*p*3]: row-major patches, each (row, column, channel)."""
        n, p, g = pixel_values.shape[0], self.patch, self.grid
        x = pixel_values.reshape(n, IN_CHANNELS, g, p, g, p)  # [N, 3, g, p, g, p]
        return x.permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * IN_CHANNELS)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] (normalised floats) -> [N, P, D]."""
        check_pixel_values(pixel_values, self.cfg.image_size)
        w = self.patch_embed.weight
        x = self.patch_embed(self.patchify(pixel_values.to(w.dtype)))  # [N, P, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight  # [N, P, D]
        return x


def build_patch_embed(cfg: VisionConfig, d_model: int, merge: int = 1, std: float = 0.02,
                      device: Union[str, torch.device] = "cpu", seed: int = 0) -> PatchEmbed:
    """Construct on the meta device, materialise on ``device``, initialise from ``seed``."""
    with torch.device("meta"):
        model = PatchEmbed(cfg, d_model, merge)
    model.to_empty(device=device)
    model.init_weights(std, torch.Generator(device=model.patch_embed.weight.device).manual_seed(seed))
    return model
