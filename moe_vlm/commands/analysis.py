"""Reading run directories back: ``moe-vlm results ROOT --out TABLE.csv``, ``moe-vlm plot
ROOT --kind ...`` and ``moe-vlm plot-routing RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from moe_vlm.errors import UserError

SHOW = ["status", "final_eval_loss", "eval_accuracy", "params_active", "tokens_seen", "steps"]


def check_out_file(out: Path) -> None:
    """Refuse an ``--out`` file path that cannot be written because it is a directory or
    one of its parents is a regular file (the OSError would only say "File exists")."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path")
    for parent in reversed(out.absolute().parents):  # from the root down
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out}: {parent} is a file, not a directory")


def results_main(args: Sequence[str]) -> None:
    from moe_vlm.analysis.results import collect_results, varying_keys, write_table

    ap = argparse.ArgumentParser(prog="moe-vlm results", description=(
        "One row per run directory under ROOT (config keys flattened, summary metrics, "
        "status; failed and unfinished runs included) written as CSV or Parquet."))
    ap.add_argument("root")
    ap.add_argument("--out", default=None, help="TABLE.csv or TABLE.parquet (default: print only)")
    a = ap.parse_args(list(args))
    try:
        if a.out:
            check_out_file(Path(a.out))
        df = collect_results(a.root)
        if a.out:
            write_table(df, a.out)
    except (UserError, OSError, ValueError, ImportError) as e:  # OSError: --out unwritable
        print(f"moe-vlm results: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if df.empty:
        print(f"no run directories under {a.root}")
        return
    for _, row in df[df["status"] == "invalid"].iterrows():  # in the table; say why here
        print(f"moe-vlm results: {row['run']}: invalid run directory: {row['error']}",
              file=sys.stderr)
    cols = ["run", *varying_keys(df), *[c for c in SHOW if c in df.columns]]
    print(df[cols].to_markdown(index=False, floatfmt=".4g") if _has_tabulate()
          else df[cols].to_string(index=False))
    counts = df["status"].value_counts().to_dict()
    print(f"\n{len(df)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + (f"  -> {a.out}" if a.out else ""))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def plot_main(args: Sequence[str]) -> None:
    from moe_vlm.analysis import plots
    from moe_vlm.analysis.results import collect_results

    ap = argparse.ArgumentParser(prog="moe-vlm plot", description=(
        "Sweep figures as PNG: loss curves of every run under ROOT, final loss vs a swept "
        "key, a run's expert-load heatmap, or IsoFLOP profiles."))
    ap.add_argument("root", help="sweep root (or a run directory for --kind load)")
    ap.add_argument("--kind", required=True, choices=["curves", "final", "load", "isoflop"])
    ap.add_argument("--key", help="--kind final: the swept config key, e.g. moe.granularity")
    ap.add_argument("--metric", default=None,
                    help="curves: eval_loss (default) or loss; final: final_eval_loss (default)")
    ap.add_argument("--n-col", default="params_active_nonembedding", help="isoflop: N column")
    ap.add_argument("--last", type=int, default=None, help="load: only the last N logged steps")
    ap.add_argument("--out", default=None, help="PNG path (default ROOT/<kind>.png)")
    a = ap.parse_args(list(args))
    out = Path(a.out or Path(a.root) / f"{a.kind}.png")
    try:
        check_out_file(out)
        if a.kind == "curves":
            path = plots.plot_loss_curves(a.root, out, a.metric or "eval_loss")
        elif a.kind == "load":
            path = plots.plot_expert_load(a.root, out, a.last)
        else:
            table = collect_results(a.root)
            if a.kind == "final":
                if not a.key:
                    raise ValueError("--kind final needs --key (the swept config key)")
                path = plots.plot_final_vs_key(table, a.key, out, a.metric or "final_eval_loss")
            else:
                path = plots.plot_isoflop(table, out, n_col=a.n_col)
    except (UserError, OSError, ValueError) as e:  # OSError: --out unwritable
        print(f"moe-vlm plot: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)


def plot_routing_main(args: Sequence[str]) -> None:
    """``moe-vlm plot-routing RUN_DIR [--out PNG] [--last N]``."""
    from moe_vlm.analysis.modality import plot_modality_heatmap

    ap = argparse.ArgumentParser(prog="moe-vlm plot-routing",
                                 description="expert x modality load heatmap of a VLM run")
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/modality_routing.png)")
    ap.add_argument("--last", type=int, default=None, help="only the last N logged steps")
    a = ap.parse_args(list(args))
    try:
        print(plot_modality_heatmap(a.run_dir, a.out, a.last))
    except (ValueError, FileNotFoundError) as e:
        print(f"moe-vlm plot-routing: {e}", file=sys.stderr)
        raise SystemExit(2) from None
