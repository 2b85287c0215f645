"""``moe-vlm btx --from RUN_A RUN_B [...] --out DIR [key=value ...]``: the Branch-Train-MiX
merge (``moe_vlm.upcycling.btx``) of dense branch runs into an MoE checkpoint directory.

A separate command rather than ``upcycle.method=btx``: upcycling reads one dense source
and can also run inside ``moe-vlm train`` (``upcycle.source``); BTX reads N runs, checks
them against each other and reports per branch, so it writes a checkpoint directory once
(``DIR/config.yaml``, ``DIR/checkpoints/step_00000000.pt``, ``DIR/btx.json``) and the MiX
stage starts from it like from any upcycled directory: ``train.init_from=DIR`` (with
``experiment=btx``) or ``--config-path DIR --config-name config``.

The target config is the first branch's, made MoE (``model.moe_every=1`` unless set) with
BTX's shape: ``moe.n_experts`` = branches, ``moe.granularity=1``, ``moe.d_expert`` = the
branches' ``model.d_ff``, ``moe.n_shared=0``, and the default router (softmax top-2,
renormalised, switch balance loss; ``routing.top_k`` = min(2, branches)). Overrides go on
top; ones that break the shape are refused with the key to change.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Optional, Sequence

from moe_vlm.commands.checkpoints import _build, _check_out, _user_errors, write_checkpoint_dir
from moe_vlm.config.schema import Config, RoutingConfig

_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")
# Config fields that may differ between branches without changing what the weights mean.
_FREE = {"name", "loss_chunk", "init_std"}
_MIXABLE = ("synthetic_text", "synthetic_vlm", "stdlib")  # the sources that need no data.path


def _split_args(sources: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--from`` takes several paths, so ``key=value`` words right after them land in it:
    move those (dotted keys that are not existing paths) to the overrides."""
    src = [s for s in sources if not (_OVERRIDE.match(s) and not Path(s).exists())]
    return src, [*[s for s in sources if s not in src], *overrides]


def _check_same_architecture(cfgs: Sequence[Config], labels: Sequence[str]) -> None:
    """Refuse branches whose model/vision/projector configs differ (e.g. rope_theta, which
    no tensor shape shows); weights of different functions must not be averaged."""
    for cfg, b in zip(cfgs[1:], labels[1:]):
        for sec in ("model", "vision", "projector"):
            x, y = getattr(cfgs[0], sec), getattr(cfg, sec)
            for f in fields(x):
                if f.name not in _FREE and getattr(x, f.name) != getattr(y, f.name):
                    raise ValueError(f"btx: {sec}.{f.name} is {getattr(x, f.name)!r} in {labels[0]} "
                                     f"but {getattr(y, f.name)!r} in {b}; branches must come from "
                                     "one seed model (same model.*, vision.*, projector.*)")


def target_config(first: Config, n: int, overrides: Sequence[str]) -> Config:
    """The merged model's config: the first branch's with BTX's MoE shape, then
    ``overrides`` (dotted ``key=value``)."""
    from moe_vlm.config.loader import apply_overrides
    from moe_vlm.upcycling.source import default_target_moe

    base = default_target_moe(first)
    base = replace(base, moe=replace(base.moe, n_experts=n, d_expert=first.model.d_ff, n_shared=0,
                                     granularity=1),
                   routing=replace(RoutingConfig(), top_k=min(2, n)))
    return apply_overrides(base, list(overrides))


def _step(weights: Path) -> Optional[int]:
    m = re.match(r"^step_(\d+)\.pt$", weights.name)
    return int(m.group(1)) if m else None


def _data_of(cfg: Config) -> dict:
    d = cfg.data
    out: dict = {"name": str(d.name)}
    if str(d.name) == "mixture":
        out["mixture"] = {k: v for k, v in d.mixture.items() if v}
    if d.path:
        out["path"] = d.path
    return out


def _mix_hint(cfgs: Sequence[Config]) -> Optional[str]:
    """``data.name=mixture ++data.mixture.A=... ...`` over the branches' sources, when each
    branch trained on one embedded source (no data.path): a suggestion for the MiX stage.
    Dotted keys, ``++`` adding a mixture entry the config lacks, so it also applies to
    ``--config-path DIR`` (which has no config groups)."""
    names = [str(c.data.name) for c in cfgs]
    if not all(n in _MIXABLE for n in names) or len(set(names)) < 2:
        return None
    share = 1.0 / len(set(names))
    others = [s for s in _MIXABLE if s not in names]
    return " ".join(["data.name=mixture",
                     *[f"++data.mixture.{s}={share:.3g}" for s in sorted(set(names))],
                     *[f"++data.mixture.{s}=0" for s in others]])


