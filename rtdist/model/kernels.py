"""Attention kernels: local (sliding window), routed (causal cluster blocks, or paper top-k), dense.

All of them run :func:`torch.nn.functional.scaled_dot_product_attention` on batches of blocks and never build an
n x n matrix (except :func:`naive_full_attention`, the quadratic reference used by benchmarks).

Block attention is split in two calls so that each takes one small 2-D mask shared by every block: blocks that
have a predecessor see [previous block ++ own block] with mask ``[w, 2w]``, first blocks see only themselves with
``[w, w]``. A per-block mask would be converted to float and saved for backward by the fused kernels, costing
8w bytes per query: more than q, k, v and the output together. Tensors are 4-D [batch, blocks, w, d]: the shape
the fused (flash) kernels accept; 5-D falls back to the math kernel, which materialises the scores.
Shapes: q, k, v are [B, H, n, d] except for causal routing, which works in the projection layout [B, n, H, d].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def block_masks(w: int, exclude_self: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-block mask [w, w], later-block mask [w, 2w]) over keys (own block) and (previous ++ own block).

    Keys of the previous block are all earlier in position, so all are visible; own-block keys causally. With
    ``exclude_self`` a query never sees itself unless it has no other key (row 0 of a first block: the first token
    of a sequence or cluster), so no row is ever fully masked."""
    i = torch.arange(w, device=device)
    own = i[None, :] < i[:, None] if exclude_self else i[None, :] <= i[:, None]
    first = own.clone()
    first[0, 0] = True
    later = torch.cat([torch.ones(w, w, dtype=torch.bool, device=device), own], dim=-1)
    return first, later


def local_attention(q, k, v, window: int, dropout_p: float = 0.0, prev_k=None, prev_v=None) -> torch.Tensor:
    """Causal attention in blocks of ``window``, each block seeing itself and the block before it.

    ``prev_k``/``prev_v`` [B, H, w, d]: the block before position 0 (the previous rank's last block under sequence
    parallelism); without them the first block has no predecessor."""
    B, H, n, d = q.shape
    w = window
    pad = (-n) % w
    if pad:  # padded keys come after every real query, so causality hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nb = (n + pad) // w
    q, k, v = (t.reshape(B * H, nb * w, d) for t in (q, k, v))
    first_mask, later_mask = block_masks(w, exclude_self=False, device=q.device)
    outs = []
    if prev_k is not None:  # every block has a predecessor
        k = torch.cat([prev_k.reshape(B * H, w, d), k], dim=1)
        v = torch.cat([prev_v.reshape(B * H, w, d), v], dim=1)
        q_later = q
    else:
        outs.append(F.scaled_dot_product_attention(q[:, None, :w], k[:, None, :w], v[:, None, :w],
                                                   attn_mask=first_mask, dropout_p=dropout_p).reshape(B * H, w, d))
        q_later = q[:, w:]
    if q_later.shape[1]:
        # Overlapping strided views [BH, blocks, 2w, d] of (block b-1 ++ block b): no copy of k or v.
        kb, vb = (t.unfold(1, 2 * w, w).transpose(-1, -2) for t in (k, v))
        qb = q_later.reshape(B * H, -1, w, d)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=later_mask, dropout_p=dropout_p)
                    .reshape(B * H, -1, d))
    return torch.cat(outs, dim=1).view(B, H, nb * w, d)[:, :, :n]


# ------------------------------------------------------------------------------------------ causal routing


