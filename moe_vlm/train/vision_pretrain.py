"""Pre-train the vision tower and projector on the synthetic scenes' attributes, before
the run's first step (``data.vision_pretrain_steps``): the synthetic set's stand-in for the
pre-trained image encoder (CLIP, SigLIP, an ImageNet ViT) every real VLM starts from.

Why: a freshly initialised tower trained only through the decoder's answers never learns
the shapes within the default job's budget. The decoder cannot learn to read a shape's
kind that the image tokens barely carry, and the tokens get no push towards carrying it
from a decoder that does not read it; the colours, which the tokens carry from the start,
are all it learns to use (README "The default job"). Told the attributes directly, the
same tower and projector learn the kinds in a few hundred steps.

The objective: each quadrant's image tokens, averaged, predict that quadrant's shape kind
(or "empty"), colour (or "empty") and size (or "empty") through three linear heads that
are thrown away afterwards. The scenes come from their own stream (``vlm/<seed>/pretrain``:
neither the training nor the held-out scenes), so nothing here depends on the run's data
order, and the whole stage is deterministic given ``seed``.

Legend: N images, P' image tokens per image, D decoder width, q the 4 quadrants.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_vlm.config.schema import Config
from moe_vlm.data.synthetic_vlm import COLORS, KINDS, SIZES, random_scene, render
from moe_vlm.errors import ConfigError

N_EVAL = 256  # held-out scenes of the pretraining stream, for the reported accuracies
ATTRIBUTES = {"kind": len(KINDS), "color": len(COLORS), "size": len(SIZES)}


@dataclass
class PretrainReport:
    """What the stage did: steps, its last loss, and the held-out accuracy per attribute
    (empty quadrants count: "empty" is one of the classes) before and after."""

    steps: int
    final_loss: float
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]

    def as_dict(self) -> dict:
        return asdict(self)


def scene_batch(rng: random.Random, n: int, image_size: int, mean: Tensor, std: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """``n`` scenes -> (pixels [N, 3, H, W] normalised, labels {attribute: [N, 4]}), where a
    label is the class index + 1 and 0 marks an empty quadrant."""
    pixels, labels = [], {a: [] for a in ATTRIBUTES}
    for _ in range(n):
        scene = random_scene(rng)
        img = torch.from_numpy(render(scene, image_size, rng)).permute(2, 0, 1)  # [3, H, W]
        pixels.append((img - mean) / std)
        rows = {a: [0] * 4 for a in ATTRIBUTES}
        for s in scene:
            rows["kind"][s.quadrant] = KINDS.index(s.kind) + 1
            rows["color"][s.quadrant] = list(COLORS).index(s.color) + 1
            rows["size"][s.quadrant] = SIZES.index(s.size) + 1
        for a in ATTRIBUTES:
            labels[a].append(rows[a])
    return torch.stack(pixels), {a: torch.tensor(v) for a, v in labels.items()}


def quadrant_pool(tokens: Tensor) -> Tensor:
    """tokens [N, P', D] on a square row-major grid of even side -> [N, 4, D]: the mean of
    each quadrant's tokens (top left, top right, bottom left, bottom right)."""
    n, p, d = tokens.shape
    side = math.isqrt(p)
    if side * side != p or side % 2:
        raise ConfigError(f"data.vision_pretrain_steps needs a square grid of image tokens "
                          f"with an even side (a block per quadrant); the projector gives {p} "
                          "tokens per image: change projector.merge or vision.patch_size, or "
                          "set data.vision_pretrain_steps=0")
    h = side // 2
    g = tokens.reshape(n, 2, h, 2, h, d)  # [N, qr, r, qc, c, D]
    return g.mean(dim=(2, 4)).reshape(n, 4, d)


def pretrain_steps(cfg: Config) -> int:
    """``data.vision_pretrain_steps`` where the data has the scenes (``data=synthetic_vlm``),
    else 0: other data sets ignore the key, as they ignore ``count_questions_after``."""
    return cfg.data.vision_pretrain_steps if cfg.data.name == "synthetic_vlm" else 0


def image_path_params(model: nn.Module) -> list[nn.Parameter]:
    """The vision tower's and projector's parameters that train (``train.trainable``)."""
    return [p for p in [*model.vision.parameters(), *model.projector.parameters()]
            if p.requires_grad]


def _accuracy(heads: nn.ModuleDict, pooled: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    return {a: round(float((heads[a](pooled).argmax(-1) == labels[a]).float().mean()), 4)
            for a in ATTRIBUTES}


def pretrain_vision(model: nn.Module, steps: int, batch_size: int, lr: float, seed: int,
                    data_seed: int) -> PretrainReport:
    """Train ``model.vision`` and ``model.projector`` (those of their parameters that
    require grad) for ``steps`` AdamW steps of ``batch_size`` scenes at ``lr``; the model's
    other parameters are untouched. ``seed``: the heads' initialisation; ``data_seed``: the
    scenes (``vlm/<data_seed>/pretrain``)."""
    vision, projector = model.vision, model.projector
    image_size = vision.cfg.image_size
    mean = torch.tensor(vision.cfg.image_mean).view(3, 1, 1)  # [3, 1, 1]
    std = torch.tensor(vision.cfg.image_std).view(3, 1, 1)
    device = projector.fc1.weight.device
    d = projector.fc2.out_features
    g = torch.Generator().manual_seed(seed + 3)
    heads = nn.ModuleDict({a: nn.Linear(d, n + 1) for a, n in ATTRIBUTES.items()})
    with torch.no_grad():
        for head in heads.values():
            head.weight.normal_(0.0, 1.0 / math.sqrt(d), generator=g)
            head.bias.zero_()
    heads.to(device=device, dtype=projector.fc2.weight.dtype)
    params = image_path_params(model)
    opt = torch.optim.AdamW([*params, *heads.parameters()], lr=lr, weight_decay=0.0)
    eval_x, eval_y = scene_batch(random.Random(f"vlm/{data_seed}/pretrain-eval"), N_EVAL,
                                 image_size, mean, std)
    eval_x, eval_y = eval_x.to(device), {a: y.to(device) for a, y in eval_y.items()}

    def pooled(x: Tensor) -> Tensor:
        return quadrant_pool(model.image_embeddings(x))  # [N, 4, D]

    was_training = model.training
    model.train()
    with torch.no_grad():
        before = _accuracy(heads, pooled(eval_x), eval_y)
    rng = random.Random(f"vlm/{data_seed}/pretrain")
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = scene_batch(rng, batch_size, image_size, mean, std)
        x, y = x.to(device), {a: t.to(device) for a, t in y.items()}
        feats = pooled(x)
        loss = sum(F.cross_entropy(heads[a](feats).flatten(0, 1), y[a].flatten())
                   for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss = loss.detach()
    with torch.no_grad():
        after = _accuracy(heads, pooled(eval_x), eval_y)
    model.train(was_training)
    for p in params:
        p.grad = None
    return PretrainReport(steps, float(loss), before, after)
