#!/usr/bin/env python
"""Tokens/s of cached generation vs re-running the whole model for every token, at a long context.

Model (defaults): d_model 512, 2 layers, 8 heads (4 local, 4 routing), routing window 256, local window 256,
8 clusters, vocab 256; random weights after one k-means update on random tokens (data-shaped centroids).

* cached: one prefill forward over ``--context`` tokens (timed separately), then ``--new-tokens`` decode steps
  (greedy; the context grows from C to C + new-tokens). tokens/s = new tokens / decode time.
* re-run: the model's forward over the whole prefix for each new token (what generation costs without caches).
  Each forward costs about the same at this context, so it is measured on ``--rerun-tokens`` tokens only and the
  rate is extrapolated (tokens/s = 1 / mean seconds per forward); the output says so.
The cached logits of those re-run tokens are checked against the re-run's (max abs diff, fp32).

Example: python tools/bench_generate.py --context 8192 --new-tokens 128 --rerun-tokens 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchlib import COUNT, HEADS, LAYERS, LOCAL_HEADS, SEQ, THREADS, VOCAB, WIDTH, WINDOW, check_model
from rtdist.config import MODEL_LIMITS, TRAIN_LIMITS, ModelConfig
from rtdist.errors import ArgumentParser, UsageError, bounded, cli_main, torch_device


MODEL_FLAGS = {"model.vocab_size": "--vocab", "model.d_model": "--d-model", "model.n_layers": "--n-layers",
               "model.n_heads": "--n-heads", "model.n_local_attn_heads": "--n-local-heads",
               "model.window_size": "--window", "model.local_window_size": "--window", "model.num_clusters": "--clusters"}


def model_config(args):
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_local_attn_heads=args.n_local_heads, window_size=args.window, num_clusters=args.clusters)


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=SEQ, default=8192)
    p.add_argument("--new-tokens", type=bounded(int, 2, TRAIN_LIMITS["seq_length"]), default=128,
                   help="decode steps + 1 (at least 2: one step to time)")
    p.add_argument("--rerun-tokens", type=COUNT, default=3, help="at most --new-tokens")
    p.add_argument("--d-model", type=WIDTH, default=512)
    p.add_argument("--n-layers", type=LAYERS, default=2)
    p.add_argument("--n-heads", type=HEADS, default=8)
    p.add_argument("--n-local-heads", type=LOCAL_HEADS, default=4)
    p.add_argument("--window", type=WINDOW, default=256)
    p.add_argument("--clusters", type=bounded(int, 1, MODEL_LIMITS["num_clusters"]), default=8)
    p.add_argument("--vocab", type=VOCAB, default=256)
    p.add_argument("--threads", type=THREADS, default=2)
    p.add_argument("--device", type=torch_device, default="cpu")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 64 - 1), default=0)
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    args = p.parse_args(argv)
    if args.rerun_tokens > args.new_tokens:  # each re-run forward is compared with a cached token's logits
        raise UsageError(f"--rerun-tokens {args.rerun_tokens} exceeds --new-tokens {args.new_tokens}: re-run at most "
                         f"as many tokens as are decoded")
    check_model(model_config(args), [], MODEL_FLAGS)

    import torch
    from tqdm import tqdm

    from rtdist.model import RoutingTransformerLM, lm_loss
    from rtdist.model.cache import decode_step, prefill

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = args.device
    cfg = model_config(args)
    model = RoutingTransformerLM(cfg).to(dev)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, cfg.vocab_size, (1, 1024), generator=g).to(dev)  # one k-means update: data-shaped centroids
    logits, aux = model(x)
    (lm_loss(logits[:, :-1], x[:, 1:]) + aux).backward()
    model.update_kmeans()
    model.zero_grad(set_to_none=True)
    model.eval()

    total = args.context + args.new_tokens
    seq = torch.randint(0, cfg.vocab_size, (1, total), generator=g).to(dev)  # teacher-forced tokens
    with torch.no_grad():
        model(seq[:, :256])  # warm-up
        sync(dev)
        t = time.perf_counter()
        logits, cache = prefill(model, seq[:, : args.context])
        sync(dev)
        prefill_s = time.perf_counter() - t
        cached_logits = [logits[:, -1]]
        t = time.perf_counter()
        for i in tqdm(range(args.context, total - 1), desc="decode", unit="tok", leave=False, disable=None):
            cached_logits.append(decode_step(model, cache, seq[:, i]))
        sync(dev)
        decode_s = time.perf_counter() - t
        steps = total - 1 - args.context

        rerun_times, diffs = [], []
        # re-run at contexts C, C+1, ...: logits for the same positions
        for j in tqdm(range(args.rerun_tokens), desc="re-run", unit="fwd", leave=False, disable=None):
            n = args.context + j
            t = time.perf_counter()
            out, _ = model(seq[:, :n])
            sync(dev)
            rerun_times.append(time.perf_counter() - t)
            diffs.append((out[:, -1] - cached_logits[j]).abs().max().item())

    rerun_s = sum(rerun_times) / len(rerun_times)
    result = {
        "device": dev, "threads": args.threads, "context": args.context,
        "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "local_heads": cfg.n_local_attn_heads, "window": cfg.window_size, "clusters": cfg.num_clusters,
                  "vocab": cfg.vocab_size},
        "prefill_s": round(prefill_s, 3),
        "cached": {"tokens": steps, "seconds": round(decode_s, 3), "tokens_per_s": round(steps / decode_s, 1),
                   "cache_mib": round(cache.nbytes() / 2 ** 20, 2)},
        "rerun": {"measured_tokens": args.rerun_tokens, "seconds_per_token": round(rerun_s, 3),
                  "tokens_per_s": round(1 / rerun_s, 3),
                  "note": f"extrapolated from {args.rerun_tokens} full forwards at context ~{args.context}"},
        "speedup": round(rerun_s / (decode_s / steps), 1),
        "max_abs_logit_diff_cached_vs_rerun": max(diffs),
    }
    print(json.dumps(result, indent=1))
    print(f"cached decoding {result['cached']['tokens_per_s']} tokens/s vs re-running "
          f"{result['rerun']['tokens_per_s']} tokens/s at context {args.context}: {result['speedup']}x; cached and "
          f"re-run logits differ by at most "
          f"{result['max_abs_logit_diff_cached_vs_rerun']:.2e}")
    return result


if __name__ == "__main__":
    sys.exit(cli_main(main))
