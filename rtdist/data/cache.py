"""A bounded disk cache of whole shards downloaded from URLs, shared by every rank and worker of a node
(``data.cache_dir``, ``data.cache_limit_gb``).

A shard opened that is not cached yet is read by byte ranges at once (:class:`remote.RangeFile`: a mid-epoch resume's
first batch stays small and fast) while one thread of the process downloads the whole object in the background; the
open file switches to the local copy as soon as it is complete. Later opens (the next epoch, other ranks and workers
on the node) read the local file.

Files in the cache folder:

- ``{sha256[:20]}-{name}.shard``: a complete shard whose sha256 equals the manifest's (named by content, so two manifests
  that share a shard name never mix their objects). Its mtime is its last use (least recently used go first).
- ``{final}.{pid}.tmp``: a download in progress, given its full size before the first byte is fetched (the space is
  reserved, so the folder never grows past the limit while bytes arrive); renamed to the final name once checked.
- ``locks/{final}.lock``: held (``flock`` exclusive) by the one process downloading that shard; another process that
  wants it keeps to range reads instead of fetching it a second time.
- ``cache.lock``: held while space is reserved and files are evicted, so two processes never both count the same
  free space.

A reader holds a shared ``flock`` on each cached file it has open; eviction takes a non-blocking exclusive one, so a
file in use is never removed (and a reader that opened a file just being removed sees it gone and range-reads). When
the files in use leave no room, a download is not started (the shard is range-read): the cache never waits for
space, so it cannot deadlock, and it never holds more than its limit, temporary files included.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import math
import os
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, CorruptShardError, DataError
from .remote import SeekableReader

DOWNLOAD_CHUNK = 8 << 20  # one ranged GET of a background download
DOWNLOAD_THREADS = 2  # downloads in flight per process (each reserves a shard's size in the cache)
RANGE_BYTES = 1 << 20  # reads of a shard served by ranges before waiting for its download (a resume's first batch)
RANGE_WINDOW = 256 << 10  # largest range window meanwhile: less read ahead that the download fetches again


SUFFIX = ".shard"  # a cached shard (any name a manifest may give it); ".tmp": a download in progress


def cached_name(shard: dict) -> str:
    return f"{shard['sha256'][:20]}-{shard['name']}{SUFFIX}"


def check_cache_fits(manifest: dict, cache_dir: str, limit_bytes: int) -> None:
    """A cache limit below the largest shard the manifest lists could never hold it: one error at start."""
    largest = max((s for split in manifest["splits"].values() for s in split["shards"]), key=lambda s: s["bytes"],
                  default=None)
    if largest is not None and largest["bytes"] > limit_bytes:
        raise ConfigError(
            f"data.cache_limit_gb ({limit_bytes / 1e9:g}) is below the largest shard of {manifest['manifest_path']} "
            f"({largest['name']}, {largest['bytes'] / 1e9:g} GB): data.cache_dir {cache_dir} could never hold it; "
            f"raise data.cache_limit_gb to at least {math.ceil(largest['bytes'] / 1e6) / 1e3:g}, or unset data.cache_dir to "
            "range-read every shard")


_HELD: "weakref.WeakSet[_Locked]" = weakref.WeakSet()


def _forget_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the copies of the parent's locked descriptors. An flock belongs
    to the open file, which a fork shares: a child keeping the copy would hold the parent's lock for its whole life
    (a shard lock or cache.lock taken by a download thread at the moment of the fork would block every process)."""
    for held in list(_HELD):
        if held.fd >= 0:
            os.close(held.fd)
            held.fd = -1


os.register_at_fork(after_in_child=_forget_inherited_locks)


