"""Activation checkpointing policies and CPU offload of saved activations, applied to a model's blocks from outside.

Policies (``train.checkpoint_policy``), each trading recomputation in backward for memory kept from forward:

- ``none``: every activation autograd needs is kept.
- ``selective``: each block's position-wise second half (residuals, norm2, feed-forward) runs in sequence chunks of
  ``chunk_size`` tokens, each recomputed in backward: its activations (the feed-forward hidden layer, ~70% of a
  block's saved bytes) are never kept, and never exist for more than one chunk. The attention half keeps what is
  costly to recompute (projections, kernel inputs and outputs).
- ``full``: every checkpointed block keeps only its input; its whole forward runs again in backward (torch's
  checkpoint wrapper, non-reentrant), with the position-wise half in recomputed chunks inside, so that even the
  recomputed block never holds its feed-forward hidden layer for the whole sequence.

Recomputation replays forward passes whose k-means statistics were already counted, so they are suspended during
every replay (:func:`rtdist.model.kmeans_stats_suspended`); the centroids never move inside a step, so the replay
routes every token exactly as the first pass did. Parameter names and state-dict keys are unchanged.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper, offload_wrapper
from torch.utils.checkpoint import checkpoint

from ..model import recompute_context

POLICIES = ("none", "selective", "full")


class RecomputedChunks:
    """``Block.chunks``: sequence chunks of ``size`` tokens, each run checkpointed (only its inputs are kept;
    backward recomputes one chunk at a time, k-means statistics suspended). ``attention``: the block chunks its
    attention's position-wise part too, not only its second half."""

    def __init__(self, size: int, attention: bool):
        self.size, self.attention = size, attention

    def run(self, fn, *args):
        if torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, context_fn=recompute_context)
        return fn(*args)

    def __repr__(self) -> str:
        return f"RecomputedChunks(size={self.size}, attention={self.attention})"


def apply_activation_checkpointing(model: nn.Module, every: int = 1, policy: str = "full",
                                   chunk_size: int = 4096) -> int:
    """Apply ``policy`` (see the module docstring) to every ``every``-th block of ``model.layers`` (0, every,
    2 * every, ...); returns how many blocks it changed. ``chunk_size``: tokens per recomputed chunk (0: nothing
    is chunked, and ``selective`` changes nothing)."""
    if policy not in POLICIES:
        raise ValueError(f"checkpoint policy must be one of {POLICIES}, got {policy!r}")
    if policy == "none" or (policy == "selective" and chunk_size <= 0):
        return 0
    changed = 0
    for i, block in enumerate(model.layers):
        if i % every:
            continue
        if chunk_size > 0:
            block.chunks = RecomputedChunks(chunk_size, attention=policy == "full")
        if policy == "full":
            model.layers[i] = checkpoint_wrapper(block, checkpoint_fn=checkpoint, use_reentrant=False,
                                                 context_fn=recompute_context)
        changed += 1
    return changed


def apply_activation_offload(model: nn.Module) -> None:
    """Keep every block's saved activations in (pinned) host memory until backward; CUDA only (on a CPU the
    activations are in host memory already)."""
    if not torch.cuda.is_available():
        return
    for i, block in enumerate(model.layers):
        model.layers[i] = offload_wrapper(block)
