"""Sequence parallelism: one sample spread over the P ranks of a sequence-parallel (SP) group, each holding n/P
consecutive tokens, with the routing clusters partitioned across the ranks.

- Local heads: each rank receives the previous rank's last window of keys/values (halo exchange) and attends
  exactly as on one process.
- Routing heads (``causal`` mode), :class:`ClusterParallelRouting`: every rank assigns its tokens to the
  (replicated) centroids; an all-gather of per-rank cluster histograms gives each token its global rank inside its
  cluster (exclusive prefix sum over earlier ranks), hence its global cluster block. The global blocks are split
  into P contiguous ranges of equal size (+-1) and q/k/v travel by all-to-all to the owner of their block (keys and
  values of the last block before an owner's range also go to that owner, as the predecessor its first block
  needs). The owner runs the same block attention as one process, and outputs return by all-to-all. Every step is
  differentiable, so gradients equal the single-process ones.

The model knows nothing of this: :func:`apply_sequence_parallel` plugs a :class:`SequenceParallelAttention` into
each ``RoutingAttention`` module, which then calls it instead of the single-process kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..model.attention import BlockPlan, block_attention, local_attention


# ------------------------------------------------------------------------------------------------ groups


@dataclass
class ParallelGroups:
    """world = DP x SP; the ranks of one SP group are consecutive (they read the same sample)."""

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: Optional[object]
    dp_group: Optional[object]
    sp_ranks: list[int]


def build_groups(sp_size: int) -> ParallelGroups:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world % sp_size:
        raise ValueError(f"world size {world} is not divisible by parallel.sequence_parallel_size ({sp_size})")
    dp_size = world // sp_size
    sp_group = dp_group = None
    my_sp = list(range(rank // sp_size * sp_size, rank // sp_size * sp_size + sp_size))
    if world > 1:
        for i in range(dp_size):  # every rank must create every group, in the same order
            g = dist.new_group(list(range(i * sp_size, (i + 1) * sp_size)))
            if i == rank // sp_size:
                sp_group = g
        for j in range(sp_size):
            g = dist.new_group(list(range(j, world, sp_size)))
            if j == rank % sp_size:
                dp_group = g
    return ParallelGroups(sp_size, rank % sp_size, dp_size, rank // sp_size, sp_group, dp_group, my_sp)


# ------------------------------------------------------------------------------------ differentiable comms


class _AllToAll(torch.autograd.Function):
    """Rows [N, d] split by destination (``send_counts``) -> rows received, grouped by source."""

    @staticmethod
    def forward(ctx, x, send_counts: list[int], recv_counts: list[int], group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        out = grad.new_empty((sum(send_counts),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send_counts, recv_counts, group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x, send_counts, recv_counts, group):
    return _AllToAll.apply(x, send_counts, recv_counts, group)


def exchange_counts(send_counts: torch.Tensor, group) -> list[int]:
    """How many rows each peer will send me, given how many I send each of them."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv.tolist()


class _HaloFromPrevious(torch.autograd.Function):
    """The previous SP rank's last ``w`` rows of x (zeros on the first rank); its gradient goes back."""

    @staticmethod
    def forward(ctx, x, w: int, rank: int, size: int, ranks: list[int], group):
        ctx.args = (rank, size, ranks, group, w, x.shape)
        tail = x[..., -w:, :].contiguous()
        halo = torch.zeros_like(tail)
        reqs = []
        if rank + 1 < size:
            reqs.append(dist.isend(tail, ranks[rank + 1], group=group))
        if rank > 0:
            reqs.append(dist.irecv(halo, ranks[rank - 1], group=group))
        for r in reqs:
            r.wait()
        return halo

    @staticmethod
    def backward(ctx, grad):
        rank, size, ranks, group, w, shape = ctx.args
        back = torch.zeros(shape[:-2] + (w, shape[-1]), dtype=grad.dtype, device=grad.device)
        reqs = []
        if rank > 0:
            reqs.append(dist.isend(grad.contiguous(), ranks[rank - 1], group=group))
        if rank + 1 < size:
            reqs.append(dist.irecv(back, ranks[rank + 1], group=group))
        for r in reqs:
            r.wait()
        gx = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
        gx[..., -w:, :] = back
        return gx, None, None, None, None, None


class _OrderedAfter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dep):
        ctx.dep_shape = dep.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.dep_shape)  # a real (zero) gradient: the edge is always walked


# --------------------------------------------------------------------------------------- the attention


