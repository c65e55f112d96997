#!/usr/bin/env python
"""Benchmark the data path on a local corpus: preprocessing MB/s (bytes tokenizer, 1 and N workers), the pre-flight
shard check (``check_shards`` quick and full, MB/s of shards) and the loader's tokens/s into
[micro_batch, seq_length + 1] batches, against the tokens/s one training step consumes.

  python tools/bench_data.py                       # 256 MB corpus from this Python installation's sources
  python tools/bench_data.py --corpus data/pg19 --workers 1 2 4 --json bench.json

Targets (issue): preprocessing >= 50 MB/s per worker; loader >= 100x the tokens/s training consumes.

With ``--url`` it measures streaming instead: shards at a URL (a manifest at s3://, gs://, http(s)://, pipe:) read by
``ShardLoader``: samples/s over an epoch, the time to the first batch from a cold start and after a mid-epoch resume,
the bytes fetched for each, and whether the resumed order equals the uninterrupted one:

  python tools/bench_data.py --url http://127.0.0.1:8080/bench-manifest.json --micro-batch 8
  python tools/bench_data.py --url http://127.0.0.1:8080/bench-manifest.json --cache-dir /tmp/c --cache-mb 200

``--cache-dir`` reads through the node cache (data.cache_dir, ``--cache-mb`` its limit): the cold epoch starts
empty, a warm epoch follows, and the cache's peak size on disk is sampled every 10 ms.
  python tools/bench_data.py --url s3://bucket/pg19 --storage-option endpoint_url=http://127.0.0.1:9000

``--peers`` (S3 only) also streams the same samples through MosaicML ``streaming`` and ``litdata``
(tools/stream_peers.py, run with ``--peer-python``, a Python that has them): each converted from ``--convert-from``
(the local copy of the manifest) into its own format, uploaded beside the shards, read with the same cache budget
(``--cache-mb``), every measurement in a fresh process, the systems alternating, the best of ``--repeat`` kept.
With ``--cache-dir`` an ``rtdist+cache`` row is added (rtdist through its node cache, the same budget).

  python tools/bench_data.py --url s3://bucket/pg/bench-manifest.json --storage-option endpoint_url=http://... \
      --peers --peer-python /tmp/peers/bin/python --convert-from shards/bench-manifest.json
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from benchlib import BATCH, COUNT, SEQ
from rtdist.config import DATA_LIMITS
from rtdist.data import build_demo_corpus, check_shards, load_manifest, preprocess
from rtdist.errors import ArgumentParser, UsageError, bounded, cli_main


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child (Linux reports KiB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def bench_loader(manifest, seq_length, micro_batch, workers, max_batches):
    from tqdm import tqdm

    from rtdist.data import ShardLoader

    loader = ShardLoader(manifest, "train", micro_batch, 0, 1, num_workers=workers, seed=0)
    n = min(len(loader), max_batches) if max_batches else len(loader)
    t0 = time.time()
    first = None
    with tqdm(total=n, desc="loader", unit="batch", leave=False, disable=None) as bar:  # a bar on a terminal only
        for i, batch in enumerate(loader):
            if first is None:
                first = time.time() - t0
            bar.update(1)
            if i + 1 == n:
                break
    seconds = time.time() - t0
    return {"batches": n, "tokens_per_s": n * micro_batch * seq_length / seconds, "seconds": seconds,
            "first_batch_s": first, "workers": workers, "micro_batch": micro_batch}


class CacheWatch:
    """The peak size of a cache folder (``cache.cache_usage``, a consistent snapshot) sampled every 10 ms."""

    def __init__(self, folder):
        import threading
        self.folder, self.peak, self._done = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        from rtdist.data.cache import cache_usage
        while not self._done.is_set():
            if Path(self.folder).is_dir():
                self.peak = max(self.peak, cache_usage(self.folder))
            time.sleep(0.01)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def bench_stream(url, options, micro_batch, workers, shuffle_buffer, resume_fraction, max_batches) -> dict:
    """Streaming from ``url``: a cold epoch (samples/s, first batch), then a fresh loader resumed at
    ``resume_fraction`` of the epoch (first batch, bytes fetched before it, order against the cold epoch's). With a
    cache folder in ``options``: the cold epoch starts from an empty cache, a second (warm) epoch follows in the same
    process, the resume starts from an empty cache again, and the cache's peak size is sampled throughout."""
    import shutil

    from tqdm import tqdm

    from rtdist.data import ShardLoader

    def fresh_cache():
        if options.cache_dir:
            from rtdist.data.cache import _CACHES
            for cache in _CACHES.values():  # downloads of this process (workers=0) end before the folder goes
                cache.wait_downloads()
            shutil.rmtree(options.cache_dir, ignore_errors=True)
            Path(options.cache_dir, "locks").mkdir(parents=True)
    fresh_cache()
    watch = CacheWatch(options.cache_dir) if options.cache_dir else None

    def epoch(loader, n, desc):
        t0 = time.perf_counter()
        keys, first, first_bytes = [], None, 0
        with tqdm(total=n, desc=desc, unit="batch", leave=False, disable=None) as bar:
            for i, (_, batch_keys) in enumerate(loader):
                if first is None:
                    first, first_bytes = time.perf_counter() - t0, loader.stats["fetched_bytes"]
                keys.append(batch_keys)
                bar.update(1)
                if i + 1 == n:
                    break
        return keys, first, first_bytes, time.perf_counter() - t0

    t0 = time.perf_counter()
    loader = ShardLoader(url, "train", micro_batch, 0, 1, num_workers=workers, seed=0, with_keys=True,
                         shuffle_buffer=shuffle_buffer, remote=options)
    n = min(len(loader), max_batches) if max_batches else len(loader)
    keys, first, first_bytes, seconds = epoch(loader, n, "stream")
    seconds = time.perf_counter() - t0
    cold = {"batches": n, "samples_per_s": n * micro_batch / seconds, "seconds": seconds, "first_batch_s": first,
            "first_batch_bytes": first_bytes, "epoch_bytes": loader.stats["fetched_bytes"],
            "requests": loader.stats["requests"]}
    out = {"cold": cold, "workers": workers, "micro_batch": micro_batch}
    if options.cache_dir:  # the next epoch: shards from the node's disk where the cold epoch's downloads finished
        warm_loader = ShardLoader(url, "train", micro_batch, 0, 1, num_workers=workers, seed=0, with_keys=True,
                                  shuffle_buffer=shuffle_buffer, remote=options)
        warm_loader.set_epoch(1)
        _, _, _, seconds = epoch(warm_loader, n, "warm")
        out["warm"] = {"samples_per_s": n * micro_batch / seconds, "seconds": seconds,
                       "epoch_bytes": warm_loader.stats["fetched_bytes"]}
        fresh_cache()
    at = int(n * resume_fraction)
    state = {**loader.state_dict(), "epoch": 0, "position": at * micro_batch}
    t0 = time.perf_counter()
    resumed = ShardLoader(url, "train", micro_batch, 0, 1, num_workers=workers, seed=0, with_keys=True,
                          shuffle_buffer=shuffle_buffer, remote=options)
    resumed.load_state_dict(state)
    got = []
    for _, batch_keys in resumed:
        if not got:
            first, first_bytes = time.perf_counter() - t0, resumed.stats["fetched_bytes"]
        got.append(batch_keys)
        if len(got) == min(8, n - at):
            break
    out["resume"] = {"at_batch": at, "first_batch_s": first, "first_batch_bytes": first_bytes,
                     "same_order": got == keys[at:at + len(got)]}
    if watch is not None:
        out["peak_cache_bytes"] = watch.stop()
        fresh_cache()
    return out


def bench_verify(manifest_path) -> dict:
    """Seconds and MB/s of ``check_shards`` over every split, per mode (the page cache is as preprocessing left it:
    warm for a corpus that fits in memory)."""
    manifest = load_manifest(manifest_path)
    mb = sum(s["bytes"] for split in manifest["splits"].values() for s in split["shards"]) / 1e6
    out = {}
    for mode in ("quick", "full"):
        t0 = time.time()
        check_shards(manifest, None, mode)
        seconds = time.time() - t0
        out[mode] = {"seconds": seconds, "mb": mb, "mb_per_s": mb / max(seconds, 1e-9)}
    return out


def bench_training(seq_length, model_config, steps):
    """Tokens/s of training steps (forward, backward, AdamW) on this machine: rtdist's model from
    ``model_config`` if it builds, else a small local-attention transformer (cheaper than any real config)."""
    import torch

    torch.manual_seed(0)
    try:
        from rtdist.config import load_config
        from rtdist.model import RoutingTransformerLM, lm_loss

        cfg = load_config([model_config], [f"train.seq_length={seq_length}"])
        model, name = RoutingTransformerLM(cfg.model), f"rtdist RoutingTransformerLM ({model_config})"
        vocab = cfg.model.vocab_size

        def loss_fn(tokens):
            logits, aux = model(tokens[:, :-1])
            return lm_loss(logits, tokens[:, 1:]) + aux
    except Exception as e:  # the model is optional here: measure a stand-in rather than fail
        print(f"(rtdist model unavailable: {type(e).__name__}: {e}; using a local-attention stand-in)")
        model, name, vocab = _StandIn(), "stand-in: 2 layers, d 128, local attention 256", 257

        def loss_fn(tokens):
            return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (1, seq_length + 1))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.time()
        loss = loss_fn(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "update_kmeans"):
            model.update_kmeans()
        times.append(time.time() - t0)
    step = sum(times[1:]) / steps
    return {"model": name, "seconds_per_step": step, "tokens_per_s": seq_length / step}


