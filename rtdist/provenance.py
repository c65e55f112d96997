"""Where a run came from: ``RUN_DIR/run_info.json``, one entry per segment of the run (the first start and every
resume), so that two runs can be told apart a month later: the code (rtdist version, git commit and whether the
checkout had uncommitted changes), the libraries, the command line, the world layout, the hosts and the start."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from . import dist as rdist
from .fileio import atomic_write_text


def git_state(where: Path) -> Optional[dict]:
    """{"commit", "dirty"} of the git checkout ``where`` is the top of, or None (an installed package, no git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != where.resolve():
            return None  # rtdist installed inside some other repository
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def segment_info(world: dict, hosts: list[str], resumed_from: Optional[Path], start_step: int) -> dict:
    """This segment's entry: code, libraries, command, layout (``world``), hosts by rank, start."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": start_step,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "rtdist": __version__, "git": git_state(Path(__file__).resolve().parents[1]),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "deepspeed": _version("deepspeed"), "command": list(sys.orig_argv), "cwd": os.getcwd(),
            "world": world, "hosts": hosts, "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def record_segment(path: Path, world: dict, resumed_from: Optional[Path], start_step: int) -> None:
    """Collective (the host of every rank): append this segment to ``path`` (rank 0 writes, atomically)."""
    hosts = rdist.all_gather_object(socket.gethostname())
    if rdist.rank() != 0:
        return
    try:
        segments = json.loads(path.read_text())["segments"]
    except (OSError, ValueError, KeyError, TypeError):
        segments = []  # none yet, or unreadable: this segment starts a new record
    segments.append(segment_info(world, hosts, resumed_from, start_step))
    atomic_write_text(path, json.dumps({"segments": segments}, indent=1))
