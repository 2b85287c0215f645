"""``moe_vlm.hf_io``: the one reader of Hugging Face checkpoint directories reads all the
tensors or only those asked for, the same in every weights layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_vlm.errors import CheckpointError
from moe_vlm.hf_io import read_hf_checkpoint, weight_files

TENSORS = {f"layer.{i}.weight": torch.randn(3, i + 1, generator=torch.Generator().manual_seed(i))
           for i in range(4)}


def _write(d: Path, layout: str) -> None:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    if layout == "safetensors":
        save_file(TENSORS, str(d / "model.safetensors"))
    elif layout == "bin":
        torch.save(TENSORS, d / "pytorch_model.bin")
    else:  # two shards and their index
        keys = sorted(TENSORS)
        shards = {"a.safetensors": keys[:2], "b.safetensors": keys[2:]}
        for name, ks in shards.items():
            save_file({k: TENSORS[k] for k in ks}, str(d / name))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: name for name, ks in shards.items() for k in ks}}))


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
def test_whole_and_partial_reads_agree(tmp_path, layout):
    d = tmp_path / layout
    _write(d, layout)
    config, every = read_hf_checkpoint(d)
    assert config == {"model_type": "toy"} and set(every) == set(TENSORS)
    for k, t in TENSORS.items():
        torch.testing.assert_close(every[k], t, rtol=0, atol=0)
    w = weight_files(d)
    assert set(w.files) == set(TENSORS)
    part = w.read(["layer.3.weight", "layer.0.weight"])
    assert set(part) == {"layer.3.weight", "layer.0.weight"}
    torch.testing.assert_close(part["layer.3.weight"], TENSORS["layer.3.weight"], rtol=0, atol=0)


def test_a_key_its_shard_lacks_is_named(tmp_path):
    d = tmp_path / "m"
    _write(d, "sharded")
    index = d / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    wm["layer.0.weight"] = "b.safetensors"  # b holds layers 2 and 3 only
    index.write_text(json.dumps({"weight_map": wm}))
    for read in (lambda: read_hf_checkpoint(d), lambda: weight_files(d).read(["layer.0.weight"])):
        with pytest.raises(CheckpointError, match=r"b\.safetensors: lacks \['layer\.0\.weight'\]"):
            read()
