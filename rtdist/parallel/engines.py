"""Training engines behind one small interface: DeepSpeed (ZeRO 0-3, offload, bf16), fairscale (OSS +
ShardedDataParallel on CPU/GPU, FullyShardedDataParallel on CUDA) and plain torch (DDP).

Every engine takes the same plain arguments and exposes ``model`` (the callable to run forward through),
``module`` (the bare ``RoutingTransformerLM``), ``backward(loss)`` and ``step()`` (called once per micro-batch; the
optimizer only steps at the accumulation boundary) and checkpoint save/load into ``dir/global_step{N}/``.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import merge
from ..errors import CheckpointError, ConfigError
from .optim import (ADAM_KEYS, OptimConfig, PortableState, fill_adam_state, load_schedule, make_optimizer,
                    make_scheduler, param_groups)

# Noise from dependencies that a user cannot act on, silenced once here rather than printed by every rank of every
# run: DeepSpeed guesses its accelerator and warns when it finds no GPU (without CUDA there is one answer), and its
# ZeRO calls torch collectives that torch has renamed.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                        r"deprecated", category=FutureWarning)


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """What a dependency prints (stdout and stderr, progress bars with carriage returns included) is kept out of
    the job log; what it raises still surfaces."""
    if not enabled:
        yield
        return
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        yield


class Engine:
    name = "base"
    model: Any
    module: nn.Module
    accumulation: int

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """Called after every micro-batch's backward; returns True when the optimizer stepped."""
        raise NotImplementedError

    def discard_step(self) -> None:
        """Forget the gradients accumulated in this optimizer step (a non-finite loss on some rank). DeepSpeed keeps
        its own accumulation counter: with DeepSpeed and accumulation > 1 the remaining micro-batches of the step
        are still stepped."""
        self.module.zero_grad(set_to_none=True)

    def grad_norm(self) -> Optional[float]:
        """The last optimizer step's gradient norm, read from the device only when asked (at log steps)."""
        norm = self._grad_norm
        return float(norm) if norm is not None else None

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self):
        return contextlib.nullcontext()

    def save(self, path: Path) -> None:
        """Write this engine's model/optimizer state into the directory ``path`` (collective)."""
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def load_portable(self, state: PortableState) -> None:
        """Adam's state, the schedule and the step counters from a ``reshard.PortableState`` written by another
        engine, stage or world (the weights went into ``module`` before this engine wrapped it)."""
        raise NotImplementedError

    def consolidated_state_dict(self, path: Path) -> Optional[dict]:
        """fp32 parameters + buffers on rank 0 (None elsewhere), after ``save(path)``."""
        raise NotImplementedError


def state_dict_name(name: str) -> str:
    """A parameter's or buffer's name as the module's ``state_dict`` has it: activation checkpoint wrappers add a
    ``_checkpoint_wrapped_module.`` level to ``named_parameters()`` names that their state_dict hook removes."""
    return name.replace("_checkpoint_wrapped_module.", "")


