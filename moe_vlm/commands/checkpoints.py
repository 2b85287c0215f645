"""``moe-vlm upcycle``, ``moe-vlm import-hf`` and ``moe-vlm export-hf``.

``upcycle`` and ``import-hf`` write a *checkpoint directory* that training starts from:

    DIR/config.yaml                      full config, with train.init_from=DIR
    DIR/checkpoints/step_00000000.pt     {"model": state_dict}
    DIR/upcycle.json | DIR/import.json   what was done (and, for upcycling, the logit check)

so either ``moe-vlm train --config-path DIR --config-name config [overrides]`` or
``moe-vlm train train.init_from=DIR <the same model overrides>`` trains from it.
``upcycle --from DIR`` reads such a directory as its dense source and drops the source's
``train.init_from`` (``source.default_target_moe``); without ``moe.d_expert`` it takes
the width the dense FFN fixes (``methods.fitting_d_expert``) and records it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from moe_vlm.config.schema import Config, ConfigError, UpcycleConfig, v2pe_enabled
from moe_vlm.errors import UserError

# OS errors that mean "this path cannot be used" (not a bug): reported as one line.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                IsADirectoryError)


def _describe(e: BaseException) -> str:
    """The message of ``e``; an OS error as ``PATH: reason`` rather than ``[Errno N] ...``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        other = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{other}: {e.strerror}"
    return str(e)


@contextmanager
def _user_errors(prog: str) -> Iterator[None]:
    """Problems with the user's paths, shapes, configs or checkpoint files (``UserError``
    and the ValueErrors the readers raise, unusable paths): one line on stderr, exit 2.
    Anything else is a bug and keeps its traceback."""
    try:
        yield
    except (UserError, ValueError, TypeError, ConfigError, *_PATH_ERRORS) as e:
        print(f"{prog}: {_describe(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a new checkpoint directory, before any work:
    an existing file, a non-empty directory, a regular file among its parents, or a parent
    we may not write into."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new --out")
    for parent in reversed(out.absolute().parents):  # from the root down
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"--out {out}: {parent} is a file, not a directory")
    first = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(first, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot create it, {first} is not writable")


def _build(cfg: Config) -> nn.Module:
    """The model a config describes, on CPU (VLM if it has a vision tower)."""
    from moe_vlm.model import build_model

    if cfg.vision.name == "none":
        return build_model(cfg.model, cfg.moe, cfg.routing, "cpu", cfg.seed)
    from moe_vlm.model.vlm import build_vlm
    return build_vlm(cfg, image_token_id=0, device="cpu", seed=cfg.seed)  # weights do not use it


def write_checkpoint_dir(out: Path, cfg: Config, state: dict, record_name: str,
                         record: dict) -> None:
    """Write the directory described in the module docstring (each file atomically)."""
    from moe_vlm.train.checkpoint import save_checkpoint
    from moe_vlm.train.rundir import atomic_write, write_json

    out = out.resolve()
    cfg = replace(cfg, train=replace(cfg.train, init_from=str(out)),
                  upcycle=UpcycleConfig(), run=replace(cfg.run, dir=None))
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoints", 0, {"model": state, "step": 0}, keep=1)
    write_json(out / record_name, record)
    atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))))


@torch.no_grad()
def logit_gap(dense: nn.Module, moe: nn.Module, vocab: int, seq: int, seed: int = 0) -> float:
    """Max |logit difference| of the two decoders on random token ids (fp32)."""
    dec_a, dec_b = getattr(dense, "decoder", dense), getattr(moe, "decoder", moe)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))
    return float((dec_a.eval()(ids).logits - dec_b.eval()(ids).logits).abs().max())