def group_cluster_ids(clusters: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """``clusters`` [B, n] or [B, n, H] -> the group-cluster id of every token in flat (row-major) order, where a
    group is a (batch element, head) pair: ``(b * H + h) * num_clusters + c``."""
    if clusters.dim() == 2:
        clusters = clusters.unsqueeze(-1)
    B, _, H = clusters.shape
    dev = clusters.device
    group = torch.arange(B, device=dev)[:, None, None] * H + torch.arange(H, device=dev)[None, None, :]
    return (group * num_clusters + clusters).reshape(-1)


@dataclass
class ClusterBlocks:
    """Where tokens fall in their group-cluster's blocks of ``window`` slots. Entry i describes token ``order[i]``
    (tokens sorted by group-cluster, then position)."""

    order: torch.Tensor  # [T]
    block: torch.Tensor  # [T] global block id
    slot: torch.Tensor  # [T] slot in the block
    block_base: torch.Tensor  # [G] first block of each group-cluster
    blocks_of: torch.Tensor  # [G] number of blocks of each group-cluster
    num_blocks: int

    def first_block_mask(self) -> torch.Tensor:
        """[num_blocks] bool: the block opens its group-cluster (it has no predecessor)."""
        first = torch.zeros(self.num_blocks, dtype=torch.bool, device=self.block.device)
        first[self.block_base[self.blocks_of > 0]] = True
        return first


def cluster_blocks(gc: torch.Tensor, num_groups: int, window: int, before: Optional[torch.Tensor] = None,
                   total: Optional[torch.Tensor] = None) -> ClusterBlocks:
    """Cut every group-cluster's tokens, in position order, into consecutive blocks of ``window``.

    A token's rank in its group-cluster is its rank among these tokens plus ``before`` (the number of tokens of
    the same group-cluster held elsewhere, e.g. by earlier sequence-parallel ranks); ``total`` (default: these
    tokens' own counts) sizes each group-cluster's blocks. A token's block depends only on how many *earlier*
    tokens share its cluster, so no token's routing depends on a later token."""
    dev = gc.device
    T = gc.numel()
    order = torch.sort(gc, stable=True).indices  # by group-cluster; flat order keeps position order inside
    counts = torch.bincount(gc, minlength=num_groups)
    total = counts if total is None else total
    blocks_of = (total + window - 1) // window
    base = blocks_of.cumsum(0) - blocks_of
    sorted_gc = gc[order]
    rank = torch.arange(T, device=dev) - (counts.cumsum(0) - counts)[sorted_gc]
    if before is not None:
        rank = rank + before[sorted_gc]
    return ClusterBlocks(order, base[sorted_gc] + rank // window, rank % window, base, blocks_of,
                         int(blocks_of.sum()))


@dataclass
class BlockPlan:
    """Which row sits in which slot of the cluster blocks, for :func:`block_attention`.

    ``token_of_slot[b, i]`` is the row in slot i of block b; empty slots at the end of a cluster's last block point
    at row 0: they are masked as keys (they come after every real query of their block) and their query rows are
    never read back, so their values never matter and get zero gradient. ``first_blocks`` have no predecessor in
    their cluster; each of ``later_blocks`` follows block ``b - 1`` of the same cluster. ``out_index[t]`` is row t's
    row in ``cat(first-block outputs, all-block outputs)``: the first-block call's rows for rows of first blocks,
    the all-block call's rows for the others."""

    token_of_slot: torch.Tensor  # [num_blocks, w]
    slot_filled: torch.Tensor  # [num_blocks, w] bool: the slot holds a real row (not an empty-slot filler)
    first_blocks: torch.Tensor  # [num_first]
    later_blocks: torch.Tensor  # [num_later]
    out_index: torch.Tensor  # [rows]

    @property
    def num_blocks(self) -> int:
        return self.token_of_slot.shape[0]

    @property
    def window(self) -> int:
        return self.token_of_slot.shape[1]

    @classmethod
    def from_slots(cls, block: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor, num_rows: int, num_blocks: int,
                   window: int, is_first: torch.Tensor) -> "BlockPlan":
        """The plan that puts row ``rows[i]`` into slot ``slot[i]`` of block ``block[i]`` (blocks numbered from 0);
        ``is_first`` [num_blocks] marks the blocks without a predecessor."""
        dev, w = block.device, window
        flat = block * w + slot
        token_of_slot = torch.zeros(num_blocks * w, dtype=torch.long, device=dev)
        token_of_slot[flat] = rows
        slot_filled = torch.zeros(num_blocks * w, dtype=torch.bool, device=dev)
        slot_filled[flat] = True
        first_blocks = is_first.nonzero().squeeze(1)
        later_blocks = (~is_first).nonzero().squeeze(1)
        block_row = len(first_blocks) + torch.arange(num_blocks, device=dev)
        block_row[first_blocks] = torch.arange(len(first_blocks), device=dev)
        out_index = torch.empty(num_rows, dtype=torch.long, device=dev)
        out_index[rows] = block_row[block] * w + slot
        return cls(token_of_slot.view(num_blocks, w), slot_filled.view(num_blocks, w), first_blocks, later_blocks,
                   out_index)


def plan_causal_blocks(clusters: torch.Tensor, num_clusters: int, window: int) -> BlockPlan:
    """Plan the blocks for ``clusters`` [B, n] or [B, n, H], indexing tokens in that tensor's flat (row-major)
    order."""
    gc = group_cluster_ids(clusters, num_clusters)
    heads = clusters.shape[2] if clusters.dim() == 3 else 1
    cb = cluster_blocks(gc, clusters.shape[0] * heads * num_clusters, window)
    return BlockPlan.from_slots(cb.block, cb.slot, cb.order, gc.numel(), cb.num_blocks, window,
                                cb.first_block_mask())


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is a gather too, not a scatter-add (which is slow on CPU).

    Valid only when every row of x that can receive a non-zero gradient is read by at most one position of
    ``index``: ``inverse[t]`` is that position, or ``len(index)`` for rows that get none. Block attention
    qualifies: each token fills one slot, and the other slots that read token 0 (empty slots, the pad block)
    are masked as keys and never read back as queries, so their gradients are exactly zero."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros((1,) + grad.shape[1:])]).index_select(0, inverse), None, None


def _inverse(index: torch.Tensor, readers: torch.Tensor, rows: int) -> torch.Tensor:
    """For each of ``rows`` source rows, the position in ``index`` that reads it for real (``readers``), else
    ``len(index)``."""
    inv = torch.full((rows,), len(index), dtype=torch.long, device=index.device)
    pos = torch.arange(len(index), device=index.device)
    inv[index[readers]] = pos[readers]
    return inv


def block_attention(q, k, v, plan: BlockPlan, exclude_self: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of flat tokens [T, d] inside their cluster blocks (each block also sees its predecessor) -> [T, d].

    Keys and values are gathered once into slot order behind a leading pad block, and every block reads
    (previous ++ own) as an overlapping strided view: one copy of k and v, not two. That call runs over all blocks
    with the later-block mask; first blocks (whose "previous" slots belong to another cluster) take their output
    from a second, small call over themselves only."""
    w, d, T = plan.window, q.shape[-1], q.shape[0]
    first_mask, later_mask = block_masks(w, exclude_self, device=q.device)
    slots, filled = plan.token_of_slot, plan.slot_filled
    idx = slots[plan.first_blocks].reshape(-1)
    inv = _inverse(idx, filled[plan.first_blocks].reshape(-1), T)
    qa, ka, va = (_GatherRows.apply(t, idx, inv).view(1, -1, w, d) for t in (q, k, v))
    outs = [F.scaled_dot_product_attention(qa, ka, va, attn_mask=first_mask, dropout_p=dropout_p).reshape(-1, d)]
    if len(plan.later_blocks):
        flat = slots.reshape(-1)
        inv = _inverse(flat, filled.reshape(-1), T)
        qb = _GatherRows.apply(q, flat, inv).view(1, -1, w, d)
        # slot -> token behind one pad block (token 0, never visible)
        padded, inv_padded = F.pad(flat, (w, 0)), torch.where(inv < len(flat), inv + w, len(flat) + w)
        kb, vb = (_GatherRows.apply(t, padded, inv_padded).unsqueeze(0).unfold(1, 2 * w, w).transpose(-1, -2)
                  for t in (k, v))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=later_mask, dropout_p=dropout_p)
                    .reshape(-1, d))
    rows = torch.cat(outs)
    back = _inverse(plan.out_index, torch.ones_like(plan.out_index, dtype=torch.bool), rows.shape[0])
    return _GatherRows.apply(rows, plan.out_index, back)


def causal_routing_attention(q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool = True,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Each token attends causally to its own block and the previous block of its cluster.

    q, k, v [B, n, H, d] (the projection layout, no transpose needed), clusters [B, n, H] -> [B, n, H, d]."""
    plan = plan_causal_blocks(clusters, num_clusters, window)
    d = q.shape[-1]
    out = block_attention(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d), plan, exclude_self, dropout_p)
    return out.view(q.shape)


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
