"""Experiment trackers (log.tensorboard, log.wandb): they mirror metrics.jsonl, read back
with TensorBoard's reader and from W&B's offline run files; a resumed run continues the
same tracker run; a missing package is a clear error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from moe_vlm.config.environment import check_runnable
from moe_vlm.errors import ConfigError
from moe_vlm.train import train
from moe_vlm.train.rundir import read_jsonl
from moe_vlm.train.trackers import load_heatmaps, scalars_of

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

RUN = ["train.max_steps=20", "train.log_every=5", "train.eval_every=10", "train.ckpt_every=10"]


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    out = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    out["_images"] = [(e.step, e.width * 1000 + e.height) for t in ea.Tags()["images"]
                      for e in ea.Images(t)]
    return out


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log: a 7-byte
    header, then 32 KiB blocks of chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(part)
            records.append(rec)
            part = b""
    return records


def wandb_runs(run_dir: Path) -> list[dict]:
    """Per offline run directory (in start order): the run id, the config keys and the
    history as {step: {key: value}}."""
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        run_id, config, history = None, {}, {}
        for rec in wandb_records(next(d.glob("run-*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":  # the run record carries the config passed to wandb.init
                run_id = rec.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
                history[int(json.loads(items["_step"]))] = items
        out.append({"id": run_id, "config": config, "history": history})
    return out


def test_trackers_mirror_metrics_and_resume_into_the_same_run(tiny_config, tmp_path, no_remote_hosts):
    run_dir, on = tmp_path / "run", ("log.tensorboard=true", "log.wandb=true")
    train(tiny_config(*RUN, *on, "train.stop_after_steps=10"), run_dir)
    # a killed run's tail: events past the checkpoint (step 10) that the resume must drop
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(run_dir / "tensorboard"))
    w.add_scalar("loss", 123.0, 15)
    w.close()
    cfg = tiny_config(*RUN, *on)
    train(cfg, run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    tb = tb_scalars(run_dir)
    for key in ("loss", "eval_loss", "routing/layer_0/max_violation"):
        want = [(r["step"], pytest.approx(scalars_of(r)[key], rel=1e-6)) for r in rows
                if key in scalars_of(r)]
        assert tb[key] == want and len(want) >= 3
    assert [s for s, _ in tb["_images"]] == [5, 10, 15, 20]  # a heatmap per routing row
    first, second = wandb_runs(run_dir)  # one offline directory per start
    assert first["id"] == second["id"] == \
        json.loads((run_dir / "tracker_ids.json").read_text())["wandb"]  # one run, joined by sync
    assert sorted(first["history"]) == [0, 5, 10] and sorted(second["history"]) == [15, 20]
    assert second["config"]["seed"] == cfg.seed
    assert second["config"]["model"]["d_model"] == cfg.model.d_model
    history = {**first["history"], **second["history"]}
    for r in rows:
        key = "loss" if "loss" in r else "eval_loss"
        assert json.loads(history[r["step"]][key]) == pytest.approx(r[key], rel=1e-6)
    assert json.loads(history[20]["expert_load/decoder/_type"]) == "image-file"
    try:  # flush W&B's usage telemetry now (a background thread exports it otherwise)
        from wandb.analytics.opentelemetry.opentelemetry_proxy import get_open_telemetry_proxy
    except ImportError:  # another wandb version: the lookups seen so far are all we check
        get_open_telemetry_proxy = lambda: None  # noqa: E731
    if (proxy := get_open_telemetry_proxy()) is not None:
        proxy.shutdown(timeout_millis=5000)
    assert no_remote_hosts == []  # offline: not even W&B's telemetry tried to leave the machine


def test_missing_package_is_a_clear_error(tiny_config, monkeypatch):
    import moe_vlm.config.environment as env

    real = env._has_module
    monkeypatch.setattr(env, "_has_module", lambda name: name != "wandb" and real(name))
    with pytest.raises(ConfigError, match=r"log.wandb=true needs the wandb package.*\[trackers\]"):
        check_runnable(tiny_config("log.wandb=true"), None)
    check_runnable(tiny_config("log.tensorboard=true"), None)


def test_scalars_and_heatmaps_of_a_row():
    row = {"step": 5, "loss": 2.0, "skipped": False, "routing": {
        "layer_0": {"tokens_per_expert": [3.0, 1.0, 0.0, 0.0], "entropy": 0.5},
        "layer_1": {"tokens_per_expert": [1.0, 1.0, 1.0, 1.0]},
        "vision_layer_1": {"tokens_per_expert": [2.0, 0.0]}}, "data": {"a": {"samples": 4}}}
    assert scalars_of(row) == {"loss": 2.0, "skipped": 0.0, "routing/layer_0/entropy": 0.5,
                               "data/a/samples": 4.0}
    maps = load_heatmaps(row)
    np.testing.assert_allclose(maps["expert_load/decoder"],
                               [[1.0, 1 / 3, 0, 0], [1 / 3, 1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(maps["expert_load/vision"], [[1.0, 0.0]])
    assert load_heatmaps({"loss": 1.0}) == {}
