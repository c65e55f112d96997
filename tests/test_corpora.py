"""Corpora as they ship: compressed JSONL and text, parquet, URLs and input lists, PG-19's metadata.csv, Hugging Face
tokenizers. Every compressed or columnar file here is written by its own library (gzip, zstandard, bz2, lzma,
pyarrow), and each format is checked against the same text given as plain files."""

import bz2
import gzip
import json
import lzma
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from data_helpers import book, pg19, run, shard_set, stream_of, train_hf_tokenizer, write_files

from rtdist.data import DataError, build_tokenizer, load_manifest
from rtdist.data import sources
from rtdist.data.shards import ShardReader
from rtdist.evaluate import bytes_per_token

L = 64
REPO = Path(__file__).resolve().parents[1]


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


COMPRESS = {".gz": gzip.compress, ".zst": zstd, ".bz2": bz2.compress, ".xz": lzma.compress}


def docs(n: int = 40, seed: int = 0) -> list[str]:
    """Documents of varied length, with multi-byte characters and newlines inside them."""
    return [book(seed + i, 50 + 37 * (i % 11)) for i in range(n)]


def jsonl(texts, **extra) -> bytes:
    return "".join(json.dumps({"text": t, "id": i, **extra}) + "\n" for i, t in enumerate(texts)).encode()


def samples(m: dict, split: str = "train") -> list:
    reader = ShardReader(m)
    out = [reader.read(s, i) for s in m["splits"][split]["shards"] for i in range(s["samples"])]
    reader.close()
    return out


def tars(prefix: Path) -> dict:
    """The tar shards a run wrote (the manifest differs by input paths, so it is compared by its fields)."""
    return {k: v for k, v in shard_set(prefix).items() if k.endswith(".tar")}


# ------------------------------------------------------------------------------------- same shards as plain files

@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst", "a.json.gz", "a.jsonl.bz2", "a.jsonl.xz"])
def test_compressed_jsonl_gives_the_shards_of_the_plain_jsonl(tmp_path, name):
    parts = [docs(30, 0) + [book(7, 9000)] + docs(5, 50), docs(30, 100)]  # one line longer than a block (2000)
    plain = write_files(tmp_path / "plain", {f"{k}.jsonl": jsonl(p) for k, p in enumerate(parts)})
    suffix = name.split(".", 1)[1]
    packed = write_files(tmp_path / "packed", {f"{k}.{suffix}": COMPRESS[Path(name).suffix](jsonl(p))
                                               for k, p in enumerate(parts)})
    # small blocks: each stream comes back to the main process in many pieces; 2 workers read the 2 files at once
    kw = dict(seq_length=L, append_eod=True, block_bytes=2000, workers=2)
    a = run([plain], tmp_path / "a" / "c", **kw)
    b = run([packed], tmp_path / "b" / "c", **kw)
    assert tars(tmp_path / "a" / "c") == tars(tmp_path / "b" / "c") and tars(tmp_path / "a" / "c")
    for key in ("samples", "documents", "corpus_tokens", "input_bytes", "text_bytes"):
        assert a["manifest"]["splits"]["train"][key] == b["manifest"]["splits"]["train"][key], key
    # bits per byte count the documents' bytes, not the JSON around them
    text_bytes = sum(len(t.encode()) for p in parts for t in p)
    assert b["manifest"]["splits"]["train"]["text_bytes"] == text_bytes < b["manifest"]["splits"]["train"]["input_bytes"]
    assert bytes_per_token(b["manifest"], "train") == text_bytes / b["manifest"]["splits"]["train"]["corpus_tokens"]
    assert [f["compression"] for f in b["manifest"]["splits"]["train"]["files"]] == [
        {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}[Path(name).suffix]] * 2


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
@pytest.mark.parametrize("tokenizer", ["bytes", "hf"])
def test_compressed_text_gives_the_shards_of_the_plain_text(tmp_path, monkeypatch, suffix, tokenizer):
    """A large file is cut into blocks after a newline (or, with no newline near, at a character start): the
    decompressed stream is cut at the same places, so a text tokenizer sees the same pieces."""
    monkeypatch.setattr(sources, "NEWLINE_SEARCH", 1 << 16)  # a 70 kB line with no newline takes the fallback cut
    # (the long line has spaces: one 70 kB word would take byte-level BPE seconds)
    texts = {"big.txt": book(1, 40_000) + "λόγος " * 12_000 + book(2, 30_000), "small.txt": book(3, 900)}
    plain = write_files(tmp_path / "plain", texts)
    packed = write_files(tmp_path / "packed", {k + suffix: COMPRESS[suffix](v.encode()) for k, v in texts.items()})
    kw = dict(seq_length=L, append_eod=True, block_bytes=8000)
    if tokenizer == "hf":
        kw.update(tokenizer="hf", tokenizer_model=train_hf_tokenizer(tmp_path / "tok" / "tokenizer.json",
                                                                     texts.values()))
    run([plain], tmp_path / "a" / "c", **kw)
    m = run([packed], tmp_path / "b" / "c", **kw)["manifest"]
    assert tars(tmp_path / "a" / "c") == tars(tmp_path / "b" / "c")
    assert m["splits"]["train"]["input_bytes"] == sum(len(v.encode()) for v in texts.values())
    # the bytes tokenizer: the decompressed bytes themselves, EOD after each file
    if tokenizer == "bytes":
        want = [b for k in sorted(texts) for b in list(texts[k].encode()) + [256]]
        got = stream_of(m, "train")
        assert got.tolist() == want[:len(got)]


