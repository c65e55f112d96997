#!/usr/bin/env python
"""Sequence parallelism on this machine: per-rank peak memory and step time at increasing sequence lengths for
SP = 1, 2, 4, and the bytes each rank sends per routing layer against the theoretical minimum.

Each point is a fresh ``torch.distributed.run`` of SP processes (gloo). Peak memory is per rank: the growth of the
process's peak RSS (ru_maxrss) over its RSS once the model and inputs exist, i.e. activations, gradients and
communication buffers of one forward+backward (no optimizer), maximum over ranks. Bytes sent are counted during
the forward of the routing heads' all-to-alls (q/k/v out, outputs back); the minimum is q, k, v of the tokens a
rank gives away plus the outputs it returns, each sent once.

Example: python tools/bench_sequence_parallel.py --seq-lengths 8192 32768 --sp 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (CLUSTERS, HEADS, LAYERS, LOCAL_HEADS, SECONDS, SEQ, WIDTH, WINDOW, check_model, failed_status,
                      rss_bytes)
from rtdist.errors import ArgumentParser, UsageError, bounded, cli_main

def run_point(args) -> None:
    import torch

    from rtdist import dist as rdist
    from rtdist.model import RoutingTransformerLM, lm_loss
    from rtdist.parallel import ParallelDims
    from rtdist.parallel.sequence import apply_sequence_parallel
    info = rdist.init(timeout_s=1800)
    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg)
    sp = info.world_size
    dims = ParallelDims(sp, sp, info.rank).build_mesh()
    backend = apply_sequence_parallel(model, dims) if sp > 1 else None
    x = torch.randint(0, 256, (1, args.seq_length + 1), generator=torch.Generator().manual_seed(1))
    part, pos = dims.local_slice(x)
    pos = torch.arange(x.shape[1] - 1) if pos is None else pos
    base = rss_bytes()
    rdist.barrier()
    t0 = time.perf_counter()
    logits, aux = model(part[:, :-1], positions=pos)
    sent, minimum = (backend.bytes_sent, backend.bytes_min) if backend else (0, 0)
    (lm_loss(logits, part[:, 1:]) + aux).backward()
    rdist.barrier()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    stats = torch.tensor([peak, secs, sent, minimum], dtype=torch.float64)
    every = [torch.zeros_like(stats) for _ in range(sp)]
    if sp > 1:
        torch.distributed.all_gather(every, stats)
    else:
        every = [stats]
    if info.rank == 0:
        routing_layers = sum(1 for m in model.kmeans_modules())
        e = torch.stack(every)
        print(json.dumps({"seq_length": args.seq_length, "sp": sp, "peak_mb_per_rank": e[:, 0].max().item() / 2 ** 20,
                          "time_s": e[:, 1].max().item(),
                          "bytes_sent_per_layer": e[:, 2].max().item() / max(routing_layers, 1),
                          "bytes_min_per_layer": e[:, 3].max().item() / max(routing_layers, 1)}))
    rdist.shutdown()


MODEL_FLAGS = {"model.d_model": "--d-model", "model.n_layers": "--depth", "model.n_heads": "--heads",
               "model.n_local_attn_heads": "--local-heads", "model.window_size": "--window",
               "model.local_window_size": "--window", "model.num_clusters": "--clusters"}


def model_config(args):
    from rtdist.config import ModelConfig
    return ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.depth, n_heads=args.heads,
                       n_local_attn_heads=args.local_heads, window_size=args.window, num_clusters=args.clusters)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lengths", type=SEQ, nargs="+", default=[8192, 32768])
    p.add_argument("--sp", type=bounded(int, 1, 4096), nargs="+", default=[1, 2])
    p.add_argument("--d-model", type=WIDTH, default=512)
    p.add_argument("--depth", type=LAYERS, default=2)
    p.add_argument("--heads", type=HEADS, default=8)
    p.add_argument("--local-heads", type=LOCAL_HEADS, default=4)
    p.add_argument("--window", type=WINDOW, default=256)
    p.add_argument("--clusters", type=CLUSTERS, default=8)
    p.add_argument("--threads", type=bounded(int, 0, 4096), default=0, help="threads per rank (default: cores / SP)")
    p.add_argument("--timeout", type=SECONDS, default=1200)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq-length", type=SEQ, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths = [args.seq_length or args.window] if args.point else args.seq_lengths
    check_model(model_config(args), lengths, MODEL_FLAGS)
    for n in lengths:
        for sp in [] if args.point else args.sp:  # each rank holds whole windows of its slice
            if n % (sp * args.window):
                raise UsageError(f"--seq-lengths {n} is not divisible by --sp {sp} x --window {args.window}: use "
                                 f"lengths that are multiples of {sp * args.window}")
    if args.point:
        return run_point(args)
    from tqdm import tqdm
    results = []
    for n in tqdm(args.seq_lengths, desc="lengths"):
        for sp in args.sp:
            threads = args.threads or max(1, (os.cpu_count() or 2) // sp)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}", __file__,
                   "--point", "--seq-length", str(n), "--threads", str(threads), "--d-model", str(args.d_model),
                   "--depth", str(args.depth), "--heads", str(args.heads), "--local-heads", str(args.local_heads),
                   "--window", str(args.window), "--clusters", str(args.clusters)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                results.append({"seq_length": n, "sp": sp, "error": f"timeout > {args.timeout}s"})
                continue
            lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
            if r.returncode or not lines:
                results.append({"seq_length": n, "sp": sp, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            results.append(json.loads(lines[-1]))
    print(f"\n{'seq':>7}{'SP':>4}{'peak MB/rank':>14}{'vs SP=1':>9}{'step s':>8}{'sent KB/layer':>15}"
          f"{'min KB/layer':>14}{'ratio':>7}")
    one = {r["seq_length"]: r for r in results if r.get("sp") == 1 and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['seq_length']:>7}{r['sp']:>4}  failed: {r['error']}")
            continue
        rel = r["peak_mb_per_rank"] / one[r["seq_length"]]["peak_mb_per_rank"] if r["seq_length"] in one else float("nan")
        ratio = r["bytes_sent_per_layer"] / r["bytes_min_per_layer"] if r["bytes_min_per_layer"] else float("nan")
        print(f"{r['seq_length']:>7}{r['sp']:>4}{r['peak_mb_per_rank']:>14.0f}{rel:>9.2f}{r['time_s']:>8.2f}"
              f"{r['bytes_sent_per_layer'] / 1024:>15.0f}{r['bytes_min_per_layer'] / 1024:>14.0f}{ratio:>7.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return failed_status(results, lambda r: "error" in r, lambda r: f"n={r['seq_length']} sp={r['sp']}: {r['error']}")


if __name__ == "__main__":
    sys.exit(cli_main(main))
