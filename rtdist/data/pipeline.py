"""Corpus -> tokens -> webdataset tar shards + manifest (the logic behind ``tools/preprocess.py``).

Two ways to the same bytes, both with work split into bounded tasks run by ``workers`` processes (at most
``2 * workers`` in flight, so memory does not grow with the corpus), and output independent of ``workers``:

- direct (bytes tokenizer, text, ``tail="pack"``): every token count is known from file sizes, so the sample
  layout is computed up front and each worker writes whole shards straight from the input files;
- streaming (everything else): workers tokenize blocks of ~``block_bytes`` (a compressed file or a URL is read
  by one worker from its start, which sends its tokens back in pieces of ~``block_bytes``); the main process cuts
  the token stream (in input order) into samples and writes the shards.

Samples hold ``seq_length + 1`` tokens: inputs are ``tokens[:-1]``, targets ``tokens[1:]``, and consecutive samples
of a stream share one token, so every token but the first of a stream is a target exactly once.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import sources
from ..config import MODEL_LIMITS, TRAIN_LIMITS
from ..errors import DataError
from .shards import (BLOCK, SampleLayout, ShardWriter, build_manifest, find_shard_files, manifest_path_for,
                     os_error_at, shard_capacity, shard_name, token_dtype, write_json_atomic)
from .sources import (SPLITS, Item, ReadConfig, Report, discover, group_items, init_reader, iter_stream, iter_texts,
                      one_line, plan_items, read_task, utf8_error)
from .textstats import split_text_stats
from .tokenizers import BytesTokenizer, HFTokenizer, SentencePieceTokenizer, train_sentencepiece


class Chunker:
    """Cuts a split's token stream into samples of ``seq_length + 1`` tokens with keys ``{doc}_{chunk:06d}``
    (doc = the document the sample starts in, chunk = its count of samples started so far).

    ``pack``: documents are concatenated, so a book's tail fills the next sample. Otherwise each document is cut
    on its own and a tail too short for a sample is dropped. Dropped tokens are counted, never silently lost."""

    def __init__(self, seq_length: int, pack: bool, emit, dtype):  # emit(keys, samples [n, L + 1])
        self.L, self.pack, self.emit = seq_length, pack, emit
        self.buf = np.zeros(0, dtype)
        self.docs: list[list] = []  # [start offset in buf, doc id, samples started] of docs reaching into buf
        self.overlap = False  # buf[0] is the last token of the previous sample
        self.samples = self.dropped = self.documents = self.tokens = 0

    def add(self, doc: str, tokens: np.ndarray, first: bool) -> None:
        if first or not self.docs:  # (a document whose first block was unreadable still gets an entry)
            if not self.pack:
                self._drop_rest()
            self.docs.append([len(self.buf), doc, 0])
            self.documents += 1
        self.tokens += len(tokens)
        self.buf = np.concatenate([self.buf, tokens]) if len(self.buf) else tokens
        n = (len(self.buf) - 1) // self.L
        d, keys = 0, []
        for i in range(n):
            while d + 1 < len(self.docs) and self.docs[d + 1][0] <= i * self.L:
                d += 1
            entry = self.docs[d]
            keys.append(f"{entry[1]}_{entry[2]:06d}")
            entry[2] += 1
        if n:
            self.emit(keys, sliding_window_view(self.buf, self.L + 1)[::self.L][:n])
            cut = n * self.L
            self.samples += n
            self.buf = self.buf[cut:].copy()
            self.overlap = True
            while len(self.docs) > 1 and self.docs[1][0] <= cut:
                self.docs.pop(0)
            for entry in self.docs:
                entry[0] = max(0, entry[0] - cut)

    def _drop_rest(self) -> None:
        self.dropped += max(0, len(self.buf) - self.overlap)
        self.buf = self.buf[:0]
        self.docs, self.overlap = [], False

    def finish(self) -> None:
        self._drop_rest()


def _init_worker(cfg: ReadConfig) -> None:
    """Pool initializer: Ctrl-C (SIGINT to the process group) is the main process's to handle, which then stops
    the pool; SIGTERM keeps its default, so that ``Pool.terminate()`` still ends the workers."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    init_reader(cfg)


def _ordered(fn, tasks, workers: int, pool):
    """``fn`` over ``tasks`` in order, with at most ``2 * workers`` tasks in flight (bounded memory)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _stream_process(item: Item, results, cfg: ReadConfig) -> None:
    """A process that reads one stream (``sources.read_stream``) and puts its pieces on ``results`` in order, then
    ("done", None); an error is put as ("error", message). Signals as in the pool's workers."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        if "tok" not in sources._worker:  # spawned, not forked from a process that has the tokenizer
            init_reader(cfg)
        for piece in iter_stream(item):
            results.put(("piece", piece))
        results.put(("done", None))
    except BaseException as e:  # noqa: BLE001 - the main process raises it, with the file named
        results.put(("error", str(e) if isinstance(e, DataError) else f"{item.path}: {one_line(e)}"))


