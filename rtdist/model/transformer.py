"""The Routing Transformer language model (single process; knows nothing of distributed training).

Activation checkpointing, CPU offload and sequence parallelism are applied from outside
(``rtdist.parallel.parallelize``); the model's constructor takes only the model config.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, layer_head_split, resolved
from .attention import RoutingAttention, Rotary
from .kmeans import SphericalKMeans


def _activate(h: torch.Tensor, glu: bool) -> torch.Tensor:
    if glu:  # GEGLU
        a, b = h.chunk(2, dim=-1)
        return F.gelu(a) * b
    return F.gelu(h)


class _ActivatedLinearFn(torch.autograd.Function):
    """``F.linear(act(h), weight)`` that saves only ``h`` for backward and recomputes ``act(h)`` there: autograd would
    keep both ``h`` and ``act(h)`` (the widest activations of a block), this keeps one. Exact: the recomputation
    is the same elementwise op on the same input."""

    @staticmethod
    def forward(ctx, h, weight, glu):
        ctx.save_for_backward(h, weight)
        ctx.glu = glu
        return F.linear(_activate(h, glu), weight)

    @staticmethod
    def backward(ctx, grad):
        # Ordered so that beyond the saved h at most 4F exists (GEGLU; GELU: F), for hidden width F, and the only
        # recomputation is the gelu itself (GEGLU: its product is formed in place once gelu(a) has served).
        h, weight = ctx.saved_tensors
        needs_h, needs_w = ctx.needs_input_grad[:2]
        if not ctx.glu:
            act = F.gelu(h)
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ act.reshape(-1, act.shape[-1]) if needs_w else None
            del act
            if not needs_h:
                return None, grad_w, None
            grad_act = grad @ weight
            return torch.ops.aten.gelu_backward.grad_input(grad_act, h, grad_input=grad_act), grad_w, None
        a, b = h.chunk(2, dim=-1)
        act = F.gelu(a)  # gelu(a) until it has given grad_b, then gelu(a) * b
        grad_h = grad_act = None
        if needs_h:
            grad_act = grad @ weight
            grad_h = torch.empty_like(h)
            grad_a, grad_b = grad_h.chunk(2, dim=-1)
            torch.mul(grad_act, act, out=grad_b)
        act.mul_(b)
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ act.reshape(-1, act.shape[-1]) if needs_w else None
        del act
        if needs_h:
            grad_act.mul_(b)
            grad_a.copy_(torch.ops.aten.gelu_backward.grad_input(grad_act, a, grad_input=grad_act))
        return grad_h, grad_w, None


class ActivatedLinear(nn.Linear):
    """The feed-forward's second linear layer applied to GELU (or GEGLU: ``gelu(a) * b`` of the two halves) of its
    input, keeping only that input for backward. A ``nn.Linear`` (same parameter, same name), so engines that hook
    modules (ZeRO-3 gathers parameters in module hooks) see it as one. With dropout after the activation (in
    training), in inference, and in compiled graphs (whose partitioner makes the same trade by itself) it takes
    the plain path."""

    def __init__(self, in_features: int, out_features: int, glu: bool, dropout: float):
        super().__init__(in_features, out_features, bias=False)
        self.glu = glu
        self.dropout = nn.Dropout(dropout)

    def forward(self, h):
        if ((self.dropout.p and self.training) or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not (h.requires_grad or self.weight.requires_grad)):
            return F.linear(self.dropout(_activate(h, self.glu)), self.weight)
        weight, dev = self.weight, h.device.type
        if torch.is_autocast_enabled(dev):  # as F.linear under autocast: both in the autocast dtype
            dtype = torch.get_autocast_dtype(dev)
            h, weight = h.to(dtype), weight.to(dtype)
        with torch.autocast(dev, enabled=False):
            return _ActivatedLinearFn.apply(h, weight, self.glu)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: float, glu: bool, dropout: float):
        super().__init__()
        hidden = int(d_model * mult)
        self.w_in = nn.Linear(d_model, hidden * (2 if glu else 1), bias=False)
        self.w_out = ActivatedLinear(hidden, d_model, glu, dropout)

    def forward(self, x):
        return self.w_out(self.w_in(x))


def _saved_tensor_hooks_active() -> bool:
    """Whether something (activation checkpointing, CPU offload) already manages what autograd saves here; the
    query is private torch API, so without it we assume yes."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def norm_then(norm: nn.LayerNorm, x: torch.Tensor, fn: Callable, *args):
    """``fn(norm(x), *args)``, where whatever ``fn`` saves for backward of the norm's output (the next linear layer's
    input) is not kept but recomputed from ``x`` in backward: ``x`` is saved by the norm itself, so this drops a
    whole [n, d] activation per norm for one LayerNorm in backward. Exact (the same kernel on the same input and
    weights). Skipped where no gradient is taken, inside compiled graphs, and where saved-tensor hooks are already
    active (checkpointing's own hooks must stay the innermost)."""
    y = norm(x)
    weight, bias = norm.weight, norm.bias
    if (not torch.is_grad_enabled() or not y.requires_grad or torch.compiler.is_compiling()
            or _saved_tensor_hooks_active()
            or (weight is not None and tuple(weight.shape) != tuple(norm.normalized_shape))):  # ZeRO-3 released it
        return fn(y, *args)
    # the norm's parameters as they are now (an engine may re-partition them before backward); [d] each
    weight = weight.detach().clone() if weight is not None else None
    bias = bias.detach().clone() if bias is not None else None
    storage, dtype = y.untyped_storage().data_ptr(), y.dtype

    def pack(t):
        if t.dtype != dtype or t.untyped_storage().data_ptr() != storage:
            return t
        return t.size(), t.stride(), t.storage_offset()

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        with torch.no_grad():
            y = F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
        return y.as_strided(*saved)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(y, *args)


