"""``moe_vlm.scaling`` is pure numpy/scipy: importing it (and its CLI) pulls in no torch
and no model code. Checked in a fresh interpreter, since the test session imports torch."""

from __future__ import annotations

import subprocess
import sys


def test_scaling_imports_no_torch_and_no_model_code():
    code = ("import sys, moe_vlm.scaling, moe_vlm.commands, moe_vlm.commands.scaling, moe_vlm.scaling.plots\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'triton_kernels')\n"
            "             or m.startswith(('moe_vlm.model', 'moe_vlm.routing', 'moe_vlm.train')))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