def _stream_pieces(item: Item, process, results):
    """The pieces a stream process sends, in order, until it is done. Never hangs on a process that died."""
    while True:
        try:
            what, value = results.get(timeout=1.0)
        except queue.Empty:
            if process.is_alive():
                continue
            try:
                what, value = results.get(timeout=1.0)  # what it put just before it ended
            except queue.Empty:
                raise DataError(f"{item.path}: the process reading it ended without finishing (exit status "
                                f"{process.exitcode}; out of memory?)") from None
        if what == "piece":
            yield value
        elif what == "done":
            process.join()
            return
        else:
            process.join()
            raise DataError(value)


def _ordered_units(tasks, workers: int, pool, context, processes: list, cfg: ReadConfig):
    """Results of ``tasks`` in order: a pool task gives one ``read_task`` result, a stream (a task of one stream
    item) the pieces of ``read_stream``. Streams run in their own processes (at most ``workers`` at once, each
    with at most 2 pieces waiting); at most ``2 * workers`` tasks are in flight, so memory stays bounded.
    ``processes`` collects the stream processes started, for the caller to end on failure."""
    if pool is None:
        for task in tasks:
            if len(task) == 1 and task[0].stream:
                yield from iter_stream(task[0])
            else:
                yield read_task(task)
        return
    pending = deque()

    def drain():
        kind, *handle = pending.popleft()
        if kind == "task":
            yield handle[0].get()
        else:
            yield from _stream_pieces(*handle)

    for task in tasks:
        stream = len(task) == 1 and task[0].stream
        while pending and (len(pending) >= 2 * workers
                           or stream and sum(p[0] == "stream" for p in pending) >= workers):
            yield from drain()
        if stream:
            results = context.Queue(maxsize=2)
            process = context.Process(target=_stream_process, args=(task[0], results, cfg), daemon=True)
            process.start()
            processes.append(process)
            pending.append(("stream", task[0], process, results))
        else:
            pending.append(("task", pool.apply_async(read_task, (task,))))
    while pending:
        yield from drain()


@dataclass(frozen=True)
class DirectShard:
    """One shard of the direct path: samples [first, first + count) of a split's packed stream."""
    prefix: str
    split: str
    index: int
    first: int
    count: int
    seq_length: int
    docs: tuple  # (path, doc id, first stream token, bytes) of the documents the shard's tokens touch
    stream_end: int | None  # the split's stream length when this is its last shard (its tail is checked too)
    block_bytes: int


def plan_direct(prefix, split: str, entries, seq_length: int, append_eod: bool, capacity: int, block_bytes: int):
    """Shard tasks and split statistics of a bytes-tokenized, packed split, from file sizes alone."""
    L = seq_length
    sizes = np.array([e.size for e in entries], np.int64)
    ntok = sizes + append_eod
    starts = np.concatenate([[0], np.cumsum(ntok)[:-1]])
    total = int(ntok.sum())
    n = (total - 1) // L if total > L else 0
    tasks = []
    for index, first in enumerate(range(0, n, capacity)):
        count = min(capacity, n - first)
        last = first + count == n
        t0, t1 = first * L, total if last else (first + count) * L + 1
        d0, d1 = int(np.searchsorted(starts, t0, "right")) - 1, int(np.searchsorted(starts, t1, "left"))
        docs = tuple((e.path, e.doc, int(starts[d]), e.size) for d, e in zip(range(d0, d1), entries[d0:d1]))
        tasks.append(DirectShard(str(prefix), split, index, first, count, L, docs, total if last else None,
                                 block_bytes))
    stats = {"samples": n, "tokens": n * L, "documents": len(entries), "corpus_tokens": total,
             "dropped_tokens": total - n * L - 1 if n else total, "input_bytes": int(sizes.sum()),
             "text_bytes": int(sizes.sum())}
    return tasks, stats


