"""The Routing Transformer model; single-process, no knowledge of distributed training."""
from .attention import AttentionBackend, Projections, RoutingAttention, Routes, Rotary, apply_rotary
from .kernels import (BlockPlan, ClusterBlocks, block_attention, causal_routing_attention, cluster_blocks,
                      full_attention, group_cluster_ids, local_attention, naive_full_attention, plan_causal_blocks,
                      topk_routing_attention)
from .kmeans import SphericalKMeans, kmeans_stats_suspended, recompute_context, routing_vectors
from .transformer import Block, FeedForward, RoutingTransformerLM, count_parameters, lm_loss

__all__ = [
    "AttentionBackend", "Block", "BlockPlan", "ClusterBlocks", "FeedForward", "Projections", "Rotary",
    "RoutingAttention", "RoutingTransformerLM", "Routes", "SphericalKMeans", "apply_rotary", "block_attention",
    "causal_routing_attention", "cluster_blocks", "count_parameters", "full_attention", "group_cluster_ids",
    "kmeans_stats_suspended", "lm_loss", "local_attention", "naive_full_attention", "plan_causal_blocks",
    "recompute_context", "routing_vectors", "topk_routing_attention",
]
