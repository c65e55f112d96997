"""Input discovery (main process) and readers (worker processes) for text, JSONL and image corpora.

Discovery turns ``--input`` arguments into per-split lists of ``Item``s in a fixed order: a whole file, a block of a
large file (cut after a newline, so memory is bounded by the block, not the file), or a multi-document file (JSONL,
NPZ). Workers turn items into token arrays and report bad input as counted ``events`` rather than raising.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .tokenizers import Tokenizer, build_tokenizer, decode_text

SPLITS = ("train", "validation", "test")
KINDS = ("text", "jsonl", "image")
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
IMAGE_SUFFIXES = {".png", ".npz"}
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
         "bad_images": "images must be PNG, or NPZ arrays, of --image-size pixels square"}


@dataclass(frozen=True)
class Entry:
    """One input file of a split."""
    path: str
    size: int
    kind: str  # text | jsonl | image
    doc: str  # document id (key-safe); multi-document files derive ids from it


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

    @property
    def nbytes(self) -> int:
        return (self.end - self.start) if self.end is not None else os.path.getsize(self.path)


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


def _kind(path: Path, input_type: str) -> str:
    if input_type != "auto":
        return input_type
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else "text"


def binary_reason(path: Path, head: bytes) -> str | None:
    """Why a file is binary (its suffix, or a NUL byte in ``head``, its first ``SNIFF_BYTES``), else None."""
    suffix = path.suffix.lower()
    if suffix in BINARY_SUFFIXES:
        return f"binary file type {suffix}"
    nul = head.find(b"\0")
    return f"binary (a NUL byte at {nul})" if nul >= 0 else None


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


def discover(inputs, split: str = "train", splits=None, input_type: str = "auto",
             report: Report | None = None) -> dict[str, list[Entry]]:
    """Map inputs to ``{split: [Entry]}``.

    A folder holding ``train/``, ``validation/`` or ``test/`` sub-folders is a split layout (PG-19): each folder is
    a split and ``<book_id>.txt`` names the book. Any other folder, file or glob feeds the split ``split``.
    ``splits`` restricts (and requires) split folders; a split folder missing from a layout is a counted warning.
    """
    report = report if report is not None else Report()
    if input_type not in ("auto",) + KINDS:
        raise DataError(f"--input-type {input_type!r}: expected auto, {', '.join(KINDS)}")
    for name in (split, *(splits or ())):
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise DataError(f"split name {name!r}: use letters, digits and '_' only")
    out: dict[str, list[tuple[Path, Path]]] = {}  # split -> [(path, root for its id)]
    folders: dict[str, Path] = {}  # real path -> first path, of every folder walked (see _walk)
    for inp in map(str, inputs):
        path = Path(inp)
        if glob.has_magic(inp):
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
            out.setdefault(split, []).extend((m, root) for m in matches)
        elif path.is_dir():
            layout = [s for s in SPLITS if (path / s).is_dir()]
            if layout:
                for s in splits or SPLITS:
                    if not (path / s).is_dir():
                        if splits:
                            raise DataError(f"--splits asks for {s!r} but {path} has no {s}/ folder "
                                            f"(it has {', '.join(layout)})")
                        report.add("missing_splits", path / s, detail="no such folder, split not written")
                        continue
                    out.setdefault(s, []).extend((f, path / s) for f in _walk(path / s, report, folders))
                for f in sorted(path.iterdir()):  # anything else there is said, never opened
                    if not f.name.startswith(".") and not (f.name in SPLITS and f.is_dir()):
                        report.add("ignored_files", f, detail="outside the train/validation/test folders")
            else:
                out.setdefault(split, []).extend((f, path) for f in _walk(path, report, folders))
        elif os.path.lexists(path):  # a file, a special file (counted below) or a broken symlink (unreadable)
            out.setdefault(split, []).append((path, path.parent))
        else:
            raise DataError(f"--input {inp} does not exist")
    entries: dict[str, list[Entry]] = {}
    read: dict[tuple[int, int], Path] = {}  # (device, inode) -> first path: a file reached twice is read once
    for s, files in out.items():
        used: set[str] = set()
        entries[s] = []
        for f, root in files:
            kind = _kind(f, input_type)
            try:
                st = f.stat()  # follows symlinks; stat never opens (opening a named pipe would block forever)
                special = _special(st.st_mode)
                if special:
                    report.add("special_files_skipped", f, detail=f"{special}, not read")
                    continue
                if (st.st_dev, st.st_ino) in read:
                    report.add("duplicate_inputs", f, detail=f"the same file as {read[st.st_dev, st.st_ino]}: "
                                                             f"read once")
                    continue
                read[st.st_dev, st.st_ino] = f
                size = st.st_size
                # unreadable files are reported here, before any work is planned on them; O_NONBLOCK: a regular
                # file swapped for a pipe since the stat still cannot block
                with os.fdopen(os.open(f, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
                    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                        report.add("special_files_skipped", f, detail="not a regular file, not read")
                        continue
                    head = fh.read(SNIFF_BYTES) if input_type == "auto" and kind != "image" else b""
            except OSError as e:
                report.add("unreadable_files", f, detail=e.strerror or str(e))
                continue
            if size == 0:
                report.add("empty_files", f, detail="skipped")
                continue
            binary = binary_reason(f, head) if input_type == "auto" and kind != "image" else None
            if binary:
                report.add("binary_files_skipped", f, detail=binary)
                continue
            ident = base = doc_id(str(f.relative_to(root).with_suffix("")))
            n = 1
            while ident in used:  # distinct files whose names sanitise alike
                n += 1
                ident = f"{base}-{n}"
            used.add(ident)
            entries[s].append(Entry(str(f), size, kind, ident))
    for s in [s for s, e in entries.items() if not e]:
        report.add("empty_splits", s, detail="no readable, non-empty input file")
        del entries[s]
    return entries


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


def plan_items(entries: list[Entry], block_bytes: int, report: Report) -> list[Item]:
    items = []
    for e in entries:
        if e.kind in ("text", "jsonl") and e.size > block_bytes:
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
    """Consecutive items in tasks of about ``block_bytes`` (many small files per task keeps IPC cheap)."""
    tasks, task, size = [], [], 0
    for item in items:
        if task and size + item.nbytes > block_bytes:
            tasks.append(task)
            task, size = [], 0
        task.append(item)
        size += item.nbytes
    return tasks + ([task] if task else [])


def iter_texts(entries: list[Entry], json_keys, max_bytes: int):
    """Texts of a split for tokenizer training: every k-th file so that about ``max_bytes`` are read."""
    total = sum(e.size for e in entries)
    stride = max(1, -(-total // max_bytes)) if max_bytes else 1
    for e in entries[::stride]:
        try:
            data = Path(e.path).read_bytes()
        except OSError:
            continue  # counted by the tokenizing pass
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


# --------------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ReadConfig:
    tokenizer: dict  # spec
    tokenizer_dir: str
    append_eod: bool
    json_keys: tuple
    image_size: int


_worker: dict = {}


def init_reader(cfg: ReadConfig) -> None:
    """Per-process setup (pool initializer): the tokenizer is built once per worker."""
    _worker["cfg"] = cfg
    _worker["tok"] = build_tokenizer(cfg.tokenizer, cfg.tokenizer_dir)


def current_reader() -> tuple[ReadConfig, Tokenizer]:
    """The (read config, tokenizer) that ``init_reader`` set up in this process."""
    return _worker["cfg"], _worker["tok"]


def read_task(items: list[Item]):
    """Tokenize a task. Returns (docs, events, bytes_read): docs are (doc_id, tokens, first) in input order,
    events are (category, path, n, detail) warnings. Unexpected errors name the file."""
    docs, events, nbytes = [], [], 0
    for item in items:
        try:
            nbytes += _read_item(item, docs, events)
        except DataError:
            raise
        except Exception as e:  # a clear message in the main process, never a bare worker traceback
            raise DataError(f"{item.path} (bytes {item.start}..{item.end}): {one_line(e)}") from None
    return docs, events, nbytes


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


def _read_item(item: Item, docs: list, events: list) -> int:
    cfg, tok = current_reader()
    try:
        if item.kind == "image":
            return _read_image(item, cfg, tok, docs, events)
        data = read_bytes(item)
    except OSError as e:
        events.append(("unreadable_files", item.path, 1, e.strerror or str(e)))
        return 0
    if item.kind == "text":
        tokens = _encode_text(tok, data, item.path, events, item.start)
        if item.last and cfg.append_eod:
            tokens = _with_eod(tokens, tok)
        docs.append((item.doc, tokens, item.first))
    else:
        _read_jsonl(item, data, cfg, tok, docs, events)
    return len(data)


def _read_jsonl(item: Item, data: bytes, cfg: ReadConfig, tok: Tokenizer, docs: list, events: list) -> None:
    offset = item.start
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
