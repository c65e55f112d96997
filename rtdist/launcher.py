"""Start a distributed job on this machine, a hostfile's hosts, a SLURM allocation or MPI, after checking the request.

    python -m rtdist.launcher [DeepSpeed runner flags] -- python -m rtdist.train --config configs/tiny.yaml ...

This module plans (which hosts, how many processes, which address and port) and checks what users get wrong:
hostfiles, ``--include/--exclude``, SLURM variables, env files, a port in use. The processes are started by the tools
that do it: torchrun (this machine, or one node's share), DeepSpeed's runner (a hostfile), srun (SLURM) or mpirun.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import slurm
from .errors import ArgumentParser, LaunchError, bounded, cli_main

DEFAULT_PORT = 29500
MAX_PER_CORE = 4  # processes per CPU core on a machine without GPUs: more is a typo, not a plan
DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "NODE_RANK")
Hosts = Dict[str, List[int]]  # host -> its slot indices (GPU ids), hosts in rank order


# ----------------------------------------------------------------------------------------------- hostfiles
def parse_hostfile(text: str, source: str = "hostfile") -> Dict[str, int]:
    """``host slots=N`` lines (blank lines and ``#`` comments allowed) -> {host: N}, in file order."""
    pool: Dict[str, int] = {}
    first_line: Dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([^\s=#]+)\s+slots\s*=\s*(\S+)$", line)
        host, slots = m.groups() if m else ("", "")
        if not m:
            fix = _hostfile_hint(line.split())
        elif not slots.isdigit():
            fix = f"slots must be a whole number, got {slots!r}"
        elif int(slots) == 0:
            fix = f"host {host} has no slots (slots=0): give it its GPU/CPU-process count or remove the line"
        elif host in pool:
            fix = f"duplicate host {host!r} (first on line {first_line[host]}); list each host once with its slots"
        else:
            pool[host], first_line[host] = int(slots), no
            continue
        raise LaunchError(f"bad hostfile line ({source}:{no}: {raw.strip()!r}): {fix}")
    if not pool:
        raise LaunchError(f"hostfile has no hosts ({source}): write lines like 'worker-1 slots=8'")
    return pool


def _hostfile_hint(parts: List[str]) -> str:
    key = parts[1].split("=", 1)[0] if len(parts) > 1 else ""
    if len(parts) == 1 and ":" in parts[0]:
        return "MPICH machinefile syntax; write '{} slots={}'".format(*parts[0].rsplit(":", 1))
    if len(parts) == 1:
        return f"missing slots: write '{parts[0]} slots=N' (N = GPUs, or processes on a CPU node)"
    if "=" in parts[1] and key != "slots":
        mean = " (did you mean 'slots'?)" if difflib.get_close_matches(key, ["slots", "max_slots"], n=1) else ""
        return f"unknown key {key!r}{mean}; expected '{parts[0]} slots=N'"
    return f"write '{parts[0]} slots={parts[1]}'" if parts[1].isdigit() else "expected '<host> slots=N'"


def read_hostfile(path: str) -> Dict[str, int]:
    if not Path(path).is_file():
        raise LaunchError(f"hostfile {path} does not exist (-H/--hostfile): check the path")
    return parse_hostfile(Path(path).read_text(), str(path))


def format_hostfile(hosts: Mapping[str, object]) -> str:
    return "".join(f"{h} slots={len(s) if isinstance(s, list) else s}\n" for h, s in hosts.items())


def select_resources(pool: Mapping[str, int], include: str = "", exclude: str = "", num_nodes: int = -1,
                     num_gpus: int = -1, source: str = "the hostfile") -> Hosts:
    """DeepSpeed's resource selection: --include/--exclude ``host[:slot[,slot]][@host...]`` (checked here, applied
    by DeepSpeed's own filter), or the first --num_nodes hosts with --num_gpus slots each."""
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    if include and exclude:
        raise LaunchError("--include and --exclude given together (command line): they are mutually exclusive")
    if spec and (num_nodes > 0 or num_gpus > 0):
        raise LaunchError("--num_nodes/--num_gpus given with --include/--exclude (command line): as in DeepSpeed, "
                          "use one or the other")
    for host, sep, slots in (part.partition(":") for part in spec.split("@") if spec):
        bad = [s for s in slots.split(",") if not s.strip().isdigit()] if sep else []
        if bad:
            raise LaunchError(f"slot {bad[0]!r} of {host} is not a whole number ({flag} {spec!r}): grammar is "
                              f"host[:slot[,slot]][@host...]")
        if host not in pool:
            close = difflib.get_close_matches(host, list(pool), n=1, cutoff=0.5)
            raise LaunchError(f"host {host!r} is not in {source} ({flag}; hosts: {', '.join(pool)}): "
                              + (f"did you mean {close[0]!r}?" if close else "use one of those"))
        missing = [int(s) for s in slots.split(",") if sep and int(s) >= pool[host]]
        if missing:
            raise LaunchError(f"no such slot ({flag} {spec!r}): {host} has slots 0-{pool[host] - 1}, not {missing}")
    active = {h: list(range(n)) for h, n in pool.items()}
    if spec:
        from deepspeed.launcher.runner import parse_inclusion_exclusion
        active = dict(parse_inclusion_exclusion(dict(pool), include, exclude))
    if num_nodes > len(active):
        raise LaunchError(f"--num_nodes {num_nodes} is more hosts than there are ({source} has only {len(active)} "
                          f"host(s)): pass --num_nodes {len(active)} or fewer")
    active = dict(list(active.items())[:num_nodes]) if num_nodes > 0 else active
    for host in active if num_gpus > 0 else ():
        if num_gpus > pool[host]:
            raise LaunchError(f"--num_gpus {num_gpus} is more than {host} has ({source}: {pool[host]} slot(s)): "
                              f"pass --num_gpus {pool[host]} or fewer")
        active[host] = list(range(num_gpus))
    if not active:
        raise LaunchError(f"no hosts left to run on ({source} after --include/--exclude): keep at least one host")
    return active


# ----------------------------------------------------------------------------------------- environment files
def parse_env_file(text: str, source: str = ".deepspeed_env") -> Dict[str, str]:
    """``KEY=VALUE`` lines as a shell would read them, for the common cases: blank lines, ``#`` comments (whole
    line, or after whitespace in an unquoted value), an optional ``export``, spaces around ``=``, single quotes
    (literal) and double quotes (with backslash escapes). A line that is none of these is an error naming it."""
    env: Dict[str, str] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"^export\s", "", raw.strip()).strip()
        key, eq, value = (s.strip() for s in line.partition("="))
        where = f"bad environment file line ({source}:{no}: {raw.strip()!r})"
        if not line or line.startswith("#"):
            continue
        if not eq:
            raise LaunchError(f"{where}: expected KEY=VALUE")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise LaunchError(f"{where}: {key!r} is not a valid variable name")
        if not value or value[0] not in "'\"":
            env[key] = re.split(r"\s+#", value, 1)[0].strip()
            continue
        q, out, i = value[0], [], 1
        while i < len(value) and value[i] != q:
            if value[i] == "\\" and q == '"' and value[i + 1:i + 2] in ('"', "\\", "$", "`"):
                i += 1  # an escaped character
            out.append(value[i])
            i += 1
        rest = value[i + 1:].strip()
        if i == len(value) or (rest and not rest.startswith("#")):
            raise LaunchError(f"{where}: " + (f"missing closing {q}" if i == len(value) else
                                             f"unexpected text after the closing quote: {rest!r}; quote it all"))
        env[key] = "".join(out)
    return env


def env_file_paths(extra: Sequence[str] = ()) -> List[Path]:
    """DeepSpeed's lookup (``~/.deepspeed_env``, then ``./.deepspeed_env``, name from DS_ENV_FILE) plus --env-file."""
    for p in extra:
        if not Path(p).is_file():
            raise LaunchError(f"environment file {p} does not exist (--env-file): check the path")
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    found = [p for p in (Path.home() / name, Path.cwd() / name, *map(Path, extra)) if p.is_file()]
    return [p for i, p in enumerate(found) if p.resolve() not in {q.resolve() for q in found[:i]}]


def load_env_files(paths: Sequence[Path]) -> Dict[str, str]:
    return {k: v for p in paths for k, v in parse_env_file(Path(p).read_text(), str(p)).items()}


# ---------------------------------------------------------------------------------------------------- plans
@dataclass
class Plan:
    """Who runs where: the result of resolving flags, hostfile or allocation. ``world = sum(slots)``."""
    launcher: str
    hosts: Hosts
    master_addr: str
    master_port: int
    note: str = ""  # where the processes per node come from

    @property
    def world_size(self) -> int:
        return sum(len(s) for s in self.hosts.values())

    @property
    def per_node(self) -> int:
        counts = {len(s) for s in self.hosts.values()}
        if len(counts) != 1:
            raise LaunchError(f"uneven processes per node ({', '.join(f'{h}: {len(s)}' for h, s in self.hosts.items())}"
                              f"): srun and mpirun start the same number on every node; select equal slot counts")
        return counts.pop()

    def describe(self) -> str:
        per = "/".join(map(str, sorted({len(s) for s in self.hosts.values()})))
        return (f"{self.launcher}: {len(self.hosts)} node(s) [{','.join(self.hosts)}] x {per} = world "
                f"{self.world_size}, MASTER_ADDR={self.master_addr} MASTER_PORT={self.master_port}"
                + (f" ({self.note})" if self.note else ""))


def local_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs this node gives the job: SLURM's count, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")])
    import torch
    return torch.cuda.device_count()


def in_slurm_allocation(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID") and (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")))


