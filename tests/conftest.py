"""Shared fixtures: tiny configs composed through the real Hydra presets."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. Set before anything
# imports triton_kernels: the interpreter is chosen when a kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # decorate the kernels for the interpreter now: a test that unsets the variable
        import triton_kernels  # noqa: F401  (to check an error message) must not be the first
    except ImportError:  # to import them, or every later Triton test finds no GPU driver
        pass

from moe_vlm.config import Config, load_config

# Tests are CPU-only and deterministic; keep torch from oversubscribing 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TEXT = ["vision=none", "data=synthetic_text"]  # text-only decoder runs
FAST = [*TEXT, "train.lr=3e-3", "train.batch_size=4", "data.seq_len=32", "data.n_eval_samples=8",
        "train.progress=false", "train.warmup_steps=2"]


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(*overrides)`` -> a validated Config for a seconds-long run in tmp."""

    def make(*overrides: str) -> Config:
        return load_config([*FAST, f"run.dir={tmp_path / 'run'}", *overrides])

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def experiment_script():
    """``experiment_script(name)``: ``experiments/<name>.py`` (a folder of scripts, not an
    installed package) imported as ``experiments.<name>``."""
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return lambda name: importlib.import_module(f"experiments.{name}")
