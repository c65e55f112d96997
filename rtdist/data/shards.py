"""Token shards on disk: a byte-reproducible tar writer, a validating random-access reader, the manifest.

A shard is a plain (webdataset-compatible) USTAR tar holding one member per sample, ``{key}.tokens.npy``, where the
key is ``{book}_{chunk:06d}`` without dots. Every member of a split has the same size (``sample_tokens`` tokens of
one dtype), so sample ``i`` of a shard starts at byte ``i * member_bytes``: the loader can resume anywhere by seeking,
and a reader can tell a truncated or foreign file from a good one without scanning it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptShardError, DataError, RtdistError
from .remote import RangeFile, RemoteError, RemoteOptions, is_url, sibling, store_for
from ..fileio import atomic_path

FORMAT = "rtdist-shards/1"
MEMBER_SUFFIX = ".tokens.npy"
FIXED_MTIME = 946684800  # 2000-01-01 UTC: same bytes on every run
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar files are padded to whole records
SHARD_RE = r"(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def manifest_path_for(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}-manifest.json")


def shard_name(prefix_name: str, split: str, index: int) -> str:
    return f"{prefix_name}-{split}-{index:06d}.tar"


@dataclass(frozen=True)
class SampleLayout:  # (properties are cheap enough to recompute: hot paths keep their own copies)
    """Byte layout of one sample member: 512-byte tar header, npy header, tokens, zero padding to 512."""

    dtype: np.dtype
    sample_tokens: int

    @property
    def npy_header(self) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(self.dtype.newbyteorder("<")),
                  "fortran_order": False, "shape": (self.sample_tokens,)})
        return buf.getvalue()

    @property
    def payload_bytes(self) -> int:  # the npy file
        return len(self.npy_header) + self.sample_tokens * self.dtype.itemsize

    @property
    def member_bytes(self) -> int:
        return BLOCK + -(-self.payload_bytes // BLOCK) * BLOCK

    def to_dict(self) -> dict:
        return {"member": "{key}" + MEMBER_SUFFIX, "member_bytes": self.member_bytes,
                "npy_bytes": self.payload_bytes, "npy_header_bytes": len(self.npy_header)}


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, FIXED_MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class _HeaderTemplate:
    """``tar_header(name, size)`` for a fixed size, ~20x faster: patch the name and checksum of a template."""

    def __init__(self, size: int):
        self.template = bytearray(tar_header("x", size))
        self.template[148:156] = b" " * 8  # checksum is computed with its own field as spaces
        self.base = sum(self.template) - ord("x")

    def __call__(self, name: str) -> bytes:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            raise ValueError(f"tar member name {name!r} is over 100 bytes")
        header = bytearray(self.template)
        header[:100] = raw.ljust(100, b"\0")
        header[148:155] = b"%06o\0" % (self.base + sum(raw))
        return bytes(header)


def shard_capacity(layout: SampleLayout, maxcount: int, maxsize: int) -> int:
    """Samples per shard under ``ShardWriter``'s rule (all members have the same size)."""
    return max(1, min(maxcount, (maxsize - 2 * BLOCK) // layout.member_bytes))


def tar_end_bytes(nbytes: int) -> bytes:
    """Two zero blocks, then zero padding to a whole record (what tarfile writes on close)."""
    end = nbytes + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


def os_error_at(e: OSError, path) -> OSError:
    """``e`` naming ``path`` (a failed write carries no file name), built anew so that the name survives pickling
    from a worker process."""
    return OSError(e.errno, e.strerror or str(e), str(path))


class ShardWriter:
    """Writes samples to ``{prefix}-{split}-%06d.tar`` shards, starting a new one at ``maxcount`` samples or
    ``maxsize`` bytes. Each shard is written as ``name.tmp`` and renamed only once complete and synced, so a file
    with a final name is always whole. ``shards`` lists what was written (name, samples, tokens, bytes, sha256)."""

    def __init__(self, prefix: str | os.PathLike, split: str, layout: SampleLayout, tokens_per_sample: int,
                 maxcount: int = 10000, maxsize: int = 1 << 30, first_index: int = 0):
        if maxcount < 1:
            raise DataError(f"maxcount must be >= 1, got {maxcount}")
        if maxsize < layout.member_bytes + 2 * BLOCK:
            raise DataError(f"maxsize {maxsize} bytes cannot hold one sample ({layout.member_bytes} bytes "
                            f"+ {2 * BLOCK} of tar end): raise --maxsize")
        self.dir, self.prefix_name = Path(prefix).parent, Path(prefix).name
        self.split, self.layout, self.tokens_per_sample = split, layout, tokens_per_sample
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict] = []
        self.first_index = first_index
        self._file = None
        self._header = _HeaderTemplate(layout.payload_bytes)
        self._npy_header = layout.npy_header
        self._dtype = layout.dtype.newbyteorder("<")
        self._member_bytes = layout.member_bytes

    def write(self, key: str, tokens: np.ndarray) -> None:
        self.write_many([key], tokens[None])

    def write_many(self, keys: list[str], samples: np.ndarray) -> None:
        """Write ``samples`` ([n, sample_tokens]) under ``keys``, splitting at shard boundaries as needed."""
        if samples.ndim != 2 or samples.shape[1] != self.layout.sample_tokens or len(keys) != len(samples):
            raise ValueError(f"samples {samples.shape} for {len(keys)} keys: the layout needs "
                             f"[n, {self.layout.sample_tokens}]")
        done = 0
        while done < len(keys):
            if self._file is not None and (self._count >= self.maxcount or
                                           self._bytes + self._member_bytes + 2 * BLOCK > self.maxsize):
                self._close_shard()
            if self._file is None:
                self._open_shard()
            room = min(self.maxcount - self._count,
                       (self.maxsize - 2 * BLOCK - self._bytes) // self._member_bytes)
            n = min(room, len(keys) - done)
            self._put(self._members(keys[done:done + n], samples[done:done + n]))
            self._count += n
            done += n

    def _members(self, keys: list[str], samples: np.ndarray) -> memoryview:
        """Tar members of ``samples`` built in one buffer (numpy does the copying, not Python)."""
        n, h = len(keys), len(self._npy_header)
        buf = np.zeros((n, self._member_bytes), np.uint8)
        buf[:, :BLOCK] = np.frombuffer(b"".join(self._header(k + MEMBER_SUFFIX) for k in keys),
                                       np.uint8).reshape(n, BLOCK)
        buf[:, BLOCK:BLOCK + h] = np.frombuffer(self._npy_header, np.uint8)
        payload = samples.astype(self._dtype, copy=False)
        buf[:, BLOCK + h:BLOCK + h + payload.shape[1] * self._dtype.itemsize] = \
            np.ascontiguousarray(payload).view(np.uint8)
        return memoryview(buf).cast("B")

    def next_shard(self) -> None:
        """Close the current shard now; the next sample starts a new one."""
        if self._file is not None:
            self._close_shard()

    def close(self) -> list[dict]:
        self.next_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (on error or interrupt): its temporary file is removed."""
        if self._file is not None:
            self._file.close()
            self._file = None
            Path(self._tmp).unlink(missing_ok=True)

    def _put(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise os_error_at(e, self._tmp) from None
        self._hash.update(data)
        self._bytes += len(data)

    def _open_shard(self) -> None:
        self._name = shard_name(self.prefix_name, self.split, self.first_index + len(self.shards))
        self._tmp = self.dir / (self._name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hash, self._bytes, self._count = hashlib.sha256(), 0, 0

    def _close_shard(self) -> None:
        self._put(tar_end_bytes(self._bytes))
        try:  # a full disk may only show here (buffered writes)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            raise os_error_at(e, self._tmp) from None
        self._file = None
        os.replace(self._tmp, self.dir / self._name)
        self.shards.append({"name": self._name, "samples": self._count,
                            "tokens": self._count * self.tokens_per_sample,
                            "bytes": self._bytes, "sha256": self._hash.hexdigest()})


# --------------------------------------------------------------------------------------------------- manifest

def load_manifest(path: str | os.PathLike, remote=None) -> dict:
    """Read ``{prefix}-manifest.json`` (a prefix works too) and check its structure, so that a damaged or foreign
    manifest is named here rather than met as a KeyError later. ``path`` may be a URL (``s3://``, ``gs://``,
    ``http(s)://``, ``pipe:``; see ``remote.py``), read with ``remote`` (``RemoteOptions``: storage options, retry
    budget). The returned dict gains ``manifest_path`` (an absolute path or the URL) so that shard and tokenizer
    files are found next to it, and ``remote_options`` for a URL (what every reader of its shards uses)."""
    if is_url(path):
        url = str(path)
        if not url.startswith("pipe:") and not url.endswith(".json"):
            url = f"{url}-manifest.json"
        options = remote or RemoteOptions()
        try:
            manifest = json.loads(store_for(options).read_all(url).decode("utf-8"))
        except ValueError as e:
            raise DataError(f"cannot read manifest {url}: {e}")
        where = url
    else:
        path = Path(path)
        if path.suffix != ".json":
            path = manifest_path_for(path)
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"no manifest at {path}: run tools/preprocess.py first (or the run did not finish)")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read manifest {path}: {e}")
        where = path
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{where} is not an rtdist shard manifest (format {found!r}, expected {FORMAT!r})")
    _check_manifest(manifest, where)
    if is_url(path):
        manifest["manifest_path"] = where
        manifest["remote_options"] = vars(options).copy()
        if options.cache_dir:
            from .cache import check_cache_fits
            check_cache_fits(manifest, options.cache_dir, options.cache_limit_bytes)
    else:
        manifest["manifest_path"] = str(path.resolve())
    return manifest


def _check_manifest(m: dict, path: Path) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise DataError(f"{path}: {key} {what}; the manifest is damaged or was not written by "
                            "tools/preprocess.py: re-run it")

    def is_int(v, low=0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    for key in ("seq_length", "sample_tokens", "dtype", "tokenizer", "splits"):
        need(key in m, repr(key), "is missing")
    need(is_int(m["seq_length"], 1), "seq_length", f"{m['seq_length']!r} is not an integer >= 1")
    need(m["sample_tokens"] == m["seq_length"] + 1, "sample_tokens", f"{m['sample_tokens']!r} is not seq_length + 1")
    tok = m["tokenizer"]
    need(isinstance(tok, dict) and isinstance(tok.get("type"), str), "tokenizer", "has no type")
    need(is_int(tok.get("vocab_size"), 2), "tokenizer.vocab_size", f"{tok.get('vocab_size')!r} is not an integer >= 2")
    need(is_int(tok.get("eod_id")) and tok["eod_id"] < tok["vocab_size"], "tokenizer.eod_id",
         f"{tok.get('eod_id')!r} is not a token id below vocab_size {tok['vocab_size']}")
    want = token_dtype(tok["vocab_size"]).name
    need(m["dtype"] == want, "dtype", f"{m['dtype']!r} does not hold a vocabulary of {tok['vocab_size']} ({want} does)")
    need(isinstance(m["splits"], dict), "splits", "is not a mapping of split names")
    listed: dict[str, str] = {}  # shard name -> where first listed: a shard listed twice would be read twice
    for split, info in m["splits"].items():
        need(isinstance(info, dict) and isinstance(info.get("shards"), list), f"splits.{split}.shards",
             "is not a list")
        need(is_int(info.get("samples")), f"splits.{split}.samples", f"{info.get('samples')!r} is not a count")
        for i, shard in enumerate(info["shards"]):
            key = f"splits.{split}.shards[{i}]"
            need(isinstance(shard, dict), key, "is not an object")
            name = shard.get("name")
            need(isinstance(name, str) and name and Path(name).name == name and name not in (".", ".."),
                 f"{key}.name", f"{name!r} is not a file name next to the manifest")
            need(name not in listed, f"{key}.name", f"{name!r} is listed twice (also as {listed.get(name)}): its "
                                                    "samples would be read twice")
            listed[name] = key
            for field in ("samples", "tokens", "bytes"):
                need(is_int(shard.get(field)), f"{key}.{field}", f"{shard.get(field)!r} is not a count")
            need(isinstance(shard.get("sha256"), str), f"{key}.sha256", "is missing")


SAMPLE_LAYOUT = ("tokens.npy holds seq_length + 1 tokens: inputs = tokens[:-1], targets = tokens[1:]; "
                 "consecutive samples of a stream overlap by one token")


def build_manifest(prefix_name: str, seq_length: int, tokenizer: dict, splits: dict, **extra) -> dict:
    """The manifest of shards written by ``ShardWriter``s: ``splits`` maps a split to a dict with at least
    ``shards`` (the writer's list); sample and token totals are filled in. ``extra`` keys are appended."""
    layout = SampleLayout(token_dtype(tokenizer["vocab_size"]), seq_length + 1)
    for info in splits.values():
        info.setdefault("samples", sum(s["samples"] for s in info["shards"]))
        info.setdefault("tokens", info["samples"] * seq_length)
    return {"format": FORMAT, "prefix": prefix_name, "seq_length": seq_length, "sample_tokens": seq_length + 1,
            "sample_layout": SAMPLE_LAYOUT, "dtype": layout.dtype.name, "layout": layout.to_dict(),
            "tokenizer": tokenizer, "total_tokens": sum(v["tokens"] for v in splits.values()),
            "total_samples": sum(v["samples"] for v in splits.values()), "splits": splits, **extra}


def manifest_dir(manifest: dict) -> Path:
    return Path(manifest["manifest_path"]).parent


def is_remote(manifest: dict) -> bool:
    return is_url(manifest["manifest_path"])


def shard_location(manifest: dict, shard: dict | str) -> str:
    """Where a shard (an entry or a name) of the manifest is: a path or URL next to the manifest."""
    name = shard if isinstance(shard, str) else shard["name"]
    if is_remote(manifest):
        return sibling(manifest["manifest_path"], name)
    return str(manifest_dir(manifest) / name)


def manifest_store(manifest: dict):
    """The ``remote.Store`` reading a remote manifest's objects in this process."""
    return store_for(RemoteOptions(**manifest.get("remote_options", {})))


def fetch_beside(manifest: dict, name: str) -> Path:
    """A local copy of the small file ``name`` next to a remote manifest (a tokenizer model), in a folder of this
    process's temporary directory, written under a temporary name first."""
    import tempfile
    folder = Path(tempfile.gettempdir()) / f"rtdist-remote-{os.getpid()}" / hashlib.sha256(
        manifest["manifest_path"].encode()).hexdigest()[:16]
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(manifest_store(manifest).read_all(shard_location(manifest, name)))
        os.replace(tmp, path)
    return path


def open_shard(manifest: dict, shard: dict, check_size: bool = False):
    """(binary file, size) of a shard: a local file, or a ``RangeFile`` over a URL (through the node's cache folder
    when the manifest's remote options name one: ``cache.py``). A URL's size is the manifest's unless ``check_size``
    asks the server (one request); a shorter object shows as a short read."""
    location = shard_location(manifest, shard)
    if is_remote(manifest):
        store = manifest_store(manifest)
        if location.startswith("pipe:"):  # a command's output: read whole, once
            data = store.read_all(location)
            return io.BytesIO(data), len(data)
        size = store.size(location) if check_size else shard["bytes"]
        cache_dir = manifest["remote_options"].get("cache_dir")
        if cache_dir and not check_size:  # (the pre-flight check reads a few ranges: it starts no downloads)
            from .cache import RANGE_WINDOW, cache_for, open_through_cache
            cache = cache_for(cache_dir, manifest["remote_options"]["cache_limit_bytes"], store)
            ranges = RangeFile(store, location, size, shard.get("sha256"), max_fetch=RANGE_WINDOW, ahead=1)
            return open_through_cache(cache, location, shard, ranges), size
        return RangeFile(store, location, size, shard.get("sha256")), size
    f = open(location, "rb")
    return f, os.fstat(f.fileno()).st_size


def layout_of(manifest: dict) -> SampleLayout:
    return SampleLayout(np.dtype(manifest["dtype"]), manifest["sample_tokens"])


def split_info(manifest: dict, split: str) -> dict:
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in {manifest.get('manifest_path')}: "
                        f"it has {sorted(manifest['splits'])}")
    return manifest["splits"][split]


def write_json_atomic(path: Path, obj) -> None:
    try:
        with atomic_path(path, suffix=".tmp") as tmp:  # ".tmp": what a failed run's clean-up looks for
            tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise os_error_at(e, Path(f"{path}.tmp")) from None


# --------------------------------------------------------------------------------------------------- reading

FIX_HINT = "re-run tools/preprocess.py to rewrite it, or set data.skip_corrupt: true to train without it"


def shard_bytes(layout: SampleLayout, samples: int) -> int:
    """Size of a shard of ``samples`` members as ``ShardWriter`` writes it (tar end and record padding included)."""
    body = samples * layout.member_bytes
    return body + len(tar_end_bytes(body))


class ShardReader:
    """Random access to the samples of one split's shards, checking each member against the layout.

    Cheap checks on every read (file size; each member's tar header, npy header and token range, as
    ``check_shards`` checks them) catch truncated, overwritten and foreign files with an error naming the shard;
    the sha256 in the manifest is checked by ``check_shards(mode="full")`` and ``verify_shards`` (a full read), and
    for a URL's shard read front to back by ``RangeFile``."""

    def __init__(self, manifest: dict, max_open: int = 4):
        self.layout = layout_of(manifest)
        self.manifest = manifest
        self._stride = self.layout.member_bytes
        self._check = _MemberCheck(self.layout, manifest["tokenizer"]["vocab_size"])
        self._files: dict[str, object] = {}
        self._max_open = max_open

    def _open(self, shard: dict):
        f = self._files.pop(shard["name"], None)
        if f is None:
            path = shard_location(self.manifest, shard)
            try:
                f, size = open_shard(self.manifest, shard)
            except OSError as e:
                raise CorruptShardError(f"shard {path}: cannot open ({e.strerror or e}); {FIX_HINT}")
            if size != shard["bytes"]:
                f.close()
                raise CorruptShardError(
                    f"shard {path}: {size} bytes but the manifest says {shard['bytes']} "
                    f"({'truncated' if size < shard['bytes'] else 'rewritten'}?); {FIX_HINT}")
            if len(self._files) >= self._max_open:
                self._files.pop(next(iter(self._files))).close()
        self._files[shard["name"]] = f  # most recent last
        return f

    def prefetch(self, shard: dict) -> None:
        """Open ``shard``, the next one to be read front to back, and start its first fetches in the background
        (a URL's first windows; through a cache folder, opening starts its download). A problem is left for the
        read to raise."""
        try:
            f = self._open(shard)
        except RtdistError:
            return
        if isinstance(f, RangeFile):
            f.prefetch()

    def read(self, shard: dict, index: int) -> tuple[str, np.ndarray]:
        """Sample ``index`` of ``shard`` (a manifest shard entry): (key, tokens)."""
        keys, tokens = self.read_run(shard, index, 1)
        return keys[0], tokens[0]

    def read_run(self, shard: dict, index: int, count: int) -> tuple[list[str], np.ndarray]:
        """Samples ``index`` to ``index + count - 1`` of ``shard`` in one read: (keys, tokens[count, sample_tokens]).
        One read and one numpy check for a run costs about what one sample did alone, which is what makes a
        sequential reader fast."""
        f, offset, size = self._open(shard), index * self._stride, count * self._stride
        where = f"shard {shard_location(self.manifest, shard)}"
        try:
            f.seek(offset)
            buf = f.read(size)
        except OSError as e:
            raise CorruptShardError(f"{where}: reading byte {offset} failed ({e.strerror or e}); {FIX_HINT}") from None
        if len(buf) < size:
            bad = index + len(buf) // self._stride
            raise CorruptShardError(f"{where}: sample {bad} at byte {bad * self._stride}: file ends early (truncated); "
                                    f"{FIX_HINT}")
        rows = np.frombuffer(buf, np.uint8).reshape(count, self._stride)
        problem = self._check.first_problem(rows, index)
        if problem:
            raise CorruptShardError(f"{where}: {problem}; {FIX_HINT}")
        if index + count == shard["samples"]:  # and the tar end: read front to back, a URL's shard is then hashed
            f.read(shard["bytes"] - offset - size)  # whole and checked against the manifest's (remote.RangeFile)
        suffix = len(MEMBER_SUFFIX)
        keys = [buf[k:k + 100].rstrip(b"\0")[:-suffix].decode("utf-8", "replace") for k in range(0, size, self._stride)]
        return keys, self._check.tokens(rows)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# --------------------------------------------------------------------------------------------------- checking

VERIFY_MODES = ("quick", "full", "off")
MAX_LISTED = 50  # bad shards named in one error (a whole missing folder would otherwise make a huge line)


class _MemberCheck:
    """Checks many members at once (numpy over a [n, member_bytes] buffer): every tar header field but the name
    and checksum equals ``ShardWriter``'s, the name is ``{key}.tokens.npy``, the checksum is right, the npy
    header is the layout's and every token is below vocab_size."""

    def __init__(self, layout: SampleLayout, vocab_size: int):
        self.layout, self.vocab_size = layout, vocab_size
        self.template = np.frombuffer(tar_header("x", layout.payload_bytes), np.uint8)
        self.npy = np.frombuffer(layout.npy_header, np.uint8)
        self.suffix = np.frombuffer(MEMBER_SUFFIX.encode(), np.uint8)
        self.dtype = layout.dtype.newbyteorder("<")

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        """The tokens of each member of ``rows`` (C-contiguous [n, member_bytes] uint8): a [n, sample_tokens] view,
        no copy."""
        return np.ndarray((len(rows), self.layout.sample_tokens), self.dtype, rows, BLOCK + len(self.npy),
                          (rows.strides[0], self.dtype.itemsize))

    def first_problem(self, rows: np.ndarray, first: int) -> str | None:
        """The first bad member of ``rows`` (members ``first``, ``first + 1``, ...) and what is wrong, or None."""
        hdr, n = rows[:, :BLOCK], len(rows)
        name = hdr[:, :100]
        end = np.where((name == 0).any(1), (name == 0).argmax(1), 100)  # name length
        tail = end[:, None] - len(self.suffix) + np.arange(len(self.suffix))
        name_ok = (end > len(self.suffix)) & (np.take_along_axis(name, np.maximum(tail, 0), 1) == self.suffix).all(1)
        name_ok &= (np.where(np.arange(100) >= end[:, None], name, 0) == 0).all(1)
        size_ok = (hdr[:, 124:136] == self.template[124:136]).all(1)
        fields_ok = ((hdr[:, 100:124] == self.template[100:124]).all(1) &
                     (hdr[:, 136:148] == self.template[136:148]).all(1) & (hdr[:, 156:] == self.template[156:]).all(1))
        digits = hdr[:, 148:154].astype(np.int64) - ord("0")
        stored = np.where(((digits >= 0) & (digits < 8)).all(1), digits @ (8 ** np.arange(5, -1, -1)), -1)
        checksum_ok = stored == hdr.sum(1, dtype=np.int64) - hdr[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
        h = len(self.npy)
        npy_ok = (rows[:, BLOCK:BLOCK + h] == self.npy).all(1)
        top = self.tokens(rows).max(1)
        checks = [(name_ok, lambda i: f"member name is not {{key}}{MEMBER_SUFFIX} (not our layout)"),
                  (checksum_ok, lambda i: "tar header checksum mismatch"),
                  (size_ok, lambda i: f"member size is not {self.layout.payload_bytes} bytes (npy of "
                                      f"{self.layout.dtype}[{self.layout.sample_tokens}]): another seq_length or "
                                      "dtype"),
                  (fields_ok, lambda i: "tar header fields (mode, owner, mtime, type) are not those ShardWriter "
                                        "writes"),
                  (npy_ok, lambda i: f"npy header is not {self.layout.dtype}[{self.layout.sample_tokens}]"),
                  (top < self.vocab_size, lambda i: f"token {int(top[i])} >= vocab_size {self.vocab_size}")]
        good = np.ones(n, bool)
        for ok, _ in checks:
            good &= ok
        if good.all():
            return None
        i = int(np.argmin(good))
        what = next(msg for ok, msg in checks if not ok[i])
        return f"sample {first + i} at byte {(first + i) * self.layout.member_bytes}: {what(i)}"


def manifest_shards(manifest: dict, splits=None) -> list[dict]:
    """The shard entries of ``splits`` (default: all), in manifest order: what a trainer slices between ranks
    before ``check_shards(..., shards=...)``."""
    return [shard for split in (splits or manifest["splits"]) for shard in split_info(manifest, split)["shards"]]


def shard_problem(manifest: dict, shard: dict, full: bool) -> str | None:
    """What is wrong with one shard (None if nothing). Always: the file is there, its size is the manifest's and
    fits the manifest's sample count, the first and last member are valid and the tar end is zeros. ``full``:
    every member is valid and the whole file's sha256 is the manifest's."""
    layout = layout_of(manifest)
    try:
        f, size = open_shard(manifest, shard, check_size=True)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    except RemoteError as e:  # a URL: not found is a missing shard; a server down or refusing is raised as it is
        if e.not_found:
            return "missing (not found at the URL)"
        raise
    if size != shard["bytes"]:
        f.close()
        return (f"{size} bytes but the manifest says {shard['bytes']} "
                f"({'truncated' if size < shard['bytes'] else 'rewritten'}?)")
    n, member = shard["samples"], layout.member_bytes
    if shard_bytes(layout, n) != size:
        f.close()
        return f"{size} bytes cannot hold the manifest's {n} samples ({shard_bytes(layout, n)} bytes would)"
    check = _MemberCheck(layout, manifest["tokenizer"]["vocab_size"])
    try:
        with f:
            if full:
                digest, per_read = hashlib.sha256(), max(1, (4 << 20) // member)
                for first in range(0, n, per_read):
                    data = f.read(min(per_read, n - first) * member)
                    digest.update(data)
                    problem = check.first_problem(np.frombuffer(data, np.uint8).reshape(-1, member), first)
                    if problem:
                        return problem
                end = f.read()
                digest.update(end)
                if digest.hexdigest() != shard["sha256"]:
                    return f"sha256 {digest.hexdigest()[:12]}.. is not the manifest's {shard['sha256'][:12]}.."
            else:
                for i in sorted({0, n - 1}) if n else []:
                    f.seek(i * member)
                    problem = check.first_problem(np.frombuffer(f.read(member), np.uint8)[None], i)
                    if problem:
                        return problem
                f.seek(n * member)
                end = f.read()
    except OSError as e:
        return f"reading failed ({e.strerror or e})"
    except CorruptShardError as e:  # a URL read front to back whose sha256 is not the manifest's
        return str(e).split(": ", 1)[-1]
    if any(end):
        return f"the tar end (last {len(end)} bytes) is not zeros"
    return None


def shard_problems(manifest: dict, splits=None, mode: str = "quick", shards=None, progress=None) -> list[str]:
    """One line per bad shard (path: what is wrong) among the shards of ``splits`` (default: all), or only
    ``shards`` (entries or names among them, e.g. this rank's slice of ``manifest_shards(manifest, splits)``), by
    the ``mode`` check of :func:`check_shards`."""
    if mode not in VERIFY_MODES:
        raise DataError(f"verify mode {mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    if mode == "off":
        return []
    listed = manifest_shards(manifest, splits)
    if shards is None:
        todo = listed
    else:
        by_name = {s["name"]: s for s in listed}
        names = [s if isinstance(s, str) else s["name"] for s in shards]
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise DataError(f"shards {unknown[:3]} are not in splits {list(splits or manifest['splits'])} of "
                            f"{manifest['manifest_path']}")
        todo = [by_name[name] for name in names]
    bad = []
    for shard in todo:
        problem = shard_problem(manifest, shard, full=mode == "full")
        if problem:
            bad.append(f"{shard_location(manifest, shard)}: {problem}")
        if progress is not None:
            progress.update(shard["bytes"])
    return bad


def corrupt_shards_message(manifest: dict, bad: list[str], checked: int, mode: str) -> str:
    """What :func:`check_shards` says of the ``bad`` lines among ``checked`` shards (without the remedy)."""
    shown = "; ".join(bad[:MAX_LISTED]) + (f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED
                                            else "")
    return f"{len(bad)} of {checked} shards of {manifest['manifest_path']} failed the {mode} check: {shown}"


def check_shards(manifest: dict, splits=None, mode: str = "quick", shards=None, progress=None) -> None:
    """Pre-flight check of the shards a manifest lists, before training reads them (``data.verify``):

    - ``quick``: every shard is present, its size is the manifest's, its first and last member's tar and npy
      headers are valid and its tar end is zeros (a few KB read per shard);
    - ``full``: also every member and the sha256 of the whole file (reads everything);
    - ``off``: nothing.

    ``splits`` and ``shards`` pick the shards as in :func:`shard_problems`. Raises one ``CorruptShardError`` naming
    every bad shard and what is wrong with it."""
    bad = shard_problems(manifest, splits, mode, shards, progress)
    if bad:
        checked = len(shards) if shards is not None else len(manifest_shards(manifest, splits))
        raise CorruptShardError(f"{corrupt_shards_message(manifest, bad, checked, mode)}. Re-run tools/preprocess.py "
                                f"with the same flags to rewrite them, or set data.skip_corrupt: true to train "
                                f"without them")


def verify_shards(manifest: dict, splits=None, progress=None) -> list[str]:
    """Check every shard of ``splits`` against the manifest: ``check_shards``'s full check, plus what tarfile
    reads (member count), unique keys, token counts and the split totals. Returns the problems found."""
    problems = []
    for split in splits or manifest["splits"]:
        info = split_info(manifest, split)
        keys = set()
        for shard in info["shards"]:
            path = shard_location(manifest, shard)
            problem = shard_problem(manifest, shard, full=True)
            if progress is not None:
                progress.update(shard["bytes"])
            if problem:
                problems.append(f"{path}: {problem}")
                continue
            try:
                f, _ = open_shard(manifest, shard)
                with f, tarfile.open(fileobj=f, mode="r:") as tar:
                    names = tar.getnames()
            except (OSError, tarfile.TarError, DataError) as e:
                problems.append(f"{path}: tarfile cannot read it ({e})")
                continue
            if len(names) != shard["samples"]:
                problems.append(f"{path}: {len(names)} members, manifest says {shard['samples']} samples")
            for name in names:
                key = name[:-len(MEMBER_SUFFIX)]
                if key in keys:
                    problems.append(f"{path}: duplicate key {key}")
                keys.add(key)
            if shard["tokens"] != shard["samples"] * manifest["seq_length"]:
                problems.append(f"{path}: tokens {shard['tokens']} != samples x seq_length")
        counted = sum(s["samples"] for s in info["shards"])
        if counted != info["samples"]:
            problems.append(f"split {split}: shards hold {counted} samples, split total says {info['samples']}")
    return problems


def find_shard_files(prefix: str | os.PathLike) -> list[Path]:
    """Finished shard files of ``prefix`` on disk (any split)."""
    prefix = Path(prefix)
    pattern = re.compile(re.escape(prefix.name) + "-" + SHARD_RE + "$")
    if not prefix.parent.is_dir():
        return []
    return sorted(p for p in prefix.parent.iterdir() if pattern.match(p.name))


def read_sample(manifest: dict, split: str, index: int | None = None, key: str | None = None):
    """Sample number ``index`` of ``split`` (in shard order), or the one named ``key``: (shard name, key, tokens)."""
    shards = split_info(manifest, split)["shards"]
    reader = ShardReader(manifest)
    try:
        if key is None:
            total = sum(s["samples"] for s in shards)
            if not 0 <= index < total:
                raise DataError(f"split {split} has {total} samples: index {index} is out of range")
            for shard in shards:
                if index < shard["samples"]:
                    return (shard["name"], *reader.read(shard, index))
                index -= shard["samples"]
        for shard in shards:  # by key: headers only would do, but shards are local and this is a debug tool
            for i in range(shard["samples"]):
                found, tokens = reader.read(shard, i)
                if found == key:
                    return shard["name"], found, tokens
        raise DataError(f"no sample with key {key!r} in split {split}")
    finally:
        reader.close()


class ShardUploader:
    """Uploads each shard ``ShardWriter`` finishes under ``prefix`` (a local staging prefix) to ``url_prefix`` while
    preprocessing goes on: a shard's final name appears only once it is complete (it is renamed from ``.tmp``), so
    a thread looks for new ones every ``interval_s`` and puts them up. ``publish_shards(..., uploaded=...)`` then
    skips those still unchanged and puts the manifest last. Files older than the uploader (a previous run's, which
    preprocess removes) are never uploaded."""

    def __init__(self, prefix, url_prefix: str, remote=None, interval_s: float = 0.5, log=print):
        self.prefix, self.url_prefix, self.interval_s, self.log = Path(prefix), url_prefix, interval_s, log
        self.store = store_for(remote or RemoteOptions())
        self.uploaded: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when uploaded
        self.error: BaseException | None = None
        self._started_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rtdist-upload")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._pass()
            self._stop.wait(self.interval_s)

    def _pass(self) -> None:
        url = f"{self.url_prefix}-manifest.json"
        for path in sorted(self.prefix.parent.glob(f"{glob.escape(self.prefix.name)}-*-[0-9]*.tar")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime_ns < self._started_ns or self.uploaded.get(path.name) == (st.st_size, st.st_mtime_ns):
                continue
            try:
                self.store.upload(path, sibling(url, path.name))
            except Exception as e:  # noqa: BLE001 - publish_shards uploads it again, and raises if it still fails
                self.error = e
                continue
            self.uploaded[path.name] = (st.st_size, st.st_mtime_ns)
            self.log(f"uploaded {sibling(url, path.name)} ({st.st_size / 1e6:.1f} MB) as soon as it was complete")

    def close(self) -> dict:
        """Stop, after one last look; what was uploaded (for ``publish_shards``)."""
        self._stop.set()
        self._thread.join()
        self._pass()
        return self.uploaded


def publish_shards(manifest_path: str | os.PathLike, url_prefix: str, remote=None, log=print,
                   uploaded: dict | None = None) -> str:
    """Upload what a local manifest names (every shard, the tokenizer model if any) to ``{url_prefix}-...``, and the
    manifest last, so that a reader never finds a manifest whose shards are not all there. Each object appears only
    once its upload is complete (S3 and GCS puts are atomic). ``uploaded`` (``ShardUploader.close()``): files put
    up already, skipped while their size and mtime are still those uploaded. Returns the manifest's URL."""
    manifest = load_manifest(manifest_path)
    local_dir, name = manifest_dir(manifest), Path(url_prefix.rstrip("/")).name
    if name != manifest.get("prefix"):
        raise DataError(f"--output-prefix {url_prefix}: its last part {name!r} must be the shards' prefix name "
                        f"{manifest.get('prefix')!r} (shard names in the manifest start with it)")
    store = store_for(remote or RemoteOptions())
    url = f"{url_prefix}-manifest.json"
    files = [s["name"] for split in manifest["splits"] for s in split_info(manifest, split)["shards"]]
    if manifest["tokenizer"].get("file"):
        files.append(manifest["tokenizer"]["file"])
    total = sum((local_dir / f).stat().st_size for f in files)
    done, t0 = 0, time.perf_counter()
    uploaded = uploaded or {}
    for i, f in enumerate(files, 1):
        st = (local_dir / f).stat()
        if uploaded.get(f) == (st.st_size, st.st_mtime_ns):
            done += st.st_size
            continue
        store.upload(local_dir / f, sibling(url, f))
        done += (local_dir / f).stat().st_size
        log(f"uploaded {i}/{len(files)} {sibling(url, f)} ({done / 1e6:.1f} of {total / 1e6:.1f} MB, "
            f"{done / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s)")
    store.upload(Path(manifest["manifest_path"]), url)
    log(f"manifest: {url} ({len(files)} files before it)")
    return url