def slurm_plan(env: Mapping[str, str], num_nodes: int = -1, num_gpus: int = -1, include: str = "",
               exclude: str = "", master_addr: Optional[str] = None, master_port: Optional[int] = None,
               gpus: Optional[int] = None, per_node_launch: bool = False) -> Plan:
    """Resolve an allocation into hosts x tasks, refusing SLURM variables that contradict each other or the
    requested world size. ``per_node_launch``: the launcher itself runs once per node inside an srun step (the
    step's tasks are launchers, not workers), so the task counts say nothing about the workers per node."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nnodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if per_node_launch and env.get("SLURM_STEP_NODELIST"):  # the step may use a part of the allocation
        nodelist, nnodes = env["SLURM_STEP_NODELIST"], env.get("SLURM_STEP_NUM_NODES")
    if not env.get("SLURM_JOB_ID") or not nodelist:
        raise LaunchError("--launcher slurm needs a SLURM allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST are not set): "
                          "submit launch/slurm.sbatch with sbatch, or run inside salloc")
    hosts = slurm.hostnames(nodelist, path=env.get("PATH"))
    if len(set(hosts)) != len(hosts) or (nnodes and int(nnodes) != len(hosts)):
        what = ("the SLURM node list names a host more than once" if len(set(hosts)) != len(hosts) else
                f"SLURM_NNODES={nnodes} but the node list has {len(hosts)} host(s)")
        raise LaunchError(f"{what} (SLURM_JOB_NODELIST={nodelist}: {', '.join(hosts)}): the environment is from "
                          f"another job or was edited")
    # one launcher per node: the step's tasks are the launchers, so its task counts say nothing about the workers
    ntasks = int(env["SLURM_NTASKS"]) if env.get("SLURM_NTASKS", "").isdigit() and not per_node_launch else None
    per_host = [] if per_node_launch else slurm.counts(env.get("SLURM_TASKS_PER_NODE"))
    gpus = local_gpu_count(env) if gpus is None else gpus
    job_cpus, node_cpus = ((slurm.counts(env.get(k)) or [0])[0]
                           for k in ("SLURM_JOB_CPUS_PER_NODE", "SLURM_CPUS_ON_NODE"))
    if num_gpus > 0 or gpus > 0:
        per, why = (num_gpus, "--num_gpus") if num_gpus > 0 else (gpus, f"{gpus} GPU(s) per node")
    elif per_node_launch:  # the launcher's task stands for the whole node: every CPU the job has there
        per = job_cpus or node_cpus or 1
        why = f"{per} CPU(s) of the job per node"
    elif env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        per, why = int(env["SLURM_NTASKS_PER_NODE"]), "--ntasks-per-node"
    elif ntasks is not None:
        if ntasks % len(hosts):
            raise LaunchError(f"SLURM_NTASKS={ntasks} does not divide over {len(hosts)} nodes (the allocation): "
                              f"submit with --ntasks-per-node so every node runs the same number of processes")
        per, why = ntasks // len(hosts), "SLURM_NTASKS / nodes"
    elif node_cpus or job_cpus:
        cpus, cpus_per_task = node_cpus or job_cpus, int(env.get("SLURM_CPUS_PER_TASK") or 1)
        per, why = cpus // cpus_per_task, f"{cpus} CPU(s) per node / {cpus_per_task} per task"
    else:
        raise LaunchError("no GPUs and no task or CPU count on this node (SLURM_NTASKS_PER_NODE, SLURM_CPUS_ON_NODE): "
                          "submit with --ntasks-per-node=N or pass --num_gpus N")
    if per <= 0:
        raise LaunchError(f"no GPUs or CPU slots for a process on the node ({why} gives {per}): request GPUs "
                          f"(--gpus-per-node) or tasks (--ntasks-per-node)")
    if 0 < gpus < per:
        raise LaunchError(f"{per} processes per node but only {gpus} GPU(s) per node ({why}): pass --num_gpus {gpus}")
    active = select_resources({h: per for h in hosts}, include, exclude, num_nodes, source="the SLURM allocation")
    plan = Plan("slurm", active, master_addr or next(iter(active)),
                master_port or slurm.master_port(env.get("SLURM_JOB_ID")), f"{per} per node from {why}")
    everywhere = list(active) == hosts
    if ntasks is not None and (plan.world_size > ntasks or everywhere and plan.world_size != ntasks):
        raise LaunchError(f"SLURM_NTASKS={ntasks} but the launch asks for {plan.world_size} processes ({len(active)} "
                          f"node(s) x {per} from {why}; SLURM_TASKS_PER_NODE={env.get('SLURM_TASKS_PER_NODE', '?')}):"
                          f" submit with --ntasks-per-node={per}, or pass --num_gpus {ntasks // len(hosts) or 1}")
    if len(per_host) == len(hosts) and everywhere and len(set(per_host)) > 1:
        raise LaunchError(f"uneven tasks per node (SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']}): submit "
                          f"with --ntasks-per-node so every node runs the same number of processes")
    return plan


def plan_from_args(args, env: Mapping[str, str], per_node_launch: bool = False) -> Plan:
    hostfile = args.hostfile or (DEFAULT_HOSTFILE if os.path.isfile(DEFAULT_HOSTFILE) else None)
    launcher = args.launcher
    if launcher == "auto":
        launcher = "slurm" if in_slurm_allocation(env) and not args.hostfile else "pdsh" if hostfile else "local"
    if launcher == "slurm" or (launcher in ("openmpi", "mpich") and not hostfile and in_slurm_allocation(env)):
        plan = slurm_plan(env, args.num_nodes, args.num_gpus, args.include, args.exclude, args.master_addr,
                          args.master_port, per_node_launch=per_node_launch)
        plan.launcher = launcher
        return plan
    gpus = 0 if hostfile else local_gpu_count(env)
    if hostfile:
        active = select_resources(read_hostfile(hostfile), args.include, args.exclude, args.num_nodes,
                                  args.num_gpus, source=f"hostfile {hostfile}")
    elif args.include or args.exclude:
        active = select_resources({"localhost": max(args.num_gpus, gpus, 1)}, args.include, args.exclude,
                                  source="this machine (localhost)")
    elif args.num_nodes > 1:
        raise LaunchError(f"--num_nodes {args.num_nodes} needs a hostfile or a SLURM allocation (neither is given): "
                          f"pass -H hostfile, or run inside salloc/sbatch")
    elif 0 < gpus < args.num_gpus:
        raise LaunchError(f"--num_gpus {args.num_gpus} but this machine has {gpus} GPU(s) (CUDA_VISIBLE_DEVICES/torch):"
                          f" pass --num_gpus {gpus} or fewer")
    elif not gpus and args.num_gpus > MAX_PER_CORE * (os.cpu_count() or 1):
        raise LaunchError(f"--num_gpus {args.num_gpus} would start {args.num_gpus} processes on this machine's "
                          f"{os.cpu_count()} CPU cores and no GPU: pass at most {MAX_PER_CORE * (os.cpu_count() or 1)} "
                          f"({MAX_PER_CORE} per core), or run on GPU nodes")
    else:
        active = {"localhost": list(range(args.num_gpus if args.num_gpus > 0 else gpus or 1))}
    first = next(iter(active))
    return Plan(launcher, active, args.master_addr or ("127.0.0.1" if is_local_host(first) else first),
                args.master_port or DEFAULT_PORT)


def checked(check: Callable, *a, dry_run: bool = False) -> None:
    """Run a check of what the launch needs; under --dry-run its complaint is a warning and the plan still prints."""
    try:
        check(*a)
    except LaunchError as e:
        if not dry_run:
            raise
        _log(f"warning: {e}")


def check_master_addr(addr: str) -> None:
    """The rendezvous host must resolve here: torchrun would retry an unknown name until its own timeout."""
    try:
        socket.getaddrinfo(addr, None)
    except OSError as e:
        raise LaunchError(f"--master_addr / MASTER_ADDR {addr!r} does not resolve ({e.strerror or e}): pass rank 0's "
                          f"host name or address") from None


def mpi_flavour(mpirun: str) -> Optional[str]:
    """'openmpi' or 'mpich' from ``mpirun --version`` (None when it says neither)."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).lower()
    return "openmpi" if "open mpi" in text or "open-mpi" in text else "mpich" if ("hydra" in text or "mpich" in text
                                                                                 or "intel(r) mpi" in text) else None


