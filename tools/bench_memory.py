#!/usr/bin/env python
"""Peak memory and time of one training step at increasing sequence lengths, measured against an analytic estimate.

Every point is one forward + backward + ``torch.optim.AdamW`` step (its first, so the optimizer states are created
inside the measured step) of ``RoutingTransformerLM`` on ``--batch`` x n random tokens, in a fresh process, so
peaks never mix. Before the measured step a short warm-up forward/backward (2 windows long, gradients freed, no
optimizer step) loads the kernels.

What "peak" means:
* CPU: growth of the process's peak resident set size (Linux VmHWM, reset with /proc/self/clear_refs just before
  the step) over its resident size once the model, optimizer and tokens exist ("model-ready baseline"). glibc's
  mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so large freed tensors go back to the kernel instead of
  staying resident; the setting is recorded with the results.
* CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` at the same point (after a peak reset).
Both exclude the parameters and buffers (they are in the baseline) and include gradients, AdamW states, saved
activations and every temporary. ``saved_mb`` is what the forward left alive for backward (storages its ops created,
counted by ``benchlib.kept_bytes`` from outside autograd: no saved-tensor hooks, which would change the path).

The estimate (``estimate`` in tools/benchlib.py; ``--estimate`` prints it before running) counts per rank: fp32
parameters 4 B, gradients 4 B, AdamW m and v 8 B per parameter, divided by the world size per ZeRO stage (1:
optimizer states, 2: + gradients, 3: + parameters); saved activations per token per layer derived from the
model's ops (checked against what a forward leaves alive, tests/test_bench_memory.py); the attention working set
(n x n tensors of full-naive only; flash and block kernels keep per-block scratch); the largest backward transient
over the layers (feed-forward or recomputed-attention gradients, one recomputed chunk under a policy with chunks,
or logits). ``est_mb`` is the same growth the measurement sees:
estimated peak minus parameters and buffers.

A series (attention x checkpointing x sp) stops at its first point that runs out of memory, exceeds
``--max-mem-gb`` (skipped beforehand when the estimate says so, killed when the processes' resident memory
crosses it), or runs past ``--timeout``; the stop is recorded with its length and reason.

``--sp N`` > 1 runs a point under ``torch.distributed.run --nproc_per_node N``: each rank holds n/N tokens
(``rtdist.parallel``: ``ParallelDims``, ``apply_sequence_parallel``); peak and time are
the largest over the ranks, the estimate is per rank. For attention that sequence parallelism does not support
(dense), or a torch built without ``torch.distributed``, the point is recorded as skipped.

Writes ``bench_memory.json``, ``bench_memory.csv`` and ``bench_memory.png`` (log-log memory and time per step, one
line per variant, fitted exponent in the legend, estimate dotted) under ``--out-dir``, and prints a table.

Examples:
  python tools/bench_memory.py --quick --out-dir /tmp/bm                     # 2 tiny points, seconds
  python tools/bench_memory.py --estimate-only --world-size 8 --full-size    # the PG-19 model's memory model
  python tools/bench_memory.py --attention routing,local,full,full-naive --checkpointing none,full \\
      --seq-lengths 4096,8192,16384,32768,65536 --max-seq full=32768,full-naive=16384 --out-dir runs/bench_memory
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchlib import (BATCH, HEADS, LAYERS, LOCAL_HEADS, MB, SECONDS, SEQ, THREADS, VOCAB, WIDTH, WINDOW,
                      buffer_bytes, check_model, count_params, estimate, failed_status, fit_exponent, kept_bytes,
                      model_state_bytes, peak_rss_bytes, process_tree, reset_peak_rss, rss_bytes, tree_rss_bytes,
                      write_csv)
from rtdist.config import MODEL_LIMITS, TRAIN_LIMITS
from rtdist.errors import ArgumentParser, bounded, cli_main

GIB = bounded(float, 0, 2 ** 20, above=True)  # memory budgets

ROOT = Path(__file__).resolve().parents[1]

RESULT_TAG = "BENCH_MEMORY_POINT "
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # >= 1 MiB allocations are mmapped and returned on free
ATTENTION = {"routing": "routing", "local": "local", "full": "full", "full-naive": "full_naive"}
# The PG-19 preset shrunk to fit a workstation (routing in every layer, so "routing" means routing throughout).
SHRUNK = dict(d_model=512, n_layers=2, n_heads=8, head_dim=None, n_local_attn_heads=6, window_size=512,
              local_window_size=256, num_clusters=16, vocab_size=256, ff_mult=4.0, routing_layers=None)
QUICK = dict(d_model=64, n_layers=1, n_heads=4, head_dim=None, n_local_attn_heads=2, window_size=32,
             local_window_size=32, num_clusters=4, vocab_size=64, ff_mult=2.0, routing_layers=None)
FLAG_KEYS = {"d_model": "d_model", "depth": "n_layers", "heads": "n_heads", "head_dim": "head_dim",
             "local_heads": "n_local_attn_heads", "window": "window_size", "local_window": "local_window_size",
             "clusters": "num_clusters", "vocab": "vocab_size", "ff_mult": "ff_mult"}


# ---------------------------------------------------------------------------------------------- config


def model_config(args, attention: str):
    """ModelConfig of a point: the YAML's model section, shrunk unless --full-size, then explicit flags."""
    import dataclasses
    from rtdist.config import ModelConfig, load_config
    base = load_config(args.config, validate_config=False).model if args.config else ModelConfig()
    kw = dataclasses.asdict(base)
    if args.quick:
        kw.update(QUICK)
    elif not args.full_size:
        kw.update(SHRUNK)
    for flag, key in FLAG_KEYS.items():
        v = getattr(args, flag)
        if v is not None:
            kw[key] = v
    if args.routing_layers is not None:
        kw["routing_layers"] = None if args.routing_layers == "all" else [int(i) for i in args.routing_layers.split(",")]
    if args.recompute_attention is not None:
        kw["recompute_attention"] = args.recompute_attention == "on"
    kw["attention_type"] = ATTENTION[attention]
    kw["dropout"] = kw["attn_dropout"] = 0.0
    return ModelConfig(**kw)