def test_parquet_rows_are_the_documents_of_the_same_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs(60)
    plain = write_files(tmp_path / "plain", {"d.jsonl": jsonl(texts)})
    (tmp_path / "pq").mkdir()
    table = pa.table({"id": list(range(len(texts))), "content": texts})
    pq.write_table(table, tmp_path / "pq" / "d.parquet", row_group_size=7)  # 9 row groups: 9 work units
    kw = dict(seq_length=L, append_eod=True, block_bytes=1500, workers=2)
    a = run([plain], tmp_path / "a" / "c", **kw)["manifest"]
    b = run([tmp_path / "pq"], tmp_path / "b" / "c", json_keys=["content"], **kw)["manifest"]
    assert [t.tolist() for _, t in samples(a)] == [t.tolist() for _, t in samples(b)]
    assert b["splits"]["train"]["documents"] == len(texts)
    assert b["splits"]["train"]["text_bytes"] == sum(len(t.encode()) for t in texts)
    # a document is named by its file and row number (JSONL: by its byte offset)
    assert samples(b)[0][0] == "d-0000000000_000000"
    assert any(k.startswith("d-0000000059_") for k, _ in samples(b)) or b["splits"]["train"]["dropped_tokens"]


def test_sentencepiece_trains_on_compressed_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs(40)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": texts[:20]}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(zstd(jsonl(texts[20:])))
    m = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, append_eod=True, tokenizer="sentencepiece",
            train_tokenizer=True, vocab_size=300)["manifest"]
    decoded = build_tokenizer(m).decode(stream_of(m, "train"), eod_text="\0").split("\0")
    assert decoded[:-1] == texts[:len(decoded) - 1] and len(decoded) > 30


def test_parquet_nulls_and_empty_texts_are_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": [book(1, 500), None, "", book(2, 500)]}), tmp_path / "pq" / "d.parquet")
    m = run([tmp_path / "pq"], tmp_path / "o" / "c", seq_length=L)["manifest"]
    assert m["splits"]["train"]["documents"] == 2
    assert m["warnings"]["missing_json_keys"]["examples"] == [f"{tmp_path / 'pq' / 'd.parquet'}: row 1: no string "
                                                              "under 'text' (null)"]
    assert m["warnings"]["empty_documents"]["count"] == 1


def test_concatenated_gzip_members_and_zstd_frames_are_all_read(tmp_path):
    text = [book(i, 3000) for i in range(3)]
    files = {"a.txt.gz": b"".join(gzip.compress(t.encode()) for t in text),  # pigz / cat a.gz b.gz
             "b.txt.zst": b"".join(zstd(t.encode()) for t in text)}  # pzstd
    write_files(tmp_path / "in", files)
    m = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L)["manifest"]
    assert m["splits"]["train"]["input_bytes"] == 2 * len("".join(text).encode())


def test_compressed_inputs_give_the_same_shards_for_any_worker_count(tmp_path):
    write_files(tmp_path / "in", {f"{k}.jsonl.zst": zstd(jsonl(docs(15, 20 * k))) for k in range(4)})
    summaries = [run([tmp_path / "in"], tmp_path / f"w{w}" / "c", seq_length=L, append_eod=True, workers=w,
                     block_bytes=1500) for w in (1, 3)]
    assert shard_set(tmp_path / "w1" / "c") == shard_set(tmp_path / "w3" / "c")  # the manifest too
    assert summaries[0]["samples"] > 10


# ------------------------------------------------------------------------------------------------- bad input

