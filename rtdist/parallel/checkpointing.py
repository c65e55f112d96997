"""Activation checkpointing and CPU offload of saved activations, applied to a model's blocks from outside.

Blocks are wrapped with torch's checkpoint wrapper (non-reentrant; parameter names and state-dict keys unchanged).
Recomputation replays a block's forward: the k-means statistics it gathers were already counted by the first pass,
so they are suspended during the replay (:func:`rtdist.model.kmeans_stats_suspended`), and the centroids never move
inside a step, so the replay routes every token exactly as the first pass did.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper, offload_wrapper
from torch.utils.checkpoint import checkpoint

from ..model import kmeans_stats_suspended


def _recompute_context():
    return contextlib.nullcontext(), kmeans_stats_suspended()


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> int:
    """Checkpoint every ``every``-th block of ``model.layers`` (0, every, 2 * every, ...); returns how many."""
    wrapped = 0
    for i, block in enumerate(model.layers):
        if i % every == 0:
            model.layers[i] = checkpoint_wrapper(block, checkpoint_fn=checkpoint, use_reentrant=False,
                                                 context_fn=_recompute_context)
            wrapped += 1
    return wrapped


def apply_activation_offload(model: nn.Module) -> None:
    """Keep every block's saved activations in (pinned) host memory until backward; CUDA only (on a CPU the
    activations are in host memory already)."""
    if not torch.cuda.is_available():
        return
    for i, block in enumerate(model.layers):
        model.layers[i] = offload_wrapper(block)