def _gather(task: DirectShard, t0: int, t1: int, append_eod: bool, eod: int, events: list) -> np.ndarray:
    """Stream tokens [t0, t1) of ``task``'s documents: file bytes, EOD after each document if asked."""
    out = np.empty(t1 - t0, np.uint16)
    for path, doc, start, size in task.docs:
        lo, hi = max(t0, start) - start, min(t1, start + size + append_eod) - start
        if lo >= hi:
            continue
        end = min(hi, size)
        if end > lo:
            context = min(lo, 3)  # bytes before the range, so a character cut by it is not an error
            try:
                data = sources.read_bytes(Item("text", path, doc, lo - context, end))
            except OSError as e:
                raise DataError(f"{path}: became unreadable while preprocessing ({e.strerror or e}); "
                                "fix it and run again") from None
            except Exception as e:
                raise DataError(f"{path} (bytes {lo}..{end}): {one_line(e)}") from None
            if len(data) != end - lo + context:
                raise DataError(f"{path}: changed while preprocessing ({len(data) - context} bytes at {lo}, "
                                f"expected {end - lo}); run again")
            bad = utf8_error(data, context, final=end == size)
            if bad is not None:
                events.append(("non_utf8_kept_as_bytes", path, 1, f"byte {lo + bad}"))
            out[start + lo - t0:start + end - t0] = np.frombuffer(data, np.uint8, offset=context)
        if hi > size:
            out[start + size - t0] = eod
    return out


def write_direct_shard(task: DirectShard):
    """Worker: write one shard of the direct path. Returns (shard entry, warning events)."""
    cfg, tok = sources.current_reader()
    L, events = task.seq_length, []
    writer = ShardWriter(task.prefix, task.split, SampleLayout(tok.dtype, L + 1), L, maxcount=task.count,
                         maxsize=1 << 62, first_index=task.index)
    starts = [d[2] for d in task.docs]
    per_window = max(1, task.block_bytes // L)  # samples gathered at once: memory ~ block_bytes x 2
    end = task.first + task.count
    try:
        for a in range(task.first, end, per_window):
            b = min(a + per_window, end)
            t0 = a * L
            t1 = task.stream_end if b == end and task.stream_end is not None else b * L + 1
            tokens = _gather(task, t0, t1, cfg.append_eod, tok.eod_id, events)
            keys = []
            for j in range(a, b):  # key: the document the sample starts in, and its count of samples there
                _, doc, start, _ = task.docs[bisect.bisect_right(starts, j * L) - 1]
                keys.append(f"{doc}_{j - -(-start // L):06d}")
            writer.write_many(keys, sliding_window_view(tokens, L + 1)[::L][:b - a])
        return writer.close()[0], events
    except BaseException as e:
        writer.abort()
        if isinstance(e, Exception) and not isinstance(e, (DataError, OSError)):  # OS errors name their file
            path = Path(task.prefix).parent / shard_name(Path(task.prefix).name, task.split, task.index)
            raise DataError(f"writing {path}: {one_line(e)}") from None
        raise


def _check_flags(seq_length, maxcount, maxsize, image_size, workers, block_bytes, tokenizer, tokenizer_model,
                 train_tokenizer, vocab_size, sp_model_type, tokenizer_train_bytes, tail, json_keys,
                 eod_token=None) -> None:
    """Every flag that cannot work, named before any work is done: ``--flag value: what would be right``."""
    def need(ok: bool, flag: str, value, right: str) -> None:
        if not ok:
            raise DataError(f"{flag} {value}: {right}")

    max_seq = TRAIN_LIMITS["seq_length"]
    need(seq_length is None or 1 <= seq_length <= max_seq, "--seq-length", seq_length,
         f"must be in 1..{max_seq:,} (tokens per sample)")
    need(maxcount >= 1, "--maxcount", maxcount, "must be >= 1 (samples per shard)")
    need(maxsize >= 1, "--maxsize", maxsize, "must be at least one sample's bytes (e.g. 1G)")
    need(1 <= image_size <= 2 ** 12, "--image-size", image_size, "must be in 1..4096 (the side of an image in pixels)")
    need(1 <= workers <= 1024, "--workers", workers, "must be in 1..1024 (tokenizing processes)")
    need(1 <= block_bytes <= 1 << 32, "--block-size", block_bytes,
         "must be > 0 bytes and at most 4G (e.g. 8M; memory is about 6 x workers x this)")
    need(tail in (None, "pack", "drop"), "--tail", tail, "expected pack or drop")
    need(bool(json_keys) and all(isinstance(k, str) and k for k in json_keys), "--json-keys", list(json_keys),
         "expected one or more non-empty key names")
    need(tokenizer in ("bytes", "sentencepiece", "hf"), "--tokenizer-type", tokenizer,
         "expected bytes, sentencepiece or hf")
    need(eod_token is None or tokenizer == "hf", "--eod-token", eod_token,
         "only --tokenizer-type hf uses it (bytes: EOD is 256; sentencepiece: its eos piece)")
    if tokenizer == "bytes":
        for flag, value in (("--tokenizer-model", tokenizer_model), ("--vocab-size", vocab_size)):
            need(value is None, flag, value, "only --tokenizer-type sentencepiece uses it")
        need(not train_tokenizer, "--train-tokenizer", "", "only --tokenizer-type sentencepiece trains a tokenizer")
        return
    if tokenizer == "hf":
        need(not train_tokenizer, "--train-tokenizer", "", "only --tokenizer-type sentencepiece trains a tokenizer; "
             "hf loads --tokenizer-model path/to/tokenizer.json")
        need(vocab_size is None, "--vocab-size", vocab_size, "only --train-tokenizer uses it (the file fixes it)")
        if not tokenizer_model:
            raise DataError("--tokenizer-type hf needs --tokenizer-model path/to/tokenizer.json")
        return
    if train_tokenizer == bool(tokenizer_model):
        raise DataError("sentencepiece needs exactly one of --tokenizer-model FILE or --train-tokenizer")
    if tokenizer_model:
        need(vocab_size is None, "--vocab-size", vocab_size, "only --train-tokenizer uses it (the model fixes it)")
        return
    if vocab_size is None:
        raise DataError("--train-tokenizer needs --vocab-size N")
    need(vocab_size <= MODEL_LIMITS["vocab_size"], "--vocab-size", vocab_size,
         f"must be <= {MODEL_LIMITS['vocab_size']:,} (model.vocab_size's limit)")
    need(vocab_size >= SP_MIN_VOCAB, "--vocab-size", vocab_size,
         f"must be >= {SP_MIN_VOCAB}: a sentencepiece model here holds 256 byte pieces, unk, eos and newline, plus "
         "one piece per distinct character of the corpus")
    need(sp_model_type in ("unigram", "bpe"), "--sp-model-type", sp_model_type, "expected unigram or bpe")
    need(tokenizer_train_bytes >= 1, "--tokenizer-train-bytes", tokenizer_train_bytes, "must be > 0 bytes (e.g. 256M)")


SP_MIN_VOCAB = 259  # 256 byte-fallback pieces + unk, eos and "\n" (see train_sentencepiece)


def _check_prefix(output_prefix) -> Path:
    """``--output-prefix`` names a file prefix in a folder that exists or can be created, and can be written."""
    text, prefix = str(output_prefix), Path(output_prefix)
    if not prefix.name or prefix.name != prefix.name.strip(".") or text.endswith(("/", os.sep)):
        raise DataError(f"--output-prefix {text!r} must end in a file name prefix, e.g. out/pg19")
    existing = prefix.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--output-prefix {text}: {existing} is a file, not a folder: pick a prefix in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"--output-prefix {text}: cannot write in {existing} (permissions or a read-only file "
                        "system): pick another folder")
    return prefix


