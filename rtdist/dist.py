"""Process discovery and the default process group.

Rank discovery order: explicit arguments > torchrun/deepspeed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) > SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of the node list) >
OpenMPI / PMI environment > mpi4py (a real ``mpirun``) > a single process.

Backend: one default group for everything, gloo for host tensors and, on a CUDA machine, NCCL for device tensors
(``"cpu:gloo,cuda:nccl"``): every collective picks the backend of its tensor's device, so a host flag (the stop
request, a rank's shard problems, object collectives) never meets NCCL, which has no CPU path, and no second group
has to be kept in step with the first. ``RTDIST_DIST_BACKEND`` overrides it (e.g. ``cpu:gloo,cuda:gloo`` for ranks
sharing one GPU, which NCCL refuses).
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .errors import LaunchError
from .slurm import hostnames, master_port


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
    """The first of ``names`` that is set, as an integer; a DiscoveryError naming the variable when it is not one."""
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise DiscoveryError(f"environment variable {n}={v!r} is not an integer: the launcher sets it to a "
                                     f"whole number; unset it or fix the job script") from None
    return None


def _env_port() -> Optional[int]:
    port = _env_int("MASTER_PORT")
    if port is not None and not 1 <= port <= 65535:
        raise DiscoveryError(f"environment variable MASTER_PORT={port} is not a port: it must be in 1..65535 (unset "
                             f"it for the default 29500)")
    return port


def slurm_master_addr(nodelist: Optional[str] = None) -> str:
    """First host of the SLURM node list (``scontrol show hostnames``), or 127.0.0.1 when there is none."""
    nodelist = nodelist or os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    return hostnames(nodelist)[0] if nodelist else "127.0.0.1"


def slurm_master_port(job_id: Optional[str] = None, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    return master_port(job_id or os.environ.get("SLURM_JOB_ID", "0"), base, span)


class DiscoveryError(LaunchError):
    """Launch variables that contradict each other (a rank outside the world, ...)."""


# The variables each source reads (rank, world size, local rank), for messages that name them.
_SOURCE_VARS = {"env": ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
                "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")}


def _checked(info: DistInfo) -> DistInfo:
    rank_var, world_var, local_var = _SOURCE_VARS.get(info.source, ("rank", "world size", "local rank"))
    if info.rank is None or info.world_size is None:
        raise DiscoveryError(f"{rank_var} and {world_var} must both be set to integers (from {info.source} "
                             f"variables), got {rank_var}={info.rank!r}, {world_var}={info.world_size!r}")
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise DiscoveryError(f"{rank_var}={info.rank} is outside a world of {world_var}={info.world_size} (ranks "
                             f"0..{info.world_size - 1}; from {info.source} variables): the launch environment is "
                             f"inconsistent")
    if info.local_rank < 0:
        raise DiscoveryError(f"{local_var}={info.local_rank} must be >= 0 (from {info.source} variables)")
    return info


def discover(rank: Optional[int] = None, world_size: Optional[int] = None, local_rank: Optional[int] = None) -> DistInfo:
    """Who am I, in the order explicit > torchrun/deepspeed env > SLURM step > OpenMPI/PMI env > mpi4py > single.

    SLURM variables count only inside an srun step (SLURM_STEP_ID set): a batch script that runs Python directly
    also sees SLURM_PROCID=0 and SLURM_NTASKS=N, and would otherwise wait forever for N - 1 peers. OpenMPI/PMI
    variables carry no master address; without MASTER_ADDR they go through mpi4py, whose rank 0 broadcasts its
    own address (so ``mpirun -n 2 python -m rtdist.train`` works across hosts), and fall back to 127.0.0.1 (one
    host) only when mpi4py is not available."""
    env = os.environ
    port = _env_port()
    addr = env.get("MASTER_ADDR")
    if rank is not None and world_size is not None:
        return _checked(DistInfo(rank, world_size, local_rank or 0, addr or "127.0.0.1", port or 29500, "explicit"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(DistInfo(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK") or 0,
                                 addr or "127.0.0.1", port or 29500, "env"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ntasks = _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
            return _checked(DistInfo(_env_int("SLURM_PROCID"), ntasks, _env_int("SLURM_LOCALID") or 0,
                                     addr or slurm_master_addr(), port or slurm_master_port(), "slurm"))
        if ntasks and ntasks > 1:
            sys.stderr.write(f"rtdist.dist: SLURM_NTASKS={ntasks} but this process was not started by srun (no "
                             f"SLURM_STEP_ID): not joining a SLURM world; start it with srun or launch/launch.py\n")
    mpi_env = None
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        mpi_env = DistInfo(_env_int("OMPI_COMM_WORLD_RANK"), _env_int("OMPI_COMM_WORLD_SIZE"),
                           _env_int("OMPI_COMM_WORLD_LOCAL_RANK") or 0, addr or "127.0.0.1", port or 29500, "openmpi")
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        mpi_env = DistInfo(_env_int("PMI_RANK"), _env_int("PMI_SIZE"),
                           _env_int("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID") or 0,
                           addr or "127.0.0.1", port or 29500, "pmi")
    if mpi_env is not None and (addr or mpi_env.world_size == 1):
        return _checked(mpi_env)
    mpi = _mpi4py_info()
    if mpi is not None:
        if mpi_env is not None and (mpi.rank, mpi.world_size) != (mpi_env.rank, mpi_env.world_size):
            mpi = None  # mpi4py is built for another MPI than the one that started us: trust the launcher's env
        else:
            return _checked(mpi)
    if mpi_env is not None:
        return _checked(mpi_env)
    return DistInfo(0, 1, 0, addr or "127.0.0.1", port or 29500, "single")


def unfilled_world(e: BaseException, info: DistInfo, timeout_s: float) -> Optional[str]:
    """The message for a rendezvous that timed out because fewer processes came than the world size says (rank 0's
    store counted them), else None: then the world size is what is wrong, not a peer that stopped."""
    import re
    m = re.search(r"(\d+)/(\d+) clients joined", str(e))
    if not m:
        return None
    var = _SOURCE_VARS.get(info.source, ("", "the world size", ""))[1]
    return (f"only {m.group(1)} of {m.group(2)} processes ({var}={info.world_size}) joined the rendezvous at "
            f"{info.master_addr}:{info.master_port} within train.dist_timeout_s ({timeout_s} s): start {info.world_size} "
            f"processes, or set {var} to the number started")


def _routable_address() -> str:
    """This host's address as other hosts see it: the hostname's address unless that is loopback (Debian maps the
    hostname to 127.0.1.1), else the source address of the default route."""
    import socket
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = "127.0.0.1"
    if not ip.startswith("127."):
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return ip


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
    local_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local, local_size = local_comm.Get_rank(), local_comm.Get_size()
    local_comm.Free()
    one_host = comm.allreduce(local_size, op=MPI.MIN) == comm.Get_size()
    if os.environ.get("MASTER_ADDR"):
        mine = os.environ["MASTER_ADDR"]
    else:
        mine = "127.0.0.1" if one_host else _routable_address()
    addr = comm.bcast(mine, root=0)
    port = comm.bcast(_env_port() or 29500, root=0)
    return DistInfo(comm.Get_rank(), comm.Get_size(), local, addr, port, "mpi4py")


_env_before: dict = {}


def _set_env(**values: str) -> None:
    """Set variables, remembering what was there so that :func:`shutdown` can put it back."""
    for k, v in values.items():
        _env_before.setdefault(k, os.environ.get(k))
        os.environ[k] = v


def default_backend(cuda: bool) -> str:
    """The default group's backend (see the module docstring), ``RTDIST_DIST_BACKEND`` when set."""
    override = os.environ.get("RTDIST_DIST_BACKEND", "").strip()
    if override:
        return override
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def local_device(info: DistInfo) -> torch.device:
    """This rank's device: its local rank's GPU among the visible ones (one per task when SLURM or the batch
    script gives each task its own ``CUDA_VISIBLE_DEVICES``), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank % torch.cuda.device_count())


def init(timeout_s: int = 300, backend: Optional[str] = None, info: Optional[DistInfo] = None,
         startup_timeout_s: Optional[int] = None) -> DistInfo:
    """Initialise the default process group (once) and return who we are.

    A single process gets a group too, on an in-memory store: no port is bound (two runs side by side never
    collide) and DeepSpeed, finding a group, never starts its own MPI discovery. The rendezvous (every rank
    reaching the store at MASTER_ADDR:MASTER_PORT) is bounded by ``timeout_s`` and names the address when it
    fails. Collectives are bounded by ``startup_timeout_s`` (default ``timeout_s``): the start-up's first
    collectives wait for the slowest rank's op builds, compile and checkpoint conversion; :func:`steady` then
    tightens it to ``timeout_s``. Groups DeepSpeed and the device mesh create later without a timeout of their own
    take torch's default, which is set here."""
    info = info or discover()
    if dist.is_initialized():
        return info
    timeout = datetime.timedelta(seconds=max(timeout_s, startup_timeout_s or 0))
    c10d.default_pg_timeout = timeout  # read by new_group() for groups created without a timeout
    # DeepSpeed reads the rank variables from the environment, whatever initialised the group.
    _set_env(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    if info.world_size == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return info
    _set_env(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    backend = backend or default_backend(torch.cuda.is_available())
    if torch.cuda.is_available():  # NCCL's communicators and the allocator's default device: this rank's GPU
        torch.cuda.set_device(local_device(info))
    store = rendezvous(info, timeout_s)
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    return info


def rendezvous(info: DistInfo, timeout_s: float):
    """The store every rank meets at (rank 0's, or torchrun's agent's), as ``init_process_group("env://")`` makes
    it, within ``timeout_s``; an address that does not resolve or a store that does not answer is one line."""
    import socket
    try:
        socket.getaddrinfo(info.master_addr, info.master_port)
    except OSError as e:
        raise LaunchError(f"rank {info.rank}: MASTER_ADDR {info.master_addr!r} (from {info.source}) does not resolve "
                          f"({e.strerror or e}): set it to rank 0's host name or address") from None
    try:
        store, _, _ = next(dist.rendezvous("env://", info.rank, info.world_size,
                                           timeout=datetime.timedelta(seconds=timeout_s)))
    except (RuntimeError, TimeoutError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        unfilled = unfilled_world(e, info, timeout_s)
        if unfilled:
            raise LaunchError(f"rank {info.rank}: {unfilled}") from None
        who = "the other ranks did not all arrive" if info.rank == 0 else "rank 0's store did not answer"
        raise LaunchError(f"rank {info.rank}: no rendezvous at {info.master_addr}:{info.master_port} within "
                          f"{timeout_s:g} s (train.dist_timeout_s): {who} ({str(e).splitlines()[0][:160]}); check "
                          f"that every rank started and that MASTER_ADDR/MASTER_PORT name rank 0's host") from None
    return store


def steady(timeout_s: float) -> None:
    """After the start-up: the default group's collectives are bounded by ``timeout_s`` again (the watchdog's
    phase deadlines bound every group's in any case)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s))
        except (AttributeError, RuntimeError, ValueError):  # a private API: the watchdog still bounds the steps
            pass


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


def broadcast_tensors(tensors, src: int = 0, group=None) -> None:
    """In place: every rank gets rank ``src``'s ``tensors`` (any dtypes, bool included, which gloo cannot send),
    in one collective through a flat fp32 copy; a no-op in a single process."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def shutdown() -> None:
    """Destroy the default group and undo :func:`init`'s environment variables."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in _env_before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _env_before.clear()