def _StandIn():
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=128, heads=4, window=256):
            super().__init__()
            self.heads, self.window = heads, window
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            B, n, d = x.shape
            q, k, v = (t.reshape(B * n // self.window, self.window, self.heads, -1).transpose(1, 2)
                       for t in self.qkv(self.ln1(x)).chunk(3, -1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, n, d)
            x = x + self.proj(a)
            return x + self.mlp(self.ln2(x))

    return nn.Sequential(nn.Embedding(257, 128), Block(), Block(), nn.LayerNorm(128), nn.Linear(128, 257))


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="a text corpus folder (default: build one under --work-dir)")
    p.add_argument("--mb", type=bounded(int, 1, 2 ** 20), default=256, help="size of the built corpus in MB (256)")
    p.add_argument("--work-dir", default="runs/bench_data", help="corpus and shards go here (runs/bench_data)")
    p.add_argument("--workers", type=bounded(int, 1, 1024), nargs="+", default=[1, 2],
                   help="preprocessing workers to try (1 2)")
    p.add_argument("--seq-length", type=SEQ, default=8192)
    p.add_argument("--maxcount", type=COUNT, default=1000, help="samples per shard (1000: ~17 MB shards at 8192)")
    p.add_argument("--micro-batch", type=BATCH, default=8)
    p.add_argument("--loader-workers", type=bounded(int, 0, DATA_LIMITS["num_workers"]), default=2)
    p.add_argument("--loader-batches", type=bounded(int, 0), default=0, help="batches to time (0: a whole epoch)")
    p.add_argument("--model-config", default="configs/tiny.yaml",
                   help="model whose training step sets the loader target (configs/tiny.yaml: the cheapest)")
    p.add_argument("--train-steps", type=COUNT, default=2, help="timed training steps (2)")
    p.add_argument("--repeat", type=COUNT, default=2, help="runs per measurement, the best is reported (2)")
    p.add_argument("--url", help="measure streaming from this manifest URL instead (see above)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec storage option for --url (repeatable), e.g. endpoint_url=http://127.0.0.1:9000")
    p.add_argument("--shuffle-buffer", type=bounded(int, 0, DATA_LIMITS["shuffle_buffer"]), default=64,
                   help="--url: samples in each worker's shuffle buffer (64, data.shuffle_buffer's default)")
    p.add_argument("--resume-at", type=bounded(float, 0.0, 1.0), default=0.5,
                   help="--url: the fraction of the epoch a resume starts at (0.5)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")
    p.add_argument("--peers", action="store_true", help="--url s3://...: also MosaicML streaming and litdata (above)")
    p.add_argument("--peer-python", default=sys.executable, help="--peers: a Python with mosaicml-streaming and "
                                                                   "litdata installed (this one)")
    p.add_argument("--convert-from", help="--peers: the local manifest the peers' formats are converted from")
    p.add_argument("--cache-mb", type=bounded(int, 1), default=50,
                   help="--peers: every system's cache budget; --url with --cache-dir: rtdist's (50)")
    p.add_argument("--cache-dir", help="--url: read through rtdist's shard cache in this folder (emptied first and "
                                       "after; data.cache_dir): adds a warm second epoch and the peak cache size. "
                                       "--peers: adds an 'rtdist+cache' row, its cache under a temporary folder")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.url and args.peers:
        return main_peers(args)
    if args.url:
        return main_stream(args)
    if args.corpus and not Path(args.corpus).is_dir():
        raise UsageError(f"--corpus {args.corpus} is not a folder: give a text corpus folder, or leave it out to "
                         f"build one")
    from rtdist.config import ConfigError, load_config
    try:  # before the corpus is built
        load_config([args.model_config], [f"train.seq_length={args.seq_length}"])
    except ConfigError as e:
        raise UsageError(f"--model-config {args.model_config} with --seq-length {args.seq_length}: {e}") from None

    work = Path(args.work_dir)
    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    if not args.corpus and not (corpus / "train").is_dir():
        print(f"building a {args.mb} MB corpus in {corpus} from this Python installation's sources ...")
        print(build_demo_corpus(corpus, max_bytes=args.mb << 20))
    results = {"corpus": str(corpus), "preprocess": [], "seq_length": args.seq_length}
    shards = {}
    for w in args.workers:
        prefix = work / f"shards-w{w}" / "bench"
        runs = [preprocess([corpus], prefix, seq_length=args.seq_length, workers=w, overwrite=True, append_eod=True,
                           maxcount=args.maxcount) for _ in range(args.repeat)]
        s = max(runs, key=lambda r: r["mb_per_s"])  # best of: the machine may be shared
        shards[w] = {sh["sha256"] for split in s["manifest"]["splits"].values() for sh in split["shards"]}
        results["preprocess"].append({"workers": w, "mb": s["input_bytes"] / 1e6, "seconds": s["seconds"],
                                      "mb_per_s": s["mb_per_s"], "mb_per_s_per_worker": s["mb_per_s"] / w,
                                      "all_runs_mb_per_s": [r["mb_per_s"] for r in runs],
                                      "manifest": s["manifest_path"]})
    results["same_shards_for_all_worker_counts"] = len({frozenset(v) for v in shards.values()}) == 1
    results["peak_rss_mb"] = dict(zip(("main", "largest_worker"), peak_rss_mb()))

    manifest = results["preprocess"][0]["manifest"]
    results["verify"] = bench_verify(manifest)
    results["loader"] = max((bench_loader(manifest, args.seq_length, args.micro_batch, args.loader_workers,
                                          args.loader_batches) for _ in range(args.repeat)),
                            key=lambda r: r["tokens_per_s"])
    results["training"] = bench_training(args.seq_length, args.model_config, args.train_steps)
    results["loader_over_training"] = results["loader"]["tokens_per_s"] / results["training"]["tokens_per_s"]

    print("\n=== data benchmark ===")
    print(f"corpus {corpus}: {results['preprocess'][0]['mb']:.0f} MB, seq_length {args.seq_length}, bytes tokenizer, "
          f"{args.maxcount} samples per shard")
    for r in results["preprocess"]:
        print(f"preprocess  {r['workers']} worker(s): {r['mb_per_s']:7.1f} MB/s "
              f"({r['mb_per_s_per_worker']:.1f} per worker, {r['seconds']:.1f} s; target >= 50 per worker)")
    print(f"            identical shards for every worker count: {results['same_shards_for_all_worker_counts']}; "
          f"peak RSS main {results['peak_rss_mb']['main']:.0f} MB, "
          f"largest worker {results['peak_rss_mb']['largest_worker']:.0f} MB")
    for mode, v in results["verify"].items():
        print(f"verify      {mode:<5} {v['mb_per_s']:9.0f} MB/s of shards ({v['seconds']:.2f} s for {v['mb']:.0f} MB; "
              f"check_shards, the pre-flight check of data.verify)")
    lo, tr = results["loader"], results["training"]
    print(f"loader      {lo['tokens_per_s'] / 1e6:7.2f} M tokens/s ({lo['batches']} batches of {args.micro_batch} x "
          f"{args.seq_length}, {lo['workers']} workers, first batch after {lo['first_batch_s']:.2f} s)")
    print(f"training    {tr['tokens_per_s']:9.0f} tokens/s ({tr['model']}, {tr['seconds_per_step']:.2f} s/step)")
    print(f"loader / training = {results['loader_over_training']:,.0f}x (target >= 100x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def main_peers(args) -> int:
    """rtdist, MosaicML streaming and litdata from one S3 endpoint, alternating fresh processes."""
    import shutil
    import tempfile

    from rtdist.data.remote import RemoteOptions, store_for
    if not args.url.startswith("s3://"):
        raise UsageError(f"--peers needs an s3:// --url (MosaicML streaming reads no http), got {args.url}")
    if not args.convert_from or not Path(args.convert_from).is_file():
        raise UsageError(f"--peers needs --convert-from, the local manifest of {args.url}")
    options = dict(item.split("=", 1) for item in args.storage_option)
    endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise UsageError("--peers: give the S3 endpoint (--storage-option endpoint_url=... or AWS_ENDPOINT_URL)")
    store = store_for(RemoteOptions(options))
    base = args.url.rsplit("/", 1)[0] + "/peers"
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        return peers_in(args, work, store, base, endpoint, options)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # converted copies and caches


def peers_in(args, work, store, base, endpoint, options) -> int:
    import subprocess

    peers = [args.peer_python, str(Path(__file__).with_name("stream_peers.py"))]
    train = load_manifest(args.convert_from)["splits"]["train"]
    samples, shuffle_block = train["samples"], train["shards"][0]["samples"]
    epoch_batches = min(samples // args.micro_batch, args.loader_batches or samples)
    for system in ("streaming", "litdata"):  # each in its own format, from the same tokens
        out = work / system
        r = subprocess.run(peers + ["convert", "--system", system, "--manifest", args.convert_from, "--out",
                                    str(out)], capture_output=True, text=True)
        if r.returncode:
            raise UsageError(f"converting to {system} failed: {r.stderr.strip().splitlines()[-1:]}")
        for f in sorted(out.iterdir()):
            store.upload(f, f"{base}/{system}/{f.name}")
        print(f"converted and uploaded {system} to {base}/{system}/")
    me = [sys.executable, __file__, "--url", args.url, *sum((["--storage-option", o] for o in args.storage_option),
                                                             []),
          "--micro-batch", str(args.micro_batch), "--loader-workers", str(args.loader_workers), "--repeat", "1",
          "--shuffle-buffer", str(args.shuffle_buffer), "--resume-at", str(args.resume_at),
          "--loader-batches", str(args.loader_batches)]
    results: dict = {}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": options.get("key", os.environ.get("AWS_ACCESS_KEY_ID", "x")),
           "AWS_SECRET_ACCESS_KEY": options.get("secret", os.environ.get("AWS_SECRET_ACCESS_KEY", "x"))}
    systems = ("rtdist", "rtdist+cache", "streaming", "litdata") if args.cache_dir else ("rtdist", "streaming",
                                                                                          "litdata")
    for rep in range(args.repeat):
        for system in systems:
            if system.startswith("rtdist"):
                out = work / "rtdist.json"
                cache = ["--cache-dir", str(work / "cache-rtdist"), "--cache-mb", str(args.cache_mb)] \
                    if system == "rtdist+cache" else []
                r = subprocess.run(me + cache + ["--json", str(out)], capture_output=True, text=True, env=env)
                if r.returncode not in (0, 1):
                    raise UsageError(f"rtdist child failed: {r.stderr.strip()[-500:]}")
                d = json.loads(out.read_text())
                row = {"samples_per_s": d["cold"]["samples_per_s"], "first_batch_s": d["cold"]["first_batch_s"],
                       "first_batch_bytes": d["cold"]["first_batch_bytes"],
                       "resume_first_batch_s": d["resume"]["first_batch_s"],
                       "resume_first_batch_bytes": d["resume"]["first_batch_bytes"],
                       "peak_cache_bytes": d.get("peak_cache_bytes", 0), "same_order": d["resume"]["same_order"],
                       "epoch_bytes": d["cold"]["epoch_bytes"]}
                if "warm" in d:
                    row["warm_samples_per_s"], row["warm_epoch_bytes"] = (d["warm"]["samples_per_s"],
                                                                          d["warm"]["epoch_bytes"])
            else:
                row = peer_run(peers, system, f"{base}/{system}", endpoint, args, work, env, epoch_batches,
                               shuffle_block)
            best = results.get(system)
            if best is None or row["samples_per_s"] > best["samples_per_s"]:
                results[system] = row
            print(f"run {rep + 1}/{args.repeat} {system}: {row['samples_per_s']:.0f} samples/s"
                  + (f", warm epoch {row['warm_samples_per_s']:.0f}" if "warm_samples_per_s" in row else ""))
    print(f"\n=== {args.url}: rtdist vs MosaicML streaming vs litdata (cache budget {args.cache_mb} MB, "
          f"{args.loader_workers} workers, micro batch {args.micro_batch}, best of {args.repeat}) ===")
    print("| system | samples/s | first batch, cold | fetched by then | first batch after resume | fetched by then "
          "| peak cache on disk | resumed order = uninterrupted |")
    print("|---|---|---|---|---|---|---|---|")
    for system, r in results.items():
        print(f"| {system} | {r['samples_per_s']:.0f} | {r['first_batch_s']:.2f} s | "
              f"{r['first_batch_bytes'] / 1e6:.2f} MB | {r['resume_first_batch_s']:.2f} s | "
              f"{r['resume_first_batch_bytes'] / 1e6:.2f} MB | {r['peak_cache_bytes'] / 1e6:.1f} MB | "
              f"{r['same_order']} |")
    for system, r in results.items():
        if "warm_epoch_bytes" in r:
            print(f"{system}: cold epoch fetched {r['epoch_bytes'] / 1e6:.1f} MB; the next epoch "
                  f"{r['warm_samples_per_s']:.0f} samples/s with {r['warm_epoch_bytes'] / 1e6:.1f} MB fetched")
        elif "warm_samples_per_s" in r:
            print(f"{system}: the next epoch (its cache warm) {r['warm_samples_per_s']:.0f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def peer_run(peers, system, remote, endpoint, args, work, env, epoch_batches, shuffle_block) -> dict:
    """A cold epoch (state saved at --resume-at; with --cache-dir, then the next epoch from the warm cache) and a
    fresh process resuming from that state, each starting with an empty cache."""
    import shutil
    import subprocess

    def read(*extra):
        cache = work / f"cache-{system}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        r = subprocess.run(peers + ["read", "--system", system, "--remote", remote, "--cache", str(cache),
                                    "--cache-bytes", str(args.cache_mb * 10 ** 6), "--endpoint", endpoint,
                                    "--micro-batch", str(args.micro_batch), "--workers", str(args.loader_workers),
                                    "--shuffle-block", str(shuffle_block), *extra], capture_output=True, text=True, env=env)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        if r.returncode or not lines:
            raise UsageError(f"{system} read failed: {r.stderr.strip()[-800:]}")
        return json.loads(lines[-1])

    state, at = work / f"state-{system}.json", int(epoch_batches * args.resume_at)
    cold = read("--batches", str(epoch_batches), "--state-out", str(state), "--resume-batch", str(at),
                *(["--warm-epoch"] if args.cache_dir else []))
    resumed = read("--state-in", str(state), "--batches", "8")
    return {"samples_per_s": cold["samples_per_s"], "first_batch_s": cold["first_batch_s"],
            "first_batch_bytes": cold["first_batch_cache_bytes"], "resume_first_batch_s": resumed["first_batch_s"],
            "resume_first_batch_bytes": resumed["first_batch_cache_bytes"],
            "peak_cache_bytes": max(cold["peak_cache_bytes"], resumed["peak_cache_bytes"]),
            **({"warm_samples_per_s": cold["warm"]["samples_per_s"]} if cold.get("warm") else {}),
            "same_order": resumed["keys"] == cold["keys"][at:at + len(resumed["keys"])]}


def main_stream(args) -> int:
    from rtdist.data.remote import RemoteOptions
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option {item!r}: expected KEY=VALUE")
        options[key] = value
    remote = RemoteOptions(options)
    if args.cache_dir:
        remote = RemoteOptions(options, cache_dir=os.path.abspath(args.cache_dir),
                               cache_limit_bytes=args.cache_mb * 10 ** 6)
    results = max((bench_stream(args.url, remote, args.micro_batch, args.loader_workers,
                                args.shuffle_buffer, args.resume_at, args.loader_batches) for _ in range(args.repeat)),
                  key=lambda r: r["cold"]["samples_per_s"])
    c, r = results["cold"], results["resume"]
    print(f"\n=== streaming from {args.url} ({args.loader_workers} workers, micro batch {args.micro_batch}) ===")
    print(f"epoch       {c['samples_per_s']:9.0f} samples/s ({c['batches']} batches in {c['seconds']:.2f} s, "
          f"{c['epoch_bytes'] / 1e6:.1f} MB in {c['requests']} requests)")
    print(f"cold start  first batch after {c['first_batch_s']:.3f} s, {c['first_batch_bytes'] / 1e3:.0f} KB fetched")
    print(f"resume      at batch {r['at_batch']}: first batch after {r['first_batch_s']:.3f} s, "
          f"{r['first_batch_bytes'] / 1e3:.0f} KB fetched; order equals the uninterrupted one: {r['same_order']}")
    if "warm" in results:
        w = results["warm"]
        print(f"warm epoch  {w['samples_per_s']:9.0f} samples/s from the cache ({w['epoch_bytes'] / 1e6:.1f} MB "
              f"fetched); peak cache on disk {results['peak_cache_bytes'] / 1e6:.1f} MB (limit {args.cache_mb} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if r["same_order"] else 1


if __name__ == "__main__":
    sys.exit(cli_main(main))
