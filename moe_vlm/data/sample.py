"""The sample format every dataset yields, and the collate that batches it.

A sample is a dict of tensors (S tokens, N images, H x W pixels):

- ``input_ids`` [S] long: text token ids. Each image appears as a run of
  ``n_image_tokens`` copies of ``tokenizer.image_id``; the model splices the image's
  projected features into exactly those positions, images in order.
- ``labels`` [S] long: the next-token target of each position (already shifted), or
  ``-100`` where no loss is taken (prompts, image placeholders, padding).
- ``pixel_values`` [N, 3, H, W] float: the sample's images, normalised, in placeholder
  order. ``N`` may be 0 (a text-only sample).
- ``token_mask`` [S] bool (optional): False at padding a sample carries itself (a packed
  sequence's tail). ``collate`` adds it for every batch: False at the positions it pads.
  Padding is never routed, counted or put in a loss (``moe_vlm.model.moe``). Pad *ids*
  cannot serve as the mask: a Hugging Face tokenizer may pad with its EOS id.
- ``doc_ids`` [S] long (optional, ``data.doc_mask``): the document each position belongs
  to (non-decreasing): attention stays inside a document and positions restart at its
  start (``moe_vlm.model.decoder.document_positions``).
- ``answer_ids`` [S] long (optional): ``-1``, or the index (within the sample) of the
  question whose answer this position's label belongs to. Eval uses it for exact-match
  accuracy; labelled positions with ``-1`` count as caption/other text.
- ``answer_types`` [S] long (optional): at each answer position the code of its question's
  type (``DataBundle.answer_types`` names them), else ``-1``: accuracy by question type.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def collate(samples: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: ids with ``pad_id``, labels with -100, answer ids
    with -1, ``token_mask`` [B, S] with False (and a sample's own False positions kept),
    V2PE's float ``position_ids`` with 0 (a sample without them gets 0, 1, 2, ...);
    images concatenated in sample order -> ``pixel_values`` [sum N, 3, H, W]."""
    s_max = max(int(s["input_ids"].numel()) for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "answer_ids": -1, "answer_types": -1,
            "doc_ids": -1}
    out: dict[str, torch.Tensor] = {}
    for key, value in fill.items():
        if not any(key in s for s in samples):  # a mixture's samples may differ in keys
            continue
        rows = torch.full((len(samples), s_max), value, dtype=torch.long)  # [B, S]
        for i, s in enumerate(samples):
            if key in s:
                rows[i, : s[key].numel()] = s[key]
        out[key] = rows
    mask = torch.zeros(len(samples), s_max, dtype=torch.bool)  # [B, S]
    for i, s in enumerate(samples):
        own = s.get("token_mask")
        mask[i, : s["input_ids"].numel()] = True if own is None else own.bool()
    out["token_mask"] = mask
    if any("position_ids" in s for s in samples):  # V2PE (moe_vlm.data.v2pe): float positions
        pos = torch.zeros(len(samples), s_max, dtype=torch.float32)  # [B, S]
        for i, s in enumerate(samples):
            p = s.get("position_ids")
            n = s["input_ids"].numel()
            pos[i, :n] = torch.arange(n, dtype=torch.float32) if p is None else p
        out["position_ids"] = pos
    images = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if images:
        out["pixel_values"] = torch.cat(images)  # [N, 3, H, W]
    return out
