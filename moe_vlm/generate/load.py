"""A trained model ready to generate: config, tokenizer and weights of a run directory.

Accepts a run directory (its ``config.yaml`` and newest good checkpoint), a checkpoint
directory written by ``upcycle``/``grow``/``btx``/``import-hf`` (same layout), or one
``checkpoints/step_*.pt`` file of a run (the config two levels up). Nothing is written:
a BPE tokenizer comes from the run's ``tokenizer.json`` (retrained deterministically from
the embedded corpus, in memory, if the file is missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moe_vlm.config import Config
from moe_vlm.config.loader import config_from_file
from moe_vlm.data import build_tokenizer_for
from moe_vlm.data.tokenizers import BPE_FILENAME
from moe_vlm.train.checkpoint import load_weights


CHAT_DATA = ("synthetic_vlm", "llava")  # the sets rendered with the chat template


def uses_chat_template(cfg: Config) -> bool:
    """Whether the run trained on chat-rendered samples (``moe_vlm.data.chat``), so its
    prompts should be wrapped the same way; plain text corpora are continued as they are."""
    names = list(cfg.data.mixture) if cfg.data.name == "mixture" else [cfg.data.name]
    return any(n in CHAT_DATA for n in names)


def _config_path(source: Path) -> Path:
    if source.is_dir():
        return source / "config.yaml"
    return source.parent.parent / "config.yaml"  # RUN/checkpoints/step_N.pt


def load_for_generation(source: str | Path, overrides: Sequence[str] = (),
                        device: str | torch.device = "cpu", trust: bool = False
                        ) -> tuple[nn.Module, Any, Config]:
    """(model in eval mode, tokenizer, config) of ``source``; ``overrides``: dotted
    ``key=value`` pairs applied to the saved config (e.g. ``routing.capacity_factor=null``
    to generate with a model trained with capacity dropping). ``trust``: load a checkpoint
    whose checksum is missing (``--trust-checkpoint``)."""
    src = Path(source)
    cfg_path = _config_path(src)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{source}: no config.yaml at {cfg_path}; give a run directory, "
                                "a checkpoint directory, or a run's checkpoints/step_*.pt")
    cfg = config_from_file(cfg_path, overrides)
    run_dir = cfg_path.parent
    if cfg.data.tokenizer == "bpe" and not (run_dir / BPE_FILENAME).is_file():
        run_dir = None  # retrain in memory: never write into someone's run directory
    tokenizer = build_tokenizer_for(cfg.data, run_dir)
    if cfg.vision.name == "none":
        from moe_vlm.model import build_model
        model: nn.Module = build_model(cfg.model, cfg.moe, cfg.routing, device="cpu", seed=cfg.seed)
    else:
        from moe_vlm.model.vlm import build_vlm
        model = build_vlm(cfg, tokenizer.image_id, device="cpu", seed=cfg.seed)
    load_weights(model, src, trust=trust)
    return model.to(device).eval(), tokenizer, cfg


def held_out_data(model: nn.Module, tokenizer: Any, cfg: Config) -> Any:
    """The run's data bundle (``moe_vlm.data.build_data``) built for ``model``, for its
    held-out samples (``moe-vlm generate --eval``, ``moe-vlm show``)."""
    from moe_vlm.data import build_data

    vlm = hasattr(model, "image_token_id")
    return build_data(cfg.data, tokenizer, model.vision.cfg if vlm else None,
                      model.n_image_tokens if vlm else 0)
