"""Fixed-choice keys are ``Choice`` enums: OmegaConf checks them on composition, validation
and ``--help`` read the choices from the type, and a config still holds plain strings, so
comparisons, JSON, checkpoints, a run's config.yaml and resume comparisons work as before."""

from __future__ import annotations

import dataclasses
import io
import json
import typing

import pytest
import torch
from omegaconf import OmegaConf

from moe_vlm.config import Config, ConfigError, RoutingConfig, apply_overrides, load_config, validate
from moe_vlm.config.loader import config_from_file
from moe_vlm.config.schema import Choice, Gate
from moe_vlm.config.validation import choice_fields
from moe_vlm.train.resume import config_changes

SECTIONS = [t for t in typing.get_type_hints(Config).values() if dataclasses.is_dataclass(t)]
CHOICES = {f"{s.__name__}.{k}": t for s in SECTIONS for k, t in choice_fields(s).items()}


def _strings(node) -> list[tuple[str, type]]:
    """(key, type) of every string-like value in a config, recursively."""
    out = []
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            out += [(f"{f.name}.{k}", t) for k, t in _strings(v)]
        elif isinstance(v, str):
            out.append((f.name, type(v)))
    return out


def test_the_fixed_choice_keys_are_enums():
    expected = {"ModelConfig.rope_scaling", "VisionConfig.name", "VisionConfig.act",
                "VisionConfig.pos_emb", "ProjectorConfig.type", "MoEConfig.backend",
                "RoutingConfig.gate", "RoutingConfig.aux_loss_scope", "DataConfig.name",
                "DataConfig.tokenizer", "TrainConfig.schedule", "TrainConfig.precision",
                "TrainConfig.nan_policy", "ParallelConfig.engine", "UpcycleConfig.method",
                "UpcycleConfig.base", "UpcycleConfig.shared"}
    assert expected <= set(CHOICES)


@pytest.mark.parametrize("kind", sorted({t for t in CHOICES.values()}, key=lambda t: t.__name__))
def test_members_are_named_as_their_values(kind):
    """OmegaConf looks a YAML string up by member name."""
    assert issubclass(kind, Choice) and kind.values()
    assert all(m.name == m.value for m in kind)
    assert all(f"{m}" == m.value == str(m) and m == m.value for m in kind)


@pytest.mark.parametrize("overrides", [[], ["routing=expert_choice", "moe.backend=torch",
                                            "train.schedule=wsd", "vision=none", "data=synthetic_text"]])
def test_a_config_holds_plain_strings(overrides):
    cfg = load_config(overrides)
    assert all(t is str for _, t in _strings(cfg)), _strings(cfg)
    built = RoutingConfig(gate=Gate.expert_choice)
    assert type(built.gate) is str and built.gate == "expert_choice" == Gate.expert_choice
    assert type(dataclasses.replace(built, top_k=3).gate) is str


def test_json_checkpoint_yaml_and_resume_round_trip(tmp_path):
    cfg = load_config(["routing=deepseek_v3", "train.precision=fp32", "moe.backend=torch"])
    saved = dataclasses.asdict(cfg)
    assert json.loads(json.dumps(saved)) == saved
    buf = io.BytesIO()
    torch.save({"summary": {"config": saved}}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["summary"]["config"] == saved
    path = tmp_path / "config.yaml"  # as moe_vlm.train.loop writes it
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    assert "gate: sigmoid_topk" in path.read_text()
    back = config_from_file(path)
    assert back == cfg and not config_changes(json.loads(json.dumps(saved)), dataclasses.asdict(back))
    assert config_changes(saved, dataclasses.asdict(apply_overrides(path, ["routing.gate=softmax_topk"])))


@pytest.mark.parametrize("how", ["load_config", "apply_overrides", "validate"])
def test_a_bad_choice_is_one_line_naming_key_and_choices(how):
    bad = {"load_config": lambda: load_config(["routing.gate=nope"]),
           "apply_overrides": lambda: apply_overrides(Config(), ["routing.gate=nope"]),
           "validate": lambda: validate(dataclasses.replace(Config(), routing=RoutingConfig(gate="nope")))}
    with pytest.raises(ConfigError) as e:
        bad[how]()
    assert str(e.value) == ("routing.gate: unknown value 'nope'; choose one of "
                            "['softmax_topk', 'sigmoid_topk', 'expert_choice']")


@pytest.mark.parametrize("key, kind", [("train.schedule", "TrainConfig.schedule"),
                                       ("moe.backend", "MoEConfig.backend"),
                                       ("routing.aux_loss_scope", "RoutingConfig.aux_loss_scope")])
def test_every_choice_is_accepted_and_others_refused(key, kind):
    for value in CHOICES[kind].values():
        cfg = apply_overrides(Config(), [f"{key}={value}"])
        assert OmegaConf.select(OmegaConf.create(dataclasses.asdict(cfg)), key) == value
    with pytest.raises(ConfigError, match=f"^{key}: unknown value 'x'"):
        apply_overrides(Config(), [f"{key}=x"])
