"""LSH-compressed dispatch (LSH-MoE: Nie et al., "LSH-MoE: Communication-efficient MoE
Training via Locality-Sensitive Hashing", NeurIPS 2024, arXiv:2411.08446).

Legend: T tokens (real, unpadded), D model width, N assignments (token, expert, weight),
B buckets (centroid rows), E experts, L hash functions, d' kept dimensions per hash.

Under expert parallelism every assignment row crosses the all-to-all twice (and its
gradient twice more). LSH-MoE sends fewer rows: the rows bound for one expert are hashed
into buckets of similar tokens, and only each bucket's centroid travels and is computed;
each token's output is then rebuilt from its centroid's output (paper section 3.2 and its
Figure 5)::

    code(x)  = cross-polytope hash: for each of L random rotations R_l (D x d', orthonormal
               columns), the nearest vertex of the cross-polytope {+-e_i}, i.e.
               argmax over [x R_l, -x R_l] (2 d' values); the L vertices combined into one
               code in [0, (2d')^L)
    bucket   = (expert, code(x_t)) of an assignment (t, expert)
    c_b      = mean of x_t over the assignments in bucket b              # centroid [B, D]
    y_t      = sum over t's assignments k of  w_k * (E_k(c_b(t,k)) + x_t - c_b(t,k))

The last term, ``x_t - c_b``, is the paper's residual-based error compensation: the
residual of the token to its centroid, computed before the exchange and added to the
centroid's expert output after it (Fig. 5: "E(centroids)" + residuals -> "E(tokens)"); it
is exact where the expert is the identity plus a constant over a bucket, and a first-order
correction otherwise. ``compensate=False`` drops it (the paper's ablation, its Figure 6).
The equation numbers of the paper's text could not be checked from here; the formula is
that of section 3.2 ("Residual-based Error Compensation Scheme") and Figure 5.
Caveat: the residual lives in the expert's *input* space. Under a pre-norm block it is O(1)
per element while a young expert's output is small (default model at init: RMS 0.57 against
0.0006), so early in training the compensation, not the experts, dominates the routed
output; measure ``compensate`` both ways (``parallel.lsh_compensate``).

Design. ``LSHDispatcher`` wraps any dispatcher (``LocalDispatcher`` on one process, the
all-to-all one under expert parallelism): it buckets, then hands the inner dispatcher the
B centroids as B "tokens" of one assignment each (weight 1), so the exchange, the expert
backends and the fused Triton path are untouched, and the same code runs on one process
and under EP. The rows that cross the all-to-all are the centroids: the compression ratio
is B / N. Gradients flow through the centroids (the mean) into every token of a bucket,
and through the compensation (``_Residual``: d r / d x = I - 1/|b| within a bucket).

- Buckets never mix experts, and only real tokens reach a dispatcher (the MoE layer
  drops padding first), so padding is never in a centroid.
- Hashing is deterministic: the rotations come from ``seed`` (identical on every rank),
  ties in the argmax go to the first index, and buckets are numbered by expert, then by
  their first assignment (in token order), so one bucket per token gives exactly the rows,
  in exactly the order, that plain dispatch computes: the same outputs and gradients,
  bit for bit (tested).
- The buckets depend on which tokens a forward sees together: this process's
  micro-batch. So with LSH the loss depends on the tokens per process and micro-batch
  (not on the layout alone, unlike plain dispatch): one process with
  ``train.micro_batch_size = batch_size / world`` buckets exactly what each of the world's
  ranks does.
- Training only, by default: in ``model.eval()`` the layer runs the plain (exact) dispatch,
  so evaluation measures the weights LSH-MoE trained (``in_eval=True``,
  ``parallel.lsh_eval=true``: compress there too).
- Cost: one [T, D] x [D, L d'] projection, a sort of the N keys (``torch.unique``: a host
  sync on a GPU, which EP's split sizes make anyway), a segment mean and one extra pass
  over the [N, D] rows for the compensation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moe_vlm.model.dispatch import weighted_combine
from moe_vlm.model.experts import GroupedExperts, accum_dtype

CodesFn = Callable[[Tensor], Tensor]  # x [T, D] -> codes [T] int64


class CrossPolytopeHash(nn.Module):
    """L cross-polytope hashes of d' dimensions each (Andoni et al. 2015, the family
    LSH-MoE uses): x [T, D] -> code [T] in [0, (2d')^L). Angular: a positive scaling of
    x does not change its code. The rotations are a non-persistent buffer (not in the
    state dict; rebuilt from ``seed``)."""

    def __init__(self, d_model: int, n_hashes: int, dim: int, seed: int,
                 device: Optional[torch.device] = None):
        super().__init__()
        if n_hashes < 1 or dim < 1:
            raise ValueError(f"LSH needs at least one hash of at least one dimension "
                             f"(parallel.lsh_hashes={n_hashes}, parallel.lsh_dim={dim})")
        if dim > d_model:
            raise ValueError(f"parallel.lsh_dim={dim} exceeds the width {d_model} of the tokens "
                             f"hashed; choose parallel.lsh_dim <= {d_model}")
        self.n_hashes, self.dim = n_hashes, dim
        self.n_codes = (2 * dim) ** n_hashes
        g = torch.Generator().manual_seed(seed)
        gauss = torch.randn(n_hashes, d_model, dim, generator=g, dtype=torch.float64)
        rot = torch.linalg.qr(gauss).Q  # [L, D, d'] orthonormal columns: a random rotation's first d'
        self.register_buffer("rotation", rot.to(torch.float32).to(device), persistent=False)
        self.register_buffer("place", (2 * dim) ** torch.arange(n_hashes, device=device),
                             persistent=False)  # [L] int64 place value of each hash's vertex

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # hash in fp32 under bf16 autocast too
            z = torch.einsum("td,ldk->ltk", x.float(), self.rotation.float())  # [L, T, d']
        vertex = torch.cat([z, -z], -1).argmax(-1)  # [L, T] nearest of +-e_i (first on ties)
        return (vertex * self.place[:, None]).sum(0)  # [T]

    def extra_repr(self) -> str:
        return f"hashes={self.n_hashes}, dim={self.dim}, codes={self.n_codes}"


@dataclass(frozen=True)
class Buckets:
    """Assignments grouped into (expert, code) buckets; assignments sorted by expert
    (stable), buckets numbered by expert, then by their first assignment."""

    token: Tensor  # [N] token of each assignment
    weight: Tensor  # [N] routing weight of each assignment
    bucket: Tensor  # [N] bucket of each assignment
    expert: Tensor  # [B] expert of each bucket (non-decreasing)
    size: Tensor  # [B] assignments in each bucket (>= 1)


def lsh_buckets(codes: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                n_codes: int) -> Buckets:
    """Group the assignments [N] by (expert, ``codes[token]``), codes [T] in [0, n_codes).
    ``torch.unique``: data-dependent size (a host sync on a GPU)."""
    order = torch.argsort(expert_idx, stable=True)  # [N]
    tok, exp, wgt = token_idx[order], expert_idx[order], weight[order]
    key = exp * n_codes + codes[tok]  # [N] int64
    uniq, inv = torch.unique(key, return_inverse=True)  # inv [N] in sorted-key order
    n, u = key.numel(), uniq.numel()  # u = B buckets
    first = torch.full((u,), n, dtype=torch.int64, device=key.device)
    first = first.scatter_reduce(0, inv, torch.arange(n, device=key.device), "amin")  # [B]
    first_sorted, by_first = torch.sort(first)
    rank = torch.empty_like(by_first)
    rank[by_first] = torch.arange(u, device=key.device)
    bucket = rank[inv]  # [N]
    size = torch.bincount(bucket, minlength=u)  # [B]
    return Buckets(tok, wgt, bucket, exp[first_sorted], size)


def segment_mean(rows: Tensor, bucket: Tensor, size: Tensor) -> Tensor:
    """rows [N, D] -> mean per bucket [B, D] (rows summed in row order: deterministic on CPU)."""
    sums = rows.new_zeros(size.numel(), rows.shape[1]).index_add(0, bucket, rows)
    return sums / size[:, None].to(rows.dtype)


class _Residual(torch.autograd.Function):
    """``r = rows - segment_mean(rows)[bucket]`` with its exact Jacobian, ``g - mean_b(g)``,
    applied in one step: for a bucket of one row it is exactly zero in floating point (an
    autograd graph of the two terms could add ``g`` and ``-g`` around another gradient and
    round), so one bucket per token reproduces plain dispatch's gradients bit for bit."""

    @staticmethod
    def forward(ctx, rows: Tensor, centroid: Tensor, bucket: Tensor, size: Tensor) -> Tensor:
        ctx.save_for_backward(bucket, size)
        return rows - centroid.index_select(0, bucket)  # [N, D]

    @staticmethod
    def backward(ctx, g: Tensor):
        bucket, size = ctx.saved_tensors
        return g - segment_mean(g, bucket, size).index_select(0, bucket), None, None, None


@dataclass(frozen=True)
class LSHStats:
    """One call's rows: ``centroids`` sent (B) against ``rows`` without LSH (N)."""

    centroids: int
    rows: int


class LSHDispatcher(nn.Module):
    """LSH-MoE around ``inner`` (a ``LocalDispatcher`` or ``AllToAllDispatcher``): same call
    as a dispatcher, ``(x, token_idx, expert_idx, weight, experts) -> y [T, D]``.

    ``codes_fn``: the hash (default ``CrossPolytopeHash(d_model, n_hashes, dim, seed)``);
    tests pass one that gives every token its own bucket. ``in_eval``: compress in eval
    mode too (else ``inner`` runs alone there). ``last_stats``: the rows of the latest
    compressed call (the MoE layer reads it into its routing metrics)."""

    def __init__(self, inner: nn.Module, d_model: int, n_hashes: int = 2, dim: int = 4,
                 seed: int = 0, compensate: bool = True, codes_fn: Optional[CodesFn] = None,
                 n_codes: Optional[int] = None, device: Optional[torch.device] = None,
                 in_eval: bool = False):
        super().__init__()
        self.inner, self.compensate, self.in_eval = inner, compensate, in_eval
        if codes_fn is None:
            self.hash: Optional[CrossPolytopeHash] = CrossPolytopeHash(d_model, n_hashes, dim,
                                                                       seed, device)
            self.codes_fn, self.n_codes = self.hash, self.hash.n_codes
        else:
            if n_codes is None or n_codes < 1:
                raise ValueError("LSHDispatcher: a custom codes_fn needs n_codes >= 1 "
                                 "(codes lie in [0, n_codes))")
            self.hash, self.codes_fn, self.n_codes = None, codes_fn, n_codes
        self.last_stats: Optional[LSHStats] = None

    def forward(self, x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor,
                experts: GroupedExperts) -> Tensor:
        """y [T, D] = sum over t's assignments of w * (E(c_b) + x_t - c_b) (module docstring)."""
        if not (self.training or self.in_eval):  # evaluation: the exact layer
            self.last_stats = None
            return self.inner(x, token_idx, expert_idx, weight, experts)
        acc = accum_dtype(x.dtype)
        bk = lsh_buckets(self.codes_fn(x), token_idx, expert_idx, weight, self.n_codes)
        n_b = bk.size.numel()
        rows = x.index_select(0, bk.token).to(acc)  # [N, D] (index_select: see dispatch.py)
        centroid = segment_mean(rows, bk.bucket, bk.size)  # [B, D]
        ids = torch.arange(n_b, device=x.device)  # [B] each centroid is one "token"
        out_c = self.inner(centroid.to(x.dtype), ids, bk.expert, weight.new_ones(n_b),
                           experts)  # [B, D] = E(c_b)
        out = out_c.to(acc).index_select(0, bk.bucket)  # [N, D]
        if self.compensate:
            out = out + _Residual.apply(rows, centroid.detach(), bk.bucket, bk.size)
        self.last_stats = LSHStats(centroids=n_b, rows=int(bk.token.numel()))
        return weighted_combine(out, bk.token, bk.weight, x.shape[0], x.dtype)

    def routing_stats(self, device: torch.device) -> dict[str, Tensor]:
        """The latest call's rows as metrics (``lsh_centroids``, ``lsh_rows``: summed over
        micro-batches and ranks by ``routing.metrics.step_routing_metrics``). Filled on the
        device (no host copy)."""
        s = self.last_stats
        if s is None:
            return {}
        return {"lsh_centroids": torch.full((), float(s.centroids), device=device),
                "lsh_rows": torch.full((), float(s.rows), device=device)}

    def extra_repr(self) -> str:
        return f"compensate={self.compensate}, codes={self.n_codes}, in_eval={self.in_eval}"


def apply_lsh(model: nn.Module, n_hashes: int, dim: int, seed: int,
              compensate: bool = True, in_eval: bool = False) -> nn.Module:
    """Wrap every MoE layer's dispatcher (decoder, then vision tower, in module order) in
    an ``LSHDispatcher`` (in place; returns ``model``). MoE layer i hashes with seed
    ``seed + i``, the same on every rank. Apply after expert parallelism."""
    from moe_vlm.model.moe import MoELayer

    i = 0
    for mod in model.modules():
        if isinstance(mod, MoELayer) and not isinstance(mod.dispatcher, LSHDispatcher):
            w = mod.experts.w_in  # [E, D, ...]
            mod.dispatcher = LSHDispatcher(mod.dispatcher, w.shape[1], n_hashes, dim, seed + i,
                                           compensate, device=w.device, in_eval=in_eval)
            i += 1
    if i == 0:
        raise ValueError("parallel.lsh: the model has no MoE layers to compress")
    return model


def lsh_compression(routing_rows: dict[str, dict]) -> Optional[float]:
    """Rows sent / rows without LSH over all layers of a step's routing metrics
    (``lsh_centroids`` / ``lsh_rows`` per layer), or None without LSH."""
    sent = sum(r["lsh_centroids"] for r in routing_rows.values() if "lsh_rows" in r)
    total = sum(r["lsh_rows"] for r in routing_rows.values() if "lsh_rows" in r)
    return sent / total if total else None
