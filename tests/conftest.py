"""Shared fixtures: tiny configs composed through the real Hydra presets."""

from __future__ import annotations

import os
import socket

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


_LOCAL_HOSTS = {"", "localhost", "::1", "0.0.0.0", socket.gethostname()}  # no getfqdn: a DNS query


@pytest.fixture(autouse=True)
def no_remote_hosts(monkeypatch):
    """Nothing reaches past this machine at run time (no model, tokenizer or data
    downloads, no telemetry): every address lookup of another host is refused and fails
    the test at teardown, also where the caller swallows the error (``datasets`` and W&B
    did, for their usage counters). Processes a test starts are not covered."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def guard(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else ("" if host is None else str(host))
        if name not in _LOCAL_HOSTS and not name.startswith("127."):
            lookups.append(name)
            raise OSError(f"tests run offline: refused to look up {name!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guard)
    yield lookups
    assert not lookups, f"the test tried to reach {sorted(set(lookups))}"


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