# ------------------------------------------------------------------------------------------------ DeepSpeed


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, module: nn.Module, optim: OptimConfig, *, micro_batch: int, accumulation: int, dp_size: int,
                 zero_stage: int, precision: str, overrides: dict, mpu=None):
        import deepspeed

        self.module, self.accumulation, self.zero_stage = module, accumulation, zero_stage
        # What train.* says (config validation refuses deepspeed: keys that contradict it) goes in last: a resume
        # may have derived another accumulation than the YAML's.
        owned = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro_batch * accumulation * dp_size,
            "gradient_clipping": optim.gradient_clipping,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": precision == "bf16"},
        }
        config = merge(merge({"steps_per_print": 1 << 30, "wall_clock_breakdown": False}, overrides), owned)
        zero = config.get("zero_optimization", {})
        if zero.get("offload_optimizer", {}).get("device", "none") != "none":
            # We pass torch's AdamW; DeepSpeed's CPU Adam would need a compiled extension.
            config.setdefault("zero_force_ds_cpu_optimizer", False)
        self.config = config
        if zero.get("stage", 0) == 3 and getattr(module, "lm_head", None) is None:
            # The tied output projection reads embed.weight outside the embedding's own forward.
            deepspeed.zero.register_external_parameter(module, module.embedding.weight)
        optimizer = make_optimizer(param_groups(module, optim.weight_decay), optim)
        # Every rank prints the same build and setup lines (its CPU op "built successfully"): rank 0's are enough.
        with quiet(enabled=dist.is_initialized() and dist.get_rank() != 0):
            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, config=config, mpu=mpu,
                lr_scheduler=lambda opt: make_scheduler(opt, optim))
        self._grad_norm = None

    def backward(self, loss):
        self.model.backward(loss)

    def step(self) -> bool:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        if boundary:
            self._grad_norm = self.model.get_global_grad_norm()  # a device tensor on some paths: read when logged
        return boundary

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def save(self, path: Path) -> None:
        self.model.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)

    def load(self, path: Path) -> None:
        load_path, _ = self.model.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")

    def load_portable(self, state: PortableState) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        wrapper = self.model.optimizer
        base = getattr(wrapper, "optimizer", wrapper)  # ZeRO and bf16 step flat fp32 partitions with our AdamW
        # ZeRO-3 attaches its partitions to the AdamW's groups only while it steps or saves
        stepped = getattr(wrapper, "fp32_partitioned_groups_flat", None)
        if fill_adam_state(base, self.module, state, stepped):
            link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO 1/2 and bf16 point each parameter at its fragments once the states exist
                link()
            for name, p in self.module.named_parameters():
                safe_set_full_fp32_param(p, state.params[name])  # bf16 rounded the model copy the master came from
                for key in ADAM_KEYS:
                    safe_set_full_optimizer_state(p, getattr(state, key)[name], key)
        load_schedule(self.scheduler, state)
        self.model.global_steps = state.scheduler["last_epoch"]
        self.model.global_samples = self.model.global_steps * self.model.train_batch_size()

    def consolidated_state_dict(self, path: Path) -> Optional[dict]:
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        if self.config["zero_optimization"].get("stage", 0) >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with quiet():  # its progress lines and bar would land in the job log
                params = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        else:
            params = {k: v for k, v in self.module.state_dict().items()}
        # ZeRO names parameters as named_parameters() does; the exported model is loaded by state_dict names
        state = {state_dict_name(k): v.float() if v.is_floating_point() else v for k, v in params.items()}
        persistent = set(self.module.state_dict().keys())
        for name, buf in self.module.named_buffers():  # k-means state: replicated, never partitioned
            if state_dict_name(name) in persistent:
                state[state_dict_name(name)] = buf.detach().clone()
        return state


# ------------------------------------------------------------------------------------- torch / fairscale


