#!/usr/bin/env python
"""The peers of ``tools/bench_data.py --url``: MosaicML ``streaming`` and Lightning ``litdata`` reading the same
samples (converted from an rtdist manifest into each one's own format) from the same S3 endpoint, with the same cache
budget. Run by bench_data.py in fresh processes of a Python that has them installed (``--peer-python``); each run
prints one JSON line.

  python tools/stream_peers.py convert --system streaming --manifest shards/bench-manifest.json --out mds/
  python tools/stream_peers.py read --system litdata --remote s3://bucket/lit --cache /tmp/c --cache-bytes 50000000 \\
      --endpoint http://127.0.0.1:9000 --micro-batch 8 --workers 2 --batches 0 --state-out s.json --resume-at 0.5

``read`` times an epoch from a cold cache (samples/s, first batch, bytes in the cache at the first batch, peak cache
on disk) and saves the loader state at ``--resume-at`` (``--warm-epoch``: then times the next epoch, cache warm); ``read --state-in`` starts a fresh loader from that state with
an empty cache and times its first batch. Keys come with every sample so that the orders can be compared.

litdata reads S3 through obstore when it is installed, and obstore refuses an http:// endpoint (litdata passes it
no allow_http): the Python running this should not have obstore, so that litdata uses boto3.

MosaicML streaming's package imports its vision datasets (``streaming.vision``), which need torchvision; where
torchvision cannot be imported (PyPI's wheel is built for CUDA torch, this machine has CPU torch) an empty
``streaming.vision`` module is registered before ``import streaming``. The text path measured here does not use it.
"""

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np


def rtdist_samples(manifest_path):
    """(key, tokens) of the train split of a local rtdist manifest, in shard order (read with numpy only)."""
    manifest = json.loads(Path(manifest_path).read_text())
    layout, dtype = manifest["layout"], np.dtype(manifest["dtype"]).newbyteorder("<")
    member, head = layout["member_bytes"], 512 + layout["npy_header_bytes"]
    n_tokens = manifest["sample_tokens"]
    for shard in manifest["splits"]["train"]["shards"]:
        data = (Path(manifest_path).parent / shard["name"]).read_bytes()
        for i in range(shard["samples"]):
            row = data[i * member:(i + 1) * member]
            name = row[:100].rstrip(b"\0").decode()
            yield name[:-len(".tokens.npy")], np.frombuffer(row, dtype, n_tokens, head)


def import_streaming():
    """``import streaming`` without its vision datasets (see the module docstring)."""
    try:
        import torchvision.datasets  # noqa: F401 - only whether it imports
    except Exception:  # noqa: BLE001 - absent, or a wheel that cannot load beside this torch
        import importlib.machinery
        import types
        vision = types.ModuleType("streaming.vision")
        vision.__spec__ = importlib.machinery.ModuleSpec("streaming.vision", None)
        sys.modules["streaming.vision"] = vision
    import streaming
    return streaming


def convert(system, manifest, out, chunk_bytes):
    samples = list(rtdist_samples(manifest))
    if system == "streaming":
        streaming = import_streaming()
        with streaming.MDSWriter(out=str(out), columns={"key": "str", "tokens": "bytes"}, compression=None,
                                 size_limit=chunk_bytes) as writer:
            for key, tokens in samples:
                writer.write({"key": key, "tokens": tokens.tobytes()})
    else:
        import litdata
        litdata.optimize(fn=_lit_item, inputs=[(k, t.tobytes()) for k, t in samples], output_dir=str(out),
                         chunk_bytes=chunk_bytes, num_workers=1, mode="overwrite")
    return {"samples": len(samples)}


def _lit_item(item):
    return {"key": item[0], "tokens": item[1]}


