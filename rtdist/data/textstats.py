"""Words and bytes of a split's documents, for word-level perplexity and bits per byte.

Words are whitespace-separated (ASCII whitespace, as ``bytes.split()`` and the PG-19 literature count them), bytes
the documents' UTF-8 bytes. A text file is one document; a JSONL line gives one document per ``json_keys`` string
(ids as preprocessing gives them). What preprocessing skips (unreadable files, bad JSON lines, missing or empty
keys) is not counted here either.
"""
from __future__ import annotations

import json

from .sources import doc_id

READ_BYTES = 8 << 20
MAX_DOCUMENT_ROWS = 100_000  # per split: more would make the manifest, which every loader reads, too large


def count_words(data: bytes, after_space: bool = True) -> int:
    """Whitespace-separated words in ``data``; ``after_space``: whether the byte before ``data`` was whitespace
    (or there was none), so that a word cut by a block boundary counts once."""
    words = len(data.split())
    if words and not after_space and not data[:1].isspace():
        words -= 1
    return words


def _text_file(path: str) -> tuple[int, int]:
    words = nbytes = 0
    after_space = True
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            words += count_words(block, after_space)
            nbytes += len(block)
            after_space = block[-1:].isspace()
    return words, nbytes


def _jsonl_file(path: str, doc: str, json_keys) -> list[tuple[str, int, int]]:
    rows, offset = [], 0
    with open(path, "rb") as f:
        for line in f:
            at, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            for key in json_keys:
                value = obj.get(key)
                if not isinstance(value, str) or not value:
                    continue
                raw = value.encode("utf-8", "surrogateescape" if _escapable(value) else "replace")
                suffix = f"-{doc_id(key)}" if len(json_keys) > 1 else ""
                rows.append((f"{doc}-{at:010d}{suffix}", len(raw.split()), len(raw)))
    return rows


def _escapable(value: str) -> bool:
    try:
        value.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def split_text_stats(entries, json_keys) -> dict:
    """``{"words", "text_bytes", "document_stats"}`` of a split's text and JSONL entries (image splits: words
    None). ``document_stats``: ``{"columns": ["doc", "words", "bytes"], "rows": [...]}`` in input order, or None
    past ``MAX_DOCUMENT_ROWS`` documents (the totals are still whole)."""
    if any(e.kind == "image" for e in entries):
        return {"words": None}
    rows = []
    for e in entries:
        try:
            if e.kind == "jsonl":
                rows += _jsonl_file(e.path, e.doc, tuple(json_keys))
            else:
                rows.append((e.doc, *_text_file(e.path)))
        except OSError:
            continue  # preprocessing reports it and skips its documents
    return {"words": sum(r[1] for r in rows), "text_bytes": sum(r[2] for r in rows),
            "document_stats": {"columns": ["doc", "words", "bytes"], "rows": [list(r) for r in rows]}
            if len(rows) <= MAX_DOCUMENT_ROWS else None}