class _LocalStepEngine(Engine):
    """Shared optimizer-step logic for engines where we own the optimizer: accumulation, clipping, schedule."""

    def __init__(self, module, optim: OptimConfig, accumulation: int, precision: str):
        self.module, self.accumulation, self.precision = module, accumulation, precision
        self.optim_cfg = optim
        self._micro = 0
        self._grad_norm = None

    def discard_step(self) -> None:
        self._zero_grad()
        self._micro -= self._micro % self.accumulation  # back to the start of this optimizer step

    def _setup_scheduler(self):
        self.scheduler = make_scheduler(self.optimizer, self.optim_cfg)

    def autocast(self):
        if self.precision == "bf16":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            return torch.autocast(dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_context(self):
        """Skip the gradient all-reduce on micro-batches before the boundary."""
        last = (self._micro + 1) % self.accumulation == 0
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def backward(self, loss):
        with self._sync_context():
            (loss / self.accumulation).backward()

    def _clip(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optim_cfg.max_grad_norm)

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.accumulation:
            return False
        self._grad_norm = self._clip()
        self.optimizer.step()
        self._zero_grad()
        self.scheduler.step()
        return True

    def _zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def _rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def save(self, path: Path) -> None:
        optim_state = self._optimizer_state()
        if self._rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"module": self.module.state_dict(), "optimizer": optim_state,
                        "scheduler": self.scheduler.state_dict(), "micro": self._micro}, path / "engine_states.pt")

    def _optimizer_state(self):
        return self.optimizer.state_dict()

    def load(self, path: Path) -> None:
        state = torch.load(path / "engine_states.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]

    def load_portable(self, state: PortableState) -> None:
        base = getattr(self.optimizer, "optim", self.optimizer)  # fairscale's OSS steps this rank's shard with it
        if fill_adam_state(base, self.module, state):
            raise CheckpointError(f"engine {self.name} holds flattened parameters here (fairscale's "
                                  f"FullyShardedDataParallel): resume another engine's checkpoint with engine "
                                  f"deepspeed or torch")
        load_schedule(self.scheduler, state)
        self._micro = state.scheduler["last_epoch"] * self.accumulation

    def consolidated_state_dict(self, path: Path) -> Optional[dict]:
        if self._rank() != 0:
            return None
        return {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                for k, v in self.module.state_dict().items()}


class TorchEngine(_LocalStepEngine):
    """AdamW, with DistributedDataParallel when there is more than one process."""
    name = "torch"

    def __init__(self, module, optim: OptimConfig, accumulation: int, precision: str):
        super().__init__(module, optim, accumulation, precision)
        self.model = module
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(module)
        self.optimizer = make_optimizer(param_groups(module, optim.weight_decay), optim)
        self._setup_scheduler()


class FairscaleEngine(_LocalStepEngine):
    """OSS (sharded optimizer state) + ShardedDataParallel; FullyShardedDataParallel when CUDA is present."""
    name = "fairscale"

    def __init__(self, module, optim: OptimConfig, accumulation: int, precision: str, full_shard: bool = False):
        super().__init__(module, optim, accumulation, precision)
        self.full_shard = full_shard
        if not dist.is_initialized():  # fairscale wants a process group even for one process
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if full_shard:
            from fairscale.nn.data_parallel import FullyShardedDataParallel
            self.model = FullyShardedDataParallel(module.cuda(), mixed_precision=False, flatten_parameters=True)
            self.module = module
            self.optimizer = make_optimizer(self.model.parameters(), optim)
        else:
            from fairscale.nn.data_parallel import ShardedDataParallel
            from fairscale.optim.oss import OSS
            self.optimizer = OSS(param_groups(module, optim.weight_decay), optim=torch.optim.AdamW, lr=optim.lr,
                                 betas=optim.betas)
            self.model = ShardedDataParallel(module, self.optimizer)
        self._setup_scheduler()

    def _zero_grad(self):
        # ShardedDataParallel reduces into gradient buckets it holds on to: zero them, do not drop them.
        self.model.zero_grad(set_to_none=False)

    def _clip(self) -> torch.Tensor:
        max_norm = self.optim_cfg.max_grad_norm
        if self.full_shard:
            return self.model.clip_grad_norm_(max_norm)
        return self.optimizer.clip_grad_norm(max_norm)

    def _optimizer_state(self):
        if self.full_shard:
            with _gather_buffers_sized(self.model), _steps_kept(self.optimizer):
                return self.model.gather_full_optim_state_dict(self.optimizer)
        self.optimizer.consolidate_state_dict(recipient_rank=0)  # collective
        return self.optimizer.state_dict() if self._rank() == 0 else None

    def save(self, path: Path) -> None:
        if self.full_shard:
            full = self.model.state_dict()  # collective
            optim_state = self._optimizer_state()
            if self._rank() == 0:
                path.mkdir(parents=True, exist_ok=True)
                torch.save({"module": full, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                            "micro": self._micro}, path / "engine_states.pt")
            return
        super().save(path)

    def consolidated_state_dict(self, path: Path) -> Optional[dict]:
        if not self.full_shard:
            return super().consolidated_state_dict(path)
        # FullyShardedDataParallel flattened the module's parameters into its own: the module alone no longer
        # lists them, and only the wrapper's state_dict (a collective) gathers them under the module's names.
        full = self.model.state_dict()
        if self._rank() != 0:
            return None
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in full.items()}

    def load(self, path: Path) -> None:
        state = torch.load(path / "engine_states.pt", map_location="cpu", weights_only=False)
        if self.full_shard:
            self.model.load_state_dict(state["module"])
            self.optimizer.load_state_dict(self.model.get_shard_from_optim_state_dict(state["optimizer"]))
        else:
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])  # OSS keeps its own shard
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]