def check_length(cfg, n: int, sp: int) -> str | None:
    from rtdist.config import ConfigError, validate_model
    try:
        validate_model(cfg, n)
    except ConfigError as e:
        return str(e)
    w = max(cfg.window_size, cfg.local_window_size or cfg.window_size)
    if sp > 1 and n % (sp * w):
        return f"seq length {n} is not divisible by sp x window ({sp} x {w})"
    return None


def sp_available() -> bool:
    """Sequence parallelism needs process groups: torch can be built without ``torch.distributed``."""
    import torch.distributed
    return torch.distributed.is_available()


# ------------------------------------------------------------------------------------------- one point


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return "out of memory" in msg or "not enough memory" in msg or "can't allocate memory" in msg \
        or isinstance(e, MemoryError)


def run_point(args) -> dict:
    """One measured step in this process (a rank of a torchrun group when sp > 1)."""
    import gc
    import torch
    from rtdist.model import RoutingTransformerLM
    n, sp = args.seq_length, args.sp
    threads = max(1, args.threads // sp)  # --threads is for the whole point: sp ranks share the machine's cores
    torch.set_num_threads(threads)
    cfg = model_config(args, args.attention)
    rank, reduce_fn, dims = 0, None, None
    if sp > 1:  # the sweep launches sp > 1 (under torch.distributed.run) only where sp_available()
        import torch.distributed as dist

        from rtdist.parallel import ParallelDims
        from rtdist.parallel.sequence import apply_sequence_parallel
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank = dist.get_rank()
        dims = ParallelDims(sp, sp, rank).build_mesh(args.device)
        reduce_fn = lambda t: dist.all_reduce(t)  # noqa: E731 - k-means statistics over every rank
    dev = torch.device(args.device if args.device != "cuda" or sp == 1 else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg).to(dev)
    model.train()
    if sp > 1:
        try:
            apply_sequence_parallel(model, dims)
        except ValueError as e:  # e.g. dense attention: every rank raises alike, so none waits on a collective
            return {"status": "skipped", "reason": str(e)}
    if args.checkpointing != "none":
        from rtdist.parallel.checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(model, 1, args.checkpointing, args.chunk_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def shard(batch):
        """This rank's (tokens [B, n/sp + 1], positions or None)."""
        return dims.local_slice(batch) if sp > 1 else (batch, None)

    def forward(batch):
        inp, pos = shard(batch)
        loss, aux = model(inp[:, :-1], positions=pos, targets=inp[:, 1:])  # the training loss entry
        return loss + aux

    tokens = torch.randint(0, cfg.vocab_size, (args.batch, n + 1), generator=torch.Generator().manual_seed(1)).to(dev)
    # Warm-up: kernels and thread pools, no optimizer state, gradients freed.
    w = max(cfg.window_size, cfg.local_window_size or cfg.window_size) * 2 * sp
    loss = forward(torch.randint(0, cfg.vocab_size, (1, w + 1), device=dev))
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    model.discard_kmeans_stats()
    gc.collect()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "cuda max_memory_allocated - memory_allocated at model-ready"
    else:
        base = rss_bytes()
        method = ("peak RSS (VmHWM, reset via clear_refs) - RSS at model-ready" if reset_peak_rss()
                  else "peak RSS since process start (ru_maxrss; no reset available) - RSS at model-ready")
    try:
        t0 = time.perf_counter()
        loss, saved = kept_bytes(lambda: forward(tokens), dev.type)
        loss.backward()
        if sp > 1:  # the gradient sum over the sequence shards, as training does
            for prm in model.parameters():
                if prm.grad is not None:
                    torch.distributed.all_reduce(prm.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_kmeans(reduce_fn=reduce_fn)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - an OOM ends the series; anything else is reported as an error
        if _is_oom(e):
            return {"status": "oom", "reason": f"out of memory: {str(e).splitlines()[0][:200]}"}
        raise
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        extra = {"reserved_mb": torch.cuda.max_memory_reserved() / MB}
    else:
        peak = peak_rss_bytes() - base
        extra = {}
    return {"status": "ok", "rank": rank, "threads_per_rank": threads, "time_s": secs, "tokens_per_s": args.batch * n / secs,
            "peak_mb": peak / MB, "baseline_mb": (base if dev.type == "cuda" else rss_bytes()) / MB,
            "saved_mb": saved / MB, "peak_method": method, **extra}


def point_main(args) -> None:
    try:
        r = run_point(args)
    except Exception as e:  # noqa: BLE001
        r = {"status": "oom" if _is_oom(e) else "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    rank = int(os.environ.get("RANK", 0))
    if args.result_dir:  # one file per rank: ranks share stdout, where lines can interleave
        tmp = Path(args.result_dir) / f".rank{rank}.json"
        tmp.write_text(json.dumps(r))
        tmp.rename(Path(args.result_dir) / f"rank{rank}.json")
    else:
        print(RESULT_TAG + json.dumps(r), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (and any process-group shutdown waits)


# --------------------------------------------------------------------------------------------- the sweep


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the point's process and every descendant (torchrun's workers live in sessions of their own, so the
    launcher's process group is not enough)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def launch_point(args, attention: str, ckpt: str, sp: int, n: int, max_mem_bytes: float) -> dict:
    """Run one point in fresh process(es), watching its resident memory and wall time."""
    forwarded = [a for a in args.forward_argv]
    point_args = ["--point", "--attention", attention, "--checkpointing", ckpt, "--sp", str(sp),
                  "--seq-length", str(n)]
    if sp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(sp),
               str(Path(__file__).resolve()), *forwarded, *point_args]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, *point_args]
    result_dir = tempfile.mkdtemp(prefix="bench_memory_")
    cmd += ["--result-dir", result_dir]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(max(1, args.threads // sp))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=str(ROOT))
    observed, reason, out, err = 0, None, "", ""
    try:
        while True:
            try:
                o, e = proc.communicate(timeout=0.05)
                out, err = out + (o or ""), err + (e or "")
                break
            except subprocess.TimeoutExpired:
                pass
            observed = max(observed, tree_rss_bytes(proc.pid))
            if observed > max_mem_bytes:
                reason = ("max-mem", f"resident memory {observed / 2**30:.2f} GiB > --max-mem-gb {args.max_mem_gb}")
            elif time.perf_counter() - t0 > args.timeout:
                reason = ("timeout", f"no result within --timeout {args.timeout:g} s")
            if reason:
                _kill(proc)
                o, e = proc.communicate()
                out, err = out + (o or ""), err + (e or "")
                break
    finally:  # interrupted (Ctrl-C, SIGTERM): leave no point processes behind
        if proc.poll() is None:
            _kill(proc)
            proc.wait()
    wall = time.perf_counter() - t0
    base = {"observed_rss_mb": observed / MB, "process_wall_s": wall}
    if reason:
        shutil.rmtree(result_dir, ignore_errors=True)
        return {**base, "status": reason[0], "reason": reason[1]}
    ranks = []
    for f in sorted(Path(result_dir).glob("rank*.json")):
        try:
            ranks.append(json.loads(f.read_text()))
        except ValueError:
            pass
    shutil.rmtree(result_dir, ignore_errors=True)
    if not ranks:
        if proc.returncode in (-signal.SIGKILL, 137):
            return {**base, "status": "oom", "reason": "killed (SIGKILL): likely the kernel's out-of-memory killer"}
        tail = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {**base, "status": "error", "reason": tail[:300]}
    bad = [r for r in ranks if r.get("status") != "ok"]
    if bad:
        return {**base, "status": bad[0]["status"], "reason": bad[0].get("reason", "")}
    r = dict(ranks[0])
    if len(ranks) > 1:  # per-rank peak: the largest; time: the slowest rank
        r["peak_mb"] = max(x["peak_mb"] for x in ranks)
        r["peak_mb_sum"] = sum(x["peak_mb"] for x in ranks)
        r["time_s"] = max(x["time_s"] for x in ranks)
        r["tokens_per_s"] = args.batch * n / r["time_s"]
    r.pop("rank", None)
    return {**base, **r}


def parse_list(s: str, cast=str) -> list:
    return [cast(x) for x in str(s).replace(" ", ",").split(",") if x]


def parse_length(x: str) -> int:
    x = x.strip().lower()
    return int(float(x[:-1]) * 1024) if x.endswith("k") else int(x)


def flag_lengths(p, flag: str, items: list[str], low: int = 1, what: str = "lengths, e.g. 4096 or 4k") -> list[int]:
    """``items`` of ``flag`` as lengths in [low, the longest sequence config validation allows], else a usage error
    naming the flag and the item."""
    out = []
    for x in items:
        try:
            n = parse_length(x)
        except ValueError:
            p.error(f"{flag}: {x!r} is not a number ({what})")
        if not low <= n <= TRAIN_LIMITS["seq_length"]:
            p.error(f"{flag}: {x!r} must be in [{low}, {TRAIN_LIMITS['seq_length']:,}] ({what})")
        out.append(n)
    return out


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def variant_name(attention: str, ckpt: str, sp: int) -> str:
    return f"{attention} ckpt={ckpt} sp={sp}"


def print_estimate(args, cfgs: dict, lengths: list[int]) -> None:
    print(f"\nMemory model, world size {args.world_size} (per rank, MiB):")
    for attention, cfg in cfgs.items():
        P = count_params(cfg)
        print(f"  {attention}: {P / 1e6:.2f} M parameters, k-means/rotary buffers {buffer_bytes(cfg) / MB:.2f}")
        print(f"    {'ZeRO':>6}{'params':>10}{'grads':>10}{'Adam m,v':>10}{'total':>10}")
        for z in range(4):
            s = model_state_bytes(P, args.world_size, z)
            print(f"    {z:>6}{s['params'] / MB:>10.1f}{s['grads'] / MB:>10.1f}{s['optim'] / MB:>10.1f}"
                  f"{sum(s.values()) / MB:>10.1f}")
    print(f"\n  activations (ZeRO {args.zero_stage}, batch {args.batch}); saved KB/token/layer without checkpointing:")
    print(f"    {'variant':<28}{'KB/tok/l':>9}" + "".join(f"{fmt_len(n):>10}" for n in lengths) + "   (peak MiB)")
    for attention, ckpt, sp in itertools.product(args.attention, args.checkpointing, args.sp):
        cfg = cfgs[attention]
        def est(n):
            return estimate(cfg, n, args.batch, ckpt, args.world_size, args.zero_stage, sp, args.chunk_size)
        e0 = est(lengths[0])
        row = "".join(f"{est(n).peak / MB:>10.0f}" for n in lengths)
        last = est(lengths[-1])
        print(f"    {variant_name(attention, ckpt, sp):<28}{e0.act_per_token_layer / 1024:>9.1f}{row}"
              f"   (peak at {fmt_len(lengths[-1])}: {last.phase})")


def sweep(args) -> dict:
    from tqdm import tqdm
    cfgs = {a: model_config(args, a) for a in args.attention}
    lengths = sorted(set(args.seq_lengths))
    if args.estimate or args.estimate_only:
        print_estimate(args, cfgs, lengths)
    meta = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "threads": args.threads, "device": args.device,
            "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "allocator_env": MALLOC_ENV, "max_mem_gb": args.max_mem_gb, "timeout_s": args.timeout,
            "batch": args.batch, "step": "forward + backward + AdamW step (its first)",
            "model": {a: {k: v for k, v in vars(c).items()} for a, c in cfgs.items()}}
    try:
        import torch
        meta["torch"] = torch.__version__
        if args.device == "cuda" and torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if args.estimate_only:
        return {"meta": meta, "results": [], "fits": {}}
    max_mem = args.max_mem_gb * 2 ** 30
    series = list(itertools.product(args.attention, args.checkpointing, args.sp))
    todo = [(a, c, s, n) for a, c, s in series for n in lengths if n <= args.max_seq.get(a, math.inf)]
    results, stopped, overhead = [], {}, {}
    saved = PartialResults(Path(args.out_dir), meta)  # every point on disk as it is measured
    bar = tqdm(todo, desc="points", unit="pt", disable=args.no_progress)
    for attention, ckpt, sp, n in bar:
        key = (attention, ckpt, sp)
        cfg = cfgs[attention]
        est = estimate(cfg, n, args.batch, ckpt, 1, 0, sp, args.chunk_size)
        row = {"variant": variant_name(*key), "attention": attention, "checkpointing": ckpt, "sp": sp,
               "seq_length": n, "est_mb": est.growth / MB, "est_kb_per_token": est.bytes_per_token / 1024,
               "est_peak_mb": est.peak / MB,
               "est_saved_mb": est.activations / MB, "est_working_mb": est.working / MB,
               "est_states_mb": (est.params + est.grads + est.optim) / MB, "n_params": est.n_params}
        if key in stopped:
            continue
        bar.set_postfix_str(f"{row['variant']} n={fmt_len(n)}")
        bad = check_length(cfg, n, sp)
        if bad:
            results.append({**row, "status": "invalid", "reason": bad})
            continue
        if sp > 1 and not sp_available():
            results.append({**row, "status": "skipped", "reason": "sequence parallelism not available"})
            continue
        # Everything on this host: sp ranks, each its runtime + model (last measured, else a guess) + the growth.
        per_proc = overhead.get(key, 400 * MB + est.params + est.buffers)
        predicted = sp * (per_proc + est.growth)
        if predicted > max_mem:
            results.append({**row, "status": "max-mem", "reason": f"estimated {predicted / 2**30:.2f} GiB > "
                                                                    f"--max-mem-gb {args.max_mem_gb} (not started)"})
            stopped[key] = n
            continue
        r = launch_point(args, attention, ckpt, sp, n, max_mem)
        r = {**row, **r}
        if r["status"] == "ok":
            r["est_ratio"] = r["est_mb"] / r["peak_mb"] if r["peak_mb"] > 0 else None
            r["kb_per_token"] = r["peak_mb"] * 1024 / (args.batch * n / sp)
            overhead[key] = r["baseline_mb"] * MB
        else:  # an unsupported variant (skipped) is unsupported at every length too
            stopped[key] = n
        results.append(r)
        saved.write(results)
    budget = within_budget(args, cfgs, results, max_mem, saved) if args.budget_gb else []
    meta["load_after"] = os.getloadavg()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["peak_method"] = next((r["peak_method"] for r in results if "peak_method" in r), None)
    return {"meta": meta, "results": results, "fits": fits(results, args.fit_min), "budget": budget}


class PartialResults:
    """``bench_memory.json`` and ``.csv`` rewritten (atomically) after every measured point, marked partial until
    the sweep ends: a sweep stopped at its 90k-token points keeps every point it measured."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta

    def write(self, results: list[dict], budget: Optional[list] = None) -> None:
        from rtdist.fileio import atomic_write_text
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"meta": {**self.meta, "partial": True}, "results": results, "budget": budget or []}
        atomic_write_text(self.out / "bench_memory.json", json.dumps(data, indent=1, default=str))
        write_csv(self.out / "bench_memory.csv", results)


def within_budget(args, cfgs: dict, results: list[dict], max_mem: float,
                  saved: Optional[PartialResults] = None) -> list[dict]:
    """For each variant, the longest sequence whose per-rank memory (model-ready baseline + the step's peak growth)
    fits ``--budget-gb``: estimated (the memory model, on lengths that are multiples of sp x window), then
    measured: a point at the estimated length, and, while it does not fit, points 10% shorter (at most 3 more).
    Lengths the sweep already measured within the budget count as measured too."""
    budget = args.budget_gb * 2 ** 30
    out = []
    for attention, ckpt, sp in itertools.product(args.attention, args.checkpointing, args.sp):
        cfg, name = cfgs[attention], variant_name(attention, ckpt, sp)
        ok = [r for r in results if r["variant"] == name and r["status"] == "ok"]
        base = ok[-1]["baseline_mb"] * MB if ok else 400 * MB + count_params(cfg) * 4 + buffer_bytes(cfg)
        step = sp * max(cfg.window_size, cfg.local_window_size or cfg.window_size)

        def fits_estimate(n: int) -> bool:
            return base + estimate(cfg, n, args.batch, ckpt, 1, 0, sp, args.chunk_size).growth <= budget

        lo, hi = 0, step  # lo fits (0: nothing does), hi does not, in multiples of step
        while fits_estimate(hi) and hi < 2 ** 26:
            lo, hi = hi, 2 * hi
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step
            lo, hi = (mid, hi) if fits_estimate(mid) else (lo, mid)
        row = {"variant": name, "budget_gb": args.budget_gb, "est_longest": lo, "tried": []}
        print(f"budget {args.budget_gb:g} GiB, {name}: the estimate allows {fmt_len(lo)} tokens; measuring", flush=True)
        fitting = [r["seq_length"] for r in ok if r["baseline_mb"] + r["peak_mb"] <= budget / MB]
        n = lo
        for _ in range(4):
            if n <= max(fitting, default=0) or n < step:
                break
            t0 = time.perf_counter()
            r = launch_point(args, attention, ckpt, sp, n, max(max_mem, sp * budget * 1.25))
            total = r["baseline_mb"] + r["peak_mb"] if r.get("status") == "ok" else None
            row["tried"].append({"seq_length": n, "status": r.get("status"), "total_mb": total,
                                 "time_s": r.get("time_s"), "reason": r.get("reason")})
            print(f"  {fmt_len(n)} tokens: {r.get('status')}"
                  + (f", {total:,.0f} MB total" if total is not None else f" ({r.get('reason', '')})")
                  + f" in {time.perf_counter() - t0:.0f} s", flush=True)
            if saved is not None:
                saved.write(results, out + [row])
            if total is not None and total <= budget / MB:
                fitting.append(n)
                break
            n = int(n * 0.9) // step * step
        row["measured_longest"] = max(fitting, default=None)
        out.append(row)
    return out


def _series(results) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault(r["variant"], []).append(r)
    return out


def fits(results, fit_min: int) -> dict:
    """Fitted exponents of peak memory and time per step against n, over the ok points with n >= fit_min (all ok
    points when fewer than two are that long); plus where each series stopped."""
    out = {}
    for name, rows in _series(results).items():
        ok = [r for r in rows if r["status"] == "ok"]
        use = [r for r in ok if r["seq_length"] >= fit_min]
        use = use if len(use) >= 2 else ok
        stop = next((r for r in rows if r["status"] not in ("ok",)), None)
        out[name] = {"mem_exponent": fit_exponent([r["seq_length"] for r in use], [r["peak_mb"] for r in use]),
                     "time_exponent": fit_exponent([r["seq_length"] for r in use], [r["time_s"] for r in use]),
                     "fit_range": [use[0]["seq_length"], use[-1]["seq_length"]] if use else None,
                     "longest_ok": ok[-1]["seq_length"] if ok else None,
                     "stopped_at": stop["seq_length"] if stop else None,
                     "stop_reason": f"{stop['status']}: {stop.get('reason', '')}" if stop else None}
    return out


def targets(data: dict) -> list[dict]:
    """The issue's acceptance targets, evaluated on whatever the sweep measured (missing data: not evaluated)."""
    res, fit = data["results"], data["fits"]
    ser = _series(res)
    ok = {k: {r["seq_length"]: r for r in v if r["status"] == "ok"} for k, v in ser.items()}
    out = []
    for name, pts in ok.items():
        att, ckpt, sp = name.split(" ")[0], name.split("ckpt=")[1].split()[0], name.split("sp=")[1]
        f = fit[name]
        if att == "routing":
            sel = {n: r for n, r in pts.items() if 8192 <= n <= 65536}
            e = fit_exponent(list(sel), [r["time_s"] for r in sel.values()])
            if e is not None:
                out.append({"target": f"{name}: time exponent 8k-64k <= 1.1", "value": round(e, 3), "met": e <= 1.1})
            dense = ok.get(variant_name("full", ckpt, sp), {})
            if 32768 in dense and pts:
                t32 = dense[32768]["time_s"]
                ns = sorted(pts)
                within = [n for n in ns if pts[n]["time_s"] <= t32]
                reach, how = (max(within), "measured") if within else (0, "none")
                te = f["time_exponent"]
                if within and reach < ns[-1]:  # between two measured lengths: interpolate on the log-log line
                    n0 = reach
                    n1 = ns[ns.index(n0) + 1]
                    t0, t1 = pts[n0]["time_s"], pts[n1]["time_s"]
                    if t1 > t0:
                        reach = n0 * (t32 / t0) ** (math.log(n1 / n0) / math.log(t1 / t0))
                        how = f"interpolated between {fmt_len(n0)} and {fmt_len(n1)}"
                elif within and te:  # even the longest routing point is faster: extrapolate along the fit
                    reach = reach * (t32 / pts[reach]["time_s"]) ** (1 / te)
                    how = f"extrapolated with n^{te:.2f} from {fmt_len(ns[-1])}"
                out.append({"target": f"{name}: length reached within one full step at 32k ({t32:.1f} s) >= 4 x 32k",
                            "value": f"{reach / 32768:.1f} x 32k ({how})", "met": reach >= 4 * 32768})
            if dense:
                common = sorted(set(pts) & set(dense))
                worse = [n for n in common if pts[n]["peak_mb"] > dense[n]["peak_mb"]]
                if common:
                    out.append({"target": f"{name}: peak memory <= full's at every common length "
                                          f"({fmt_len(common[0])}-{fmt_len(common[-1])})",
                                "value": "above at " + ",".join(map(fmt_len, worse)) if worse else "never above",
                                "met": not worse})
        if att in ("routing", "local") and f["mem_exponent"] is not None:
            out.append({"target": f"{name}: memory exponent <= 1.1 (fit {fmt_len(f['fit_range'][0])}-"
                                  f"{fmt_len(f['fit_range'][1])})", "value": round(f["mem_exponent"], 3),
                        "met": f["mem_exponent"] <= 1.1})
    errs = [(r["variant"], r["seq_length"], r["est_mb"] / r["peak_mb"] - 1) for r in res
            if r["status"] == "ok" and r["peak_mb"] > 0]
    if errs:
        worst = max(errs, key=lambda x: abs(x[2]))
        out.append({"target": "estimate within 15% of measured peak at every point",
                    "value": f"worst {worst[2]:+.1%} ({worst[0]} n={fmt_len(worst[1])}); "
                             f"{sum(abs(e[2]) <= 0.15 for e in errs)}/{len(errs)} within",
                    "met": all(abs(e[2]) <= 0.15 for e in errs)})
    return out


def print_table(data: dict) -> None:
    print(f"\n{'variant':<31}{'seq':>6}{'time s':>9}{'tok/s':>9}{'peak MB':>10}{'KB/tok':>8}{'est MB':>9}"
          f"{'est/meas':>9}{'saved MB':>10}{'est saved':>10}")
    for r in data["results"]:
        head = f"{r['variant']:<31}{fmt_len(r['seq_length']):>6}"
        if r["status"] != "ok":
            print(f"{head}   {r['status']}: {r.get('reason', '')}  (est {r['est_mb']:.0f} MB)")
            continue
        print(f"{head}{r['time_s']:>9.2f}{r['tokens_per_s']:>9.0f}{r['peak_mb']:>10.0f}"
              f"{r.get('kb_per_token', float('nan')):>8.1f}{r['est_mb']:>9.0f}{r['est_mb'] / r['peak_mb']:>9.2f}"
              f"{r['saved_mb']:>10.0f}{r['est_saved_mb']:>10.0f}")
    if data.get("budget"):
        gb = data["budget"][0]["budget_gb"]
        print(f"\nlongest sequence within {gb:g} GiB per rank (model-ready baseline + peak growth), in tokens:")
        print(f"{'variant':<31}{'estimated':>10}{'measured':>10}")
        for b in data["budget"]:
            meas = fmt_len(b["measured_longest"]) if b["measured_longest"] else "-"
            print(f"{b['variant']:<31}{fmt_len(b['est_longest']):>10}{meas:>10}")
        print(f"\npoints tried for the budget:\n{'variant':<31}{'tokens':>8}{'total MB':>10}  status")
        for b in data["budget"]:
            for t in b["tried"]:
                mb = f"{t['total_mb']:.0f}" if t["total_mb"] is not None else "-"
                print(f"{b['variant']:<31}{fmt_len(t['seq_length']):>8}{mb:>10}  {t['status']}")
    if data["fits"]:
        print(f"\n{'variant':<26}{'mem exp':>8}{'time exp':>9}  fit range   stopped")
        for name, f in data["fits"].items():
            me = f"{f['mem_exponent']:.2f}" if f["mem_exponent"] is not None else "-"
            te = f"{f['time_exponent']:.2f}" if f["time_exponent"] is not None else "-"
            rng = "-".join(map(fmt_len, f["fit_range"])) if f["fit_range"] else "-"
            print(f"{name:<26}{me:>8}{te:>9}  {rng:<11} {f['stop_reason'] or '-'}"
                  + (f" at {fmt_len(f['stopped_at'])}" if f["stopped_at"] else ""))
    if data.get("targets"):
        print("\ntargets:")
        for t in data["targets"]:
            print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']}")


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker
    fit_min = data["meta"].get("args", {}).get("fit_min") or 0
    colors = {"routing": "tab:blue", "local": "tab:green", "full": "tab:orange", "full-naive": "tab:red"}
    styles = {"none": "-", "selective": "-.", "full": "--"}
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    fig, (axm, axt) = plt.subplots(1, 2, figsize=(15, 8))
    ticks = sorted({r["seq_length"] for r in data["results"]})
    for name, rows in _series(data["results"]).items():
        r0 = rows[0]
        ok = [r for r in rows if r["status"] == "ok"]
        f = data["fits"].get(name, {})
        stop = f" (stop {fmt_len(f['stopped_at'])}: {f['stop_reason'].split(':')[0]})" if f.get("stopped_at") else ""
        style = dict(color=colors.get(r0["attention"], "k"), ls=styles.get(r0["checkpointing"], ":"),
                     marker=markers.get(r0["sp"], "x"))
        if not ok:
            axm.plot([], [], label=f"{name}: no point ran{stop}", **style)
            continue
        xs = [r["seq_length"] for r in ok]
        me, te = f.get("mem_exponent"), f.get("time_exponent")
        rng = f" ({fmt_len(f['fit_range'][0])}-{fmt_len(f['fit_range'][1])})" if f.get("fit_range") else ""
        axm.plot(xs, [r["peak_mb"] for r in ok], label=f"{name}: n^{me:.2f}{rng}{stop}" if me is not None
                 else f"{name}{stop}", **style)
        axm.plot(xs, [r["est_mb"] for r in ok], color=style["color"], ls=":", lw=1, alpha=0.8)
        axt.plot(xs, [r["time_s"] for r in ok], label=f"{name}: n^{te:.2f}{rng}" if te is not None else name, **style)
    axm.plot([], [], color="gray", ls=":", lw=1, label="dotted: analytic estimate")
    meta = data["meta"]
    what = ("CUDA max_memory_allocated" if meta.get("device") == "cuda"
            else "peak RSS growth over model-ready baseline")
    axm.set_title(f"Peak memory of one training step ({what})", fontsize=10)
    axm.set_ylabel("MiB")
    axt.set_title("Time per step (forward + backward + AdamW)", fontsize=10)
    axt.set_ylabel("seconds")
    any_ok = any(r["status"] == "ok" for r in data["results"])
    for ax in (axm, axt):
        ax.set_xlabel("sequence length (tokens)")
        if any_ok:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [fmt_len(t) for t in ticks])
            ax.xaxis.set_minor_locator(mticker.NullLocator())
            ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        else:
            ax.text(0.5, 0.5, "no point ran (see the table)", ha="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, title_fontsize=8,
                      title=f"n^k: log-log least squares over n >= {fmt_len(fit_min)} (all points if < 2)")
    m = next(iter(meta["model"].values()), {})
    fig.suptitle(f"{meta.get('gpu') or meta['host']} ({meta['threads']} threads), torch {meta.get('torch', '?')}; "
                 f"model d={m.get('d_model')} L={m.get('n_layers')} H={m.get('n_heads')} "
                 f"(local {m.get('n_local_attn_heads')}), window {m.get('window_size')}/"
                 f"{m.get('local_window_size')}, {m.get('num_clusters')} clusters, vocab {m.get('vocab_size')}, "
                 f"batch {meta['batch']}; load average {meta['load_before'][0]:.1f} before, "
                 f"{meta['load_after'][0]:.1f} after", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lengths", help="comma list; 'k' = 1024 (default 4k,8k,16k,32k,64k; --quick: 256,512)")
    p.add_argument("--attention", help=f"comma list of {list(ATTENTION)} (default all; --quick: routing)")
    p.add_argument("--checkpointing", help="comma list of policies none, selective, full (every layer); default none,full "
                   "(--quick: none)")
    p.add_argument("--chunk-size", type=bounded(int, 0, TRAIN_LIMITS["seq_length"]), default=4096,
                   help="tokens per recomputed position-wise chunk under selective/full (0: not chunked)")
    p.add_argument("--sp", default="1", help="comma list of sequence-parallel degrees")
    p.add_argument("--max-seq", default="full=32k,full-naive=16k",
                   help="per-attention longest length, e.g. full=32k,full-naive=16k ('' for none)")
    p.add_argument("--config", default=str(ROOT / "configs" / "pg19.yaml"), help="YAML whose model section is used")
    p.add_argument("--full-size", action="store_true", help="use the config's model as is (default: shrunk)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, lengths 256,512, routing only, no checkpointing: a pipeline check in seconds")
    g = p.add_argument_group("model overrides (on top of the shrunk preset)")
    g.add_argument("--d-model", type=WIDTH)
    g.add_argument("--depth", type=LAYERS)
    g.add_argument("--heads", type=HEADS)
    g.add_argument("--head-dim", type=bounded(int, 1, MODEL_LIMITS["head_dim"]))
    g.add_argument("--local-heads", type=LOCAL_HEADS)
    g.add_argument("--window", type=WINDOW)
    g.add_argument("--local-window", type=WINDOW)
    g.add_argument("--clusters", type=bounded(int, 1, MODEL_LIMITS["num_clusters"]))
    g.add_argument("--vocab", type=VOCAB)
    g.add_argument("--ff-mult", type=bounded(float, 0, 1024, above=True))
    g.add_argument("--routing-layers", help="'all' or comma list of layer indices with routing heads")
    g.add_argument("--recompute-attention", choices=["on", "off"])
    p.add_argument("--batch", type=BATCH, default=1)
    p.add_argument("--threads", type=THREADS, default=2, help="per point, split over its sp ranks")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--budget-gb", type=GIB,
                   help="after the sweep: the longest length each variant fits in this many GiB per rank, estimated "
                        "and measured (points at and below the estimate)")
    p.add_argument("--max-mem-gb", type=GIB, default=16.0,
                   help="per point: estimated or observed memory above this stops the series")
    p.add_argument("--timeout", type=SECONDS, default=600.0, help="seconds per point (process start included)")
    p.add_argument("--estimate", action="store_true", help="print the analytic memory model before running")
    p.add_argument("--estimate-only", action="store_true", help="print the memory model and exit")
    p.add_argument("--world-size", type=bounded(int, 1, 2 ** 20), default=1, help="for --estimate: ranks sharing ZeRO states")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="for --estimate's activation table")
    p.add_argument("--fit-min", help="fit exponents over points at least this long (default 8k; --quick: 0)")
    p.add_argument("--out-dir", default="runs/bench_memory")
    p.add_argument("--replot", metavar="JSON", help="redo the table, targets, CSV and plot of a saved run; run nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq-length", type=SEQ, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    return p


# Flags a point process needs (the model and how to run it); the sweep's own flags are not forwarded.
_FORWARD = ["config", "full_size", "quick", *FLAG_KEYS, "routing_layers", "recompute_attention", "chunk_size", "batch",
            "threads", "device"]


def main(argv=None) -> dict | None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.point:
        args.sp = int(args.sp)
        point_main(args)
        return None
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        data["fits"] = fits(data["results"], data["meta"].get("args", {}).get("fit_min", 0))
        data["targets"] = targets(data)
        return write_outputs(data, Path(args.out_dir))
    defaults = ({"seq_lengths": "256,512", "attention": "routing", "checkpointing": "none", "fit_min": "0"}
                if args.quick else
                {"seq_lengths": "4k,8k,16k,32k,64k", "attention": ",".join(ATTENTION), "checkpointing": "none,full",
                 "fit_min": "8k"})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seq_lengths = flag_lengths(p, "--seq-lengths", parse_list(args.seq_lengths))
    if args.routing_layers not in (None, "all"):
        try:
            [int(i) for i in args.routing_layers.split(",")]
        except ValueError:
            p.error(f"--routing-layers {args.routing_layers!r}: expected 'all' or layer indices, e.g. 0,-1")
    args.attention = parse_list(args.attention)
    for a in args.attention:
        if a not in ATTENTION:
            p.error(f"--attention {a!r} is not one of {list(ATTENTION)}")
        check_model(model_config(args, a), [], {"model.routing_layers": "--routing-layers",
                                                **{f"model.{key}": f"--{flag.replace('_', '-')}"
                                                   for flag, key in FLAG_KEYS.items()}})
    args.checkpointing = parse_list(args.checkpointing)
    for c in args.checkpointing:
        if c not in ("none", "selective", "full"):
            p.error(f"--checkpointing {c!r} is not none, selective or full")
    args.sp = flag_lengths(p, "--sp", parse_list(args.sp), what="sequence-parallel degrees, e.g. 1,2")
    pairs = [x.split("=") for x in parse_list(args.max_seq)]
    if any(len(kv) != 2 or kv[0] not in ATTENTION for kv in pairs):
        p.error(f"--max-seq {args.max_seq!r}: expected attention=length pairs, e.g. full=32k,full-naive=16k")
    args.max_seq = {k: flag_lengths(p, "--max-seq", [v])[0] for k, v in pairs}
    args.fit_min = flag_lengths(p, "--fit-min", [args.fit_min], low=0)[0]
    args.forward_argv = []
    for k in _FORWARD:
        v = getattr(args, k)
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        args.forward_argv += [flag] if v is True else [flag, str(v)]
    data = sweep(args)
    data["meta"]["args"] = {k: v for k, v in vars(args).items() if k != "forward_argv"}
    data["targets"] = targets(data)
    if args.estimate_only:
        return data
    return write_outputs(data, Path(args.out_dir))


def write_outputs(data: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    print_table(data)
    (out / "bench_memory.json").write_text(json.dumps(data, indent=1, default=str))
    write_csv(out / "bench_memory.csv", data["results"])
    plot(data, out / "bench_memory.png")
    print(f"\nwrote {out / 'bench_memory.json'}, .csv, .png  (load before {data['meta']['load_before']}, "
          f"after {data['meta']['load_after']})")
    return data


def exit_status(data) -> int:
    """Out of memory, over --max-mem and skipped points are measurements; an error or an invalid point is not."""
    if not isinstance(data, dict) or "results" not in data:
        return 0 if data is None or isinstance(data, dict) else data
    return failed_status(data["results"], lambda r: r.get("status") in ("error", "invalid"),
                         lambda r: f"{r.get('variant')} n={r.get('seq_length')}: {r.get('status')} {r.get('reason', '')}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup of the point in flight
    sys.exit(cli_main(lambda argv: exit_status(main(argv))))
