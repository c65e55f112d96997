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

The model's modules and weights are used as they are; its own ``forward`` is untouched (the prefill calls it and
reads the q/k/v projections with forward hooks, so the prompt's projections are computed once).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .kmeans import routing_vectors
from .transformer import RoutingAttention, RoutingTransformerLM, apply_rotary


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
    if any(getattr(layer.attn, "seq_parallel", None) is not None for layer in model.layers):
        raise NotImplementedError("decode with a single-process model: this one has sequence-parallel attention "
                                  "kernels attached (load it with rtdist.evaluate.load_model_for_inference)")
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
    meta: dict = field(default_factory=dict)

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


def _fill_from_projections(a: RoutingAttention, lc: LayerCache, q, k, v, rope) -> None:
    """Fill one layer's caches from the prompt's projections q, v [B, n, H, d], k [B, n, n_k, d] (or None), with
    the same post-processing as :meth:`RoutingAttention.forward` (rotary, shared QK, routing vectors)."""
    B, n = q.shape[:2]
    L = a.n_local
    if a.kind in ("full", "full_naive"):
        kk, vv = k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            kk = apply_rotary(kk, *rope)
        _full_append(lc, kk, vv)
        return
    if L:
        wl = a.local_window
        kl, vl = k[:, :, :L].transpose(1, 2), v[:, :, :L].transpose(1, 2)  # [B, L, n, d]
        if rope is not None:
            kl = apply_rotary(kl, *rope)
        start = max(0, n - 2 * wl)  # the last 2*wl positions cover the current and previous block
        pos = torch.arange(start, n, device=q.device)
        slot = pos % (2 * wl)
        lc.local_k[:, :, slot] = kl[:, :, start:]
        lc.local_v[:, :, slot] = vl[:, :, start:]
        lc.local_pos[slot] = pos
    if a.n_routing:
        C, w = a.kmeans.num_clusters, a.window
        qr, vr = q[:, :, L:], v[:, :, L:]
        kr = F.normalize(qr, dim=-1) if a.shared_qk else k[:, :, L:]
        r = routing_vectors(qr.transpose(1, 2))  # as the forward: from the un-rotated query, fp32
        clusters = a.kmeans.similarities(r).argmax(dim=-1)  # [B, Hr, n]
        if rope is not None:
            cos, sin = (t[:, None, :] for t in rope)
            kr = apply_rotary(kr, cos, sin)
        kr, vr = kr.transpose(1, 2), vr.transpose(1, 2)  # [B, Hr, n, d]
        onehot = F.one_hot(clusters, C)  # [B, Hr, n, C]
        seen = onehot.cumsum(dim=2)
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


@contextlib.contextmanager
def _capture_projections(model: RoutingTransformerLM, cache: DecodeCache, rope):
    """Forward hooks that read each layer's q/k/v projections during the model's own forward and fill the layer's
    caches as soon as that layer's attention has run (so at most one layer's projections are held)."""
    handles = []
    for layer, lc in zip(model.layers, cache.layers):
        a = layer.attn
        store: dict = {}

        def grab(name, store=store):
            def hook(_mod, _inp, out):
                store[name] = out
            return hook

        def done(mod, _inp, _out, store=store, lc=lc):
            B, n = store["q"].shape[:2]
            q = store["q"].view(B, n, mod.n_heads, mod.head_dim)
            v = store["v"].view(B, n, mod.n_heads, mod.head_dim)
            k = store["k"].view(B, n, -1, mod.head_dim) if "k" in store else None
            _fill_from_projections(mod, lc, q, k, v, rope)
            store.clear()

        handles.append(a.to_q.register_forward_hook(grab("q")))
        handles.append(a.to_v.register_forward_hook(grab("v")))
        if a.to_k is not None:
            handles.append(a.to_k.register_forward_hook(grab("k")))
        handles.append(a.register_forward_hook(done))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def prefill(model: RoutingTransformerLM, tokens: torch.Tensor,
            cache: Optional[DecodeCache] = None) -> tuple[torch.Tensor, DecodeCache]:
    """One normal forward over ``tokens`` [B, n] (positions 0..n-1) -> (its logits [B, n, V], filled caches).

    The caches come from that forward's own projections (read by hooks): nothing is computed twice except the
    cheap per-token post-processing (normalise, rotary, routing vectors and their argmax, all as in the forward)."""
    if cache is None:
        cache = new_cache(model, tokens.shape[0])
    else:
        check_cacheable(model)
    if cache.position != 0:
        raise ValueError("prefill starts a sequence: pass a new cache (continue a sequence with decode_step)")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens have batch {tokens.shape[0]}, the cache {cache.batch_size}")
    n = tokens.shape[1]
    rope = model.rotary(torch.arange(n, device=tokens.device)) if model.rotary is not None else None
    with _capture_projections(model, cache, rope):
        logits, _ = model(tokens)
    cache.position = n
    return logits, cache


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


