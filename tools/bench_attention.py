#!/usr/bin/env python
"""Forward+backward time and peak memory of the whole LM with routing, local-only and dense attention.

Each point runs in a fresh process (so peaks never mix). Peak memory on CPU is the growth of the process's peak
resident set size (ru_maxrss) over its resident size once the model and inputs are built; on CUDA it is
torch.cuda.max_memory_allocated after a reset at the same point. The machine's fp32 matmul rate is measured too, so
every time can be read against the FLOP limit: ``flop_time`` = (model matmul FLOPs) / (measured rate).

``--peer`` races the public port (``routing-transformer==1.6.1``, never a dependency of rtdist: install it into
the benchmark's environment with ``pip install --no-deps routing-transformer==1.6.1 local-attention==1.4.4
product-key-memory==0.1.10 mixture-of-experts==0.2.1``) on the same model: causal routing, clusters = n / window as
the port defaults, plain GELU feed-forward (rtdist with ``ff_glu: false``) so the parameters match. The two run in
alternating fresh processes, ``--rounds`` times each, and the table shows the fastest step of each side (and the
load average when it ran: time ratios mean something only from one quiet sitting; memory peaks do not move).

``--profile N`` prints where one N-token step of rtdist spends its time (torch.profiler, one warm-up step first).

Examples:
    python tools/bench_attention.py --seq-lengths 4096 8192 16384 32768 --attention routing local full
    python tools/bench_attention.py --peer --seq-lengths 32768 65536 --rounds 3
    python tools/bench_attention.py --profile 16384 --ff-glu false --clusters 64
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

from benchlib import (BATCH, CLUSTERS, COUNT, HEADS, LAYERS, LOCAL_HEADS, SECONDS, SEQ, THREADS, VOCAB, WIDTH, WINDOW,
                      check_model, failed_status, matmul_rate, model_flops, rss_bytes)
from rtdist.config import TRAIN_LIMITS
from rtdist.errors import ArgumentParser, UsageError, bounded, cli_main, torch_device

PEER = "routing-transformer"
PEER_INSTALL = ("pip install --no-deps routing-transformer==1.6.1 local-attention==1.4.4 product-key-memory==0.1.10 "
                "mixture-of-experts==0.2.1")


MODEL_FLAGS = {"model.vocab_size": "--vocab", "model.d_model": "--d-model", "model.n_layers": "--depth",
               "model.n_heads": "--heads", "model.n_local_attn_heads": "--local-heads", "model.window_size": "--window",
               "model.local_window_size": "--window", "model.num_clusters": "--clusters"}


def model_config(args, n: int):
    from rtdist.config import ModelConfig
    attention_type = "routing" if args.attention in ("routing", "routing-topk") else args.attention.replace("-", "_")
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.depth, n_heads=args.heads,
                       n_local_attn_heads=args.local_heads, window_size=args.window,
                       num_clusters=args.clusters or max(1, n // args.window), attention_type=attention_type,
                       routing_mode="topk" if args.attention == "routing-topk" else "causal", ff_glu=args.ff_glu)


def build_step(args, dev):
    """(step function, its model config) of one forward+backward (and k-means update) of rtdist or the port."""
    import torch
    import torch.nn.functional as F
    from rtdist.model import RoutingTransformerLM, lm_loss
    cfg = model_config(args, args.seq_length)
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_length + 1), device=dev)
    if args.impl == "port":
        from routing_transformer import RoutingTransformerLM as Port
        port = Port(num_tokens=args.vocab, dim=args.d_model, depth=args.depth, max_seq_len=args.seq_length,
                    heads=args.heads, dim_head=args.d_model // args.heads, n_local_attn_heads=args.local_heads,
                    window_size=args.window, local_attn_window_size=args.window, causal=True, ff_glu=args.ff_glu,
                    ff_mult=4).to(dev)

        def step():  # the port updates its k-means in a backward hook
            logits, aux = port(x[:, :-1])
            (F.cross_entropy(logits.transpose(1, 2), x[:, 1:]) + aux).backward()
            port.zero_grad(set_to_none=True)
        return step, cfg

    model = RoutingTransformerLM(cfg).to(dev)
    if args.compile:
        from rtdist.parallel.compile import apply_compile
        apply_compile(model)

    def step():
        logits, aux = model(x[:, :-1])
        (lm_loss(logits, x[:, 1:]) + aux).backward()
        model.zero_grad(set_to_none=True)
        model.update_kmeans()
    return step, cfg


def run_point(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    step, cfg = build_step(args, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    secs = min(times)
    extra = {}
    if args.compile:  # graphs compiled over all the steps: one, whatever the routing did
        from torch._dynamo.utils import counters
        extra["compiled_graphs"] = counters["stats"]["unique_graphs"]
    return {**extra, "impl": args.impl, "attention": args.attention, "seq_length": args.seq_length, "time_s": secs,
            "cpu_s": min(cpu), "tokens_per_s": args.batch * args.seq_length / secs, "peak_mem_mb": peak / 2 ** 20,
            "flops": model_flops(cfg, args.seq_length, args.batch), "load": os.getloadavg()[0]}


def profile(args) -> None:
    """One warm-up step, then a profiled one: the ops by self time, and the step against its FLOP time."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.set_num_threads(args.threads)
    args.seq_length = args.profile
    step, cfg = build_step(args, torch.device(args.device))
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step()
        secs = time.perf_counter() - t
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print(f"one {args.profile}-token step ({args.impl}): {secs:.2f} s, load average {os.getloadavg()[0]:.2f}")
    print(f"{'op':<64}{'self s':>9}{'share':>8}{'calls':>7}")
    for e in events[:args.profile_rows]:
        print(f"{e.key[:63]:<64}{e.self_cpu_time_total / 1e6:>9.3f}{e.self_cpu_time_total / total:>8.1%}{e.count:>7}")
    if args.device == "cpu":
        rate = matmul_rate()
        flop_s = model_flops(cfg, args.profile, args.batch) / rate
        print(f"FLOP time {flop_s:.2f} s at {rate / 1e9:.1f} GFLOP/s: this step took {secs / flop_s:.2f}x")