def check_mpi_flavour(mpirun: str, flavour: str) -> None:
    found = mpi_flavour(mpirun)
    if found is not None and found != flavour:  # each takes the other's environment flags as a program to run
        raise LaunchError(f"--launcher {flavour}, but {mpirun} is {'Open MPI' if found == 'openmpi' else 'MPICH'}: "
                          f"pass --launcher {found}")


def this_node(plan: Plan, args, env: Mapping[str, str], per_node: bool) -> int:
    """Which of the plan's hosts this launcher starts: its SLURM node, --node_rank with --no_ssh, else the only one."""
    hosts = list(plan.hosts)
    me = env.get("SLURMD_NODENAME") or hosts[int(env.get("SLURM_NODEID", 0))] if per_node else None
    if per_node and me not in hosts:
        raise LaunchError(f"this node ({me}) is not among the selected hosts ({', '.join(hosts)}): start the "
                          f"per-node launchers on those nodes only (srun --nodelist=...)")
    if not per_node and args.no_ssh and not 0 <= args.node_rank < len(hosts):
        raise LaunchError(f"--no_ssh needs this node's --node_rank (got {args.node_rank}): pass its line in the "
                          f"hostfile, 0 to {len(hosts) - 1}")
    if not per_node and not args.no_ssh and len(hosts) > 1:
        raise LaunchError(f"--launcher local starts processes on this machine only ({len(hosts)} hosts selected): "
                          f"run it on each host with --no_ssh --node_rank R, or leave out --launcher local")
    return hosts.index(me) if per_node else args.node_rank if args.no_ssh else 0


