#!/usr/bin/env python
"""Every CUDA path of rtdist that no CPU test exercises, in under 10 minutes on one GPU:

  train_zero2_bf16     a few bf16 steps of configs/tiny.yaml under DeepSpeed ZeRO-2 (python -m rtdist.train, one
                       process: world size 1, no NCCL), with an evaluation, a checkpoint and the fp32 export
  train_zero3_bf16     the same under ZeRO-3
  two_ranks_sp2        2 ranks through rtdist's launcher (ZeRO-2, sequence parallelism over both, fp32) against
                       1 rank on the same global batch: equal losses (1e-4), over NCCL with 2+ GPUs. On one GPU the
                       ranks share it (started by torchrun itself: rtdist's launcher refuses more ranks than GPUs)
                       and gloo carries the CUDA tensors (NCCL refuses two ranks on one device), as data
                       parallelism under DDP, so rtdist's own collectives still meet device tensors
  activation_offload   train.checkpoint_offload (saved activations in host memory) against the same run without
                       it: equal losses, peak GPU memory of both
  fairscale_fsdp       train.engine: fairscale, which picks FullyShardedDataParallel on CUDA
  sdpa_backend         the attention kernels of rtdist.model (local, causal routing, top-k routing, dense, and the
                       whole model forward + backward) in bf16 inside sdpa_kernel([FLASH_ATTENTION,
                       EFFICIENT_ATTENTION]), so a silent fallback to the math kernel raises; reports which backend
                       each ran and its error against fp32
  cached_generation    rtdist.generate.generate with the cache gives the tokens of use_cache=False (greedy), and
                       step-by-step logits match one full forward
  throughput_8k        tokens/s and model FLOP utilisation of one training step (forward, backward, AdamW; bf16
  throughput_32k       autocast) of the shrunk PG-19 model of tools/bench_attention.py (d512, 2 layers, 8 heads of
                       which 4 local, window 256, 8 clusters) at 8192 and 32768 tokens

Each check runs in a process of its own (a failure or a hang cannot spoil the next; each has a time limit) and
prints one line: name, ok/FAILED (dry/FAILED in the CPU dry run), seconds, figures. A summary table ends the run; the exit status is 0 when every
check passed, else 1.

On a machine without CUDA it says so, checks that the GPU run would work (imports, configs resolve, the training
command lines parse) and runs a small dry pass of each check on the CPU where that is cheap, then exits 0 (1 when a
dry pass fails). `--dry` does the same on a machine with CUDA.

  python tools/gpu_check.py                       # all checks
  python tools/gpu_check.py --only sdpa_backend throughput_8k
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

from rtdist.errors import ArgumentParser, UsageError, cli_main  # noqa: E402

BUDGET_S = 560  # all checks together, under the promised 10 minutes
# Dense bf16 tensor-core peaks (FLOP/s) by device name, for model FLOP utilisation; others are reported against
# the measured matmul rate only.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}


class CheckFailed(Exception):
    """A check ran and found something wrong; the message is its figures line."""


@dataclass
class Check:
    name: str
    run: Callable[[dict], dict]  # context -> figures (a dict of short strings/numbers)
    timeout_s: int


# ------------------------------------------------------------------------------------------------- training


# The CPU dry pass: a shorter sequence, fp32 (bf16 matmuls on a CPU take minutes), 2 steps.
DRY_SETS = ["train.seq_length=64", "model.window_size=16", "train.train_iters=2", "train.eval_interval=2",
            "train.save_interval=2", "train.precision=fp32"]


def train_argv(ctx: dict, name: str, *sets: str, dry: bool = False, resume: bool = False) -> list[str]:
    """Arguments of ``python -m rtdist.train`` for a short run of the tiny config in ``ctx['work']/name`` (``resume``:
    continue the run there from its latest checkpoint)."""
    base = [f"data.manifest={ctx['manifest']}", "data.crop_samples=true", "train.train_iters=6", "train.warmup_iters=2", "train.log_interval=1",
            "train.eval_interval=3", "train.eval_iters=2", "train.save_interval=3", "train.precision=bf16",
            "data.num_workers=0"]
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(Path(ctx["work"]) / name),
            *(["--resume", "auto"] if resume else ["--overwrite"])]  # a check run again in --work starts over
    for s in base + list(sets) + (DRY_SETS if dry else []):
        args += ["--set", s]
    return args


def resolve_gpu_command(ctx: dict, name: str, *sets: str):
    """Parse the command line the GPU run uses and resolve its config (what a dry pass can check of it)."""
    from rtdist.config import load_config
    from rtdist.train import parse_args
    args = parse_args(train_argv(ctx, name, *sets))
    return load_config(args.config, args.set)


def run_training(ctx: dict, name: str, *sets: str, timeout: float = 300, ranks: int = 1, env=None,
                 resume: bool = False, shared_gpu: bool = False) -> dict:
    """Train with the command line users run (its own process, world size 1; or ``ranks`` processes started by
    rtdist's launcher, or by torchrun itself when they share one GPU, which the launcher refuses); returns its
    losses, peak memory, final evaluation and rate, read from the run directory."""
    if ctx["dry"]:
        resolve_gpu_command(ctx, name, *sets)
    argv = train_argv(ctx, name, *sets, dry=ctx["dry"], resume=resume)
    if ranks == 1:
        launch = []
    elif shared_gpu:
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port())]
    else:
        launch = ["-m", "rtdist.launcher", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--", "python"]
    command = " ".join(["python", *launch, "-m", "rtdist.train"] + [shlex.quote(a) for a in argv])
    p = subprocess.run([sys.executable, *launch, "-m", "rtdist.train", *argv], cwd=ROOT,
                       env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    write_log(ctx, name, f"$ {command}\n{p.stdout}{p.stderr}")
    run_dir = Path(ctx["work"]) / name
    if p.returncode != 0 or not (run_dir / "result.json").is_file():
        tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
        raise CheckFailed(f"python -m rtdist.train exited {p.returncode}: {tail} (log {log_path(ctx, name)}; "
                          f"rerun: {command})")
    result = json.loads((run_dir / "result.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines]
    if result["status"] != "completed" or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"status {result['status']}, losses {losses}")
    if not (run_dir / "model.safetensors").is_file():
        raise CheckFailed("no model.safetensors export")
    from rtdist.errors import RtdistError
    from rtdist.export import load_model_for_inference
    try:  # every weight is there under the model's names (an engine that flattens parameters can lose them)
        load_model_for_inference(run_dir)
    except RtdistError as e:
        raise CheckFailed(f"the export does not load: {e}") from None
    return {"losses": losses, "max_mem_mb": max(x.get("max_mem_mb", 0) for x in lines),
            "eval_loss": result.get("eval", {}).get("loss"), "tokens_per_s": lines[-1].get("tokens_per_s")}


def check_training(*sets: str, name: str):
    def run(ctx: dict) -> dict:
        r = run_training(ctx, name, *sets)
        if not ctx["dry"] and not r["losses"][-1] < r["losses"][0]:
            raise CheckFailed(f"the loss did not fall: {r['losses']}")
        return {"loss": f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}", "eval_loss": f"{r['eval_loss']:.3f}",
                "peak_mb": round(r["max_mem_mb"]), "tok/s": r["tokens_per_s"]}
    return run


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_two_ranks(ctx: dict) -> dict:
    import torch
    gpus = 0 if ctx["dry"] else torch.cuda.device_count()
    sets = ["train.precision=fp32"]
    one_gpu = ["train.engine=torch", "train.zero_stage=0"]  # the configs' ZeRO stage is DeepSpeed's, not DDP's
    if gpus == 1:  # NCCL refuses two ranks on one device: gloo carries the CUDA tensors, as data parallelism
        # under DDP (gloo has no CUDA send/recv for the sequence-parallel halo, nor ZeRO's reduce-scatter)
        sets, env, layout = sets + one_gpu, {"RTDIST_DIST_BACKEND": "cpu:gloo,cuda:gloo"}, "dp2 torch"
    else:
        sets, env, layout = sets + ["train.engine=deepspeed", "train.zero_stage=2"], {}, "sp2 zero2"
        if ctx["dry"]:  # the one-GPU variant's command line must resolve too
            resolve_gpu_command(ctx, "one_rank", *sets[:1], *one_gpu)
    one = run_training(ctx, "one_rank", *sets)
    two = run_training(ctx, "two_ranks_sp2", *sets, *(["parallel.sequence_parallel_size=2"] if gpus != 1 else []),
                       ranks=2, env=env, shared_gpu=gpus == 1)
    diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    backend = env.get("RTDIST_DIST_BACKEND", "cpu:gloo,cuda:nccl" if gpus else "gloo")
    figures = {"layout": layout, "backend": backend, "gpus": gpus, "steps": len(two["losses"]),
               "max_loss_diff": f"{diff:.1e}", "loss": f"{two['losses'][0]:.3f}->{two['losses'][-1]:.3f}"}
    if len(one["losses"]) != len(two["losses"]) or diff > 1e-4:
        raise CheckFailed(f"2 ranks differ from 1: {one['losses']} vs {two['losses']}; {figures}")
    return figures


def check_activation_offload(ctx: dict) -> dict:
    long = [] if ctx["dry"] else ["train.seq_length=2048"]  # long enough for activations to matter
    common = ["train.engine=deepspeed", "train.zero_stage=2", "train.checkpoint_activations=true", *long]
    offloaded = run_training(ctx, "offload_on", *common, "train.checkpoint_offload=true")
    if ctx["dry"]:  # on a CPU the flag changes nothing (saved tensors are in host memory already)
        return {"dry": f"offload run completed, losses {[round(x, 3) for x in offloaded['losses']]}"}
    kept = run_training(ctx, "offload_off", *common)
    diff = max(abs(a - b) for a, b in zip(kept["losses"], offloaded["losses"]))
    figures = {"peak_mb": f"{round(kept['max_mem_mb'])}->{round(offloaded['max_mem_mb'])} with offload",
               "max_loss_diff": f"{diff:.2e}"}
    if diff > 1e-2:  # the same arithmetic, only where saved tensors wait differs
        raise CheckFailed(f"losses differ with offload: {kept['losses']} vs {offloaded['losses']}; {figures}")
    return figures


def check_fsdp(ctx: dict) -> dict:
    if ctx["dry"]:  # FullyShardedDataParallel needs CUDA: check that it imports and the config resolves
        from fairscale.nn.data_parallel import FullyShardedDataParallel  # noqa: F401
        cfg = resolve_gpu_command(ctx, "fsdp", "train.engine=fairscale", "train.zero_stage=3")
        return {"dry": f"FullyShardedDataParallel imports; config resolves (engine {cfg.train.engine}, "
                       f"zero {cfg.train.zero_stage})"}
    figures = check_training("train.engine=fairscale", "train.zero_stage=3", name="fsdp")(ctx)
    # Its checkpoint loads: 2 more steps from step 6 (the gathered optimizer state, sharded again)
    more = run_training(ctx, "fsdp", "train.engine=fairscale", "train.zero_stage=3", "train.train_iters=8",
                        resume=True)
    if len(more["losses"]) != 8:
        raise CheckFailed(f"the resumed run logged {len(more['losses'])} steps, not 8: {more['losses']}")
    figures["resumed"] = f"steps 7-8, loss {more['losses'][-1]:.3f}"
    return figures


# ----------------------------------------------------------------------------------------------- attention


def attention_cases(device, dtype, n: int):
    """(name, fn) pairs; each fn() runs one kernel forward on fresh inputs (requires_grad) and returns the output."""
    import torch
    from rtdist.model import causal_routing_attention, full_attention, local_attention, topk_routing_attention
    B, H, d, w, C = 1, 4, 64, 256 if n >= 4096 else 32, 8

    def inputs(layout):
        g = torch.Generator(device="cpu").manual_seed(0)
        shape = (B, n, H, d) if layout == "bnhd" else (B, H, n, d)
        return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]

    def local():
        q, k, v = inputs("bhnd")
        return local_attention(q, k, v, w)

    def routing():
        q, k, v = inputs("bnhd")
        clusters = torch.randint(0, C, (B, n, H), generator=torch.Generator().manual_seed(1)).to(device)
        return causal_routing_attention(q, k, v, clusters, C, w)

    def topk():
        q, k, v = inputs("bhnd")
        sims = torch.randn(B, H, n, C, generator=torch.Generator().manual_seed(2)).to(device)
        return topk_routing_attention(q, k, v, sims, w)

    def dense():
        q, k, v = inputs("bhnd")
        return full_attention(q, k, v)

    return [("local", local), ("routing", routing), ("topk", topk), ("dense", dense)]


def model_case(device, dtype, n: int):
    """The tiny model's training forward + backward (recomputed kernels included) under autocast."""
    import torch
    from rtdist.config import load_config
    from rtdist.model import RoutingTransformerLM
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"train.seq_length={n}"])
    torch.manual_seed(0)
    from rtdist.parallel.checkpointing import apply_activation_checkpointing
    model = RoutingTransformerLM(cfg.model).to(device).train()
    apply_activation_checkpointing(model)
    x = torch.randint(0, cfg.model.vocab_size, (1, n + 1), device=device)

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, aux = model(x[:, :-1], targets=x[:, 1:])  # the training loss: chunked head, no [n, V] logits
        model.discard_kmeans_stats()  # (the recomputation in backward gathers none)
        return loss + aux
    return run


