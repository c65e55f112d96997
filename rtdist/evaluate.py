"""Evaluation: token-level loss, perplexity and bits per token; bits per byte (or per dim, for pixels) and word-level
perplexity from the manifest; the loss by position in the context.

    python -m rtdist.evaluate --checkpoint RUN_DIR [--split validation] [--stride S] [--max-batches N] \\
        [--output eval.json] [--plot loss_by_position.png]
    python -m rtdist.evaluate --checkpoint RUN_DIR --config configs/eval/pg19.yaml   # the paper's setting

``--checkpoint`` is a run directory (its ``model.safetensors`` export and ``config.yaml``) or a safetensors file
next to a ``config.yaml``. Every target token of the split is scored once (:mod:`rtdist.data.evalset`): windows of
the model's sequence length slide over each document stream with ``--stride`` S (default the sequence length:
independent samples), scoring the last S targets of each window with up to length - S tokens of context before
them. The windows are in a fixed order, and ``--max-batches N`` takes the first N x ``--batch-size`` of them,
whatever the number of ranks: ranks split those, padding rather than repeating, and the sums are all-reduced.

Figures: ``loss`` (nats per token), ``perplexity``, ``bits_per_token``; ``bits_per_byte`` = bits per token / (the
split's UTF-8 bytes / tokens); ``word_perplexity`` = exp(loss x tokens / words), words counted by whitespace at
preprocessing, as the PG-19 literature counts them (the split's words over its tokens, so a partial evaluation
gives the estimate its mean loss implies); ``loss_by_position``: the mean loss of the targets at context positions
1, 2-3, 4-7, ..., n/2-n (powers of two) of their window.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import yaml

from . import dist as rdist
from .config import TRAIN_LIMITS
from .errors import ArgumentParser, ConfigError, DataError, UsageError, bounded, cli_main
from .export import load_model_for_inference
from .fileio import atomic_write_text


def position_buckets(n: int) -> list[tuple[int, int]]:
    """Context-length ranges [lo, hi] of the buckets over a window of ``n`` targets: target j (0-based) sees j + 1
    tokens and falls in the bucket with lo <= j + 1 <= hi: [1, 1], [2, 3], [4, 7], ..., [n/2, n] (the last one
    takes position n too, rather than leaving it a bucket of one position)."""
    out, lo = [], 1
    while lo <= n:
        hi = n if 2 * lo >= n else 2 * lo - 1
        out.append((lo, hi))
        lo = hi + 1
    return out


@torch.no_grad()
def evaluate(model, batches: Iterable, max_batches: Optional[int] = None, autocast=None, device: str = "cpu",
             group=None, dims=None, should_stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Sums of the scored targets' losses and counts over ``batches`` (one pass, at most ``max_batches``), reduced
    over ``group`` (the world by default). A batch is ``(tokens [B, n + 1], mask [B, n] bool)`` (the targets to
    score, as :class:`rtdist.data.evalset.EvalWindows` yields them) or plain tokens (every target scored). ``dims``:
    the parallel layout when the model runs sequence-parallel; each rank then scores its slice of every row. The
    sums stay on ``device`` and are read once, at the end.

    ``should_stop``: asked before each batch (a collective, so every rank leaves at the same batch): when it says
    True the evaluation is abandoned and None returned (a stop signal during evaluation)."""
    was_training = getattr(model, "training", False)
    model.eval()
    total = buckets = bucket_of = None
    n = len(batches) if max_batches is None else min(max_batches, len(batches))
    it = iter(batches)
    try:
        for _ in range(n):
            if should_stop is not None and should_stop():
                return None
            batch = next(it)
            tokens, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
            tokens = tokens.to(device)
            mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool) if mask is None else mask
            mask = mask.to(device)
            if total is None:
                buckets = position_buckets(mask.shape[1])
                bucket_of = torch.tensor([k for k, (lo, hi) in enumerate(buckets) for _ in range(lo, hi + 1)],
                                         device=device)
                total = torch.zeros(2 + 2 * len(buckets), dtype=torch.float64, device=device)
            positions = None
            if dims is not None:
                tokens, positions = dims.local_slice(tokens)
            local_mask = mask if positions is None else mask[:, positions]
            with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
                losses, _ = model(tokens[:, :-1], positions=positions, targets=tokens[:, 1:], reduction="none")
            losses = torch.where(local_mask, losses.to(torch.float64), 0.0)
            where = bucket_of if positions is None else bucket_of[positions]
            total[0] += losses.sum()
            total[1] += local_mask.sum()
            total[2::2].index_add_(0, where, losses.sum(0))
            total[3::2].index_add_(0, where, local_mask.sum(0).to(torch.float64))
    finally:
        if was_training:
            model.train()
    if total is None:
        raise DataError("nothing to evaluate: no batch")
    sums = rdist.all_reduce_sum(total, group=group).tolist()
    loss_sum, tokens = sums[0], sums[1]
    if not tokens:
        raise DataError("nothing to evaluate: no target token was scored")
    loss = loss_sum / tokens
    by_position = [{"context_from": lo, "context_to": hi, "tokens": int(c), "loss": s / c}
                   for (lo, hi), s, c in zip(buckets, sums[2::2], sums[3::2]) if c]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_token": loss / math.log(2),
            "tokens": int(tokens), "loss_by_position": by_position}


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


