"""A real SLURM cluster on localhost for the tests: two simulated nodes (two ``slurmd -N`` daemons), a private
``munged`` and ``slurmctld``, all configured under one folder and stopped by their pid files.

    cluster = SlurmCluster(folder).start()      # raises SlurmUnavailable / SlurmStartError
    jid = cluster.sbatch(["-N2", "script.sbatch"], env)
    info = cluster.wait(jid)                    # {'JobState': 'COMPLETED', 'ExitCode': '0:0', ...}
    cluster.stop()

Also a command line for trying things by hand (run as root, after ``.ci/setup_slurm.sh``):

    python tests/slurm_cluster.py start /tmp/slurm   # prints the SLURM_CONF to export
    python tests/slurm_cluster.py stop /tmp/slurm

What it does follows ../shared/SLURM_NOTES.md: munge without systemd, a minimal slurm.conf with state, spool, pid
and log paths in the folder, node names resolving to 127.0.0.1 through /etc/hosts, and slurmd started in a private
mount namespace with a minimal cgroup v1 layout when a plain start fails (hybrid or missing cgroup mounts).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

NODES = ("rtnode1", "rtnode2")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun", "munged", "munge")
SBIN = ("/usr/sbin", "/sbin", "/usr/bin")
MUNGE_KEY = Path("/etc/munge/munge.key")
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "STOPPED",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the cluster (not root, packages missing): tests skip with this message."""


class SlurmStartError(RuntimeError):
    """The packages are there but a daemon did not come up: a real failure, with the log tails."""