def _names(paths, n: int = 3) -> str:
    paths = list(paths)
    return ", ".join(map(str, paths[:n])) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _check_output(prefix: Path, config: dict, overwrite: bool) -> None:
    """Refuse to mix with shards written under other flags; otherwise clear the prefix for a clean start.
    A run that stopped before writing any shard (a failed tokenizer training, say) leaves nothing to protect."""
    marker, manifest = Path(f"{prefix}-incomplete.json"), manifest_path_for(prefix)
    shards = find_shard_files(prefix)
    for path in (marker, manifest):
        if not path.exists() or overwrite or (path == marker and not shards):
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
        except (OSError, ValueError, AttributeError):
            raise DataError(f"output prefix {prefix}: {path.name} is unreadable, so the shards there cannot be "
                            "matched to these flags: pass --overwrite to replace them, or pick another --output-prefix")
        diff = [f"{k}: {old.get(k)!r} (there) vs {config.get(k)!r} (now)"
                for k in sorted(set(config) | set(old)) if old.get(k) != config.get(k)]
        if diff:
            raise DataError(f"output prefix {prefix} already holds shards from different flags ({path.name}): "
                            f"{'; '.join(diff)}. Pass --overwrite to replace them, or pick another --output-prefix")
    if shards and not marker.exists() and not manifest.exists() and not overwrite:
        raise DataError(f"output prefix {prefix} holds {len(shards)} shards ({shards[0].name}, ...) that no "
                        f"manifest describes: remove them or pass --overwrite")
    # clean start: a rerun (same flags) rewrites everything; nothing of an interrupted run survives
    tokenizer_files = [prefix.parent / f"{prefix.name}-tokenizer.{ext}" for ext in ("model", "json")]
    for path in shards + _tmp_files(prefix) + [manifest, *tokenizer_files]:
        path.unlink(missing_ok=True)
    write_json_atomic(marker, {"config": config, "note": "preprocessing in progress or interrupted"})


def _tmp_files(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}-*.tmp"))