def tokens_per_word(manifest: dict, split: str) -> Optional[float]:
    """From the manifest: the split's tokens / whitespace-separated words; None when preprocessing did not count
    words (manifests written before it did, image splits)."""
    info = manifest.get("splits", {}).get(split, {})
    words, tokens = info.get("words"), info.get("corpus_tokens") or info.get("tokens")
    return tokens / words if words and tokens else None


def with_text_figures(metrics: dict, manifest: dict, split: str) -> dict:
    """Add ``bits_per_byte`` and ``word_perplexity`` (with the ratios they rest on) where the manifest has them."""
    bpt = bytes_per_token(manifest, split)
    with_bytes(metrics, bpt)
    tpw = tokens_per_word(manifest, split)
    if tpw:
        metrics["word_perplexity"] = math.exp(min(metrics["loss"] * tpw, 700))
        metrics["tokens_per_word"] = tpw
    if bpt:
        metrics["bytes_per_token"] = bpt
    return metrics


def no_word_count_note(manifest: dict, split: str) -> Optional[str]:
    if "words" not in manifest.get("splits", {}).get(split, {}):  # (image splits record words: null)
        return (f"note: {manifest.get('manifest_path', 'the manifest')} has no word count for split {split!r} "
                f"(written before preprocessing counted words): no word_perplexity; preprocess again to get it")
    return None


