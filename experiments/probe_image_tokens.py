"""What the decoder's image tokens carry: linear probes on a run of the synthetic VLM set.

    python experiments/probe_image_tokens.py RUN_DIR [RUN_DIR ...] [--init] [--n 256]

For each run it embeds the first ``--n`` held-out scenes and fits a multinomial logistic
probe (on half the quadrant tokens, scored on the other half) that reads from one image
token (a quadrant: 2x2 patches after the projector's merge):

- ``colour``: the colour of the shape in that quadrant (quadrants holding a shape; 6-way);
- ``kind``: its kind (circle, square, triangle; 3-way);
- ``quadrant``: which quadrant the token is (4-way: can the decoder tell them apart?),

both from the projector's output (what the decoder receives) and from the vision tower's
output before the projector (its 2x2 patches concatenated), with the raw pixels of the
quadrant as the ceiling, and the RMS of image and text embeddings. ``--init`` probes the
run's model freshly initialised (same config and seed) instead of its trained weights.
This is how issue 19 found that the default job's projector loses the colours in runs
where the decoder never learns colour questions (README, "The default job").
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from moe_vlm.data.synthetic_vlm import COLORS, KINDS, synthetic_vlm_row
from moe_vlm.generate.load import held_out_data, load_for_generation
from moe_vlm.model.vlm import merge_patches


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """x [M, F], y [M]: fit on the first half (standardised, L2 1e-3, L-BFGS), accuracy
    on the second half."""
    n = len(y) // 2
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    xtr, xte = (x[:n] - mu) / sd, (x[n:] - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, y[:n]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xte @ w + b).argmax(1) == y[n:]).float().mean().item()


@torch.no_grad()
def probe_run(run_dir: str, init: bool, n_samples: int) -> dict[str, float]:
    model, tok, cfg = load_for_generation(run_dir)
    if cfg.data.name != "synthetic_vlm" or not hasattr(model, "projector") or model.projector is None:
        raise SystemExit(f"{run_dir}: needs a run of the synthetic VLM set with a ViT and projector")
    if model.n_image_tokens != 4:
        raise SystemExit(f"{run_dir}: expects 4 image tokens (one per quadrant), the run has "
                         f"{model.n_image_tokens}")
    ds = held_out_data(model, tok, cfg).eval
    if init:
        from moe_vlm.model.vlm import build_vlm

        model = build_vlm(cfg, model.image_token_id, seed=cfg.seed).eval()
    pix, colour, kind, text = [], [], [], []
    for i in range(min(n_samples, len(ds))):
        s = ds[i]
        by_quadrant = {sh.quadrant: sh for sh in synthetic_vlm_row(ds.seed, ds.split, i)[0]}
        colour += [list(COLORS).index(by_quadrant[q].color) if q in by_quadrant else -1 for q in range(4)]
        kind += [KINDS.index(by_quadrant[q].kind) if q in by_quadrant else -1 for q in range(4)]
        pix.append(s["pixel_values"])
        ids = s["input_ids"]
        text.append(model.decoder.embed(ids[ids != model.image_token_id]))  # [T, D]
    pixels = torch.cat(pix)  # [N, 3, H, W]
    tower = model.vision(pixels)  # [N, P, Dv]
    emb = model.projector(tower)  # [N, 4, D]
    colour_t, kind_t = torch.tensor(colour), torch.tensor(kind)  # [N * 4], -1: empty quadrant
    quadrant = torch.arange(4).repeat(len(pix))  # [N * 4]
    shape = colour_t >= 0
    pixel_grid = pixels.permute(0, 2, 3, 1).reshape(len(pix), -1, 3)  # [N, H*W, 3]
    quadrants = lambda x: merge_patches(x, math.isqrt(x.shape[1]) // 2).flatten(0, 1)  # [N*4, F]
    feats = {"projector": emb.reshape(-1, emb.shape[-1]), "tower": quadrants(tower),
             "pixels": quadrants(pixel_grid)}
    out = {"image_rms": emb.pow(2).mean().sqrt().item(),
           "text_rms": torch.cat(text).pow(2).mean().sqrt().item()}
    for name, x in feats.items():
        out[f"colour_{name}"] = probe_accuracy(x[shape], colour_t[shape], len(COLORS))
        out[f"kind_{name}"] = probe_accuracy(x[shape], kind_t[shape], len(KINDS))
        out[f"quadrant_{name}"] = probe_accuracy(x, quadrant, 4)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--init", action="store_true", help="probe the freshly initialised model")
    ap.add_argument("--n", type=int, default=256, help="held-out scenes (4 quadrants each)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cols = ["colour_projector", "colour_tower", "colour_pixels", "kind_projector", "kind_tower",
            "kind_pixels", "quadrant_projector", "quadrant_tower", "image_rms", "text_rms"]
    print("| run | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for run in args.runs:
        r = probe_run(run, args.init, args.n)
        print(f"| {run}{' (init)' if args.init else ''} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
