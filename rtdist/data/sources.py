"""Input discovery (main process) and readers (worker processes) for text, JSONL, parquet and image corpora.

Discovery turns ``--input`` arguments (files, folders, globs, URLs) into per-split lists of ``Item``s in a fixed
order: a whole file, a block of a large file (cut after a newline, so memory is bounded by the block, not the file),
a multi-document file (JSONL, NPZ), a range of a parquet file's row groups, or a stream (a compressed file or a URL,
read once from its start: one stream is one work unit). Workers turn items into token arrays and report bad input as
counted ``events`` rather than raising.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import hashlib
import json
import lzma
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DataError
from .remote import is_url as remote_url
from .tokenizers import Tokenizer, build_tokenizer, decode_text

SPLITS = ("train", "validation", "test")
KINDS = ("text", "jsonl", "image", "parquet")
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
IMAGE_SUFFIXES = {".png", ".npz"}
# compressed streams read here: suffix -> codec, and the magic bytes that say so whatever the file is called
CODEC_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bzip2", ".xz": "xz"}
CODEC_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"))
# formats that are never tokenized as they are: --input-type text/jsonl on them is refused
CONTAINER_MAGIC = ((b"PAR1", "a parquet file"), (b"PK\x03\x04", "a zip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
                   (b"\x04\x22\x4d\x18", "lz4 data"), (b"ARROW1", "an Arrow IPC file"))
STREAM_CHUNK = 1 << 18  # compressed bytes read at a time (a 10x ratio gives 2.5 MB of text per read)
# Files of these types are never text, NUL bytes or not (auto input type only; --input-type text reads anything)
BINARY_SUFFIXES = frozenset(
    ".so .o .a .lib .dll .dylib .exe .bin .obj .pyc .pyo .pyd .class .jar .whl .egg .zip .gz .tgz .bz2 .xz .zst "
    ".lz4 .7z .rar .tar .pdf .jpg .jpeg .gif .bmp .tif .tiff .webp .ico .mp3 .mp4 .wav .flac .ogg .avi .mov .mkv "
    ".webm .woff .woff2 .ttf .otf .eot .npy .pt .pth .ckpt .safetensors .pkl .pickle .db .sqlite .parquet .arrow "
    ".h5 .onnx .iso .dmg .deb .rpm".split())
SNIFF_BYTES = 8000  # like git: a NUL byte in the first 8000 bytes makes a file binary
NEWLINE_SEARCH = 1 << 20  # how far past a block boundary we look for a newline before cutting mid-line
PER_FILE = {"unreadable_files", "empty_files", "non_utf8_kept_as_bytes"}  # counted once per file
HINTS = {"special_files_skipped": "named pipes, sockets and devices are never opened",
         "duplicate_inputs": "the same file (given twice, or through a symlink or a hard link) is read once",
         "binary_files_skipped": "--input-type text reads them as text",
         "corrupt_files": "compressed data that does not decompress, or a parquet file whose footer cannot be read",
         "missing_columns": "--text-column (or --json-keys) names the parquet column to read",
         "books_without_metadata": "metadata.csv has no row for these book ids",
         "bad_images": "images must be PNG, or NPZ arrays, of --image-size pixels square"}


@dataclass(frozen=True)
class Entry:
    """One input file of a split."""
    path: str
    size: int
    kind: str  # text | jsonl | image | parquet
    doc: str  # document id (key-safe); multi-document files derive ids from it
    codec: str | None = None  # gzip | zstd | bzip2 | xz: a compressed stream
    meta: tuple = ()  # (name, value) pairs for the manifest's file list (PG-19's metadata.csv: id, title, ...)

    @property
    def stream(self) -> bool:
        """Read once from its start (no seeking, no blocks): a compressed file, or a URL (but parquet, which is read
        by row group through fsspec's random access)."""
        return self.codec is not None or (is_url(self.path) and self.kind != "parquet")


@dataclass(frozen=True)
class Item:
    """A unit of reading: a file, or bytes [start, end) of a large text/JSONL file."""
    kind: str
    path: str
    doc: str
    start: int = 0
    end: int | None = None
    first: bool = True  # opens the document (text)
    last: bool = True  # closes the document (text: EOD goes after it)
    codec: str | None = None  # a compressed stream (start/end are then 0/compressed size)
    size: int | None = None  # bytes this item stands for (parquet: its row groups' compressed bytes)
    row: int = 0  # parquet: the number of the first row of row group ``start`` (rows are numbered per file)

    @property
    def nbytes(self) -> int:
        if self.size is not None:
            return self.size
        return (self.end - self.start) if self.end is not None else os.path.getsize(self.path)

    @property
    def stream(self) -> bool:
        return self.codec is not None or (is_url(self.path) and self.kind != "parquet")


@dataclass
class Report:
    """Counted warnings: per category the number of occurrences, distinct files and a few examples."""
    counts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def add(self, category: str, path, n: int = 1, detail: str = "") -> None:
        seen = self.files.setdefault(category, set())
        if str(path) in seen and category in PER_FILE:
            return
        self.counts[category] = self.counts.get(category, 0) + n
        if str(path) not in seen:
            seen.add(str(path))
            ex = self.examples.setdefault(category, [])
            if len(ex) < 5:
                ex.append(f"{path}: {detail}" if detail else str(path))

    def to_dict(self) -> dict:
        return {c: {"count": self.counts[c], "files": len(self.files[c]), "examples": self.examples[c]}
                for c in sorted(self.counts)}

    def summary(self, exclude=(), per_category: int = 3) -> str:
        """One line: each category's count, its first few examples (file: why) and what to do about it."""
        parts = []
        for c, v in self.to_dict().items():
            if c not in exclude:
                more = ", ..." if v["files"] > per_category else ""
                hint = f" [{HINTS[c]}]" if c in HINTS else ""
                parts.append(f"{c}: {v['count']} ({', '.join(v['examples'][:per_category])}{more}){hint}")
        return "; ".join(parts)

    def lines(self) -> list[str]:
        out = []
        for c, v in self.to_dict().items():
            what = f"{v['count']}" + (f" in {v['files']} files" if v["files"] != v["count"] else "")
            hint = f" [{HINTS[c]}]" if c in HINTS else ""
            out.append(f"  {c}: {what} (e.g. {v['examples'][0]}){hint}")
        return out


# --------------------------------------------------------------------------------------------------- discovery

def doc_id(name: str, max_len: int = 80) -> str:
    """A key-safe id: letters, digits, '-' and '_' only (no dots: webdataset splits keys at the first dot)."""
    ident = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "doc"
    if len(ident) > max_len:  # tar names are limited to 100 bytes
        ident = ident[:max_len - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return ident


def is_url(path) -> bool:
    """An input URL (a shard URL but ``pipe:``, which is not an input)."""
    return remote_url(path, pipe=False)


def open_input(path: str, storage_options: dict | None = None, stream: bool = True):
    """A binary file object for a local path or a URL. URLs go through fsspec (the same library the shard
    loader uses), with ``storage_options`` (credentials, endpoint_url, ...); ``stream`` reads http(s) sequentially
    (no Range requests, which not every server answers)."""
    if not is_url(path):
        return open(path, "rb")
    import fsspec

    options = dict(storage_options or {})
    if stream and path.split("://", 1)[0].lower() in ("http", "https"):
        options.setdefault("block_size", 0)
    return fsspec.open(path, "rb", **options).open()


def _url_info(url: str, storage_options: dict | None) -> dict:
    import fsspec

    fs, inner = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.info(inner)


def codec_of(head: bytes) -> str | None:
    """The compression of a file from its first bytes (magic numbers), whatever its name says."""
    for magic, codec in CODEC_MAGIC:
        if head.startswith(magic):
            return codec
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2"
    return None


def container_of(head: bytes) -> str | None:
    return next((what for magic, what in CONTAINER_MAGIC if head.startswith(magic)), None)


def _suffixes(name: str) -> tuple[str, str | None]:
    """(the suffix that says what a file holds, its compression suffix or None): 'a.jsonl.zst' -> ('.jsonl', '.zst')."""
    stem, ext = os.path.splitext(name.lower())
    if ext in CODEC_SUFFIXES:
        return os.path.splitext(stem)[1], ext
    return ext, None


def strip_suffixes(name: str) -> str:
    """A file name without its compression and type suffixes: 'shard_00.jsonl.zst' -> 'shard_00'."""
    stem, ext = os.path.splitext(name)
    if ext.lower() in CODEC_SUFFIXES:
        stem = os.path.splitext(stem)[0]
    return stem


def _kind(name: str, input_type: str, compressed: bool = False) -> str:
    if input_type != "auto":
        return input_type
    inner, _ = _suffixes(name)
    if inner in JSONL_SUFFIXES or (compressed and inner == ".json"):  # RedPajama-V2's .json.gz hold JSON lines
        return "jsonl"
    if not compressed and inner == ".parquet":
        return "parquet"
    return "image" if inner in IMAGE_SUFFIXES and not compressed else "text"


class Skip(Exception):
    """A file to count under ``category`` and leave out (not an error of the run)."""

    def __init__(self, category: str, detail: str):
        super().__init__(detail)
        self.category, self.detail = category, detail


def classify(name: str, head: bytes, input_type: str) -> tuple[str, str | None]:
    """(kind, codec) of a file from its name and its first bytes ``head``.

    Compression is told by magic bytes, so a compressed file is decompressed (never tokenized as it is) whatever
    its name; a forced ``input_type`` names what is inside it. Raises ``Skip`` for a file to count and leave out,
    ``DataError`` when a forced ``input_type`` would tokenize a container format's bytes."""
    if input_type == "image":
        return "image", None
    codec, container = codec_of(head), container_of(head)
    inner, codec_suffix = _suffixes(name)
    if input_type != "auto":
        if container and not (container == "a parquet file" and input_type == "parquet"):
            fix = ("leave --input-type auto: parquet is read by its --text-column" if container == "a parquet file"
                   else "unpack it first")
            raise DataError(f"{name} is {container}: --input-type {input_type} would tokenize its raw bytes; {fix}")
        return input_type, codec
    if codec:
        if inner in (".parquet", ".arrow") or inner in IMAGE_SUFFIXES:
            raise Skip("binary_files_skipped", f"{inner} inside {codec} compression: decompress it first")
        return _kind(name, "auto", compressed=True), codec
    if codec_suffix:
        raise Skip("corrupt_files", f"named {codec_suffix} but not {CODEC_SUFFIXES[codec_suffix]} data "
                                    f"(it begins {head[:8]!r})")
    if container == "a parquet file" or inner == ".parquet":
        return "parquet", None
    kind = _kind(name, "auto")
    if kind != "image":
        binary = binary_reason(name, head)
        if binary:
            raise Skip("binary_files_skipped", binary)
    return kind, None


def binary_reason(name, head: bytes) -> str | None:
    """Why a file is binary (its suffix, or a NUL byte in ``head``, its first ``SNIFF_BYTES``), else None."""
    suffix = os.path.splitext(str(name))[1].lower()
    if suffix in BINARY_SUFFIXES:
        return f"binary file type {suffix}"
    nul = head.find(b"\0")
    return f"binary (a NUL byte at {nul})" if nul >= 0 else None


def _check_stream(path: str, codec: str, storage_options, input_type: str) -> None:
    """Decompress the start of a compressed file: data that is not what its magic bytes say is counted as corrupt
    before any work is planned; in auto mode, a NUL byte in the decompressed start makes it binary."""
    with open_input(path, storage_options) as fh:
        head = b""
        for chunk in iter_decompressed(fh, codec, path, chunk=1 << 14):
            head += chunk
            if len(head) >= SNIFF_BYTES:
                break
    if not head:
        raise Skip("empty_files", f"no data once decompressed ({codec})")
    nul = head.find(b"\0", 0, SNIFF_BYTES)
    if input_type == "auto" and nul >= 0:
        raise Skip("binary_files_skipped", f"binary inside its {codec} compression (a NUL byte at {nul})")


def parquet_columns(path: str, columns, storage_options=None) -> tuple:
    """Check that a parquet file has every one of ``columns`` as text; returns (row counts, compressed bytes) of its
    row groups. Raises ``Skip`` (corrupt, or a column missing or not text) naming what the file has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_input(path, storage_options, stream=False) as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        raise Skip("corrupt_files", f"not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
    for column in columns:
        if column not in schema.names:
            raise Skip("missing_columns", f"no column {column!r} (it has {', '.join(schema.names[:12])}"
                                          f"{', ...' if len(schema.names) > 12 else ''}): name one with --text-column")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise Skip("missing_columns", f"column {column!r} is {kind}, not text (string)")
    index = {name: i for i, name in enumerate(meta.schema.names)}
    rows, sizes = [], []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        rows.append(rg.num_rows)
        sizes.append(sum(rg.column(index[c]).total_compressed_size for c in columns if c in index) or 1)
    return rows, sizes


def read_metadata_csv(path: Path, report: Report) -> dict[str, tuple]:
    """PG-19's ``metadata.csv`` (no header; book id, title, publication date, URL) as {id: (name, value) pairs}."""
    out = {}
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or not row[0].strip():
                    continue
                if len(row) < 2:
                    report.add("bad_metadata_rows", path, detail=f"line {n}: expected id,title,date,url")
                    continue
                names = ("title", "published", "url")
                out[row[0].strip()] = tuple((k, v) for k, v in zip(names, row[1:4]))
    except (OSError, csv.Error) as e:
        report.add("unreadable_files", path, detail=str(e))
    return out


def _special(mode: int) -> str | None:
    """What a file that is not a regular file is, in words (None for a regular file or a folder)."""
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


def _walk(root: Path, report: Report, folders: dict) -> list[Path]:
    """Files under ``root`` in ``os.walk``'s order (a folder's files sorted, then its sub-folders sorted), hidden
    names skipped, unreadable folders counted. Symlinked folders are followed; a folder reached a second time (a
    symlink loop, two links to one folder, an input inside another) is counted and not walked again. ``folders``
    maps the real path of every folder walked so far (over all inputs) to the path it was first reached by."""
    files, stack = [], [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in folders:
            report.add("duplicate_folders", folder, detail=f"the same folder as {folders[real]}: read once")
            continue
        folders[real] = folder
        try:
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        except OSError as e:
            report.add("unreadable_files", folder, detail=e.strerror or str(e))
            continue
        subfolders = [folder / n for n in names if (folder / n).is_dir()]  # follows symlinks
        files += [folder / n for n in names if not (folder / n).is_dir()]
        stack += reversed(subfolders)
    return files


def read_input_list(path: str) -> list[str]:
    """The inputs named in ``--input-list FILE``: one path, glob or URL a line; blank lines and '#' comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--input-list {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    inputs = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not inputs:
        raise DataError(f"--input-list {path} names no input (one path or URL a line; '#' starts a comment)")
    return inputs


def discover(inputs, split: str = "train", splits=None, input_type: str = "auto",
             report: Report | None = None, columns=("text",), storage_options: dict | None = None
             ) -> dict[str, list[Entry]]:
    """Map inputs to ``{split: [Entry]}``.

    A folder holding ``train/``, ``validation/`` or ``test/`` sub-folders is a split layout (PG-19): each folder is
    a split and ``<book_id>.txt`` names the book; a ``metadata.csv`` next to the folders (PG-19's: id, title,
    publication date, URL, no header) gives each book its title. Any other folder, file, glob or URL feeds the split
    ``split``. ``splits`` restricts (and requires) split folders; a split folder missing from a layout is a counted
    warning. ``columns`` are the text columns every parquet file must have.
    """
    report = report if report is not None else Report()
    if input_type not in ("auto",) + KINDS:
        raise DataError(f"--input-type {input_type!r}: expected auto, {', '.join(KINDS)}")
    for name in (split, *(splits or ())):
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise DataError(f"split name {name!r}: use letters, digits and '_' only")
    entries: dict[str, list[Entry]] = {}
    read: dict = {}  # (device, inode) or URL -> first path: a file reached twice is read once
    for s, files in _files_by_split(inputs, split, splits, report).items():
        used: set[str] = set()
        entries[s] = []
        for f, root, meta in files:
            found = _probe(f, input_type, report, read, columns, storage_options)
            if found is None:
                continue
            size, kind, codec = found
            url = isinstance(f, str)
            name = PurePosixPath(f.split("://", 1)[1]).name if url else f.name
            rel = strip_suffixes(name) if url else str(Path(f.relative_to(root).parent) / strip_suffixes(f.name))
            ident = base = doc_id(rel[2:] if rel.startswith("./") else rel)
            n = 1
            while ident in used:  # distinct files whose names sanitise alike
                n += 1
                ident = f"{base}-{n}"
            used.add(ident)
            entries[s].append(Entry(str(f), size, kind, ident, codec, meta))
    for s in [s for s, e in entries.items() if not e]:
        report.add("empty_splits", s, detail="no readable, non-empty input file")
        del entries[s]
    return entries


def _files_by_split(inputs, split: str, splits, report: Report) -> dict[str, list[tuple]]:
    """{split: [(path or URL, the root its id is relative to, metadata)]} of every input: URLs, globs, folders
    (a PG-19 layout by its split folders) and files; what is not read is counted in ``report``."""
    out: dict[str, list[tuple]] = {}
    folders: dict[str, Path] = {}  # real path -> first path, of every folder walked (see _walk)
    for inp in map(str, inputs):
        path = Path(inp)
        if is_url(inp):
            out.setdefault(split, []).append((inp, None, ()))
        elif glob.has_magic(inp):
            found = sorted(Path(p) for p in glob.glob(inp, recursive=True))
            matches = [m for m in found if not m.is_dir()]  # special files too: counted below, never opened
            holding = {folder for m in matches for folder in m.parents}
            for m in found:  # 'corpus/*' matching sub-folders: said, not dropped in silence ('**' reads theirs)
                if m.is_dir() and m not in holding:
                    report.add("folders_skipped", m, detail="a folder matched by a pattern: give it as --input "
                                                           "to read it")
            if not matches:
                raise DataError(f"--input {inp}: the pattern matches no file")
            root = Path(os.path.commonpath([m.parent for m in matches]))
            out.setdefault(split, []).extend((m, root, ()) for m in matches)
        elif path.is_dir():
            if any((path / s).is_dir() for s in SPLITS):
                for s, files in _split_layout(path, splits, report, folders).items():
                    out.setdefault(s, []).extend(files)
            else:
                out.setdefault(split, []).extend((f, path, ()) for f in _walk(path, report, folders))
        elif os.path.lexists(path):  # a file, a special file (counted below) or a broken symlink (unreadable)
            out.setdefault(split, []).append((path, path.parent, ()))
        else:
            raise DataError(f"--input {inp} does not exist")
    return out


def _split_layout(path: Path, splits, report: Report, folders: dict) -> dict[str, list[tuple]]:
    """The files of a PG-19 layout (``train/``, ``validation/``, ``test/`` under ``path``), by split, each with its
    book's row of ``metadata.csv`` when there is one; anything else there is counted, never opened."""
    layout = [s for s in SPLITS if (path / s).is_dir()]
    metadata = path / "metadata.csv"
    books = read_metadata_csv(metadata, report) if metadata.is_file() else None
    out: dict[str, list[tuple]] = {}
    for s in splits or SPLITS:
        if not (path / s).is_dir():
            if splits:
                raise DataError(f"--splits asks for {s!r} but {path} has no {s}/ folder (it has {', '.join(layout)})")
            report.add("missing_splits", path / s, detail="no such folder, split not written")
            continue
        for f in _walk(path / s, report, folders):
            meta = ()
            if books is not None:
                meta = books.get(strip_suffixes(f.name), ())
                if not meta:
                    report.add("books_without_metadata", f, detail=f"no row in {metadata}")
            out.setdefault(s, []).append((f, path / s, meta))
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or (f.name in SPLITS and f.is_dir()) or (books is not None and f == metadata):
            continue
        report.add("ignored_files", f, detail="outside the train/validation/test folders")
    return out


def _probe(f, input_type: str, report: Report, read: dict, columns, storage_options):
    """(size, kind, codec) of one input file or URL, or None when it is counted in ``report`` and left out
    (empty, unreadable, binary, corrupt at its start, read already); a URL that cannot be read is an error."""
    url, codec = isinstance(f, str), None
    try:
        if url:
            size, head = _url_head(f, storage_options, read)
        else:
            size, head = _local_head(f, read, input_type, report)
        if head is None:
            return None
        if size == 0:
            raise Skip("empty_files", "skipped")
        kind, codec = classify(str(f), head, input_type)
        if codec:
            _check_stream(str(f), codec, storage_options, input_type)
        if kind == "parquet":
            parquet_columns(str(f), columns, storage_options)
        return size, kind, codec
    except Skip as e:
        report.add(e.category, f, detail=e.detail)
    except FileNotFoundError as e:
        if url:
            raise DataError(f"--input {f} does not exist ({one_line(e)})") from None
        report.add("unreadable_files", f, detail=e.strerror or str(e))
    except DataError as e:  # decompression of the start failed
        if codec is None:
            raise
        report.add("corrupt_files", f, detail=str(e).split(": ", 1)[-1])
    except Exception as e:
        if url:  # a scheme without its fsspec package, refused credentials, a host that does not answer
            raise DataError(f"--input {f}: cannot be read ({one_line(e, 200)}); check the URL, its credentials "
                            "(--storage-options) and, for s3:// or gs://, that s3fs or gcsfs is installed") from None
        if not isinstance(e, OSError):
            raise
        report.add("unreadable_files", f, detail=getattr(e, "strerror", None) or one_line(e))
    return None


def _local_head(f: Path, read: dict, input_type: str, report: Report):
    """(size, first bytes) of a local file, or (None, None) when it is counted and left out here."""
    st = f.stat()  # follows symlinks; stat never opens (opening a named pipe would block forever)
    special = _special(st.st_mode)
    if special:
        report.add("special_files_skipped", f, detail=f"{special}, not read")
        return None, None
    if (st.st_dev, st.st_ino) in read:
        report.add("duplicate_inputs", f, detail=f"the same file as {read[st.st_dev, st.st_ino]}: read once")
        return None, None
    read[st.st_dev, st.st_ino] = f
    # unreadable files are reported here, before any work is planned on them; O_NONBLOCK: a regular file swapped
    # for a pipe since the stat still cannot block
    with os.fdopen(os.open(f, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            report.add("special_files_skipped", f, detail="not a regular file, not read")
            return None, None
        image = input_type == "image" or (input_type == "auto" and _suffixes(f.name)[0] in IMAGE_SUFFIXES)
        return st.st_size, b"" if image else fh.read(SNIFF_BYTES)


def _url_head(url: str, storage_options, read: dict):
    if url in read:
        raise Skip("duplicate_inputs", "given twice: read once")
    read[url] = url
    size = _url_info(url, storage_options).get("size")
    with open_input(url, storage_options) as fh:
        head = fh.read(SNIFF_BYTES)
    return (size if size is not None else -1), head


def _block_starts(path: str, size: int, block: int, kind: str) -> list[int]:
    """Offsets that cut a large file into ~``block``-byte pieces right after a newline. Text without a newline
    nearby is cut at a UTF-8 character boundary; JSONL lines are never cut."""
    starts = [0]
    with open(path, "rb") as f:
        pos = block
        while pos < size:
            f.seek(pos)
            cut = None
            scanned = 0
            while cut is None:
                window = f.read(1 << 16)
                if not window:
                    break
                nl = window.find(b"\n")
                if nl >= 0:
                    cut = pos + scanned + nl + 1
                scanned += len(window)
                if kind == "text" and scanned >= NEWLINE_SEARCH and cut is None:
                    f.seek(pos)
                    head = f.read(4)
                    skip = next((i for i, b in enumerate(head) if b & 0xC0 != 0x80), 0)
                    cut = pos + skip
            if cut is None or cut >= size:
                break
            starts.append(cut)
            pos = cut + block
    return starts


def plan_items(entries: list[Entry], block_bytes: int, report: Report, columns=("text",),
               storage_options: dict | None = None) -> list[Item]:
    """Work units: blocks of large local text/JSONL files, one item per parquet row group, one per stream."""
    items = []
    for e in entries:
        if e.kind == "parquet":
            try:
                rows, sizes = parquet_columns(e.path, columns, storage_options)
            except Skip as err:  # checked at discovery: the file changed since
                report.add(err.category, e.path, detail=err.detail)
                continue
            first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int) if rows else []
            items += [Item("parquet", e.path, e.doc, g, g + 1, size=sizes[g], row=int(first[g]))
                      for g in range(len(rows)) if rows[g]]
        elif e.stream:
            items.append(Item(e.kind, e.path, e.doc, 0, None, codec=e.codec, size=max(e.size, 0)))
        elif e.kind in ("text", "jsonl") and e.size > block_bytes:
            try:
                starts = _block_starts(e.path, e.size, block_bytes, e.kind)
            except OSError as err:
                report.add("unreadable_files", e.path, detail=err.strerror or str(err))
                continue
            ends = starts[1:] + [e.size]
            items += [Item(e.kind, e.path, e.doc, s, t, i == 0, i == len(starts) - 1)
                      for i, (s, t) in enumerate(zip(starts, ends))]
        else:
            items.append(Item(e.kind, e.path, e.doc, 0, e.size))
    return items


def group_items(items: list[Item], block_bytes: int) -> list[list[Item]]:
    """Consecutive items in tasks of about ``block_bytes`` (many small files per task keeps IPC cheap); a stream
    is a task of its own (its reader sends its tokens back in pieces, see ``read_stream``)."""
    tasks, task, size = [], [], 0
    for item in items:
        if task and (size + item.nbytes > block_bytes or item.stream or task[-1].stream):
            tasks.append(task)
            task, size = [], 0
        task.append(item)
        size += item.nbytes
    return tasks + ([task] if task else [])


def iter_texts(entries: list[Entry], json_keys, max_bytes: int, storage_options: dict | None = None):
    """Texts of a split for tokenizer training: every k-th file so that about ``max_bytes`` are read (at most
    ``max_bytes`` of any one file)."""
    total = sum(max(e.size, 0) for e in entries)
    stride = max(1, -(-total // max_bytes)) if max_bytes else 1
    for e in entries[::stride]:
        try:
            if e.kind == "parquet":
                yield from _parquet_texts(e.path, json_keys, max_bytes, storage_options)
                continue
            data = b""
            with open_input(e.path, storage_options) as fh:
                for chunk in iter_decompressed(fh, e.codec, e.path):
                    data += chunk
                    if max_bytes and len(data) >= max_bytes:
                        break
        except (OSError, DataError):
            continue  # counted (or named) by the tokenizing pass
        if e.kind == "text":
            yield decode_text(data)[0]
        elif e.kind == "jsonl":
            for line in data.split(b"\n"):
                try:
                    obj = json.loads(decode_text(line)[0])
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    yield from (obj[k] for k in json_keys if isinstance(obj.get(k), str))


def _parquet_texts(path: str, columns, max_bytes: int, storage_options=None):
    import pyarrow.parquet as pq

    n = 0
    with open_input(path, storage_options, stream=False) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=list(dict.fromkeys(columns))):
            for column in batch.columns:
                for text in column.to_pylist():
                    if isinstance(text, str):
                        n += len(text)
                        yield text
            if max_bytes and n >= max_bytes:
                return


# --------------------------------------------------------------------------------------------------- streams

def _decompressor(codec: str):
    if codec == "gzip":
        try:  # ISA-L's inflate: the same output, about twice zlib's speed (setup.py installs it)
            from isal import isal_zlib

            return isal_zlib.decompressobj(wbits=31)
        except ImportError:
            return zlib.decompressobj(wbits=31)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()
    if codec == "bzip2":
        return bz2.BZ2Decompressor()
    if codec == "xz":
        return lzma.LZMADecompressor()
    raise ValueError(f"unknown codec {codec!r}")


def _codec_errors() -> tuple:
    errors = [zlib.error, OSError, EOFError, lzma.LZMAError, ValueError]
    for module, name in (("zstandard", "ZstdError"), ("isal.isal_zlib", "error")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:
            pass
    return tuple(errors)


def iter_decompressed(fh, codec: str | None, path: str, consumed: list | None = None, chunk: int = STREAM_CHUNK):
    """The decompressed bytes of an open file, in pieces, without holding the file in memory. Concatenated members
    or frames (pigz, pzstd, cat a.gz b.gz) are read one after the other. Data that does not decompress, or a stream
    that ends inside a member (a truncated download), raises ``DataError`` naming the file and where. ``consumed``
    ([int]) counts the compressed bytes read so far. ``codec`` None: the bytes as they are."""
    consumed = consumed if consumed is not None else [0]
    if codec is None:
        while True:
            data = fh.read(chunk)
            if not data:
                return
            consumed[0] += len(data)
            yield data
    errors = _codec_errors()
    d, out, pending = _decompressor(codec), 0, b""
    started = False  # d has seen input of its member
    while True:
        data = pending or fh.read(chunk)
        if not pending:
            consumed[0] += len(data)
        pending = b""
        if not data:
            break
        try:
            piece = d.decompress(data)
        except errors as e:
            if codec == "gzip" and started is False and out and not data.strip(b"\0"):
                return  # zero padding after the last member (tape-style writers): gzip(1) ignores it too
            raise DataError(f"{path}: corrupt {codec} data after {out:,} decompressed bytes ({one_line(e, 120)}); "
                            "the file is damaged: download it again or leave it out") from None
        started = True
        if piece:
            out += len(piece)
            yield piece
        if d.eof:
            pending, d, started = d.unused_data, _decompressor(codec), False
    if started:
        raise DataError(f"{path}: the {codec} stream ends early, after {out:,} decompressed bytes (a truncated file?): "
                        "download it again or leave it out")


def _text_cut(buf, block: int) -> int | None:
    """Where ``_block_starts`` cuts a text file that goes on as ``buf`` from its last cut (None: no further cut)."""
    if len(buf) <= block:
        return None
    nl = buf.find(b"\n", block, block + NEWLINE_SEARCH)
    if nl >= 0:
        cut = nl + 1
    elif len(buf) - block >= NEWLINE_SEARCH:  # no newline nearby: cut at a UTF-8 character start
        cut = block + next((i for i, b in enumerate(buf[block:block + 4]) if b & 0xC0 != 0x80), 0)
    else:
        return None
    return cut if cut < len(buf) else None


def read_stream(item: Item):
    """Tokenize a stream (a compressed file or a URL) from its start, yielding ``read_task``-like results of about
    ``block_bytes`` of text each, so that memory stays bounded whatever the file's size. A text stream is cut where
    the same text as a local file would be cut into blocks, so both give the same tokens."""
    cfg, tok = current_reader()
    block, consumed, reported = cfg.block_bytes, [0], 0
    events: list = []
    docs: list = []
    text_bytes = 0

    def result(input_bytes):
        nonlocal docs, events, text_bytes, reported
        out = (docs, events, consumed[0] - reported, input_bytes, text_bytes)
        docs, events, text_bytes, reported = [], [], 0, consumed[0]
        return out

    with open_input(item.path, cfg.storage_options) as fh:
        pieces = iter_decompressed(fh, item.codec, item.path, consumed)
        buf, offset, done = bytearray(), 0, False
        if item.kind == "text":
            first = True
            while True:
                while not done and len(buf) <= block + NEWLINE_SEARCH:
                    piece = next(pieces, None)
                    if piece is None:
                        done = True
                    else:
                        buf += piece
                cut = _text_cut(buf, block) if buf else None
                data = bytes(buf[:cut]) if cut is not None else bytes(buf)
                if not data and not first:
                    return
                tokens = _encode_text(tok, data, item.path, events, offset)
                if cut is None and cfg.append_eod:
                    tokens = _with_eod(tokens, tok)
                docs.append((item.doc, tokens, first))
                text_bytes += len(data)
                yield result(len(data))
                if cut is None:
                    return
                del buf[:cut]
                offset, first = offset + cut, False
        elif item.kind == "jsonl":
            searched = 0  # buf[:searched] holds no newline (a line longer than a block is not scanned again)
            while not done:
                while not done and len(buf) < block:
                    piece = next(pieces, None)
                    if piece is None:
                        done = True
                    else:
                        buf += piece
                end = len(buf) if done else buf.rfind(b"\n", searched) + 1
                if end <= 0:  # one line longer than a block: read on
                    searched = len(buf)
                    piece = next(pieces, None)
                    if piece is None:
                        done = True
                    else:
                        buf += piece
                    continue
                data = bytes(buf[:end])
                del buf[:end]
                searched = len(buf)
                text_bytes += _read_jsonl(item, data, cfg, tok, docs, events, offset)
                offset += len(data)
                yield result(len(data))
        else:
            raise DataError(f"{item.path}: {item.kind} inputs cannot be read as a stream (compressed or from a URL); "
                            "give them as local, uncompressed files")


# --------------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ReadConfig:
    tokenizer: dict  # spec
    tokenizer_dir: str
    append_eod: bool
    json_keys: tuple
    image_size: int
    block_bytes: int = 8 << 20  # a stream's tokens go back to the main process in pieces of about this much text
    storage_options: dict | None = None  # for URL inputs (fsspec)


_worker: dict = {}


def init_reader(cfg: ReadConfig) -> None:
    """Per-process setup (pool initializer): the tokenizer is built once per worker."""
    _worker["cfg"] = cfg
    _worker["tok"] = build_tokenizer(cfg.tokenizer, cfg.tokenizer_dir)


def current_reader() -> tuple[ReadConfig, Tokenizer]:
    """The (read config, tokenizer) that ``init_reader`` set up in this process."""
    return _worker["cfg"], _worker["tok"]


def read_task(items: list[Item]):
    """Tokenize a task. Returns (docs, events, progress, input_bytes, text_bytes): docs are (doc_id, tokens, first)
    in input order, events are (category, path, n, detail) warnings, progress the bytes of the items as planned
    (compressed, on disk), input_bytes what was read (decompressed), text_bytes the documents' UTF-8 bytes
    (JSONL: without the JSON around them; the bytes of bits per byte). Unexpected errors name the file."""
    docs, events, counts = [], [], np.zeros(3, np.int64)
    for item in items:
        try:
            counts += _read_item(item, docs, events)
        except DataError:
            raise
        except Exception as e:  # a clear message in the main process, never a bare worker traceback
            where = (f"row groups {item.start}..{item.end - 1}" if item.kind == "parquet"
                     else f"bytes {item.start}..{item.end}")
            raise DataError(f"{item.path} ({where}): {one_line(e)}") from None
    return docs, events, *map(int, counts)


def iter_stream(item: Item):
    """``read_stream`` with unexpected errors named like ``read_task``'s."""
    try:
        yield from read_stream(item)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{item.path}: {one_line(e)}") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    """An unexpected error as one short line (a message may span lines or hold a whole file's worth of text)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def read_bytes(item: Item) -> bytes:
    with open(item.path, "rb") as f:
        f.seek(item.start)
        return f.read() if item.end is None else f.read(item.end - item.start)


def utf8_error(data: bytes, context: int = 0, final: bool = True) -> int | None:
    """Offset (relative to ``data[context]``) of the first invalid UTF-8 in ``data``, or None.

    ``data`` may begin with ``context`` (<= 3) bytes from before the range: decoding starts at the last character
    start among them, so a range cut inside a character is not an error and an invalid sequence cut by the range
    start is still found. Unless ``final``, ``data`` may end inside a character."""
    start = next((i for i in range(context - 1, -1, -1) if data[i] & 0xC0 != 0x80), context)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data[start:], final=final)
    except UnicodeDecodeError as e:
        return start + e.start - context
    return None


def _encode_text(tok: Tokenizer, data: bytes, path: str, events: list, offset: int = 0) -> np.ndarray:
    if tok.takes_bytes:
        bad = utf8_error(data)
        if bad is not None:
            events.append(("non_utf8_kept_as_bytes", path, 1, f"byte {offset + bad}"))
        return tok.encode(data)
    text, replaced = decode_text(data)
    if replaced:
        events.append(("non_utf8_replaced", path, replaced, "invalid UTF-8 replaced by U+FFFD"))
    return tok.encode(text)


def _with_eod(tokens: np.ndarray, tok: Tokenizer) -> np.ndarray:
    return np.append(tokens, np.asarray(tok.eod_id, tokens.dtype))


def _read_item(item: Item, docs: list, events: list) -> tuple[int, int, int]:
    """Tokenize one (non-stream) item into ``docs``; (progress, input bytes, text bytes) as ``read_task`` says."""
    cfg, tok = current_reader()
    if item.stream:  # a stream given to read_task (one worker process, or tokenizer training): read it whole
        counts = np.zeros(3, np.int64)
        for more_docs, more_events, *n in iter_stream(item):
            docs += more_docs
            events += more_events
            counts += n
        return tuple(map(int, counts))
    try:
        if item.kind == "image":
            before = len(docs)
            n = _read_image(item, cfg, tok, docs, events)
            dims = sum(len(tokens) - 1 for _, tokens, _ in docs[before:])  # pixel values: bits per dim
            return n, n, dims
        if item.kind == "parquet":
            n = _read_parquet(item, cfg, tok, docs, events)
            return item.nbytes, n, n
        data = read_bytes(item)
    except OSError as e:
        events.append(("unreadable_files", item.path, 1, e.strerror or str(e)))
        return 0, 0, 0
    if item.kind == "text":
        tokens = _encode_text(tok, data, item.path, events, item.start)
        if item.last and cfg.append_eod:
            tokens = _with_eod(tokens, tok)
        docs.append((item.doc, tokens, item.first))
        return len(data), len(data), len(data)
    return len(data), len(data), _read_jsonl(item, data, cfg, tok, docs, events, item.start)


def _read_parquet(item: Item, cfg: ReadConfig, tok: Tokenizer, docs: list, events: list) -> int:
    """Rows of row groups [start, end): each text column of each row is one document, named by its row number."""
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(cfg.json_keys))
    row, nbytes = item.row, 0
    with open_input(item.path, cfg.storage_options, stream=False) as fh:
        batches = pq.ParquetFile(fh).iter_batches(batch_size=1024, row_groups=list(range(item.start, item.end)),
                                                  columns=keys)
        for batch in batches:
            columns = [batch.column(k).to_pylist() for k in keys]
            for i in range(batch.num_rows):
                for key, column in zip(keys, columns):
                    value = column[i]
                    if not value:
                        what = ("empty_documents", f"{key!r} is empty") if value == "" else (
                            "missing_json_keys", f"no string under {key!r} (null)")
                        events.append((what[0], item.path, 1, f"row {row}: {what[1]}"))
                        continue
                    raw = value.encode("utf-8")  # Arrow strings are valid UTF-8
                    tokens = tok.encode(raw if tok.takes_bytes else value)
                    tokens = np.asarray(tokens, tok.dtype)
                    if cfg.append_eod:
                        tokens = _with_eod(tokens, tok)
                    suffix = f"-{doc_id(key)}" if len(keys) > 1 else ""
                    docs.append((f"{item.doc}-{row:010d}{suffix}", tokens, True))
                    nbytes += len(raw)
                row += 1
    return nbytes


def _read_jsonl(item: Item, data: bytes, cfg: ReadConfig, tok: Tokenizer, docs: list, events: list,
                offset: int) -> int:
    """The documents of whole JSON lines ``data`` (which begins at byte ``offset`` of the file); their bytes."""
    nbytes = 0
    for line in data.split(b"\n"):
        at, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        where = f"line at byte {at}"
        try:  # surrogateescape keeps undecodable bytes for the bytes tokenizer; text tokenizers replace them
            obj = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            events.append(("bad_json_lines", item.path, 1, f"{where}: {e}"))
            continue
        if not isinstance(obj, dict):
            events.append(("bad_json_lines", item.path, 1, f"{where}: not a JSON object"))
            continue
        for key in cfg.json_keys:
            value = obj.get(key)
            if not isinstance(value, str):
                events.append(("missing_json_keys", item.path, 1, f"{where}: no string under {key!r}"))
                continue
            if not value:
                events.append(("empty_documents", item.path, 1, f"{where}: {key!r} is empty"))
                continue
            try:
                raw = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # lone surrogates escaped in the JSON itself
                raw = value.encode("utf-8", "replace")
                events.append(("non_utf8_replaced", item.path, 1, f"{where}: lone surrogate in {key!r}"))
            tokens = _encode_text(tok, raw, item.path, events)
            if cfg.append_eod:
                tokens = _with_eod(tokens, tok)
            suffix = f"-{doc_id(key)}" if len(cfg.json_keys) > 1 else ""
            docs.append((f"{item.doc}-{at:010d}{suffix}", tokens, True))
            nbytes += len(raw)
    return nbytes


def _read_image(item: Item, cfg: ReadConfig, tok: Tokenizer, docs: list, events: list) -> int:
    """An image is one document: EOD (start of image) then its pixels in raster order, RGB interleaved."""
    size = cfg.image_size
    if item.path.lower().endswith(".npz"):
        try:
            with np.load(item.path) as z:
                name = "data" if "data" in z.files else sorted(z.files)[0]
                images = z[name]
        except (ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
            events.append(("bad_images", item.path, 1, f"not a readable npz: {e}"))
            return 0
        if images.ndim == 3:
            images = images[None]
        if images.ndim == 2 and images.shape[1] == 3 * size * size:  # ImageNet-64 npz: rows of R, G, B planes
            images = images.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
        elif images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)
        names = [f"{item.doc}-{i:07d}" for i in range(len(images))]
    else:
        from PIL import Image

        try:
            with Image.open(item.path) as im:
                images = np.asarray(im.convert("RGB"))[None]
        except (OSError, ValueError) as e:  # UnidentifiedImageError and truncated files are OSErrors
            events.append(("bad_images", item.path, 1, f"not a readable image: {e}"))
            return 0
        names = [item.doc]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        shape = list(images.shape[1:] if len(names) == 1 and images.ndim == 4 else images.shape)  # one PNG: HWC
        side = images.shape[1] if images.ndim == 4 and images.shape[1:] == (images.shape[1],) * 2 + (3,) else None
        hint = f" (--image-size {side} if all images are {side}x{side}x3)" if side and images.dtype == np.uint8 else ""
        events.append(("bad_images", item.path, 1, f"{images.dtype}{shape}: expected uint8 RGB {size}x{size}x3{hint}"))
        return 0
    start = np.array([tok.eod_id], np.uint16)
    for name, image in zip(names, images):
        docs.append((name, np.concatenate([start, image.reshape(-1).astype(np.uint16)]), True))
    return os.path.getsize(item.path)
