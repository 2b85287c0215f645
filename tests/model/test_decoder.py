"""Decoder LM: build/init, FFN schedule, attention, causality, head tying, loss.

Legend: B batch, S sequence, D model width, V vocabulary, H query heads,
G key/value heads, Hd head dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_vlm.config.schema import ModelConfig, MoEConfig, RoutingConfig
from moe_vlm.model.decoder import IGNORE_INDEX, build_model, ffn_schedule
from moe_vlm.model.layers import Attention, SwiGLU, rotary_tables
from moe_vlm.model.moe import MoELayer

V, S_MAX = 50, 16


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                n_dense_layers=0, moe_every=1, max_seq_len=S_MAX, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base)


MOE = MoEConfig(n_experts=4, n_shared=1, d_expert=8, backend="auto")
ROUTING = RoutingConfig(gate="softmax_topk", top_k=2)


def dense_model(seed=0, **kw):
    return build_model(model_cfg(moe_every=0, **kw), MOE, ROUTING, "cpu", seed).eval()


def moe_model(seed=0, routing=ROUTING, **kw):
    kw.setdefault("n_layers", 3)
    kw.setdefault("n_dense_layers", 1)
    return build_model(model_cfg(**kw), MOE, routing, "cpu", seed).eval()


def moe_untied_model(seed=0, **kw):
    return moe_model(seed, tie_embeddings=False, **kw)


BUILDERS = pytest.mark.parametrize("make", [dense_model, moe_model, moe_untied_model],
                                   ids=["dense", "moe", "moe_untied"])


def tokens(b, s, seed=0):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- build / init

@BUILDERS
def test_build_materialises_everything(make):
    model = make()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert len(tensors) > 0
    for name, t in tensors:
        assert not t.is_meta and t.device.type == "cpu", name
        assert torch.isfinite(t).all(), name
    torch.testing.assert_close(model.rope_cos, rotary_tables(4, S_MAX, 10000.0)[0])
    torch.testing.assert_close(model.rope_sin, rotary_tables(4, S_MAX, 10000.0)[1])


def _all_tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@BUILDERS
def test_init_deterministic_per_seed(make):
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ta, tc = _all_tensors(a), _all_tensors(c)
    n_random = 0
    for name in ta:
        deterministic = "norm" in name or name.endswith("router.bias") or "rope_" in name
        if deterministic:
            assert torch.equal(ta[name], tc[name]), name
        else:
            n_random += 1
            assert not torch.equal(ta[name], tc[name]), name
    assert n_random > 5


def test_init_values():
    model = moe_untied_model()
    std = model.cfg.init_std
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    for moe in model.moe_layers():
        assert torch.equal(moe.router.bias, torch.zeros(4))
    for w in (model.embed.weight, model.head.weight):
        assert abs(w.std().item() - std) < 0.2 * std
        assert abs(w.mean().item()) < 0.2 * std
    w_out = torch.cat([m.experts.w_out.flatten() for m in model.moe_layers()])
    assert abs(w_out.std().item() - out_std) < 0.2 * out_std


@pytest.mark.parametrize("n_layers,n_dense,every,expected", [
    (4, 0, 1, [True, True, True, True]),
    (4, 1, 1, [False, True, True, True]),
    (4, 1, 2, [False, True, False, True]),
    (6, 0, 2, [True, False, True, False, True, False]),
    (5, 2, 3, [False, False, True, False, False]),
    (3, 0, 0, [False, False, False]),
    (2, 5, 1, [False, False]),
])
def test_ffn_schedule(n_layers, n_dense, every, expected):
    assert ffn_schedule(n_layers, n_dense, every) == expected


@pytest.mark.parametrize("n_layers,n_dense,every", [(3, 1, 1), (4, 0, 2), (2, 0, 0)])
def test_model_follows_schedule_and_returns_one_routing_per_moe_layer(n_layers, n_dense, every):
    model = build_model(model_cfg(n_layers=n_layers, n_dense_layers=n_dense, moe_every=every),
                        MOE, ROUTING, "cpu", 0)
    sched = ffn_schedule(n_layers, n_dense, every)
    assert [isinstance(b.ffn, MoELayer) for b in model.layers] == sched
    assert all(isinstance(b.ffn, SwiGLU) for b, m in zip(model.layers, sched) if not m)
    out = model(tokens(2, 5))
    assert out.logits.shape == (2, 5, V)
    assert out.loss is None and out.lm_loss is None
    assert len(out.routing) == sum(sched) == len(model.moe_layers())
    for r in out.routing:
        assert r.token_idx.shape == (2 * 5 * ROUTING.top_k,)


# ----------------------------------------------------------------------------- attention

def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_ref(x, cos, sin):
    """x [B, H, S, Hd]; rotate-half: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * torch.cat([cos, cos], -1) + rot * torch.cat([sin, sin], -1)


