"""Attention kernels: local (sliding window), routed (causal cluster blocks, or paper top-k), dense.

None of them builds an n x n matrix (except :func:`naive_full_attention`, the quadratic reference of benchmarks).

Local and causal routing attention share one shape of work (:func:`attend_blocks`): queries in blocks of ``w``,
each block seeing its own keys causally and, when it has one, every key of one earlier block (its predecessor: the
previous window, or the cluster's previous block). On CPU without dropout the parts run as separate fused
(flash) calls, own block causal (in halves, :func:`_own_parts`) and predecessor unmasked, merged by their
log-sum-exp in one autograd function (:class:`_MergedBlockAttention`; the CPU flash op's log-sum-exp has no
gradient, so its backward calls the fused backward op itself, with the merged output and log-sum-exp, as torch's
context-parallel ring attention does). So no masked-away predecessor half is computed, blocks without a
predecessor run once, and no key is copied next to its block's keys (local blocks read their predecessor as a
view, routed blocks gather theirs block-wise). Elsewhere (other devices, attention dropout) the same blocks run through
:func:`torch.nn.functional.scaled_dot_product_attention` with a small 2-D mask shared by all blocks
(:func:`_masked_block_attention`): a per-block mask would be converted to float and saved for backward by the fused
kernels, costing 8w bytes per query.

Blocks are 4-D ``[blocks, heads, w, d]`` (any strides with the last one 1): the shape the fused kernels accept.
Shapes: q, k, v are [B, H, n, d] except for causal routing, which works in the projection layout [B, n, H, d].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

Index = Union[slice, torch.Tensor]
# A predecessor relation: query blocks ``q_index`` see key blocks ``k_index`` (same count, one block each) of the
# block keys (source 0) or of the extra keys (source 1, e.g. the previous rank's last window).
Predecessors = Sequence[tuple[Index, int, Index]]


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


def attend_blocks(q, k, v, preds: Predecessors, exclude_self: bool, dropout_p: float = 0.0, extra_k=None,
                  extra_v=None) -> torch.Tensor:
    """Block attention: q, k, v [X, h, w, d] blocks -> [X, h, w, d].

    Every query block sees its own key block causally (with ``exclude_self``: only earlier keys, and row 0 itself
    when the block has no predecessor) and, for the blocks listed in ``preds``, every key of its predecessor block.
    Each block has at most one predecessor and is the predecessor of at most one block."""
    if q.device.type == "cpu" and dropout_p == 0.0:
        return _MergedBlockAttention.apply(q, k, v, extra_k, extra_v, preds, exclude_self)
    return _masked_block_attention(q, k, v, preds, exclude_self, dropout_p, extra_k, extra_v)


def _flash(q, k, v, causal: bool, mask=None):
    """(output, log-sum-exp) of the fused CPU kernel; a row whose keys are all masked gets zeros."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)


def _flash_backward(g, q, k, v, out, lse, causal: bool, mask=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, out, lse, 0.0, causal,
                                                                                attn_mask=mask)


def _own_parts(w: int, exclude_self: bool, dtype, device) -> list[tuple[slice, slice, bool, Optional[torch.Tensor]]]:
    """The own-block attention as flash calls (query rows, key rows, causal, additive mask). The CPU kernel skips
    no masked work inside a block this small, so an even block is cut in halves: the two diagonal halves causally
    and the second half's queries over the first half's keys, a quarter less work than the whole block causally.

    With ``exclude_self`` a query sees only earlier keys, except row 0, which sees itself (a first block's first
    token has no other key; blocks with a predecessor drop that row-0 term afterwards). Row 0 of the second half
    then sees nothing in its diagonal part: the caller drops that part of the row (the kernel returns zeros)."""
    def mask(m: int, row0_sees_itself: bool):
        i = torch.arange(m, device=device)
        visible = i[None, :] < i[:, None]
        visible[0, 0] = row0_sees_itself
        return torch.zeros(m, m, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))

    causal = not exclude_self
    if w % 2:
        return [(slice(None), slice(None), causal, mask(w, True) if exclude_self else None)]
    h = w // 2
    first, second = slice(0, h), slice(h, w)
    return [(first, first, causal, mask(h, True) if exclude_self else None),
            (second, second, causal, mask(h, False) if exclude_self else None),
            (second, first, False, None)]


def _merge_into(out, lse, index, o, l) -> None:
    """``out[index]``, ``lse[index]`` (one part of the attention: outputs [.., w, d], log-sum-exps [.., w]) become
    the attention over both key sets, with the other part ``o``, ``l``; in place (``o`` is overwritten), so a merge
    holds no output-sized temporaries. Written with exp/log rather than ``logaddexp``, whose CPU kernel rounds an
    element differently depending on where it sits in the tensor: a block's output must not depend on how many
    other blocks there are (causality is bitwise)."""
    part = out[index]  # a view for slices, a copy for an index tensor (written back below)
    l1 = lse[index]
    m = torch.maximum(l1, l)
    a, b = (l1 - m).exp(), (l - m).exp()
    s = a + b
    part.mul_((a / s).unsqueeze(-1).to(part.dtype)).add_(o.mul_((b / s).unsqueeze(-1).to(o.dtype)))
    lse[index] = m + s.log()
    if isinstance(index, torch.Tensor):
        out[index] = part


