"""Incremental decoding for :class:`RoutingTransformerLM`: per-layer key/value caches and a one-token forward that
reproduce the training forward exactly (same attention sets, same cluster assignments), without re-running the model.

    logits, cache = prefill(model, prompt)          # one normal forward; caches filled from its own projections
    next_logits = decode_step(model, cache, token)  # one token: O(w d) attention work per head

What each head keeps (everything is a fixed-size ring; nothing grows with the context except for dense heads):

* local heads (window ``wl``): keys/values of the current and previous local block, a ring of ``2 wl`` slots
  indexed by position. A token at position t attends to positions ``[max(0, (t // wl - 1) wl), t]``, exactly as
  :func:`~rtdist.model.attention.local_attention`.
* routing heads, ``causal`` mode (window ``w``): for each (batch row, head, cluster) the number of tokens the
  cluster has had and the keys/values of its current (partial) and previous full block, a ring of ``2 w`` slots
  indexed by rank in the cluster. A new token takes its routing vector from the un-rotated query, its nearest
  centroid with the training code (:meth:`SphericalKMeans.similarities` + argmax, fp32), its rank r = count[c],
  and attends to ranks ``[max(0, (r // w - 1) w), r)``; with shared QK (exclude-self) it sees itself only when it
  is the cluster's very first token (r = 0), otherwise always: :func:`~rtdist.model.attention.block_attention`.
* dense heads (``attention_type: full``): every key (a plain KV cache).

``routing_mode: topk`` (the paper's routing) has no incremental form: a token's cluster membership depends on later
tokens, so :func:`check_cacheable` raises; generate by re-running the model on the whole prefix instead.

The model's own pieces do the work, so the caches cannot drift from the training forward: ``embed``, each layer's
``project`` (q/k/v, rotary, routing vectors) and ``route`` (nearest centroid), ``Block.mix`` and ``logits``; only the
attention over cached keys is this module's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .attention import AttentionBackend, Projections, RoutingAttention, Routes
from .transformer import RoutingTransformerLM


def check_cacheable(model: RoutingTransformerLM) -> None:
    """Raise a clear error for models whose attention cannot be decoded incrementally."""
    cfg = model.cfg
    if cfg.attention_type == "routing" and cfg.routing_mode == "topk" and any(
            layer.attn.n_routing for layer in model.layers):
        raise NotImplementedError(
            "routing_mode 'topk' (paper routing) is not causal: each cluster keeps its top-w tokens over the whole "
            "sequence, so a token's attention set depends on later tokens and there is no incremental (cached) "
            "decoding for it. Generate without the cache (re-run the model on the prefix for every token: "
            "`python -m rtdist.generate --no-cache`, or generate(..., use_cache=False)).")
    if any(type(layer.attn.backend) is not AttentionBackend for layer in model.layers):
        raise NotImplementedError("decode with a single-process model: this one has sequence-parallel attention "
                                  "kernels attached (load it with rtdist.export.load_model_for_inference)")
    if model.training:
        raise RuntimeError("call model.eval() before decoding: the cache reproduces the inference forward "
                           "(no dropout, no k-means statistics)")


@dataclass
class LayerCache:
    """Caches of one attention layer for a batch of ``B`` sequences that share their positions."""

    # local heads: ring of 2*wl slots indexed by position % (2*wl); slot_pos = position held (-1: empty)
    local_k: Optional[torch.Tensor] = None  # [B, L, 2wl, d]
    local_v: Optional[torch.Tensor] = None
    local_pos: Optional[torch.Tensor] = None  # [2wl] long
    # routing heads: per (B, head, cluster) a ring of 2*w slots indexed by rank % (2*w)
    route_k: Optional[torch.Tensor] = None  # [B, Hr, C, 2w, d]
    route_v: Optional[torch.Tensor] = None
    route_rank: Optional[torch.Tensor] = None  # [B, Hr, C, 2w] long: rank held by the slot (-1: empty)
    counts: Optional[torch.Tensor] = None  # [B, Hr, C] long: tokens routed to the cluster so far
    # dense heads: every key so far (capacity doubles)
    full_k: Optional[torch.Tensor] = None  # [B, H, capacity, d]
    full_v: Optional[torch.Tensor] = None
    full_len: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.local_k, self.local_v, self.local_pos, self.route_k,
                                                           self.route_v, self.route_rank, self.counts, self.full_k,
                                                           self.full_v) if t is not None)


@dataclass
class DecodeCache:
    layers: list[LayerCache]
    batch_size: int
    position: int = 0  # position of the next token

    def nbytes(self) -> int:
        return sum(lc.nbytes() for lc in self.layers)

    def cluster_counts(self) -> list[Optional[torch.Tensor]]:
        """Per layer: tokens routed to each cluster so far, [B, routing heads, clusters] (None: no routing heads)."""
        return [lc.counts for lc in self.layers]


def new_cache(model: RoutingTransformerLM, batch_size: int) -> DecodeCache:
    """Empty caches for ``batch_size`` sequences (all starting at position 0)."""
    check_cacheable(model)
    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    layers = []
    for layer in model.layers:
        a: RoutingAttention = layer.attn
        lc = LayerCache()
        hd = a.head_dim
        if a.kind in ("full", "full_naive"):
            lc.full_k = torch.zeros(batch_size, a.n_heads, 64, hd, device=dev, dtype=dt)
            lc.full_v = torch.zeros_like(lc.full_k)
        else:
            if a.n_local:
                wl = a.local_window
                lc.local_k = torch.zeros(batch_size, a.n_local, 2 * wl, hd, device=dev, dtype=dt)
                lc.local_v = torch.zeros_like(lc.local_k)
                lc.local_pos = torch.full((2 * wl,), -1, dtype=torch.long, device=dev)
            if a.n_routing:
                C, w = a.kmeans.num_clusters, a.window
                lc.route_k = torch.zeros(batch_size, a.n_routing, C, 2 * w, hd, device=dev, dtype=dt)
                lc.route_v = torch.zeros_like(lc.route_k)
                lc.route_rank = torch.full((batch_size, a.n_routing, C, 2 * w), -1, dtype=torch.long, device=dev)
                lc.counts = torch.zeros(batch_size, a.n_routing, C, dtype=torch.long, device=dev)
        layers.append(lc)
    return DecodeCache(layers, batch_size)


# ----------------------------------------------------------------------------------------------------- prefill


def _fill(a: RoutingAttention, lc: LayerCache, proj: Projections, routes: Optional[Routes]) -> None:
    """Fill one layer's caches from the prompt's projections (already rotated, as the forward uses them)."""
    if proj.dense is not None:
        _full_append(lc, proj.dense[1], proj.dense[2])
        return
    if proj.local is not None:
        wl = a.local_window
        _, kl, vl = proj.local  # [B, L, n, d]
        n = kl.shape[2]
        start = max(0, n - 2 * wl)  # the last 2*wl positions cover the current and previous block
        pos = torch.arange(start, n, device=kl.device)
        slot = pos % (2 * wl)
        lc.local_k[:, :, slot] = kl[:, :, start:]
        lc.local_v[:, :, slot] = vl[:, :, start:]
        lc.local_pos[slot] = pos
    if proj.routed is not None:
        C, w = a.kmeans.num_clusters, a.window
        kr, vr = (t.transpose(1, 2) for t in proj.routed[1:])  # [B, Hr, n, d]
        clusters = routes.clusters.transpose(1, 2)  # [B, Hr, n]
        seen = F.one_hot(clusters, C).cumsum(dim=2)  # [B, Hr, n, C]
        rank = seen.gather(-1, clusters[..., None])[..., 0] - 1  # rank of each token in its cluster
        counts = seen[:, :, -1]  # [B, Hr, C]
        # Keep each cluster's last 2w ranks: they cover its current and previous block (one token per slot).
        keep = rank >= counts.gather(-1, clusters) - 2 * w
        b, h, t = keep.nonzero(as_tuple=True)
        c, rk = clusters[b, h, t], rank[b, h, t]
        slot = rk % (2 * w)
        lc.route_k[b, h, c, slot] = kr[b, h, t]
        lc.route_v[b, h, c, slot] = vr[b, h, t]
        lc.route_rank[b, h, c, slot] = rk
        lc.counts += counts


@torch.no_grad()
def prefill(model: RoutingTransformerLM, tokens: torch.Tensor,
            cache: Optional[DecodeCache] = None) -> tuple[torch.Tensor, DecodeCache]:
    """One forward over ``tokens`` [B, n] (positions 0..n-1) -> (its logits [B, n, V], filled caches).

    The forward is the model's own, layer by layer, and each layer's caches are filled from the projections it
    just computed: nothing is computed twice."""
    if cache is None:
        cache = new_cache(model, tokens.shape[0])
    else:
        check_cacheable(model)
    if cache.position != 0:
        raise ValueError("prefill starts a sequence: pass a new cache (continue a sequence with decode_step)")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens have batch {tokens.shape[0]}, the cache {cache.batch_size}")
    x = model.embed(tokens)
    rope = model.rope(torch.arange(tokens.shape[1], device=tokens.device))
    for layer, lc in zip(model.layers, cache.layers):
        a = layer.attn
        proj = a.project(layer.norm1(x), rope)
        routes, _ = a.route(proj)  # eval mode: no k-means statistics
        _fill(a, lc, proj, routes)
        x = layer.mix(x, a.attend(proj, routes))
    cache.position = tokens.shape[1]
    return model.logits(x), cache


# -------------------------------------------------------------------------------------------------- one token


def _full_append(lc: LayerCache, k, v) -> None:
    """Append keys/values [B, H, m, d] to a dense cache, doubling its capacity when full."""
    m = k.shape[2]
    need = lc.full_len + m
    if need > lc.full_k.shape[2]:
        cap = max(need, 2 * lc.full_k.shape[2])
        grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], cap - t.shape[2], t.shape[3])], dim=2)  # noqa: E731
        lc.full_k, lc.full_v = grow(lc.full_k), grow(lc.full_v)
    lc.full_k[:, :, lc.full_len:need] = k
    lc.full_v[:, :, lc.full_len:need] = v
    lc.full_len = need


def _attend_one(a: RoutingAttention, lc: LayerCache, proj: Projections, routes: Optional[Routes],
                t: int) -> torch.Tensor:
    """Attention heads [B, 1, H, d] of one new token at position ``t`` over the caches, which it joins."""
    if proj.dense is not None:
        q, k, v = proj.dense  # [B, H, 1, d]
        _full_append(lc, k, v)
        return F.scaled_dot_product_attention(q, lc.full_k[:, :, :lc.full_len],
                                              lc.full_v[:, :, :lc.full_len]).transpose(1, 2)
    outs = []
    if proj.local is not None:
        wl = a.local_window
        ql, kl, vl = proj.local  # [B, L, 1, d]
        slot = t % (2 * wl)
        lc.local_k[:, :, slot] = kl[:, :, 0]
        lc.local_v[:, :, slot] = vl[:, :, 0]
        lc.local_pos[slot] = t
        lo = max(0, (t // wl - 1) * wl)
        visible = (lc.local_pos >= lo) & (lc.local_pos <= t)  # [2wl]
        outs.append(F.scaled_dot_product_attention(ql, lc.local_k, lc.local_v, attn_mask=visible[None, :])
                    .transpose(1, 2))  # [B, 1, L, d]
    if proj.routed is not None:
        w = a.window
        qr, kr, vr = (x[:, 0] for x in proj.routed)  # [B, Hr, d]
        c = routes.clusters[:, 0]  # [B, Hr]
        B, Hr = c.shape
        bi = torch.arange(B, device=c.device)[:, None]
        hi = torch.arange(Hr, device=c.device)[None, :]
        rank = lc.counts[bi, hi, c]  # [B, Hr]
        slot = rank % (2 * w)
        lc.route_k[bi, hi, c, slot] = kr
        lc.route_v[bi, hi, c, slot] = vr
        lc.route_rank[bi, hi, c, slot] = rank
        lc.counts[bi, hi, c] += 1
        keys, values, held = lc.route_k[bi, hi, c], lc.route_v[bi, hi, c], lc.route_rank[bi, hi, c]  # [B, Hr, 2w, ..]
        lo = ((rank // w - 1) * w).clamp(min=0)[..., None]
        rk = rank[..., None]
        visible = (held >= lo) & (held < rk)  # the previous block and the own block before the token
        sees_self = (rank == 0)[..., None] if a.shared_qk else torch.ones_like(rk, dtype=torch.bool)
        visible |= (held == rk) & sees_self
        outs.append(F.scaled_dot_product_attention(qr[:, :, None], keys, values, attn_mask=visible[:, :, None, :])
                    .transpose(1, 2))  # [B, 1, Hr, d]
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


@torch.no_grad()
def decode_step(model: RoutingTransformerLM, cache: DecodeCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence (``tokens`` [B] long, at position ``cache.position``) -> logits [B, V].

    Mirrors :meth:`RoutingTransformerLM.forward` in eval mode (dropout is the identity there)."""
    check_cacheable(model)
    if tokens.dim() != 1 or tokens.shape[0] != cache.batch_size:
        raise ValueError(f"decode_step takes one token per sequence: shape [{cache.batch_size}], got "
                         f"{tuple(tokens.shape)}")
    t = cache.position
    x = model.embed(tokens[:, None])
    rope = model.rope(torch.tensor([t], device=tokens.device))
    for layer, lc in zip(model.layers, cache.layers):
        a = layer.attn
        proj = a.project(layer.norm1(x), rope)
        routes, _ = a.route(proj)
        x = layer.mix(x, a.output(_attend_one(a, lc, proj, routes, t)))
    cache.position = t + 1
    return model.logits(x)[:, 0]
