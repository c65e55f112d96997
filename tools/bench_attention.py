#!/usr/bin/env python
"""Forward+backward time and peak memory of the whole LM with routing, local-only and dense attention.

Each point runs in a fresh process (so peaks never mix). Peak memory on CPU is the growth of the process's peak
resident set size (ru_maxrss) over its resident size once the model and inputs are built; on CUDA it is
torch.cuda.max_memory_allocated after a reset at the same point. The machine's fp32 matmul rate is measured too, so
every time can be read against the FLOP limit: ``flop_time`` = (model matmul FLOPs) / (measured rate).

Example: python tools/bench_attention.py --seq-lengths 4096 8192 16384 32768 --attention routing local full
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchlib import matmul_rate, model_flops, rss_bytes


def run_point(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from rtdist.config import ModelConfig
    from rtdist.model import RoutingTransformerLM, lm_loss
    attention_type = "routing" if args.attention in ("routing", "routing-topk") else args.attention.replace("-", "_")
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.depth, n_heads=args.heads,
                      n_local_attn_heads=args.local_heads, window_size=args.window, num_clusters=args.clusters,
                      attention_type=attention_type,
                      routing_mode="topk" if args.attention == "routing-topk" else "causal")
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg)
    dev = torch.device(args.device)
    model.to(dev)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_length + 1), device=dev)

    def step():
        logits, aux = model(x[:, :-1])
        (lm_loss(logits, x[:, 1:]) + aux).backward()
        model.zero_grad(set_to_none=True)
        model.update_kmeans()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    secs = min(times)
    return {"attention": args.attention, "seq_length": args.seq_length, "time_s": secs,
            "tokens_per_s": args.batch * args.seq_length / secs, "peak_mem_mb": peak / 2 ** 20,
            "flops": model_flops(cfg, args.seq_length, args.batch)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--attention", nargs="+", default=["routing", "local", "full"],
                   choices=["routing", "routing-topk", "local", "full", "full-naive"])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--local-heads", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="steps per point; the fastest is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600, help="seconds per point; a series stops at the first miss")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)  # internal: run one point, print JSON
    p.add_argument("--seq-length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:  # the forwarded --attention list was overridden by the single variant given last
        args.attention = args.attention[-1]
        print(json.dumps(run_point(args)))
        return

    import torch
    torch.set_num_threads(args.threads)
    rate = matmul_rate() if args.device == "cpu" else None
    if rate:
        print(f"fp32 matmul rate (4096^2, {args.threads} threads): {rate / 1e9:.1f} GFLOP/s")
    from tqdm import tqdm
    results = []
    todo = [(a, n) for a in args.attention for n in args.seq_lengths]
    stopped = set()
    for attention, n in tqdm(todo, desc="points", unit="pt"):
        if attention in stopped:
            continue
        forwarded = [a for a in sys.argv[1:]]
        cmd = [sys.executable, __file__, *forwarded, "--point", "--attention", attention, "--seq-length", str(n)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"attention": attention, "seq_length": n, "error": f"timeout > {args.timeout}s"})
            stopped.add(attention)
            continue
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            results.append({"attention": attention, "seq_length": n, "error": tail[0]})
            stopped.add(attention)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if rate:
            r["flop_time_s"] = r["flops"] / rate
        results.append(r)

    print(f"\n{'attention':<13}{'seq':>7}{'time s':>9}{'flop s':>8}{'ratio':>7}{'tok/s':>9}{'peak MB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['attention']:<13}{r['seq_length']:>7}  stopped: {r['error']}")
            continue
        ft = r.get("flop_time_s", float("nan"))
        print(f"{r['attention']:<13}{r['seq_length']:>7}{r['time_s']:>9.2f}{ft:>8.2f}{r['time_s'] / ft:>7.2f}"
              f"{r['tokens_per_s']:>9.0f}{r['peak_mem_mb']:>9.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"matmul_flops_per_s": rate, "args": vars(args), "results": results},
                                             indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
