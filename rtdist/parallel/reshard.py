"""Resuming a checkpoint on another cluster shape: another world size, ZeRO stage or engine.

An engine's checkpoint files fit the shape that wrote them: DeepSpeed's ZeRO files hold one flat partition per rank,
and each engine has its own layout. When the new run cannot load them as they are (:func:`files_fit`), the resume
goes through a *portable state*: what the next optimizer step depends on, keyed by parameter name and independent
of engine, stage and world: fp32 weights, persistent buffers (the k-means centroids and their EMA statistics),
Adam's ``exp_avg``/``exp_avg_sq`` and step count, and the learning-rate schedule.

Reading it (rank 0, once, into ``portable.pt`` in a scratch folder next to the checkpoint that every rank then
memory-maps; the folder is removed after loading, or by the next save when a crash left it):

- DeepSpeed with ZeRO 1-3 (or bf16): DeepSpeed's universal-checkpoint converter (``ds_to_universal``) undoes the
  partitioning and padding; its per-parameter files are read here.
- DeepSpeed without ZeRO in fp32, torch and fairscale: their files are whole already (module + torch optimizer
  state dict, whose parameter indices follow :func:`~rtdist.parallel.optim.param_groups`).

Loading it: the weights and buffers go into the bare model before the engine wraps it (DeepSpeed takes its fp32
master weights and its ZeRO-3 partitions from the model), Adam's state after (``Engine.load_portable``): directly
where the optimizer holds the model's parameters, through DeepSpeed's fragment API
(``safe_set_full_optimizer_state``) where ZeRO holds it flat.

DeepSpeed's universal *loader* (``checkpoint.load_universal``) is not used: it restores no buffers (the centroids),
loads ZeRO-3 only from ZeRO-3 sources and there copies the first parameter group's hyperparameters (weight decay)
onto every group, and it has no path into torch or fairscale.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import dist as rdist
from ..errors import CheckpointError, user_error_message
from .optim import ADAM_KEYS, PortableState, param_names_in_optimizer_order

PORTABLE = "portable.pt"


def whole_files(engine: str, zero_stage: int, precision: str = "fp32") -> bool:
    """Whether an engine writes its state whole (one copy for any world size) rather than per-rank partitions."""
    return engine in ("torch", "fairscale") or (zero_stage == 0 and precision != "bf16")


@dataclass(frozen=True)
class Layout:
    """The shape that writes (or would load) an engine's checkpoint files."""
    engine: str
    zero_stage: int
    world_size: int
    precision: str = "fp32"

    @property
    def whole(self) -> bool:
        return whole_files(self.engine, self.zero_stage, self.precision)

    def loads(self, written: "Layout") -> bool:
        """Whether this layout can load files ``written`` by another as they are: the same engine and stage, and
        the same world unless the files are whole."""
        same = (written.engine, written.zero_stage) == (self.engine, self.zero_stage)
        return same and (written.world_size == self.world_size or written.whole)

    def __str__(self) -> str:
        return f"{self.world_size} ranks, engine {self.engine}, zero {self.zero_stage}"


# ------------------------------------------------------------------------------------------------ reading


def _buffers(module: nn.Module, state_dict: dict) -> dict[str, torch.Tensor]:
    persistent = set(module.state_dict().keys()) - {n for n, _ in module.named_parameters()}
    missing = sorted(persistent - set(state_dict))
    if missing:
        raise CheckpointError(f"the checkpoint's module state has no {', '.join(missing[:3])}")
    return {n: state_dict[n].clone() for n in persistent}


def _from_torch_optimizer(module: nn.Module, module_state: dict, optim_state: dict, scheduler: dict) -> PortableState:
    """From a whole module state dict and a torch AdamW state dict indexed in ``param_groups`` order."""
    names = param_names_in_optimizer_order(module)
    params = {n: module_state[n].float().clone() for n in names}
    state = optim_state["state"]
    moments = {key: {n: (state[i][key].float().clone() if i in state else torch.zeros_like(params[n]))
                     for i, n in enumerate(names)} for key in ADAM_KEYS}
    steps = {int(s["step"]) for s in state.values()} or {0}
    if len(steps) != 1:
        raise CheckpointError(f"the optimizer state holds different step counts {sorted(steps)}")
    return PortableState(params, _buffers(module, module_state), moments["exp_avg"], moments["exp_avg_sq"],
                         steps.pop(), scheduler)