def plot_loss_by_position(curves: dict, path: Path, title: str = "loss by position in the context") -> None:
    """One line per entry of ``curves`` (label -> an eval dict's ``loss_by_position``): mean loss against the
    context length (log2 axis), written to ``path`` (PNG) through a temporary name."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"drawing {path} needs matplotlib, which is not installed: pip install matplotlib "
                         f"(the dev extra has it), or leave out the plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in curves.items():
        xs = [math.sqrt(r["context_from"] * r["context_to"]) for r in rows]  # geometric middle of the bucket
        ax.plot(xs, [r["loss"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context (bucket middle)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


class _Progress:
    """The batches, with a progress bar on stderr when it is a terminal (``enabled``: this rank shows it)."""

    def __init__(self, batches, enabled: bool):
        self.batches, self.enabled = batches, enabled

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        from tqdm import tqdm
        yield from tqdm(self.batches, total=len(self.batches), desc="evaluate", unit="batch",
                        disable=None if self.enabled else True)


PRESET_KEYS = {"split", "stride", "batch_size", "max_batches"}


def load_preset(path: Path) -> dict:
    """An evaluation preset (``configs/eval/*.yaml``): flags' defaults, each key one of ``PRESET_KEYS``."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of {sorted(PRESET_KEYS)}")
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; expected some of {sorted(PRESET_KEYS)}")
    return data


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="run directory or model.safetensors")
    p.add_argument("--config", type=Path, default=None,
                   help="an evaluation preset (configs/eval/*.yaml: split, stride, batch_size, max_batches); "
                        "flags given on the command line win")
    p.add_argument("--split", default=None, help="default: validation")
    p.add_argument("--manifest", default=None, help="default: the run config's data.manifest")
    p.add_argument("--seq-length", type=bounded(int, 1, TRAIN_LIMITS["seq_length"]), default=None,
                   help="window length (default: the run's train.seq_length)")
    p.add_argument("--stride", type=bounded(int, 1), default=None,
                   help="targets scored per window after a document's first (default: the window length, i.e. "
                        "independent windows); smaller gives each scored token more context, at length/stride "
                        "times the compute")
    p.add_argument("--batch-size", type=bounded(int, 1, TRAIN_LIMITS["train_micro_batch_size_per_gpu"]), default=None,
                   help="windows per batch per rank (default 1)")
    p.add_argument("--max-batches", type=bounded(int, 1), default=None,
                   help="score only the first N x --batch-size windows of the fixed order (whatever the number of "
                        "ranks); default: the whole split")
    p.add_argument("--output", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="draw the loss by position to this PNG")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = load_preset(args.config) if args.config else {}
    split = args.split or preset.get("split", "validation")
    stride = args.stride or preset.get("stride")
    batch_size = args.batch_size or preset.get("batch_size", 1)
    max_batches = args.max_batches or preset.get("max_batches")
    from .data import load_manifest
    from .data.evalset import EvalWindows
    from .data.remote import options_from_config
    info = rdist.init()
    try:
        model, cfg = load_model_for_inference(args.checkpoint)
        manifest_path = args.manifest or cfg.data.manifest
        if not manifest_path:
            raise ConfigError("no manifest to evaluate on: pass --manifest (the run config has no data.manifest)")
        manifest = load_manifest(manifest_path, options_from_config(cfg))  # a URL manifest: the run's options
        if manifest["tokenizer"]["vocab_size"] > cfg.model.vocab_size:  # ids would index past the embedding
            raise DataError(f"the tokenizer of {manifest_path} has {manifest['tokenizer']['vocab_size']} ids, the "
                            f"model of {args.checkpoint} only {cfg.model.vocab_size} (model.vocab_size): evaluate "
                            f"on data preprocessed with the tokenizer the model was trained on")
        seq_length = min(args.seq_length or cfg.train.seq_length, manifest["seq_length"])
        windows = EvalWindows(manifest, split, seq_length, stride, batch_size, info.rank, info.world_size,
                              max_windows=max_batches * batch_size if max_batches else None)
        if info.is_main:
            print(f"evaluate: split {split}, {windows.tokens:,} target tokens in {len(windows.windows):,} windows "
                  f"of {seq_length} (stride {windows.stride}) over {windows.segments:,} document stream(s), "
                  f"{len(windows):,} batches of {batch_size} per rank on {info.world_size} rank(s)",
                  file=sys.stderr, flush=True)
        metrics = evaluate(model, _Progress(windows, info.is_main))
        if metrics["tokens"] != windows.tokens:  # the padding and the split between ranks lost or doubled some
            raise DataError(f"scored {metrics['tokens']} targets, expected {windows.tokens}")
        metrics = with_text_figures(metrics, manifest, split)
        metrics.update(split=split, seq_length=seq_length, stride=windows.stride, windows=len(windows.windows),
                       whole_split=windows.tokens == manifest["splits"][split]["tokens"])
        if info.is_main:
            note = no_word_count_note(manifest, split)
            if note:
                print(note, file=sys.stderr)
            text = json.dumps(metrics, indent=1)
            print(text)
            if args.output:
                atomic_write_text(args.output, text + "\n")
            if args.plot:
                plot_loss_by_position({f"{Path(args.checkpoint).name} (stride {windows.stride})":
                                       metrics["loss_by_position"]}, args.plot)
                print(f"loss by position: {args.plot}", file=sys.stderr)
    finally:
        rdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