class _Locked:
    """An open file descriptor holding an ``flock``; released (and closed) by ``close``."""

    def __init__(self, path: Path, flags: int, mode: int, blocking: bool = True):
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            raise
        _HELD.add(self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor of the open file releases its flock
            self.fd = -1
        _HELD.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def try_lock(path: Path, mode=fcntl.LOCK_EX, flags=os.O_RDWR | os.O_CREAT) -> Optional[_Locked]:
    """``path`` locked at once, or None if another open file holds a conflicting lock (or it is gone)."""
    try:
        return _Locked(path, flags, mode, blocking=False)
    except (BlockingIOError, FileNotFoundError):
        return None


class ShardCache:
    """The cache folder ``root`` bounded to ``limit_bytes``, used by one process (one per folder per process; see
    the module docstring for what it holds and how processes share it)."""

    def __init__(self, root, limit_bytes: int, store):
        self.root, self.limit, self.store = Path(root), int(limit_bytes), store
        self.locks = self.root / "locks"
        try:
            self.locks.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"data.cache_dir {self.root}: cannot write there ({e.strerror or e}); give a writable "
                              "folder on a local disk, or unset it") from None
        # daemon threads (not a ThreadPoolExecutor, which the interpreter waits for at exit): a worker process that
        # ends mid-download ends at once, and its temporary file is removed (atexit) or reclaimed by eviction
        self._slots = threading.BoundedSemaphore(DOWNLOAD_THREADS)
        self._downloads: dict[str, Future] = {}
        self._mutex = threading.Lock()
        self._stopping = False
        atexit.register(self._stop)
        from multiprocessing import util  # a DataLoader worker ends by os._exit: atexit does not run there
        util.Finalize(self, self._stop, exitpriority=10)
        self.downloaded = 0  # shards this process downloaded and published
        self.hits = 0  # opens served by a cached file

    # ------------------------------------------------------------------ reading
    def open_cached(self, shard: dict) -> Optional[_Locked]:
        """The cached copy of ``shard`` opened for reading under a shared lock (its use time updated), or None."""
        path = self.root / cached_name(shard)
        try:
            f = _Locked(path, os.O_RDONLY, fcntl.LOCK_SH)
        except FileNotFoundError:
            return None
        try:
            # evicted between our open and our lock: the name is gone (or is another file by now)
            if os.stat(path).st_ino != os.fstat(f.fd).st_ino:
                raise FileNotFoundError
            os.utime(path)
        except FileNotFoundError:
            f.close()
            return None
        self.hits += 1
        return f

    def download(self, url: str, shard: dict) -> Future:
        """A future of the shard's cached copy (its path; None when no room was free or another process is fetching
        it), downloaded once per process at a time; a shard whose two downloads both missed the manifest's sha256
        ends in ``CorruptShardError``."""
        name = cached_name(shard)
        with self._mutex:
            f = self._downloads.get(name)
            if f is None or f.done():
                f = self._downloads[name] = Future()
                threading.Thread(target=self._run, args=(f, url, shard), daemon=True,
                                 name=f"rtdist-cache {shard['name']}").start()
            return f

    def wait_downloads(self, timeout: float = 600.0) -> None:
        """Wait until this process's downloads have ended (however they ended)."""
        with self._mutex:
            pending = list(self._downloads.values())
        for f in pending:
            try:
                f.exception(timeout)
            except TimeoutError:
                raise DataError(f"data.cache_dir {self.root}: a download still runs after {timeout:g} s") from None

    def _run(self, future: Future, url: str, shard: dict) -> None:
        with self._slots:
            try:
                future.set_result(self._download(url, shard))
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                future.set_exception(e)

    def _stop(self) -> None:
        """At exit: end downloads in flight after their current request and remove their temporary files."""
        self._stopping = True
        for path in self.root.glob(f"*.{os.getpid()}.tmp"):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ downloading
    def _download(self, url: str, shard: dict) -> Optional[Path]:
        final = self.root / cached_name(shard)
        lock = try_lock(self.locks / f"{final.name}.lock")
        if lock is None:  # another rank or worker is fetching it: read ranges until its copy appears
            return None
        with lock:
            if final.exists():
                return final
            for stale in self.root.glob(f"{final.name}.*.tmp"):  # its lock is ours: their writers are gone
                stale.unlink(missing_ok=True)
            tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
            for attempt in (1, 2):
                if not self._reserve(tmp, shard["bytes"]):
                    return None
                try:
                    got = self._fetch_into(url, tmp, shard["bytes"])
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                if got == shard["sha256"]:
                    with self._cache_lock():  # so that usage() never counts a file under both names
                        os.replace(tmp, final)
                    self.downloaded += 1
                    return final
                tmp.unlink(missing_ok=True)
                if attempt == 1:
                    first = got
            raise CorruptShardError(
                f"shard {url}: downloaded twice into data.cache_dir, sha256 {first} then {got}, but the manifest "
                f"says {shard['sha256']}: the object was changed or damaged; re-upload it (tools/preprocess.py "
                "--output-prefix) or set data.skip_corrupt: true")

    def _fetch_into(self, url: str, tmp: Path, size: int) -> str:
        """The object's bytes written over the reserved ``tmp``; returns their sha256."""
        h = hashlib.sha256()
        with open(tmp, "r+b") as out:
            pos = 0
            while pos < size:
                if self._stopping:
                    raise DataError("the process is ending")
                data = self.store.read_range(url, pos, min(size, pos + DOWNLOAD_CHUNK))
                if not data:
                    break  # shorter than the manifest says: the hash will not match
                out.write(data)
                h.update(data)
                pos += len(data)
        return h.hexdigest()

    def _reserve(self, tmp: Path, size: int) -> bool:
        """``tmp`` created at its full ``size`` once the cache holds it within the limit, evicting the least
        recently used files no process has open; False (nothing created) if the files in use leave no room."""
        with self._cache_lock():
            entries = self._entries()
            used = sum(size_ for _, size_, _ in entries)
            for path, nbytes, _ in sorted((e for e in entries if not e[0].name.endswith(".tmp")), key=lambda e: e[2]):
                if used + size <= self.limit:
                    break
                victim = try_lock(path, flags=os.O_RDONLY)
                if victim is None:
                    continue  # a reader has it open
                with victim:
                    path.unlink(missing_ok=True)
                used -= nbytes
            for path, nbytes, _ in entries:  # temporary files of downloads whose process died
                if used + size <= self.limit:
                    break
                if path.name.endswith(".tmp"):
                    owner = try_lock(self.locks / f"{path.name.rsplit('.', 2)[0]}.lock")
                    if owner is not None:
                        with owner:
                            path.unlink(missing_ok=True)
                        used -= nbytes
            if used + size > self.limit:
                return False
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.ftruncate(fd, size)
            except OSError as e:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise DataError(f"data.cache_dir {self.root}: cannot reserve {size} bytes for {tmp.name} "
                                f"({e.strerror or e}): is the disk full? lower data.cache_limit_gb") from None
            os.close(fd)
            return True

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last use) of every shard and temporary file in the cache."""
        out = []
        for entry in os.scandir(self.root):
            if entry.name.endswith((SUFFIX, ".tmp")) and entry.is_file():
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _cache_lock(self, mode=fcntl.LOCK_EX) -> _Locked:
        return _Locked(self.root / "cache.lock", os.O_RDWR | os.O_CREAT, mode)

    def usage(self) -> int:
        """Bytes the cache folder holds now (shards and downloads in progress), counted while no process reserves,
        evicts or publishes a file."""
        return cache_usage(self.root)


class CachingFile(SeekableReader):
    """A shard's file: byte ranges (``range_file``) until the background download (``pending``) has put a checked
    copy in the cache, then that local copy. Range reads serve the first ``RANGE_BYTES`` of reads (a resume's first
    batch does not wait for a whole shard); past them a read waits for this process's download rather than fetch
    the same bytes twice. A failed download's error is raised by the next read."""

    def __init__(self, cache: ShardCache, shard: dict, range_file, pending: Optional[Future] = None,
                 local: Optional[_Locked] = None):
        self.cache, self.shard, self.range_file, self.pending = cache, shard, range_file, pending
        self.local = local
        self.pos, self.size = 0, shard["bytes"]
        self.range_bytes = 0  # bytes read through ranges so far
        self._look_again = None  # when to look for a copy another process is downloading

    def _source(self):
        if self.local is not None:
            return self.local
        if self.pending is not None and (self.pending.done() or self.range_bytes >= RANGE_BYTES):
            pending, self.pending = self.pending, None
            if pending.result() is not None:  # raises the download's error
                self.local = self.cache.open_cached(self.shard)
            else:  # no room, or another process is downloading it
                self._look_again = time.monotonic() + 1.0
        elif self._look_again is not None and time.monotonic() >= self._look_again:
            self.local = self.cache.open_cached(self.shard)
            self._look_again = time.monotonic() + 1.0
        if self.local is not None:
            self.range_file.close()
        return self.local

    def read(self, n: int = -1) -> bytes:
        local = self._source()
        if local is not None:
            data = os.pread(local.fd, self.shard["bytes"] - self.pos if n is None or n < 0 else n, self.pos)
        else:
            self.range_file.seek(self.pos)
            data = self.range_file.read(n)
            self.range_bytes += len(data)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        if self.range_file is not None:
            self.range_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cache_usage(root) -> int:
    """Bytes the cache folder ``root`` holds (shards and reserved downloads), a consistent snapshot: changes to the
    folder's size are made under ``cache.lock``, held shared here."""
    root = Path(root)
    total = 0
    with _Locked(root / "cache.lock", os.O_RDWR | os.O_CREAT, fcntl.LOCK_SH):
        for entry in os.scandir(root):
            if entry.name.endswith((SUFFIX, ".tmp")):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:  # removed as we looked (a failed download): smaller, never larger
                    pass
    return total


_CACHES: dict = {}


def cache_for(root: str, limit_bytes: int, store) -> ShardCache:
    """One ShardCache per folder and store per process (a forked worker makes its own threads and counters)."""
    key = (os.getpid(), str(root), int(limit_bytes), id(store))
    if key not in _CACHES:
        _CACHES[key] = ShardCache(root, limit_bytes, store)
    return _CACHES[key]


def open_through_cache(cache: ShardCache, url: str, shard: dict, range_file) -> CachingFile:
    """``shard``'s file: its cached copy when there is one, else ``range_file`` while a download starts."""
    local = cache.open_cached(shard)
    if local is not None:
        range_file.close()
        return CachingFile(cache, shard, range_file, local=local)
    return CachingFile(cache, shard, range_file, pending=cache.download(url, shard))
