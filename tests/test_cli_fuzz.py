"""Adversarial use of ``moe-vlm``: each bad command or shared file ends in one line on
stderr naming what to change (exit 2), writes nothing, and runs no code from a file.

In-process (``moe_vlm.commands.main``) to stay fast. The value-level config fuzz is
``tests/config/test_config_fuzz.py``, bad data files ``tests/data/test_bad_data.py``,
bad run directories for the tables and HF files ``tests/analysis/test_bad_inputs.py``,
checkpoint integrity ``tests/train/test_run_integrity.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe_vlm.commands import main
from moe_vlm.config.environment import LAUNCHER_ENV
from moe_vlm.train import train

TEXT = ["vision=none", "data=synthetic_text", "train.progress=false", "train.batch_size=4",
        "data.seq_len=32", "data.n_eval_samples=8"]


class Payload:
    """Unpickling this creates the file named in ``MARK``."""

    def __reduce__(self):
        return (Path(os.environ["MARK"]).write_text, ("ran",))


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``moe-vlm argv``; it must exit ``code`` with one ``moe-vlm ...:`` line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]
    assert len(err) == 1 and err[0].startswith("moe-vlm "), err
    return err[0]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """A completed 2-step run directory (with its CLI records) to attack."""
    from moe_vlm.config import load_config

    run = tmp_path_factory.mktemp("done") / "run"
    train(load_config([*TEXT, "train.max_steps=2", f"run.dir={run}"]), run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- train.max_steps=2\n")
    return run


CONFIG_CASES = [  # (overrides, what the one line must say)
    (["experiment=smok"], "experiment=smok: no such preset; choose one of [align"),
    (["routing=nope"], "routing=nope: no such preset"),
    (["model.nope=1"], "nope"),
    (["train.lr=inf"], "train.lr: must be a finite number"),
    (["routing.z_loss_coef=nan"], "routing.z_loss_coef"),
    (["model.head_dim=0"], "model.head_dim"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.n_dense_layers=9"], "model.n_dense_layers"),
    (["train.max_skipped_steps=-1"], "train.max_skipped_steps"),
    (["train.beta1=1.5"], "train.beta1"),
    (["vision.patch_size=0"], "vision.patch_size"),
    (["vision.image_std=[0,0,0]"], "vision.image_std"),
    (["model.max_seq_len=2000000000"], "model.max_seq_len"),
    (["model.vocab_size=4000000000"], "model.vocab_size"),
    (["train.device=tpu"], "train.device: unknown device 'tpu'"),
    (["parallel.engine=deepspeed"], "parallel.engine: deepspeed needs a launcher"),
    (["train.init_from=/nonexistent/run"], "train.init_from"),
    (["upcycle.method=copy", "upcycle.source=/nonexistent"], "upcycle.source"),
    (["data=llava", "data.path=/nonexistent.jsonl", "model.max_seq_len=512"], "data.path"),
    (["vision=hf", "vision.hf_path=/nonexistent"], "vision.hf_path"),
    (["--experimental-rerun", "x.pickle"], "--experimental-rerun unpickles"),
    (["-m", "--cfg", "job"], "give only one of"),
]


@pytest.mark.parametrize("overrides, says", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_is_one_line_and_writes_nothing(overrides, says, tmp_path, capsys, monkeypatch):
    for k in LAUNCHER_ENV:  # in-process distributed tests may leave a launcher's variables
        monkeypatch.delenv(k, raising=False)
    run = tmp_path / "run"
    line = one_line_error(capsys, ["train", *overrides, f"run.dir={run}"])
    assert says in line
    assert not run.exists()


def test_bad_run_dir(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "run.dir" in one_line_error(capsys, ["train", f"run.dir={tmp_path / 'f'}"])
    assert "run.dir" in one_line_error(capsys, ["train", f"run.dir={tmp_path / 'f' / 'sub'}"])


def test_triton_backend_without_gpu_or_interpreter(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU can run Triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "moe.backend: triton cannot run here" in one_line_error(
        capsys, ["train", "moe.backend=triton", f"run.dir={tmp_path / 'r'}"])


EVIL_CONFIGS = {  # a shared config directory must not make Hydra or logging run code
    "callbacks": "hydra:\n  callbacks:\n    x:\n      _target_: pathlib.Path.touch\n"
                 "      self: MARK\n",
    "job_logging": "hydra:\n  job_logging:\n    version: 1\n    root:\n      handlers: [h]\n"
                   "    handlers:\n      h:\n        (): pathlib.Path.touch\n        self: MARK\n",
    "defaults_callbacks": "defaults:\n  - hydra/callbacks: evil\n",
    "defaults_logging": "defaults:\n  - override hydra/job_logging: evil\n",
    "target_in_body": "model:\n  init:\n    _target_: pathlib.Path.touch\n",
    "launcher": "hydra:\n  launcher:\n    _target_: pathlib.Path.touch\n",
}


@pytest.mark.parametrize("name", list(EVIL_CONFIGS))
def test_planted_config_dir_does_not_run(name, tmp_path, capsys):
    cfg_dir, mark = tmp_path / "shared", tmp_path / "ran"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text(EVIL_CONFIGS[name].replace("MARK", str(mark)))
    line = one_line_error(capsys, ["train", "--config-path", str(cfg_dir), "--config-name", "config"])
    assert "would make Hydra run code" in line and str(cfg_dir / "config.yaml") in line
    assert not mark.exists()


def test_config_path_with_unknown_key(tmp_path, capsys):
    cfg_dir = tmp_path / "shared"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text("model:\n  d_modle: 64\n")
    assert "d_modle" in one_line_error(capsys, ["train", "--config-path", str(cfg_dir),
                                                "--config-name", "config"])


def test_flags_after_overrides(capsys):
    main(["train", "train.max_steps=2", "--cfg", "job"])  # Hydra alone: "unrecognized arguments"
    assert "max_steps: 2" in capsys.readouterr().out


@pytest.fixture
def planted(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A run-shaped directory whose checkpoint would create ``mark`` when unpickled."""
    mark = tmp_path / "ran"
    monkeypatch.setenv("MARK", str(mark))
    run = tmp_path / "planted"
    (run / "checkpoints").mkdir(parents=True)
    from moe_vlm.config import load_config
    from omegaconf import OmegaConf
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(load_config(TEXT))))
    torch.save({"model": {}, "x": Payload()}, run / "checkpoints" / "step_00000001.pt")
    return run, mark