def test_a_stream_reader_that_dies_is_named_and_nothing_hangs(tmp_path, monkeypatch):
    """A worker killed under a stream (out of memory, say) ends the run with a line naming the file (the main
    process would otherwise wait on its queue for ever)."""
    import os

    def killed(item):
        os._exit(9)
        yield

    write_files(tmp_path / "in", {"a.jsonl.zst": zstd(jsonl(docs(10)))})
    monkeypatch.setattr(sources, "read_stream", killed)  # the forked reader process runs this
    with pytest.raises(DataError) as e:
        run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, workers=2)
    assert str(e.value) == (f"{tmp_path / 'in' / 'a.jsonl.zst'}: the process reading it ended without finishing "
                            "(exit status 9; out of memory?)")
    assert not list((tmp_path / "o").glob("c-*"))


def test_a_corrupt_zst_alone_ends_in_one_line_naming_it(tmp_path):
    good = zstd(jsonl(docs(20)))
    write_files(tmp_path / "in", {"bad.jsonl.zst": good[:4] + bytes(reversed(good[4:]))})
    with pytest.raises(DataError) as e:
        run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L)
    msg = str(e.value)
    assert "\n" not in msg and "bad.jsonl.zst" in msg and "corrupt_files: 1" in msg


@pytest.mark.parametrize("workers", [1, 2])
def test_a_truncated_stream_is_named_never_cut_short_in_silence(tmp_path, workers):
    """A download cut short decompresses fine up to its end: only the missing end of the frame tells. (Cut inside
    the first 128 kB block, nothing decompresses and the file is counted as corrupt before the run.)"""
    data = zstd(jsonl(docs(2000)))
    write_files(tmp_path / "in", {"a.jsonl.zst": zstd(jsonl(docs(20))), "b.jsonl.zst": data[:len(data) * 2 // 3]})
    with pytest.raises(DataError) as e:
        run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, workers=workers, block_bytes=4000)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'in' / 'b.jsonl.zst'}: the zstd stream ends early")
    assert not list((tmp_path / "o").glob("c-*.tar")) and not (tmp_path / "o" / "c-manifest.json").exists()


def test_corrupt_or_misnamed_compressed_files_are_skipped_and_counted(tmp_path):
    write_files(tmp_path / "in", {"ok.jsonl.gz": gzip.compress(jsonl(docs(10))),
                                  "plain-named.jsonl.gz": jsonl(docs(3)),  # not gzip at all
                                  "garbage.txt.zst": b"\x28\xb5\x2f\xfd" + b"\x07" * 300,
                                  "binary.txt.gz": gzip.compress(b"\0\1\2" * 1000)})
    m = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L)["manifest"]
    assert [Path(f["path"]).name for f in m["splits"]["train"]["files"]] == ["ok.jsonl.gz"]
    corrupt = m["warnings"]["corrupt_files"]["examples"]
    assert any("plain-named.jsonl.gz: named .gz but not gzip data" in x for x in corrupt)
    assert any("garbage.txt.zst: corrupt zstd data" in x for x in corrupt)
    assert "NUL byte" in m["warnings"]["binary_files_skipped"]["examples"][0]


def test_a_parquet_file_without_the_column_is_named_with_the_columns_it_has(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "body": ["a b c", "d e f"]}), tmp_path / "pq" / "d.parquet")
    with pytest.raises(DataError) as e:
        run([tmp_path / "pq"], tmp_path / "o" / "c", seq_length=4)
    msg = str(e.value)
    assert "\n" not in msg
    assert "d.parquet: no column 'text' (it has id, body): name one with --text-column" in msg
    with pytest.raises(DataError, match="column 'id' is int64, not text"):
        run([tmp_path / "pq"], tmp_path / "o" / "c", seq_length=4, json_keys=["id"])
    m = run([tmp_path / "pq"], tmp_path / "o" / "c", seq_length=4, json_keys=["body"])["manifest"]
    assert m["splits"]["train"]["documents"] == 2