def which(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot start here, or None."""
    if not sys.platform.startswith("linux"):
        return "a local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "starting slurmd/munged needs root (CI runs as root; locally: sudo)"
    missing = [b for b in BINARIES if which(b) is None]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}): run .ci/setup_slurm.sh, or apt-get install "
                f"slurmctld slurmd slurm-client munge")
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} is missing (the munge package creates it; run .ci/setup_slurm.sh)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_hosts(names: Sequence[str], hosts_file: Path = Path("/etc/hosts")) -> None:
    """Make every simulated node name resolve to 127.0.0.1 (srun tasks use the first as MASTER_ADDR)."""
    missing = []
    for n in names:
        try:
            if socket.gethostbyname(n) == "127.0.0.1":
                continue
        except OSError:
            pass
        missing.append(n)
    if missing:
        with open(hosts_file, "a") as f:
            f.write(f"\n127.0.0.1 {' '.join(missing)}  # rtdist local SLURM test nodes\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class SlurmCluster:
    def __init__(self, root: Path, nodes: Sequence[str] = NODES, cpus_per_node: int = 2, gpus_per_node: int = 0):
        self.root = Path(root).resolve()
        self.nodes = tuple(nodes)
        self.cpus, self.gpus = cpus_per_node, gpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.hostname = socket.gethostname().split(".")[0]
        self.started: List[Path] = []  # pid files of daemons this object started
        self.jobs: List[str] = []  # jobs submitted through this object, cancelled before the daemons stop

    # ---------------------------------------------------------------- setup
    @property
    def env(self) -> Dict[str, str]:
        """Environment for the SLURM client commands (sbatch, squeue, scontrol, ...)."""
        e = dict(os.environ, SLURM_CONF=str(self.conf))
        e["PATH"] = e.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
        return e

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)
        ctld_port, node_ports = free_port(), [free_port() for _ in self.nodes]
        lines = [
            "ClusterName=rtdist",
            # job ids (and so the MASTER_PORTs derived from them) differ between clusters running at the same time
            f"FirstJobId={random.randrange(1000, 900000)}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        if self.gpus:  # simulated GPUs, so that --gpus-* lines are scheduled and bound for real
            lines.append("GresTypes=gpu")
            (r / "gres.conf").write_text("AutoDetect=off\n" + "".join(
                f"NodeName={n} Name=gpu File={self._fake_gpus()}\n" for n in self.nodes))
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus}{f' Gres=gpu:{self.gpus}' if self.gpus else ''} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def _fake_gpus(self) -> str:
        """Character devices that stand for GPUs (slurmd drops a GPU without a device file): copies of /dev/null
        named nvidia0..N-1, so SLURM numbers them and sets CUDA_VISIBLE_DEVICES as on a GPU node."""
        d = self.root / "dev"
        d.mkdir(exist_ok=True)
        null = os.stat("/dev/null").st_rdev
        for i in range(self.gpus):
            if not (d / f"nvidia{i}").exists():
                os.mknod(d / f"nvidia{i}", 0o666 | stat.S_IFCHR, null)
        return f"{d}/nvidia[0-{self.gpus - 1}]"

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        ensure_hosts(self.nodes)
        self.write_conf()
        try:
            self._start_munge()
            self._run_daemon([which("slurmctld"), "-i", "-f", str(self.conf)], self.root / "slurmctld.pid")
            for n in self.nodes:
                self._start_slurmd(n)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        m = self.root / "munge"
        self._run_daemon([which("munged"), "--force", f"--socket={self.munge_socket}", f"--pid-file={m / 'munged.pid'}",
                          f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}",
                          f"--key-file={MUNGE_KEY}"], m / "munged.pid")
        deadline = time.time() + 10
        while time.time() < deadline:
            enc = subprocess.run([which("munge"), "-S", str(self.munge_socket), "-n"], capture_output=True)
            if enc.returncode == 0:
                return
            time.sleep(0.1)
        raise SlurmStartError(f"munged did not answer on {self.munge_socket}\n{self.logs()}")

    def _run_daemon(self, cmd: List[str], pid_file: Path, pre: Optional[List[str]] = None) -> None:
        """Start a self-daemonising program and wait for its pid file."""
        pid_file.unlink(missing_ok=True)
        full = (pre or []) + cmd
        r = subprocess.run(full, capture_output=True, text=True, timeout=30, env=self.env)
        deadline = time.time() + 10
        while time.time() < deadline:
            pid = _read_pid(pid_file)
            if pid and _pid_alive(pid):
                self.started.append(pid_file)
                return
            if r.returncode != 0:
                break
            time.sleep(0.05)
        raise SlurmStartError(f"{Path(cmd[0]).name} did not start (rc {r.returncode}): "
                              f"{(r.stderr or r.stdout).strip()[-1500:]}")

    def _start_slurmd(self, node: str) -> None:
        (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        cmd = [which("slurmd"), "-f", str(self.conf), "-N", node]
        pid_file = self.root / f"slurmd-{node}.pid"
        try:
            self._run_daemon(cmd, pid_file)
            return
        except SlurmStartError as plain:
            first = str(plain)
        # slurmd refuses to start without a usable /sys/fs/cgroup (hybrid v1/v2, or nothing mounted) even with
        # proctrack/linuxproc and task/none: give it a private mount namespace with a minimal v1 layout.
        script = ("umount -R /sys/fs/cgroup 2>/dev/null; mount -t tmpfs none /sys/fs/cgroup && "
                  "mkdir -p /sys/fs/cgroup/systemd && "
                  "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd && exec \"$@\"")
        try:
            self._run_daemon(cmd, pid_file, pre=[which("unshare") or "unshare", "--mount", "sh", "-c", script, "sh"])
        except SlurmStartError as ns:
            raise SlurmStartError(f"slurmd -N {node}: plain start failed ({first}); in a private mount namespace: "
                                  f"{ns}\n{self.logs()}") from None

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
            out = r.stdout.strip()
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n, "").startswith("idle") for n in self.nodes):
                return
            time.sleep(0.2)
        raise SlurmStartError(f"nodes not idle after {timeout:.0f}s: {out!r}\n{self.logs()}")

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for p in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if p.exists():
                parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs submitted here (their slurmstepd and tasks would outlive slurmd), then stop the daemons
        this object started, by their pid files (slurmd first, munged last)."""
        live = [j for j in self.jobs if self.job(j).get("JobState") in ACTIVE] if self.started else []
        for j in live:
            self.cancel(j)
        deadline = time.time() + 30
        while live and time.time() < deadline:
            live = [j for j in live if self.job(j).get("JobState") in ACTIVE]
            time.sleep(0.2)
        self.jobs.clear()
        for pid_file in reversed(self.started):
            pid = _read_pid(pid_file)
            if not pid or not _pid_alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 10
            while time.time() < deadline and _pid_alive(pid):
                time.sleep(0.05)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()

    # ---------------------------------------------------------------- jobs
    def sbatch(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        e = dict(env or os.environ)
        e.update(SLURM_CONF=str(self.conf), PATH=self.env["PATH"])
        r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=e, cwd=cwd,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        jid = r.stdout.strip().split(";")[0]
        self.jobs.append(jid)
        return jid

    def job(self, jid: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (empty when the controller no longer knows the job)."""
        r = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, env=self.env,
                           timeout=30)
        info: Dict[str, str] = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait(self, jid: str, timeout: float = 120.0, until: Sequence[str] = ("COMPLETED", "FAILED", "CANCELLED",
                                                                              "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                                                              "PREEMPTED", "BOOT_FAIL", "DEADLINE")
             ) -> Dict[str, str]:
        """Poll ``scontrol show job`` every 0.2 s (``sbatch --wait`` polls slowly) until a state in ``until``."""
        deadline = time.time() + timeout
        info: Dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(jid)
            if info.get("JobState") in until:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {jid} still {info.get('JobState')} after {timeout:.0f}s: {info}")

    def signal(self, jid: str, sig: str = "USR1") -> None:
        subprocess.run(["scancel", "--signal", sig, jid], check=True, capture_output=True, env=self.env, timeout=30)

    def cancel(self, jid: str) -> None:
        subprocess.run(["scancel", jid], capture_output=True, env=self.env, timeout=30)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    c = SlurmCluster(Path(argv[1]))
    if argv[0] == "start":
        c.start()
        print(f"export SLURM_CONF={c.conf}")
        return 0
    for pf in [*(c.root / f"slurmd-{n}.pid" for n in c.nodes), c.root / "slurmctld.pid",
               c.root / "munge" / "munged.pid"]:
        if pf.exists():
            c.started.append(pf)
    c.started.reverse()
    c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
