#!/usr/bin/env python
"""Tokenize a corpus into webdataset tar shards + ``{prefix}-manifest.json`` (logic: ``rtdist.data.pipeline``).

Examples:
  python tools/preprocess.py --input data/pg19 --output-prefix data/shards/pg19 --workers 8 --append-eod
  python tools/preprocess.py --input 'corpus/**/*.txt' --output-prefix out/c --tokenizer-type sentencepiece \\
      --train-tokenizer --vocab-size 32000
  python tools/preprocess.py --input pile.jsonl --json-keys text --output-prefix out/pile --seq-length 4096
  python tools/preprocess.py --input 'pile/train/*.jsonl.zst' --output-prefix out/pile --workers 16 \\
      --tokenizer-type hf --tokenizer-model gpt-neox/tokenizer.json --append-eod
  python tools/preprocess.py --input fineweb/sample/ --text-column text --output-prefix out/fw   # parquet files
  python tools/preprocess.py --input-list urls.txt --output-prefix out/c   # one path or s3:// / https:// URL a line
  python tools/preprocess.py --input imagenet64/ --output-prefix out/in64   # PNG/NPZ: 12288 pixels per sample

Compressed files (.gz, .zst, .bz2, .xz; told by their magic bytes) are decompressed as they are read, one file per
work unit (spread over --workers by file); parquet files are read by row group. A PG-19 layout with a metadata.csv
gives each book its title in the manifest.

Bad input files (unreadable, empty, binary, corrupt compressed data, parquet without the text column, broken
images, bad JSON lines) are skipped and counted in the manifest's warnings; so are special files (named pipes,
sockets, devices: never opened) and files or folders reached a second time (given twice, through a symlink or a hard
link, a symlink loop: each read once). Symlinked folders are followed. A compressed file found damaged or truncated
after its start stops the run, naming it.
When nothing usable is left, or a flag cannot work, it stops with one "error:" line and exit status 2.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from rtdist.data import preprocess
from rtdist.data.sources import read_input_list
from rtdist.errors import ArgumentParser, cli_main


def parse_size(text: str) -> int:
    """'1G', '256M', '64k' or a plain number of bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 1000000)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def json_object(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", nargs="+", default=[],
                    help="folders (a folder with train/ validation/ test/ is a split layout, e.g. PG-19), files, "
                         "globs or URLs (s3://, gs://, http(s)://, through fsspec); .jsonl/.ndjson are JSON lines "
                         "(.json too when compressed), .parquet parquet, .png/.npz images, anything else text; "
                         ".gz/.zst/.bz2/.xz are decompressed while read")
    io.add_argument("--input-list", metavar="FILE",
                    help="a file naming inputs, one path, glob or URL a line ('#' comments); with or instead of --input")
    io.add_argument("--input-type", default="auto", choices=["auto", "text", "jsonl", "parquet", "image"],
                    help="force the input kind instead of guessing from file suffixes (default: auto, which skips "
                         "binary files: known binary suffixes, or a NUL byte in the first 8000 bytes; --input-type "
                         "text reads every file as text, binary or not; compressed files are still decompressed "
                         "first, and parquet or archives are refused)")
    io.add_argument("--json-keys", "--text-column", dest="json_keys", nargs="+", default=["text"],
                    help="JSONL keys or parquet columns to read; each key of each line (row) is one document "
                         "(default: text)")
    io.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                    help="fsspec options for URL inputs, e.g. '{\"anon\": true}' or "
                         "'{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}' (never written to the "
                         "manifest)")
    io.add_argument("--split", default="train", help="split name for inputs without split folders (train)")
    io.add_argument("--splits", nargs="+", help="take only these split folders (and require them)")
    io.add_argument("--validation-fraction", type=float, default=0.0, metavar="F",
                    help="for inputs without split folders: hold out this fraction of the input files (at least "
                         "one), chosen by a hash of their names, as the validation split (0 = none)")
    io.add_argument("--output-prefix", required=True,
                    help="writes {prefix}-{split}-%%06d.tar, {prefix}-manifest.json (and -tokenizer.model)")
    io.add_argument("--overwrite", action="store_true", help="replace shards written under other flags")
    io.add_argument("--staging-dir", default="runs/preprocess-staging",
                    help="with a URL --output-prefix (s3://bucket/pg19): shards are written here, then uploaded, the "
                         "manifest last (runs/preprocess-staging)")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--tokenizer-type", default="bytes", choices=["bytes", "sentencepiece", "hf"],
                    help="bytes: 256 byte ids + EOD (256), exact round trip (default); hf: a Hugging Face "
                         "tokenizer.json")
    tk.add_argument("--tokenizer-model", help="an existing sentencepiece .model, or a tokenizer.json for hf (copied "
                                              "next to the manifest)")
    tk.add_argument("--eod-token", help="hf: the token that ends a document (default: eos_token of a "
                                        "tokenizer_config.json next to it, else <|endoftext|>, <|end_of_text|>, "
                                        "</s> or <eos>, the first it has)")
    tk.add_argument("--train-tokenizer", action="store_true", help="train sentencepiece on the train split")
    tk.add_argument("--vocab-size", type=int,
                    help="vocabulary size for --train-tokenizer (at most: a small corpus may give fewer)")
    tk.add_argument("--sp-model-type", default="unigram", choices=["unigram", "bpe"])
    tk.add_argument("--tokenizer-train-bytes", type=parse_size, default="256M",
                    help="train on about this much text, evenly spread over the split (256M)")
    sm = p.add_argument_group("samples and shards")
    sm.add_argument("--seq-length", type=int,
                    help="tokens per sample; stored as seq_length + 1 (default 8192; images: pixels per image)")
    sm.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    sm.add_argument("--tail", choices=["pack", "drop"],
                    help="a document's tail shorter than a sample: pack with the next document (default for "
                         "text) or drop it (counted; default for images: one image per sample)")
    sm.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most (10000)")
    sm.add_argument("--maxsize", type=parse_size, default="1G", help="bytes per shard at most (1G)")
    sm.add_argument("--image-size", type=int, default=64, help="image side in pixels (64: 12288 tokens)")
    rn = p.add_argument_group("run")
    rn.add_argument("--workers", type=int, default=1, help="tokenizing processes (1)")
    rn.add_argument("--block-size", type=parse_size, default="8M",
                    help="work unit; large files are cut after a newline near each multiple (8M). Memory is "
                         "about 2 x workers x block size x 3")
    rn.add_argument("--no-progress", action="store_true", help="no progress bar (there is none unless stderr is "
                                                                  "a terminal)")
    rn.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = p.parse_args(argv)
    inputs = list(args.input) + (read_input_list(args.input_list) if args.input_list else [])
    if not inputs:
        p.error("one of --input or --input-list is required")
    from rtdist.data.remote import is_url
    url_prefix = args.output_prefix if is_url(args.output_prefix) else None
    uploader = None
    if url_prefix:  # written locally; each shard uploaded once complete, the manifest last (publish_shards)
        from rtdist.data.shards import ShardUploader
        args.output_prefix = str(Path(args.staging_dir) / Path(url_prefix.rstrip("/")).name)
        Path(args.staging_dir).mkdir(parents=True, exist_ok=True)
        uploader = ShardUploader(args.output_prefix, url_prefix)
    try:
        summary = preprocess(inputs, args.output_prefix, tokenizer=args.tokenizer_type,
                   tokenizer_model=args.tokenizer_model, train_tokenizer=args.train_tokenizer,
                   vocab_size=args.vocab_size, sp_model_type=args.sp_model_type,
                   tokenizer_train_bytes=args.tokenizer_train_bytes, input_type=args.input_type, split=args.split,
                   splits=args.splits, json_keys=args.json_keys, seq_length=args.seq_length,
                   append_eod=args.append_eod, tail=args.tail, maxcount=args.maxcount, maxsize=args.maxsize,
                   image_size=args.image_size, workers=args.workers, block_bytes=args.block_size,
                   overwrite=args.overwrite, progress=not args.no_progress, eod_token=args.eod_token,
                   storage_options=args.storage_options, validation_fraction=args.validation_fraction)
    except KeyboardInterrupt:
        print("interrupted: no partial shard was kept; run the same command again to start clean", file=sys.stderr)
        return 130
    finally:
        uploaded = uploader.close() if uploader is not None else {}
    if url_prefix:
        from rtdist.data.shards import publish_shards
        publish_shards(summary["manifest_path"], url_prefix, uploaded=uploaded)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
