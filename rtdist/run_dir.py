"""A training run's directory: its layout and the lock that keeps two jobs out of it.

    RUN_DIR/config.yaml        the resolved config (replaced only once a resume has succeeded)
    RUN_DIR/metrics.jsonl      one JSON object per logged step
    RUN_DIR/checkpoints/       DeepSpeed layout (rtdist.checkpoint)
    RUN_DIR/model.safetensors  fp32 export at the end
    RUN_DIR/result.json        how the run ended
    RUN_DIR/tensorboard/       event files of every logged step (rtdist.monitor; the default place)
    RUN_DIR/.lock              held (flock) by rank 0 while a job runs here
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import RtdistError


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RtdistError(f"--run-dir {self.path}: a file of that name exists (or a part of the path is a file): "
                              f"pick another --run-dir") from None
        except NotADirectoryError:
            raise RtdistError(f"--run-dir {self.path}: a part of the path is a file, not a folder: pick another "
                              f"--run-dir") from None


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
