"""The Routing Transformer language model (single process; knows nothing of distributed training)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, layer_head_split
from .attention import (block_attention, full_attention, local_attention, naive_full_attention, plan_causal_blocks,
                        topk_routing_attention)
from .kmeans import SphericalKMeans, kmeans_stats_suspended, routing_vectors


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


class RoutingAttention(nn.Module):
    """Multi-head causal self-attention: ``n_local`` heads in a sliding window, the rest routed by k-means.

    Routing heads share queries and keys (k = normalize(q)); their clusters are chosen from the content (the
    un-rotated query), and a token never attends to itself while another key is available."""

    def __init__(self, cfg: ModelConfig, n_local: int):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.kind = cfg.attention_type
        self.n_local = n_local if self.kind == "routing" else (cfg.n_heads if self.kind == "local" else 0)
        self.n_routing = cfg.n_heads - self.n_local if self.kind in ("routing", "local") else 0
        self.shared_qk = cfg.shared_qk
        self.window = cfg.window_size
        self.local_window = cfg.local_window_size or cfg.window_size
        inner = cfg.n_heads * self.head_dim
        n_k = cfg.n_heads - (self.n_routing if self.shared_qk else 0)
        self.to_q = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_k = nn.Linear(cfg.d_model, n_k * self.head_dim, bias=False) if n_k else None
        self.to_v = nn.Linear(cfg.d_model, inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.d_model, bias=False)
        # Set by rtdist.parallel.sequence.apply_sequence_parallel: an object with local_attention(...) and
        # routed_attention(...) that replaces the single-process kernels on one rank of a sequence-parallel group.
        self.seq_parallel = None
        self.kmeans = (SphericalKMeans(self.n_routing, cfg.num_clusters, self.head_dim, cfg.kmeans_ema_decay,
                                       cfg.commitment_factor) if self.n_routing else None)

    def _kernel(self, fn, *args, **kwargs):
        """Run an attention kernel, recomputing it in backward when ``recompute_attention`` is on."""
        if self.cfg.recompute_attention and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def forward(self, x, rope=None, valid: Optional[torch.Tensor] = None):
        B, n, _ = x.shape
        H, L, hd = self.n_heads, self.n_local, self.head_dim
        p = self.cfg.attn_dropout if self.training else 0.0
        # Projection layout [B, n, heads, d]; only the kernels that need [B, heads, n, d] get a transposed view.
        q = self.to_q(x).view(B, n, H, hd)
        v = self.to_v(x).view(B, n, H, hd)
        k = self.to_k(x).view(B, n, -1, hd) if self.to_k is not None else None
        aux = x.new_zeros((), dtype=torch.float32)
        outs = []
        halo = None

        if self.kind in ("full", "full_naive"):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            attn = full_attention if self.kind == "full" else naive_full_attention
            out = attn(q, k, v, dropout_p=p).transpose(1, 2)
            return self.to_out(out.reshape(B, n, H * hd)), aux

        if L:
            ql, kl, vl = (t[:, :, :L].transpose(1, 2) for t in (q, k, v))
            if rope is not None:
                ql, kl = apply_rotary(ql, *rope), apply_rotary(kl, *rope)
            # Under sequence parallelism the previous rank's last window arrives first (outside the recomputed
            # kernel, so recomputation repeats no communication).
            prev_k = prev_v = None
            if self.seq_parallel is not None:
                prev_k, prev_v, halo = self.seq_parallel.halo(kl, vl, self.local_window)
            out_l = self._kernel(local_attention, ql, kl, vl, self.local_window, p, prev_k, prev_v)
            if halo is not None:  # keeps the exchange in the graph on every rank, the first one included
                out_l = self.seq_parallel.ordered_after(out_l, halo)
            outs.append(out_l.transpose(1, 2))

        if self.n_routing:
            qr, vr = q[:, :, L:], v[:, :, L:]
            kr = F.normalize(qr, dim=-1) if self.shared_qk else k[:, :, L:]
            r = routing_vectors(qr.transpose(1, 2))  # [B, Hr, n, d] fp32, from content only (before rotary)
            self.kmeans.seed_if_requested(r, valid)
            sims = self.kmeans.similarities(r)
            clusters, aux = self.kmeans.assign(r, valid, sims=sims)
            if rope is not None:
                cos, sin = (t[:, None, :] for t in rope)  # broadcast over the head axis
                qr, kr = apply_rotary(qr, cos, sin), apply_rotary(kr, cos, sin)
            if self.seq_parallel is not None:
                qr = self.seq_parallel.ordered_after(qr, halo)
                out_r = self._kernel(self.seq_parallel.routed_attention, qr, kr, vr, clusters.transpose(1, 2),
                                     self.cfg.num_clusters, self.window, self.shared_qk, p)
            elif self.cfg.routing_mode == "causal":
                plan = plan_causal_blocks(clusters.transpose(1, 2), self.cfg.num_clusters, self.window)
                out_r = self._kernel(block_attention, qr.reshape(-1, hd), kr.reshape(-1, hd), vr.reshape(-1, hd),
                                     plan, self.shared_qk, p).view(qr.shape)
            else:
                out_r = self._kernel(topk_routing_attention, *(t.transpose(1, 2) for t in (qr, kr, vr)), sims.detach(),
                                     self.window, valid=valid, exclude_self=self.shared_qk,
                                     dropout_p=p).transpose(1, 2)
            outs.append(out_r)

        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return self.to_out(out.reshape(B, n, H * hd)), aux


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: float, glu: bool, dropout: float):
        super().__init__()
        hidden = int(d_model * mult)
        self.glu = glu
        self.w_in = nn.Linear(d_model, hidden * (2 if glu else 1), bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = self.w_in(x)
        if self.glu:  # GEGLU
            a, b = h.chunk(2, dim=-1)
            h = F.gelu(a) * b
        else:
            h = F.gelu(h)
        return self.w_out(self.dropout(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, n_local: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = RoutingAttention(cfg, n_local)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.ff_glu, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, valid=None):
        a, aux = self.attn(self.norm1(x), rope, valid)
        x = x + self.dropout(a)
        x = x + self.dropout(self.ff(self.norm2(x)))
        return x, aux


def _recompute_context():
    return contextlib.nullcontext(), kmeans_stats_suspended()


class RoutingTransformerLM(nn.Module):
    """Decoder-only LM. ``forward(tokens) -> (logits [B, n, vocab], aux_loss)`` where aux_loss is the summed
    k-means commitment loss of all routing layers. Call :meth:`update_kmeans` once after each optimizer step."""

    def __init__(self, cfg: ModelConfig, checkpoint_every: int = 0, checkpoint_offload: bool = False):
        super().__init__()
        self.cfg = cfg
        emb_dim = cfg.emb_dim or cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, emb_dim)
        self.emb_proj = nn.Linear(emb_dim, cfg.d_model, bias=False) if emb_dim != cfg.d_model else None
        self.layers = nn.ModuleList(Block(cfg, nl) for nl in layer_head_split(cfg))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, emb_dim, bias=False) if emb_dim != cfg.d_model else None
        self.lm_head = None if cfg.tie_embedding else nn.Linear(emb_dim, cfg.vocab_size, bias=False)
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.rotary = Rotary(head_dim) if cfg.pos_emb == "rotary" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_offload = checkpoint_offload
        self._init_weights()

    def _init_weights(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # Residual-output projections scaled by depth (GPT-2), the rest N(0, std).
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("to_out.weight", "w_out.weight")) else 1
                nn.init.normal_(p, std=std * scale)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def kmeans_modules(self) -> list[SphericalKMeans]:
        return [m for m in self.modules() if isinstance(m, SphericalKMeans)]

    def kmeans_state(self) -> list[torch.Tensor]:
        """The k-means buffers that must be equal on every replica (centroids and their EMA state), in a fixed
        order: what a trainer broadcasts to make replicas agree."""
        return [b for km in self.kmeans_modules() for b in km.state_tensors()]

    @torch.no_grad()
    def discard_kmeans_stats(self) -> None:
        """Forget the k-means statistics gathered since the last update (a dropped step, a measurement)."""
        for km in self.kmeans_modules():
            km.discard_stats()

    @torch.no_grad()
    def init_kmeans_from_data(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None,
                              generator: Optional[torch.Generator] = None, max_vectors: int = 8192) -> None:
        """Seed every routing layer's centroids from the routing vectors of ``tokens`` [B, n] (k-means++ and Lloyd
        steps, :meth:`SphericalKMeans.init_from_vectors`) instead of random unit vectors.

        One forward in eval mode (no k-means statistics accumulate): each layer seeds itself just before it
        assigns, so deeper layers see vectors routed by the already seeded layers below. Call it on the plain
        model (before sequence parallelism splits the sequence); replicas must then share the result (broadcast
        the k-means buffers) or seed from the same tokens."""
        kms = self.kmeans_modules()
        if not kms:
            return
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        for km in kms:
            km.request_data_init(g, max_vectors)
        was_training = self.training
        self.eval()
        try:
            self(tokens, valid)
        finally:
            self.train(was_training)
            pending = [km for km in kms if km._data_init is not None]
            for km in pending:
                km._data_init = None
        if pending:
            raise RuntimeError(f"{len(pending)} routing layer(s) never saw routing vectors during the seeding forward")

    def forward(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None):
        """``tokens`` [B, n] long; ``valid`` [B, n] bool (False = padding, kept out of k-means);
        ``positions`` [n] absolute positions (default 0..n-1)."""
        B, n = tokens.shape
        x = self.embed(tokens)
        if self.emb_proj is not None:
            x = self.emb_proj(x)
        x = self.drop(x)
        rope = None
        if self.rotary is not None:
            pos = torch.arange(n, device=tokens.device) if positions is None else positions
            rope = self.rotary(pos)
        aux = x.new_zeros((), dtype=torch.float32)
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=True)
                   if self.checkpoint_offload and x.is_cuda and torch.is_grad_enabled() else contextlib.nullcontext())
        with offload:
            for i, layer in enumerate(self.layers):
                if self.checkpoint_every and self.training and torch.is_grad_enabled() and i % self.checkpoint_every == 0:
                    x, a = checkpoint(layer, x, rope, valid, use_reentrant=False, context_fn=_recompute_context)
                else:
                    x, a = layer(x, rope, valid)
                aux = aux + a
        x = self.norm(x)
        if self.out_proj is not None:
            x = self.out_proj(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight), aux

    @torch.no_grad()
    def update_kmeans(self, reduce_fn: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Apply the step's EMA k-means update to every routing layer.

        ``reduce_fn`` receives one flat fp32 tensor holding every layer's statistics and must sum it in place over
        all replicas (e.g. ``torch.distributed.all_reduce``): one collective per step, whatever the depth."""
        kms = self.kmeans_modules()
        if not kms:
            return
        stats = [t for km in kms for t in km.stats()]
        if reduce_fn is not None:
            flat = torch.cat([t.reshape(-1) for t in stats])
            reduce_fn(flat)
            offset = 0
            for t in stats:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
        for km in kms:
            km.apply_update()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean token cross-entropy in fp32; ``valid`` False entries are ignored."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if valid is None:
        return loss.mean()
    w = valid.reshape(-1).to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp(min=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