@pytest.mark.parametrize("cmd", ["init_from", "upcycle", "export-hf", "upcycle.source"])
def test_planted_checkpoint_does_not_run(cmd, planted, tmp_path, capsys):
    run, mark = planted
    argv = {"init_from": ["train", *TEXT, f"train.init_from={run}", f"run.dir={tmp_path / 'r'}"],
            "upcycle.source": ["train", *TEXT, "upcycle.method=copy", f"upcycle.source={run}",
                               f"run.dir={tmp_path / 'r'}"],
            "upcycle": ["upcycle", "--from", str(run), "--method", "copy", "--out", str(tmp_path / "o")],
            "export-hf": ["export-hf", "--from", str(run), "--out", str(tmp_path / "o")]}[cmd]
    line = one_line_error(capsys, argv)
    assert "no usable checkpoints" in line or "trust_checkpoint" in line, line
    assert not mark.exists()


def test_rejected_command_leaves_the_run_as_it_was(done_run, capsys):
    records = {p: p.read_bytes() for p in done_run.rglob("*") if p.is_file() and p.name != ".lock"}
    # Refused before Hydra starts (validation) and inside the run (another config).
    assert "routing.top_k" in one_line_error(
        capsys, ["train", *TEXT, "routing.top_k=99", "train.max_steps=2", f"run.dir={done_run}"])
    line = one_line_error(capsys, ["train", *TEXT, "train.lr=1e-4", "train.max_steps=4",
                                   f"run.dir={done_run}"])
    assert "train.lr: " in line and "-> 0.0001" in line and "train.allow_changes=[train.lr]" in line
    after = {p: p.read_bytes() for p in done_run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == records
