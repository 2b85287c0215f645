"""Config groups own their keys: a preset of ``model/``, ``routing/``, ``moe/``, ... writes
only its own group's keys, so no preset silently overrides another and the defaults order
decides nothing; only ``experiment/`` and ``sweep/`` presets are global."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from moe_vlm.config import Config, load_config
from moe_vlm.config.loader import config_dir, experiments_dir

GLOBAL_GROUPS = {"experiment"}  # and sweep/, which lives in experiments/
SCHEMAS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
GROUPS = sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name not in GLOBAL_GROUPS)
PRESETS = [(g, p.stem) for g in GROUPS for p in sorted((config_dir() / g).glob("*.yaml"))]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "mixture":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed(overrides: list[str], base: list[str]) -> set[str]:
    new, old = (_flat(dataclasses.asdict(load_config(o))) for o in (overrides, base))
    return {k for k in new if new[k] != old[k]}


def test_every_group_is_a_schema_section():
    assert {"model", "routing", "moe", "vision", "data", "train", "parallel"} <= set(GROUPS)
    assert set(GROUPS) <= set(SCHEMAS), "a config group without a schema section"


@pytest.mark.parametrize("group, name", PRESETS, ids=[f"{g}/{n}" for g, n in PRESETS])
def test_group_preset_writes_only_its_own_keys(group, name):
    path = config_dir() / group / f"{name}.yaml"
    assert "@package" not in path.read_text(), f"{path}: only experiment/ and sweep/ are global"
    keys = set(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    assert "defaults" not in keys, f"{path}: a group preset picks no other presets"
    fields = {f.name for f in dataclasses.fields(SCHEMAS[group])}
    assert keys <= fields, f"{path}: keys {sorted(keys - fields)} are not {group}.* keys"


@pytest.mark.parametrize("group, name", PRESETS, ids=[f"{g}/{n}" for g, n in PRESETS])
def test_picking_a_preset_changes_only_its_group(group, name):
    """Composed against the default job, with the moe shape pinned (it follows the routing
    preset by name); a model's width moves ``moe.d_expert``, by the documented rule."""
    pin = ["moe=deepseekmoe", "vision=none", "data=synthetic_text"]
    if group in ("vision", "data"):  # the default data needs a vision tower: keep them
        pin = ["moe=deepseekmoe"]
    if group == "data" and name in ("llava", "text"):
        pytest.skip("needs data.path")
    if group == "vision" and name in ("hf", "none"):
        pytest.skip("needs a checkpoint / a text data set")
    changed = _changed([*pin, f"{group}={name}"], pin)
    derived = {"moe.d_expert"} if group == "model" else set()
    assert {k for k in changed if not k.startswith(f"{group}.")} <= derived


def test_global_presets_are_global():
    for path in [*(config_dir() / "experiment").glob("*.yaml"),
                 *(experiments_dir() / "sweep").glob("*.yaml")]:
        assert "# @package _global_" in path.read_text(), path


@pytest.mark.parametrize("routing", sorted(p.stem for p in (config_dir() / "routing").glob("*.yaml")))
def test_every_routing_preset_brings_its_moe_shape(routing):
    assert (config_dir() / "moe" / f"{routing}.yaml").is_file()
    cfg = load_config([f"routing={routing}"])
    assert cfg.moe == load_config([f"routing={routing}", f"moe={routing}"]).moe
    other = "mixtral_top2" if routing != "mixtral_top2" else "deepseekmoe"
    picked = load_config([f"routing={routing}", f"moe={other}"])
    assert picked.routing == cfg.routing and picked.moe == load_config([f"moe={other}"]).moe


@pytest.mark.parametrize("model", sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")))
def test_expert_width_follows_the_model(model):
    cfg = load_config([f"model={model}"])
    assert cfg.moe.d_expert == cfg.model.d_ff // 2
    assert load_config([f"model={model}", "moe.d_expert=64"]).moe.d_expert == 64
