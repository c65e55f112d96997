"""Attention kernels: local (sliding window), routed (causal cluster blocks, or paper top-k), dense.

All of them run :func:`torch.nn.functional.scaled_dot_product_attention` on batches of blocks and never build an
n x n matrix (except :func:`naive_full_attention`, the quadratic reference used by benchmarks).
Shapes: q, k, v are [B, H, n, d].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def _block_mask(prev_valid: torch.Tensor, w: int, exclude_self: bool) -> torch.Tensor:
    """Boolean mask [nblocks, w, 2w] for queries of a block over keys (previous block ++ own block).

    Keys of the previous block are all earlier in position, so they are visible when that block exists; own-block
    keys are visible causally. With ``exclude_self`` a query never sees itself unless it has no other key (the
    first token of a sequence or cluster), so no row is ever fully masked."""
    dev = prev_valid.device
    i = torch.arange(w, device=dev)
    own = i[None, :] < i[:, None] if exclude_self else i[None, :] <= i[:, None]  # [w, w]
    mask = torch.cat([prev_valid[:, None, None].expand(-1, w, w), own.expand(len(prev_valid), w, w)], dim=-1)
    if exclude_self:
        lonely = ~prev_valid  # row 0 of a block without predecessor sees only itself
        mask[:, 0, w] = mask[:, 0, w] | lonely
    return mask


def _with_previous_block(x: torch.Tensor) -> torch.Tensor:
    """[..., nb, w, d] -> [..., nb, 2w, d]: each block preceded by the block before it (zeros for the first)."""
    prev = torch.cat([torch.zeros_like(x[..., :1, :, :]), x[..., :-1, :, :]], dim=-3)
    return torch.cat([prev, x], dim=-2)


def local_attention(q, k, v, window: int, dropout_p: float = 0.0, exclude_self: bool = False) -> torch.Tensor:
    """Causal attention in blocks of ``window``, each block seeing itself and the block before it."""
    B, H, n, d = q.shape
    pad = (-n) % window
    if pad:  # padded keys come after every real query, so causality hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nb = (n + pad) // window
    qb = q.reshape(B, H, nb, window, d)
    kb = _with_previous_block(k.reshape(B, H, nb, window, d))
    vb = _with_previous_block(v.reshape(B, H, nb, window, d))
    prev_valid = torch.arange(nb, device=q.device) > 0
    mask = _block_mask(prev_valid, window, exclude_self)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)
    return out.reshape(B, H, nb * window, d)[:, :, :n]


# ------------------------------------------------------------------------------------------ causal routing


@dataclass
class BlockPlan:
    """Where each routed token sits in the flat list of cluster blocks.

    Tokens of group g (a batch element x head) and cluster c, in position order, fill consecutive blocks of w slots.
    ``slot_of_token[t]`` is the slot of flat token t (t = g * n + position); ``token_of_slot[s]`` is the flat token in
    slot s, or ``num_tokens`` (a zero row) for the empty slots at the end of a cluster's last block."""

    slot_of_token: torch.Tensor  # [G * n]
    token_of_slot: torch.Tensor  # [num_blocks * w]
    prev_valid: torch.Tensor  # [num_blocks] the block before is of the same cluster
    num_blocks: int
    window: int


