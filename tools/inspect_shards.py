#!/usr/bin/env python
"""Validate shards against their manifest and decode samples back to text.

  python tools/inspect_shards.py out/pg19                     # check every shard (sha256, tar, members, tokens)
  python tools/inspect_shards.py out/pg19 --split test --decode 0 --chars 2000
  python tools/inspect_shards.py out/pg19-manifest.json --key 10002_000003 --no-verify
"""

import argparse
import sys

from rtdist.data import DataError, build_tokenizer, load_manifest, verify_shards
from rtdist.data.shards import read_sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="{prefix}-manifest.json or the prefix")
    p.add_argument("--split", nargs="+", help="splits to check / decode from (default: all; decode: first)")
    p.add_argument("--decode", type=int, metavar="N", help="decode sample N of the split (shard order)")
    p.add_argument("--key", help="decode the sample with this key ({book}_{chunk:06d})")
    p.add_argument("--chars", type=int, default=1000, help="print at most this many characters (1000)")
    p.add_argument("--no-verify", action="store_true", help="skip the full check")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        m = load_manifest(args.manifest)
        splits = args.split or list(m["splits"])
        tok = m["tokenizer"]
        print(f"{m['manifest_path']}: seq_length {m['seq_length']} (samples of {m['sample_tokens']} {m['dtype']}), "
              f"tokenizer {tok['type']} vocab {tok['vocab_size']} eod {tok['eod_id']}")
        for s in splits:
            info = m["splits"].get(s)
            if info is None:
                raise DataError(f"split {s!r} not in the manifest (it has {list(m['splits'])})")
            print(f"  {s:<12} {len(info['shards']):>6} shards {info['samples']:>10,} samples "
                  f"{info['tokens']:>14,} tokens  {info['documents']:,} documents, "
                  f"{info['dropped_tokens']:,} tokens dropped")
        for c, w in m.get("warnings", {}).items():
            print(f"  warning {c}: {w['count']} (e.g. {w['examples'][0]})")
        status = 0
        if not args.no_verify:
            from tqdm import tqdm

            total = sum(sh["bytes"] for s in splits for sh in m["splits"][s]["shards"])
            with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=args.no_progress) as bar:
                problems = verify_shards(m, splits, bar)
            for line in problems:
                print(f"PROBLEM {line}")
            nshards = sum(len(m["splits"][s]["shards"]) for s in splits)
            print(f"verified {nshards} shards: " + (f"{len(problems)} problems" if problems else "all good"))
            status = 1 if problems else 0
        if args.decode is not None or args.key:
            shard, key, tokens = read_sample(m, splits[0], args.decode, args.key)
            eod = "<|eod|>"
            text = build_tokenizer(m).decode(tokens, eod_text=eod)
            print(f"--- {shard} {key}: {len(tokens)} tokens, ids {tokens[:8].tolist()}...")
            print(text[:args.chars] + ("..." if len(text) > args.chars else ""))
        return status
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