def check_sdpa_backend(ctx: dict) -> dict:
    """Each kernel runs forward and backward with the math kernel switched off (fused only); then with one backend
    at a time, to name the one that ran."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = torch.device(ctx["device"])
    dtype = torch.float32 if ctx["dry"] else torch.bfloat16
    n = 256 if ctx["dry"] else 8192
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    figures, problems = {}, []

    def attempt(backends, fn):
        with sdpa_kernel(backends), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = fn()
                out.float().sum().backward()
                return out, None
            except RuntimeError as e:
                why = [str(c.message).splitlines()[0] for c in caught if "sdp" in str(c.message).lower()
                       or "attention" in str(c.message).lower()]
                return None, (str(e).splitlines()[0] + (f" ({'; '.join(why[:3])})" if why else ""))[:400]

    references = dict(attention_cases(device, torch.float32, n))
    for name, fn in attention_cases(device, dtype, n) + [("model", model_case(device, dtype, min(n, 2048)))]:
        out, err = attempt(fused, fn)
        if err:
            problems.append(f"{name}: no fused kernel: {err}")
            figures[name] = "FAILED"
            continue
        # The one that ran is the first that runs alone (PyTorch tries flash before efficient).
        ran = next((b.name.split("_")[0].lower() for b in fused if attempt([b], fn)[1] is None), "?")
        figures[name] = ran
        if name in references:  # accuracy against fp32 on the math kernel
            with sdpa_kernel([SDPBackend.MATH]):
                err = (out.float() - references[name]().float()).abs().max().item()
            figures[name] += f" (err {err:.1e})"
            if err > (5e-2 if dtype == torch.bfloat16 else 1e-4):
                problems.append(f"{name}: output differs from fp32 math by {err:.3g}")
    if problems:
        raise CheckFailed("; ".join(problems) + f" | {figures}")
    return figures


# ---------------------------------------------------------------------------------------------- generation


def check_cached_generation(ctx: dict) -> dict:
    import torch
    from rtdist.config import ModelConfig
    from rtdist.generate import generate
    from rtdist.model import RoutingTransformerLM, lm_loss
    from rtdist.model.cache import decode_step, new_cache
    device = torch.device(ctx["device"])
    cfg = ModelConfig(vocab_size=257, d_model=128, n_layers=2, n_heads=4, n_local_attn_heads=2, window_size=16,
                      local_window_size=32, num_clusters=4)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few k-means updates: data-shaped centroids, so tokens spread over the clusters
        x = torch.randint(0, cfg.vocab_size, (2, 256), generator=g).to(device)
        logits, aux = model(x)
        (lm_loss(logits[:, :-1], x[:, 1:]) + aux).backward()
        model.update_kmeans()
    model.zero_grad(set_to_none=True)
    model.eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 64), generator=g).to(device)
    new = 32 if ctx["dry"] else 192  # past several local windows and routing blocks
    cached, s1 = generate(model, prompt, new, temperature=0)
    plain, s2 = generate(model, prompt, new, temperature=0, use_cache=False)
    with torch.no_grad():
        seq = torch.cat([prompt, cached], dim=1)
        full = model(seq)[0]
        cache = new_cache(model, seq.shape[0])
        steps = torch.stack([decode_step(model, cache, seq[:, i]) for i in range(seq.shape[1])], dim=1)
    diff = (full - steps).abs().max().item()
    figures = {"tokens_equal": bool(torch.equal(cached, plain)), "new_tokens": cached.shape[1],
               "max_logit_diff": f"{diff:.1e}", "tok/s": f"{s1['tokens_per_s']} cached, {s2['tokens_per_s']} not"}
    if not torch.equal(cached, plain) or diff > 1e-3:
        first = (cached != plain).nonzero()[:1].tolist()
        raise CheckFailed(f"cached and uncached generation differ (first differing [row, token]: {first}); {figures}")
    return figures


# ---------------------------------------------------------------------------------------------- throughput


def shrunk_pg19(vocab_size: int = 256):
    """tools/bench_attention.py's default model: d512, 2 layers, 8 heads of which 4 local, window 256, 8 clusters."""
    from rtdist.config import ModelConfig
    return ModelConfig(vocab_size=vocab_size, d_model=512, n_layers=2, n_heads=8, n_local_attn_heads=4,
                       window_size=256, num_clusters=8)


