#!/usr/bin/env python
"""The main job end to end on CPU, on a small embedded default (what `make demo` runs):

1. gather a real text corpus already on this machine (this Python installation's own sources, PG-19 layout),
2. preprocess it into webdataset tar shards with a manifest (bytes tokenizer),
3. train the tiny Routing Transformer with 2 processes under DeepSpeed ZeRO-2 (torchrun, gloo),
4. evaluate the exported model on the validation split,
and print where the shards, metrics, checkpoint and model are.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--corpus-mb", type=float, default=16)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    args = p.parse_args()
    from rtdist.data import build_demo_corpus, preprocess

    t0 = time.time()
    out = args.out.resolve()
    print(f"[1/4] corpus: local Python sources -> {out / 'corpus'}", flush=True)
    corpus = build_demo_corpus(out / "corpus", max_bytes=int(args.corpus_mb * 2 ** 20))
    print(f"      {corpus['bytes'] / 2 ** 20:.1f} MB in {corpus['files']} files, books per split {corpus['books']}")

    print("[2/4] preprocess to tar shards (bytes tokenizer, 256-token samples)", flush=True)
    summary = preprocess([str(out / "corpus")], str(out / "shards" / "demo"), seq_length=256, workers=2,
                         overwrite=True)
    manifest = summary["manifest_path"]

    print(f"[3/4] train: {args.nproc} processes, DeepSpeed ZeRO-2 on CPU, {args.steps} steps", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)), DS_ACCELERATOR="cpu")
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "rtdist.train", "--config", args.config, "--run-dir", str(run_dir), "--progress",
           "--set", f"data.manifest={manifest}", "--set", f"train.train_iters={args.steps}",
           "--set", "train.engine=deepspeed", "--set", "train.zero_stage=2",
           "--set", "train.eval_interval=100", "--set", "train.eval_iters=8", "--set", "train.save_interval=100"]
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0:
        print(f"training failed (exit {r.returncode}); command: {' '.join(cmd)}", file=sys.stderr)
        return r.returncode

    print("[4/4] evaluate the exported model on the validation split", flush=True)
    ev = subprocess.run([sys.executable, "-m", "rtdist.evaluate", "--checkpoint", str(run_dir), "--split",
                         "validation", "--max-batches", "32"], cwd=ROOT, env=env, capture_output=True, text=True)
    if ev.returncode != 0:
        print(ev.stderr[-4000:], file=sys.stderr)
        return ev.returncode
    metrics = json.loads(ev.stdout[ev.stdout.index("{"):])
    first, last = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()[::args.steps - 1]][:2]
    print(f"\nrtdist demo finished in {time.time() - t0:.0f} s")
    print(f"  train loss  {first:.3f} (step 1) -> {last:.3f} (step {args.steps})")
    print(f"  validation  loss {metrics['loss']:.3f} nats/token, {metrics['bits_per_byte']:.3f} bits/byte, "
          f"perplexity {metrics['perplexity']:.2f} ({metrics['tokens']} tokens)")
    print(f"  shards      {Path(manifest).parent}")
    print(f"  metrics     {run_dir / 'metrics.jsonl'}")
    print(f"  checkpoint  {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text()})")
    print(f"  model       {run_dir / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