def btx_main(args: Sequence[str]) -> None:
    """``moe-vlm btx --from RUN_A RUN_B [...] --out DIR [key=value ...]``."""
    from moe_vlm.upcycling.btx import btx_logit_check, btx_merge_into
    from moe_vlm.upcycling.source import load_checkpoint

    ap = argparse.ArgumentParser(prog="moe-vlm btx", description=(
        "Branch-Train-MiX (Sukhbaatar et al. 2024): merge dense branch runs of one seed model "
        "into an MoE checkpoint directory. Expert e of every MoE layer is branch e's FFN, "
        "every other tensor the branches' mean, the routers fresh (seed, upcycle.router_std). "
        "Then train it: moe-vlm train experiment=btx train.init_from=DIR moe.n_experts=N. "
        "Overrides (dotted key=value) go after --out, e.g. routing.top_k=1 model.n_dense_layers=1."))
    ap.add_argument("--from", dest="sources", nargs="+", required=True, metavar="RUN")
    ap.add_argument("--out", required=True)
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="read checkpoints that need full unpickling; only files you trust")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    a = ap.parse_args(list(args))
    sources, overrides = _split_args(a.sources, a.overrides)
    out = Path(a.out)
    with _user_errors("moe-vlm btx"):
        _check_out(out)
        if len(sources) < 2:
            raise ValueError(f"--from needs at least 2 branch runs, got {sources}; for one dense "
                             "model use `moe-vlm upcycle --method copy`")
        branches = [load_checkpoint(s, trust=a.trust_checkpoint) for s in sources]
        cfgs = [b.config for b in branches]
        _check_same_architecture(cfgs, sources)
        cfg = target_config(cfgs[0], len(branches), overrides)
        target = _build(cfg)
        seed = cfg.seed if cfg.upcycle.seed is None else cfg.upcycle.seed
        report = btx_merge_into(target, [b.state_dict for b in branches], sources,
                                cfg.upcycle.router_std, seed)
        dense = []
        for b in branches:
            m = _build(b.config)
            m.load_state_dict(b.state_dict)
            dense.append(m)
        check = btx_logit_check(dense, target, cfg.model.vocab_size, min(16, cfg.model.max_seq_len))
    seeds = sorted({str(c.train.init_from) for c in cfgs})
    warnings = []
    if len(seeds) > 1 or seeds == ["None"]:
        warnings.append(f"the branches do not name one seed run in train.init_from ({seeds}); "
                        "BTX assumes they branched from one seed model")
    rows = [{"source": s, "weights": str(b.path), "step": _step(b.path), "data": _data_of(b.config),
             "init_from": b.config.train.init_from, "seed": b.config.seed}
            for s, b in zip(sources, branches)]
    record = {"method": "btx", "branches": rows, **asdict(report), **check,
              "router_seed": seed, "overrides": list(overrides), "warnings": warnings}
    with _user_errors("moe-vlm btx"):
        write_checkpoint_dir(out, cfg, target.state_dict(), "btx.json", record)
    sizes = getattr(target, "decoder", target).moe_sizes
    lines = [f"merged {len(branches)} branches -> {out} (Branch-Train-MiX)"]
    lines += [f"  expert {i}: {r['source']} (step {r['step']}, data {r['data']}, from "
              f"{r['init_from']})" for i, r in enumerate(rows)]
    lines += [f"  MoE layers {report.moe_layers}: {sizes.n_experts} experts of width "
              f"{sizes.d_expert}, top-{sizes.top_k}, no shared experts; routers fresh (seed {seed})",
              f"  averaged {len(report.averaged)} tensors ({len(report.differing)} differ across "
              f"branches){'; vision tower and projector included' if report.merged_vision else ''}",
              f"  function preserving: {report.function_preserving} ({report.reason})",
              f"  max |logit diff| at step 0: vs the branches' mean "
              f"{check['max_abs_logit_diff_vs_branch_mean']:.3g}, vs each branch "
              + ", ".join(f"{g:.3g}" for g in check["max_abs_logit_diff_vs_branches"])]
    lines += [f"  warning: {w}" for w in warnings]
    hint = _mix_hint(cfgs)
    data = f" {hint}" if hint else " (data.*: all the branches' data)"
    if cfg.vision.name == "none":
        lines.append(f"  MiX: moe-vlm train experiment=btx train.init_from={out.resolve()} "
                     f"moe.n_experts={len(branches)}{data} (and the branches' model.* keys)")
    lines.append(f"  or:  moe-vlm train --config-path {out.resolve()} --config-name config{data}")
    print("\n".join(lines))
