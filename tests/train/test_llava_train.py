"""Training end to end on LLaVA-format data from disk: map-style, streaming and packed;
bad rows are skipped and their counts land in metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moe_vlm.config import load_config
from moe_vlm.train import train
from moe_vlm.train.rundir import read_jsonl


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture
def llava_dir(tmp_path) -> Path:
    img = tmp_path / "images"
    img.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img / f"{i}.png")
    (img / "bad.png").write_bytes(random.Random(0).randbytes(100))
    rows = [{"image": f"{i % 4}.png", "conversations": _turns("<image>\nwhat is it?", f"thing {i}")}
            for i in range(10)]
    # Bad rows right after the first 3 (the streaming eval split), so training meets them.
    rows[3:3] = [{"image": "bad.png", "conversations": _turns("<image>\nwhat?", "corrupt")},
                 {"image": "nowhere.png", "conversations": _turns("<image>\nwhat?", "missing")},
                 {"conversations": _turns("two images? <image> <image>", "no")}]  # malformed
    rows.append({"conversations": _turns("text only", "fine")})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.mark.parametrize("mode", [[], ["data.streaming=true"], ["data.pack=true", "data.max_images_per_seq=2"]],
                         ids=["map", "streaming", "packed"])
def test_train_on_llava_dir(llava_dir, tmp_path, mode):
    run = tmp_path / "run"
    cfg = load_config(["data=llava", f"data.path={llava_dir / 'train.jsonl'}",
                       f"data.image_dir={llava_dir / 'images'}", "data.seq_len=96",
                       "data.n_eval_samples=3", "train.batch_size=2", "train.max_steps=6",
                       "train.log_every=1", "train.eval_every=6", "train.progress=false",
                       f"run.dir={run}", *mode])
    with pytest.warns(UserWarning):
        s = train(cfg, cfg.run.dir)
    assert s["status"] == "completed"
    assert s["final_eval_loss"] > 0
    stats = s["data_stats"]
    assert stats["skipped_corrupt_image"] + stats["skipped_missing_image"] >= 1
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "data" in r]
    assert rows and rows[-1]["data"] == stats
    if "data.pack=true" in mode:
        assert stats["packs"] >= 1