def matmul_rate_bf16(device) -> float:
    import torch
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def check_throughput(n_gpu: int):
    def run(ctx: dict) -> dict:
        import torch
        from benchlib import model_flops
        from rtdist.model import RoutingTransformerLM
        device = torch.device(ctx["device"])
        n = 256 if ctx["dry"] else n_gpu
        cfg = shrunk_pg19()
        torch.manual_seed(0)
        model = RoutingTransformerLM(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (1, n + 1), device=device)
        cuda = device.type == "cuda"

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, aux = model(x[:, :-1], targets=x[:, 1:])  # as training runs it: chunked head and loss
            (loss + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_kmeans()

        warm, reps = (0, 1) if ctx["dry"] else (3, 10)
        for _ in range(warm):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        if cuda:
            torch.cuda.synchronize()
        secs = (time.perf_counter() - t) / reps
        flops = model_flops(cfg, n, 1)
        figures = {"tokens": n, "tok/s": f"{n / secs:,.0f}", "step_ms": f"{secs * 1e3:.1f}",
                   "model_TFLOP/s": f"{flops / secs / 1e12:.2f}"}
        if cuda:
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name.split() or f" {k}" in name), None)
            measured = matmul_rate_bf16(device)
            figures["MFU"] = (f"{100 * flops / secs / peak:.1f}% of {peak / 1e12:.0f}" if peak else "?") + \
                f" / {100 * flops / secs / measured:.1f}% of measured {measured / 1e12:.0f} TFLOP/s bf16"
            figures["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        return figures
    return run


CHECKS = [
    Check("train_zero2_bf16", check_training("train.engine=deepspeed", "train.zero_stage=2", name="zero2"), 120),
    Check("train_zero3_bf16", check_training("train.engine=deepspeed", "train.zero_stage=3", name="zero3"), 120),
    Check("two_ranks_sp2", check_two_ranks, 150),
    Check("activation_offload", check_activation_offload, 150),
    Check("fairscale_fsdp", check_fsdp, 120),
    Check("sdpa_backend", check_sdpa_backend, 90),
    Check("cached_generation", check_cached_generation, 90),
    Check("throughput_8k", check_throughput(8192), 90),
    Check("throughput_32k", check_throughput(32768), 120),
]
BY_NAME = {c.name: c for c in CHECKS}


# ------------------------------------------------------------------------------------------------- running


def make_data(work: Path) -> str:
    """A 1 MB local corpus in 2048-token byte shards (the training checks cut shorter samples from them)."""
    from rtdist.data import build_demo_corpus, preprocess
    build_demo_corpus(work / "corpus", max_bytes=1 << 20, book_bytes=64 << 10)
    return preprocess([str(work / "corpus")], str(work / "shards" / "check"), seq_length=2048, overwrite=True,
                      progress=False, log=lambda *a, **k: None)["manifest_path"]


def run_one(check: Check, ctx: dict) -> dict:
    """Run a check in this process: {"status": "ok"|"dry"|"FAILED", "seconds", "figures"}; "dry" is a pass of the
    CPU dry run, which measures nothing on a GPU."""
    t = time.perf_counter()
    try:
        figures, status = check.run(ctx), "dry" if ctx["dry"] else "ok"
    except CheckFailed as e:
        figures, status = {"error": str(e)}, "FAILED"
    except Exception as e:  # noqa: BLE001 - a check that crashes has failed; its line says how
        figures, status = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}, "FAILED"
    return {"name": check.name, "status": status, "seconds": round(time.perf_counter() - t, 1), "figures": figures}


