"""Import the scripts of ``experiments/`` (a folder of scripts, not an installed package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def experiment_script() -> Callable[[str], ModuleType]:
    """``experiment_script(name)``: ``experiments/<name>.py`` as ``experiments.<name>``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return lambda name: importlib.import_module(f"experiments.{name}")