def is_local_host(host: str) -> bool:
    return host.startswith("127.") or host in {"localhost", "::1", socket.gethostname(), socket.getfqdn(),
                                               socket.gethostname().split(".")[0], os.environ.get("SLURMD_NODENAME")}


def check_port_free(port: int) -> None:
    """Raise a LaunchError when something on this machine already listens on ``port``."""
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT {port} is not a valid TCP port (--master_port): pass one in 1-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise LaunchError(f"MASTER_PORT {port} is already in use ({socket.gethostname()}: {e.strerror}): another "
                              f"job or a leftover process holds it; pass --master_port with a free port") from None


# --------------------------------------------------------------------------------------------- commands
def flight_recorder_size_key() -> str:
    """The flight recorder's buffer-size variable in the installed torch: ``TORCH_FR_BUFFER_SIZE`` from 2.11 (the
    older name then prints a deprecation warning on every rank), ``TORCH_NCCL_TRACE_BUFFER_SIZE`` before."""
    import torch
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "TORCH_FR_BUFFER_SIZE" if (major, minor) >= (2, 11) else "TORCH_NCCL_TRACE_BUFFER_SIZE"


def nccl_env(run_dir=None) -> dict:
    """The NCCL error-handling settings users of torchrun expect, for whoever starts the ranks to apply where the
    user set nothing: a failed or timed-out collective aborts the communicator and ends the process (rather than
    leaving it to hang), and on a timeout each rank dumps its flight recorder (the last collectives it ran) into
    the run directory. Read by NCCL only; harmless on the CPU."""
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
           flight_recorder_size_key(): "2000"}
    if run_dir is not None:
        env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = os.path.join(os.path.abspath(run_dir), "nccl_trace_rank_")
    return env