def test_input_type_text_never_tokenizes_compressed_bytes(tmp_path):
    raw = jsonl(docs(20))
    write_files(tmp_path / "in", {"d.jsonl.gz": gzip.compress(raw)})
    m = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, input_type="text")["manifest"]
    got = stream_of(m, "train")
    assert bytes(got.astype(np.uint8)) == raw[:len(got)]  # the decompressed JSON lines, read as text
    assert "non_utf8_kept_as_bytes" not in m["warnings"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x" * 500]}), tmp_path / "in" / "e.parquet")
    with pytest.raises(DataError) as e:
        run([tmp_path / "in"], tmp_path / "p" / "c", seq_length=L, input_type="text")
    assert str(e.value) == (f"{tmp_path / 'in' / 'e.parquet'} is a parquet file: --input-type text would tokenize "
                            "its raw bytes; leave --input-type auto: parquet is read by its --text-column")


# ------------------------------------------------------------------------------------------- PG-19's metadata

def test_pg19_metadata_gives_each_book_its_id_and_title_and_inspect_shows_it(tmp_path):
    root = pg19(tmp_path / "pg19")
    rows = [["100", "The Magna Carta, with notes", "1215", "http://www.gutenberg.org/ebooks/100"],
            ["101", 'A "quoted" title', "1900", "http://www.gutenberg.org/ebooks/101"],
            ["102", "Third", "1901", "u"], ["103", "Fourth", "1902", "u"]]
    import csv

    with open(root / "metadata.csv", "w", newline="") as f:  # no header, as PG-19 ships it
        csv.writer(f).writerows(rows)
    m = run([root], tmp_path / "o" / "pg", seq_length=L, append_eod=True)["manifest"]
    files = m["splits"]["train"]["files"]
    assert [(f["doc"], f.get("title")) for f in files] == [
        ("100", "The Magna Carta, with notes"), ("101", 'A "quoted" title'), ("102", "Third"), ("103", "Fourth")]
    assert files[0]["published"] == "1215" and files[0]["url"].endswith("/100")
    # the validation and test books (100.txt in their folders too) are listed; no row is missing for them here
    assert "ignored_files" not in m["warnings"]  # metadata.csv is read, not "outside the split folders"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_shards.py"), str(tmp_path / "o" / "pg"),
                          "--verify", "off", "--decode", "0", "--chars", "40"], capture_output=True, text=True,
                         check=True).stdout
    assert "book 100: The Magna Carta, with notes (1215)" in out


def test_pg19_books_missing_from_metadata_are_counted(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [3000, 3000]}, splits=("train",))
    (root / "metadata.csv").write_text("100,Only the first,1900,u\n")
    m = run([root], tmp_path / "o" / "pg", seq_length=L)["manifest"]
    assert m["warnings"]["books_without_metadata"]["examples"] == [f"{root / 'train' / '101.txt'}: no row in "
                                                                   f"{root / 'metadata.csv'}"]
    assert "title" not in m["splits"]["train"]["files"][1]


# ------------------------------------------------------------------------------------- Hugging Face tokenizers

def test_hf_tokenizer_round_trips_and_is_recorded_like_sentencepiece(tmp_path):
    texts = docs(30)
    tok_path = train_hf_tokenizer(tmp_path / "tok" / "tokenizer.json", texts, vocab_size=300)
    write_files(tmp_path / "in", {"d.jsonl.zst": zstd(jsonl(texts))})
    s = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, append_eod=True, tokenizer="hf",
            tokenizer_model=tok_path)
    m = s["manifest"]
    import hashlib

    spec = m["tokenizer"]
    assert spec == {"type": "hf", "vocab_size": 300, "eod_id": 0, "eod_token": "<|endoftext|>",
                    "file": "c-tokenizer.json", "sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest()}
    assert (tmp_path / "o" / "c-tokenizer.json").read_bytes() == tok_path.read_bytes()
    tok = build_tokenizer(m)
    decoded = tok.decode(stream_of(m, "train"), eod_text="\0").split("\0")
    assert decoded[:-1] == texts[:len(decoded) - 1] and texts[len(decoded) - 1].startswith(decoded[-1])
    # bits per byte: the documents' bytes per token, the tokens counting EODs as the bytes tokenizer does
    info = m["splits"]["train"]
    assert bytes_per_token(m, "train") == sum(len(t.encode()) for t in texts) / info["corpus_tokens"] > 1.5


def test_hf_eod_token_comes_from_the_flag_or_tokenizer_config(tmp_path):
    tok_path = train_hf_tokenizer(tmp_path / "tok" / "tokenizer.json", docs(10), eod="<|im_end|>")
    write_files(tmp_path / "in", {"a.txt": book(1, 3000)})
    with pytest.raises(DataError, match=r"no end-of-document token \(none of <\|endoftext\|>, .*--eod-token"):
        run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, tokenizer="hf", tokenizer_model=tok_path)
    m = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, tokenizer="hf", tokenizer_model=tok_path,
            eod_token="<|im_end|>")["manifest"]
    assert m["tokenizer"]["eod_token"] == "<|im_end|>" and build_tokenizer(m).eod_id == 0
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    m = run([tmp_path / "in"], tmp_path / "p" / "c", seq_length=L, tokenizer="hf", tokenizer_model=tok_path)["manifest"]
    assert m["tokenizer"]["eod_token"] == "<|im_end|>"
    with pytest.raises(DataError, match="--eod-token '<nope>' is not in it"):
        run([tmp_path / "in"], tmp_path / "q" / "c", seq_length=L, tokenizer="hf", tokenizer_model=tok_path,
            eod_token="<nope>")


