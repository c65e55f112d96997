"""Sequence parallelism: one sample spread over the P ranks of a sequence-parallel (SP) group, each holding n/P
consecutive tokens, with the routing clusters partitioned across the ranks.

- Local heads: each rank receives the previous rank's last window of keys/values (halo exchange) and attends
  exactly as one process does.
- Routing heads (``causal`` mode): every rank assigns its tokens to the (replicated) centroids; an all-gather of
  per-rank cluster histograms gives each token its global rank inside its cluster (earlier ranks' counts come
  first), hence its global cluster block (:func:`rtdist.model.cluster_blocks`). The global blocks are split into P
  contiguous ranges of equal size (+-1) and q/k/v travel by all-to-all to the owner of their block (keys and values
  of the last block before an owner's range also go to that owner, as the predecessor its first block needs). The
  owner runs the same block attention as one process (:class:`rtdist.model.BlockPlan` from the rows it received),
  and outputs return by all-to-all. Every step is differentiable, so gradients equal the single-process ones.

The model knows nothing of this: :func:`apply_sequence_parallel` gives each ``RoutingAttention`` a
:class:`SequenceParallelBackend` in place of its single-process one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model import AttentionBackend, BlockPlan, block_attention, cluster_blocks, group_cluster_ids
from .dims import ParallelDims
from ..errors import ConfigError


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


@dataclass
class Traffic:
    """Bytes this rank sent for routed attention (``bytes_sent``) and the minimum it could send (``bytes_min``:
    q, k, v and the output of the tokens it gives away), summed over layers: for the benchmark."""

    bytes_sent: int = 0
    bytes_min: int = 0


class SequenceParallelBackend(AttentionBackend):
    """A layer's kernels on one rank of a sequence-parallel group (one instance per layer)."""

    def __init__(self, dims: ParallelDims, recompute: bool = True, traffic: Traffic | None = None):
        super().__init__(recompute)
        self.dims = dims
        self.traffic = traffic if traffic is not None else Traffic()
        self._halo = None  # this layer's window exchange, between previous_window() and routing() of one forward

    def previous_window(self, kv_fn, window: int):
        """The previous rank's last window of local keys and values (None on the first rank), received in exchange
        for this rank's own (``kv_fn()``). The exchange runs outside the recomputed kernels (their recomputation
        repeats no communication)."""
        k, v = kv_fn()
        self._halo = self._exchange_halo(k, v, window)
        return self._halo.split(k.shape[-1], dim=-1) if self.dims.sp_rank > 0 else None

    def after_local(self, out: torch.Tensor) -> torch.Tensor:
        return ordered_after(out, self._halo)  # keeps the exchange in the graph on every rank, the first one included

    def _exchange_halo(self, k, v, window: int):
        d = self.dims
        if k.shape[-2] % window:
            raise ConfigError(f"each sequence-parallel rank holds {k.shape[-2]} tokens, not a multiple of the local "
                              f"window {window}: make train.seq_length a multiple of sequence_parallel_size x window")
        kv = torch.cat([k, v], dim=-1)
        halo = _HaloFromPrevious.apply(kv, window, d.sp_rank, d.sp, d.sp_ranks, d.sp_group)
        if d.sp_rank + 1 < d.sp:
            self.traffic.bytes_sent += halo.numel() * halo.element_size()
        return halo

    def routing(self, fn, q, *args):
        halo, self._halo = self._halo, None
        q = ordered_after(q, halo)  # the routing collectives' backward runs before the halo's, on every rank
        return super().routing(fn, q, *args)

    def routed_kernel(self, q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool,
                      dropout_p: float) -> torch.Tensor:
        """This rank's routed tokens: q, k, v [B, n_local, Hr, d], clusters [B, n_local, Hr] -> [B, n_local, Hr, d]."""
        return self._routed(q, k, v, clusters, num_clusters, window, exclude_self, dropout_p)

    def topk(self, *args, **kwargs):
        raise ConfigError("sequence parallelism supports model.routing_mode 'causal' only (topk routing looks at the "
                          "whole sequence at once)")

    def dense(self, *args, **kwargs):
        raise ConfigError("sequence parallelism needs model.attention_type routing or local, not full")

    def _routed(self, q, k, v, clusters, num_clusters: int, window: int, exclude_self: bool, dropout_p: float = 0.0):
        d, w = self.dims, window
        P, me, group = d.sp, d.sp_rank, d.sp_group
        B, n, H, hd = q.shape
        dev = q.device
        G = B * H * num_clusters
        gc = group_cluster_ids(clusters, num_clusters)
        T = gc.numel()
        counts = torch.bincount(gc, minlength=G)
        all_counts = [torch.empty_like(counts) for _ in range(P)]
        dist.all_gather(all_counts, counts, group=group)
        all_counts = torch.stack(all_counts)  # [P, G]
        blocks = cluster_blocks(gc, G, w, before=all_counts[:me].sum(0), total=all_counts.sum(0))
        NB = blocks.num_blocks
        owner = blocks.block * P // NB  # contiguous, balanced ranges of blocks
        first_of = [(o * NB + P - 1) // P for o in range(P + 1)]  # first block owned by rank o (ceil(o NB / P))

        # The last block before an owner's range is that owner's predecessor block (if it is the same cluster).
        sorted_gc = gc[blocks.order]
        nxt = blocks.block + 1
        nxt_in_cluster = nxt < (blocks.block_base + blocks.blocks_of)[sorted_gc]
        nxt_owner = nxt * P // max(NB, 1)
        pred_idx = (nxt_in_cluster & (nxt_owner != owner)).nonzero().squeeze(1)

        # ---- q, k, v (+ block, slot, is-predecessor) to the block owners, predecessors' k, v also to the next owner
        qkv = torch.cat([q.reshape(T, hd), k.reshape(T, hd), v.reshape(T, hd)], dim=-1).index_select(0, blocks.order)
        src = torch.cat([torch.arange(T, device=dev), pred_idx])  # rows to send, as indices of sorted tokens
        dst = torch.cat([owner, nxt_owner[pred_idx]])
        is_pred = torch.cat([torch.zeros(T, dtype=torch.long, device=dev),
                             torch.ones(len(pred_idx), dtype=torch.long, device=dev)])
        perm = torch.sort(dst, stable=True).indices  # by destination; per destination main rows first
        send_src, send_is_pred = src[perm], is_pred[perm]
        rows = qkv.index_select(0, send_src)
        meta = torch.stack([blocks.block[send_src], blocks.slot[send_src], send_is_pred], dim=1)
        send_counts = torch.bincount(dst, minlength=P).tolist()
        send_main = torch.bincount(owner, minlength=P).tolist()
        recv_counts = exchange_counts(torch.tensor(send_counts, dtype=torch.long, device=dev), group)  # NCCL: on the GPU
        rows_in = all_to_all_rows(rows, send_counts, recv_counts, group)
        meta_in = all_to_all_rows(meta, send_counts, recv_counts, group)

        # ---- on the owner: the same block attention as one process, over its blocks (and one predecessor)
        lo, hi = first_of[me], first_of[me + 1]
        R = rows_in.shape[0]
        out_rows = rows_in.new_zeros(R, hd)
        if R:
            pred_in = meta_in[:, 2].bool()
            base = lo - 1  # local block 0 is the predecessor of my first block (possibly empty)
            global_ids = torch.arange(base, hi, device=dev)
            opens = blocks.first_block_mask()
            is_first = torch.where(global_ids >= 0, opens[global_ids.clamp(min=0)], torch.ones_like(opens[:1]))
            plan = BlockPlan.from_slots(meta_in[:, 0] - base, meta_in[:, 1], torch.arange(R, device=dev), R,
                                        hi - base, w, is_first)
            q_rows = torch.where(pred_in[:, None], torch.zeros_like(rows_in[:, :hd]), rows_in[:, :hd])
            out_rows = block_attention(q_rows, rows_in[:, hd:2 * hd], rows_in[:, 2 * hd:], plan, exclude_self,
                                       dropout_p)

        # ---- outputs of main rows return to their tokens' ranks (predecessor rows send back nothing)
        keep = ~meta_in[:, 2].bool()
        bounds = [0] + torch.tensor(recv_counts).cumsum(0).tolist()
        back_counts = [int(keep[bounds[i]:bounds[i + 1]].sum()) for i in range(P)]
        got = all_to_all_rows(out_rows[keep], back_counts, send_main, group)
        esize = rows.element_size()  # what left this rank vs the minimum (q, k, v out, outputs back, once)
        self.traffic.bytes_sent += ((sum(send_counts) - send_counts[me]) * 3 * hd
                                    + (sum(back_counts) - back_counts[me]) * hd) * esize
        self.traffic.bytes_min += ((sum(send_main) - send_main[me]) * 3 * hd
                                   + (sum(back_counts) - back_counts[me]) * hd) * esize
        # got: my main rows in the order I sent them (by destination, stable) -> back to token order
        main_sent = send_src[send_is_pred == 0]
        result = torch.zeros(T, hd, dtype=got.dtype, device=dev).index_copy(0, blocks.order[main_sent], got)
        return result.view(B, n, H, hd)


def ordered_after(x, dep):
    """``x`` unchanged, but its gradient must be complete before ``dep``'s producer runs backward.

    Backward runs independent branches in an order that may differ between ranks; two branches that both
    communicate (the halo exchange and the routing all-to-alls) would then deadlock. This edge makes the routing
    branch's backward collectives come first on every rank."""
    return _OrderedAfter.apply(x, dep) if dep is not None else x


def apply_sequence_parallel(model, dims: ParallelDims) -> Traffic:
    """Give every attention layer of ``model`` a sequence-parallel backend on this rank (``dims`` with its mesh);
    returns the traffic counter the layers share."""
    traffic = Traffic()
    for layer in model.layers:
        attn = layer.attn
        if attn.n_routing and attn.cfg.routing_mode != "causal":
            raise ConfigError("sequence parallelism supports model.routing_mode 'causal' only (topk routing looks "
                              "at the whole sequence at once)")
        if attn.kind in ("full", "full_naive"):
            raise ConfigError(f"sequence parallelism does not support model.attention_type {attn.kind!r}")
        attn.backend = SequenceParallelBackend(dims, attn.cfg.recompute_attention, traffic)
    return traffic