def user_command(cmd: Sequence[str], module: bool = False, no_python: bool = False) -> List[str]:
    """The per-process command: what follows ``--`` (a bare ``python``/``python3`` becomes this interpreter);
    DeepSpeed-style ``--module`` / a ``.py`` script get the interpreter in front."""
    if not cmd:
        raise LaunchError("no command to launch (nothing after '--'): e.g. -- python -m rtdist.train --config ...")
    if module or (not no_python and cmd[0].endswith(".py")):
        return [sys.executable, "-u", *(["-m"] if module else []), *cmd]
    return [sys.executable, *cmd[1:]] if cmd[0] in ("python", "python3") else list(cmd)


def srun_command(plan: Plan, cmd: Sequence[str], launcher_args: str = "") -> List[str]:
    return ["srun", f"--nodes={len(plan.hosts)}", f"--ntasks={plan.world_size}", f"--ntasks-per-node={plan.per_node}",
            f"--nodelist={','.join(plan.hosts)}", "--kill-on-bad-exit=1", "--export=ALL",
            *shlex.split(launcher_args), *cmd]


def mpirun_command(flavour: str, plan: Plan, cmd: Sequence[str], env_vars: Mapping[str, str],
                   launcher_args: str = "", machinefile: str = "machinefile", dry_run: bool = False) -> List[str]:
    """``mpirun`` over the plan's hosts; MPICH reads them from ``machinefile`` (``host:N`` lines)."""
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if not mpirun:
        raise LaunchError(f"mpirun is not on PATH (--launcher {flavour}): pip install mpi4py mpich gives one")
    checked(check_mpi_flavour, mpirun, flavour, dry_run=dry_run)
    out, remote = [mpirun, "-n", str(plan.world_size)], not all(is_local_host(h) for h in plan.hosts)
    if flavour == "openmpi":
        out += ["-H", ",".join(f"{h}:{len(s)}" for h, s in plan.hosts.items())] if remote else []
        out += [a for k, v in env_vars.items() for a in ("-x", f"{k}={v}")]
    else:
        out += ["-f", machinefile] if remote else []
        out += [a for k, v in env_vars.items() for a in ("-genv", k, v)]
    return out + shlex.split(launcher_args) + list(cmd)