def test_a_tokenizer_json_of_another_vocabulary_is_named(tmp_path):
    texts = docs(20)
    tok_path = train_hf_tokenizer(tmp_path / "tok" / "tokenizer.json", texts, vocab_size=300)
    write_files(tmp_path / "in", {"a.txt": "\n".join(texts)})
    m = run([tmp_path / "in"], tmp_path / "o" / "c", seq_length=L, tokenizer="hf", tokenizer_model=tok_path)
    other = train_hf_tokenizer(tmp_path / "other" / "tokenizer.json", texts, vocab_size=280)
    (tmp_path / "o" / "c-tokenizer.json").write_bytes(other.read_bytes())
    with pytest.raises(DataError) as e:
        build_tokenizer(load_manifest(tmp_path / "o" / "c"))
    assert str(e.value) == (f"tokenizer {tmp_path / 'o' / 'c-tokenizer.json'} has 280 ids, "
                            f"{(tmp_path / 'o' / 'c-manifest.json').resolve()} says 300: the shards were written with "
                            "another tokenizer (re-run tools/preprocess.py, or put back the file it copied there)")
    write_files(tmp_path, {"junk.json": "{not a tokenizer"})
    with pytest.raises(DataError, match=r"cannot load Hugging Face tokenizer .*junk\.json: .*expected a tokenizer"):
        run([tmp_path / "in"], tmp_path / "p" / "c", seq_length=L, tokenizer="hf",
            tokenizer_model=tmp_path / "junk.json")
    assert m["manifest"]["tokenizer"]["vocab_size"] == 300


# --------------------------------------------------------------------------------------------- URLs and lists

@pytest.fixture
def http_folder(tmp_path):
    """A folder served over HTTP on 127.0.0.1 by the standard library's server (no Range support, as many
    static servers and object-store gateways behave for plain GETs)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_and_input_lists_give_the_shards_of_local_files(tmp_path, http_folder):
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp (setup.py installs it)")
    served, base = http_folder
    files = {"a.jsonl.zst": zstd(jsonl(docs(20))), "b.jsonl": jsonl(docs(20, 50)), "c.jsonl.gz":
             gzip.compress(jsonl(docs(20, 90)))}
    write_files(served, files)
    local = write_files(tmp_path / "local", files)
    kw = dict(seq_length=L, append_eod=True, workers=2)
    run([local / n for n in files], tmp_path / "a" / "c", **kw)
    listing = tmp_path / "inputs.txt"
    listing.write_text("# a corpus over HTTP\n" + "".join(f"{base}/{n}\n" for n in files) + "\n")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess.py"), "--input-list", str(listing),
                          "--output-prefix", str(tmp_path / "b" / "c"), "--seq-length", str(L), "--append-eod",
                          "--workers", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert tars(tmp_path / "a" / "c") == tars(tmp_path / "b" / "c")
    m = load_manifest(tmp_path / "b" / "c")
    assert [f["path"] for f in m["splits"]["train"]["files"]] == [f"{base}/{n}" for n in files]
    # parquet over HTTP: read by row group through fsspec's random access
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs(20)}), served / "d.parquet", row_group_size=6)
    m = run([f"{base}/d.parquet"], tmp_path / "p" / "c", seq_length=L, workers=2)["manifest"]
    assert m["splits"]["train"]["documents"] == 20
    assert m["splits"]["train"]["text_bytes"] == sum(len(t.encode()) for t in docs(20))
    with pytest.raises(DataError, match=f"--input {base}/nope.jsonl does not exist"):
        run([f"{base}/nope.jsonl"], tmp_path / "d" / "c", seq_length=L)
    with pytest.raises(DataError, match="--input nosuchscheme://x/a.jsonl: cannot be read .*Protocol not known"):
        run(["nosuchscheme://x/a.jsonl"], tmp_path / "d" / "c", seq_length=L)


def test_an_input_list_that_names_nothing_is_refused(tmp_path):
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="names no input"):
        sources.read_input_list(str(tmp_path / "list.txt"))
