"""Words and bytes of a split's documents, for word-level perplexity and bits per byte.

Words are whitespace-separated (ASCII whitespace, as ``bytes.split()`` and the PG-19 literature count them), bytes
the documents' UTF-8 bytes. A text file is one document; a JSONL line or a parquet row gives one document per ``json_keys``
string (ids as preprocessing gives them). What preprocessing skips (unreadable files, bad JSON lines, missing or empty
keys) is not counted here either.
"""
from __future__ import annotations

import json
from typing import Optional

from ..errors import DataError
from .sources import doc_id, iter_decompressed, open_input

READ_BYTES = 8 << 20
MAX_DOCUMENT_ROWS = 100_000  # per split: more would make the manifest, which every loader reads, too large


def count_words(data: bytes, after_space: bool = True) -> int:
    """Whitespace-separated words in ``data``; ``after_space``: whether the byte before ``data`` was whitespace
    (or there was none), so that a word cut by a block boundary counts once."""
    words = len(data.split())
    if words and not after_space and not data[:1].isspace():
        words -= 1
    return words


def _text_file(e, storage_options) -> tuple[int, int]:
    words = nbytes = 0
    after_space = True
    with open_input(e.path, storage_options) as fh:
        for block in iter_decompressed(fh, e.codec, e.path):
            words += count_words(block, after_space)
            nbytes += len(block)
            after_space = block[-1:].isspace()
    return words, nbytes


def _row(doc: str, key: str, value, json_keys) -> Optional[tuple[str, int, int]]:
    if not isinstance(value, str) or not value:
        return None
    raw = value.encode("utf-8", "surrogateescape" if _escapable(value) else "replace")
    return f"{doc}{f'-{doc_id(key)}' if len(json_keys) > 1 else ''}", len(raw.split()), len(raw)


def _jsonl_file(e, json_keys, storage_options) -> list[tuple[str, int, int]]:
    rows, offset, rest = [], 0, b""

    def lines(chunks):
        nonlocal rest
        for chunk in chunks:
            *complete, rest = (rest + chunk).split(b"\n")
            yield from complete
        if rest:
            yield rest

    with open_input(e.path, storage_options) as fh:
        for line in lines(iter_decompressed(fh, e.codec, e.path)):
            at, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError:
                continue
            if isinstance(obj, dict):
                rows += filter(None, (_row(f"{e.doc}-{at:010d}", k, obj.get(k), json_keys) for k in json_keys))
    return rows


def _parquet_file(e, json_keys, storage_options) -> list[tuple[str, int, int]]:
    import pyarrow.parquet as pq

    rows, row = [], 0
    with open_input(e.path, storage_options, stream=False) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=list(dict.fromkeys(json_keys))):
            columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
            for i in range(batch.num_rows):
                rows += filter(None, (_row(f"{e.doc}-{row + i:010d}", k, columns.get(k, [None] * batch.num_rows)[i],
                                           json_keys) for k in json_keys))
            row += batch.num_rows
    return rows


def _escapable(value: str) -> bool:
    try:
        value.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def split_text_stats(entries, json_keys, storage_options=None, text_bytes: bool = True) -> dict:
    """``{"words", "text_bytes", "document_stats"}`` of a split's text, JSONL and parquet entries (plain, compressed
    or at a URL; image splits: words None). ``document_stats``: ``{"columns": ["doc", "words", "bytes"], "rows":
    [...]}`` in input order, or None past ``MAX_DOCUMENT_ROWS`` documents (the totals are still whole).
    ``text_bytes=False`` leaves that total out (the tokenizing pass records it)."""
    if any(e.kind == "image" for e in entries):
        return {"words": None}
    json_keys, rows = tuple(json_keys), []
    for e in entries:
        try:
            if e.kind == "jsonl":
                rows += _jsonl_file(e, json_keys, storage_options)
            elif e.kind == "parquet":
                rows += _parquet_file(e, json_keys, storage_options)
            else:
                rows.append((e.doc, *_text_file(e, storage_options)))
        except (OSError, DataError):
            continue  # preprocessing reports it and skips its documents
    out = {"words": sum(r[1] for r in rows), "text_bytes": sum(r[2] for r in rows),
           "document_stats": {"columns": ["doc", "words", "bytes"], "rows": [list(r) for r in rows]}
           if len(rows) <= MAX_DOCUMENT_ROWS else None}
    if not text_bytes:
        del out["text_bytes"]
    return out