def _attend_one(a: RoutingAttention, lc: LayerCache, x: torch.Tensor, rope, t: int) -> torch.Tensor:
    """Attention output [B, 1, d_model] of one new token at position ``t`` (x [B, 1, d_model], already normed);
    updates the caches."""
    B = x.shape[0]
    H, L, hd = a.n_heads, a.n_local, a.head_dim
    q = a.to_q(x).view(B, H, hd)
    v = a.to_v(x).view(B, H, hd)
    k = a.to_k(x).view(B, -1, hd) if a.to_k is not None else None

    if a.kind in ("full", "full_naive"):
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        _full_append(lc, k[:, :, None], v[:, :, None])
        out = F.scaled_dot_product_attention(q[:, :, None], lc.full_k[:, :, :lc.full_len],
                                             lc.full_v[:, :, :lc.full_len])
        return a.to_out(out.reshape(B, 1, H * hd))

    outs = []
    if L:
        wl = a.local_window
        ql, kl, vl = q[:, :L], k[:, :L], v[:, :L]
        if rope is not None:
            ql, kl = apply_rotary(ql, *rope), apply_rotary(kl, *rope)
        slot = t % (2 * wl)
        lc.local_k[:, :, slot] = kl
        lc.local_v[:, :, slot] = vl
        lc.local_pos[slot] = t
        lo = max(0, (t // wl - 1) * wl)
        visible = (lc.local_pos >= lo) & (lc.local_pos <= t)  # [2wl]
        outs.append(F.scaled_dot_product_attention(ql[:, :, None], lc.local_k, lc.local_v,
                                                   attn_mask=visible[None, :]))  # [B, L, 1, d]

    if a.n_routing:
        w = a.window
        Hr = a.n_routing
        qr, vr = q[:, L:], v[:, L:]  # [B, Hr, d]
        kr = F.normalize(qr, dim=-1) if a.shared_qk else k[:, L:]
        r = routing_vectors(qr[:, :, None, :])  # [B, Hr, 1, d] fp32, from the un-rotated query
        c = a.kmeans.similarities(r).argmax(dim=-1)[..., 0]  # [B, Hr]
        if rope is not None:
            qr, kr = apply_rotary(qr, *rope), apply_rotary(kr, *rope)
        bi = torch.arange(B, device=x.device)[:, None]
        hi = torch.arange(Hr, device=x.device)[None, :]
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
        outs.append(F.scaled_dot_product_attention(qr[:, :, None], keys, values,
                                                   attn_mask=visible[:, :, None, :]))  # [B, Hr, 1, d]

    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return a.to_out(out.reshape(B, 1, H * hd))


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
    if model.emb_proj is not None:
        x = model.emb_proj(x)
    rope = None
    if model.rotary is not None:
        rope = model.rotary(torch.tensor([t], device=tokens.device))
    for layer, lc in zip(model.layers, cache.layers):
        x = x + _attend_one(layer.attn, lc, layer.norm1(x), rope, t)
        x = x + layer.ff(layer.norm2(x))
    x = model.norm(x)
    if model.out_proj is not None:
        x = model.out_proj(x)
    weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
    cache.position = t + 1
    return F.linear(x, weight)[:, 0]
