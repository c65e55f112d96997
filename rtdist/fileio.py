"""Files that are whole or absent: every write goes to a temporary name beside its target and is renamed over it,
so a crash, a full disk or a kill leaves the previous file (or none), never a torn one that looks complete."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse to sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, sync: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write (``path`` + ``suffix``, by default ``.tmp<pid>``); on
    success it replaces ``path`` (after an fsync with ``sync``), on any error or interruption it is removed and
    ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{suffix or f'.tmp{os.getpid()}'}")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path, sync=True) as tmp:
        Path(tmp).write_text(text)


def atomic_torch_save(obj, path: Path) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
