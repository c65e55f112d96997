"""Process discovery and the default process group.

Rank discovery order: explicit arguments > torchrun/deepspeed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) > SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of the node list) >
OpenMPI / PMI environment > mpi4py (a real ``mpirun``) > a single process. Backend: nccl on CUDA, else gloo.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def slurm_master_addr(nodelist: Optional[str] = None) -> str:
    """First host of the SLURM node list (``scontrol show hostnames``), or 127.0.0.1 when there is none."""
    nodelist = nodelist or os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Simple fallback for "node[1-3],other" without scontrol: the first name, bracket range expanded.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head


def slurm_master_port(job_id: Optional[str] = None, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID", "0")
    return base + int(job_id) % span if job_id.isdigit() else 29500


def discover(rank: Optional[int] = None, world_size: Optional[int] = None, local_rank: Optional[int] = None) -> DistInfo:
    env = os.environ
    port = _env_int("MASTER_PORT")
    addr = env.get("MASTER_ADDR")
    if rank is not None and world_size is not None:
        return DistInfo(rank, world_size, local_rank or 0, addr or "127.0.0.1", port or 29500, "explicit")
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), _env_int("LOCAL_RANK") or 0,
                        addr or "127.0.0.1", port or 29500, "env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _env_int("SLURM_LOCALID") or 0,
                        addr or slurm_master_addr(), port or slurm_master_port(), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                        _env_int("OMPI_COMM_WORLD_LOCAL_RANK") or 0, addr or "127.0.0.1", port or 29500, "openmpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return DistInfo(int(env["PMI_RANK"]), int(env["PMI_SIZE"]), _env_int("MPI_LOCALRANKID", "PMI_LOCAL_RANK") or 0,
                        addr or "127.0.0.1", port or 29500, "pmi")
    mpi = _mpi4py_info()
    if mpi is not None:
        return mpi
    return DistInfo(0, 1, 0, addr or "127.0.0.1", port or 29500, "single")


def _mpi4py_info() -> Optional[DistInfo]:
    """Ranks from a real MPI launch, with the master address broadcast from rank 0."""
    if not any(k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_")) for k in os.environ):
        return None  # not started by mpirun: importing MPI would only initialise a singleton
    try:
        from mpi4py import MPI
    except Exception:  # mpi4py missing or no MPI library
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return None
    import socket
    addr = comm.bcast(os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname()), root=0)
    port = comm.bcast(_env_int("MASTER_PORT") or 29500, root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return DistInfo(comm.Get_rank(), comm.Get_size(), local, addr, port, "mpi4py")


def init(timeout_s: int = 300, backend: Optional[str] = None, info: Optional[DistInfo] = None) -> DistInfo:
    """Initialise the default process group (once) and return who we are."""
    info = info or discover()
    if info.world_size > 1 and not dist.is_initialized():
        os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                          MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return info


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ``group`` (the world by default); a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