def plan_causal_blocks(clusters: torch.Tensor, num_clusters: int, window: int) -> BlockPlan:
    """``clusters`` [G, n] -> :class:`BlockPlan`. A token's block depends only on how many *earlier* tokens share its
    cluster, so no token's routing depends on a later token."""
    G, n = clusters.shape
    dev = clusters.device
    gc = (torch.arange(G, device=dev)[:, None] * num_clusters + clusters).reshape(-1)  # group-cluster id per token
    order = torch.sort(gc, stable=True).indices  # by (group, cluster), then position
    counts = torch.bincount(gc, minlength=G * num_clusters)
    first = counts.cumsum(0) - counts  # sorted index where each group-cluster starts
    nblk = (counts + window - 1) // window
    blk_first = nblk.cumsum(0) - nblk
    num_blocks = int(nblk.sum())
    sorted_gc = gc[order]
    rank = torch.arange(G * n, device=dev) - first[sorted_gc]  # rank of the token inside its cluster
    slot_sorted = blk_first[sorted_gc] * window + rank
    slot_of_token = torch.empty_like(slot_sorted)
    slot_of_token[order] = slot_sorted
    token_of_slot = torch.full((num_blocks * window,), G * n, dtype=torch.long, device=dev)
    token_of_slot[slot_sorted] = order
    owner = torch.repeat_interleave(torch.arange(G * num_clusters, device=dev), nblk, output_size=num_blocks)
    prev_valid = torch.arange(num_blocks, device=dev) != blk_first[owner]
    return BlockPlan(slot_of_token, token_of_slot, prev_valid, num_blocks, window)


def _gather_slots(x: torch.Tensor, token_of_slot: torch.Tensor) -> torch.Tensor:
    """[T, d] tokens -> [S, d] slots (empty slots read an appended zero row)."""
    return torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, token_of_slot)


def block_attention(qs, ks, vs, prev_valid, window: int, exclude_self: bool, dropout_p: float = 0.0):
    """Attention over flat cluster blocks: [S, d] slots -> [S, d]; each block sees itself and its predecessor."""
    d = qs.shape[-1]
    nb = qs.shape[0] // window
    qb = qs.view(nb, 1, window, d)
    kb = _with_previous_block(ks.view(1, nb, window, d))[0].unsqueeze(1)
    vb = _with_previous_block(vs.view(1, nb, window, d))[0].unsqueeze(1)
    mask = _block_mask(prev_valid, window, exclude_self).unsqueeze(1)
    return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p).reshape(nb * window, d)


def causal_routing_attention(q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool = True,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Each token attends causally to its own block and the previous block of its cluster. [B, H, n, d]."""
    B, H, n, d = q.shape
    plan = plan_causal_blocks(clusters.reshape(B * H, n), num_clusters, window)
    qs, ks, vs = (_gather_slots(t.reshape(B * H * n, d), plan.token_of_slot) for t in (q, k, v))
    out = block_attention(qs, ks, vs, plan.prev_valid, window, exclude_self, dropout_p)
    return out.index_select(0, plan.slot_of_token).view(B, H, n, d)


# -------------------------------------------------------------------------------------------- top-k routing


def topk_routing_attention(q, k, v, sims, window: int, valid: Optional[torch.Tensor] = None,
                           exclude_self: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    """Paper routing: every cluster takes its top-``window`` tokens by score over the whole sequence; attention is
    causal within the cluster (indices sorted by position); a token's output is the mean over the clusters that
    picked it, zero if none did. Not causal-safe: membership of early tokens depends on later ones."""
    B, H, n, d = q.shape
    C = sims.shape[-1]
    w = min(window, n)
    scores = sims.permute(0, 1, 3, 2)  # [B, H, C, n]
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    idx = scores.topk(w, dim=-1).indices.sort(dim=-1).values  # [B, H, C, w] positions
    flat = (torch.arange(B * H, device=q.device).view(B, H, 1, 1) * n + idx).reshape(-1)
    qs, ks, vs = (t.reshape(B * H * n, d).index_select(0, flat).view(B * H * C, 1, w, d) for t in (q, k, v))
    i = torch.arange(w, device=q.device)
    mask = i[None, :] < i[:, None] if exclude_self else i[None, :] <= i[:, None]
    if exclude_self:
        mask[0, 0] = True
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout_p).reshape(-1, d)
    summed = torch.zeros(B * H * n, d, dtype=out.dtype, device=out.device).index_add(0, flat, out)
    hits = torch.bincount(flat, minlength=B * H * n).clamp(min=1).to(out.dtype)
    return (summed / hits[:, None]).view(B, H, n, d)


# ------------------------------------------------------------------------------------------------- dense


def full_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


def naive_full_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """Materialised n x n causal attention: the quadratic-memory reference."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return F.dropout(probs, dropout_p) @ v
