"""The benchmark entry points run (numbers are never asserted: speed is measured, not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_gpu_check_refuses_without_cuda():
    logs = ROOT / "benchmarks" / "results" / "gpu_check"
    existed = logs.exists()
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr and "=== train" not in r.stdout
    assert existed or not logs.exists()  # nothing half-written


def test_bench_train_same_weights_as_transformers(tmp_path):
    if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
        sys.path.insert(0, str(ROOT))
    from benchmarks.bench_train import main

    rows = main(["--shape", "cpu-small", "--backends", "grouped_mm", "--hf-impls", "eager",
                 "--warmup", "0", "--steps", "1", "--out-dir", str(tmp_path)])
    assert [r["impl"] for r in rows] == ["ours/grouped_mm/fp32", "hf/eager"]
    assert all(r.get("ms_per_step", 0) > 0 and r["logits_rel_err"] < 1e-4 for r in rows)
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "train.jsonl").is_file()


def test_common_imports_only_what_its_docstring_says():
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import benchmarks.common as c\n"
            "c.print_table([{'a': 1}], ['a'])\n"
            "print(sorted(m for m in sys.modules if m.startswith(('moe_vlm', 'hydra', 'omegaconf'))))\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str(["moe_vlm", "moe_vlm.analysis", "moe_vlm.analysis.cost_model",
                                             "moe_vlm.atomic"])
