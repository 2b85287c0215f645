"""The checkpoint commands end to end on tiny Hugging Face models: ``import-hf``,
``upcycle --from HF_DIR`` (function preserving: the MoE reproduces the HF model's logits),
and ``export-hf`` of the upcycled model as Mixtral, loaded back by ``transformers``; and a
Qwen3 taken the whole way: import, upcycle from the imported directory (``moe.d_expert``
derived), train, export as Qwen3-MoE."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf

from moe_vlm.commands.checkpoints import export_hf_main, import_hf_main, upcycle_main
from moe_vlm.config import ConfigError
from moe_vlm.config.loader import config_from_file
from moe_vlm.train.loop import train
from moe_vlm.upcycling.source import load_checkpoint
from test_hf import make_hf  # tiny random transformers models (this folder)

hf.logging.set_verbosity_error()
V, D = 64, 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                         attn_implementation="eager")
    model = hf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1.0 if "norm" in n else 0.0) + 0.2 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    return d, model


IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))


def our_logits(ckpt_dir) -> torch.Tensor:
    from moe_vlm.model.decoder import build_model
    c = load_checkpoint(ckpt_dir)
    net = build_model(c.config.model, c.config.moe, c.config.routing)
    net.load_state_dict(c.state_dict)
    with torch.no_grad():
        return net.eval()(IDS).logits


def test_import_upcycle_export_round_trip(llama_dir, tmp_path, capsys):
    src, model = llama_dir
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    import_hf_main(["--from", str(src), "--out", str(tmp_path / "imported")])
    torch.testing.assert_close(our_logits(tmp_path / "imported"), want, atol=1e-5, rtol=1e-4)

    upcycle_main(["--from", str(src), "--method", "split", "--out", str(tmp_path / "moe"),
                  "moe.n_experts=2", "moe.d_expert=48", "moe.granularity=3", "moe.n_shared=0",
                  "routing.top_k=1", "routing.renormalize=true", "routing.gate=softmax_topk"])
    assert "function preserving: True" in capsys.readouterr().out
    rec = json.loads((tmp_path / "moe" / "upcycle.json").read_text())
    assert rec["source_kind"] == "hf" and rec["shards"] == 3
    torch.testing.assert_close(our_logits(tmp_path / "moe"), want, atol=1e-5, rtol=1e-4)

    export_hf_main(["--from", str(tmp_path / "moe"), "--out", str(tmp_path / "mixtral")])
    assert '"model_type": "mixtral"' in capsys.readouterr().out
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)


def test_commands_refuse_with_clear_messages(llama_dir, tmp_path, capsys):
    src, _ = llama_dir
    with pytest.raises(SystemExit):
        import_hf_main(["--from", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "no config.json" in capsys.readouterr().err
    upcycle_main(["--from", str(src), "--method", "copy", "--out", str(tmp_path / "ec"),
                  "moe.n_experts=4", "moe.d_expert=48", "moe.granularity=1", "moe.n_shared=0",
                  "routing.gate=expert_choice", "routing.top_k=2", "routing.bias_update_rate=0"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export_hf_main(["--from", str(tmp_path / "ec"), "--out", str(tmp_path / "ec_hf")])
    assert "expert_choice" in capsys.readouterr().err


# two steps of training from a checkpoint directory, as `moe-vlm train --config-path DIR`
TRAIN = ["train.max_steps=2", "train.eval_every=2", "train.batch_size=4", "train.warmup_steps=1",
         "train.progress=false", "data.seq_len=16", "data.n_eval_samples=4"]


@pytest.fixture(scope="module")
def qwen3_imported(tmp_path_factory):
    """A dense HF Qwen3 (vocab 320 for the byte tokenizer, d_ff 96) imported by import-hf."""
    d = tmp_path_factory.mktemp("qwen3")
    model = make_hf("qwen3", vocab_size=320, head_dim=8, intermediate_size=96,
                    num_hidden_layers=2)
    model.save_pretrained(d / "hf")
    import_hf_main(["--from", str(d / "hf"), "--out", str(d / "ours")])
    with torch.no_grad():
        return d / "ours", model(input_ids=IDS).logits


def test_qwen3_import_upcycle_train_export_round_trip(qwen3_imported, tmp_path, capsys):
    imported, want = qwen3_imported
    torch.testing.assert_close(our_logits(imported), want, atol=1e-5, rtol=1e-4)
    # the imported config.yaml points train.init_from at itself; upcycle drops that, and
    # derives copy's only expert width (the dense d_ff) when moe.d_expert is not given
    moe = tmp_path / "moe"
    upcycle_main(["--from", str(imported), "--method", "copy", "--out", str(moe),
                  "moe.n_experts=4", "routing.top_k=2"])
    out = capsys.readouterr().out
    assert "moe.d_expert=96 (not set: derived" in out and "function preserving: True" in out
    rec = json.loads((moe / "upcycle.json").read_text())
    assert rec["derived"] == {"moe.d_expert": 96} and rec["function_preserving"]
    cfg = load_checkpoint(moe).config
    assert cfg.train.init_from == str(moe.resolve()) and cfg.upcycle.method == "none"
    assert (cfg.moe.d_expert, cfg.moe.n_experts, cfg.model.moe_every) == (96, 4, 1)
    torch.testing.assert_close(our_logits(moe), want, atol=1e-5, rtol=1e-4)

    run = tmp_path / "run"
    s = train(config_from_file(moe / "config.yaml", [*TRAIN, f"run.dir={run}"]), run)
    assert s["status"] == "completed" and s["init_from"] == str(moe.resolve())
    trained = our_logits(run)
    assert (trained - want).abs().max() > 1e-3  # the export below checks trained weights

    export_hf_main(["--from", str(run), "--out", str(tmp_path / "hf_moe")])
    assert '"model_type": "qwen3_moe"' in capsys.readouterr().out
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_moe").eval()
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
    assert back.config.num_experts == 4 and back.config.moe_intermediate_size == 96
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, trained, atol=1e-5, rtol=1e-4)


def test_train_upcycles_from_an_imported_dir(qwen3_imported, tmp_path):
    """``moe-vlm train --config-path IMPORTED --config-name config upcycle.method=copy
    upcycle.source=IMPORTED``: that config's train.init_from must be cleared (schema rule:
    init_from or upcycling, not both); then the train path gives the same start as the
    upcycle command."""
    imported, _ = qwen3_imported
    up = ["model.moe_every=1", "moe.n_experts=4", "routing.top_k=2", "moe.d_expert=96",
          "upcycle.method=copy", f"upcycle.source={imported}"]
    with pytest.raises(ConfigError, match="train.init_from"):
        config_from_file(imported / "config.yaml", [*TRAIN, *up])
    cfg = config_from_file(imported / "config.yaml",
                           [*TRAIN, *up, "train.init_from=null", f"run.dir={tmp_path / 'a'}"])
    s = train(cfg, tmp_path / "a")
    assert s["upcycle"]["function_preserving"] and s["upcycle"]["source_kind"] == "run"
    moe = tmp_path / "moe"
    upcycle_main(["--from", str(imported), "--method", "copy", "--out", str(moe),
                  "moe.n_experts=4", "routing.top_k=2"])
    ref = train(config_from_file(moe / "config.yaml", [*TRAIN, f"run.dir={tmp_path / 'b'}"]),
                tmp_path / "b")
    assert s["initial_eval_loss"] == pytest.approx(ref["initial_eval_loss"], rel=1e-6)
    assert s["final_eval_loss"] == pytest.approx(ref["final_eval_loss"], rel=1e-5)
