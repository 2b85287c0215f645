"""``moe-vlm grow``: a dense checkpoint -> a wider and/or deeper dense checkpoint directory
(``moe_vlm.upcycling.grow``), in the layout ``moe-vlm upcycle`` writes (``config.yaml`` with
``train.init_from`` at itself, ``checkpoints/step_00000000.pt``, and ``grow.json``: the
methods, whether they promise the same function, and the measured logit gap). Train it
with ``train.init_from=DIR`` / ``--config-path DIR``, or upcycle it with ``--from DIR``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from moe_vlm.commands.checkpoints import (
    _build,
    _check_out,
    _source_and_out,
    _user_errors,
    write_checkpoint_dir,
)
from moe_vlm.config.schema import UpcycleConfig


def grow_main(args: Sequence[str]) -> None:
    """``moe-vlm grow --from SRC --out DIR model.KEY=VALUE ... [--width M] [--depth M]``."""
    from moe_vlm.config.loader import apply_overrides
    from moe_vlm.model.counting import count_params
    from moe_vlm.upcycling.grow import (
        DEPTH_METHODS,
        WIDTH_METHODS,
        grow_state,
        grown_config,
        max_logit_gap,
    )
    from moe_vlm.upcycling.source import load_checkpoint

    ap = argparse.ArgumentParser(prog="moe-vlm grow", description=(
        "Grow a dense checkpoint (our run dir / .pt, a checkpoint directory, or a local Hugging "
        "Face Llama/Qwen2/Qwen3 directory; text-only or VLM) into a larger dense one: the "
        "scale-up of AquilaMoE's EfficientScale. Target sizes are model.* overrides, e.g. "
        "model.d_model=128 model.d_ff=512 model.n_heads=8 model.n_kv_heads=4 model.n_layers=4. "
        "Width: fpi (bert2BERT: units copied, their reads divided; exact when d_model grows by "
        "a whole factor). Depth: identity (copies with zeroed output projections, exact) or "
        "stack (G_stack, the layers repeated, not exact). Then train it, or upcycle it to MoE "
        "with moe-vlm upcycle --from DIR."))
    _source_and_out(ap, trust=True)
    ap.add_argument("--width", default="fpi", choices=list(WIDTH_METHODS))
    ap.add_argument("--depth", default="identity", choices=list(DEPTH_METHODS))
    ap.add_argument("--seed", type=int, default=0,
                    help="picks the copied units when a width is not a whole multiple")
    ap.add_argument("overrides", nargs="*", help="model.KEY=VALUE target sizes")
    a = ap.parse_args(list(args))
    out = Path(a.out)
    with _user_errors("moe-vlm grow"):
        bad = [o for o in a.overrides if not o.split("=", 1)[0].strip().startswith("model.")]
        if bad:
            raise ValueError(f"grow takes model.* overrides only, got {bad}; set training keys "
                             "when you train the grown checkpoint")
        if not a.overrides:
            raise ValueError("grow: give the target sizes, e.g. model.d_model=128 model.n_layers=4")
        _check_out(out)
        src = load_checkpoint(a.source, trust=a.trust_checkpoint)
        if src.config.model.moe_every != 0:
            raise ValueError(f"grow: {a.source} is an MoE model (model.moe_every="
                             f"{src.config.model.moe_every}); grow a dense checkpoint, then "
                             "upcycle it (moe-vlm upcycle --from DIR)")
        m = src.config.model  # heads keep their width: validate the target with it
        base = replace(src.config, train=replace(src.config.train, init_from=None),
                       upcycle=UpcycleConfig(),
                       model=replace(m, head_dim=m.head_dim or m.d_model // m.n_heads))
        cfg = apply_overrides(base, a.overrides)
        cfg = replace(cfg, model=grown_config(src.config.model, cfg.model))
        state, report = grow_state(src.state_dict, src.config, cfg, a.width, a.depth, a.seed)
        source = _build(src.config)
        source.load_state_dict(src.state_dict)
        target = _build(cfg)
        target.load_state_dict(state)
        gap = max_logit_gap(source, target, cfg)
    params = [count_params(source).total, count_params(target).total]
    record = {**asdict(report), "source": str(src.path), "source_kind": src.kind,
              "overrides": list(a.overrides), "params": params,
              "max_abs_logit_diff_vs_source": gap}
    with _user_errors("moe-vlm grow"):
        write_checkpoint_dir(out, cfg, target.state_dict(), "grow.json", record)
    sizes = ", ".join(f"{k} {s}->{t}" for k, (s, t) in report.sizes.items() if s != t)
    print(f"grew {src.kind} checkpoint {src.path} -> {out}\n"
          f"  {sizes}; params {params[0]:,} -> {params[1]:,}\n"
          f"  width {report.width}, depth {report.depth} (layers copy {report.layer_sources}, "
          f"inserted {report.new_layers})\n"
          f"  function preserving: {report.function_preserving} ({report.reason}); "
          f"max |logit diff| vs source: {gap:.3g}\n"
          f"  train: moe-vlm train --config-path {out.resolve()} --config-name config\n"
          f"  upcycle: moe-vlm upcycle --from {out.resolve()} --method METHOD [key=value ...]")