def _after_failure(prefix: Path) -> None:
    """Tidy up after a failed or interrupted run: half-written files go; so does the in-progress marker when no
    shard was written (then a retry with other flags is not refused)."""
    for path in _tmp_files(prefix):
        path.unlink(missing_ok=True)
    if not find_shard_files(prefix):
        Path(f"{prefix}-incomplete.json").unlink(missing_ok=True)


def preprocess(inputs, output_prefix, *, tokenizer: str = "bytes", tokenizer_model=None,
               train_tokenizer: bool = False, vocab_size: int | None = None, sp_model_type: str = "unigram",
               tokenizer_train_bytes: int = 256 << 20, input_type: str = "auto", split: str = "train",
               splits=None, json_keys=("text",), seq_length: int | None = None, append_eod: bool = False,
               tail: str | None = None, maxcount: int = 10000, maxsize: int = 1 << 30, image_size: int = 64,
               workers: int = 1, block_bytes: int = 8 << 20, overwrite: bool = False, progress: bool = True,
               direct: bool = True, log=print, eod_token: str | None = None,
               storage_options: dict | None = None, validation_fraction: float = 0.0) -> dict:
    """Tokenize ``inputs`` into ``{output_prefix}-{split}-%06d.tar`` shards and ``{output_prefix}-manifest.json``.

    ``seq_length`` defaults to 8192 (text) or the pixels of one image (images); ``tail`` to ``pack`` (text) or
    ``drop`` (images: one image per sample). ``direct=False`` streams even where workers could write shards
    straight from the files (same bytes, slower). ``tokenizer="hf"`` loads ``tokenizer_model``, a Hugging Face
    tokenizer.json, with ``eod_token`` as its end of document (default: from the file). ``json_keys`` are also the
    text columns of parquet files. ``storage_options`` go to fsspec for URL inputs (never into the manifest).
    ``validation_fraction``: inputs without split folders give that fraction of their files to ``validation``
    (:func:`hold_out`); without it such inputs make no validation split, which a line says.
    Returns a summary dict (with the manifest under ``manifest``).
    Bad input files are skipped, counted in ``manifest['warnings']`` and printed; bad flags, and input of which
    nothing usable is left, raise ``DataError``. ``progress`` shows a bar when stderr is a terminal."""
    t0 = time.time()
    json_keys, splits = tuple(json_keys), tuple(splits) if splits else None
    _check_flags(seq_length, maxcount, maxsize, image_size, workers, block_bytes, tokenizer, tokenizer_model,
                 train_tokenizer, vocab_size, sp_model_type, tokenizer_train_bytes, tail, json_keys, eod_token)
    prefix = _check_prefix(output_prefix)
    report = Report()
    entries = discover(inputs, split, splits, input_type, report, json_keys, storage_options)
    if not entries:
        skipped = report.summary(exclude=("empty_splits",))
        raise DataError(f"no usable input in {', '.join(map(str, inputs))}: "
                        f"{skipped or 'no file found (hidden files are ignored)'}")
    entries = hold_out(entries, split, validation_fraction, log)
    seq_length, tail = _sample_shape(entries, seq_length, tail, tokenizer, image_size)
    # flags that decide the output bytes (workers and progress do not)
    tok_flags, model_bytes, vocab_bound = _tokenizer_flags(tokenizer, tokenizer_model, train_tokenizer, vocab_size,
                                                           sp_model_type, tokenizer_train_bytes, eod_token)
    smallest = SampleLayout(token_dtype(vocab_bound), seq_length + 1).member_bytes + 2 * BLOCK
    if maxsize < smallest:
        raise DataError(f"--maxsize {maxsize}: a shard must hold at least one sample of {seq_length + 1} "
                        f"{token_dtype(vocab_bound).name} tokens: {smallest} bytes with its tar header and end; use "
                        f"--maxsize {smallest} or more (or a smaller --seq-length)")
    config = {"inputs": [str(i) for i in inputs], "input_type": input_type, "split": split,
              "splits": list(splits) if splits else None, "json_keys": list(json_keys), "tokenizer": tok_flags,
              **({"validation_fraction": validation_fraction} if validation_fraction else {}),
              "seq_length": seq_length, "append_eod": append_eod, "tail": tail, "maxcount": maxcount,
              "maxsize": maxsize, "image_size": image_size, "block_bytes": block_bytes}
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--output-prefix {output_prefix}: cannot create the folder {prefix.parent} "
                        f"({e.strerror or e})") from None
    _check_output(prefix, config, overwrite)
    try:
        summary = _run(prefix, entries, report, config, model_bytes, workers, progress, direct, log, storage_options)
    except BaseException:
        _after_failure(prefix)
        raise
    summary["seconds"] = seconds = time.time() - t0
    summary["mb_per_s"] = summary["input_bytes"] / 1e6 / max(seconds, 1e-9)
    per_split = ", ".join(f"{s} {len(v['shards'])} shards/{v['samples']} samples"
                          for s, v in summary["manifest"]["splits"].items())
    log(f"preprocess: {summary['documents']:,} documents, {summary['input_bytes'] / 1e6:,.1f} MB in, "
        f"{summary['tokens']:,} tokens in {summary['shards']} shards ({per_split}) in {seconds:.1f} s = "
        f"{summary['mb_per_s']:.1f} MB/s with {workers} worker(s)")
    if report.counts:
        log(f"warnings ({sum(report.counts.values())}):\n" + "\n".join(report.lines()))
    log(f"manifest: {summary['manifest_path']}")
    return summary


