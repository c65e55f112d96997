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


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rerun-tokens", type=int, default=3)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-local-heads", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from rtdist.config import ModelConfig
    from rtdist.model import RoutingTransformerLM, lm_loss
    from rtdist.model.cache import decode_step, prefill

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = args.device
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_local_attn_heads=args.n_local_heads, window_size=args.window, num_clusters=args.clusters)
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
    main(sys.argv[1:])
