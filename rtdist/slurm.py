"""What a SLURM allocation says, read the same way by the launcher and by rank discovery (rtdist.dist):
host lists (``gpu[01-04],login``), per-node counts (``2(x3),1``) and the rendezvous port derived from the job id."""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import List, Optional

from .errors import LaunchError


def expand_hostlist(expr: str) -> List[str]:
    """SLURM host list syntax without scontrol: ``a[1-3,7],b01,c[08-10]x`` -> names (zero padding kept)."""
    hosts, depth, start = [], 0, 0
    for i, c in enumerate(expr + ","):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            hosts += _expand_one(expr[start:i].strip()) if expr[start:i].strip() else []
            start = i + 1
    return hosts


def _expand_one(part: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", part)
    if not m:
        return [part]
    out = []
    for rng in m.group(1).split(","):
        a, _, b = rng.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise LaunchError(f"bad SLURM host list range {rng!r} (in {part!r}): ranges are digits, like "
                              f"node[01-04,07]")
        for k in range(int(a), int(b or a) + 1):
            out += _expand_one(f"{part[:m.start()]}{str(k).zfill(len(a))}{part[m.end():]}")
    return out


def hostnames(nodelist: str, path: Optional[str] = None) -> List[str]:
    """``scontrol show hostnames NODELIST`` (the reference; ``path`` is where to look for it), else
    :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol", path=path)
    if scontrol:
        try:
            r = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and r.stdout.split():
                return r.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)


def counts(value: Optional[str]) -> List[int]:
    """SLURM's per-node count lists: ``'2(x3),1'`` -> ``[2, 2, 2, 1]``; ``[]`` when absent or malformed."""
    out: List[int] = []
    for part in (value or "").split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def master_port(job_id: Optional[str], base: int = 20000, span: int = 20000) -> int:
    """The rendezvous port of a job: ``base + job_id % span``, so jobs sharing a node do not collide; 29500
    (torch's default) without a job id."""
    return base + int(job_id) % span if job_id and job_id.isdigit() else 29500