def hold_out(entries: dict, split: str, fraction: float, log=print) -> dict:
    """``entries`` with ``fraction`` of split ``split``'s files (at least one, never all) moved to ``validation``,
    chosen by a hash of their document ids: the same inputs give the same split, and adding files moves none of the
    others. Without a fraction, inputs that make no validation split get one warning line."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--validation-fraction {fraction}: expected a fraction in [0, 1)")
    if fraction == 0.0:
        if "validation" not in entries:
            log("warning: no validation split (the inputs have no validation/ folder): training's evaluation "
                "(train.eval_interval) and rtdist.evaluate need one; pass --validation-fraction 0.01 to hold out "
                "1% of the files")
        return entries
    if "validation" in entries:
        raise DataError(f"--validation-fraction {fraction}: the inputs have a validation/ folder already; drop the "
                        f"flag, or give the files without their split folders")
    files = entries.get(split, [])
    if len(files) < 2:
        raise DataError(f"--validation-fraction {fraction}: split {split!r} has {len(files)} input file(s); holding "
                        f"out needs 2 or more (it moves whole files)")
    ranked = sorted(files, key=lambda e: hashlib.sha1(e.doc.encode()).hexdigest())
    held = {id(e) for e in ranked[:min(len(files) - 1, max(1, round(fraction * len(files))))]}
    out = {**entries, split: [e for e in files if id(e) not in held], "validation": [e for e in files if id(e) in held]}
    log(f"--validation-fraction {fraction}: {len(out['validation'])} of {len(files)} files held out as validation")
    return out


def _sample_shape(entries: dict, seq_length, tail, tokenizer: str, image_size: int) -> tuple[int, str]:
    """(seq_length, tail) for these inputs: text 8192 tokens packed, images one sample of their pixels each; inputs
    that mix images with text, or flags that contradict images, raise ``DataError``."""
    files = {}  # kind -> paths
    for e in (e for split_entries in entries.values() for e in split_entries):
        files.setdefault(e.kind, []).append(e.path)
    images = "image" in files
    if images and len(files) > 1:
        others = "; ".join(f"{kind} ({_names(paths)})" for kind, paths in files.items() if kind != "image")
        raise DataError(f"inputs mix images ({_names(files['image'])}) with {others}: preprocess them separately "
                        "(or force one kind with --input-type)")
    pixels = 3 * image_size * image_size
    if images and (seq_length not in (None, pixels) or tail == "pack"):
        given = f"--seq-length {seq_length}" if seq_length not in (None, pixels) else "--tail pack"
        raise DataError(f"image inputs ({_names(files['image'])}) make one sample per image of --image-size "
                        f"{image_size} ({image_size}x{image_size}x3 = {pixels} tokens), so --seq-length is implied "
                        f"and --tail is drop: drop {given}, or set --image-size to the size of the images")
    if images and tokenizer != "bytes":
        raise DataError(f"image inputs ({_names(files['image'])}) are pixel bytes: use --tokenizer-type bytes, "
                        f"not {tokenizer}")
    seq_length = seq_length if seq_length is not None else pixels if images else 8192
    return seq_length, tail or ("drop" if images else "pack")


def _tokenizer_flags(tokenizer: str, tokenizer_model, train_tokenizer: bool, vocab_size, sp_model_type: str,
                     train_bytes: int, eod_token) -> tuple[dict, bytes | None, int]:
    """(the tokenizer's flags for the manifest, the model file's bytes, the largest token id + 1 it can give);
    a model file that is missing or no tokenizer raises ``DataError``."""
    tok_flags, model_bytes = {"type": tokenizer}, None
    vocab_bound = BytesTokenizer.vocab_size
    if train_tokenizer:
        tok_flags.update(train=True, vocab_size=vocab_size, model_type=sp_model_type, train_bytes=train_bytes)
        vocab_bound = vocab_size  # at most: a small corpus may give fewer
    elif tokenizer_model:
        if not Path(tokenizer_model).is_file():
            raise DataError(f"--tokenizer-model {tokenizer_model} does not exist")
        if tokenizer == "hf":
            hf = HFTokenizer(tokenizer_model, eod_token)  # a file that is no tokenizer fails here
            # the EOD found next to the file (tokenizer_config.json) is recorded: the copy made below stands alone
            vocab_bound, eod_token = hf.vocab_size, hf.eod_token
        else:
            vocab_bound = SentencePieceTokenizer(tokenizer_model).vocab_size  # a file that is no model fails here
        if vocab_bound > MODEL_LIMITS["vocab_size"]:
            raise DataError(f"--tokenizer-model {tokenizer_model}: {vocab_bound:,} ids, more than model.vocab_size's "
                            f"limit {MODEL_LIMITS['vocab_size']:,}")
        model_bytes = Path(tokenizer_model).read_bytes()  # (it may live at the prefix we are about to clear)
        tok_flags.update(model_sha256=hashlib.sha256(model_bytes).hexdigest())
        if tokenizer == "hf":
            tok_flags.update(eod_token=eod_token)
    return tok_flags, model_bytes, vocab_bound


def _build_tokenizer(prefix: Path, entries: dict, tok_flags: dict, model_bytes, json_keys, storage_options,
                     workers: int, log):
    """(the tokenizer, where its model file goes): bytes, sentencepiece trained on the train split, or the given
    model file copied beside the shards (shards travel with their tokenizer)."""
    model_path = prefix.parent / f"{prefix.name}-tokenizer.{'json' if tok_flags['type'] == 'hf' else 'model'}"
    if tok_flags["type"] == "bytes":
        return BytesTokenizer(), model_path
    if tok_flags.get("train"):
        train_split = "train" if "train" in entries else next(iter(entries))
        log(f"training sentencepiece (vocab {tok_flags['vocab_size']}, {tok_flags['model_type']}) on split "
            f"{train_split} ...")
        return train_sentencepiece(iter_texts(entries[train_split], json_keys, tok_flags["train_bytes"],
                                              storage_options),
                                   model_path, tok_flags["vocab_size"], tok_flags["model_type"],
                                   num_threads=max(1, workers)), model_path
    try:
        model_path.write_bytes(model_bytes)
    except OSError as e:
        raise os_error_at(e, model_path) from None
    return (HFTokenizer(model_path, tok_flags.get("eod_token")) if tok_flags["type"] == "hf"
            else SentencePieceTokenizer(model_path)), model_path


def _run(prefix: Path, entries: dict, report: Report, config: dict, model_bytes, workers: int, progress: bool,
         direct: bool, log, storage_options: dict | None = None) -> dict:
    """Tokenize and write the shards and the manifest of checked flags (``config``); the summary of ``preprocess``."""
    seq_length, tail, append_eod = config["seq_length"], config["tail"], config["append_eod"]
    json_keys, block_bytes = tuple(config["json_keys"]), config["block_bytes"]
    tok, model_path = _build_tokenizer(prefix, entries, config["tokenizer"], model_bytes, json_keys, storage_options,
                                       workers, log)
    spec, layout = tok.spec(), SampleLayout(tok.dtype, seq_length + 1)
    order = [s for s in SPLITS if s in entries] + sorted(s for s in entries if s not in SPLITS)
    streamed = {s: any(e.kind != "text" or e.stream for e in entries[s]) for s in order}
    direct = {s: direct and tok.takes_bytes and tail == "pack" and not streamed[s] for s in order}
    capacity = shard_capacity(layout, config["maxcount"], config["maxsize"])
    plans = {s: plan_direct(prefix, s, entries[s], seq_length, append_eod, capacity, block_bytes) if direct[s] else None
             for s in order}
    for s in order:
        if direct[s] and not plans[s][0]:  # too small for a sample: stream it, so its files are still checked
            direct[s] = False
    items = {s: None if direct[s] else plan_items(entries[s], block_bytes, report, json_keys, storage_options)
             for s in order}
    total_bytes = sum(plans[s][1]["input_bytes"] if direct[s] else sum(i.nbytes for i in items[s]) for s in order)
    read_cfg = ReadConfig(spec, str(model_path.parent), append_eod, json_keys, config["image_size"], block_bytes,
                          storage_options)
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    init_reader(read_cfg)  # before any fork: stream processes start with the tokenizer built
    pool = context.Pool(workers, _init_worker, (read_cfg,)) if workers > 1 else None
    bar = _progress(total_bytes, progress)
    split_out, writer, processes = {}, None, []
    try:
        # direct splits first, all their shards in one queue: parallel even when a split has few shards
        tasks = [t for s in order if direct[s] for t in plans[s][0]]
        shards = {s: [] for s in order}
        for shard, events in _ordered(write_direct_shard, tasks, workers, pool):
            for category, path, n, detail in events:
                report.add(category, path, n, detail)
            shards[shard["name"].rsplit("-", 2)[1]].append(shard)
            bar.update(shard["samples"] * seq_length)  # ~ input bytes (EODs aside)
        for s in order:
            if direct[s]:
                stats = plans[s][1]
            else:
                writer = ShardWriter(prefix, s, layout, seq_length, config["maxcount"], config["maxsize"])
                stats = _stream_split(writer, Chunker(seq_length, tail == "pack", writer.write_many, tok.dtype),
                                      group_items(items[s], block_bytes), report, bar,
                                      lambda tasks: _ordered_units(tasks, workers, pool, context, processes, read_cfg))
                shards[s] = writer.close()
            if not stats["samples"]:
                report.add("empty_splits", s, detail=f"{stats['corpus_tokens']} tokens < seq_length + 1, no sample")
            split_out[s] = {**stats, "shards": shards[s], "files": [_file_entry(e) for e in entries[s]]}
            # words (word-level perplexity); its text_bytes are the ones the tokenizing pass counted
            split_out[s].update(split_text_stats(entries[s], json_keys, storage_options, text_bytes=False))
        bar.update(total_bytes - bar.n)
    except BaseException:
        if writer is not None:
            writer.abort()
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        if pool is not None:
            pool.terminate()  # workers killed mid-shard leave .tmp files: removed once they are gone
            pool.join()
        raise
    finally:
        bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    if not any(v["samples"] for v in split_out.values()):
        raise DataError(_nothing_usable(config, split_out, report))

    manifest = build_manifest(prefix.name, seq_length, spec, split_out, warnings=report.to_dict(), config=config)
    path = manifest_path_for(prefix)
    write_json_atomic(path, manifest)
    Path(f"{prefix}-incomplete.json").unlink(missing_ok=True)
    return {"manifest_path": str(path), "manifest": {**manifest, "manifest_path": str(path.resolve())},
            "input_bytes": sum(v["input_bytes"] for v in split_out.values()),
            "text_bytes": sum(v["text_bytes"] for v in split_out.values()),
            "documents": sum(v["documents"] for v in split_out.values()),
            "tokens": manifest["total_tokens"], "samples": manifest["total_samples"],
            "shards": sum(len(v["shards"]) for v in split_out.values()), "warnings": report.to_dict()}


def _stream_split(writer: ShardWriter, chunker: "Chunker", tasks, report: Report, bar, units) -> dict:
    """Tokenize one split's work ``units(tasks)`` (in order) into ``writer`` through ``chunker``; its statistics."""
    read = text = 0
    for docs, events, done, nbytes, text_bytes in units(tasks):
        for category, path, n, detail in events:
            report.add(category, path, n, detail)
        for doc, tokens, first in docs:
            chunker.add(doc, tokens, first)
        read, text = read + nbytes, text + text_bytes
        bar.update(done)
    chunker.finish()
    return {"samples": chunker.samples, "tokens": chunker.samples * chunker.L, "documents": chunker.documents,
            "corpus_tokens": chunker.tokens, "dropped_tokens": chunker.dropped, "input_bytes": read,
            "text_bytes": text}


