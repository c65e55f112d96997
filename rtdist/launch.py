"""One launcher front end for a single node, a hostfile, SLURM and MPI (``launch/launch.py`` is its command line).

    python launch/launch.py [DeepSpeed runner flags] -- python -m rtdist.train --config configs/tiny.yaml ...

How the processes are started (``--launcher``, default ``auto``):

* ``slurm`` (auto inside an allocation, i.e. ``sbatch``/``salloc``): hosts from ``scontrol show hostnames
  $SLURM_JOB_NODELIST``, one task per GPU (or per CPU slot the allocation gives on CPU nodes) started by ``srun`` on
  every node: no ssh, no hostfile. Tasks find their rank in ``SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID``;
  MASTER_ADDR is the first host and MASTER_PORT is derived from the job id. Started once per node instead
  (``srun --ntasks-per-node=1 python launch/launch.py ...``) it starts that node's processes itself.
* ``pdsh`` (auto with ``-H/--hostfile`` or ``/job/hostfile``): the hostfile (``host slots=N``) and ``--include /
  --exclude`` are checked here with clear errors, then DeepSpeed's runner starts the job (locally without ssh when
  the only host is this machine).
* ``openmpi`` / ``mpich``: ``mpirun`` over the hosts (hostfile, SLURM allocation or this machine).
* ``local`` (auto otherwise): ``--num_gpus`` processes on this machine (default: one per GPU, one on a CPU machine);
  with ``--no_ssh --node_rank R -H hostfile`` it starts node R's share of a multi-node job.

``--write-hostfile PATH`` only writes the hostfile (for ``deepspeed --hostfile``) and exits.

Environment propagation: ``~/.deepspeed_env`` then ``./.deepspeed_env`` (the name can be changed with DS_ENV_FILE, as
in DeepSpeed) and ``--env-file`` are read robustly (blank lines, ``#`` comments, ``export``, quotes) and passed to
every process. This module knows nothing of the model: it only starts commands.
"""
from __future__ import annotations

import argparse
import collections
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from .errors import LaunchError

DEFAULT_PORT = 29500
DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default
LAUNCHERS = ("auto", "local", "slurm", "pdsh", "openmpi", "mpich")
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "NODE_RANK")


# ----------------------------------------------------------------------------------------------- hostfiles
_HOST_LINE = re.compile(r"^(?P<host>[^\s=#]+)\s+slots\s*=\s*(?P<slots>\S+)$")


def parse_hostfile(text: str, source: str = "hostfile") -> "collections.OrderedDict[str, int]":
    """``host slots=N`` lines (blank lines and ``#`` comments allowed) -> {host: N}, in file order."""
    pool: "collections.OrderedDict[str, int]" = collections.OrderedDict()
    first_line: Dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{no}: {raw.strip()!r}"
        m = _HOST_LINE.match(line)
        if not m:
            raise LaunchError(f"{where}: {_hostfile_hint(line)}")
        host, slots = m.group("host"), m.group("slots")
        if not slots.isdigit():
            raise LaunchError(f"{where}: slots must be a whole number, got {slots!r}")
        if int(slots) == 0:
            raise LaunchError(f"{where}: host {host} has no slots (slots=0): give it its GPU/CPU-process count or "
                              f"remove the line")
        if host in pool:
            raise LaunchError(f"{where}: duplicate host {host!r} (first on line {first_line[host]}); list each host "
                              f"once with its total slots")
        pool[host] = int(slots)
        first_line[host] = no
    if not pool:
        raise LaunchError(f"{source}: no hosts (expected lines like 'worker-1 slots=8')")
    return pool


def _hostfile_hint(line: str) -> str:
    parts = line.split()
    if len(parts) == 1:
        if ":" in parts[0]:
            host, _, n = parts[0].rpartition(":")
            return f"MPICH machinefile syntax; write '{host} slots={n}'"
        return f"missing slots: write '{parts[0]} slots=N' (N = GPUs, or processes on a CPU node)"
    key = parts[1].split("=", 1)[0]
    if "=" in parts[1] and key != "slots":
        close = difflib.get_close_matches(key, ["slots", "max_slots"], n=1)
        return (f"unknown key {key!r}" + (f" (did you mean 'slots'?)" if close else "") +
                f"; expected '{parts[0]} slots=N'")
    if parts[1].isdigit():
        return f"write '{parts[0]} slots={parts[1]}'"
    return f"expected '<host> slots=N', got {len(parts)} fields"


def read_hostfile(path: str) -> "collections.OrderedDict[str, int]":
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"hostfile {path} does not exist")
    return parse_hostfile(p.read_text(), str(path))