class Block(nn.Module):
    """Pre-norm: ``x + attn(norm1(x))``, then ``+ ff(norm2(.))``.

    ``chunks`` is None (the whole sequence at once) unless an activation checkpointing policy
    (``rtdist.parallel.checkpointing``) sets it to an object with ``size`` (tokens), ``attention`` (bool) and
    ``run(fn, *args)`` (runs ``fn`` on one chunk, recomputed in backward). The block then runs its position-wise
    parts in sequence chunks ("mini-sequence"), so that their activations never exist for more than one chunk:
    always the second half (output projection, residuals, norm2, feed-forward); with ``attention`` also norm1, the
    projections and the local heads (each chunk's first window sees the previous chunk's last one, recomputed from
    that chunk's input), leaving only the routing heads' kernel to run over the whole sequence. Exact: every
    chunk computes what the whole-sequence forward computes for its tokens."""

    def __init__(self, cfg: ModelConfig, n_local: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = RoutingAttention(cfg, n_local)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.ff_glu, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.chunks = None

    def forward(self, x, rope=None, valid=None):
        if self.chunks is None:
            a, aux = norm_then(self.norm1, x, self.attn, rope, valid)
            return self.mix(x, a), aux
        size = self.chunks.size
        if self.chunks.attention and self.attn.chunkable:
            w = self.attn.local_window
            size = -(-size // w) * w  # chunks start on local-window boundaries
            heads, aux = self._attention_in_chunks(x, rope, valid, size)
        else:
            heads, aux = norm_then(self.norm1, x, self.attn.heads, rope, valid)
            heads = (heads,)
        outs = [self.chunks.run(self._second_half, *chunk)
                for chunk in zip(x.split(size, dim=1), *(h.split(size, dim=1) for h in heads))]
        return torch.cat(outs, dim=1), aux

    def mix(self, x, a):
        """The block's output given its input ``x`` and its attention output ``a``."""
        x = x + self.dropout(a)
        return x + self.dropout(norm_then(self.norm2, x, self.ff))

    def _second_half(self, x, *heads):
        """The block's output for its input ``x`` and every head's output (in head order, [B, n, heads, d])."""
        return self.mix(x, self.attn.output(torch.cat(heads, dim=2) if len(heads) > 1 else heads[0]))

    def _attention_in_chunks(self, x, rope, valid, size: int):
        """(the local heads' and the routing heads' outputs [B, n, heads, d], commitment loss), norm1, projections
        and local heads chunk by chunk; the routing heads' kernel over the whole sequence."""
        attn, w = self.attn, self.attn.local_window
        xs = x.split(size, dim=1)
        ropes = list(zip(*(t.split(size) for t in rope))) if rope is not None else [None] * len(xs)
        prev = None
        if attn.n_local:  # the window before this process's first token: none, or a previous rank's
            prev = attn.backend.previous_window(
                lambda: attn.local_kv(self.norm1(x[:, -w:]), _tail(rope, w)), w)
        parts = []
        for i, x_c in enumerate(xs):
            before = (xs[i - 1][:, -w:], _tail(ropes[i - 1], w)) if i else (None, None)
            parts.append(self.chunks.run(self._attention_chunk, x_c, ropes[i], *before, prev if i == 0 else None))
        local, qr, kr, vr = (torch.cat(p, dim=1) if p[0] is not None else None for p in zip(*parts))
        heads, aux = [], x.new_zeros((), dtype=torch.float32)
        if attn.n_local:
            heads.append(attn.backend.after_local(local))
        if attn.n_routing:
            routed, aux = attn.routing_heads(qr, kr, vr, rope, valid)
            heads.append(routed)
        return heads, aux

    def _attention_chunk(self, x, rope, x_before, rope_before, prev):
        """One chunk's (local heads' output, routing heads' raw q, k, v): ``x_before`` is the previous chunk's last
        window (its keys and values are recomputed here), else ``prev`` the (k, v) before the chunk, or None."""
        attn = self.attn
        q, k, v = attn.qkv(self.norm1(x))
        local = None
        if attn.n_local:
            if x_before is not None:
                prev = attn.local_kv(self.norm1(x_before), rope_before)
            local = attn.local_heads(q, k, v, rope, prev)
        if not attn.n_routing:
            return local, None, None, None
        # Copies: the kept chunk outputs must not hold the local heads' projections alive.
        qr, kr, vr = (t.contiguous() if t is not None else None for t in attn.routed_raw(q, k, v))
        return local, qr, kr, vr


def _tail(rope, w: int):
    return tuple(t[-w:] for t in rope) if rope is not None else None


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

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, n, d_model] -> what the output projection reads [B, n, emb_dim]."""
        x = self.norm(x)
        return self.out_proj(x) if self.out_proj is not None else x

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, n, d_model] -> logits [B, n, vocab]."""
        return F.linear(self.head_input(x), self.head_weight)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token cross-entropy of the last block's output ``x`` [B, n, d_model] against ``targets`` [B, n] (fp32;
        ``reduction`` "mean" or "sum"), without logits for the whole sequence: the head runs over chunks of
        ``cfg.loss_chunk_size`` tokens (:func:`chunked_lm_loss`). Equal to ``lm_loss(self.logits(x), targets,
        mask)``: ``mask`` [B, n] bool scores only its True targets (the mean is over them). ``reduction="none"``
        (evaluation, no gradient): every target's loss, [B, n] fp32, ``mask`` ignored."""
        h = self.head_input(x)
        if reduction == "none":
            return token_losses(h, self.head_weight, targets, self.cfg.loss_chunk_size)
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        count = targets.numel()
        if mask is not None:
            keep = mask.reshape(-1)
            h, targets, count = h[keep], targets[keep], keep.sum().clamp(min=1)
        total = chunked_lm_loss(h, self.head_weight, targets, self.cfg.loss_chunk_size)
        return total / count if reduction == "mean" else total

    def forward(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                reduction: str = "mean", loss_mask: Optional[torch.Tensor] = None):
        """``tokens`` [B, n] long; ``valid`` [B, n] bool (False = padding, kept out of k-means);
        ``positions`` [n] absolute positions (default 0..n-1). Returns (logits [B, n, vocab], aux), or with
        ``targets`` [B, n] (loss, aux): the loss of :meth:`loss` (training and evaluation ask for this, so the
        logits of the whole sequence never exist); ``loss_mask`` [B, n] bool: the targets it scores."""
        x = self.embed(tokens)
        rope = self.rope(torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, a = layer(x, rope, valid)
            aux = aux + a
        if targets is not None:
            return self.loss(x, targets, reduction, loss_mask), aux
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

    @torch.no_grad()
    def routing_clusters(self, tokens: torch.Tensor, valid: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
        """Per routing layer (block index): the cluster of every token of ``tokens`` [B, n] in an evaluation
        forward, [B, heads, n] long (no k-means statistics are gathered)."""
        layers = {i: layer.attn.kmeans for i, layer in enumerate(self.layers) if layer.attn.kmeans is not None}
        was_training = self.training
        self.eval()
        try:
            with contextlib.ExitStack() as stack:
                recorded = {i: stack.enter_context(km.recording()) for i, km in layers.items()}
                self(tokens, valid)
            return {i: torch.cat(r, dim=2) for i, r in recorded.items()}  # sequence chunks, in order
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


class _ChunkedLMLoss(torch.autograd.Function):
    """Summed token cross-entropy of ``logits = h @ weight.T``, one chunk of rows at a time.

    The loss is a sum, so its gradients with respect to ``h`` and ``weight`` are computed in forward, chunk by chunk
    (softmax minus one-hot, times ``weight`` and ``h``), while each chunk's logits are at hand; backward only scales
    them by the incoming gradient. What stays alive until backward is the gradient of ``h`` (the size of ``h``) and
    of ``weight``: never the logits of more than one chunk. Log-softmax in fp32; the matmuls in the inputs' dtype."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        need_h, need_w = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float64, device=h.device)  # exact-enough sum over any length
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = (hc @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum(dtype=torch.float64)
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(tc), device=g.device), tc] -= 1
                g = g.to(h.dtype)
                if need_h:
                    grad_h[start:start + chunk] = g @ weight
                if need_w:
                    grad_w.addmm_(g.T.float(), hc.float())
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        return total.float()

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of ``F.linear(h, weight)`` [N, V] against ``targets`` [N], computed over
    chunks of ``chunk`` rows (0: all rows at once) so that at most one chunk's logits exist. Under autocast the
    matmuls run in the autocast dtype, as ``F.linear`` would."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(dev, enabled=False):
        return _ChunkedLMLoss.apply(h, weight, targets, chunk if chunk > 0 else max(1, h.shape[0]))


@torch.no_grad()
def token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Cross-entropy of every target (fp32, shaped like ``targets``) of ``F.linear(h, weight)``, over chunks of
    ``chunk`` rows as :func:`chunked_lm_loss` (same dtypes), so at most one chunk's logits exist."""
    shape = targets.shape
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    chunk = chunk if chunk > 0 else max(1, h.shape[0])
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    with torch.autocast(dev, enabled=False):
        for start in range(0, h.shape[0], chunk):
            logits = (h[start:start + chunk] @ weight.T).float()
            tc = targets[start:start + chunk]
            out[start:start + chunk] = torch.logsumexp(logits, dim=-1) - logits.gather(1, tc[:, None])[:, 0]
    return out.reshape(shape)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