def _derive_d_expert(base: Config, overrides: Sequence[str], dense_width: int) -> Optional[int]:
    """``moe.d_expert`` from the dense width (``methods.fitting_d_expert``) unless the
    overrides set it. None also when the overrides do not merge: ``apply_overrides`` then
    reports them, naming the key."""
    from moe_vlm.upcycling.methods import fitting_d_expert

    if any(o.split("=", 1)[0].strip() == "moe.d_expert" for o in overrides):
        return None
    try:
        peek = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base),
                                                   OmegaConf.from_dotlist(list(overrides))))
    except Exception:  # noqa: BLE001 - reported by apply_overrides
        return None
    assert isinstance(peek, Config)
    u, moe = peek.upcycle, peek.moe
    if u.method == "none" or moe.granularity < 1 or moe.n_shared < 0:
        return None  # validate() names the key
    return fitting_d_expert(dense_width, u.method, moe.n_shared, moe.granularity, u.shared,
                            u.base)


def upcycle_main(args: Sequence[str]) -> None:
    """``moe-vlm upcycle --from SRC --method M --out DIR [key=value ...]``."""
    from moe_vlm.config.loader import apply_overrides
    from moe_vlm.upcycling.methods import METHODS
    from moe_vlm.upcycling.source import default_target_moe, load_checkpoint
    from moe_vlm.upcycling.upcycle import upcycle_into

    ap = argparse.ArgumentParser(prog="moe-vlm upcycle", description=(
        "Upcycle a dense checkpoint (our run dir / .pt, or a local Hugging Face Llama/Qwen2/"
        "Qwen3 directory) into an MoE checkpoint directory. Target sizes and options are "
        "dotted overrides on the source's config, e.g. moe.n_experts=8 moe.granularity=4 "
        "routing.top_k=1 model.n_dense_layers=1 upcycle.permute=true upcycle.shared=slice. "
        "Without moe.d_expert, the width the dense FFN fixes is used: copy's only one (the "
        "dense d_ff less any shared slice), split's cut into moe.granularity shards."))
    _source_and_out(ap, trust=True)
    ap.add_argument("--method", required=True, choices=list(METHODS))
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    a = ap.parse_args(list(args))
    out = Path(a.out)
    with _user_errors("moe-vlm upcycle"):
        _check_out(out)
        src = load_checkpoint(a.source, trust=a.trust_checkpoint)
        base = default_target_moe(src.config)
        overrides = [*a.overrides, f"upcycle.method={a.method}", f"upcycle.source={a.source}"]
        derived = None
        if src.config.model.moe_every == 0:  # an MoE source is refused by upcycle_into
            derived = _derive_d_expert(base, overrides, src.config.model.d_ff)
        if derived is not None:
            overrides.append(f"moe.d_expert={derived}")
        cfg = apply_overrides(base, overrides)
        target = _build(cfg)
        report = upcycle_into(target, src.state_dict, cfg.upcycle, seed=cfg.seed)
        dense_cfg = src.config
        if cfg.vision.name != "none" and dense_cfg.vision.name == "none":
            dense_cfg = replace(dense_cfg, vision=cfg.vision, projector=cfg.projector)
        dense = _build(dense_cfg)
        dense.load_state_dict(src.state_dict, strict=False)
        gap = logit_gap(dense, target, cfg.model.vocab_size, min(16, cfg.model.max_seq_len))
    record = {**asdict(report), "source": str(src.path), "source_kind": src.kind,
              "overrides": list(a.overrides), "max_abs_logit_diff_vs_dense": gap}
    if derived is not None:
        record["derived"] = {"moe.d_expert": derived}
    with _user_errors("moe-vlm upcycle"):  # e.g. --out made unwritable meanwhile
        write_checkpoint_dir(out, cfg, target.state_dict(), "upcycle.json", record)
    sizes = getattr(target, "decoder", target).moe_sizes
    how = (f"  moe.d_expert={derived} (not set: derived from the dense d_ff "
           f"{src.config.model.d_ff} for {a.method})\n" if derived is not None else "")
    print(f"upcycled {src.kind} checkpoint {src.path} with {a.method} (base {report.base}, "
          f"m={report.shards}) -> {out}\n{how}  MoE layers {report.moe_layers}: "
          f"{sizes.n_experts} experts of width {sizes.d_expert}, top-{sizes.top_k}, shared "
          f"width {sizes.d_shared}\n"
          f"  function preserving: {report.function_preserving} ({report.reason}); "
          f"max |logit diff| vs dense at step 0: {gap:.3g}\n"
          f"  train: moe-vlm train --config-path {out.resolve()} --config-name config")


