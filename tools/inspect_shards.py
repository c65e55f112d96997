#!/usr/bin/env python
"""Validate shards against their manifest and decode samples back to text.

  python tools/inspect_shards.py out/pg19                     # check every shard (sha256, tar, members, tokens)
  python tools/inspect_shards.py out/pg19 --verify quick      # the check training runs before step 1 (data.verify)
  python tools/inspect_shards.py out/pg19 --split test --decode 0 --chars 2000   # with the book's title, if known
  python tools/inspect_shards.py out/pg19-manifest.json --key 10002_000003 --verify off
  python tools/inspect_shards.py s3://bucket/pg19 --verify quick   # shards at a URL (AWS_ENDPOINT_URL, AWS_*)

Problems are listed one per line on stdout ("PROBLEM ..."); any problem ends the run with one "error:" line on
stderr and exit status 2.
"""

import argparse
import sys

from rtdist.data import build_tokenizer, load_manifest, manifest_shards, shard_problem, verify_shards
from rtdist.data.shards import read_sample, shard_location, split_info
from rtdist.errors import ArgumentParser, CorruptShardError, bounded, cli_main


def document_of(manifest: dict, split: str, key: str) -> dict | None:
    """The input file (manifest entry) a sample key ``{doc}_{chunk:06d}`` starts in; its title when PG-19's
    metadata.csv gave one."""
    doc = key.rsplit("_", 1)[0]
    return next((f for f in manifest["splits"][split].get("files", []) if f.get("doc") == doc), None)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="{prefix}-manifest.json or the prefix, a path or a URL (s3://, gs://, http(s)://, pipe:)")
    p.add_argument("--split", nargs="+", help="splits to check / decode from (default: all; decode: first)")
    p.add_argument("--decode", type=bounded(int, 0), metavar="N", help="decode sample N of the split (shard order)")
    p.add_argument("--key", help="decode the sample with this key ({book}_{chunk:06d})")
    p.add_argument("--chars", type=bounded(int, 0), default=1000, help="print at most this many characters (1000)")
    p.add_argument("--verify", choices=["full", "quick", "off"], default="full",
                   help="full: every byte (sha256, tar, members, tokens; default); quick: sizes and the first and "
                        "last member of each shard; off: no check")
    p.add_argument("--no-verify", dest="verify", action="store_const", const="off", help="same as --verify off")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = p.parse_args(argv)
    m = load_manifest(args.manifest)
    splits = args.split or list(m["splits"])
    for s in splits:
        split_info(m, s)  # an unknown split is named before anything is printed
    tok = m["tokenizer"]
    print(f"{m['manifest_path']}: seq_length {m['seq_length']} (samples of {m['sample_tokens']} {m['dtype']}), "
          f"tokenizer {tok['type']} vocab {tok['vocab_size']} eod {tok['eod_id']}")
    for s in splits:
        info = m["splits"][s]
        print(f"  {s:<12} {len(info['shards']):>6} shards {info['samples']:>10,} samples "
              f"{info.get('tokens', 0):>14,} tokens  {info.get('documents', 0):,} documents, "
              f"{info.get('dropped_tokens', 0):,} tokens dropped")
    for c, w in m.get("warnings", {}).items():
        print(f"  warning {c}: {w.get('count')} (e.g. {(w.get('examples') or ['?'])[0]})")
    if args.verify != "off":
        from tqdm import tqdm

        shards = manifest_shards(m, splits)
        with tqdm(total=sum(s["bytes"] for s in shards), unit="B", unit_scale=True, desc="verify",
                  disable=True if args.no_progress else None) as bar:
            if args.verify == "full":
                problems = verify_shards(m, splits, bar)
            else:
                problems = []
                for shard in shards:
                    problem = shard_problem(m, shard, full=False)
                    if problem:
                        problems.append(f"{shard_location(m, shard)}: {problem}")
                    bar.update(shard["bytes"])
        for line in problems:
            print(f"PROBLEM {line}")
        if problems:
            raise CorruptShardError(f"{len(problems)} problem(s) in {len(shards)} shards ({args.verify} check, "
                                    f"listed above), the first: {problems[0]}. Re-run tools/preprocess.py with the "
                                    "same flags to rewrite the shards")
        print(f"verified {len(shards)} shards ({args.verify} check): all good")
    if args.decode is not None or args.key:
        shard, key, tokens = read_sample(m, splits[0], args.decode, args.key)
        eod = "<|eod|>"
        text = build_tokenizer(m).decode(tokens, eod_text=eod)
        print(f"--- {shard} {key}: {len(tokens)} tokens, ids {tokens[:8].tolist()}...")
        source = document_of(m, splits[0], key)
        if source and source.get("title"):
            published = f" ({source['published']})" if source.get("published") else ""
            print(f"book {source['doc']}: {source['title']}{published}")
        print(text[:args.chars] + ("..." if len(text) > args.chars else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
