"""Preprocessing: corpora -> webdataset tar shards + manifest. One property a user relies on per test."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import book, pg19, run, shard_set, stream_of, write_files

from rtdist.data import DataError, build_demo_corpus, build_tokenizer, load_manifest, verify_shards
from rtdist.data import sources
from rtdist.data.shards import FIXED_MTIME, ShardReader, ShardWriter

L = 64  # tokens per sample: small samples keep the tests fast
REPO = Path(__file__).resolve().parents[1]


def corpus_stream(root: Path, split: str, eod: int | None = 256) -> np.ndarray:
    """What the bytes tokenizer must produce for a split folder: files in name order, EOD after each."""
    out = []
    for f in sorted((root / split).iterdir()):
        out += list(f.read_bytes()) + ([eod] if eod is not None else [])
    return np.array(out, np.uint16)


def samples_of(manifest, split):
    reader = ShardReader(manifest)
    out = [reader.read(s, i) for s in manifest["splits"][split]["shards"] for i in range(s["samples"])]
    reader.close()
    return out


# ------------------------------------------------------------------------------------------ round trip, layout

def test_bytes_round_trip_text_to_shards_to_text(tmp_path):
    root = pg19(tmp_path / "pg19")
    m = run([root], tmp_path / "out" / "pg", seq_length=L, append_eod=True)["manifest"]
    tok = build_tokenizer(m)
    for split in ("train", "validation", "test"):
        want, got, info = corpus_stream(root, split), stream_of(m, split), m["splits"][split]
        # every token is in a sample but a final tail too short for one, and that tail is counted
        assert info["corpus_tokens"] == len(want) == len(got) + info["dropped_tokens"]
        assert info["dropped_tokens"] < L + 1
        assert np.array_equal(got, want[:len(got)])
    books = tok.decode(stream_of(m, "train"), eod_text="\0").split("\0")
    for f, text in zip(sorted((root / "train").iterdir()), books[:-1]):  # the last one is cut by the tail
        assert text == f.read_text(encoding="utf-8")


def test_drop_tail_cuts_each_book_alone_and_keys_name_book_and_chunk(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [700, 100, 400]}, splits=("train",))
    m = run([root], tmp_path / "pg", seq_length=L, tail="drop")["manifest"]
    samples = samples_of(m, "train")
    expected, dropped = [], 0
    for f in sorted((root / "train").iterdir()):
        data = np.frombuffer(f.read_bytes(), np.uint8).astype(np.uint16)
        n = (len(data) - 1) // L  # a sample needs L + 1 tokens; consecutive ones share one
        expected += [(f"{f.stem}_{c:06d}", data[c * L:c * L + L + 1]) for c in range(n)]
        dropped += len(data) - 1 - n * L if n else len(data)
    assert [k for k, _ in samples] == [k for k, _ in expected]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(samples, expected))
    assert m["splits"]["train"]["dropped_tokens"] == dropped


def test_packed_sample_keys_name_the_book_the_sample_starts_in(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [150, 40, 30, 300]}, splits=("train",))
    m = run([root], tmp_path / "pg", seq_length=L, append_eod=True)["manifest"]
    starts, pos = [], 0
    for f in sorted((root / "train").iterdir()):
        starts.append((pos, f.stem))
        pos += f.stat().st_size + 1
    keys, seen = [], {}
    for i in range(m["splits"]["train"]["samples"]):
        owner = [stem for p, stem in starts if p <= i * L][-1]
        keys.append(f"{owner}_{seen.get(owner, 0):06d}")
        seen[owner] = seen.get(owner, 0) + 1
    assert [k for k, _ in samples_of(m, "train")] == keys
    assert not any("." in k for k in keys)


def test_manifest_counts_tokenizer_and_files_match_the_shards(tmp_path):
    root = pg19(tmp_path / "pg19")
    m = run([root], tmp_path / "pg", seq_length=L, maxcount=5)["manifest"]
    assert (m["seq_length"], m["sample_tokens"], m["dtype"]) == (L, L + 1, "uint16")
    assert m["tokenizer"] == {"type": "bytes", "vocab_size": 257, "eod_id": 256, "file": None, "sha256": None}
    for split, info in m["splits"].items():
        assert [s["name"] for s in info["shards"]] == [f"pg-{split}-{i:06d}.tar" for i in range(len(info["shards"]))]
        assert all(0 < s["samples"] <= 5 and s["tokens"] == s["samples"] * L for s in info["shards"])
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        assert all(s["bytes"] == (tmp_path / s["name"]).stat().st_size for s in info["shards"])
        assert [(f["path"], f["bytes"]) for f in info["files"]] == \
               [(str(p), p.stat().st_size) for p in sorted((root / split).iterdir())]
    assert m["total_tokens"] == sum(i["tokens"] for i in m["splits"].values())
    assert verify_shards(load_manifest(tmp_path / "pg-manifest.json")) == []


def test_shards_are_plain_reproducible_tars_that_webdataset_reads(tmp_path):
    import webdataset as wds

    root = pg19(tmp_path / "pg19")
    m = run([root], tmp_path / "pg", seq_length=L, maxsize=6 * 1024)["manifest"]
    shard = m["splits"]["train"]["shards"][0]
    assert shard["samples"] == 5  # members are 1 KiB: a 6th would leave no room for the tar end
    with tarfile.open(tmp_path / shard["name"]) as tar:
        members = tar.getmembers()
    assert {(t.mtime, t.uid, t.gid, t.mode) for t in members} == {(FIXED_MTIME, 0, 0, 0o444)}
    ds = wds.WebDataset(str(tmp_path / shard["name"]), shardshuffle=False).decode()
    ours = samples_of(m, "train")[:5]
    theirs = [(s["__key__"], s["tokens.npy"]) for s in ds]
    assert [k for k, _ in theirs] == [k for k, _ in ours]
    assert all(t.dtype == np.uint16 and np.array_equal(t, o) for (_, t), (_, o) in zip(theirs, ours))


# ------------------------------------------------------------------------------------------ determinism

def big_corpus(root: Path) -> Path:
    """Books plus one file far larger than the test block size (it is cut into blocks at newlines)."""
    pg19(root)
    write_files(root, {"train/900.txt": book(9, 20000)})
    return root


def test_two_runs_give_byte_identical_shards_and_manifest(tmp_path):
    root = big_corpus(tmp_path / "pg19")
    a = run([root], tmp_path / "a" / "pg", seq_length=L, append_eod=True, maxcount=20, block_bytes=4096)
    run([root], tmp_path / "b" / "pg", seq_length=L, append_eod=True, maxcount=20, block_bytes=4096)
    assert a["shards"] > 3
    assert shard_set(tmp_path / "a" / "pg") == shard_set(tmp_path / "b" / "pg")


@pytest.mark.parametrize("tail", ["pack", "drop"])  # pack: workers write shards; drop: workers tokenize, main writes
def test_parallel_workers_write_the_same_shards_as_one_worker(tmp_path, tail):
    root = big_corpus(tmp_path / "pg19")
    kw = dict(seq_length=L, append_eod=True, maxcount=20, block_bytes=4096, tail=tail)
    run([root], tmp_path / "one" / "pg", workers=1, **kw)
    run([root], tmp_path / "two" / "pg", workers=2, **kw)
    assert shard_set(tmp_path / "one" / "pg") == shard_set(tmp_path / "two" / "pg")


def test_workers_writing_shards_from_the_files_match_the_streaming_path(tmp_path):
    root = big_corpus(tmp_path / "pg19")
    bad = book(3, 3000).encode() + b"\xff" + book(4, 3000).encode() + b"\xe2\x82"  # invalid inside and at the end
    write_files(root, {"train/950.txt": bad})
    kw = dict(seq_length=L, append_eod=True, maxcount=20, block_bytes=1000)  # reads of 15 samples cut characters
    run([root], tmp_path / "direct" / "pg", **kw)
    run([root], tmp_path / "stream" / "pg", direct=False, **kw)
    assert shard_set(tmp_path / "direct" / "pg") == shard_set(tmp_path / "stream" / "pg")
    warning = load_manifest(tmp_path / "direct" / "pg")["warnings"]["non_utf8_kept_as_bytes"]
    at = len(book(3, 3000).encode())
    assert warning == {"count": 1, "files": 1, "examples": [f"{root / 'train' / '950.txt'}: byte {at}"]}


def test_cutting_large_files_into_blocks_does_not_change_the_tokens(tmp_path):
    root = big_corpus(tmp_path / "pg19")
    run([root], tmp_path / "small" / "pg", seq_length=L, block_bytes=1000)
    run([root], tmp_path / "large" / "pg", seq_length=L, block_bytes=1 << 20)
    tars = lambda d: {k: v for k, v in shard_set(tmp_path / d / "pg").items() if k.endswith(".tar")}  # noqa: E731
    assert tars("small") == tars("large")


# ------------------------------------------------------------------------------------------ other inputs

def test_sentencepiece_trained_on_the_corpus_round_trips_and_is_recorded(tmp_path):
    root = pg19(tmp_path / "pg19")
    kw = dict(tokenizer="sentencepiece", seq_length=L, append_eod=True)
    m = run([root], tmp_path / "a" / "pg", train_tokenizer=True, vocab_size=400, **kw)["manifest"]
    spec, model = m["tokenizer"], tmp_path / "a" / "pg-tokenizer.model"
    assert spec["type"] == "sentencepiece" and spec["file"] == model.name
    assert 256 + 2 < spec["vocab_size"] <= 400  # byte fallback + specials + learnt pieces, at most what was asked
    assert spec["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    tok = build_tokenizer(m)
    texts = tok.decode(stream_of(m, "train"), eod_text="\0").split("\0")
    for f, text in zip(sorted((root / "train").iterdir()), texts[:-1]):
        assert text == f.read_text(encoding="utf-8")
    # loading the model instead of training gives the same shards
    run([root], tmp_path / "b" / "pg", tokenizer_model=str(model), **kw)
    tars = lambda d: {k: v for k, v in shard_set(tmp_path / d / "pg").items() if k.endswith(".tar")}  # noqa: E731
    assert tars("a") == tars("b")
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    with pytest.raises(DataError, match="sha256"):
        build_tokenizer(load_manifest(tmp_path / "a" / "pg-manifest.json"))


def test_jsonl_documents_and_bad_lines_are_counted(tmp_path):
    lines = [json.dumps({"text": "first document"}), "{oops", json.dumps({"title": "no text"}), "[1, 2]", "",
             json.dumps({"text": ""}), json.dumps({"text": "second ✓ document", "id": 7})]
    write_files(tmp_path, {"docs.jsonl": "\n".join(lines) + "\n"})
    s = run([tmp_path / "docs.jsonl"], tmp_path / "out" / "j", seq_length=8, append_eod=True)
    m = s["manifest"]
    assert m["splits"]["train"]["documents"] == 2
    w = {k: v["count"] for k, v in m["warnings"].items()}
    assert w == {"bad_json_lines": 2, "missing_json_keys": 1, "empty_documents": 1}
    want = list(b"first document") + [256] + list("second ✓ document".encode()) + [256]
    got = stream_of(m, "train")
    assert list(got) == want[:len(got)] and len(got) + m["splits"]["train"]["dropped_tokens"] == len(want)
    offset = len(lines[0]) + 1 + sum(len(x) + 1 for x in lines[1:6])
    assert samples_of(m, "train")[0][0] == f"docs-{0:010d}_000000"
    assert any(k.startswith(f"docs-{offset:010d}_") for k, _ in samples_of(m, "train"))


def test_images_become_one_sample_each_eod_then_pixels_in_raster_order(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    png = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    planar = rng.integers(0, 256, (2, 3 * 64 * 64), dtype=np.uint8)  # ImageNet-64 npz rows: R, G, B planes
    (tmp_path / "img").mkdir()
    Image.fromarray(png).save(tmp_path / "img" / "a.png")
    Image.fromarray(png[:32, :32]).save(tmp_path / "img" / "b_small.png")
    np.savez(tmp_path / "img" / "c.npz", data=planar)
    m = run([tmp_path / "img"], tmp_path / "out" / "im")["manifest"]
    assert m["seq_length"] == 12288
    samples = samples_of(m, "train")
    assert [k for k, _ in samples] == ["a_000000", "c-0000000_000000", "c-0000001_000000"]
    hwc = [png] + [p.reshape(3, 64, 64).transpose(1, 2, 0) for p in planar]
    for (_, tokens), image in zip(samples, hwc):
        assert tokens[0] == 256 and np.array_equal(tokens[1:], image.reshape(-1))
    assert m["warnings"]["bad_images"]["examples"][0].startswith(str(tmp_path / "img" / "b_small.png"))
    with pytest.raises(DataError, match="12288"):
        run([tmp_path / "img"], tmp_path / "out2" / "im", seq_length=8192)


# ------------------------------------------------------------------------------------------ bad input

def test_non_utf8_bytes_are_kept_exactly_by_the_bytes_tokenizer_and_counted(tmp_path):
    raw = b"caf\xe9 latin-1 \xff\xfe and a cut \xc3"
    write_files(tmp_path / "in", {"a.txt": raw, "b.txt": "ok text"})
    m = run([tmp_path / "in"], tmp_path / "out" / "x", seq_length=4)["manifest"]
    assert bytes(stream_of(m, "train").astype(np.uint8)) == (raw + b"ok text")[:len(stream_of(m, "train"))]
    assert m["warnings"]["non_utf8_kept_as_bytes"]["files"] == 1


def test_non_utf8_is_replaced_and_counted_by_text_tokenizers(tmp_path):
    write_files(tmp_path / "in", {"a.txt": b"caf\xe9 and \xff\xfe end\n" + book(1, 2000).encode()})
    m = run([tmp_path / "in"], tmp_path / "out" / "x", seq_length=8, tokenizer="sentencepiece",
            train_tokenizer=True, vocab_size=350)["manifest"]
    assert m["warnings"]["non_utf8_replaced"]["count"] == 3  # \xe9, \xff, \xfe
    assert build_tokenizer(m).decode(stream_of(m, "train")).startswith("caf\ufffd and \ufffd\ufffd end")


def test_empty_and_unreadable_files_are_counted_and_the_rest_processed(tmp_path):
    import socket

    root = pg19(tmp_path / "pg19", {"train": [500, 500, 500]}, splits=("train",))
    write_files(root, {"train/empty.txt": b""})
    (root / "train" / "gone.txt").symlink_to(root / "nowhere.txt")
    with socket.socket(socket.AF_UNIX) as sock:  # a special file: skipped without being opened
        sock.bind(str(root / "train" / "socket.txt"))
        s = run([root], tmp_path / "pg", seq_length=L)
    w = s["manifest"]["warnings"]
    assert w["empty_files"]["count"] == 1 and w["unreadable_files"]["count"] == 1  # the broken symlink
    assert w["special_files_skipped"]["examples"] == [f"{root / 'train' / 'socket.txt'}: a socket, not read"]
    assert s["manifest"]["splits"]["train"]["documents"] == 3


def test_named_pipes_are_counted_and_never_opened(tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: a run that opened one would hang forever.
    root = pg19(tmp_path / "pg19", {"train": [500, 500]}, splits=("train",))
    os.mkfifo(root / "train" / "pipe.txt")
    os.mkfifo(tmp_path / "given.txt")
    s = run([root, tmp_path / "given.txt", str(tmp_path / "giv*.txt")], tmp_path / "pg", seq_length=L)
    w = s["manifest"]["warnings"]["special_files_skipped"]
    assert w["count"] == 3 and w["examples"][0] == f"{root / 'train' / 'pipe.txt'}: a named pipe, not read"
    assert s["manifest"]["splits"]["train"]["documents"] == 2
    with pytest.raises(DataError, match=r"no usable input in .*special_files_skipped: 1 \(.*given.txt: a named pipe"):
        run([tmp_path / "given.txt"], tmp_path / "pg2", seq_length=L)


def test_a_file_reached_twice_is_read_once_and_counted(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [500, 600, 700]}, splits=("train",))
    once = run([root / "train"], tmp_path / "once", seq_length=L)["manifest"]
    os.link(root / "train" / "101.txt", tmp_path / "hard.txt")
    (root / "train" / "link.txt").symlink_to(root / "train" / "100.txt")
    twice = run([root / "train", root / "train" / "102.txt", tmp_path / "hard.txt", str(root / "train" / "10*.txt")],
                tmp_path / "twice", seq_length=L)["manifest"]
    w = twice["warnings"]["duplicate_inputs"]
    assert w["count"] == 6  # link.txt, then 102.txt and hard.txt given again, then 100..102 matched by the pattern
    assert f"{root / 'train' / 'link.txt'}: the same file as {root / 'train' / '100.txt'}: read once" in w["examples"]
    assert twice["splits"]["train"]["tokens"] == once["splits"]["train"]["tokens"]
    assert twice["splits"]["train"]["documents"] == 3


def test_symlinked_folders_are_read_and_a_symlink_loop_ends(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [500, 600]}, splits=("train",))
    write_files(tmp_path / "elsewhere", {"b.txt": book(7, 800)})
    (root / "train" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "train" / "loop").symlink_to(root / "train", target_is_directory=True)  # train/loop/loop/... forever
    (tmp_path / "elsewhere" / "back").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    m = run([root], tmp_path / "pg", seq_length=L)["manifest"]
    assert m["splits"]["train"]["documents"] == 3  # 100.txt, 101.txt and more/b.txt, each once
    assert m["warnings"]["duplicate_folders"]["count"] == 2  # loop and more/back: the folders they lead to were read
    assert f"{root / 'train' / 'loop'}: the same folder as {root / 'train'}: read once" in \
        m["warnings"]["duplicate_folders"]["examples"]


def test_what_a_split_layout_or_a_pattern_leaves_out_is_said(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [500]}, splits=("train",))
    write_files(root, {"extra/a.txt": book(1, 500), "notes.txt": book(2, 500)})
    m = run([root], tmp_path / "pg", seq_length=L)["manifest"]
    assert sorted(m["warnings"]["ignored_files"]["examples"]) == [
        f"{root / 'extra'}: outside the train/validation/test folders",
        f"{root / 'notes.txt'}: outside the train/validation/test folders"]
    m = run([str(root / "*")], tmp_path / "glob", seq_length=L)["manifest"]  # matches notes.txt and two folders
    assert m["warnings"]["folders_skipped"]["count"] == 2 and m["splits"]["train"]["documents"] == 1


@pytest.mark.parametrize("tail", ["pack", "drop"])  # pack: workers write shards from the files; drop: streaming
def test_a_file_failing_during_the_run_is_named_never_silently_lost(tmp_path, monkeypatch, tail):
    root = pg19(tmp_path / "pg19", {"train": [500, 500, 500]}, splits=("train",))
    real = sources.read_bytes

    def failing(item):
        if item.path.endswith("101.txt"):
            raise PermissionError(13, "Permission denied")
        return real(item)
    monkeypatch.setattr(sources, "read_bytes", failing)
    if tail == "pack":
        with pytest.raises(DataError, match=r"101\.txt: became unreadable while preprocessing"):
            run([root], tmp_path / "pg", seq_length=L, tail=tail)
    else:
        w = run([root], tmp_path / "pg", seq_length=L, tail=tail)["manifest"]["warnings"]
        assert w["unreadable_files"]["examples"] == [str(root / "train" / "101.txt") + ": Permission denied"]


def test_a_missing_split_is_a_counted_warning_unless_asked_for(tmp_path):
    root = pg19(tmp_path / "pg19", splits=("train", "validation"))
    m = run([root], tmp_path / "pg", seq_length=L)["manifest"]
    assert sorted(m["splits"]) == ["train", "validation"]
    assert m["warnings"]["missing_splits"]["examples"] == [str(root / "test") + ": no such folder, split not written"]
    with pytest.raises(DataError, match="no test/ folder"):
        run([root], tmp_path / "pg2", seq_length=L, splits=["train", "test"])


def test_bad_inputs_get_clear_messages(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run([tmp_path / "nope"], tmp_path / "x")
    with pytest.raises(DataError, match="matches no file"):
        run([str(tmp_path / "*.txt")], tmp_path / "x")
    write_files(tmp_path / "in", {"a.txt": b""})
    with pytest.raises(DataError, match="no usable input"):
        run([tmp_path / "in"], tmp_path / "x")
    write_files(tmp_path / "in", {"a.txt": b"text"})
    with pytest.raises(DataError, match="--vocab-size"):
        run([tmp_path / "in"], tmp_path / "x", tokenizer="sentencepiece", train_tokenizer=True)


def test_binary_files_are_skipped_and_counted_unless_text_is_forced(tmp_path):
    root = pg19(tmp_path / "pg19", {"train": [3000]}, splits=("train",))
    write_files(root, {"train/libx.so": b"\x7fELF, no NUL byte in it", "train/blob.txt": b"ab\0cd" * 50})
    m = run([root], tmp_path / "a" / "pg", seq_length=L)["manifest"]
    assert m["warnings"]["binary_files_skipped"] == {
        "count": 2, "files": 2, "examples": [f"{root / 'train' / 'blob.txt'}: binary (a NUL byte at 2)",
                                             f"{root / 'train' / 'libx.so'}: binary file type .so"]}
    assert [f["path"] for f in m["splits"]["train"]["files"]] == [str(root / "train" / "100.txt")]
    forced = run([root], tmp_path / "b" / "pg", seq_length=L, input_type="text")["manifest"]
    assert "binary_files_skipped" not in forced["warnings"] and len(forced["splits"]["train"]["files"]) == 3


def test_a_run_that_failed_before_writing_a_shard_does_not_block_a_retry_with_other_flags(tmp_path):
    root = pg19(tmp_path / "pg19")
    with pytest.raises(DataError, match="--vocab-size 260 is too small for this corpus: .* needs at least"):
        run([root], tmp_path / "pg", seq_length=L, tokenizer="sentencepiece", train_tokenizer=True, vocab_size=260)
    assert not list(tmp_path.glob("pg-*"))  # no marker, no half-written model
    assert run([root], tmp_path / "pg", seq_length=L)["shards"] == 3


def test_an_output_prefix_under_a_file_is_named_before_any_work(tmp_path):
    root = pg19(tmp_path / "pg19")
    write_files(tmp_path, {"some_file.txt": "x"})
    with pytest.raises(DataError, match=r"--output-prefix .*some_file\.txt/sub/pg: .*some_file\.txt is a file, not a"):
        run([root], tmp_path / "some_file.txt" / "sub" / "pg")


@pytest.mark.parametrize("tail", ["pack", "drop"])
def test_an_unexpected_error_in_a_worker_names_the_file(tmp_path, monkeypatch, tail):
    root = pg19(tmp_path / "pg19", {"train": [300, 300]}, splits=("train",))
    monkeypatch.setattr(sources, "read_bytes", lambda item: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(DataError, match=r"100\.txt.*RuntimeError: boom"):
        run([root], tmp_path / "pg", seq_length=L, tail=tail, workers=2)


# ------------------------------------------------------------------------------------------ safe output

def test_a_prefix_holding_shards_from_other_flags_is_refused(tmp_path):
    root = pg19(tmp_path / "pg19")
    run([root], tmp_path / "pg", seq_length=L)
    with pytest.raises(DataError, match=r"different flags.*seq_length: 64 \(there\) vs 32 \(now\).*--overwrite"):
        run([root], tmp_path / "pg", seq_length=32)
    run([root], tmp_path / "pg", seq_length=32, maxcount=1000, overwrite=True)
    assert {p.name for p in tmp_path.glob("pg-*.tar")} == {"pg-train-000000.tar", "pg-validation-000000.tar",
                                                          "pg-test-000000.tar"}
    (tmp_path / "other-train-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no manifest describes"):
        run([root], tmp_path / "other", seq_length=L)


def test_an_interrupted_run_leaves_no_half_shard_and_a_rerun_starts_clean(tmp_path, monkeypatch):
    root = pg19(tmp_path / "pg19")
    kw = dict(seq_length=L, maxcount=10)
    written, real = [0], ShardWriter.write_many

    def interrupt_at_25(self, keys, samples):  # Ctrl-C in the middle of the third shard
        n = min(len(keys), 25 - written[0])
        real(self, keys[:n], samples[:n])
        written[0] += n
        if written[0] == 25:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write_many", interrupt_at_25)
    with pytest.raises(KeyboardInterrupt):
        run([root], tmp_path / "pg", **kw)
    monkeypatch.setattr(ShardWriter, "write_many", real)
    names = sorted(p.name for p in tmp_path.glob("pg-*"))
    assert names == ["pg-incomplete.json", "pg-train-000000.tar", "pg-train-000001.tar"]  # whole shards only
    for p in tmp_path.glob("pg-*.tar"):
        with tarfile.open(p) as tar:
            assert len(tar.getmembers()) == 10
    (tmp_path / "pg-train-000002.tar.tmp").write_bytes(b"half a shard from a killed run")
    run([root], tmp_path / "pg", **kw)
    run([root], tmp_path / "clean" / "pg", **kw)
    assert shard_set(tmp_path / "pg") == shard_set(tmp_path / "clean" / "pg")


# ------------------------------------------------------------------------------------------ tools

def test_inspect_reports_corrupt_and_truncated_shards(tmp_path):
    root = pg19(tmp_path / "pg19")
    m = run([root], tmp_path / "pg", seq_length=L, maxcount=10)["manifest"]
    first, second = (tmp_path / s["name"] for s in m["splits"]["train"]["shards"][:2])
    data = bytearray(first.read_bytes())
    data[512 + 200] ^= 1  # one token of the first sample
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:5000])
    problems = verify_shards(load_manifest(tmp_path / "pg"))
    assert len(problems) == 2
    assert first.name in problems[0] and "sha256" in problems[0]
    assert second.name in problems[1] and "5000 bytes but the manifest says" in problems[1]


def test_command_line_tools(tmp_path):
    root = pg19(tmp_path / "pg19")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    env=env, cwd=tmp_path, timeout=60)
    r = cli(REPO / "tools/preprocess.py", "--input", root, "--output-prefix", "out/pg", "--seq-length", L,
            "--append-eod", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "preprocess:" in r.stdout and "MB/s" in r.stdout
    r = cli(REPO / "tools/inspect_shards.py", "out/pg", "--decode", 0, "--split", "train", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "all good" in r.stdout and (root / "train" / "100.txt").read_text()[:10] in r.stdout
    r = cli(REPO / "tools/preprocess.py", "--input", root, "--output-prefix", "out/pg", "--tokenizer-type",
            "sentencepiece")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_demo_corpus_is_local_text_in_the_pg19_layout_and_deterministic(tmp_path):
    a = build_demo_corpus(tmp_path / "a", max_bytes=300_000, book_bytes=50_000)
    build_demo_corpus(tmp_path / "b", max_bytes=300_000, book_bytes=50_000)
    assert a["books"]["validation"] == a["books"]["test"] == 1 and a["books"]["train"] >= 1
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*.txt"))}  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert (tmp_path / "a" / "train" / "10000.txt").read_bytes().startswith(b"# ==== ")
    assert run([tmp_path / "a"], tmp_path / "out" / "demo", seq_length=1024)["manifest"]["splits"]["test"]["samples"]


def test_validation_fraction_holds_out_the_same_files_every_time_and_warns_without_it(tmp_path):
    from rtdist.data import preprocess
    from rtdist.errors import DataError
    corpus = write_files(tmp_path / "flat", {f"book{i:02d}.txt": book(i, 3000) for i in range(20)})
    lines = []
    a = preprocess([str(corpus)], str(tmp_path / "a" / "x"), seq_length=64, validation_fraction=0.1, progress=False,
                   log=lines.append)["manifest"]
    b = preprocess([str(corpus)], str(tmp_path / "b" / "x"), seq_length=64, validation_fraction=0.1, progress=False,
                   log=lambda *a, **k: None)["manifest"]
    held = [f["path"] for f in a["splits"]["validation"]["files"]]
    assert len(held) == 2 and held == [f["path"] for f in b["splits"]["validation"]["files"]]
    assert not set(held) & {f["path"] for f in a["splits"]["train"]["files"]}
    assert [s["sha256"] for s in a["splits"]["validation"]["shards"]] == \
        [s["sha256"] for s in b["splits"]["validation"]["shards"]]
    assert any("2 of 20 files held out as validation" in x for x in lines)
    lines.clear()
    preprocess([str(corpus)], str(tmp_path / "c" / "x"), seq_length=64, progress=False, log=lines.append)
    assert any(x.startswith("warning: no validation split") and "--validation-fraction 0.01" in x for x in lines)
    with pytest.raises(DataError, match="have a validation/ folder already"):
        preprocess([str(pg19(tmp_path / "pg"))], str(tmp_path / "d" / "x"), seq_length=64, validation_fraction=0.1,
                   progress=False, log=lambda *a, **k: None)
