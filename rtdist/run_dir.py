"""A training run's directory: its layout and the lock that keeps two jobs out of it.

    RUN_DIR/config.yaml        the resolved config (replaced only once a resume has succeeded)
    RUN_DIR/metrics.jsonl      one JSON object per logged step
    RUN_DIR/checkpoints/       DeepSpeed layout (rtdist.checkpoint)
    RUN_DIR/model.safetensors  fp32 export at the end
    RUN_DIR/result.json        how the run ended
    RUN_DIR/tensorboard/       event files of every logged step (rtdist.monitor; the default place)
    RUN_DIR/.lock              held (flock) by rank 0 while a job runs here
    RUN_DIR/failures/          rank-N.txt: the error line of a rank that failed, read by its peers for theirs

A run directory that holds an earlier run (a complete checkpoint, metrics, a result or an export) is continued
with ``--resume auto`` or started over with ``--overwrite``; without either, training refuses to start there, so
that a forgotten flag in a resubmitted job script never mixes a new run into an old one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint.store import complete_steps
from .errors import RtdistError


@dataclass(frozen=True)
class RunDir:
    path: Path

    # The files of a run, by what they hold.
    config = property(lambda self: self.path / "config.yaml", doc="the resolved config of the last segment")
    metrics = property(lambda self: self.path / "metrics.jsonl", doc="one JSON row per logged step")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="DeepSpeed's layout (rtdist.checkpoint)")
    export = property(lambda self: self.path / "model.safetensors", doc="the fp32 export of a completed run")
    result = property(lambda self: self.path / "result.json", doc="how the last segment ended")
    run_info = property(lambda self: self.path / "run_info.json", doc="code, command, layout and hosts per segment")
    failures = property(lambda self: self.path / "failures", doc="each failed rank's error line (rtdist.watchdog)")

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RtdistError(f"--run-dir {self.path}: a file of that name exists (or a part of the path is a file): "
                              f"pick another --run-dir") from None
        except NotADirectoryError:
            raise RtdistError(f"--run-dir {self.path}: a part of the path is a file, not a folder: pick another "
                              f"--run-dir") from None

    # What a run leaves that a new run would mix with (metrics appended, steps renumbered, events overlaid).
    EARLIER = ("checkpoints", "metrics.jsonl", "result.json", "model.safetensors", "tensorboard", "csv_monitor",
               "run_info.json")

    def earlier_run(self) -> Optional[str]:
        """What an earlier run left here, in words (its last complete checkpoint first); None when nothing."""
        steps = complete_steps(self.checkpoints) if self.path.is_dir() else []
        left = [f"last complete checkpoint {self.checkpoints / f'global_step{steps[-1]}'}" if steps else
                "no complete checkpoint"]
        try:
            result = json.loads(self.result.read_text())
            left.append(f"result.json: {result.get('status')} at step {result.get('step')}")
        except (OSError, ValueError, AttributeError):
            left += ["result.json"] if self.result.exists() else []
        try:
            with open(self.metrics, "rb") as f:
                lines = sum(1 for line in f if line.strip())
            left += [f"metrics.jsonl with {lines} logged steps"] if lines else []
        except OSError:
            pass
        left += ["model.safetensors"] if self.export.exists() else []
        return None if left == ["no complete checkpoint"] else ", ".join(left)

    def refusal(self, resume: Optional[str], overwrite: bool) -> Optional[str]:
        """Why a run may not start here (an earlier run, and neither ``--resume`` nor ``--overwrite``), or None.
        Reads only: nothing is written before it is decided."""
        if overwrite or resume not in (None, "", "none"):
            return None
        earlier = self.earlier_run()
        if earlier is None:
            return None
        return (f"--run-dir {self.path} holds an earlier run ({earlier}): continue it with --resume auto, or start "
                f"over in a new --run-dir, or here with --overwrite (deletes its checkpoints and metrics)")

    def clear(self) -> list[str]:
        """Delete what an earlier run left (``--overwrite``), so none of its steps mixes into the new run's;
        returns the names deleted. Called under the run's lock."""
        removed = []
        for name in self.EARLIER:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()
            else:
                continue
            removed.append(name)
        return removed


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, released by the kernel when the process dies (kill -9
    included). A second job on the same run directory fails at once, naming the holder, instead of the two
    interleaving their checkpoints."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.path / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """None when held now; else why not (who holds it). A file system without locks is a warning, not an
        error (returns None with the lock unheld)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        except OSError as e:  # e.g. ENOLCK on some network file systems
            os.close(fd)
            print(f"warning: cannot lock {self.path} ({e.strerror}): make sure no other job uses this run directory",
                  flush=True)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
