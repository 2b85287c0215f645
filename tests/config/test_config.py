"""Config composition, presets and validation errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from moe_vlm.config import Config, ConfigError, load_config, validate
from moe_vlm.config.loader import config_dir
from moe_vlm.model.granularity import resolve_moe_sizes

MODELS = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
ROUTINGS = sorted(p.stem for p in (config_dir() / "routing").glob("*.yaml"))


def test_default_composes_to_schema():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny" and cfg.routing.name == "deepseekmoe"
    assert cfg.vision.name == "vit" and cfg.data.name == "synthetic_vlm"
    assert cfg.moe.n_shared == 1 and cfg.moe.granularity == 4


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_preset_pair_validates(model, routing):
    cfg = load_config([f"model={model}", f"routing={routing}"])
    assert cfg.model.name == model and cfg.routing.name == routing
    sizes = resolve_moe_sizes(cfg.moe, cfg.routing)
    assert sizes.top_k <= sizes.n_experts


def test_presets_exist():
    assert {"tiny", "small", "medium", "large"} <= set(MODELS)
    assert {"switch_top1", "mixtral_top2", "deepseekmoe", "olmoe_top8", "deepseek_v3",
            "expert_choice"} <= set(ROUTINGS)


def test_overrides_and_experiment_preset():
    cfg = load_config(["experiment=smoke", "routing.top_k=2", "moe.n_experts=16", "seed=3"])
    assert cfg.train.max_steps == 40 and cfg.routing.top_k == 2 and cfg.moe.n_experts == 16
    assert cfg.seed == 3
    dense = load_config(["experiment=dense_baseline"])
    assert dense.model.moe_every == 0


@pytest.mark.parametrize("overrides, key", [
    (["moe.n_expert=3"], "n_expert"),  # typo
    (["routing=mixtral_top2", "routing.top_k=9"], "routing.top_k"),
    (["model.n_heads=5"], "model.d_model"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["routing.gate=topk_magic"], "routing.gate"),
    (["routing.aux_loss_scope=epoch"], "routing.aux_loss_scope"),
    (["moe.backend=cuda_magic"], "moe.backend"),
    (["moe.granularity=3"], "moe.granularity"),
    (["train.micro_batch_size=5"], "train.micro_batch_size"),
    (["routing.capacity_factor=-1"], "routing.capacity_factor"),
    (["data.seq_len=1024"], "data.seq_len"),
    (["train.lr=abc"], "train.lr"),
    (["model=no_such_model"], "model/no_such_model"),
    (["parallel.dp=2", "parallel.ep=4"], "parallel.ep"),
    (["parallel.dp=3"], "train.batch_size"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage"),
    (["parallel.engine=mpi"], "parallel.engine"),
    (["parallel.engine=deepspeed", "parallel.fsdp=true"], "parallel.fsdp"),
    (["vision=none"], "vision.name"),  # the default data needs images
    (["vision=hf"], "vision.hf_path"),
    (["data=llava", "data.seq_len=128"], "data.path"),
    (["vision.image_size=30"], "vision.image_size"),
    (["projector.merge=3"], "projector.merge"),
    (["data.tokenizer=hf"], "data.tokenizer_path"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert key in str(e.value)


def test_validate_catches_direct_dataclass_errors():
    cfg = Config()
    bad = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, top_k=0))
    with pytest.raises(ConfigError, match="routing.top_k"):
        validate(bad)
    validate(cfg)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_validation_and_the_model_share_one_size_rule(routing):
    """The resolved sizes come from one function (``moe_vlm.config.sizes``) for both the
    validation limits and the layers; the router holds the one resolved top-k."""
    from moe_vlm.config import sizes
    from moe_vlm.model import build_model, granularity

    assert granularity.resolve_moe_sizes is sizes.resolve_moe_sizes
    cfg = load_config([f"routing={routing}", "vision=none", "data=synthetic_text"])
    want = sizes.resolve_moe_sizes(cfg.moe, cfg.routing)
    assert want.top_k == cfg.routing.top_k * cfg.moe.granularity
    for layer in build_model(cfg.model, cfg.moe, cfg.routing, device="cpu").moe_layers():
        assert layer.sizes == want
        assert layer.router.top_k == layer.router.cfg.top_k == want.top_k
        assert layer.router.n_experts == want.n_experts
        assert dataclasses.replace(layer.router.cfg, top_k=cfg.routing.top_k) == cfg.routing
    with pytest.raises(ConfigError, match="^routing.top_k"):
        load_config([f"routing={routing}", f"routing.top_k={want.n_experts // cfg.moe.granularity + 1}"])
