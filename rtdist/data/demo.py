"""A real text corpus without a download: this Python installation's own sources, in the PG-19 layout."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

TEXT_SUFFIXES = (".py", ".pyi", ".txt", ".rst", ".md", ".c", ".h", ".cpp", ".hpp", ".cuh", ".json", ".csv", ".html",
                 ".js", ".css", ".cfg", ".toml", ".ini", ".xml")


def _source_files(roots):
    seen = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for dirpath, dirnames, filenames in os.walk(root):
            # site-packages is a root of its own (after the stdlib); caches are not text
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__")
                                 and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(TEXT_SUFFIXES):
                    path = Path(dirpath) / name
                    yield path, path.relative_to(root)


def build_demo_corpus(out_dir, max_bytes: int = 32 << 20, book_bytes: int = 256 << 10, roots=None) -> dict:
    """Write ``out_dir/{train,validation,test}/<book_id>.txt`` from local text files (sources and docs of the
    standard library, then of the installed packages), at most about ``max_bytes`` in all.

    Files are concatenated in sorted order into "books" of about ``book_bytes``, each file headed by a
    ``# ==== path ====`` line; book 1 of every 50 goes to validation, book 2 to test, the rest to train, so even
    a small corpus has all three splits. Deterministic for a given installation. Returns counts per split."""
    out = Path(out_dir)
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix}
    roots = roots or [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                      sysconfig.get_paths()["platlib"], sysconfig.get_paths(vars=base)["purelib"]]
    for split in ("train", "validation", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    books = {"train": 0, "validation": 0, "test": 0}
    total, book, parts, files = 0, 0, [], 0

    def flush():
        nonlocal book, parts
        if parts:
            split = {1: "validation", 2: "test"}.get(book % 50, "train")
            (out / split / f"{10000 + book}.txt").write_bytes(b"".join(parts))
            books[split] += 1
            book, parts = book + 1, []

    size = 0
    for path, rel in _source_files(roots):
        if total >= max_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        data = f"# ==== {rel.as_posix()} ====\n".encode() + data[:max_bytes - total]
        parts.append(data if data.endswith(b"\n") else data + b"\n")
        size += len(parts[-1])
        total += len(parts[-1])
        files += 1
        if size >= book_bytes:
            flush()
            size = 0
    flush()
    return {"dir": str(out), "bytes": total, "files": files, "books": books}
