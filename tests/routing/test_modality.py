"""Modality-aware experts (Uni-MoE; ``routing.modality``): with groups no token is routed
outside its modality's experts (whatever the gate or the balancing bias), a router per
modality routes each modality with its own weights, the balance loss is taken per
modality over the experts each may choose, and a run trains with the loads split."""

from __future__ import annotations

import pytest
import torch

from moe_vlm.config import load_config
from moe_vlm.config.schema import ConfigError, RoutingConfig
from moe_vlm.config.sizes import image_experts
from moe_vlm.routing.balancing import switch_aux_loss
from moe_vlm.routing.router import Router

E, D = 8, 16


def _router(**kw) -> Router:
    r = Router(D, E, 2, RoutingConfig(top_k=2, aux_loss_coef=0.1, **kw))
    r.init_weights(0.5, torch.Generator().manual_seed(0))
    return r


def _tokens(t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(t, D, generator=g), torch.rand(t, generator=g) < 0.4  # [T, D], [T]


@pytest.mark.parametrize("gate,bias", [("softmax_topk", 0.0), ("sigmoid_topk", 0.0),
                                       ("sigmoid_topk", 0.01), ("softmax_topk", 0.01)])
def test_groups_never_route_outside_the_modality(gate, bias):
    r = _router(gate=gate, modality="groups", image_experts=0.5, bias_update_rate=bias)
    with torch.no_grad():  # a balancing bias pulling every token to the other group
        r.bias.copy_(torch.where(r.image_expert, -10.0, 10.0))
    x, img = _tokens()
    out = r(x, is_image=img)
    img_expert = torch.tensor(image_experts(E, 0.5))
    assert torch.equal(img_expert[out.expert_idx], img[out.token_idx])
    by_modality = torch.zeros(2, E).index_put_(
        (img[out.token_idx].long(), out.expert_idx), torch.ones(len(out.expert_idx)), accumulate=True)
    assert by_modality[1, ~img_expert].sum() == 0 and by_modality[0, img_expert].sum() == 0
    assert by_modality.sum() == 2 * len(img)  # every token got its k experts
    assert torch.isfinite(out.weight).all() and torch.isfinite(out.loss)


def test_a_router_per_modality():
    """``routers``: text rows are routed by the shared weights exactly as without the
    option; image rows by the image router, which gets gradient from image rows only."""
    x, img = _tokens()
    plain, per = _router(), _router(modality="routers")
    with torch.no_grad():
        per.weight.copy_(plain.weight)
    a, b = plain(x), per(x, is_image=img)
    text = ~img[b.token_idx]
    assert torch.equal(a.expert_idx[text], b.expert_idx[text])
    assert torch.equal(a.weight[text], b.weight[text])
    b.weight[~text].sum().backward()  # image rows' weights only
    assert per.image_weight.grad.abs().sum() > 0 and per.weight.grad.abs().sum() == 0


def test_per_modality_balance_loss_by_hand():
    """Each modality group's loss is ``E_g * sum_i f_i P_i`` over its own tokens, 1 when
    balanced over its experts; the result is their mean (float64 by hand)."""
    g = torch.Generator().manual_seed(2)
    t, k = 12, 2
    img = torch.arange(t) < 5
    allowed = img[:, None] == torch.tensor(image_experts(E, 0.25))[None, :]  # 2 image experts
    logits = torch.randn(t, E, generator=g, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1)
    chosen = probs.topk(k, -1).indices
    got = switch_aux_loss(probs, chosen, E, n_groups=2, group_ids=img.long(),
                          group_experts=torch.tensor([6, 2]))
    want = []
    for m, e_g in ((False, 6), (True, 2)):
        rows = img == m
        f = torch.zeros(E, dtype=torch.float64)
        for e in chosen[rows].flatten():
            f[e] += 1
        f /= k * rows.sum()
        want.append(e_g * (f * probs[rows].mean(0)).sum())
    torch.testing.assert_close(got, torch.stack(want).mean())
    balanced = torch.full((4, 2), 0.5, dtype=torch.float64)  # 4 tokens, 2 experts, top-2
    one = switch_aux_loss(balanced, torch.tensor([[0, 1]] * 4), 2, n_groups=2,
                          group_ids=torch.tensor([0, 0, 1, 1]), group_experts=torch.tensor([2, 2]))
    torch.testing.assert_close(one, torch.tensor(1.0, dtype=torch.float64))


def test_modality_routing_is_checked():
    with pytest.raises(ConfigError, match="routing.modality"):
        load_config(["vision=none", "data=synthetic_text", "routing.modality=groups"])
    with pytest.raises(ConfigError, match="routing.image_experts"):
        load_config(["routing.modality=groups", "routing.image_experts=0.1"])
    with pytest.raises(ConfigError, match="routing.gate"):
        load_config(["routing.modality=groups", "routing.gate=expert_choice",
                     "routing.aux_loss_coef=0"])
    with pytest.raises(ConfigError, match="routing.aux_loss_scope"):
        load_config(["routing.modality=routers", "routing.aux_loss_scope=sequence"])


@pytest.mark.parametrize("mode", ["groups", "routers"])
def test_a_modality_run_trains_with_the_loads_split(mode, tmp_path):
    from moe_vlm.train import train
    from moe_vlm.train.rundir import read_jsonl

    cfg = load_config(["train.max_steps=2", "train.batch_size=4", "data.n_eval_samples=4",
                       "train.progress=false", "train.log_every=1", f"routing.modality={mode}",
                       f"run.dir={tmp_path / 'run'}"])
    assert train(cfg, cfg.run.dir)["status"] == "completed"
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "routing" in r]
    assert rows
    n_exp = len(rows[-1]["routing"]["layer_1"]["tokens_per_expert"])
    img_expert = image_experts(n_exp, cfg.routing.image_experts)
    for layer in rows[-1]["routing"].values():
        image, text = layer["tokens_per_expert_image"], layer["tokens_per_expert_text"]
        assert sum(image) > 0 and sum(text) > 0
        if mode == "groups":
            assert all(n == 0 for n, i in zip(image, img_expert) if not i)
            assert all(n == 0 for n, i in zip(text, img_expert) if i)


def test_hf_export_refuses_modality_routing(tmp_path):
    from moe_vlm.model.decoder import build_model
    from moe_vlm.upcycling.hf import export_hf

    cfg = load_config(["routing.modality=groups"])
    model = build_model(cfg.model, cfg.moe, cfg.routing)
    with pytest.raises(ValueError, match="routing.modality=groups"):
        export_hf(model.state_dict(), cfg.model, cfg.moe, cfg.routing, tmp_path / "hf")