def _source_and_out(ap: argparse.ArgumentParser, trust: bool = False) -> None:
    """The ``--from SRC --out DIR`` pair every checkpoint command takes, and optionally
    ``--trust-checkpoint``."""
    ap.add_argument("--from", dest="source", required=True)
    ap.add_argument("--out", required=True)
    if trust:
        ap.add_argument("--trust-checkpoint", action="store_true",
                        help="read a checkpoint that needs full unpickling (an older moe-vlm's); "
                             "only for files you trust: unpickling can run code")


def import_hf_main(args: Sequence[str]) -> None:
    """``moe-vlm import-hf --from HF_DIR --out DIR``."""
    from moe_vlm.upcycling.source import load_checkpoint

    ap = argparse.ArgumentParser(prog="moe-vlm import-hf", description=(
        "Convert a local Hugging Face checkpoint (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral, "
        "dots1) into our checkpoint directory."))
    _source_and_out(ap)
    a = ap.parse_args(list(args))
    out = Path(a.out)
    with _user_errors("moe-vlm import-hf"):
        _check_out(out)
        if not (Path(a.source) / "config.json").is_file():
            raise FileNotFoundError(f"{a.source}: no config.json (a Hugging Face model directory)")
        src = load_checkpoint(a.source)
        model = _build(src.config)
        model.load_state_dict(src.state_dict)
    with _user_errors("moe-vlm import-hf"):
        write_checkpoint_dir(out, src.config, model.state_dict(), "import.json",
                             {"source": str(src.path)})
    m = src.config.model
    print(f"imported {src.path} -> {out}: {m.n_layers} layers x d_model {m.d_model}, vocab "
          f"{m.vocab_size}, {'MoE' if m.moe_every else 'dense'}\n"
          f"  train: moe-vlm train --config-path {out.resolve()} --config-name config")


def export_hf_main(args: Sequence[str]) -> None:
    """``moe-vlm export-hf --from CKPT_DIR --out HF_DIR``."""
    from moe_vlm.upcycling.hf import export_hf
    from moe_vlm.upcycling.source import load_checkpoint

    ap = argparse.ArgumentParser(prog="moe-vlm export-hf", description=(
        "Write our checkpoint (a run or checkpoint directory, or a .pt inside one) as a "
        "Hugging Face model directory that transformers loads with its own classes."))
    _source_and_out(ap, trust=True)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--decoder-only", action="store_true",
                    help="export the language model of a vision-language checkpoint")
    a = ap.parse_args(list(args))
    with _user_errors("moe-vlm export-hf"):
        src = load_checkpoint(a.source, trust=a.trust_checkpoint)
        sd = src.state_dict
        if any(k.startswith("decoder.") for k in sd):
            if not a.decoder_only:
                raise ValueError("this is a vision-language checkpoint; Hugging Face classes "
                                 "here hold the language model only: pass --decoder-only")
            sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
        c = src.config
        if v2pe_enabled(c.data):
            raise ValueError(
                f"this model was trained with V2PE (data.v2pe_delta={c.data.v2pe_delta}, "
                f"data.v2pe_train_deltas={list(c.data.v2pe_train_deltas)}): its image tokens "
                "had fractional rotary positions, which no Hugging Face class computes; "
                "exporting would give a model that answers differently")
        dtype = getattr(torch, a.dtype) if a.dtype else None
        path = export_hf(sd, c.model, c.moe, c.routing, a.out, dtype=dtype)
        kind = json.loads((path / "config.json").read_text())["model_type"]
    print(f"exported {src.path} as {kind} -> {path}")
    print(json.dumps({"model_type": kind, "path": str(path)}))
