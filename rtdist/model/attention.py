"""The attention layer: ``RoutingAttention`` (local and routing heads) and the backend that runs its kernels.

A layer's work is three steps, each a method that the training forward, the decoding caches and the
sequence-parallel backend share:

1. :meth:`RoutingAttention.project`: q/k/v of every head, rotated, and the routing heads' routing vectors
   (:class:`Projections`);
2. :meth:`RoutingAttention.route`: each routing vector's nearest centroid (and, in training, its k-means statistics);
3. :meth:`RoutingAttention.attend`: the kernels, through ``self.backend``, then the output projection.

The forward (training and evaluation) runs the same steps, but in causal routing mode it runs everything the routing
heads do after their raw projections (routing vectors, assignment, normalised keys, rotary, kernel) as one function
that the backend recomputes in backward (:meth:`RoutingAttention.routing_heads`), so that none of the routing-only
tensors is kept between forward and backward.

The backend is an :class:`AttentionBackend` (the whole sequence in this process) unless
``rtdist.parallel.parallelize`` gave the layer a sequence-parallel one: the layer itself has no parallel branches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .kernels import (causal_routing_attention, full_attention, local_attention, naive_full_attention,
                      topk_routing_attention)
from .kmeans import SphericalKMeans, recompute_context, routing_vectors


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, positions: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [n, d/2]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


@dataclass
class Projections:
    """A layer's per-token kernel inputs. Each layout is the one its kernel reads without a copy."""

    local: Optional[tuple] = None  # (q, k, v) of the local heads: q, k [B, L, n, d] rotated, v [B, L, n, d] (view)
    routed: Optional[tuple] = None  # (q, k, v) of the routing heads [B, n, Hr, d], q and k rotated
    dense: Optional[tuple] = None  # (q, k, v) of all heads [B, H, n, d] ("full" attention types), q and k rotated
    r: Optional[torch.Tensor] = None  # routing vectors [B, Hr, n, d] fp32, from the un-rotated queries


@dataclass
class Routes:
    """Where the routing heads send each token: its cluster, and the scores ``topk`` routing ranks by."""

    clusters: torch.Tensor  # [B, n, Hr] long
    sims: Optional[torch.Tensor]  # [B, Hr, n, C] fp32 without gradient; top-k routing only


class AttentionBackend:
    """Runs a layer's kernels over the whole sequence in this process. With ``recompute`` the kernels keep only
    their inputs for backward and run again there (``model.recompute_attention``): numerically identical."""

    def __init__(self, recompute: bool = True):
        self.recompute = recompute

    def run(self, fn, *args, **kwargs):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, context_fn=recompute_context, **kwargs)
        return fn(*args, **kwargs)

    def local(self, q, k, v, window: int, dropout_p: float) -> torch.Tensor:
        """[B, L, n, d] -> [B, L, n, d]."""
        prev = self.previous_window(lambda: (k, v), window)
        return self.after_local(self.run(local_attention, q, k, v, window, dropout_p, *(prev or (None, None))))

    def previous_window(self, kv_fn, window: int):
        """(k, v) [B, L, window, d] of the local heads' window just before this process's first token, or None when
        there is none (here: the sequence starts here). ``kv_fn()`` gives this process's local (k, v) (at least its
        last window), which a sequence-parallel backend sends on to the next rank."""
        return None

    def after_local(self, out: torch.Tensor) -> torch.Tensor:
        """The local heads' output, once every local chunk of the layer ran (a sequence-parallel backend orders the
        backward of its window exchange after it)."""
        return out

    def routing(self, fn, q, *args):
        """``fn(q, *args)``: the routing heads' work from their queries on, kernel included; recomputed in backward
        like a kernel."""
        return self.run(fn, q, *args)

    def routed_kernel(self, q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool,
                      dropout_p: float) -> torch.Tensor:
        """Causal cluster blocks, not recomputed by itself: q, k, v [B, n, Hr, d], clusters [B, n, Hr] ->
        [B, n, Hr, d]."""
        return causal_routing_attention(q, k, v, clusters, num_clusters, window, exclude_self, dropout_p)

    def routed(self, q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool,
               dropout_p: float) -> torch.Tensor:
        """:meth:`routed_kernel`, recomputed in backward."""
        return self.routing(self.routed_kernel, q, k, v, clusters, num_clusters, window, exclude_self, dropout_p)

    def topk(self, q, k, v, sims, window: int, valid, exclude_self: bool, dropout_p: float) -> torch.Tensor:
        """The paper's routing (needs the whole sequence): q, k, v [B, n, Hr, d] -> [B, n, Hr, d]."""
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return t(self.run(topk_routing_attention, t(q), t(k), t(v), sims.detach(), window, valid=valid,
                          exclude_self=exclude_self, dropout_p=dropout_p))

    def dense(self, q, k, v, dropout_p: float, naive: bool = False) -> torch.Tensor:
        return (naive_full_attention if naive else full_attention)(q, k, v, dropout_p=dropout_p)


