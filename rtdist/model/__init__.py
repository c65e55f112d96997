"""The Routing Transformer model; single-process, no knowledge of distributed training."""
from .attention import (BlockPlan, block_attention, causal_routing_attention, full_attention, local_attention,
                        naive_full_attention, plan_causal_blocks, topk_routing_attention)
from .kmeans import SphericalKMeans, kmeans_stats_suspended, routing_vectors
from .transformer import RoutingAttention, RoutingTransformerLM, count_parameters, lm_loss

__all__ = [
    "BlockPlan", "RoutingAttention", "RoutingTransformerLM", "SphericalKMeans", "block_attention",
    "causal_routing_attention", "count_parameters", "full_attention", "kmeans_stats_suspended", "lm_loss",
    "local_attention", "naive_full_attention", "plan_causal_blocks", "routing_vectors", "topk_routing_attention",
]