def format_hostfile(pool: Mapping[str, object]) -> str:
    return "".join(f"{h} slots={len(s) if isinstance(s, (list, tuple)) else s}\n" for h, s in pool.items())


def _parse_filter(spec: str, flag: str) -> "collections.OrderedDict[str, List[int]]":
    """``NAME[:SLOT[,SLOT...]][@NAME...]`` -> {host: [slots]} ([] = the whole host)."""
    out: "collections.OrderedDict[str, List[int]]" = collections.OrderedDict()
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise LaunchError(f"{flag} {spec!r}: empty host between '@' separators")
        host, sep, slots = part.partition(":")
        if not host:
            raise LaunchError(f"{flag} {spec!r}: missing host name before ':'")
        got: List[int] = []
        if sep:
            for s in slots.split(","):
                if not s.strip().isdigit():
                    raise LaunchError(f"{flag} {spec!r}: slot {s!r} of {host} is not a whole number "
                                      f"(grammar: host[:slot[,slot]][@host...])")
                got.append(int(s))
        out.setdefault(host, [])
        out[host] = sorted(set(out[host] + got)) if got or out[host] else []
    return out


def _unknown_host(host: str, pool: Mapping[str, object], flag: str, source: str) -> LaunchError:
    close = difflib.get_close_matches(host, list(pool), n=1, cutoff=0.5)
    return LaunchError(f"{flag}: host {host!r} is not in {source} ({', '.join(pool)})"
                       + (f"; did you mean {close[0]!r}?" if close else ""))


def select_resources(pool: Mapping[str, int], include: str = "", exclude: str = "", num_nodes: int = -1,
                     num_gpus: int = -1, source: str = "the hostfile") -> "collections.OrderedDict[str, List[int]]":
    """DeepSpeed's resource selection: --include/--exclude (mutually exclusive, and exclusive with --num_nodes /
    --num_gpus), then the first --num_nodes hosts with --num_gpus slots each. Returns {host: [slot indices]}."""
    if include and exclude:
        raise LaunchError("--include and --exclude are mutually exclusive")
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise LaunchError("--num_nodes/--num_gpus cannot be combined with --include/--exclude (as in DeepSpeed)")
    active = collections.OrderedDict((h, list(range(n))) for h, n in pool.items())
    if include:
        wanted = _parse_filter(include, "--include")
        for host, slots in wanted.items():
            if host not in active:
                raise _unknown_host(host, pool, "--include", source)
            bad = [s for s in slots if s not in active[host]]
            if bad:
                raise LaunchError(f"--include: host {host} has slots 0-{pool[host] - 1}, not {bad}")
        active = collections.OrderedDict((h, wanted[h] or active[h]) for h in active if h in wanted)
    elif exclude:
        for host, slots in _parse_filter(exclude, "--exclude").items():
            if host not in active:
                raise _unknown_host(host, pool, "--exclude", source)
            bad = [s for s in slots if s not in active[host]]
            if bad:
                raise LaunchError(f"--exclude: host {host} has slots 0-{pool[host] - 1}, not {bad}")
            active[host] = [s for s in active[host] if s not in slots] if slots else []
        active = collections.OrderedDict((h, s) for h, s in active.items() if s)
    if num_nodes > 0:
        if num_nodes > len(active):
            raise LaunchError(f"--num_nodes {num_nodes} but {source} has only {len(active)} host(s)")
        active = collections.OrderedDict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        for host in active:
            if num_gpus > pool[host]:
                raise LaunchError(f"--num_gpus {num_gpus} but {host} has only {pool[host]} slot(s) in {source}")
        active = collections.OrderedDict((h, list(range(num_gpus))) for h in active)
    if not active:
        raise LaunchError(f"no hosts left to run on after --include/--exclude on {source}")
    return active


# ----------------------------------------------------------------------------------------- environment files
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env_file(text: str, source: str = ".deepspeed_env") -> Dict[str, str]:
    """``KEY=VALUE`` lines as a shell would read them, for the common cases: blank lines, ``#`` comments (whole
    line, or after whitespace in an unquoted value), an optional ``export``, spaces around ``=``, single quotes
    (literal) and double quotes (with backslash escapes). A line that is none of these is an error naming it."""
    env: Dict[str, str] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[len("export"):].strip()
        where = f"{source}:{no}: {raw.strip()!r}"
        if "=" not in line:
            raise LaunchError(f"{where}: expected KEY=VALUE")
        key, value = line.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            raise LaunchError(f"{where}: {key!r} is not a valid variable name")
        env[key] = _env_value(value.strip(), where)
    return env