def torchrun_command(plan: Plan, node_rank: int, cmd: Sequence[str]) -> List[str]:
    """torchrun for node ``node_rank`` of the plan: its slots as local processes, global ranks in host order."""
    # torchrun leaves SIGTERM/SIGINT to this launcher (run_torchrun): it would stop the workers itself and SIGKILL
    # them 30 s later, whether or not their checkpoint is written
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(plan.hosts)), "--node_rank",
            str(node_rank), "--nproc_per_node", str(len(list(plan.hosts.values())[node_rank])), "--master_addr",
            plan.master_addr, "--master_port", str(plan.master_port), "--signals_to_handle", "SIGHUP,SIGQUIT",
            "--no-python", *cmd]


def check_pdsh(no_ssh: bool) -> None:
    if not shutil.which("pdsh") and not no_ssh:
        raise LaunchError("a hostfile with other hosts needs pdsh (not on PATH): apt-get install pdsh and set up "
                          "passwordless ssh; inside SLURM use --launcher slurm, or use --launcher openmpi/mpich")


def check_srun(env) -> None:
    if not shutil.which("srun", path=env.get("PATH")):
        raise LaunchError("srun is not on PATH (this node): load the SLURM module or fix PATH")


def deepspeed_command(args, plan: Plan, cmd: List[str], hostfile: Path, dry_run: bool = False) -> List[str]:
    """DeepSpeed's runner over a checked hostfile (rewritten in canonical form to ``hostfile``)."""
    local_only = all(is_local_host(h) for h in plan.hosts)
    if local_only and len(plan.hosts) > 1:
        raise LaunchError(f"the hostfile names this machine more than once ({', '.join(plan.hosts)}): list it once")
    if not local_only:
        checked(check_pdsh, args.no_ssh, dry_run=dry_run)
    hostfile.write_text(format_hostfile(read_hostfile(args.hostfile or DEFAULT_HOSTFILE)))
    ds = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port",
          str(plan.master_port)]
    if local_only:  # the runner then starts deepspeed.launcher.launch here, without ssh
        ds += ["--no_ssh_check", "--master_addr", args.master_addr or "127.0.0.1"]
    for flag in ["include", "exclude", "num_nodes", "num_gpus", "node_rank", "ssh_port", "launcher_args",
                 "no_local_rank", "no_ssh", "force_multi"] + ([] if local_only else ["master_addr", "no_ssh_check"]):
        value = getattr(args, flag)  # the runner's own flags, passed on as given
        if value not in ("", -1, None, False):
            ds += [f"--{flag}"] + ([] if value is True else [str(value)])
    # the runner puts its interpreter, and --local_rank, after the script: give it the script or module alone
    rest = cmd[2:] if cmd[1:2] == ["-u"] else cmd[1:]
    if cmd[0] != sys.executable or not rest or not (rest[0] == "-m" or rest[0].endswith(".py")):
        return ds + ["--no_python", *cmd]
    return ds + (["--module", *rest[1:]] if rest[0] == "-m" else rest)


# ---------------------------------------------------------------------------------------------- running
def _to_children(signum, frame) -> int:
    """Pass a signal on to this process's children (the workers torchrun started here); returns how many got it."""
    import psutil  # a DeepSpeed dependency
    sent = 0
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
            sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


class _StopForwarder:
    """SIGTERM/SIGINT to the launcher: the first (and its copies: a signal to the process group reaches the workers
    and this process at once) goes on to the workers, which checkpoint at their next step boundary and exit 0, so
    torchrun ends as a success; a later one is an impatient user's, and torchrun's own stop takes over (SIGTERM to
    the workers, SIGKILL after its shutdown timeout)."""

    def __init__(self, window_s: float = 5.0):
        self.first, self.window_s = None, window_s

    def __call__(self, signum, frame) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        now = time.monotonic()
        if self.first is not None and now > self.first + self.window_s:
            raise SignalException(f"Process {os.getpid()} got signal: {signum} (a second time)", sigval=signum)
        if not _to_children(signum, frame):  # no worker yet (rendezvous): nothing to save, stop now
            raise SignalException(f"Process {os.getpid()} got signal: {signum} before the workers started",
                                  sigval=signum)
        if self.first is None:
            self.first = now
            _log(f"{signal.Signals(signum).name}: passed on to the workers, which save a checkpoint at their next "
                 f"step boundary and exit; send it again to stop them at once")


