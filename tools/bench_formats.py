#!/usr/bin/env python
"""Preprocessing speed per input format: the same documents as plain text, text compressed (gzip, zstd), JSONL
plain and compressed, and parquet, each turned into shards by tools/preprocess.py's pipeline.

The corpus is made here from this Python's standard library sources (each .py file one document, sorted by path,
grouped into files of about --file-mb), so anyone can rerun it without a download. Runs alternate between the
formats (round 1: txt, txt.gz, ...; round 2 the same order shifted by one, ...) so that a machine shared with other
work slows every format alike; the median of --rounds runs is reported. MB are the documents' UTF-8 bytes
(text_bytes), the same for every format, so the rates compare like for like.

  python tools/bench_formats.py                               # 32 MB, bytes tokenizer, 1 worker, 3 rounds
  python tools/bench_formats.py --tokenizer hf --workers 2    # a byte-level BPE tokenizer.json trained here
  python tools/bench_formats.py --mb 128 --markdown           # the table as the README shows it

Goal (issue 27): every compressed format at least 0.7x its plain form per worker.
"""

import argparse
import gzip
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from rtdist.data import preprocess
from rtdist.errors import ArgumentParser, UsageError, bounded, cli_main

FORMATS = ("txt", "txt.gz", "txt.zst", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")
PLAIN = {"txt.gz": "txt", "txt.zst": "txt", "jsonl.gz": "jsonl", "jsonl.zst": "jsonl", "parquet": "jsonl"}


def stdlib_documents(max_bytes: int) -> list[str]:
    """The standard library's .py files (site-packages left out), in path order, up to about ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(text)
            total += len(text.encode())
            if total >= max_bytes:
                break
    return docs


def write_corpus(work: Path, docs: list[str], file_bytes: int, row_group_rows: int) -> dict:
    """Every format of the same documents under ``work/<format>/``; returns {format: folder}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    groups, group, size = [], [], 0
    for doc in docs:
        group.append(doc)
        size += len(doc.encode())
        if size >= file_bytes:
            groups.append(group)
            group, size = [], 0
    groups += [group] if group else []
    folders = {f: work / f for f in FORMATS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    zstd = zstandard.ZstdCompressor(level=3)  # zstd's default, as The Pile and SlimPajama use
    for i, group in enumerate(groups):
        text = "\n".join(group).encode()
        lines = "".join(json.dumps({"text": d}) + "\n" for d in group).encode()
        for fmt, data in (("txt", text), ("jsonl", lines)):
            (folders[fmt] / f"{i:05d}.{fmt}").write_bytes(data)
            (folders[f"{fmt}.gz"] / f"{i:05d}.{fmt}.gz").write_bytes(gzip.compress(data, 6))  # gzip's default
            (folders[f"{fmt}.zst"] / f"{i:05d}.{fmt}.zst").write_bytes(zstd.compress(data))
        pq.write_table(pa.table({"text": group}), folders["parquet"] / f"{i:05d}.parquet",
                       row_group_size=row_group_rows)
    return folders


def train_tokenizer(path: Path, docs: list[str], vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tok.save(str(path))
    return path


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=bounded(int, 1, 4096), default=32, help="corpus size in MB of text (32)")
    p.add_argument("--file-mb", type=bounded(float, 0.01, 4096), default=8.0,
                   help="text per input file in MB (8: several files, so several workers have work)")
    p.add_argument("--row-group-rows", type=bounded(int, 1), default=500, help="parquet rows per row group (500)")
    p.add_argument("--workers", type=bounded(int, 1, 1024), default=1, help="preprocessing workers (1)")
    p.add_argument("--rounds", type=bounded(int, 1, 100), default=3, help="runs of every format, alternating (3)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--tokenizer", choices=["bytes", "hf"], default="bytes",
                   help="bytes, or hf: a byte-level BPE tokenizer.json trained here on the first 4 MB of the corpus")
    p.add_argument("--vocab-size", type=bounded(int, 300, 1 << 17), default=8192, help="hf vocabulary (8192)")
    p.add_argument("--seq-length", type=bounded(int, 1, 1 << 20), default=8192)
    p.add_argument("--work-dir", default="runs/bench_formats", help="corpus and shards go here")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    docs = stdlib_documents(args.mb << 20)
    if not docs:
        raise UsageError("no standard library sources found to build the corpus from")
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs):,} standard library files, {mb:.1f} MB, in files of ~{args.file_mb} MB -> {work}")
    folders = write_corpus(work / "corpus", docs, int(args.file_mb * 1e6), args.row_group_rows)
    kw = dict(seq_length=args.seq_length, append_eod=True, workers=args.workers, overwrite=True, progress=False,
              log=lambda *a: None)
    if args.tokenizer == "hf":
        sample, n = [], 0
        for d in docs:
            sample.append(d)
            n += len(d)
            if n >= 4 << 20:
                break
        kw.update(tokenizer="hf", tokenizer_model=train_tokenizer(work / "tokenizer.json", sample, args.vocab_size))
    formats = list(args.formats)
    runs = {f: [] for f in formats}
    shards = {}
    for r in range(args.rounds):
        order = formats[r % len(formats):] + formats[:r % len(formats)]  # alternate who goes first
        for fmt in order:
            t0 = time.perf_counter()
            s = preprocess([str(folders[fmt])], str(work / "shards" / fmt.replace(".", "_") / "c"), **kw)
            seconds = time.perf_counter() - t0
            runs[fmt].append(s["text_bytes"] / 1e6 / seconds)
            shards[fmt] = [sh["sha256"] for split in s["manifest"]["splits"].values() for sh in split["shards"]]
            print(f"  round {r + 1} {fmt:<10} {runs[fmt][-1]:7.1f} MB/s ({seconds:.2f} s)", file=sys.stderr)
    rows = []
    for fmt in formats:
        rate = statistics.median(runs[fmt]) / args.workers
        base = PLAIN.get(fmt)
        ratio = rate / (statistics.median(runs[base]) / args.workers) if base in runs else None
        same = shards[fmt] == shards[base] if base in shards and fmt != "parquet" else None
        rows.append({"format": fmt, "mb_per_s_per_worker": rate, "runs": runs[fmt], "plain": base,
                     "ratio_to_plain": ratio, "same_shards_as_plain": same,
                     "input_mb": sum(f.stat().st_size for f in folders[fmt].iterdir()) / 1e6})
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchlib import matmul_rate

        gflops = matmul_rate() / 1e9
    except Exception:  # torch is not needed to preprocess; the reference rate is optional
        gflops = None
    where = f"fp32 matmul {gflops:.0f} GFLOP/s" if gflops else "matmul rate not measured"
    print(f"\n{args.tokenizer} tokenizer, {args.workers} worker(s), seq_length {args.seq_length}, {mb:.0f} MB of "
          f"text, median of {args.rounds} alternating runs ({where})")
    if args.markdown:
        print("\n| format | on disk | MB/s per worker | vs plain | same shards as plain |\n|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio_to_plain']:.2f}x {row['plain']}" if row["ratio_to_plain"] else "-"
        same = {True: "yes", False: "NO", None: "-"}[row["same_shards_as_plain"]]
        if args.markdown:
            rate = row["mb_per_s_per_worker"]
            print(f"| `{row['format']}` | {row['input_mb']:.1f} MB | {rate:.{2 if rate < 10 else 1}f} | {ratio} | {same} |")
        else:
            print(f"{row['format']:<10} {row['input_mb']:7.1f} MB on disk  {row['mb_per_s_per_worker']:7.1f} MB/s per "
                  f"worker  {ratio:<14} same shards: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokenizer": args.tokenizer, "workers": args.workers, "mb": mb,
                                               "matmul_gflops": gflops, "rows": rows}, indent=1))
    slow = [r["format"] for r in rows if r["ratio_to_plain"] is not None and r["ratio_to_plain"] < 0.7]
    if slow:
        print(f"below 0.7x plain per worker: {', '.join(slow)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