def _in_chunks(preds: Predecessors, num_blocks: int, num_extra: int, chunk: int = 16):
    """``preds`` cut into relations of at most ``chunk`` blocks each: a predecessor call's output and gradients
    are that big at most, not the size of all blocks."""
    for qi, src, ki in preds:
        if isinstance(qi, slice):
            qi = range(*qi.indices(num_blocks))
            ki = range(*ki.indices(num_extra if src else num_blocks))
        for i in range(0, len(qi), chunk):
            a, b = qi[i:i + chunk], ki[i:i + chunk]
            if isinstance(a, range):  # back to slices: views, no copies
                a, b = slice(a.start, a.stop, a.step), slice(b.start, b.stop, b.step)
            yield a, src, b


def _add_at(t: torch.Tensor, index: Index, x: torch.Tensor) -> None:
    """``t[index] += x`` along dim 0 (indices within one call are distinct)."""
    if isinstance(index, slice):
        t[index] += x
    else:
        t.index_add_(0, index, x)


class _MergedBlockAttention(torch.autograd.Function):
    """:func:`attend_blocks` on CPU: the own-block parts over all blocks (:func:`_own_parts`), each predecessor
    relation in one unmasked flash call, merged by log-sum-exp: out = sum_i exp(lse_i - lse) out_i with
    lse = log sum_i exp(lse_i). Backward runs the fused backward of each part with the merged output and log-sum-exp,
    which gives each part's exact share of the gradient (softmax probabilities against the merged normaliser)."""

    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, preds, exclude_self):
        w = q.shape[2]
        out = lse = None
        for rows, keys, causal, mask in _own_parts(w, exclude_self, q.dtype, q.device):
            o, l = _flash(q[:, :, rows], k[:, :, keys], v[:, :, keys], causal, mask)
            if out is None:
                out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=l.dtype)
            if exclude_self and rows.start and keys.start:  # the second diagonal half: its row 0 saw no key
                l[:, :, 0] = float("-inf")
            if keys.start == 0 and rows.start:  # second-half queries over first-half keys: merge into the row
                _merge_into(out, lse, (slice(None), slice(None), rows), o, l)
            else:
                out[:, :, rows], lse[:, :, rows] = o, l
        sources = ((k, v), (extra_k, extra_v))
        for qi, src, ki in _in_chunks(preds, q.shape[0], (extra_k if extra_k is not None else k).shape[0]):
            sk, sv = sources[src]
            o, l = _flash(q[qi], sk[ki], sv[ki], False)
            if exclude_self:  # row 0 saw itself in the own part: only a block without a predecessor may
                lse[qi, :, 0] = float("-inf")
                out[qi, :, 0] = 0
            _merge_into(out, lse, qi, o, l)
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
        ctx.preds, ctx.exclude_self = preds, exclude_self
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        preds, exclude_self = ctx.preds, ctx.exclude_self
        g_own = g  # any strides: the fused backward reads them (a copy here would cost memory)
        if exclude_self and preds:  # rows dropped from the own part get no gradient through it
            g_own = g.clone()
            for qi, _, _ in preds:
                g_own[qi, :, 0] = 0
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for rows, keys, causal, mask in _own_parts(q.shape[2], exclude_self, q.dtype, q.device):
            part = _flash_backward(g_own[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                   out[:, :, rows], lse[:, :, rows], causal, mask)
            for grad, index, x in zip((dq, dk, dv), (rows, keys, keys), part):
                if rows == keys:  # the diagonal parts come first and cover every row once
                    grad[:, :, index] = x
                else:
                    grad[:, :, index] += x
            del part, x  # one part's gradients alive at a time
        d_extra = [torch.zeros_like(extra_k), torch.zeros_like(extra_v)] if extra_k is not None else [None, None]
        sources, grads = ((k, v), (extra_k, extra_v)), ((dk, dv), d_extra)
        for qi, src, ki in _in_chunks(preds, q.shape[0], (extra_k if extra_k is not None else k).shape[0]):
            sk, sv = sources[src]
            part = _flash_backward(g[qi], q[qi], sk[ki], sv[ki], out[qi], lse[qi], False)
            for grad, index, x in zip((dq, *grads[src]), (qi, ki, ki), part):
                _add_at(grad, index, x)
            del part, x
        return dq, dk, dv, d_extra[0], d_extra[1], None, None


def _as_index(index: Index, n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)[index] if isinstance(index, slice) else index


def _masked_block_attention(q, k, v, preds: Predecessors, exclude_self: bool, dropout_p: float, extra_k=None,
                            extra_v=None) -> torch.Tensor:
    """:func:`attend_blocks` through SDPA with shared 2-D masks (any device, attention dropout): blocks with a
    predecessor see [predecessor ++ own block] (copied next to each other) under the later-block mask, the others
    their own block under the first-block mask."""
    X, dev = q.shape[0], q.device
    first_mask, later_mask = block_masks(q.shape[2], exclude_self, device=dev)
    has_pred = torch.zeros(X, dtype=torch.bool, device=dev)
    sources = ((k, v), (extra_k, extra_v))
    index, outs = [], []
    for qi, src, ki in preds:
        qi = _as_index(qi, X, dev)
        has_pred[qi] = True
        sk, sv = sources[src]
        kk, vv = (torch.cat([s[ki], t[qi]], dim=2) for s, t in ((sk, k), (sv, v)))
        index.append(qi)
        outs.append(F.scaled_dot_product_attention(q[qi], kk, vv, attn_mask=later_mask, dropout_p=dropout_p))
    first = (~has_pred).nonzero().squeeze(1)
    index.append(first)
    outs.append(F.scaled_dot_product_attention(q[first], k[first], v[first], attn_mask=first_mask,
                                               dropout_p=dropout_p))
    order = torch.cat(index)  # every block once
    return torch.cat(outs).index_select(0, torch.empty_like(order).scatter_(0, order, torch.arange(X, device=dev)))


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
    # [B*nb, H, w, d]: a view of q/k/v for B = 1 and of the projection-layout v for any B.
    qb, kb, vb = (t.reshape(B, H, nb, w, d).transpose(1, 2).reshape(B * nb, H, w, d) for t in (q, k, v))
    preds = [(slice(b * nb + 1, (b + 1) * nb), 0, slice(b * nb, (b + 1) * nb - 1)) for b in range(B) if nb > 1]
    if prev_k is not None:
        preds.append((slice(0, None, nb), 1, slice(None)))
    out = attend_blocks(qb, kb, vb, preds, False, dropout_p, prev_k, prev_v)
    return out.reshape(B, nb, H, w, d).transpose(1, 2).reshape(B, H, nb * w, d)[:, :, :n]


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
    the plan; each of ``later_blocks`` follows block ``b - 1`` of the same cluster. ``slot_of_row[t]`` is row t's
    slot in the flat slot order (``block * w + slot``), where its output is read back."""

    token_of_slot: torch.Tensor  # [num_blocks, w]
    slot_filled: torch.Tensor  # [num_blocks, w] bool: the slot holds a real row (not an empty-slot filler)
    first_blocks: torch.Tensor  # [num_first]
    later_blocks: torch.Tensor  # [num_later]
    slot_of_row: torch.Tensor  # [rows]

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
        ``is_first`` [num_blocks] marks the blocks without a predecessor (block 0 never has one in the plan)."""
        dev, w = block.device, window
        flat = block * w + slot
        token_of_slot = torch.zeros(num_blocks * w, dtype=torch.long, device=dev)
        token_of_slot[flat] = rows
        slot_filled = torch.zeros(num_blocks * w, dtype=torch.bool, device=dev)
        slot_filled[flat] = True
        is_first = is_first.clone()
        is_first[:1] = True
        slot_of_row = torch.empty(num_rows, dtype=torch.long, device=dev)
        slot_of_row[rows] = flat
        return cls(token_of_slot.view(num_blocks, w), slot_filled.view(num_blocks, w), is_first.nonzero().squeeze(1),
                   (~is_first).nonzero().squeeze(1), slot_of_row)


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
    qualifies: each token fills one slot, and the other slots that read token 0 (empty slots) are masked as keys
    and never read back as queries, so their gradients are exactly zero."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        out = grad.index_select(0, inverse.clamp(max=len(grad) - 1))
        return out.index_fill_(0, (inverse == len(grad)).nonzero().squeeze(1), 0), None, None


def block_attention(q, k, v, plan: BlockPlan, exclude_self: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of flat tokens [T, d] inside their cluster blocks (each block also sees its predecessor) -> [T, d].

    q, k and v are gathered once into slot order; each later block's predecessor is block ``b - 1``."""
    w, d, T = plan.window, q.shape[-1], q.shape[0]
    flat = plan.token_of_slot.reshape(-1)
    reader = torch.where(plan.slot_filled.reshape(-1), flat, T)  # the row each slot is read back into
    qs, ks, vs = (_GatherRows.apply(t, flat, plan.slot_of_row).view(-1, 1, w, d) for t in (q, k, v))
    later = plan.later_blocks
    out = attend_blocks(qs, ks, vs, [(later, 0, later - 1)] if len(later) else [], exclude_self, dropout_p)
    return _GatherRows.apply(out.reshape(-1, d), plan.slot_of_row, reader)


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
