"""Checkpoints in the DeepSpeed layout (``dir/global_step{N}/`` + ``dir/latest``), written so that a crash at any
moment leaves the previous checkpoint loadable: a step directory counts only once its ``complete`` marker exists,
and ``latest`` is replaced atomically after that. Per-rank state (data-loader position, RNG states) goes next to
the engine's files as ``rtdist_rank{r}.pt``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import dist as rdist

MARKER = "complete"
_STEP_RE = re.compile(r"^global_step(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fault_point(where: str, step: int) -> None:
    """Fault injection for the crash tests: RTDIST_FAULT="save:STEP[:RANK]" or "step:STEP[:RANK]" makes this
    process die abruptly (os._exit, like a SIGKILL: no cleanup, no atexit) at that point."""
    spec = os.environ.get("RTDIST_FAULT")
    if not spec:
        return
    kind, at, *who = spec.split(":")
    if kind == where and int(at) == step and (not who or int(who[0]) == rdist.rank()):
        sys.stderr.write(f"RTDIST_FAULT: rank {rdist.rank()} dies at {where} {step}\n")
        sys.stderr.flush()
        os._exit(17)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(step_dir: Path) -> bool:
    return (step_dir / MARKER).is_file()


def complete_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and is_complete(p):
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve_resume(ckpt_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``None``/"none": no resume. "auto": the step ``latest`` names if complete, else the newest complete step
    (None when there is none). A path or a step directory name: that checkpoint, which must be complete."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if latest.is_file():
            cand = ckpt_dir / latest.read_text().strip()
            if is_complete(cand):
                return cand
        steps = complete_steps(ckpt_dir)
        return ckpt_dir / f"global_step{steps[-1]}" if steps else None
    cand = Path(resume)
    if not cand.is_absolute() and not cand.exists():
        cand = ckpt_dir / resume
    if not is_complete(cand):
        raise FileNotFoundError(f"--resume {resume}: {cand} is not a complete checkpoint (no '{MARKER}' marker); "
                                f"complete ones in {ckpt_dir}: {complete_steps(ckpt_dir) or 'none'}")
    return cand


def save(engine, ckpt_dir: Path, step: int, rank_state: dict, meta: dict) -> Path:
    """Collective: every rank calls it. Returns the step directory."""
    step_dir = ckpt_dir / f"global_step{step}"
    if rdist.rank() == 0:
        if step_dir.exists():  # a leftover from a crash mid-save: never looked complete, start it clean
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
    rdist.barrier()
    engine.save(step_dir)
    atomic_torch_save(rank_state, step_dir / f"rtdist_rank{rdist.rank()}.pt")
    fault_point("save", step)  # the crash tests kill a rank here: files written, no marker yet
    rdist.barrier()
    if rdist.rank() == 0:
        atomic_write_text(step_dir / MARKER, json.dumps(meta, indent=1))
        atomic_write_text(ckpt_dir / "latest", step_dir.name)
    rdist.barrier()
    return step_dir


def load_rank_state(step_dir: Path) -> dict:
    path = step_dir / f"rtdist_rank{rdist.rank()}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this checkpoint was written by fewer ranks than the "
                                f"{rdist.world_size()} now running")
    return torch.load(path, map_location="cpu", weights_only=False)


def export_safetensors(state: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """One fp32 safetensors file for inference (rank 0)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
