"""The ``moe-vlm`` console script. Subcommands dispatch to their modules;
``train`` hands the remaining arguments to Hydra as overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

USAGE = """usage: moe-vlm <command> [args]

commands:
  train [hydra overrides]   train a model (default: tiny MoE on embedded data, CPU)
                            e.g. moe-vlm train model=small routing=deepseek_v3 train.max_steps=50
                            add --cfg job to print the resolved config, -m for a multirun sweep
  plot-routing RUN_DIR [--out PNG] [--last N]
                            per-layer expert x modality (image/text) load heatmap of a VLM run
  upcycle --from SRC --method {copy,split,drop,noise} --out DIR [key=value ...]
                            dense checkpoint (ours or a local HF Llama/Qwen2/Qwen3) -> MoE
  import-hf --from HF_DIR --out DIR
                            local Hugging Face checkpoint -> our checkpoint directory
  results ROOT [--out TABLE.csv]
                            one row per run directory under ROOT (config, metrics, status)
  plot ROOT --kind {curves,final,load,isoflop} [--key K] [--out PNG]
                            sweep figures: loss curves, final loss vs a key, expert load, IsoFLOP
  fit TABLE.csv --law {chinchilla,krajewski,clark} [--out DIR]
                            fit a scaling law (with bootstrap CIs) to a results table
  export-hf --from CKPT_DIR --out HF_DIR
                            our checkpoint -> Hugging Face directory (Qwen3-MoE, Mixtral, dots1,
                            Llama, Qwen2, Qwen3) that transformers loads
"""


def train_main(args: Sequence[str]) -> None:
    """Run ``moe-vlm train`` with Hydra overrides ``args``."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from moe_vlm.config.loader import config_dir, register_schema, searchpath_override, to_config
    from moe_vlm.config.schema import ConfigError
    from moe_vlm.train.loop import train

    register_schema()
    failed: list[str] = []
    # The deepspeed launcher appends --local_rank=N (also in LOCAL_RANK); Hydra would reject it.
    args = [a for a in args if not a.startswith(("--local_rank", "--local-rank"))]

    def record_failure(run_dir: str, error: str) -> None:
        """A sweep point that failed before training wrote its own summary gets one, so the
        results table shows it as failed; either way the sweep ends with exit code 1."""
        summary = Path(run_dir) / "summary.json"
        if not summary.is_file():
            from moe_vlm.train.rundir import write_json
            write_json(summary, {"status": "failed", "error": error, "steps": 0})
        failed.append(run_dir)

    def task(dcfg: DictConfig) -> None:
        hc = HydraConfig.get()
        try:
            cfg = to_config(dcfg)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            if hc.mode == RunMode.MULTIRUN:  # record the point as failed and go on
                record_failure(hc.runtime.output_dir, f"config error: {e}")
                return
            raise SystemExit(2) from None
        run_dir = cfg.run.dir or hc.runtime.output_dir
        if hc.mode == RunMode.MULTIRUN:  # one failed point must not stop the sweep
            try:
                s = train(cfg, run_dir)
            except Exception as e:  # noqa: BLE001 - recorded in its summary.json as failed
                print(f"run dir: {run_dir}\nstatus: failed ({type(e).__name__}: {e})", file=sys.stderr)
                record_failure(run_dir, f"{type(e).__name__}: {e}")
                return
        else:
            try:
                s = train(cfg, run_dir)
            except ConfigError as e:  # e.g. a layout that does not fit the launched processes
                print(f"config error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
        if int(os.environ.get("RANK", 0)) != 0:  # one report per multi-process run
            return
        print(f"run dir: {run_dir}\nstatus: {s['status']}  steps: {s['steps']}  "
              f"eval loss: {s['initial_eval_loss']:.4f} -> {s.get('final_eval_loss', float('nan')):.4f}  "
              f"wall: {s['wall_time_s']:.1f}s")

    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)
    saved = sys.argv
    sys.argv = ["moe-vlm train", *args, searchpath_override()]
    try:
        app()
    finally:
        sys.argv = saved
    if failed:
        print(f"{len(failed)} sweep run(s) failed (re-run the same command to retry them): "
              + ", ".join(failed), file=sys.stderr)
        raise SystemExit(1)


def plot_routing_main(args: Sequence[str]) -> None:
    """``moe-vlm plot-routing RUN_DIR [--out PNG] [--last N]``."""
    import argparse

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


def _lazy(module: str, name: str):
    def run(args: Sequence[str]) -> None:
        import importlib
        getattr(importlib.import_module(module), name)(args)
    return run


COMMANDS = {"train": train_main, "plot-routing": plot_routing_main,
            "upcycle": _lazy("moe_vlm.checkpoints_cli", "upcycle_main"),
            "import-hf": _lazy("moe_vlm.checkpoints_cli", "import_hf_main"),
            "export-hf": _lazy("moe_vlm.checkpoints_cli", "export_hf_main"),
            "results": _lazy("moe_vlm.analysis.commands", "results_main"),
            "plot": _lazy("moe_vlm.analysis.commands", "plot_main"),
            "fit": _lazy("moe_vlm.scaling.cli", "fit_main")}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"moe-vlm: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[cmd](rest)


if __name__ == "__main__":
    main()
