"""The Routing Transformer language model (single process; knows nothing of distributed training).

Activation checkpointing, CPU offload and sequence parallelism are applied from outside
(``rtdist.parallel.parallelize``); the model's constructor takes only the model config.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, layer_head_split, resolved
from .attention import RoutingAttention, Rotary
from .kmeans import SphericalKMeans


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
    """Pre-norm: ``x + attn(norm1(x))``, then ``+ ff(norm2(.))``."""

    def __init__(self, cfg: ModelConfig, n_local: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = RoutingAttention(cfg, n_local)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.ff_glu, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, valid=None):
        a, aux = self.attn(self.norm1(x), rope, valid)
        return self.mix(x, a), aux

    def mix(self, x, a):
        """The block's output given its input ``x`` and its attention output ``a``."""
        x = x + self.dropout(a)
        return x + self.dropout(self.ff(self.norm2(x)))


class RoutingTransformerLM(nn.Module):
    """Decoder-only LM. ``forward(tokens) -> (logits [B, n, vocab], aux_loss)`` where aux_loss is the summed
    k-means commitment loss of all routing layers. Call :meth:`update_kmeans` once after each optimizer step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolved(cfg)
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.emb_proj = nn.Linear(cfg.emb_dim, cfg.d_model, bias=False) if cfg.emb_dim != cfg.d_model else None
        self.layers = nn.ModuleList(Block(cfg, nl) for nl in layer_head_split(cfg))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.emb_dim, bias=False) if cfg.emb_dim != cfg.d_model else None
        self.lm_head = None if cfg.tie_embedding else nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim) if cfg.pos_emb == "rotary" else None
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()
        self._register_load_state_dict_pre_hook(_renamed_keys)

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

    # ---------------------------------------------------------------------------------------------- pieces
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n] -> the first block's input [B, n, d_model]."""
        x = self.embedding(tokens)
        if self.emb_proj is not None:
            x = self.emb_proj(x)
        return self.drop(x)

    def rope(self, positions: torch.Tensor):
        """(cos, sin) [n, d/2] of absolute ``positions`` [n], or None without rotary positions."""
        return self.rotary(positions) if self.rotary is not None else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, n, d_model] -> logits [B, n, vocab]."""
        x = self.norm(x)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return F.linear(x, self.embedding.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None):
        """``tokens`` [B, n] long; ``valid`` [B, n] bool (False = padding, kept out of k-means);
        ``positions`` [n] absolute positions (default 0..n-1)."""
        x = self.embed(tokens)
        rope = self.rope(torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, a = layer(x, rope, valid)
            aux = aux + a
        return self.logits(x), aux

    # ---------------------------------------------------------------------------------------------- k-means
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

        Layer by layer in eval mode (no k-means statistics accumulate): each layer is seeded before its output
        is computed, so deeper layers see vectors routed by the already seeded layers below. Call it on the whole
        sequence, before sequence parallelism splits it; replicas must then share the result (broadcast
        :meth:`kmeans_state`) or seed from the same tokens."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        was_training = self.training
        self.eval()
        try:
            x = self.embed(tokens)
            rope = self.rope(torch.arange(tokens.shape[1], device=tokens.device))
            for layer in self.layers:
                if layer.attn.kmeans is not None:
                    proj = layer.attn.project(layer.norm1(x), rope)
                    layer.attn.kmeans.init_from_vectors(proj.r, valid, generator=g, max_vectors=max_vectors)
                x, _ = layer(x, rope, valid)
        finally:
            self.train(was_training)

    def kmeans_health(self) -> dict[int, dict]:
        """Per routing layer (block index): the occupancy of its last k-means update
        (:meth:`SphericalKMeans.health`)."""
        return {i: layer.attn.kmeans.health() for i, layer in enumerate(self.layers) if layer.attn.kmeans is not None}

    @torch.no_grad()
    def update_kmeans(self, reduce_fn: Optional[Callable[[torch.Tensor], None]] = None,
                      broadcast_fn: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Apply the step's EMA k-means update to every routing layer.

        ``reduce_fn`` receives one flat fp32 tensor holding every layer's statistics and must sum it in place over
        all replicas (e.g. ``torch.distributed.all_reduce``): one collective per step, whatever the depth.
        ``broadcast_fn`` (in place, from rank 0) is called only when a layer re-seeds dead clusters
        (``model.kmeans_reseed_after``), on every replica alike."""
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
            km.apply_update(broadcast_fn)


def _renamed_keys(state_dict, prefix, *args):
    """Checkpoints and exports written before the embedding table was named ``embedding`` still load."""
    old = prefix + "embed.weight"
    if old in state_dict:
        state_dict[prefix + "embedding.weight"] = state_dict.pop(old)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean token cross-entropy in fp32; ``valid`` False entries are ignored."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if valid is None:
        return loss.mean()
    w = valid.reshape(-1).to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp(min=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