def run_torchrun(argv: List[str], env: Mapping[str, str]) -> int:
    """torchrun's main in this process, so that the failed rank's exit status comes back (torchrun's command exits
    1 whatever failed) and the stop signals reach the workers as a request to checkpoint: torchrun stops them all
    when one fails, but SIGUSR1 (SLURM's 'checkpoint and stop' warning) would end it and orphan them, and on
    SIGTERM/SIGINT it would kill them 30 s later whatever they were doing (:class:`_StopForwarder`)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    saved_env = dict(os.environ)
    forward = _StopForwarder()
    saved = {s: signal.signal(s, h) for s, h in ((signal.SIGUSR1, _to_children), (signal.SIGTERM, forward),
                                                 (signal.SIGINT, forward))}
    os.environ.clear()
    os.environ.update(env)  # the workers inherit the agent's environment
    try:
        torchrun.main(argv)
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        _log(f"rank {rank} failed with exit status {failure.exitcode}; torchrun stopped the others")
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as e:
        return 128 + e.sigval
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in saved.items():
            signal.signal(s, h)


def run_one(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run one launcher process (srun, mpirun, DeepSpeed's runner), passing SIGUSR1/SIGTERM/SIGINT on to it."""
    p = subprocess.Popen(list(cmd), env=dict(env))
    old = {s: signal.signal(s, lambda signum, frame: p.poll() is None and p.send_signal(signum))
           for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        rc = p.wait()
        return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention, not a negative status
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -------------------------------------------------------------------------------------------- command line
def _or_default(low: int, high: int, default: str):
    """An argparse type: an integer in [low, high], or -1 (the flag's default: ``default``)."""
    parse = bounded(int, low, high)

    def f(text: str) -> int:
        if text.strip() == "-1":
            return -1
        try:
            return parse(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or -1: {default})") from None
    return f


PORT = bounded(int, 1, 65535)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="launch.py", description="Start a distributed job on one node, a hostfile, SLURM or MPI.",
                       epilog="Example: --num_gpus 2 -- python -m rtdist.train --config configs/tiny.yaml")
    p.add_argument("-H", "--hostfile", help="'host slots=N' lines (default: /job/hostfile if present)")
    p.add_argument("-i", "--include", default="", help="hosts/slots to use: host[:slot[,slot]][@host...]")
    p.add_argument("-e", "--exclude", default="", help="hosts/slots to leave out, same grammar as --include")
    p.add_argument("--num_nodes", type=_or_default(1, 100_000, "every host"), default=-1,
                   help="use the first N hosts")
    p.add_argument("--num_gpus", "--num_accelerators", type=_or_default(1, 1024, "one per GPU"), default=-1,
                   help="processes per node (default: one per GPU; on CPU nodes the allocation's slots, or 1)")
    p.add_argument("--master_addr", help="rank 0's address (default: the first host)")
    p.add_argument("--master_port", type=PORT, help=f"default {DEFAULT_PORT}; under SLURM derived from the job id")
    p.add_argument("--node_rank", type=_or_default(0, 100_000, "none"), default=-1,
                   help="with --no_ssh: this node's line in the hostfile")
    p.add_argument("--launcher", default="auto", type=str.lower,
                   choices=("auto", "local", "slurm", "pdsh", "openmpi", "mpich"),
                   help="auto: SLURM allocation > hostfile (pdsh) > this machine (local)")
    p.add_argument("--launcher_args", default="", help="extra arguments for srun / mpirun / pdsh")
    p.add_argument("--module", action="store_true", help="the command is a Python module (python -m)")
    p.add_argument("--no_python", action="store_true", help="run the command as is")
    p.add_argument("--no_ssh", action="store_true", help="start only this node's processes (with --node_rank)")
    for flag in ("--no_local_rank", "--no_ssh_check", "--force_multi"):
        p.add_argument(flag, action="store_true", help="passed to DeepSpeed's runner")
    p.add_argument("--ssh_port", type=PORT, help="passed to DeepSpeed's runner")
    p.add_argument("--env-file", action="append", default=[], help="more KEY=VALUE files for every process")
    p.add_argument("--write-hostfile", metavar="PATH", help="write the hostfile (e.g. of a SLURM allocation), exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after '--' (or the first word that is not a flag)")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Launcher flags and the command: after '--', or DeepSpeed-style from the first word that is not a flag."""
    cmd = build_parser().parse_args(argv).command
    return list(argv[:len(argv) - len(cmd)]), cmd[1:] if cmd[:1] == ["--"] else cmd


def _log(msg: str) -> None:
    print(f"[rtdist.launcher] {msg}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """The launcher command: a user's mistake is one ``error:`` line on stderr and exit status 2."""
    return cli_main(lambda a: launch(a, env), argv)