def run_child(check: Check, ctx: dict, timeout: float) -> dict:
    """Run a check in a process of its own (CUDA state, ZeRO-3 hooks and hangs stay there)."""
    cmd = [sys.executable, __file__, "--child", check.name, "--work", ctx["work"], "--manifest", ctx["manifest"]]
    t = time.perf_counter()
    env = dict(os.environ)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        write_log(ctx, check.name, "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                                           for x in (e.stdout or "", e.stderr or "")))
        return {"name": check.name, "status": "FAILED", "seconds": round(time.perf_counter() - t, 1),
                "figures": {"error": f"timed out after {timeout:.0f} s (log: {log_path(ctx, check.name)})"}}
    write_log(ctx, check.name, p.stdout + p.stderr)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]
    return {"name": check.name, "status": "FAILED", "seconds": round(time.perf_counter() - t, 1),
            "figures": {"error": f"exit {p.returncode}: {tail} (log: {log_path(ctx, check.name)})"}}


def log_path(ctx: dict, name: str) -> Path:
    return Path(ctx["work"]) / f"{name}.log"


def write_log(ctx: dict, name: str, text: str) -> None:
    log_path(ctx, name).write_text(text)


def figures_text(figures: dict) -> str:
    return ", ".join(f"{k} {v}" if k not in ("error", "dry") else str(v) for k, v in figures.items())


