"""Evaluation: token-level loss, perplexity, bits per token and bits per byte (or per dim, for pixels).

    python -m rtdist.evaluate --checkpoint RUN_DIR [--split validation] [--max-batches N]

``--checkpoint`` is a run directory (its ``model.safetensors`` export and ``config.yaml``) or a safetensors file
next to a ``config.yaml``. All ranks share the work: each data-parallel rank reads its own part of the split and the
sums are all-reduced.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from . import dist as rdist
from .config import DATA_LIMITS, TRAIN_LIMITS
from .errors import ArgumentParser, ConfigError, DataError, bounded, cli_main
from .export import load_model_for_inference


@torch.no_grad()
def evaluate(model, loader, max_batches: Optional[int] = None, seq_length: Optional[int] = None,
             autocast=None, device: str = "cpu", group=None, dims=None,
             should_stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Sum of token losses and counts over ``loader`` (one pass, at most ``max_batches``), reduced over ``group``
    (the world by default). ``dims``: the parallel layout when the model runs sequence-parallel; each rank then
    scores its slice of every sample. The sums stay on ``device`` and are read once, at the end.

    ``should_stop``: asked before each batch (a collective, so every rank leaves at the same batch): when it says
    True the evaluation is abandoned and None returned (a stop signal during evaluation)."""
    was_training = getattr(model, "training", False)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    it = iter(loader)
    try:
        for _ in range(n):
            if should_stop is not None and should_stop():
                return None
            batch = next(it).to(device)
            if seq_length:
                batch = batch[:, : seq_length + 1]
            positions = None
            if dims is not None:
                batch, positions = dims.local_slice(batch)
            with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
                loss, _ = model(batch[:, :-1], positions=positions, targets=batch[:, 1:], reduction="sum")
            total[0] += loss.detach().to(torch.float64)
            total[1] += batch[:, 1:].numel()
    finally:
        if was_training:
            model.train()
    loss_sum, tokens = rdist.all_reduce_sum(total, group=group).tolist()
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_token": loss / math.log(2),
            "tokens": int(tokens)}


def with_bytes(metrics: dict, bytes_per_token: Optional[float]) -> dict:
    """Add bits per byte (text) / per dim (pixels): bits per token divided by bytes per token."""
    if bytes_per_token:
        metrics["bits_per_byte"] = metrics["bits_per_token"] / bytes_per_token
    return metrics


def bytes_per_token(manifest: dict, split: str) -> Optional[float]:
    """From the manifest: source bytes / tokens of the split (1.0-ish for the bytes tokenizer). Source bytes are the
    documents' UTF-8 bytes (``text_bytes``: JSON syntax, parquet encoding and compression not counted), or the bytes
    read (``input_bytes``) in manifests written before text_bytes was recorded."""
    info = manifest.get("splits", {}).get(split, {})
    nbytes = info.get("text_bytes") or info.get("input_bytes")
    tokens = info.get("corpus_tokens") or info.get("tokens")
    if nbytes and tokens:
        return nbytes / tokens
    if manifest.get("tokenizer", {}).get("type") == "bytes":
        return 1.0
    return None


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="run directory or model.safetensors")
    p.add_argument("--split", default="validation")
    p.add_argument("--manifest", default=None, help="default: the run config's data.manifest")
    p.add_argument("--batch-size", type=bounded(int, 1, TRAIN_LIMITS["train_micro_batch_size_per_gpu"]), default=1)
    p.add_argument("--max-batches", type=bounded(int, 1), default=None)
    p.add_argument("--num-workers", type=bounded(int, 0, DATA_LIMITS["num_workers"]), default=0)
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from .data import ShardLoader
    from .data.remote import options_from_config
    info = rdist.init()
    try:
        model, cfg = load_model_for_inference(args.checkpoint)
        manifest_path = args.manifest or cfg.data.manifest
        if not manifest_path:
            raise ConfigError("no manifest to evaluate on: pass --manifest (the run config has no data.manifest)")
        loader = ShardLoader(manifest_path, args.split, args.batch_size, info.rank, info.world_size,
                             num_workers=args.num_workers, shuffle=False, policy="wrap",
                             remote=options_from_config(cfg))  # a URL manifest: the run's storage options
        if loader.vocab_size > cfg.model.vocab_size:  # its token ids would index past the model's embedding
            raise DataError(f"the tokenizer of {manifest_path} has {loader.vocab_size} ids, the model of "
                            f"{args.checkpoint} only {cfg.model.vocab_size} (model.vocab_size): evaluate on data "
                            f"preprocessed with the tokenizer the model was trained on")
        metrics = evaluate(model, loader, args.max_batches, seq_length=cfg.train.seq_length)
        metrics = with_bytes(metrics, bytes_per_token(loader.manifest, args.split))
        metrics["split"] = args.split
        if info.is_main:
            print(json.dumps(metrics, indent=1))
    finally:
        rdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