def _read_whole(step_dir: Path, written: Layout, module: nn.Module) -> PortableState:
    if written.engine == "deepspeed":
        state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return _from_torch_optimizer(module, state["module"], state["optimizer"], state["lr_scheduler"])
    state = torch.load(step_dir / "engine_states.pt", map_location="cpu", weights_only=False)
    return _from_torch_optimizer(module, state["module"], state["optimizer"], state["scheduler"])


def _universal_tensor(path: Path) -> torch.Tensor:
    value = torch.load(path, map_location="cpu", weights_only=False)
    return (value["param"] if isinstance(value, dict) else value).detach()  # ZeRO 1/2 wrap it, ZeRO-3 does not


def _read_zero(step_dir: Path, module: nn.Module, scratch: Path) -> PortableState:
    """Through DeepSpeed's ``ds_to_universal`` (in this process, quietly: its progress bars would go to the log)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal
    out = scratch / "universal"
    args = argparse.Namespace(input_folder=str(step_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # the state Megatron adds; our engine does not
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception as e:
        tail = " ".join(said.getvalue().split())[-300:]
        raise CheckpointError(f"DeepSpeed's ds_to_universal could not convert {step_dir} ({type(e).__name__}: "
                              f"{str(e)[:200]}; its output: {tail})") from e
    zero = out / "zero"
    shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in module.named_parameters()}  # ZeRO-3 empties p
    tensors = {key: {n: _universal_tensor(zero / n / f"{key}.pt").float().reshape(shape).clone()
                     for n, shape in shapes.items()} for key in ("fp32", *ADAM_KEYS)}
    if (zero / next(iter(shapes)) / "step.pt").is_file():
        step = int(_universal_tensor(zero / next(iter(shapes)) / "step.pt"))
    else:  # ZeRO-3 keeps the step in the common optimizer state
        common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
        step = int(common["optimizer_state_dict"]["state"][0]["step"])
    model_states = sorted(step_dir.glob("*mp_rank_00_model_states.pt"))
    states = torch.load(model_states[0], map_location="cpu", weights_only=False)
    shutil.rmtree(out, ignore_errors=True)
    return PortableState(tensors["fp32"], _buffers(module, states["module"]), tensors["exp_avg"],
                         tensors["exp_avg_sq"], step, states["lr_scheduler"])


def read_portable(step_dir: Path, written: Layout, module: nn.Module, scratch: Path) -> PortableState:
    """The portable state of the checkpoint ``step_dir`` (its files ``written`` by that layout), for a model shaped
    like ``module`` (the caller has checked that the checkpoint's model has this shape)."""
    if written.whole:
        return _read_whole(step_dir, written, module)
    return _read_zero(step_dir, module, scratch)


def prepare(step_dir: Path, written: Layout, module: nn.Module, log: Callable = print) -> tuple[PortableState, Path]:
    """Collective: rank 0 converts the checkpoint into a scratch folder next to it, every rank memory-maps the
    result. Returns it and the scratch folder (remove it with :func:`release` once every rank has loaded)."""
    nonce = rdist.broadcast_object(f"{os.getpid()}-{time.time_ns()}" if rdist.rank() == 0 else None)
    scratch = step_dir.parent / f"{step_dir.name}.tmp-reshard-{nonce}"  # a staging name: a crash leaves no debris
    error = None
    if rdist.rank() == 0:
        t0 = time.perf_counter()
        try:
            scratch.mkdir()
            state = read_portable(step_dir, written, module, scratch)
            torch.save(vars(state), scratch / PORTABLE)
            log(f"resharding {step_dir.name} (written by {written}): converted in "
                f"{time.perf_counter() - t0:.2f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - every rank raises the same error below
            shutil.rmtree(scratch, ignore_errors=True)
            error = user_error_message(e) or f"{type(e).__name__}: {e}"
    error = rdist.broadcast_object(error)
    if error is not None:
        raise CheckpointError(f"resharding checkpoint {step_dir} failed: {error}")
    state = torch.load(scratch / PORTABLE, map_location="cpu", mmap=True, weights_only=True)
    return PortableState(**state), scratch


def release(scratch: Path) -> None:
    """Collective: remove the scratch folder once every rank has loaded the portable state."""
    rdist.barrier()
    if rdist.rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ loading


def load_weights(module: nn.Module, state: PortableState) -> None:
    """Weights and buffers into the bare model, before an engine wraps it."""
    with torch.no_grad():
        module.load_state_dict({**state.params, **state.buffers}, strict=True)