def _file_entry(e) -> dict:
    """An input file in the manifest: path, bytes (on disk), the id its documents' keys start with, and what
    PG-19's metadata.csv says of it (title, published, url)."""
    out = {"path": e.path, "bytes": e.size if e.size >= 0 else None, "doc": e.doc}  # (a URL may not say its size)
    if e.codec:
        out["compression"] = e.codec
    return {**out, **dict(e.meta)}


def _nothing_usable(config: dict, split_out: dict, report: Report) -> str:
    """Why no sample came out of the input: too little of it, or all of it skipped (with examples)."""
    tokens = sum(v["corpus_tokens"] for v in split_out.values())
    why = []
    need = config["seq_length"] + 1
    if tokens and config["tail"] == "drop":
        why.append(f"{tokens} tokens read, but no document reaches --seq-length + 1 = {need} tokens (--tail drop "
                   "cuts each document alone): lower --seq-length, or --tail pack")
    elif tokens:
        why.append(f"{tokens} tokens read in all, fewer than --seq-length + 1 = {need} for one sample: lower "
                   "--seq-length or add input")
    skipped = report.summary(exclude=("empty_splits",))
    if skipped:
        why.append(f"skipped: {skipped}")
    return f"no sample from {', '.join(config['inputs'])}: " + "; ".join(why or ["no token read"])


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    # disable=None: only on a terminal (a bar in a log file or a captured stderr is noise)
    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=None if enabled else True,
                smoothing=0.1)
