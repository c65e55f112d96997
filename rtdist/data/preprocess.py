"""Corpus -> tokens -> webdataset tar shards + manifest (the logic behind ``tools/preprocess.py``).

Pipeline: discover inputs (main) -> tokenize tasks of ~``block_bytes`` (``workers`` processes, at most
``2 * workers`` tasks in flight, results consumed in input order) -> cut the token stream into samples (main)
-> ``ShardWriter``. Memory is bounded by the tasks in flight, not by the corpus; the output depends only on the
inputs and the flags (``workers`` excluded), so runs are byte-identical.

Samples hold ``seq_length + 1`` tokens: inputs are ``tokens[:-1]``, targets ``tokens[1:]``, and consecutive samples
of a stream share one token, so every token but the first of a stream is a target exactly once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from collections import deque
from pathlib import Path

import numpy as np

from .shards import (DataError, SampleLayout, ShardWriter, build_manifest, find_shard_files, manifest_path_for,
                     write_json_atomic)
from .sources import (SPLITS, ReadConfig, Report, discover, group_items, init_reader, iter_texts, plan_items,
                      read_task)
from .tokenizers import BytesTokenizer, SentencePieceTokenizer, train_sentencepiece

class Chunker:
    """Cuts a split's token stream into samples of ``seq_length + 1`` tokens with keys ``{doc}_{chunk:06d}``
    (doc = the document the sample starts in, chunk = its count of samples started so far).

    ``pack``: documents are concatenated, so a book's tail fills the next sample. Otherwise each document is cut
    on its own and a tail too short for a sample is dropped. Dropped tokens are counted, never silently lost."""

    def __init__(self, seq_length: int, pack: bool, emit, dtype):
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
        d = 0
        for i in range(n):
            start = i * self.L
            while d + 1 < len(self.docs) and self.docs[d + 1][0] <= start:
                d += 1
            entry = self.docs[d]
            self.emit(f"{entry[1]}_{entry[2]:06d}", self.buf[start:start + self.L + 1])
            entry[2] += 1
        if n:
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


def _ordered(tasks, workers: int, pool):
    """``read_task`` over ``tasks`` in order, with at most ``2 * workers`` tasks in flight (bounded memory)."""
    if pool is None:
        yield from map(read_task, tasks)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(read_task, (task,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _check_output(prefix: Path, config: dict, overwrite: bool) -> None:
    """Refuse to mix with shards written under other flags; otherwise clear the prefix for a clean start."""
    marker, manifest = Path(f"{prefix}-incomplete.json"), manifest_path_for(prefix)
    for path in (marker, manifest):
        if not path.exists() or overwrite:
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError):
            old = None
        if old != config:
            diff = [f"{k}: {old.get(k)!r} (there) vs {config.get(k)!r} (now)"
                    for k in sorted(set(config) | set(old)) if old.get(k) != config.get(k)] if old else \
                ["unreadable config"]
            raise DataError(f"output prefix {prefix} already holds shards from different flags ({path.name}): "
                            + "; ".join(diff) + ". Pass --overwrite to replace them, or pick another "
                                                "--output-prefix")
    shards = find_shard_files(prefix)
    if shards and not marker.exists() and not manifest.exists() and not overwrite:
        raise DataError(f"output prefix {prefix} holds {len(shards)} shards ({shards[0].name}, ...) that no "
                        f"manifest describes: remove them or pass --overwrite")
    # clean start: a rerun (same flags) rewrites everything; nothing of an interrupted run survives
    stale = shards + sorted(prefix.parent.glob(f"{prefix.name}-*.tmp"))
    for path in stale + [manifest, prefix.parent / f"{prefix.name}-tokenizer.model"]:
        path.unlink(missing_ok=True)
    write_json_atomic(marker, {"config": config, "note": "preprocessing in progress or interrupted"})


def preprocess(inputs, output_prefix, *, tokenizer: str = "bytes", tokenizer_model=None,
               train_tokenizer: bool = False, vocab_size: int | None = None, sp_model_type: str = "unigram",
               tokenizer_train_bytes: int = 256 << 20, input_type: str = "auto", split: str = "train",
               splits=None, json_keys=("text",), seq_length: int | None = None, append_eod: bool = False,
               tail: str | None = None, maxcount: int = 10000, maxsize: int = 1 << 30, image_size: int = 64,
               workers: int = 1, block_bytes: int = 8 << 20, overwrite: bool = False, progress: bool = True,
               log=print) -> dict:
    """Tokenize ``inputs`` into ``{output_prefix}-{split}-%06d.tar`` shards and ``{output_prefix}-manifest.json``.

    ``seq_length`` defaults to 8192 (text) or the pixels of one image (images); ``tail`` to ``pack`` (text) or
    ``drop`` (images: one image per sample). Returns a summary dict (with the manifest under ``manifest``).
    Bad input is counted in ``manifest['warnings']`` and printed; bad flags raise ``DataError``."""
    t0 = time.time()
    prefix = Path(output_prefix)
    if not prefix.name or prefix.name != prefix.name.strip("."):
        raise DataError(f"--output-prefix {output_prefix!r} must end in a file name prefix, e.g. out/pg19")
    json_keys, splits = tuple(json_keys), tuple(splits) if splits else None
    report = Report()
    entries = discover(inputs, split, splits, input_type, report)
    if not entries:
        raise DataError(f"no readable input in {', '.join(map(str, inputs))}:\n" + "\n".join(report.lines()))
    kinds = {e.kind for files in entries.values() for e in files}
    images = "image" in kinds
    if images and len(kinds) > 1:
        raise DataError(f"inputs mix images with {sorted(kinds - {'image'})}: preprocess them separately")
    pixels = 3 * image_size * image_size
    seq_length = seq_length or (pixels if images else 8192)
    tail = tail or ("drop" if images else "pack")
    if tail not in ("pack", "drop"):
        raise DataError(f"--tail {tail!r}: expected pack or drop")
    if seq_length < 1:
        raise DataError(f"--seq-length must be >= 1, got {seq_length}")
    if images:
        if tokenizer != "bytes":
            raise DataError(f"image inputs are pixel bytes: use --tokenizer-type bytes, not {tokenizer}")
        if seq_length != pixels or tail != "drop":
            raise DataError(f"image inputs give one sample per image: --seq-length must be {pixels} "
                            f"({image_size}x{image_size}x3) with --tail drop; got {seq_length}, {tail}")

    # flags that decide the output bytes (workers and progress do not)
    tok_flags = {"type": tokenizer}
    if tokenizer == "sentencepiece":
        if train_tokenizer == bool(tokenizer_model):
            raise DataError("sentencepiece needs exactly one of --tokenizer-model FILE or --train-tokenizer")
        if train_tokenizer:
            if not vocab_size:
                raise DataError("--train-tokenizer needs --vocab-size N")
            tok_flags.update(train=True, vocab_size=vocab_size, model_type=sp_model_type,
                             train_bytes=tokenizer_train_bytes)
        else:
            if not Path(tokenizer_model).is_file():
                raise DataError(f"--tokenizer-model {tokenizer_model} does not exist")
            model_bytes = Path(tokenizer_model).read_bytes()  # (it may live at the prefix we are about to clear)
            tok_flags.update(model_sha256=hashlib.sha256(model_bytes).hexdigest())
    elif tokenizer != "bytes":
        raise DataError(f"--tokenizer-type {tokenizer!r}: expected bytes or sentencepiece")
    config = {"inputs": [str(i) for i in inputs], "input_type": input_type, "split": split,
              "splits": list(splits) if splits else None, "json_keys": list(json_keys), "tokenizer": tok_flags,
              "seq_length": seq_length, "append_eod": append_eod, "tail": tail, "maxcount": maxcount,
              "maxsize": maxsize, "image_size": image_size, "block_bytes": block_bytes}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _check_output(prefix, config, overwrite)

    model_path = prefix.parent / f"{prefix.name}-tokenizer.model"
    if tokenizer == "bytes":
        tok = BytesTokenizer()
    elif train_tokenizer:
        train_split = "train" if "train" in entries else next(iter(entries))
        log(f"training sentencepiece (vocab {vocab_size}, {sp_model_type}) on split {train_split} ...")
        tok = train_sentencepiece(iter_texts(entries[train_split], json_keys, tokenizer_train_bytes),
                                  model_path, vocab_size, sp_model_type, num_threads=max(1, workers))
    else:
        model_path.write_bytes(model_bytes)  # shards travel with their tokenizer
        tok = SentencePieceTokenizer(model_path)
    spec = tok.spec()
    layout = SampleLayout(tok.dtype, seq_length + 1)

    order = [s for s in SPLITS if s in entries] + sorted(s for s in entries if s not in SPLITS)
    items = {s: plan_items(entries[s], block_bytes, report) for s in order}
    total_bytes = sum(i.nbytes for s in order for i in items[s])
    read_cfg = ReadConfig(spec, str(model_path.parent), append_eod, json_keys, image_size)
    pool = mp.get_context("spawn").Pool(workers, init_reader, (read_cfg,)) if workers > 1 else None
    if pool is None:
        init_reader(read_cfg)
    bar = _progress(total_bytes, progress)
    split_out, writer = {}, None
    try:
        for s in order:
            writer = ShardWriter(prefix, s, layout, seq_length, maxcount, maxsize)
            chunker = Chunker(seq_length, tail == "pack", writer.write, tok.dtype)
            read = 0
            for docs, events, nbytes in _ordered(group_items(items[s], block_bytes), workers, pool):
                for category, path, n, detail in events:
                    report.add(category, path, n, detail)
                for doc, tokens, first in docs:
                    chunker.add(doc, tokens, first)
                read += nbytes
                bar.update(nbytes)
            chunker.finish()
            shards = writer.close()
            if not chunker.samples:
                report.add("empty_splits", s, detail=f"{chunker.tokens} tokens < seq_length + 1, no sample")
            split_out[s] = {
                "samples": chunker.samples, "tokens": chunker.samples * seq_length, "documents": chunker.documents,
                "corpus_tokens": chunker.tokens, "dropped_tokens": chunker.dropped, "input_bytes": read,
                "shards": shards, "files": [{"path": e.path, "bytes": e.size} for e in entries[s]]}
    except BaseException:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
    if pool is not None:
        pool.close()
        pool.join()

    manifest = build_manifest(prefix.name, seq_length, spec, split_out, warnings=report.to_dict(), config=config)
    path = manifest_path_for(prefix)
    write_json_atomic(path, manifest)
    Path(f"{prefix}-incomplete.json").unlink(missing_ok=True)

    seconds = time.time() - t0
    read = sum(v["input_bytes"] for v in split_out.values())
    summary = {"manifest_path": str(path), "manifest": {**manifest, "manifest_path": str(path.resolve())}, "seconds": seconds, "input_bytes": read,
               "mb_per_s": read / 1e6 / max(seconds, 1e-9),
               "documents": sum(v["documents"] for v in split_out.values()),
               "tokens": manifest["total_tokens"], "samples": manifest["total_samples"],
               "shards": sum(len(v["shards"]) for v in split_out.values()), "warnings": report.to_dict()}
    per_split = ", ".join(f"{s} {len(v['shards'])} shards/{v['samples']} samples" for s, v in split_out.items())
    log(f"preprocess: {summary['documents']:,} documents, {read / 1e6:,.1f} MB in, {summary['tokens']:,} tokens "
        f"in {summary['shards']} shards ({per_split}) in {seconds:.1f} s = {summary['mb_per_s']:.1f} MB/s "
        f"with {workers} worker(s)")
    if report.counts:
        log(f"warnings ({sum(report.counts.values())}):\n" + "\n".join(report.lines()))
    log(f"manifest: {path}")
    return summary


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not enabled, smoothing=0.1)
