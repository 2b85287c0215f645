"""``moe-vlm train --help`` lists every config key with its type, value and the doc written
beside it in the schema; every schema field has such a doc."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from moe_vlm.cli import main
from moe_vlm.config import Config
from moe_vlm.config.help import config_keys, field_docs, render_help

SECTIONS = [Config, *(t for t in typing.get_type_hints(Config).values() if dataclasses.is_dataclass(t))]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_schema_field_has_a_doc(section):
    docs, hints = field_docs(section), typing.get_type_hints(section)
    leaves = [f.name for f in dataclasses.fields(section) if not dataclasses.is_dataclass(hints[f.name])]
    missing = [n for n in leaves if not docs.get(n, "").strip()]
    assert not missing, f"{section.__name__}: give these fields a comment in schema.py: {missing}"


@dataclasses.dataclass
class _Sample:
    documented: int = 1  # has a doc
    # a block above counts, a pragma does not
    pragma: int = 2  # noqa: E501
    bare: int = 3


def test_a_field_without_a_comment_has_no_doc():
    docs = field_docs(_Sample)
    assert docs == {"documented": "has a doc",
                    "pragma": "a block above counts, a pragma does not", "bare": ""}


def test_docs_come_from_the_comments_beside_and_above_a_field():
    from moe_vlm.config.schema import RoutingConfig, TrainConfig

    docs = field_docs(RoutingConfig)
    assert docs["renormalize"] == "softmax_topk: renormalise the k kept weights to sum 1"
    assert docs["normalize_top1"].startswith("At k=1 a normalised weight is always 1")
    assert "Megatron-Core" in docs["normalize_top1"]  # the second line of the block
    assert "deterministic kernels" in field_docs(TrainConfig)["deterministic"]
    assert "deterministic" not in field_docs(TrainConfig)["stop_after_steps"]


def test_help_lists_every_key_with_type_value_and_doc():
    text = render_help()
    keys = config_keys()
    assert len(keys) > 100
    for k in keys:
        line = next((ln for ln in text.splitlines() if ln.startswith(f"  {k.key} (")), None)
        assert line is not None, f"{k.key} missing from --help"
        assert " ".join(k.doc.split()[:3]) in " ".join(text.split()), k.key
    assert "  routing.gate ({softmax_topk,sigmoid_topk,expert_choice}) = softmax_topk  -- " in text
    assert "  moe.granularity (int) = 4  -- " in text  # the default job's value, not the schema's
    assert "  routing: deepseek_v3, deepseekmoe*," in text


def test_help_shows_what_the_overrides_compose():
    text = render_help(["routing=olmoe_top8", "model=small"])
    assert "  routing.name (str) = olmoe_top8" in text and "  moe.d_expert (int) = 512" in text
    assert "olmoe_top8*" in text and "small*" in text
    bad = render_help(["experiment=smok"])
    assert "do not compose" in " ".join(bad.split()) and "  routing.top_k (int) = 2" in bad


def test_cli_train_help_prints_it_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["train", "--help"])
    out = capsys.readouterr().out
    assert "  train.max_steps (int) = 2500" in out and "  moe.n_shared (int) = 1" in out
    main(["train", "routing=switch_top1", "-h"])
    assert "  routing.capacity_factor (float | null) = 1.25" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