class RoutingAttention(nn.Module):
    """Multi-head causal self-attention: ``n_local`` heads in a sliding window, the rest routed by k-means.

    Routing heads share queries and keys (k = normalize(q)); their clusters are chosen from the content (the
    un-rotated query), and a token never attends to itself while another key is available."""

    def __init__(self, cfg: ModelConfig, n_local: int):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.kind = cfg.attention_type
        self.n_local = n_local if self.kind == "routing" else (cfg.n_heads if self.kind == "local" else 0)
        self.n_routing = cfg.n_heads - self.n_local if self.kind in ("routing", "local") else 0
        self.shared_qk = cfg.shared_qk
        self.window, self.local_window = cfg.window_size, cfg.local_window_size
        inner = cfg.n_heads * self.head_dim
        n_k = cfg.n_heads - (self.n_routing if self.shared_qk else 0)
        self.to_q = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_k = nn.Linear(cfg.d_model, n_k * self.head_dim, bias=False) if n_k else None
        self.to_v = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.d_model, bias=False)
        self.kmeans = (SphericalKMeans(self.n_routing, cfg.num_clusters, self.head_dim, cfg.kmeans_ema_decay,
                                       cfg.commitment_factor, cfg.kmeans_reseed_after) if self.n_routing else None)
        self.backend = AttentionBackend(cfg.recompute_attention)

    @property
    def dropout_p(self) -> float:
        return self.cfg.attn_dropout if self.training else 0.0

    @property
    def chunkable(self) -> bool:
        """Whether the layer's attention is position-wise up to the local window (local heads, causal routing
        heads), so that a block can run it in sequence chunks (``Block.chunks``)."""
        return self.kind in ("routing", "local") and (not self.n_routing or self.cfg.routing_mode == "causal")

    def qkv(self, x: torch.Tensor):
        """The raw projections of x [B, n, d_model] (normed): q, v [B, n, H, d], k [B, n, heads with keys, d] or
        None (all heads route with shared keys)."""
        B, n, _ = x.shape
        q = self.to_q(x).view(B, n, self.n_heads, self.head_dim)
        v = self.to_v(x).view(B, n, self.n_heads, self.head_dim)
        k = self.to_k(x).view(B, n, -1, self.head_dim) if self.to_k is not None else None
        return q, k, v

    def local_qkv(self, q, k, v, rope=None):
        """The local heads' kernel inputs [B, L, n, d] (q, k rotated) from the raw projections."""
        L = self.n_local
        ql, kl, vl = (t[:, :, :L].transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            ql, kl = apply_rotary(ql, *rope), apply_rotary(kl, *rope)
        return ql, kl, vl

    def local_kv(self, x: torch.Tensor, rope=None):
        """The local heads' (k, v) [B, L, n, d] (k rotated) of x [B, n, d_model] (normed)."""
        return self.local_qkv(*self.qkv(x), rope)[1:]

    def routed_qkv(self, qr, kr, vr, rope=None):
        """The routing heads' routing vectors [B, Hr, n, d] (fp32, from the un-rotated queries) and kernel inputs
        (q, k, v) [B, n, Hr, d] (q and k rotated) from their raw projections; ``kr`` None: k = normalize(q)."""
        r = routing_vectors(qr.transpose(1, 2))
        kr = F.normalize(qr, dim=-1) if kr is None else kr
        if rope is not None:
            cos, sin = (t[:, None, :] for t in rope)  # broadcast over the head axis
            qr, kr = apply_rotary(qr, cos, sin), apply_rotary(kr, cos, sin)
        return r, (qr, kr, vr)

    def routed_raw(self, q, k, v):
        """The routing heads' slices (q, k or None, v) [B, n, Hr, d] of the raw projections."""
        L = self.n_local
        return q[:, :, L:], None if self.shared_qk else k[:, :, L:], v[:, :, L:]

    def project(self, x: torch.Tensor, rope=None) -> Projections:
        """x [B, n, d_model] (normed) -> :class:`Projections`; ``rope`` = (cos, sin) [n, d/2] of the positions."""
        q, k, v = self.qkv(x)
        if self.kind in ("full", "full_naive"):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            return Projections(dense=(q, k, v))
        out = Projections()
        if self.n_local:
            out.local = self.local_qkv(q, k, v, rope)
        if self.n_routing:
            out.r, out.routed = self.routed_qkv(*self.routed_raw(q, k, v), rope)
        return out

    def route(self, proj: Projections, valid: Optional[torch.Tensor] = None):
        """(:class:`Routes`, commitment loss), or (None, None) without routing heads. In training the k-means
        statistics of the tokens are gathered (applied once per step by ``RoutingTransformerLM.update_kmeans``)."""
        if proj.r is None:
            return None, None
        # fp32 and without gradient, once per layer: the statistics, the block plan and the commitment loss share
        # it. Only top-k routing reads all the scores; causal routing never holds the [B, Hr, n, C] tensor whole.
        sims = self.kmeans.similarities(proj.r.detach()) if self.cfg.routing_mode == "topk" else None
        clusters, aux = self.kmeans.assign(proj.r, valid, sims=sims)
        return Routes(clusters.transpose(1, 2), sims), aux

    def attend(self, proj: Projections, routes: Optional[Routes], valid: Optional[torch.Tensor] = None):
        """The kernels and the output projection -> [B, n, d_model]."""
        return self.output(self.attend_heads(proj, routes, valid))

    def attend_heads(self, proj: Projections, routes: Optional[Routes], valid: Optional[torch.Tensor] = None):
        """The kernels -> every head's output [B, n, H, d]."""
        p, be = self.dropout_p, self.backend
        if proj.dense is not None:
            return be.dense(*proj.dense, p, naive=self.kind == "full_naive").transpose(1, 2)
        outs = []
        if proj.local is not None:
            outs.append(be.local(*proj.local, self.local_window, p).transpose(1, 2))
        if proj.routed is not None:
            if self.cfg.routing_mode == "causal":
                outs.append(be.routed(*proj.routed, routes.clusters, self.cfg.num_clusters, self.window,
                                      self.shared_qk, p))
            else:
                outs.append(be.topk(*proj.routed, routes.sims, self.window, valid, self.shared_qk, p))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def local_heads(self, q, k, v, rope=None, prev=None) -> torch.Tensor:
        """The local heads of a sequence chunk, from its raw projections -> [B, n, L, d], calling the kernel
        directly (the caller recomputes the chunk); ``prev`` = (k, v) [B, L, w, d] of the window before the chunk
        (rotated), or None at the start of the sequence."""
        ql, kl, vl = self.local_qkv(q, k, v, rope)
        prev_k, prev_v = prev if prev is not None else (None, None)
        return local_attention(ql, kl, vl, self.local_window, self.dropout_p, prev_k, prev_v).transpose(1, 2)

    def routing_heads(self, qr, kr, vr, rope=None, valid: Optional[torch.Tensor] = None):
        """The routing heads (causal mode) from their raw projections (:meth:`routed_raw`) -> (output
        [B, n, Hr, d], commitment loss). Routing vectors, assignment (and k-means statistics), normalised keys,
        rotary and the kernel run as one function through ``backend.routing``: with kernel recomputation, backward
        runs it again (statistics suspended) and only the raw projections are kept."""
        return self.backend.routing(self._routing_heads, qr, kr, vr, rope, valid)

    def _routing_heads(self, qr, kr, vr, rope, valid):
        r, (qr, kr, vr) = self.routed_qkv(qr, kr, vr, rope)
        routes, aux = self.route(Projections(r=r), valid)
        out = self.backend.routed_kernel(qr, kr, vr, routes.clusters, self.cfg.num_clusters, self.window,
                                         self.shared_qk, self.dropout_p)
        return out, aux

    def heads(self, x, rope=None, valid: Optional[torch.Tensor] = None):
        """x [B, n, d_model] (normed) -> (every head's output [B, n, H, d], commitment loss): the forward without
        the output projection."""
        if not (self.n_routing and self.chunkable):
            proj = self.project(x, rope)
            routes, aux = self.route(proj, valid)
            return self.attend_heads(proj, routes, valid), aux if aux is not None else x.new_zeros((), dtype=torch.float32)
        q, k, v = self.qkv(x)
        outs = []
        if self.n_local:
            outs.append(self.backend.local(*self.local_qkv(q, k, v, rope), self.local_window,
                                           self.dropout_p).transpose(1, 2))
        qr, kr, vr = self.routed_raw(q, k, v)
        # The recomputed function keeps its inputs: copies of the routing heads' queries (and keys), not views
        # that would keep every head's projection alive (v is kept by the local kernel anyway).
        qr, kr = qr.contiguous(), kr.contiguous() if kr is not None else None
        routed, aux = self.routing_heads(qr, kr, vr, rope, valid)
        outs.append(routed)
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0], aux

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Heads [B, n, H, d] -> [B, n, d_model]."""
        B, n = out.shape[:2]
        return self.to_out(out.reshape(B, n, self.n_heads * self.head_dim))

    def forward(self, x, rope=None, valid: Optional[torch.Tensor] = None):
        """x [B, n, d_model] (normed) -> (output [B, n, d_model], commitment loss)."""
        out, aux = self.heads(x, rope, valid)
        return self.output(out), aux
