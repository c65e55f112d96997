"""Parallelism applied to a single-process model from outside, in one fixed order (torchtitan's ``parallelize``):

1. **sequence parallelism**: each attention layer gets a sequence-parallel backend (``dims.sp > 1``);
2. **activation checkpointing**: the policy ``train.checkpoint_policy`` (none, selective, full; older configs:
   ``train.checkpoint_activations``) on every ``train.checkpoint_num_layers``-th block, recomputing in chunks of
   ``train.checkpoint_chunk_size`` tokens; then CPU offload of the saved activations (``train.checkpoint_offload``,
   CUDA);
3. **regional compilation** (``model.compile``): the position-wise part of every block;
4. **the engine** (DeepSpeed ZeRO 0-3, fairscale, torch DDP): data parallelism, sharding, the optimizer.

The order matters: checkpointing wraps blocks whose attention already runs sequence-parallel (so recomputation
replays the same kernels), compilation reaches inside the checkpoint wrappers (so recomputation replays compiled
code), and the engine wraps the finished module.
"""
from __future__ import annotations

from torch import nn

from ..config import Config, checkpoint_policy, without_sinks
from .checkpointing import apply_activation_checkpointing, apply_activation_offload
from .compile import apply_compile, compile_enabled
from .dims import ParallelDims
from .engines import Engine, build_engine
from .optim import OptimConfig
from .sequence import Traffic, apply_sequence_parallel


def optim_config(cfg: Config) -> OptimConfig:
    t = cfg.train
    return OptimConfig(t.lr, t.min_lr, t.warmup_iters, t.train_iters, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                       t.gradient_clipping)


def parallelize_model(model: nn.Module, dims: ParallelDims, cfg: Config) -> Traffic | None:
    """Steps 1 to 3 on ``model`` in place; returns the sequence-parallel traffic counter (None without SP)."""
    t = cfg.train
    traffic = apply_sequence_parallel(model, dims) if dims.sp_enabled else None
    apply_activation_checkpointing(model, t.checkpoint_num_layers, checkpoint_policy(t), t.checkpoint_chunk_size)
    if t.checkpoint_offload:
        apply_activation_offload(model)
    if compile_enabled(cfg.model.compile, next(model.parameters()).device):
        apply_compile(model)
    return traffic


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config) -> Engine:
    """All four steps; returns the engine that trains ``model``. Gradients are averaged over the whole world
    (sequence-parallel ranks included: each rank's loss is the mean over its own tokens and every rank holds as
    many tokens as every other), so to the engine's batch accounting every rank is a data-parallel replica."""
    t = cfg.train
    parallelize_model(model, dims, cfg)
    return build_engine(t.engine, model, optim_config(cfg), micro_batch=t.train_micro_batch_size_per_gpu,
                        accumulation=t.gradient_accumulation_steps, dp_size=dims.world_size,
                        zero_stage=t.zero_stage, precision=t.precision,
                        deepspeed_overrides=without_sinks(cfg.deepspeed))
