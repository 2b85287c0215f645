"""The checkpoint commands end to end on a tiny Hugging Face Llama: ``import-hf``,
``upcycle --from HF_DIR`` (function preserving: the MoE reproduces the HF model's logits),
and ``export-hf`` of the upcycled model as Mixtral, loaded back by ``transformers``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf

from moe_vlm.checkpoints_cli import export_hf_main, import_hf_main, upcycle_main
from moe_vlm.upcycling.source import load_checkpoint

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
