"""V2PE (variable visual position encoding, InternVL3): positions by hand, delta=1 is the
plain model bit for bit, draws are per sample, the training path carries them, and the
Hugging Face export refuses a V2PE model."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.data.sample import collate
from moe_vlm.data.v2pe import V2PE, v2pe_positions

IMG = 9


def test_positions_by_hand():
    # t t [i i] t [i i] t: images of 2 tokens with deltas 0.5 and 0.25
    ids = torch.tensor([1, 2, IMG, IMG, 3, IMG, IMG, 4])
    got = v2pe_positions(ids, IMG, 2, [0.5, 0.25])
    assert got.tolist() == [0, 1, 1.5, 2, 3, 3.25, 3.5, 4.5]
    assert v2pe_positions(ids, IMG, 2, [1, 1]).tolist() == list(range(8))
    starts_with_image = torch.tensor([IMG, IMG, 1])
    assert v2pe_positions(starts_with_image, IMG, 2, [0.5]).tolist() == [0, 0.5, 1.5]
    with pytest.raises(ValueError, match="3 image placeholder tokens"):
        v2pe_positions(torch.tensor([IMG, IMG, IMG]), IMG, 2, [0.5])


def test_training_draws_are_per_sample_and_evaluation_is_fixed():
    v = V2PE(IMG, 2, delta=0.25, train_deltas=(1.0, 0.5, 0.125), seed=3)
    ids = torch.tensor([1] + [IMG] * 6 + [2])  # three images
    draws = {tuple(v.positions(ids, g).tolist()) for g in range(40)}
    assert len(draws) > 3  # images of different samples get different deltas
    assert v.positions(ids, 7).tolist() == v.positions(ids, 7).tolist()  # seeded by the index
    assert v.positions(ids, None).tolist() == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2.5]
    batch = collate([{"input_ids": ids, "position_ids": v.positions(ids, None)},
                     {"input_ids": ids[:3]}])
    assert batch["position_ids"].dtype == torch.float32
    assert batch["position_ids"][1, :3].tolist() == [0, 1, 2]  # plain positions, then padding


def _vlm():
    from moe_vlm.model.vlm import build_vlm

    cfg = load_config(["vision=vit_tiny", "model=tiny"])
    return cfg, build_vlm(cfg, image_token_id=IMG).train()


def test_delta_one_is_the_plain_model_bit_for_bit():
    """Integer positions through the V2PE path give the same logits, loss and gradients as
    no positions at all."""
    cfg, model = _vlm()
    decoder = model.decoder
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12, dtype=torch.float32).expand(2, 12)
    outs = []
    for kwargs in ({}, {"position_ids": pos}):
        decoder.zero_grad()
        out = decoder(input_ids=ids, labels=ids, **kwargs)
        out.loss.backward()
        outs.append((out.logits, {n: p.grad.clone() for n, p in decoder.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][n], g) for n, g in outs[1][1].items())
    half = decoder(input_ids=ids, position_ids=pos * 0.5).logits
    assert not torch.allclose(half, outs[0][0])  # fractional positions do change the output


def test_a_v2pe_run_trains_and_export_refuses_it(tmp_path, capsys):
    from moe_vlm.commands import main as cli
    from moe_vlm.train import train

    cfg = load_config(["train.max_steps=2", "train.batch_size=4", "data.n_eval_samples=4",
                       "train.progress=false", "data.v2pe_delta=0.25",
                       "data.v2pe_train_deltas=[1,0.5,0.25,0.125]", f"run.dir={tmp_path / 'run'}"])
    out = train(cfg, cfg.run.dir)
    assert out["status"] == "completed"
    with pytest.raises(SystemExit):
        cli(["export-hf", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--decoder-only"])
    assert "trained with V2PE (data.v2pe_delta=0.25" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_v2pe_needs_image_data():
    from moe_vlm.config.schema import ConfigError

    with pytest.raises(ConfigError, match="data.v2pe_delta"):
        load_config(["vision=none", "data=synthetic_text", "data.v2pe_delta=0.5"])
    with pytest.raises(ConfigError, match="data.v2pe_train_deltas"):
        load_config(["data.v2pe_train_deltas=[1,0]"])