def run_series(args, argv: list[str], todo: list[tuple[str, str, int]]) -> list[dict]:
    """Each (impl, attention, n) in a fresh process (this command's ``argv`` plus the point), in the given order;
    a series stops at its first failure."""
    from tqdm import tqdm
    results, stopped = [], set()
    for impl, attention, n in tqdm(todo, desc="points", unit="pt", disable=not sys.stderr.isatty()):
        if (impl, attention) in stopped:
            continue
        cmd = [sys.executable, __file__, *argv, "--point", "--impl", impl, "--attention", attention,
               "--seq-length", str(n)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"impl": impl, "attention": attention, "seq_length": n, "error": f"timeout > {args.timeout}s"})
            stopped.add((impl, attention))
            continue
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            results.append({"impl": impl, "attention": attention, "seq_length": n, "error": tail[0]})
            stopped.add((impl, attention))
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def peer_table(results: list[dict]) -> str:
    """The race as a markdown table: per n, each side's fastest step (and its peak memory, the largest seen)."""
    best: dict[tuple[str, int], dict] = {}
    for r in results:
        if "error" in r:
            continue
        key = (r["impl"], r["seq_length"])
        b = best.setdefault(key, dict(r))
        if r["time_s"] < b["time_s"]:
            b.update(time_s=r["time_s"], cpu_s=r["cpu_s"], load=r["load"])
        b["peak_mem_mb"] = max(b["peak_mem_mb"], r["peak_mem_mb"])
    lines = ["| n | rtdist routing (causal) | routing-transformer 1.6.1 (PyPI) | rtdist speed-up / memory ratio |",
             "|---|---|---|---|"]
    for n in sorted({n for _, n in best}):
        ours, port = best.get(("rtdist", n)), best.get(("port", n))
        cell = lambda r: f"{r['time_s']:.1f} s, {r['peak_mem_mb']:.0f} MiB (load {r['load']:.1f})" if r else "failed"  # noqa: E731
        ratio = (f"{port['time_s'] / ours['time_s']:.2f}x / {ours['peak_mem_mb'] / port['peak_mem_mb']:.2f}x"
                 if ours and port else "-")
        lines.append(f"| {n} | {cell(ours)} | {cell(port)} | {ratio} |")
    errors = [f"{r['impl']} n={r['seq_length']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(lines + errors)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lengths", type=SEQ, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--attention", nargs="+", default=["routing", "local", "full"],
                   choices=["routing", "routing-topk", "local", "full", "full-naive"])
    p.add_argument("--d-model", type=WIDTH, default=512)
    p.add_argument("--depth", type=LAYERS, default=2)
    p.add_argument("--heads", type=HEADS, default=8)
    p.add_argument("--local-heads", type=LOCAL_HEADS, default=4)
    p.add_argument("--window", type=WINDOW, default=256)
    p.add_argument("--clusters", type=CLUSTERS, default=8, help="routing clusters; 0: n / window (the port's default)")
    p.add_argument("--ff-glu", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="GEGLU feed-forward (true) or plain GELU (false; --peer always uses false)")
    p.add_argument("--vocab", type=VOCAB, default=256)
    p.add_argument("--batch", type=BATCH, default=1)
    p.add_argument("--threads", type=THREADS, default=2)
    p.add_argument("--repeats", type=COUNT, default=2, help="steps per point; the fastest is reported")
    p.add_argument("--device", type=torch_device, default="cpu")
    p.add_argument("--compile", action="store_true", help="rtdist with regional torch.compile (model.compile true)")
    p.add_argument("--peer", action="store_true", help=f"race the public port ({PEER} 1.6.1) on the same model")
    p.add_argument("--rounds", type=COUNT, default=2, help="--peer: alternating fresh-process rounds per length")
    p.add_argument("--profile", type=bounded(int, 0, TRAIN_LIMITS["seq_length"]), default=0, metavar="N", help="profile one N-token step of rtdist")
    p.add_argument("--profile-rows", type=COUNT, default=25)
    p.add_argument("--timeout", type=SECONDS, default=900, help="seconds per point; a series stops at the first miss")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)  # internal: run one point, print JSON
    p.add_argument("--impl", default="rtdist", choices=["rtdist", "port"], help=argparse.SUPPRESS)
    p.add_argument("--seq-length", type=SEQ, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.peer:  # the port's model: clusters n / window, plain GELU feed-forward
        args.clusters, args.ff_glu = 0, False
    lengths = [args.seq_length or 1] if args.point else args.seq_lengths + ([args.profile] if args.profile else [])
    for a in args.attention:  # every point's model, checked before the first one runs
        for n in lengths:
            check_model(model_config(argparse.Namespace(**{**vars(args), "attention": a}), n), [n], MODEL_FLAGS)
    if args.point:  # the forwarded --attention list was overridden by the single variant given last
        args.attention = args.attention[-1]
        print(json.dumps(run_point(args)))
        return
    if args.profile:
        args.attention = args.attention[0]
        profile(args)
        return
    if args.peer:
        try:
            import routing_transformer  # noqa: F401
        except ImportError:
            raise UsageError(f"--peer needs the public port in this environment: {PEER_INSTALL}") from None
        todo = [(impl, "routing", n) for n in args.seq_lengths for _ in range(args.rounds)
                for impl in ("rtdist", "port")]
        results = run_series(args, argv, todo)
        print(peer_table(results))
        rate = None
    else:
        import torch
        torch.set_num_threads(args.threads)
        rate = matmul_rate() if args.device == "cpu" else None
        if rate:
            print(f"fp32 matmul rate (4096^2, {args.threads} threads): {rate / 1e9:.1f} GFLOP/s")
        results = run_series(args, argv, [("rtdist", a, n) for a in args.attention for n in args.seq_lengths])
        print(f"\n{'attention':<13}{'seq':>7}{'time s':>9}{'flop s':>8}{'ratio':>7}{'tok/s':>9}{'peak MB':>9}{'load':>6}")
        for r in results:
            if "error" in r:
                print(f"{r['attention']:<13}{r['seq_length']:>7}  stopped: {r['error']}")
                continue
            if rate:
                r["flop_time_s"] = r["flops"] / rate
            ft = r.get("flop_time_s", float("nan"))
            print(f"{r['attention']:<13}{r['seq_length']:>7}{r['time_s']:>9.2f}{ft:>8.2f}{r['time_s'] / ft:>7.2f}"
                  f"{r['tokens_per_s']:>9.0f}{r['peak_mem_mb']:>9.0f}{r['load']:>6.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"matmul_flops_per_s": rate, "args": vars(args), "results": results},
                                             indent=1))
        print(f"wrote {args.out}")
    return failed_status(results, lambda r: "error" in r,
                         lambda r: f"{r.get('impl', 'rtdist')} {r.get('attention', '')} n={r['seq_length']}: "
                                   f"{r['error']}")


if __name__ == "__main__":
    sys.exit(cli_main(main))
