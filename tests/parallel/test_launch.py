"""Multi-process training through the real launcher: ``torchrun`` (gloo on CPU) running
``python -m moe_vlm.train`` with 2 and 4 processes, both engines.

Batch sizes are global, so a run at any layout must reproduce the single-process run of
the same config: same losses and eval losses step by step (to float rounding), a
checkpoint saved at one layout resumes at another (optimizer state included) on the same
trajectory, and a rank killed under ``torchrun --max-restarts=1`` costs only the steps
since the last checkpoint. Each launch takes ~10-20 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.train import train
from moe_vlm.train.checkpoint import checkpoint_path, list_checkpoints
from moe_vlm.train.rundir import read_jsonl
from test_expert_parallel import _free_port  # noqa: E402

TEXT = ["vision=none", "data=synthetic_text", "data.seq_len=32"]
BASE = ["train.lr=3e-3", "train.batch_size=4", "data.n_eval_samples=8", "train.progress=false",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=3", "train.max_steps=6"]

needs_deepspeed = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def _launch_cmd(nproc: int, overrides: list[str], *torchrun_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *torchrun_args, "-m", "moe_vlm.train", *BASE, *overrides]


def torchrun(nproc: int, overrides: list[str], *torchrun_args: str,
             timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(nproc, overrides, *torchrun_args), env=_env(),
                          capture_output=True, text=True, timeout=timeout)




def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, train loss, eval loss) rows of a run's metrics.jsonl (NaN where absent)."""
    nan = float("nan")
    return [(r["step"], r.get("loss", nan), r.get("eval_loss", nan))
            for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def assert_same_curve(got: list, want: list, rtol: float = 2e-4) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        for a, b in zip(g[1:], w[1:]):
            assert a == pytest.approx(b, rel=rtol, nan_ok=True), (g, w)


_REFS: dict[tuple, tuple[list, dict, Path]] = {}


def _reference(tmp_path_factory, overrides: tuple) -> tuple[list, dict, Path]:
    """(curve, summary, run dir) of the single-process run of ``BASE + overrides``
    (``parallel.*`` dropped), cached per override set."""
    overrides = tuple(o for o in overrides if not o.startswith("parallel."))
    if overrides not in _REFS:
        d = tmp_path_factory.mktemp("ref")
        summary = train(load_config([*BASE, *overrides, f"run.dir={d}"]), d)
        _REFS[overrides] = (curve(d), summary, d)
    return _REFS[overrides]


def reference(tmp_path_factory, *overrides: str) -> list:
    return _reference(tmp_path_factory, overrides)[0]


# (processes, overrides): each micro-batch on a rank is the single-process micro-batch of
# the same samples, so capacity dropping and token means agree exactly.
LAYOUTS = {
    "dp2_ddp": (2, [*TEXT, "parallel.ep=1", "train.micro_batch_size=2"]),
    "ep2_capacity": (2, [*TEXT, "parallel.ep=2", "train.micro_batch_size=2",
                         "routing.capacity_factor=1.0"]),
    # parallelize's whole order: EP, activation checkpointing, then FSDP
    "vlm_ep2_ac_fsdp": (2, ["parallel.ep=2", "data.vision_pretrain_steps=2",
                            "parallel.activation_checkpointing=full", "parallel.fsdp=true",
                            "train.micro_batch_size=2"]),
    # modality-aware routing (a router per modality) and V2PE positions under EP
    "vlm_ep2_modality_v2pe": (2, ["parallel.ep=2", "data.vision_pretrain_steps=2",
                                  "train.micro_batch_size=2", "routing.modality=routers", "data.v2pe_delta=0.5",
                                  "data.v2pe_train_deltas=[1.0,0.5,0.25]"]),
    # modality expert groups in an encoder-free VLM (raw patches reach the experts) under EP
    "vlm_ep2_groups_encoder_free": (2, ["experiment=encoder_free", "parallel.ep=2",
                                        "train.micro_batch_size=2", "routing.modality=groups"]),
    # 4 processes: experts over 2, replicated over 2 (expert-data-parallel gradient
    # averaging), with the aux-loss-free router (bias updates from counts summed over ranks).
    "dp4_ep2_aux_free": (4, [*TEXT, "parallel.ep=2", "train.micro_batch_size=1",
                             "routing=deepseek_v3"]),
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_torchrun_layout_matches_single_process(name, tmp_path, tmp_path_factory):
    nproc, overrides = LAYOUTS[name]
    run = tmp_path / "run"
    res = torchrun(nproc, [*overrides, f"run.dir={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("status: completed") == 1, res.stdout  # one report, from rank 0
    want, want_summary, ref_dir = _reference(tmp_path_factory, tuple(overrides))
    assert_same_curve(curve(run), want)
    summary = json.loads((run / "summary.json").read_text())
    ep = int(next(o for o in overrides if o.startswith("parallel.ep="))[-1])
    fsdp = {"fsdp": True} if "parallel.fsdp=true" in overrides else {}
    assert summary["parallel"] == {"world": nproc, "dp": nproc, "ep": ep, "engine": "torch", **fsdp}
    assert summary["tokens_seen"] == want_summary["tokens_seen"]  # summed over ranks
    got_routing = read_jsonl(run / "metrics.jsonl")[1]["routing"]
    ref_routing = read_jsonl(ref_dir / "metrics.jsonl")[1]["routing"]
    assert got_routing.keys() == ref_routing.keys()
    for name, layer in got_routing.items():  # expert counts are summed over ranks
        assert sum(layer["tokens_per_expert"]) == sum(ref_routing[name]["tokens_per_expert"])
    # The final checkpoint is the single-process state: same tensors as the reference's.
    got = torch.load(checkpoint_path(run / "checkpoints", 6), weights_only=False)
    ref = torch.load(checkpoint_path(ref_dir / "checkpoints", 6), weights_only=False)
    assert got["model"].keys() == ref["model"].keys()
    for key, value in ref["model"].items():
        torch.testing.assert_close(got["model"][key], value, atol=2e-4, rtol=1e-3, msg=key)
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    for i, st in ref["optimizer"]["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][key], value, atol=1e-4,
                                       rtol=1e-2, msg=f"optimizer {i} {key}")


@needs_deepspeed
@pytest.mark.timeout(400)
def test_deepspeed_zero2_matches_torch_engine(tmp_path, tmp_path_factory):
    """ZeRO-2 with experts in DeepSpeed's expert groups, started by the deepspeed launcher:
    the torch engine's first-step loss (to 1e-6), its trajectory after that, and at the end
    the same single-process checkpoint (weights, Adam moments, param groups). The torch
    engine at 2 processes equals the single-process run (the layout tests), so the
    single-process run is the comparison."""
    overrides = [*TEXT, "parallel.ep=2", "train.micro_batch_size=2"]
    ds = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
         str(_free_port()), "--no_local_rank", "--module", "moe_vlm.train", *BASE, *overrides,
         "parallel.engine=deepspeed", "parallel.zero_stage=2", f"run.dir={tmp_path / 'ds'}"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert ds.returncode == 0, ds.stderr[-3000:]
    want, _, ref_dir = _reference(tmp_path_factory, tuple(overrides))
    got = curve(tmp_path / "ds")
    assert got[1][1] == pytest.approx(want[1][1], rel=1e-6)
    assert_same_curve(got, want)
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["parallel"]["engine"] == "deepspeed"
    got = torch.load(checkpoint_path(tmp_path / "ds" / "checkpoints", 6), weights_only=False)
    ref = torch.load(checkpoint_path(ref_dir / "checkpoints", 6), weights_only=False)
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    for i, st in ref["optimizer"]["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][key], value, atol=1e-4,
                                       rtol=1e-2, msg=f"optimizer {i} {key}")
    for key, value in ref["model"].items():
        torch.testing.assert_close(got["model"][key], value, atol=2e-4, rtol=1e-3, msg=key)


@pytest.mark.timeout(400)
def test_checkpoint_resumes_at_another_layout(tmp_path, tmp_path_factory):
    """Saved by 2 processes (ep=2, FSDP) at step 5, finished by one process: the same curve
    as an uninterrupted single-process run, so weights and optimizer moments moved intact.
    With DeepSpeed installed, the other direction too (1 process -> 2-process ZeRO-1)."""
    common = [*TEXT, "train.max_steps=10", "train.ckpt_every=5", "train.eval_every=5",
              "train.micro_batch_size=2"]
    want = reference(tmp_path_factory, *common)
    run = tmp_path / "ep2_then_single"
    first = torchrun(2, [*common, "parallel.ep=2", "parallel.fsdp=true", "train.stop_after_steps=5",
                         f"run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5]
    cfg = load_config([*BASE, *common, f"run.dir={run}"])
    summary = train(cfg, run)
    assert summary["resumed_from"] == 5
    assert summary["resumed_from_layout"]["ep"] == 2
    assert_same_curve(curve(run), want)

    if __import__("importlib.util").util.find_spec("deepspeed") is None:
        return
    run = tmp_path / "single_then_deepspeed"
    cfg = load_config([*BASE, *common, "train.stop_after_steps=5", f"run.dir={run}"])
    train(cfg, run)
    second = torchrun(2, [*common, "parallel.ep=2", "parallel.engine=deepspeed",
                          "parallel.zero_stage=1", f"run.dir={run}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_curve(curve(run), want)


def _workers(parent: int) -> list[int]:
    """PIDs of the direct children of ``parent`` (the launcher's worker processes)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
@pytest.mark.timeout(400)
def test_killed_rank_restarts_from_last_checkpoint(tmp_path, tmp_path_factory):
    """SIGKILL one worker mid-run: torchrun (--max-restarts=1) restarts both, they resume
    from the last checkpoint (loading it into FSDP shards and expert shards) and finish
    with the uninterrupted curve."""
    common = [*TEXT, "train.max_steps=60", "train.ckpt_every=5", "train.eval_every=30",
              "train.micro_batch_size=2", "parallel.ep=2", "parallel.fsdp=true"]
    run = tmp_path / "run"
    proc = subprocess.Popen(_launch_cmd(2, [*common, f"run.dir={run}"], "--max-restarts=1"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list_checkpoints(run / "checkpoints"):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)  # the later-spawned worker
        killed_after = list_checkpoints(run / "checkpoints")[-1][0]
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert out.count("status: completed") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert killed_after <= summary["resumed_from"] < 60
    single = reference(tmp_path_factory, *common)
    assert_same_curve(curve(run), single)


@pytest.mark.timeout(300)
def test_two_nodes_rendezvous(tmp_path, tmp_path_factory):
    """The README's multi-node command: two torchrun agents (two "nodes" of one process
    each, here on one machine) meet through c10d rendezvous and train one ep=2 run."""
    overrides = [*TEXT, "parallel.ep=2", "train.micro_batch_size=2", f"run.dir={tmp_path / 'run'}"]
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         f"--node-rank={n}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=two_nodes", "-m", "moe_vlm.train", *BASE, *overrides],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "status: completed" in outs[0][0] + outs[1][0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["parallel"]["world"] == 2
    assert_same_curve(curve(tmp_path / "run"), reference(tmp_path_factory, *overrides[:-1]))


@pytest.mark.timeout(120)
def test_impossible_layout_is_refused_at_launch(tmp_path):
    res = torchrun(2, [*TEXT, "parallel.ep=3", f"run.dir={tmp_path / 'run'}"])
    assert res.returncode != 0
    assert "moe-vlm train: parallel.ep=3 needs at least 3 processes but 2 were launched" in res.stderr


@pytest.mark.parametrize("world, dp, ep, n_experts, says", [
    (2, 4, 1, 8, "parallel.dp=4 but 2 process(es) were launched"),
    (4, None, 3, 12, "parallel.ep=3 must divide the 4 processes"),
    (4, None, 4, 6, "parallel.ep=4 must divide the 6 routed experts"),
    (2, None, 2, 0, "needs MoE layers"),
])
def test_layout_errors_say_what_to_change(world, dp, ep, n_experts, says):
    from moe_vlm.config.schema import ConfigError, ParallelConfig
    from moe_vlm.parallel.runtime import check_experts, check_layout

    with pytest.raises(ConfigError, match=re.escape(says)):
        check_layout(ParallelConfig(dp=dp, ep=ep), world)
        check_experts(ep, n_experts)