def _env_value(v: str, where: str) -> str:
    if not v:
        return ""
    if v[0] in "'\"":
        q = v[0]
        out, i = [], 1
        while i < len(v):
            c = v[i]
            if c == q:
                rest = v[i + 1:].strip()
                if rest and not rest.startswith("#"):
                    raise LaunchError(f"{where}: unexpected text after the closing quote: {rest!r}")
                return "".join(out)
            if c == "\\" and q == '"' and i + 1 < len(v) and v[i + 1] in '"\\$`':
                i += 1
                c = v[i]
            out.append(c)
            i += 1
        raise LaunchError(f"{where}: missing closing {q}")
    return re.split(r"\s+#", v, 1)[0].strip()


def env_file_paths(extra: Sequence[str] = ()) -> List[Path]:
    """DeepSpeed's lookup (``~/.deepspeed_env``, then ``./.deepspeed_env``, name from DS_ENV_FILE) plus --env-file."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    seen, out = set(), []
    for p in [Path.home() / name, Path.cwd() / name, *map(Path, extra)]:
        rp = p.resolve()
        if rp not in seen and p.is_file():
            seen.add(rp)
            out.append(p)
    for p in extra:
        if not Path(p).is_file():
            raise LaunchError(f"--env-file {p} does not exist")
    return out


def load_env_files(paths: Sequence[Path]) -> Dict[str, str]:
    env: Dict[str, str] = {}
    for p in paths:
        env.update(parse_env_file(Path(p).read_text(), str(p)))
    return env


# ---------------------------------------------------------------------------------------------------- SLURM
def expand_hostlist(expr: str) -> List[str]:
    """SLURM host list syntax without scontrol: ``a[1-3,7],b01,c[08-10]x`` -> names (zero padding kept)."""
    hosts: List[str] = []
    i, n = 0, len(expr)
    while i < n:
        depth, j = 0, i
        while j < n and not (expr[j] == "," and depth == 0):
            depth += {"[": 1, "]": -1}.get(expr[j], 0)
            j += 1
        part = expr[i:j].strip()
        i = j + 1
        if part:
            hosts.extend(_expand_one(part))
    return hosts


def _expand_one(part: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", part)
    if not m:
        return [part]
    prefix, suffix, out = part[: m.start()], part[m.end():], []
    for rng in m.group(1).split(","):
        a, _, b = rng.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise LaunchError(f"bad SLURM host list range {rng!r} in {part!r}")
        for k in range(int(a), int(b or a) + 1):
            out.extend(_expand_one(f"{prefix}{str(k).zfill(len(a))}{suffix}"))
    return out


def slurm_hostnames(nodelist: str) -> List[str]:
    """``scontrol show hostnames NODELIST`` (the reference), falling back to :func:`expand_hostlist`."""
    if shutil.which("scontrol"):
        try:
            r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30)
            if r.returncode == 0 and r.stdout.split():
                return r.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)


def _first_count(v: Optional[str]) -> Optional[int]:
    """'2(x3),1' -> 2: SLURM's per-node count lists; the first node's value."""
    if not v:
        return None
    m = re.match(r"\s*(\d+)", v)
    return int(m.group(1)) if m else None


def _uniform_counts(v: Optional[str]) -> Optional[List[int]]:
    """'2(x3),1' -> [2, 2, 2, 1]."""
    if not v:
        return None
    out: List[int] = []
    for part in v.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_master_port(job_id: Optional[str], base: int = 20000, span: int = 20000) -> int:
    """The port rtdist.dist derives from the job id (so tasks started on their own agree with the launcher)."""
    from . import dist
    return dist.slurm_master_port(job_id, base, span) if job_id else DEFAULT_PORT


def in_slurm_allocation(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID") and (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")))


def local_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs this node gives the job: SLURM's count, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    for k in ("SLURM_GPUS_ON_NODE",):
        if env.get(k, "").isdigit():
            return int(env[k])
    vis = env.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


@dataclass
class Plan:
    """Who runs where: the result of resolving flags, hostfile or allocation. ``world = sum(slots)``."""
    launcher: str
    hosts: "collections.OrderedDict[str, List[int]]"
    master_addr: str
    master_port: int
    port_explicit: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return sum(len(s) for s in self.hosts.values())

    @property
    def per_node(self) -> int:
        counts = {len(s) for s in self.hosts.values()}
        if len(counts) != 1:
            raise LaunchError(f"srun/mpirun start the same number of tasks on every node, but the selection has "
                              f"{', '.join(f'{h}: {len(s)}' for h, s in self.hosts.items())}")
        return counts.pop()

    def describe(self) -> str:
        counts = sorted({len(s) for s in self.hosts.values()})
        per = str(counts[0]) if len(counts) == 1 else "/".join(map(str, counts))
        return (f"{self.launcher}: {len(self.hosts)} node(s) [{','.join(self.hosts)}] x {per} = world "
                f"{self.world_size}, MASTER_ADDR={self.master_addr} MASTER_PORT={self.master_port}")


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
    job_id = env.get("SLURM_JOB_ID")
    if not job_id or not nodelist:
        raise LaunchError("--launcher slurm needs a SLURM allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST are not set): "
                          "submit launch/slurm.sbatch with sbatch, or run inside salloc")
    hosts = slurm_hostnames(nodelist)
    if len(set(hosts)) != len(hosts):
        dup = sorted({h for h in hosts if hosts.count(h) > 1})
        raise LaunchError(f"SLURM node list {nodelist!r} names host(s) {dup} more than once")
    if nnodes and int(nnodes) != len(hosts):
        raise LaunchError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist} expands to {len(hosts)} host(s) "
                          f"({', '.join(hosts)}): the environment is from another job or was edited")
    ntasks = int(env["SLURM_NTASKS"]) if env.get("SLURM_NTASKS", "").isdigit() else None
    tpn = _uniform_counts(env.get("SLURM_TASKS_PER_NODE"))
    cpus_per_task = int(env.get("SLURM_CPUS_PER_TASK") or 1)
    gpus = local_gpu_count(env) if gpus is None else gpus
    if num_gpus > 0:
        per, why = num_gpus, "--num_gpus"
    elif gpus > 0:
        per, why = gpus, f"{gpus} GPU(s) per node"
    elif per_node_launch:
        # the launcher's task stands for the whole node: every CPU the job has there
        cpus = _first_count(env.get("SLURM_JOB_CPUS_PER_NODE")) or _first_count(env.get("SLURM_CPUS_ON_NODE")) or 1
        per, why = cpus, f"{cpus} CPU(s) of the job per node"
        ntasks = tpn = None
    elif env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        per, why = int(env["SLURM_NTASKS_PER_NODE"]), "--ntasks-per-node"
    elif ntasks is not None:
        if ntasks % len(hosts):
            raise LaunchError(f"SLURM_NTASKS={ntasks} does not divide over {len(hosts)} nodes; submit with "
                              f"--ntasks-per-node so every node runs the same number of processes")
        per, why = ntasks // len(hosts), "SLURM_NTASKS / nodes"
    else:
        cpus = _first_count(env.get("SLURM_CPUS_ON_NODE")) or _first_count(env.get("SLURM_JOB_CPUS_PER_NODE"))
        if not cpus:
            raise LaunchError("no GPUs on this node and SLURM gives no task or CPU count (SLURM_NTASKS_PER_NODE, "
                              "SLURM_CPUS_ON_NODE): submit with --ntasks-per-node=N or pass --num_gpus N")
        per, why = cpus // cpus_per_task, f"{cpus} CPU(s) per node / {cpus_per_task} per task"
    if per <= 0:
        raise LaunchError(f"no GPUs or CPU slots for a process on the node ({why} gives {per}): request GPUs "
                          f"(--gpus-per-node) or tasks (--ntasks-per-node) in the allocation")
    if gpus > 0 and per > gpus:
        raise LaunchError(f"{per} processes per node ({why}) but only {gpus} GPU(s) per node: pass --num_gpus {gpus}"
                          f" or allocate more GPUs")
    pool = collections.OrderedDict((h, per) for h in hosts)
    active = select_resources(pool, include, exclude, num_nodes, -1, source="the SLURM allocation")
    plan = Plan("slurm", active, master_addr or next(iter(active)),
                master_port or slurm_master_port(job_id), port_explicit=master_port is not None)
    world = plan.world_size
    uses_all_nodes = list(active) == hosts
    if ntasks is not None and uses_all_nodes and world != ntasks:
        raise LaunchError(
            f"SLURM_NTASKS={ntasks} ({env.get('SLURM_TASKS_PER_NODE', '?')} per node on {len(hosts)} node(s)) but "
            f"the launch asks for {world} processes ({len(active)} node(s) x {plan.per_node}, from {why}): submit with "
            f"--ntasks-per-node={plan.per_node}, or pass --num_gpus {ntasks // len(hosts) or 1}")
    if ntasks is not None and world > ntasks:
        raise LaunchError(f"the launch asks for {world} processes but the allocation has SLURM_NTASKS={ntasks}")
    if tpn and len(tpn) == len(hosts) and uses_all_nodes and len(set(tpn)) > 1:
        raise LaunchError(f"SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']} is uneven over the nodes; submit "
                          f"with --ntasks-per-node so every node runs the same number of processes")
    plan.notes.append(f"{plan.per_node} per node from {why}")
    return plan


# ------------------------------------------------------------------------------------------------- ports
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_local_host(host: str) -> bool:
    names = LOCAL_NAMES | {socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn()}
    node = os.environ.get("SLURMD_NODENAME")
    if node:
        names.add(node)
    if host in names or host.startswith("127."):
        return True
    return False


def check_port_free(port: int, host: str = "") -> None:
    """Raise a LaunchError when something on this machine already listens on ``port``."""
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT {port} is not a valid TCP port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LaunchError(f"MASTER_PORT {port} is already in use on {socket.gethostname()} ({e.strerror}): "
                              f"another job or a leftover process holds it; pass --master_port with a free port")


# --------------------------------------------------------------------------------------------- commands
def user_command(cmd: Sequence[str], module: bool = False, no_python: bool = False) -> List[str]:
    """The per-process command: what follows ``--`` (a bare ``python``/``python3`` becomes this interpreter);
    DeepSpeed-style ``--module`` / a ``.py`` script get the interpreter in front."""
    cmd = list(cmd)
    if not cmd:
        raise LaunchError("no command to launch: put it after '--', e.g. -- python -m rtdist.train --config ...")
    if module:
        return [sys.executable, "-u", "-m", *cmd]
    if not no_python and cmd[0].endswith(".py"):
        return [sys.executable, "-u", *cmd]
    if cmd[0] in ("python", "python3"):
        return [sys.executable, *cmd[1:]]
    return cmd


def worker_env(base: Mapping[str, str], extra: Mapping[str, str], plan: Plan) -> Dict[str, str]:
    env = {k: v for k, v in base.items() if k not in RANK_VARS}
    env.update(extra)
    env.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port))
    return env


def srun_command(plan: Plan, cmd: Sequence[str], launcher_args: str = "") -> List[str]:
    per = plan.per_node
    out = ["srun", f"--nodes={len(plan.hosts)}", f"--ntasks={plan.world_size}", f"--ntasks-per-node={per}",
           f"--nodelist={','.join(plan.hosts)}", "--kill-on-bad-exit=1", "--export=ALL"]
    return out + shlex.split(launcher_args) + list(cmd)


def mpirun_command(flavour: str, plan: Plan, cmd: Sequence[str], env_vars: Mapping[str, str],
                   launcher_args: str = "", machinefile: Optional[str] = None) -> List[str]:
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if not mpirun:
        raise LaunchError(f"--launcher {flavour} needs mpirun on PATH (pip install mpi4py mpich gives one)")
    out = [mpirun, "-n", str(plan.world_size)]
    local_only = all(is_local_host(h) for h in plan.hosts)
    if flavour == "openmpi":
        if not local_only:
            out += ["-H", ",".join(f"{h}:{len(s)}" for h, s in plan.hosts.items())]
        for k, v in env_vars.items():
            out += ["-x", f"{k}={v}"]
    else:
        if not local_only:
            if machinefile is None:
                raise LaunchError("internal: mpich on several hosts needs a machinefile")
            out += ["-f", machinefile]
        for k, v in env_vars.items():
            out += ["-genv", k, v]
    return out + shlex.split(launcher_args) + list(cmd)


# ---------------------------------------------------------------------------------------------- running
def _forward_signals(procs: List[subprocess.Popen]) -> Dict[int, object]:
    """Pass SIGUSR1/SIGTERM/SIGINT on to the children (a SLURM warning or preemption reaches training)."""
    old = {}

    def handler(signum, frame):
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return old


def run_one(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run one launcher process (srun, mpirun, DeepSpeed's runner) with signals forwarded; its exit status."""
    p = subprocess.Popen(list(cmd), env=dict(env))
    old = _forward_signals([p])
    try:
        return p.wait()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_local(cmd: Sequence[str], env: Mapping[str, str], nproc: int, world_size: int, rank_offset: int,
              node_rank: int = 0, nnodes: int = 1, slots: Optional[Sequence[int]] = None, poll_s: float = 0.2) -> int:
    """Start ``nproc`` processes here with torchrun/deepspeed-style variables; when one fails the others are
    terminated. Returns 0, or the first non-zero exit status."""
    procs: List[subprocess.Popen] = []
    old = _forward_signals(procs)
    try:
        pin = slots is not None and "CUDA_VISIBLE_DEVICES" not in env and local_gpu_count(env) > 0
        for local in range(nproc):
            e = dict(env)
            e.update(RANK=str(rank_offset + local), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local),
                     LOCAL_SIZE=str(nproc), NODE_RANK=str(node_rank), CROSS_RANK=str(node_rank),
                     CROSS_SIZE=str(nnodes))
            if pin:  # the hostfile's slot indices are GPU ids (as DeepSpeed's --include host:0,2)
                e["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
            procs.append(subprocess.Popen(list(cmd), env=e))
        status = 0
        while True:
            codes = [p.poll() for p in procs]  # poll every process (any() would stop at the first live one)
            if all(c is not None for c in codes):
                break
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                status = failed[0]
                _terminate(procs)
                break
            time.sleep(poll_s)
        for p in procs:
            rc = p.wait()
            if rc and not status:
                status = rc
        return status if status >= 0 else 128 - status
    finally:
        _terminate(procs)
        for sig, h in old.items():
            signal.signal(sig, h)


def _terminate(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.time() + grace_s
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/launch.py", description="Start a distributed job on one node, a hostfile, SLURM or MPI.",
        epilog="Example: python launch/launch.py --num_gpus 2 -- python -m rtdist.train --config configs/tiny.yaml")
    p.add_argument("-H", "--hostfile", default=None, help="'host slots=N' lines (default: /job/hostfile if present)")
    p.add_argument("-i", "--include", default="", help="hosts/slots to use: host[:slot[,slot]][@host...]")
    p.add_argument("-e", "--exclude", default="", help="hosts/slots to leave out, same grammar as --include")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts")
    p.add_argument("--num_gpus", "--num_accelerators", type=int, default=-1,
                   help="processes per node (default: one per GPU; on CPU nodes the allocation's slots, or 1)")
    p.add_argument("--master_addr", default=None, help="rank 0's address (default: the first host)")
    p.add_argument("--master_port", type=int, default=None,
                   help=f"rendezvous port (default {DEFAULT_PORT}; under SLURM derived from the job id)")
    p.add_argument("--node_rank", type=int, default=-1, help="with --no_ssh: which hostfile node this is")
    p.add_argument("--launcher", default="auto", type=str.lower, choices=LAUNCHERS + ("impi", "mvapich"),
                   help="auto (SLURM allocation > hostfile > this machine), local, slurm, pdsh, openmpi, mpich")
    p.add_argument("--launcher_args", default="", help="extra arguments for srun / mpirun / pdsh")
    p.add_argument("--module", action="store_true", help="the command is a Python module (python -m)")
    p.add_argument("--no_python", action="store_true", help="run the command as is")
    p.add_argument("--no_local_rank", action="store_true", help="pdsh: do not pass --local_rank to the script")
    p.add_argument("--no_ssh", action="store_true", help="start only this node's processes (with --node_rank)")
    p.add_argument("--no_ssh_check", action="store_true")
    p.add_argument("--force_multi", action="store_true")
    p.add_argument("--ssh_port", type=int, default=None)
    p.add_argument("--env-file", action="append", default=[], help="more KEY=VALUE files for every process")
    p.add_argument("--write-hostfile", default=None, metavar="PATH",
                   help="write the hostfile (e.g. from the SLURM allocation) for deepspeed --hostfile and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    # DeepSpeed style without '--': flags, then the script and its arguments
    p = build_parser()
    flags_with_value = {a for act in p._actions if act.nargs is None and act.option_strings
                        for a in act.option_strings}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] not in flags_with_value else 2
    return argv[:i], argv[i:]


def plan_from_args(args, env: Mapping[str, str], per_node_launch: bool = False) -> Plan:
    hostfile = args.hostfile
    if hostfile is None and os.path.isfile(DEFAULT_HOSTFILE):
        hostfile = DEFAULT_HOSTFILE
    launcher = args.launcher
    if launcher in ("impi", "mvapich"):
        raise LaunchError(f"--launcher {launcher} is not supported here: use mpich, openmpi, slurm or pdsh")
    if launcher == "auto":
        launcher = ("slurm" if in_slurm_allocation(env) and args.hostfile is None else
                    "pdsh" if hostfile else "local")
    if launcher == "slurm" or (launcher in ("openmpi", "mpich") and hostfile is None and in_slurm_allocation(env)):
        plan = slurm_plan(env, args.num_nodes, args.num_gpus, args.include, args.exclude, args.master_addr,
                          args.master_port, per_node_launch=per_node_launch)
        plan.launcher = launcher
        return plan
    if hostfile:
        pool = read_hostfile(hostfile)
        active = select_resources(pool, args.include, args.exclude, args.num_nodes, args.num_gpus,
                                  source=f"hostfile {hostfile}")
    else:
        if args.include or args.exclude:
            pool = collections.OrderedDict(localhost=max(args.num_gpus, local_gpu_count(env), 1))
            active = select_resources(pool, args.include, args.exclude, source="this machine (localhost)")
        else:
            if args.num_nodes > 1:
                raise LaunchError(f"--num_nodes {args.num_nodes} needs a hostfile (-H) or a SLURM allocation")
            gpus = local_gpu_count(env)
            n = args.num_gpus if args.num_gpus > 0 else (gpus or 1)
            if gpus and n > gpus:
                raise LaunchError(f"--num_gpus {n} but this machine has {gpus} GPU(s)")
            active = collections.OrderedDict(localhost=list(range(n)))
    first = next(iter(active))
    addr = args.master_addr or ("127.0.0.1" if is_local_host(first) else first)
    return Plan(launcher, active, addr, args.master_port or DEFAULT_PORT, port_explicit=args.master_port is not None)


def main(argv: Optional[Sequence[str]] = None, env: Optional[MutableMapping[str, str]] = None) -> int:
    flags, cmd = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(flags)
    env = dict(os.environ if env is None else env)
    try:
        return _main(args, cmd, env)
    except LaunchError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2


def _log(msg: str) -> None:
    print(f"[rtdist.launch] {msg}", file=sys.stderr, flush=True)


def _main(args, cmd: List[str], env: Dict[str, str]) -> int:
    extra_env = load_env_files(env_file_paths(args.env_file))
    # One launcher per node under srun (srun --ntasks-per-node=1 python launch/launch.py ...): start this node's
    # share. Started more often than that inside one step, it would start every process several times.
    in_step = bool(env.get("SLURM_STEP_ID")) and in_slurm_allocation(env) and args.launcher in ("auto", "slurm")
    if in_step:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        if tasks != nodes:
            raise LaunchError(f"launch.py was started {tasks} times on {nodes} node(s) by srun: start it once per job "
                              f"(in the batch script) or once per node (srun --ntasks-per-node=1 ...); to start the "
                              f"training command directly, run srun ... python -m rtdist.train without launch.py")
    plan = plan_from_args(args, env, per_node_launch=in_step)
    if args.write_hostfile:
        Path(args.write_hostfile).write_text(format_hostfile(plan.hosts))
        _log(f"wrote {args.write_hostfile} ({plan.world_size} slots on {len(plan.hosts)} host(s)); use "
             f"deepspeed --hostfile {args.write_hostfile} --master_addr {plan.master_addr} ...")
        return 0
    ucmd = user_command(cmd, args.module, args.no_python)
    if plan.launcher == "pdsh":
        return _run_deepspeed(args, plan, cmd, env, extra_env)
    master_here = is_local_host(next(iter(plan.hosts))) or is_local_host(plan.master_addr)
    if in_step:
        return _run_per_node(plan, ucmd, env, extra_env, args)
    if plan.launcher == "local" and args.no_ssh:
        return _run_per_node(plan, ucmd, env, extra_env, args)
    if master_here and not args.dry_run:
        check_port_free(plan.master_port)
    wenv = worker_env(env, extra_env, plan)
    _log(plan.describe() + (f" ({'; '.join(plan.notes)})" if plan.notes else ""))
    if plan.launcher == "slurm":
        if not shutil.which("srun", path=env.get("PATH")):
            raise LaunchError("srun is not on PATH on this node")
        full = srun_command(plan, ucmd, args.launcher_args)
    elif plan.launcher in ("openmpi", "mpich"):
        mf = None
        if plan.launcher == "mpich" and not all(is_local_host(h) for h in plan.hosts) and not args.dry_run:
            fd, mf = tempfile.mkstemp(prefix="rtdist-machinefile-", text=True)
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{h}:{len(s)}\n" for h, s in plan.hosts.items()))
        full = mpirun_command(plan.launcher, plan, ucmd, {**extra_env, "MASTER_ADDR": plan.master_addr,
                                                          "MASTER_PORT": str(plan.master_port)},
                              args.launcher_args, mf or "machinefile")
    else:  # local
        _log("command: " + shlex.join(ucmd))
        if args.dry_run:
            return 0
        slots = next(iter(plan.hosts.values()))
        return run_local(ucmd, wenv, len(slots), len(slots), 0, slots=slots)
    _log("command: " + shlex.join(full))
    if args.dry_run:
        return 0
    return run_one(full, wenv)


def _run_per_node(plan: Plan, ucmd: List[str], env: Dict[str, str], extra_env: Dict[str, str], args) -> int:
    hosts = list(plan.hosts)
    if env.get("SLURM_STEP_ID"):
        node_rank = int(env.get("SLURM_NODEID", 0))
        me = env.get("SLURMD_NODENAME") or hosts[node_rank]
        if me not in plan.hosts:
            raise LaunchError(f"this node ({me}) is not among the selected hosts {hosts}")
        node_rank = hosts.index(me)
    else:
        node_rank = args.node_rank
        if not 0 <= node_rank < len(hosts):
            raise LaunchError(f"--no_ssh needs --node_rank between 0 and {len(hosts) - 1} (this node's line in the "
                              f"hostfile), got {node_rank}")
    offset = sum(len(plan.hosts[h]) for h in hosts[:node_rank])
    slots = plan.hosts[hosts[node_rank]]
    if node_rank == 0 and not args.dry_run:
        check_port_free(plan.master_port)
    _log(f"node {node_rank}/{len(hosts)} ({hosts[node_rank]}): ranks {offset}-{offset + len(slots) - 1} of "
         f"{plan.world_size}, MASTER_ADDR={plan.master_addr} MASTER_PORT={plan.master_port}")
    if args.dry_run:
        return 0
    return run_local(ucmd, worker_env(env, extra_env, plan), len(slots), plan.world_size, offset, node_rank,
                     len(hosts), slots=slots)


def _run_deepspeed(args, plan: Plan, cmd: List[str], env: Dict[str, str], extra_env: Dict[str, str]) -> int:
    """Hand a checked hostfile to DeepSpeed's runner (``deepspeed``), rewritten in canonical form; a sanitised copy
    of the environment files replaces DeepSpeed's own fragile reading of them."""
    tmp = Path(tempfile.mkdtemp(prefix="rtdist-launch-"))
    try:
        hostfile = tmp / "hostfile"
        pool = read_hostfile(args.hostfile or DEFAULT_HOSTFILE)
        hostfile.write_text(format_hostfile(pool))
        ds = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
              "--master_port", str(plan.master_port)]
        if args.include:
            ds += ["--include", args.include]
        if args.exclude:
            ds += ["--exclude", args.exclude]
        if args.num_nodes > 0:
            ds += ["--num_nodes", str(args.num_nodes)]
        if args.num_gpus > 0:
            ds += ["--num_gpus", str(args.num_gpus)]
        local_only = all(is_local_host(h) for h in plan.hosts)
        if local_only:
            if len(plan.hosts) > 1:
                raise LaunchError(f"hostfile names this machine more than once ({', '.join(plan.hosts)})")
            ds += ["--no_ssh_check", "--master_addr", args.master_addr or "127.0.0.1"]
            if not args.dry_run:
                check_port_free(plan.master_port)
        else:
            if not shutil.which("pdsh") and not args.no_ssh:
                raise LaunchError("a hostfile with other hosts needs pdsh (apt-get install pdsh) and passwordless "
                                  "ssh; inside SLURM use --launcher slurm, or use --launcher openmpi/mpich")
            if args.master_addr:
                ds += ["--master_addr", args.master_addr]
            if args.no_ssh_check:
                ds.append("--no_ssh_check")
        for flag in ("no_local_rank", "no_ssh", "force_multi"):
            if getattr(args, flag):
                ds.append(f"--{flag}")
        if args.no_ssh:
            ds += ["--node_rank", str(args.node_rank)]
        if args.ssh_port:
            ds += ["--ssh_port", str(args.ssh_port)]
        if args.launcher_args:
            ds += ["--launcher_args", args.launcher_args]
        user = list(cmd)
        if not user:
            raise LaunchError("no command to launch: put it after '--'")
        if args.module:
            ds += ["--module", *user]
        elif user[0] in ("python", "python3", sys.executable) and len(user) > 2 and user[1] == "-m":
            ds += ["--module", *user[2:]]
        elif user[0] in ("python", "python3", sys.executable) and len(user) > 1 and user[1].endswith(".py"):
            ds += user[1:]
        elif user[0].endswith(".py") and not args.no_python:
            ds += user
        else:
            ds += ["--no_python", *user]
        denv = {k: v for k, v in env.items() if k not in RANK_VARS}
        denv.update(extra_env)
        if extra_env:
            envfile = tmp / "deepspeed_env"
            envfile.write_text("".join(f"{k}={v}\n" for k, v in extra_env.items()))
            denv["DS_ENV_FILE"] = str(envfile)
        else:
            denv["DS_ENV_FILE"] = str(tmp / "none")  # keep DeepSpeed from re-reading the files we checked
        how = "deepspeed (local, no ssh)" if local_only else "pdsh"
        _log(f"{how}: DeepSpeed runner over {len(plan.hosts)} host(s) [{','.join(plan.hosts)}], world "
             f"{plan.world_size}")
        _log("command: " + shlex.join(ds))
        if args.dry_run:
            return 0
        return run_one(ds, denv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
