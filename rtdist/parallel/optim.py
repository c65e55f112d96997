"""The optimizer every engine trains with and the state a resume carries between engines: AdamW over two
parameter groups, warmup + cosine schedule, gradient clipping, and Adam's moments loaded by parameter name.

The engines build optimizers from here and resharding reads and writes their state by the same parameter order,
so neither needs the other."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class OptimConfig:
    lr: float
    min_lr: float
    warmup_iters: int
    train_iters: int
    weight_decay: float
    betas: tuple[float, float]
    gradient_clipping: float

    @property
    def max_grad_norm(self) -> float:
        """The clipping threshold (``gradient_clipping`` 0 means no clipping: an infinite threshold, so the norm is
        still measured)."""
        return self.gradient_clipping if self.gradient_clipping > 0 else float("inf")


def lr_lambda(cfg: OptimConfig):
    """Linear warmup to lr, cosine decay to min_lr at train_iters (as a multiplier of lr)."""
    def f(step: int) -> float:
        if cfg.warmup_iters and step < cfg.warmup_iters:
            return (step + 1) / cfg.warmup_iters
        span = max(1, cfg.train_iters - cfg.warmup_iters)
        progress = min(1.0, (step - cfg.warmup_iters) / span)
        ratio = cfg.min_lr / cfg.lr
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on matrices only (not norms, biases or embeddings' 1-D siblings)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def param_names_in_optimizer_order(module: nn.Module) -> list[str]:
    """Parameter names in the order our optimizers index them (``param_groups``: decayed matrices, then the rest)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in param_groups(module, 0.0) for p in group["params"]]


@dataclass
class PortableState:
    """What the next optimizer step depends on, by parameter name, independent of engine, ZeRO stage and world."""
    params: dict[str, torch.Tensor]  # fp32 weights by parameter name
    buffers: dict[str, torch.Tensor]  # persistent buffers by name (k-means centroids, EMA sums and counts)
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int  # Adam's step count (the same for every parameter)
    scheduler: dict  # LambdaLR.state_dict()


def fill_adam_state(optimizer: torch.optim.Optimizer, module: nn.Module, state: PortableState,
                    stepped: Optional[list] = None) -> list:
    """Adam's state for every tensor ``optimizer`` steps (``stepped``, by default its param groups' parameters):
    from ``state`` by name where it steps the model's own parameters, zeros where it steps flat partitions (ZeRO,
    bf16), which the caller fills by name. Returns those."""
    names = {id(p): n for n, p in module.named_parameters()}
    stepped = stepped if stepped is not None else [p for group in optimizer.param_groups for p in group["params"]]
    flat = []
    for p in stepped:
        step = torch.tensor(float(state.step), dtype=torch.float32)
        if id(p) in names:
            n = names[id(p)]
            optimizer.state[p] = {"step": step, **{k: getattr(state, k)[n].to(p).reshape(p.shape).clone()
                                                   for k in ADAM_KEYS}}
        else:
            optimizer.state[p] = {"step": step, **{k: torch.zeros_like(p) for k in ADAM_KEYS}}
            flat.append(p)
    return flat


def load_schedule(scheduler, state: PortableState) -> None:
    """The learning-rate schedule, and the rates it last set (its state does not hold them: it sets them when it
    steps)."""
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
