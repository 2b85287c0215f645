"""Parameter / FLOP accounting by hand, and fine-grained expert sizes (granularity).

Legend: V vocabulary, D model width, L layers, H query heads, G key/value heads,
Hd head dim, F dense MLP width, E routed experts, Fe expert width, K active experts.
"""

from __future__ import annotations

import pytest

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.model.counting import count_params, flops_per_token
from moe_vlm.model.decoder import build_model
from moe_vlm.model.granularity import MoESizes, fine_grained, resolve_moe_sizes

V, D, L, H, G, F_DENSE = 50, 8, 2, 2, 1, 16
HD = D // H  # 4
E, FE, K, N_SHARED = 4, 6, 2, 1


def build(tie=True, qk_norm=False, granularity=1):
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=G, d_ff=F_DENSE,
                      n_dense_layers=1, moe_every=1, max_seq_len=32, tie_embeddings=tie,
                      qk_norm=qk_norm)
    moe = MoEConfig(n_experts=E, n_shared=N_SHARED, d_expert=FE, granularity=granularity,
                    backend="torch")
    return build_model(cfg, moe, RoutingConfig(top_k=K), "cpu", 0)


# ---- the same config, counted by hand -------------------------------------------------
EMBED = V * D  # 400: token embedding [V, D]
ATTN = (D * H * HD      # wq  [H*Hd, D]   64
        + D * G * HD    # wk  [G*Hd, D]   32
        + D * G * HD    # wv  [G*Hd, D]   32
        + H * HD * D)   # wo  [D, H*Hd]   64   -> 192 per layer
NORMS_PER_LAYER = 2 * D  # attn_norm + ffn_norm weights: 16
DENSE_MLP = 3 * D * F_DENSE  # layer 0: w_in [2F, D] + w_out [D, F]: 384
ROUTER = E * D  # layer 1: router [E, D]: 32
ONE_EXPERT = 3 * D * FE  # w_in [D, 2Fe] + w_out [Fe, D]: 144
EXPERTS = E * ONE_EXPERT  # 576
SHARED = 3 * D * (N_SHARED * FE)  # shared SwiGLU of width n_shared*Fe: 144
FINAL_NORM = D  # 8
HEAD = V * D  # untied head [V, D]: 400

TOTAL_TIED = (EMBED + L * (ATTN + NORMS_PER_LAYER) + DENSE_MLP + ROUTER + EXPERTS + SHARED
              + FINAL_NORM)
ACTIVE_TIED = TOTAL_TIED - (E - K) * ONE_EXPERT  # unchosen routed experts are inactive
# forward matmul weights per token: attention projections, dense MLP, router, K experts,
# shared expert and the LM head (the tied embedding matrix), no embedding lookup, no norms
MATMUL = L * ATTN + DENSE_MLP + ROUTER + K * ONE_EXPERT + SHARED + HEAD


def attn_flops(seq):
    return 4 * seq * H * HD * L  # scores + value mix, full S x S, per layer


def test_hand_numbers_are_what_we_think():
    assert (ATTN, DENSE_MLP, ONE_EXPERT, SHARED) == (192, 384, 144, 144)
    assert TOTAL_TIED == 1960 and ACTIVE_TIED == 1672 and MATMUL == 1632


def test_count_params_tied():
    model = build(tie=True)
    c = count_params(model)
    assert c.total == TOTAL_TIED == sum(p.numel() for p in model.parameters())
    assert c.active == ACTIVE_TIED
    assert c.embedding == EMBED
    assert c.routed_expert == EXPERTS


def test_count_params_untied():
    c = count_params(build(tie=False))
    assert c.total == TOTAL_TIED + HEAD
    assert c.active == ACTIVE_TIED + HEAD
    assert c.embedding == EMBED + HEAD
    assert c.routed_expert == EXPERTS


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("seq", [1, 10, 32])
def test_flops_per_token(tie, seq):
    model = build(tie=tie)
    fwd = 2 * MATMUL + attn_flops(seq)  # the head is a matmul, tied or not
    assert flops_per_token(model, seq, training=False) == fwd
    assert flops_per_token(model, seq, training=True) == 3 * fwd
    assert flops_per_token(model, 10, training=False) == 2 * 1632 + 640  # = 3904


def test_qk_norm_weights_are_params_but_not_flops():
    c = count_params(build(qk_norm=True))
    assert c.total == TOTAL_TIED + L * 2 * HD  # q_norm + k_norm per layer
    assert flops_per_token(build(qk_norm=True), 10, False) == 2 * MATMUL + attn_flops(10)


# ---- granularity -----------------------------------------------------------------------

@pytest.mark.parametrize("n_exp,f,k,m", [(4, 6, 2, 1), (4, 6, 2, 2), (4, 6, 2, 3),
                                         (8, 128, 2, 4), (1, 12, 1, 12)])
def test_fine_grained_sizes_and_active_params(n_exp, f, k, m):
    e2, f2, k2 = fine_grained(n_exp, f, k, m)
    assert (e2, f2, k2) == (m * n_exp, f // m, m * k)
    assert k2 * 3 * D * f2 == k * 3 * D * f  # active routed params per token
    assert e2 * 3 * D * f2 == n_exp * 3 * D * f  # total routed params


@pytest.mark.parametrize("m", [0, -1, 4, 5, 7])
def test_fine_grained_invalid(m):
    with pytest.raises(ValueError, match="granularity"):
        fine_grained(4, 6, 2, m)


def test_resolve_moe_sizes():
    moe = MoEConfig(n_experts=4, n_shared=2, d_expert=8, granularity=2)
    assert resolve_moe_sizes(moe, RoutingConfig(top_k=3)) == MoESizes(
        n_experts=8, d_expert=4, top_k=6, d_shared=16, granularity=2)
    assert resolve_moe_sizes(MoEConfig(n_experts=4, n_shared=0, d_expert=8),
                             RoutingConfig(top_k=1)) == MoESizes(4, 8, 1, 0, 1)
    with pytest.raises(ValueError):
        resolve_moe_sizes(MoEConfig(d_expert=8, granularity=3), RoutingConfig())


@pytest.mark.parametrize("m", [2, 3])
def test_model_active_params_and_flops_invariant_under_granularity(m):
    base, fine = build(granularity=1), build(granularity=m)
    layer = fine.moe_layers()[0]
    sizes = layer.sizes
    assert (sizes.n_experts, sizes.d_expert, sizes.top_k) == (m * E, FE // m, m * K)
    assert layer.experts.w_in.shape == (m * E, D, 2 * FE // m)
    assert layer.shared.d_hidden == N_SHARED * FE  # shared width kept
    cb, cf = count_params(base), count_params(fine)
    assert cf.routed_expert == cb.routed_expert == EXPERTS
    # routed experts and active expert params are unchanged; only the router grows
    assert cf.total - cb.total == (m - 1) * E * D
    assert cf.active - cb.active == (m - 1) * E * D
    assert flops_per_token(fine, 10) - flops_per_token(base, 10) == 3 * 2 * (m - 1) * E * D
