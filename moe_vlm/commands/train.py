"""``moe-vlm train [hydra overrides]``: checks the arguments and the composed config before
Hydra writes anything, then hands the overrides to Hydra, one run or a multirun sweep."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def _split_hydra_args(args: Sequence[str]) -> tuple[list[str], list[str], "argparse.Namespace"]:
    """(Hydra's flags, the overrides, the parsed namespace). Hydra's parser takes the
    overrides as one positional list, so ``a=1 --cfg job b=2`` fails there; parsed
    intermixed here, the CLI can hand Hydra the flags first and the overrides together."""
    from hydra._internal.utils import get_args_parser

    ns = get_args_parser().parse_intermixed_args(list(args))
    flags, rest = [], list(ns.overrides)
    for a in args:
        if rest and a == rest[0]:
            rest.pop(0)
        else:
            flags.append(a)
    return flags, list(ns.overrides), ns


def _check_train_args(ns: "argparse.Namespace", overrides: list[str]) -> Optional[str]:
    """Everything that can be checked before Hydra writes a byte: no config file we read
    can run code, preset names exist, and (one run) the composed config is valid and
    runnable on this machine. Returns the ``--config-path`` directory made absolute (None
    without one). Raises ``UserError``."""
    from moe_vlm.config.groups import check_group_overrides
    from moe_vlm.config.loader import config_dir, experiments_dir
    from moe_vlm.config.safety import check_config_dirs
    from moe_vlm.errors import ConfigError

    modes = [f for f, on in (("--run", ns.run), ("--multirun", ns.multirun), ("--cfg", ns.cfg),
                             ("--info", ns.info), ("--shell-completion", ns.shell_completion)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)}: give only one of --run, --multirun, --cfg, "
                          "--info, --shell-completion")
    if ns.experimental_rerun:
        raise ConfigError("--experimental-rerun unpickles a file (which can run code) and is not "
                          "supported; re-run with the same overrides instead")
    cdir = str(Path(ns.config_path).expanduser().resolve()) if ns.config_path else None
    if cdir is not None and not Path(cdir).is_dir():
        raise ConfigError(f"--config-path {ns.config_path}: no such directory")
    check_config_dirs([cdir or config_dir(), experiments_dir(), *([ns.config_dir] if ns.config_dir else [])])
    if cdir is None:  # a --config-path directory has its own groups (or none)
        check_group_overrides(overrides)
    return cdir


def _precheck_run(cdir: Optional[str], cname: Optional[str], overrides: list[str]) -> None:
    """Compose and validate the config of one run as Hydra will, and check it can run here,
    so a rejected command exits before Hydra writes its ``.hydra/`` record."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_vlm.config.environment import check_runnable
    from moe_vlm.config.loader import config_dir, searchpath_override, to_config
    from moe_vlm.errors import ConfigError, UserError

    try:
        with initialize_config_dir(config_dir=cdir or str(config_dir()), version_base="1.3"):
            dcfg = compose(config_name=cname or "config",
                           overrides=[*overrides, searchpath_override()], return_hydra_config=False)
            cfg = to_config(dcfg)
            run_dir = OmegaConf.select(dcfg, "run.dir")
    except UserError:
        raise
    except Exception as e:  # Hydra's and OmegaConf's errors name the key and the file
        from moe_vlm.config.validation import choice_error
        cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
        raise choice_error(e) or ConfigError(" ".join(f"{e}{cause}".split())) from None
    check_runnable(cfg, run_dir)


def train_main(args: Sequence[str]) -> None:
    """Run ``moe-vlm train`` with Hydra overrides ``args``."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from moe_vlm.config.loader import config_dir, register_schema, searchpath_override, to_config
    from moe_vlm.config.schema import ConfigError
    from moe_vlm.errors import UserError
    from moe_vlm.train.loop import NonFiniteLossError, train

    register_schema()
    failed: list[str] = []
    # The deepspeed launcher appends --local_rank=N (also in LOCAL_RANK); Hydra would reject it.
    args = [a for a in args if not a.startswith(("--local_rank", "--local-rank"))]
    flags, overrides, ns = _split_hydra_args(args)
    if ns.help:  # every config key with its doc (Hydra's own help: --hydra-help)
        from moe_vlm.config.help import render_help
        print(render_help(overrides))
        return
    multirun = ns.multirun or any(o.replace(" ", "") == "hydra.mode=MULTIRUN" for o in overrides)
    just_print = bool(ns.cfg or ns.info or ns.help or ns.hydra_help or ns.shell_completion)
    try:
        cdir = _check_train_args(ns, overrides)
        if not multirun and not just_print:
            _precheck_run(cdir, ns.config_name, overrides)
    except UserError as e:
        print(f"moe-vlm train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cdir is not None:  # Hydra resolves a relative --config-path against this file: pass it absolute
        i = next(i for i, f in enumerate(flags) if f.split("=", 1)[0] in ("--config-path", "-cp"))
        del flags[i:i + (1 if "=" in flags[i] else 2)]
        flags = ["--config-path", cdir, *flags]
    if not multirun and not just_print:
        # One run writes its own record of the overrides once it is accepted (train()):
        # Hydra's .hydra/ would be written, and overwrite a live run's, before any check.
        overrides = [*overrides, "hydra.output_subdir=null"]

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
            print(f"moe-vlm train: config error: {e}", file=sys.stderr)
            if hc.mode == RunMode.MULTIRUN:  # record the point as failed and go on
                record_failure(hc.runtime.output_dir, f"config error: {e}")
                return
            raise SystemExit(2) from None
        run_dir = cfg.run.dir or hc.runtime.output_dir
        task_overrides = [o for o in hc.overrides.task if not o.startswith("hydra.")]
        if hc.mode == RunMode.MULTIRUN:  # one failed point must not stop the sweep
            try:
                s = train(cfg, run_dir)
            except Exception as e:  # noqa: BLE001 - recorded in its summary.json as failed
                print(f"run dir: {run_dir}\nstatus: failed ({type(e).__name__}: {e})", file=sys.stderr)
                record_failure(run_dir, f"{type(e).__name__}: {e}")
                return
        else:
            try:
                s = train(cfg, run_dir, overrides=task_overrides)
            except UserError as e:  # config, data, checkpoint or run-directory problems
                print(f"moe-vlm train: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            except NonFiniteLossError as e:  # an outcome, not a bug: its message says what to do
                print(f"moe-vlm train: {e}", file=sys.stderr)
                raise SystemExit(1) from None
        if int(os.environ.get("RANK", 0)) != 0:  # one report per multi-process run
            return
        print(f"run dir: {run_dir}\nstatus: {s['status']}  steps: {s['steps']}  "
              f"eval loss: {s['initial_eval_loss']:.4f} -> {s.get('final_eval_loss', float('nan')):.4f}  "
              f"wall: {s['wall_time_s']:.1f}s")

    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)
    saved = sys.argv
    sys.argv = ["moe-vlm train", *flags, *overrides, searchpath_override()]
    try:
        app()
    finally:
        sys.argv = saved
    if failed:
        print(f"{len(failed)} sweep run(s) failed (re-run the same command to retry them): "
              + ", ".join(failed), file=sys.stderr)
        raise SystemExit(1)