def attention_ref(attn: Attention, x, cos, sin, eps=1e-5):
    b, s, _ = x.shape
    h, g, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(b, s, h, hd)
    k = (x @ attn.wk.weight.T).view(b, s, g, hd)
    v = (x @ attn.wv.weight.T).view(b, s, g, hd)
    if attn.q_norm is not None:
        q, k = rms(q, attn.q_norm.weight, eps), rms(k, attn.k_norm.weight, eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H|G, S, Hd]
    q, k = rope_ref(q, cos[:s], sin[:s]), rope_ref(k, cos[:s], sin[:s])
    group = h // g
    k = torch.stack([k[:, i // group] for i in range(h)], dim=1)  # query head i -> kv head i//group
    v = torch.stack([v[:, i // group] for i in range(h)], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, H, S, S]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    y = (probs @ v).transpose(1, 2).reshape(b, s, h * hd)
    return y @ attn.wo.weight.T


@pytest.mark.parametrize("n_heads,n_kv,head_dim,qk_norm", [
    (4, 2, 4, False), (4, 1, 6, False), (4, 4, 4, False), (6, 2, 4, True)])
def test_attention_matches_reference(n_heads, n_kv, head_dim, qk_norm):
    d, b, s = 12, 2, 7
    torch.manual_seed(0)
    attn = Attention(d, n_heads, n_kv, head_dim, qk_norm=qk_norm)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
        if qk_norm:
            attn.q_norm.weight.copy_(1 + 0.3 * torch.randn(head_dim))
            attn.k_norm.weight.copy_(1 + 0.3 * torch.randn(head_dim))
    cos, sin = rotary_tables(head_dim, 10, 100.0)
    x = torch.randn(b, s, d)
    torch.testing.assert_close(attn(x, cos, sin), attention_ref(attn, x, cos, sin),
                               rtol=1e-5, atol=1e-5)


def test_rotary_tables_formula():
    cos, sin = rotary_tables(6, 5, 100.0)
    assert cos.shape == sin.shape == (5, 3) and cos.dtype == torch.float32
    ang = torch.tensor([[p * 100.0 ** (-2 * i / 6) for i in range(3)] for p in range(5)],
                       dtype=torch.float64)
    torch.testing.assert_close(cos, ang.cos().float())
    torch.testing.assert_close(sin, ang.sin().float())


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("make", [dense_model, moe_model], ids=["dense", "moe_softmax_topk"])
@pytest.mark.parametrize("p", [1, 4, 9])
def test_causal(make, p):
    model = make()
    ids = tokens(2, 10, seed=1)
    ids2 = ids.clone()
    ids2[:, p:] = (ids[:, p:] + 1 + tokens(2, 10 - p, seed=2) % (V - 1)) % V
    assert (ids2[:, p:] != ids[:, p:]).all()
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a.logits[:, :p], b.logits[:, :p])
    assert not torch.allclose(a.logits[:, p:], b.logits[:, p:])  # the change is visible later
    for ra, rb in zip(a.routing, b.routing):  # earlier tokens are routed the same way
        early = (ra.token_idx % 10) < p
        assert torch.equal(ra.expert_idx[early], rb.expert_idx[(rb.token_idx % 10) < p])


# ----------------------------------------------------------------------------- head / inputs

def _final_hidden(model, **inputs):
    seen = {}
    handle = model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    out = model(**inputs)
    handle.remove()
    return out, seen["h"]


def test_tied_head_uses_embedding_matrix():
    model = moe_model(tie_embeddings=True)
    assert model.head is None and "head.weight" not in model.state_dict()
    with torch.no_grad():
        out, h = _final_hidden(model, input_ids=tokens(2, 6))
    torch.testing.assert_close(out.logits, h @ model.embed.weight.T)


def test_untied_head_has_its_own_matrix():
    model = moe_model(tie_embeddings=False)
    assert model.head is not None and model.head.weight.shape == (V, 16)
    assert "head.weight" in model.state_dict()
    assert not torch.equal(model.head.weight, model.embed.weight)
    with torch.no_grad():
        out, h = _final_hidden(model, input_ids=tokens(2, 6))
    torch.testing.assert_close(out.logits, h @ model.head.weight.T)
    assert not torch.allclose(out.logits, h @ model.embed.weight.T)
    n_tied = sum(p.numel() for p in moe_model(tie_embeddings=True).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_tied + V * 16


@pytest.mark.parametrize("make", [dense_model, moe_model], ids=["dense", "moe"])
def test_inputs_embeds_equals_input_ids(make):
    model = make()
    ids = tokens(2, 8)
    with torch.no_grad():
        a = model(input_ids=ids)
        b = model(inputs_embeds=model.embed(ids))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    for ra, rb in zip(a.routing, b.routing):
        assert torch.equal(ra.expert_idx, rb.expert_idx)


def test_inputs_embeds_gradient_reaches_embeddings():
    model = moe_model()
    emb = model.embed(tokens(1, 5)).detach().requires_grad_()
    model(inputs_embeds=emb).logits.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- loss

@pytest.mark.parametrize("make", [dense_model, moe_model], ids=["dense", "moe"])
def test_loss_is_cross_entropy_with_ignore_index(make):
    model = make()
    ids = tokens(2, 9)
    labels = tokens(2, 9, seed=5)
    labels[0, :3] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    assert IGNORE_INDEX == -100
    out = model(ids, labels=labels)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep].double(), labels[keep])
    torch.testing.assert_close(out.lm_loss.double(), expected, rtol=1e-6, atol=1e-6)
    routing_loss = sum((r.loss for r in out.routing), torch.zeros(()))
    torch.testing.assert_close(out.routing_loss, routing_loss)
    torch.testing.assert_close(out.loss, out.lm_loss + routing_loss)
    if out.routing:
        assert out.routing_loss > 0  # aux_loss_coef 0.01 by default
    else:
        assert out.routing_loss == 0 and torch.equal(out.loss, out.lm_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ignored_labels_do_not_change_loss():
    model = dense_model()
    ids = tokens(1, 6)
    labels = tokens(1, 6, seed=7)
    labels[0, 2] = IGNORE_INDEX
    loss_a = model(ids, labels=labels).lm_loss
    logits = model(ids).logits[0]
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(loss_a, F.cross_entropy(logits[keep], labels[0, keep]))


# ----------------------------------------------------------------------------- errors

def test_sequence_too_long_raises():
    model = dense_model()
    model(tokens(1, S_MAX))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, S_MAX + 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(inputs_embeds=torch.zeros(1, S_MAX + 3, 16))


def test_exactly_one_input_kind():
    model = dense_model()
    ids = tokens(1, 4)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.embed(ids))


def test_document_mask_equals_running_the_documents_separately():
    """Packed documents with ``doc_ids`` give each document the logits (and gradients) it
    gets alone: attention stays inside it and its positions restart at 0."""
    from moe_vlm.config import load_config
    from moe_vlm.model import build_model

    cfg = load_config(["vision=none", "data=synthetic_text"])
    model = build_model(cfg.model, cfg.moe, cfg.routing, seed=0)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 9, 2)]
    packed = torch.cat(docs)[None]  # [1, 16]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    out = model(packed, doc_ids=doc_ids).logits[0]  # [16, V]
    start = 0
    for d in docs:
        alone = model(d[None]).logits[0]
        torch.testing.assert_close(out[start:start + len(d)], alone, atol=2e-5, rtol=1e-5)
        start += len(d)
    # gradients too: the packed loss's gradient is the sum of the documents' alone
    model.zero_grad()
    model(packed, doc_ids=doc_ids).logits.sum().backward()
    packed_grad = model.embed.weight.grad.clone()
    model.zero_grad()
    for d in docs:
        model(d[None]).logits.sum().backward()
    torch.testing.assert_close(packed_grad, model.embed.weight.grad, atol=1e-4, rtol=1e-4)
    # without doc_ids the documents see each other: the mask is what makes them equal
    plain = model(packed).logits[0]
    assert not torch.allclose(plain[5:14], model(docs[1][None]).logits[0], atol=1e-3)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_equals_the_full_loss(chunk, tied):
    """``model.loss_chunk``: the loss and every gradient equal the unchunked ones to float
    rounding (chunks of 1 row, a chunk that does not divide B*S, one chunk for all),
    with ignored labels and a ``loss_norm`` share; logits are not made in training, and
    evaluation (no gradients) still returns them."""
    from moe_vlm.routing.loss_norm import LossNorm

    ids = torch.randint(0, V, (3, S_MAX), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = IGNORE_INDEX
    norm = LossNorm(n_targets=100.0, n_tokens=48.0, n_seqs=3.0, n_micro=1, n_ranks=1)
    results = []
    for c in (0, chunk):
        model = moe_model(tie_embeddings=tied, loss_chunk=c).train()
        for kwargs in ({}, {"loss_norm": norm}):
            model.zero_grad()
            out = model(input_ids=ids, labels=labels, **kwargs)
            out.loss.backward()
            assert (out.logits is None) == (c > 0)
            results.append((out.lm_loss.detach(),
                            {n: p.grad.clone() for n, p in model.named_parameters()}))
        with torch.no_grad():
            assert model(input_ids=ids, labels=labels).logits.shape == (3, S_MAX, V)
    for (loss, grads), (ref_loss, ref_grads) in zip(results[2:], results[:2]):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
