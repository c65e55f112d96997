#!/usr/bin/env python
"""Training throughput and memory: tokens/s and peak memory per rank of real `rtdist.train` runs at one sequence
length, for each model x ZeRO stage x activation checkpointing x process count.

Each run is the training command users run (torchrun for 2+ processes, DeepSpeed engine, gloo on CPU) for a few
steps on shards of a local corpus; tokens/s is read from metrics.jsonl (the last logged interval, so start-up and
the first step are excluded) and peak memory is the process's peak RSS (ru_maxrss, the whole process: Python,
torch and DeepSpeed included), maximum over ranks as rank 0 reports it.

Example: python tools/bench_train.py --seq-length 8192 --models tiny d512 --zero 0 3 --nproc 1 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from benchlib import SEQ, failed_status
from rtdist.errors import ArgumentParser, UsageError, bounded, cli_main

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny": [],
    "d512": ["model.d_model=512", "model.n_layers=2", "model.n_heads=8", "model.n_local_attn_heads=4",
             "model.window_size=256", "model.num_clusters=8"],
}


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=SEQ, default=8192)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--zero", type=int, nargs="+", default=[0, 3], choices=[0, 1, 2, 3])
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--nproc", type=bounded(int, 1, 1024), nargs="+", default=[1, 2])
    p.add_argument("--steps", type=bounded(int, 2, 10 ** 6), default=4, help="at least 2: the first is not timed")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_train"))
    p.add_argument("--corpus-mb", type=bounded(float, 0, 2 ** 20, above=True), default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    args = p.parse_args(argv)
    from rtdist.config import ConfigError, load_config
    for model in args.models:  # every run's config, checked before the corpus is built
        try:
            load_config(str(ROOT / "configs/tiny.yaml"), MODELS[model] + [f"train.seq_length={args.seq_length}"])
        except ConfigError as e:
            raise UsageError(f"--models {model} with --seq-length {args.seq_length}: "
                             f"{str(e).replace('train.seq_length', '--seq-length')}") from None
    from tqdm import tqdm

    from rtdist.data import build_demo_corpus, preprocess
    work = args.work_dir.resolve()
    manifest = work / "shards" / f"s{args.seq_length}-manifest.json"
    if not manifest.is_file():
        build_demo_corpus(work / "corpus", max_bytes=int(args.corpus_mb * 2 ** 20))
        preprocess([str(work / "corpus")], str(work / "shards" / f"s{args.seq_length}"), seq_length=args.seq_length,
                   progress=False, overwrite=True, log=lambda *a, **k: None)
    results = []
    combos = list(itertools.product(args.models, args.zero, args.checkpointing, args.nproc))
    for model, zero, ckpt, nproc in tqdm(combos, desc="runs"):
        run_dir = work / f"{model}_z{zero}_ck{ckpt}_p{nproc}"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        sets = MODELS[model] + [f"data.manifest={manifest}", f"train.seq_length={args.seq_length}",
                                "train.train_micro_batch_size_per_gpu=1", f"train.train_iters={args.steps}",
                                f"train.log_interval={args.steps - 1}", f"train.zero_stage={zero}",
                                f"train.checkpoint_activations={'true' if ckpt == 'on' else 'false'}",
                                "data.num_workers=0", "train.warmup_iters=1"]
        # --overwrite: a rerun in the same --work-dir measures afresh rather than resuming the finished run
        cmd = launcher + ["-m", "rtdist.train", "--config", str(ROOT / "configs/tiny.yaml"), "--run-dir", str(run_dir),
                          "--overwrite"]
        for s in sets:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        row = {"model": model, "zero": zero, "checkpointing": ckpt, "nproc": nproc}
        if r.returncode:
            row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        else:
            logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            last = [x for x in logged if "tokens_per_s" in x][-1]
            row.update(tokens_per_s=last["tokens_per_s"], max_mem_mb=last["max_mem_mb"])
        results.append(row)
    print(f"\n{'model':<6}{'zero':>5}{'ckpt':>6}{'procs':>6}{'tokens/s':>10}{'peak MB/rank':>14}")
    for r in results:
        tail = (f"{r['tokens_per_s']:>10.0f}{r['max_mem_mb']:>14.0f}" if "error" not in r else f"  failed: {r['error']}")
        print(f"{r['model']:<6}{r['zero']:>5}{r['checkpointing']:>6}{r['nproc']:>6}{tail}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return failed_status(results, lambda r: "error" in r,
                         lambda r: f"{r['model']} zero {r['zero']} ckpt {r['checkpointing']} x{r['nproc']}: {r['error']}")


if __name__ == "__main__":
    sys.exit(cli_main(main))