def dir_bytes(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class CacheWatch(threading.Thread):
    """The largest size of a folder, sampled every 50 ms (the peak cache on disk)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path, 0, threading.Event()
        self.start()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, dir_bytes(self.path))


def make_loader(system, remote, cache, cache_bytes, endpoint, micro_batch, workers, shuffle_block):
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if system == "streaming":
        os.environ["S3_ENDPOINT_URL"] = endpoint
        streaming = import_streaming()
        from streaming.base.util import clean_stale_shared_memory
        clean_stale_shared_memory()
        # shuffle blocks of one shard's samples: like rtdist's shard order + buffer and litdata's chunk order, and
        # not a shuffle over the whole dataset, which would fetch every shard for the first batches
        ds = streaming.StreamingDataset(remote=remote, local=str(cache), shuffle=True, shuffle_seed=0,
                                        shuffle_algo="py1br", shuffle_block_size=shuffle_block,
                                        batch_size=micro_batch, cache_limit=cache_bytes)
        return streaming.StreamingDataLoader(ds, batch_size=micro_batch, num_workers=workers,
                                             collate_fn=_collate)
    import litdata
    ds = litdata.StreamingDataset(remote, cache_dir=str(cache), shuffle=True, seed=0, max_cache_size=cache_bytes,
                                  storage_options={"endpoint_url": endpoint})
    return litdata.StreamingDataLoader(ds, batch_size=micro_batch, num_workers=workers, collate_fn=_collate)


def _collate(items):
    keys = [it["key"] for it in items]
    tokens = np.stack([np.frombuffer(it["tokens"], np.uint16) for it in items]).astype(np.int64)
    return keys, tokens


def read(args):
    t0 = time.perf_counter()
    watch = CacheWatch(args.cache)
    loader = make_loader(args.system, args.remote, args.cache, args.cache_bytes, args.endpoint, args.micro_batch,
                         args.workers, args.shuffle_block)
    if args.state_in:
        loader.load_state_dict(json.loads(Path(args.state_in).read_text()))
    keys, first, first_bytes, state = [], None, 0, None
    limit = args.batches or None
    for i, (batch_keys, _) in enumerate(loader):
        if first is None:
            first, first_bytes = time.perf_counter() - t0, dir_bytes(args.cache)
        keys.append(batch_keys)
        if args.state_out and state is None and i + 1 == args.resume_batch:
            state = loader.state_dict()
        if limit and i + 1 == limit:
            break
    seconds = time.perf_counter() - t0
    warm = None
    if args.warm_epoch:  # the next epoch of the same loader, its cache as the first one left it
        t1, n = time.perf_counter(), 0
        for _ in loader:
            n += 1
            if limit and n == limit:
                break
        warm = {"samples_per_s": n * args.micro_batch / (time.perf_counter() - t1), "batches": n}
    watch.stop.set()
    watch.join()
    if state is not None:
        Path(args.state_out).write_text(json.dumps(state, default=int))
    out = {"system": args.system, "batches": len(keys), "samples_per_s": len(keys) * args.micro_batch / seconds,
           "seconds": seconds, "first_batch_s": first, "first_batch_cache_bytes": first_bytes,
           "peak_cache_bytes": max(watch.peak, dir_bytes(args.cache)), "keys": keys, "warm": warm}
    print(json.dumps(out))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--system", choices=["streaming", "litdata"], required=True)
    c.add_argument("--manifest", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--chunk-bytes", type=int, default=5 << 20)
    r = sub.add_parser("read")
    r.add_argument("--system", choices=["streaming", "litdata"], required=True)
    r.add_argument("--remote", required=True)
    r.add_argument("--cache", required=True)
    r.add_argument("--cache-bytes", type=int, required=True)
    r.add_argument("--endpoint", required=True)
    r.add_argument("--micro-batch", type=int, default=8)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--shuffle-block", type=int, default=1000, help="streaming: samples per shuffle block (1000)")
    r.add_argument("--batches", type=int, default=0, help="stop after this many (0: the epoch)")
    r.add_argument("--resume-batch", type=int, default=0, help="save the state after this many batches")
    r.add_argument("--state-out")
    r.add_argument("--state-in")
    r.add_argument("--warm-epoch", action="store_true", help="then time a second epoch from the warm cache")
    args = p.parse_args(argv)
    if args.cmd == "convert":
        print(json.dumps(convert(args.system, args.manifest, Path(args.out), args.chunk_bytes)))
        return 0
    return read(args)


if __name__ == "__main__":
    sys.exit(main())
