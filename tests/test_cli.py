"""The console script: the default job (shortened) runs end to end and its loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moe_vlm.commands import main


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "moe_vlm.commands", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=540)


@pytest.mark.timeout(600)
def test_default_job_short_version_answers_above_chance(tmp_path):
    # The default VLM job with 1000 of its 2500 steps (same model, data, tokenizer, vision
    # pre-training, learning rates, schedule shape and curriculum: count questions join
    # halfway): held-out answers must beat uniform guessing clearly, the colour and shape
    # questions too, i.e. the model reads the images.
    r = _run(["train", "train.max_steps=1000", "train.eval_every=500", "train.ckpt_every=500",
              "train.progress=false"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*/summary.json"))  # Hydra's job dir
    assert len(runs) == 1
    s = json.loads(runs[0].read_text())
    assert s["status"] == "completed" and s["steps"] == 1000
    assert s["final_eval_loss"] < 0.1 * s["initial_eval_loss"]
    assert 0.25 < s["chance_accuracy"] < 0.35
    # Measured 2026-12-02 with seeds 0-4 (this command with seed=S, one thread), the vision
    # pre-training included: 0.705-0.781 against chance 0.303, both colour question types
    # 0.70-0.79 against 0.17, the shape questions 0.43-0.71 against 0.33 (seed 3 the 0.43;
    # in the full 3000-step job it passed 0.5 at step 1250, the others at 500). The job is
    # bit-reproducible on a given machine (same command, same numbers), so this either
    # always passes there or always fails.
    assert s["eval_accuracy"] > s["chance_accuracy"] + 0.3, s
    by_type = s["eval_accuracy_breakdown"]
    assert by_type["color_at"] > 0.6 and by_type["color_of"] > 0.6, by_type  # chance 1/6
    assert by_type["kind_at"] > 0.4, by_type  # chance 1/3
    assert s["vision_pretrain"]["accuracy_after"]["kind"] > 0.9, s["vision_pretrain"]
    assert s["eval_accuracy"] > s["initial_eval_accuracy"]
    assert set(s["eval_accuracy_breakdown"]) == {"count", "color_at", "kind_at", "color_of", "exists"}
    assert (runs[0].parent / "config.yaml").is_file()
    assert (runs[0].parent / "metrics.jsonl").is_file()


def test_config_error_exits_with_message(tmp_path):
    r = _run(["train", "routing.gate=nope", f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert r.returncode != 0
    assert "routing.gate" in r.stderr


def test_unknown_command_and_help(capsys):
    main(["--help"])
    assert "moe-vlm train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "unknown command" in capsys.readouterr().err


def test_console_script_installed():
    import shutil
    exe = shutil.which("moe-vlm")
    if exe is None:
        pytest.skip("package not installed with its console script")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout


SHIMS = {"train": "train", "upcycle": "upcycle", "import_hf": "import-hf", "export_hf": "export-hf",
         "results": "results", "plot": "plot", "plot_routing": "plot-routing", "fit": "fit",
         "grow": "grow",
         "btx": "btx", "generate": "generate", "show": "show"}


def test_one_table_every_command_a_module():
    """Every subcommand has its ``python -m moe_vlm.<module>`` twin, each handler resolves,
    and the old console-script module is the same entry point."""
    import importlib

    import moe_vlm.cli
    from moe_vlm.commands import COMMANDS, main as commands_main

    assert set(SHIMS.values()) == set(COMMANDS)
    for name, c in COMMANDS.items():
        module, func = c.handler.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    assert moe_vlm.cli.main is commands_main


@pytest.mark.parametrize("module", sorted(m for m in SHIMS if m != "train"))
def test_module_shim_runs_its_command(module, monkeypatch, capsys):
    """``python -m moe_vlm.<module> --help``, run as ``-m`` does (``runpy``, as
    ``__main__``) but in this process: a subprocess per shim cost ~1.5 s of interpreter
    start-up each. ``test_module_shim_in_a_fresh_interpreter`` keeps one real ``-m``."""
    import runpy
    import warnings

    monkeypatch.setattr(sys, "argv", [f"moe_vlm.{module}", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": imported before
        runpy.run_module(f"moe_vlm.{module}", run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: moe-vlm {SHIMS[module]} "), out


def test_module_shim_in_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-m", "moe_vlm.generate", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: moe-vlm generate "), r.stdout
