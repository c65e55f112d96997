"""Online spherical k-means for routing heads.

Commitment loss = factor * mean over tokens of ||r - sg(centroid)||^2 with r the unit-norm routing vector.

Centroids live in fp32 buffers and never receive gradients. Forward only *reads* them: it assigns tokens to their
nearest centroid and, in training, accumulates per-cluster sums and counts. The EMA update is applied once per
optimizer step by :meth:`SphericalKMeans.apply_update` (through ``RoutingTransformerLM.update_kmeans``), after the
statistics have been reduced over every replica, so activation-checkpoint recomputation, gradient accumulation and
evaluation never move the centroids and the commitment loss is always against the pre-step centroids.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_suspended = 0


@contextlib.contextmanager
def kmeans_stats_suspended():
    """Forward passes inside this context do not accumulate k-means statistics (used for checkpoint recomputation,
    which replays a forward whose statistics were already counted)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def recompute_context():
    """``context_fn`` for torch's non-reentrant checkpoint: the first pass runs as usual, the recomputation in
    backward with k-means statistics suspended (they were counted by the first pass)."""
    return contextlib.nullcontext(), kmeans_stats_suspended()


def routing_vectors(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without scale/bias, divided by sqrt(d): unit-norm-like fp32 vectors for spherical k-means."""
    d = x.shape[-1]
    return F.layer_norm(x.float(), (d,)) / math.sqrt(d)


class SphericalKMeans(nn.Module):
    """Per-head centroids ``[heads, clusters, dim]`` updated by EMA of the assigned routing vectors.

    Update rule (per head h, cluster c), with s/n the step's (reduced) sums and counts:
        ema_sums   <- decay * ema_sums   + (1 - decay) * s
        ema_counts <- decay * ema_counts + (1 - decay) * n
        means      <- normalize(ema_sums)           (spherical: only the direction matters)
    The first update uses decay 0 (one Lloyd step from the random initial centroids), so routing adapts to the
    data at once instead of crawling away from noise at rate 1e-3. A cluster that has never received a token
    keeps its previous centroid.
    """

    def __init__(self, num_heads: int, num_clusters: int, dim: int, decay: float = 0.999,
                 commitment_factor: float = 1e-4, reseed_after: int = 0, candidates: int = 64):
        super().__init__()
        self.num_heads, self.num_clusters, self.dim = num_heads, num_clusters, dim
        self.decay = decay
        self.commitment_factor = commitment_factor
        self.reseed_after = reseed_after  # re-seed a cluster idle for this many updates (0: never)
        self.num_candidates = candidates
        means = F.normalize(torch.randn(num_heads, num_clusters, dim), dim=-1)
        self.register_buffer("means", means)
        self.register_buffer("ema_sums", means.clone())
        self.register_buffer("ema_counts", torch.zeros(num_heads, num_clusters))
        self.register_buffer("initted", torch.tensor(False))
        # updates since each cluster last received a token (checkpointed: re-seeding resumes exactly)
        self.register_buffer("idle_steps", torch.zeros(num_heads, num_clusters))
        # Statistics of the current step; transient, so not part of checkpoints.
        self.register_buffer("step_sums", torch.zeros(num_heads, num_clusters, dim), persistent=False)
        self.register_buffer("step_counts", torch.zeros(num_heads, num_clusters), persistent=False)
        self.register_buffer("last_counts", torch.zeros(num_heads, num_clusters), persistent=False)  # last update's
        # how far the last update moved each centroid (1 - cosine): centroids that cannot follow the routing
        # vectors move ~0 while the vectors drift away from them
        self.register_buffer("last_move", torch.zeros(num_heads, num_clusters), persistent=False)
        # the worst-fitting routing vectors of the last training forward: what a dead cluster is re-seeded from
        self.register_buffer("candidates", torch.zeros(num_heads, candidates, dim), persistent=False)
        self.reseeded = 0  # clusters re-seeded so far (this process)
        self.recorded: Optional[list] = None  # a list while :meth:`recording`: each forward's assignment [B, H, n]
        self._register_load_state_dict_pre_hook(_missing_idle_steps)

    def _apply(self, fn, recurse=True):
        # Keep every k-means buffer fp32 whatever .half()/.bfloat16()/DeepSpeed does to the module.
        super()._apply(fn, recurse)
        for name, buf in self.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    @torch.no_grad()
    def init_from_vectors(self, r: torch.Tensor, valid: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None, max_vectors: int = 8192,
                          iters: int = 10) -> None:
        """Centroids from data: per head, k-means++ seeds and ``iters`` Lloyd steps on (at most ``max_vectors``
        randomly chosen) routing vectors ``r`` [B, H, n, d]; padding (``valid`` False) is left out. The result is
        the k-means state as if it had already been initialised, so the EMA continues from it.

        Random unit centroids in a d-dimensional space are all far from the data, so the first Lloyd step can put
        most tokens in a few clusters; seeds drawn from the data spread the clusters over what the tokens occupy."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        for h in range(self.num_heads):
            x = r[:, h].float()
            x = x[valid] if valid is not None else x.reshape(-1, x.shape[-1])
            if x.shape[0] == 0:
                raise ValueError("init_from_vectors: no valid routing vectors to seed the centroids from")
            x = F.normalize(x, dim=-1).cpu()
            x = x[torch.randperm(x.shape[0], generator=g)[:max_vectors]]
            self.means[h] = kmeans_plus_plus(x, self.num_clusters, g, iters).to(self.means.device)
        self.ema_sums.copy_(self.means)
        self.ema_counts.zero_()
        self.initted.fill_(True)

    def similarities(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` [B, H, n, d] fp32 routing vectors -> cosine scores [B, H, n, C] (fp32, autocast off)."""
        with torch.autocast(device_type=r.device.type, enabled=False):
            return torch.einsum("bhnd,hcd->bhnc", r, self.means)

    @torch.no_grad()
    def nearest(self, r: torch.Tensor, sims: Optional[torch.Tensor] = None, chunk: int = 8192):
        """(nearest centroid [B, H, n] long, its score [B, H, n] fp32) of each routing vector, without gradient.

        From ``sims`` when given, else scored ``chunk`` tokens at a time: the [B, H, n, C] scores of a long
        sequence (C grows with n) are never held whole."""
        if sims is not None:
            score, clusters = sims.max(dim=-1)
            return clusters, score
        parts = [self.similarities(r[:, :, i:i + chunk]).max(dim=-1) for i in range(0, r.shape[2], chunk)]
        return torch.cat([p.indices for p in parts], dim=2), torch.cat([p.values for p in parts], dim=2)

    def assign(self, r: torch.Tensor, valid: Optional[torch.Tensor] = None, sims: Optional[torch.Tensor] = None):
        """Nearest centroid for each routing vector (fp32, computed once: the same assignment feeds the statistics,
        the block plan and the commitment loss); accumulates statistics when training.

        Returns (assignment [B, H, n] long, commitment loss scalar)."""
        clusters, score = self.nearest(r, sims)
        if self.recorded is not None:
            self.recorded.append(clusters.detach())
        if self.training and not _suspended and torch.is_grad_enabled():
            self._accumulate(r.detach(), clusters, valid, score)
        return clusters, self.commitment_loss(r, clusters, valid, score)

    def commitment_loss(self, r: torch.Tensor, clusters: torch.Tensor, valid: Optional[torch.Tensor],
                        score: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``score`` [B, H, n]: r . centroid of the assigned clusters (computed here when None)."""
        if self.commitment_factor == 0:
            return r.new_zeros(())
        h = torch.arange(self.num_heads, device=r.device)[None, :, None]
        if score is None:
            with torch.no_grad():
                score = (r * self.means[h, clusters]).sum(-1)
        # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2 from the assignment's own scores: no [B, H, n, d] difference
        # tensor and no [B, H, n, C] scores are built or kept for backward. In [0, 4] for unit-norm vectors.
        err = r.pow(2).sum(-1) - 2 * _AssignedScore.apply(r, self.means, clusters, score) \
            + self.means.pow(2).sum(-1)[h, clusters]
        if valid is not None:
            w = valid[:, None, :].to(err.dtype).expand_as(err)
            return self.commitment_factor * (err * w).sum() / w.sum().clamp(min=1)
        return self.commitment_factor * err.mean()

    @torch.no_grad()
    def _accumulate(self, r: torch.Tensor, clusters: torch.Tensor, valid: Optional[torch.Tensor],
                    score: torch.Tensor) -> None:
        B, H, n, d = r.shape
        idx = (torch.arange(H, device=r.device)[None, :, None] * self.num_clusters + clusters)  # [B, H, n]
        vecs = r
        if valid is not None:  # padding never enters the statistics
            keep = valid[:, None, :].expand(B, H, n)
            idx, vecs = idx[keep], vecs[keep]
        idx, vecs = idx.reshape(-1), vecs.reshape(-1, d)
        self.step_sums.view(-1, d).index_add_(0, idx, vecs)
        self.step_counts.view(-1).add_(torch.bincount(idx, minlength=H * self.num_clusters).to(self.step_counts))
        if self.reseed_after:
            # the worst-fitting vectors of the step (lowest score against their own centroid), per head: what no
            # live cluster represents, so a re-seeded cluster takes them over (no random draw: the training RNG
            # stays untouched)
            fit = score.detach().transpose(1, 2)  # [B, n, H]
            tokens = r.transpose(1, 2)  # [B, n, H, d]
            if valid is not None:
                fit, tokens = fit[valid], tokens[valid]
            else:
                fit, tokens = fit.reshape(-1, H), tokens.reshape(-1, H, d)
            if len(tokens):
                k = min(self.num_candidates, len(tokens))
                worst = fit.topk(k, dim=0, largest=False).indices  # [k, H]
                picked = tokens.gather(0, worst[..., None].expand(-1, -1, d)).transpose(0, 1)  # [H, k, d]
                self.candidates[:, :k].copy_(picked)
                self.candidates[:, k:].copy_(picked[:, -1:].expand(-1, self.num_candidates - k, -1))

    @contextlib.contextmanager
    def recording(self):
        """Yields a list that collects the assignment [B, H, n] of every forward inside the context (diagnostics:
        which tokens share a cluster)."""
        self.recorded = []
        try:
            yield self.recorded
        finally:
            self.recorded = None

    def stats(self) -> list[torch.Tensor]:
        return [self.step_counts, self.step_sums]

    def state_tensors(self) -> list[torch.Tensor]:
        """Centroids and EMA state: what every replica must hold identically."""
        return [self.means, self.ema_sums, self.ema_counts, self.initted]

    def discard_stats(self) -> None:
        self.step_counts.zero_()
        self.step_sums.zero_()

    @torch.no_grad()
    def apply_update(self, broadcast_fn=None) -> None:
        """EMA step from the (already reduced) statistics, then clear them. With ``reseed_after``, clusters that
        received no token for that many updates are re-seeded (:meth:`_reseed`); ``broadcast_fn`` makes every
        replica use rank 0's candidate vectors, so the centroids stay identical."""
        counts, sums = self.step_counts, self.step_sums
        # Without a read of any device value (each a host-device synchronisation on a GPU): what depends on the
        # statistics is selected with torch.where. A step that routed nothing (only evaluation ran) changes nothing.
        routed, seen = counts.sum() > 0, counts > 0
        decay = torch.where(self.initted, self.decay, 0.0)
        keep = torch.where(self.initted, 1 - self.decay, 1.0)  # 1 - decay, rounded as a Python float would be
        new_sums = decay * self.ema_sums + keep * sums
        # first update: clusters that received nothing keep their initial centroid
        new_sums = torch.where(seen[..., None] | self.initted, new_sums, self.ema_sums)
        norm = new_sums.norm(dim=-1, keepdim=True)
        new_means = torch.where(norm > 1e-12, new_sums / norm.clamp(min=1e-12), self.means)
        for buf, new in ((self.last_counts, counts), (self.last_move, 1 - (new_means * self.means).sum(-1)),
                         (self.ema_sums, new_sums),
                         (self.ema_counts, self.ema_counts * decay + keep * counts), (self.means, new_means),
                         (self.idle_steps, torch.where(seen, torch.zeros_like(self.idle_steps), self.idle_steps + 1))):
            buf.copy_(torch.where(routed, new, buf))
        self.initted.logical_or_(routed)
        counts.zero_()
        sums.zero_()
        if self.reseed_after:  # opt-in; reseeding picks clusters by value, so it reads the device
            dead = (self.idle_steps >= self.reseed_after) & routed  # the same on every replica: reduced counts
            if bool(dead.any()):
                if broadcast_fn is not None:
                    broadcast_fn(self.candidates)
                self._reseed(dead)

    @torch.no_grad()
    def _reseed(self, dead: torch.Tensor) -> None:
        """Give each dead cluster the candidate routing vector farthest from every centroid, the ones just re-seeded
        included (so two dead clusters never take the same direction), with the head's mean count so that it is not
        judged dead again at once."""
        cand = F.normalize(self.candidates, dim=-1)  # [H, K, d]
        for h in range(self.num_heads):
            count = self.ema_counts[h].mean().clamp(min=1e-6)
            live = ~dead[h]  # never empty: the step's tokens went to some cluster of every head
            for c in dead[h].nonzero().squeeze(1).tolist():
                chosen = cand[h][(cand[h] @ self.means[h][live].T).amax(dim=1).argmin()]
                self.means[h, c] = chosen
                self.ema_sums[h, c] = chosen * count
                self.ema_counts[h, c] = count
                self.idle_steps[h, c] = 0
                live[c] = True  # the next choice keeps away from it too
                self.reseeded += 1

    def health(self) -> dict:
        """Occupancy of the last update (summed over replicas), worst head: the largest cluster's share of the
        tokens, the smallest, the normalised entropy (1 = even), clusters that got no token, the longest idle
        stretch (updates), and how far the last update moved the centroids (1 - cosine: mean and largest)."""
        counts = self.last_counts
        total = counts.sum(-1, keepdim=True).clamp(min=1)
        share = counts / total
        entropy = -(share * share.clamp(min=1e-12).log()).sum(-1) / math.log(max(self.num_clusters, 2))
        return {"max_share": float(share.amax()), "min_share": float(share.amin()),
                "entropy": float(entropy.amin()), "empty": int((counts == 0).sum()),
                "idle_max": int(self.idle_steps.amax()), "reseeded": self.reseeded,
                "move": float(self.last_move.mean()), "move_max": float(self.last_move.amax())}


def _missing_idle_steps(state_dict, prefix, *args):
    """Checkpoints written before ``idle_steps`` existed load with every cluster counted as just seen."""
    key = prefix + "idle_steps"
    if key not in state_dict and prefix + "ema_counts" in state_dict:
        state_dict[key] = torch.zeros_like(state_dict[prefix + "ema_counts"])


class _AssignedScore(torch.autograd.Function):
    """r . means[h, cluster] given its value ``score``; gradient ``grad * means[h, cluster]`` for r (the centroids
    get none: they move by EMA only). Saves the centroids and the assignment, which exist anyway."""

    @staticmethod
    def forward(ctx, r, means, clusters, score):
        ctx.save_for_backward(means, clusters)
        return score.to(r.dtype)

    @staticmethod
    def backward(ctx, grad):
        means, clusters = ctx.saved_tensors
        h = torch.arange(means.shape[0], device=means.device)[None, :, None]
        return grad[..., None] * means[h, clusters], None, None, None


@torch.no_grad()
def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 10,
                     restarts: int = 8) -> torch.Tensor:
    """Spherical k-means on unit rows ``x`` [N, d], the best of ``restarts`` runs (lowest distortion: sum over rows
    of 1 - cosine to the nearest centroid), each k-means++ seeds and ``iters`` Lloyd steps -> [k, d].

    One run can end in a poor local optimum that merges a rare kind of vector into a common one's cluster; as the
    centroids then move slowly (EMA) and the commitment loss holds vectors to them, training inherits it. The
    retrieval study's second layer did on 6 of 32 seeds (its 16 query and definition keys per 2048 tokens shared a
    cluster with ~16 filler tokens; on the others each key had a cluster of its own); the best of 8 on none."""
    best, best_cost = None, float("inf")
    for _ in range(max(1, restarts)):
        c = _kmeans_once(x, k, generator, iters)
        cost = float((1 - (x @ c.T).amax(dim=1)).sum())
        if cost < best_cost:
            best, best_cost = c, cost
    return best


def _kmeans_once(x: torch.Tensor, k: int, generator: torch.Generator, iters: int) -> torch.Tensor:
    """k-means++ seeds (each next seed drawn with probability proportional to its squared distance from the nearest
    seed so far), then ``iters`` Lloyd steps. A cluster left empty by a Lloyd step keeps its centroid."""
    N = x.shape[0]
    first = int(torch.randint(N, (1,), generator=generator))
    idx = [first]
    dist = (2 - 2 * x @ x[first]).clamp(min=0)
    for _ in range(1, k):
        total = dist.sum()
        p = dist / total if total > 0 else torch.full_like(dist, 1.0 / N)
        i = int(torch.multinomial(p, 1, generator=generator))
        idx.append(i)
        dist = torch.minimum(dist, (2 - 2 * x @ x[i]).clamp(min=0))
    c = x[idx].clone()
    for _ in range(iters):
        a = (x @ c.T).argmax(dim=1)
        s = torch.zeros_like(c).index_add_(0, a, x)
        norm = s.norm(dim=1, keepdim=True)
        c = torch.where(norm > 1e-6, s / norm.clamp(min=1e-6), c)
    return c