def line(r: dict) -> str:
    return f"{r['name']:<20} {r['status']:<7} {r['seconds']:6.1f} s  {figures_text(r['figures'])}"


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"run these checks only: {', '.join(BY_NAME)}")
    p.add_argument("--dry", action="store_true", help="the CPU dry pass, even where CUDA is available")
    p.add_argument("--work", type=Path, default=None, help="folder for data, runs and logs (default: a temporary "
                                                           "one, kept when a check fails)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    p.add_argument("--child", default=None, choices=list(BY_NAME),
                   help=argparse.SUPPRESS)  # internal: run one check, print RESULT json
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [n for n in args.only or [] if n not in BY_NAME]
    if unknown:
        raise UsageError(f"--only {' '.join(unknown)}: no such check; the checks are {', '.join(BY_NAME)}")

    import torch
    if args.child:
        ctx = {"work": str(args.work), "manifest": args.manifest, "dry": False, "device": "cuda"}
        print("RESULT " + json.dumps(run_one(BY_NAME[args.child], ctx)), flush=True)
        return 0

    cuda = torch.cuda.is_available() and not args.dry
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if cuda:
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
              flush=True)
    else:
        why = "--dry" if torch.cuda.is_available() else "no CUDA device here"
        print(f"{why}: checking that the GPU checks would run (imports, configs, command lines) with a small dry "
              f"pass of each on the CPU; no GPU figures", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="rtdist-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"work": str(work), "manifest": make_data(work), "dry": not cuda, "device": "cuda" if cuda else "cpu"}
    checks = [BY_NAME[n] for n in args.only] if args.only else CHECKS
    results = []
    t_start = time.perf_counter()
    for check in checks:
        if cuda:
            left = BUDGET_S - (time.perf_counter() - t_start)
            if left < 20:
                r = {"name": check.name, "status": "FAILED", "seconds": 0.0,
                     "figures": {"error": f"not run: the {BUDGET_S} s budget is spent"}}
            else:
                r = run_child(check, ctx, min(check.timeout_s, left))
        else:
            with contextlib.redirect_stdout(sys.stderr):  # the dry passes' own chatter goes to stderr
                r = run_one(check, ctx)
        results.append(r)
        print(line(r), flush=True)

    failed = [r for r in results if r["status"] == "FAILED"]
    total = time.perf_counter() - t_start
    print(f"\n{'check':<20} {'status':<7} {'seconds':>8}  figures")
    for r in results:
        print(line(r))
    mode = "GPU" if cuda else "dry (CPU)"
    keep = failed or args.work is not None  # a temporary folder goes once everything passed
    passed = f"{len(results) - len(failed)} ok" if cuda else \
        f"{len(results) - len(failed)} dry passes (nothing measured on a GPU)"
    print(f"{mode}: {passed}, {len(failed)} failed in {total:.0f} s; "
          + (f"runs and logs in {work}" if keep else "temporary work folder removed"))
    if args.json:
        args.json.write_text(json.dumps({"mode": mode, "results": results, "seconds": round(total, 1)}, indent=1))
    if not keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