class SequenceParallelAttention:
    """Drop-in for the single-process kernels of ``RoutingAttention`` on one rank of an SP group.

    Counts the bytes this rank sends per routed call (``bytes_sent``) and the minimum it could send
    (``bytes_min``: q, k, v and the output of the tokens it gives away), for the benchmark."""

    def __init__(self, groups: ParallelGroups):
        self.g = groups
        self.bytes_sent = 0
        self.bytes_min = 0

    # ---- local heads: halo exchange of the previous rank's last window
    def halo(self, k, v, window: int):
        """(prev_k, prev_v, node): the previous rank's last ``window`` keys and values [B, H, w, d] (None on the
        first rank), and the exchange's output, which the caller must keep in the graph on *every* rank (see
        :meth:`ordered_after`) so that every rank runs the exchange's backward."""
        g = self.g
        if g.sp_size == 1:
            return None, None, None
        if k.shape[-2] % window:
            raise ValueError(f"each sequence-parallel rank holds {k.shape[-2]} tokens, not a multiple of the local "
                             f"window {window}")
        kv = torch.cat([k, v], dim=-1)
        halo = _HaloFromPrevious.apply(kv, window, g.sp_rank, g.sp_size, g.sp_ranks, g.sp_group)
        if g.sp_rank + 1 < g.sp_size:
            self.bytes_sent += halo.numel() * halo.element_size()
        if g.sp_rank == 0:
            return None, None, halo
        return (*halo.split(k.shape[-1], dim=-1), halo)

    @staticmethod
    def ordered_after(x, dep):
        """``x`` unchanged, but its gradient must be complete before ``dep``'s producer runs backward.

        Backward runs independent branches in an order that may differ between ranks; two branches that both
        communicate (the halo exchange and the routing all-to-alls) would then deadlock. This edge makes the
        routing branch's backward collectives come first on every rank."""
        return _OrderedAfter.apply(x, dep) if dep is not None else x

    # ---- routing heads: cluster blocks partitioned across ranks
    def routed_attention(self, q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool,
                         dropout_p: float = 0.0):
        """q, k, v [B, n_loc, H, d] and clusters [B, n_loc, H] of this rank's tokens -> outputs [B, n_loc, H, d]."""
        g, w = self.g, window
        P, me = g.sp_size, g.sp_rank
        B, n, H, d = q.shape
        dev = q.device
        G = B * H * num_clusters
        gc = ((torch.arange(B, device=dev)[:, None, None] * H + torch.arange(H, device=dev)[None, None, :])
              * num_clusters + clusters).reshape(-1)  # group-cluster id of each local token (flat [B, n, H] order)
        T = gc.numel()
        counts = torch.bincount(gc, minlength=G)
        all_counts = [torch.empty_like(counts) for _ in range(P)]
        dist.all_gather(all_counts, counts, group=g.sp_group) if P > 1 else all_counts.__setitem__(0, counts)
        all_counts = torch.stack(all_counts)  # [P, G]
        before = all_counts[:me].sum(0)  # tokens of each cluster on earlier ranks
        total = all_counts.sum(0)
        nblk = (total + w - 1) // w
        blk_base = nblk.cumsum(0) - nblk
        NB = int(nblk.sum())

        order = torch.sort(gc, stable=True).indices  # local tokens by cluster, then position
        sorted_gc = gc[order]
        local_rank = torch.arange(T, device=dev) - (counts.cumsum(0) - counts)[sorted_gc]
        grank = before[sorted_gc] + local_rank  # global rank inside the cluster
        gblock = blk_base[sorted_gc] + grank // w
        slot = grank % w
        owner = gblock * P // NB  # contiguous, balanced ranges of blocks
        first_of = [(o * NB + P - 1) // P for o in range(P + 1)]  # first block owned by rank o (ceil(o NB / P))

        # The last block before an owner's range is that owner's predecessor block (if it is the same cluster).
        nxt = gblock + 1
        nxt_in_cluster = nxt < blk_base[sorted_gc] + nblk[sorted_gc]
        nxt_owner = nxt * P // max(NB, 1)
        pred_mask = nxt_in_cluster & (nxt_owner != owner)

        # ---- send q, k, v (+ metadata) to block owners; k, v of predecessor blocks also to the next owner
        qkv = torch.cat([q.reshape(T, d), k.reshape(T, d), v.reshape(T, d)], dim=-1).index_select(0, order)
        pred_idx = pred_mask.nonzero().squeeze(1)
        src = torch.cat([torch.arange(T, device=dev), pred_idx])  # rows to send, as indices of sorted tokens
        dst = torch.cat([owner, nxt_owner[pred_idx]])
        is_pred = torch.cat([torch.zeros(T, dtype=torch.long, device=dev),
                             torch.ones(len(pred_idx), dtype=torch.long, device=dev)])
        perm = torch.sort(dst, stable=True).indices  # by destination; per destination main rows first
        send_src, send_is_pred = src[perm], is_pred[perm]
        rows = qkv.index_select(0, send_src)
        meta = torch.stack([gblock[send_src], slot[send_src], send_is_pred], dim=1)
        send_counts = torch.bincount(dst, minlength=P).tolist()
        send_main = torch.bincount(owner, minlength=P).tolist()
        if P > 1:
            recv_counts = exchange_counts(torch.tensor(send_counts, dtype=torch.long), g.sp_group)
            rows_in = all_to_all_rows(rows, send_counts, recv_counts, g.sp_group)
            meta_in = all_to_all_rows(meta, send_counts, recv_counts, g.sp_group)
        else:
            recv_counts, rows_in, meta_in = send_counts, rows, meta

        # ---- on the owner: the same block attention as one process, over its blocks (and one predecessor)
        lo, hi = first_of[me], first_of[me + 1]
        R = rows_in.shape[0]
        out_rows = rows_in.new_zeros(R, d)
        if R:
            blk_in, slot_in, is_pred = meta_in[:, 0], meta_in[:, 1], meta_in[:, 2].bool()
            base = lo - 1  # local block 0 is the predecessor of my first block (possibly empty)
            nb_local = hi - base
            local_blk = blk_in - base
            token_of_slot = torch.zeros(nb_local * w, dtype=torch.long, device=dev)
            token_of_slot[local_blk * w + slot_in] = torch.arange(R, device=dev)
            slot_filled = torch.zeros(nb_local * w, dtype=torch.bool, device=dev)
            slot_filled[local_blk * w + slot_in] = True
            cluster_first = torch.zeros(NB + 1, dtype=torch.bool, device=dev)
            cluster_first[blk_base[nblk > 0]] = True
            gblocks = torch.arange(base, hi, device=dev)
            is_first = torch.where(gblocks >= 0, cluster_first[gblocks.clamp(min=0)], torch.ones_like(gblocks,
                                                                                                   dtype=torch.bool))
            first_blocks = is_first.nonzero().squeeze(1)
            later_blocks = (~is_first).nonzero().squeeze(1)
            block_row = len(first_blocks) + torch.arange(nb_local, device=dev)
            block_row[first_blocks] = torch.arange(len(first_blocks), device=dev)
            q_rows = torch.where(is_pred[:, None], torch.zeros_like(rows_in[:, :d]), rows_in[:, :d])
            out_index = block_row[local_blk] * w + slot_in  # pred rows read some row; they are not sent back
            plan = BlockPlan(token_of_slot.view(nb_local, w), slot_filled.view(nb_local, w), first_blocks,
                             later_blocks, out_index)
            out_rows = block_attention(q_rows, rows_in[:, d:2 * d], rows_in[:, 2 * d:], plan, exclude_self,
                                       dropout_p)

        # ---- outputs of main rows return to their tokens' ranks (predecessor rows send back nothing)
        keep = ~meta_in[:, 2].bool()
        bounds = [0] + torch.tensor(recv_counts).cumsum(0).tolist()
        back_counts = [int(keep[bounds[i]:bounds[i + 1]].sum()) for i in range(P)]
        out_main = out_rows[keep]
        got = all_to_all_rows(out_main, back_counts, send_main, g.sp_group) if P > 1 else out_main
        if P > 1:  # traffic accounting: what left this rank vs the minimum (q, k, v out, outputs back, once)
            esize = rows.element_size()
            away = sum(send_counts) - send_counts[me]
            away_main = sum(send_main) - send_main[me]
            back = sum(back_counts) - back_counts[me]
            self.bytes_sent += (away * 3 * d + back * d) * esize
            self.bytes_min += (away_main * 3 * d + back * d) * esize
        # got: my main rows in the order I sent them (by destination, stable) -> back to token order
        main_sent = send_src[send_is_pred == 0]
        result = torch.zeros(T, d, dtype=got.dtype, device=dev).index_copy(0, order[main_sent], got)
        return result.view(B, n, H, d)


def apply_sequence_parallel(model, groups: ParallelGroups) -> SequenceParallelAttention:
    """Make every attention layer of ``model`` run sequence-parallel on this rank; returns the shared backend."""
    backend = SequenceParallelAttention(groups)
    for m in model.modules():
        if hasattr(m, "seq_parallel"):
            if getattr(m, "n_routing", 0) and m.cfg.routing_mode != "causal":
                raise ValueError("sequence parallelism supports routing_mode 'causal' only (topk looks at the "
                                 "whole sequence at once)")
            if m.kind in ("full", "full_naive"):
                raise ValueError(f"sequence parallelism does not support attention_type {m.kind!r}")
            m.seq_parallel = backend
    return backend


def local_slice(batch: torch.Tensor, sp_rank: int, sp_size: int):
    """This rank's part of [B, n + 1] samples: tokens [B, n/P + 1] (inputs and the shifted targets) and their
    absolute positions [n/P]."""
    n = batch.shape[1] - 1
    if n % sp_size:
        raise ValueError(f"sequence length {n} is not divisible by the sequence-parallel size {sp_size}")
    m = n // sp_size
    lo = sp_rank * m
    return batch[:, lo: lo + m + 1], torch.arange(lo, lo + m, device=batch.device)