def cli() -> None:
    sys.exit(main())


def launch(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    flags, cmd = split_argv(argv)
    args = build_parser().parse_args(flags)
    env = dict(os.environ if env is None else env)
    extra_env = load_env_files(env_file_paths(args.env_file))
    # One launcher per node under srun (srun --ntasks-per-node=1 python launch/launch.py ...): start this node's
    # share. Started more often than that inside one step, it would start every process several times.
    per_node = bool(env.get("SLURM_STEP_ID")) and in_slurm_allocation(env) and args.launcher in ("auto", "slurm")
    tasks, nodes = (int(env.get(f"SLURM_STEP_NUM_{k}") or env.get(f"SLURM_N{k}") or 1) for k in ("TASKS", "NODES"))
    if per_node and tasks != nodes:
        raise LaunchError(f"launch.py was started {tasks} times on {nodes} node(s) by srun (SLURM_STEP_NUM_TASKS): "
                          f"start it once per job (in the batch script) or once per node (srun --ntasks-per-node=1 "
                          f"...); to start the training command directly, run srun ... python -m rtdist.train")
    plan = plan_from_args(args, env, per_node_launch=per_node)
    if args.write_hostfile:
        Path(args.write_hostfile).write_text(format_hostfile(plan.hosts))
        _log(f"wrote {args.write_hostfile} ({plan.world_size} slots on {len(plan.hosts)} host(s)); use "
             f"deepspeed --hostfile {args.write_hostfile} --master_addr {plan.master_addr} ...")
        return 0
    ucmd = user_command(cmd, args.module, args.no_python)
    local = per_node or plan.launcher == "local"
    node_rank = this_node(plan, args, env, per_node) if local else 0
    hosts, slots = list(plan.hosts), list(plan.hosts.values())[node_rank]
    wenv = {k: v for k, v in env.items() if k not in RANK_VARS}
    wenv.update(extra_env, MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port))
    for k, v in nccl_env().items():  # NCCL's error handling and flight recorder, unless the user set them
        wenv.setdefault(k, v)
    if local and slots != list(range(len(slots))) and "CUDA_VISIBLE_DEVICES" not in env and local_gpu_count(env):
        wenv["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))  # the hostfile's slot indices are GPU ids
    checked(check_master_addr, plan.master_addr, dry_run=args.dry_run)
    if not args.dry_run and node_rank == 0 and (local or is_local_host(hosts[0]) or is_local_host(plan.master_addr)):
        check_port_free(plan.master_port)
    _log(plan.describe() + (f"; this is node {node_rank} ({hosts[node_rank]})" if local and len(hosts) > 1 else ""))
    with tempfile.TemporaryDirectory(prefix="rtdist-launch-") as tmp:
        if local:
            full = torchrun_command(plan, node_rank, ucmd)
        elif plan.launcher == "pdsh":
            full = deepspeed_command(args, plan, ucmd, Path(tmp) / "hostfile", dry_run=args.dry_run)
            (Path(tmp) / "env").write_text("".join(f"{k}={v}\n" for k, v in extra_env.items()))
            wenv["DS_ENV_FILE"] = str(Path(tmp) / "env")  # the files checked here, instead of DeepSpeed's reading
        elif plan.launcher == "slurm":
            checked(check_srun, env, dry_run=args.dry_run)
            full = srun_command(plan, ucmd, args.launcher_args)
        else:  # openmpi, mpich
            (Path(tmp) / "machinefile").write_text("".join(f"{h}:{len(s)}\n" for h, s in plan.hosts.items()))
            master = {"MASTER_ADDR": plan.master_addr, "MASTER_PORT": str(plan.master_port)}
            full = mpirun_command(plan.launcher, plan, ucmd, {**extra_env, **master}, args.launcher_args,
                                  f"{tmp}/machinefile", dry_run=args.dry_run)
        _log("command: " + shlex.join(full))
        if args.dry_run:
            return 0
        return run_torchrun(full[3:], wenv) if local else run_one(full, wenv)


if __name__ == "__main__":
    cli()