@contextlib.contextmanager
def _gather_buffers_sized(fsdp):
    """fairscale's ``gather_full_optim_state_dict`` sizes its all-gather buffer by each flat parameter's
    ``_full_param_padded``, which ``FullyShardedDataParallel`` makes only for sharded parameters: in a world of one
    process (nothing sharded) it raised AttributeError and no checkpoint could be saved (seen on an H200 by
    tools/gpu_check.py). There the whole flat parameter is the padded size; a size-only stand-in serves while it
    runs, and goes after."""
    from fairscale.nn.data_parallel.fully_sharded_data_parallel import get_fsdp_instances
    added = [p for m in get_fsdp_instances(fsdp, skip_empty=True) for p in m.params
             if not hasattr(p, "_full_param_padded")]
    for p in added:
        p._full_param_padded = torch.empty(p.numel(), device="meta")
    try:
        yield
    finally:
        for p in added:
            del p._full_param_padded


@contextlib.contextmanager
def _steps_kept(optimizer):
    """fairscale's ``gather_full_optim_state_dict`` turns each parameter's ``step`` into an int in the dicts that
    ``optimizer.state_dict()`` shares with the live optimizer, and torch's Adam then refuses to step (seen on an
    H200 by tools/gpu_check.py): put the live values back after it. (A checkpoint's int steps are fine: Adam's
    ``load_state_dict`` makes them tensors again.)"""
    steps = [(s, s["step"]) for s in optimizer.state.values() if "step" in s]
    try:
        yield
    finally:
        for s, step in steps:
            s["step"] = step


def check_engine(kind: str, zero_stage: int) -> None:
    """Engine and ZeRO stage combinations that cannot work on this machine, before any process group forms (the
    config's own rules are :func:`rtdist.config.validate`'s)."""
    if kind == "fairscale" and zero_stage == 3 and not torch.cuda.is_available():
        raise ConfigError("train.zero_stage=3 with engine fairscale needs FullyShardedDataParallel, which needs CUDA; "
                          "use engine deepspeed for ZeRO-3 on CPU")


def build_engine(kind: str, module: nn.Module, optim: OptimConfig, *, micro_batch: int, accumulation: int,
                 dp_size: int, zero_stage: int, precision: str, deepspeed_overrides: Optional[dict] = None,
                 mpu=None) -> Engine:
    if kind == "deepspeed":
        return DeepSpeedEngine(module, optim, micro_batch=micro_batch, accumulation=accumulation, dp_size=dp_size,
                               zero_stage=zero_stage, precision=precision, overrides=deepspeed_overrides or {},
                               mpu=mpu)
    if kind == "fairscale":
        return FairscaleEngine(module, optim, accumulation, precision, full_shard=torch.cuda.is_available())
    if kind == "torch":
        return TorchEngine(module, optim, accumulation, precision)
    raise ValueError(f"unknown engine {kind!r}: expected deepspeed, fairscale or torch")
