"""Sample text from a trained run with cached incremental decoding.

    python -m rtdist.generate --checkpoint RUN_DIR --prompt-file F --max-new-tokens N \
        [--temperature 0.8] [--top-k 40] [--top-p 0.95] [--seed 0] [--num-samples 1] [--no-cache]

``--checkpoint`` is a run directory (``model.safetensors`` + ``config.yaml``, what ``python -m rtdist.train`` writes
at the end). The tokenizer (bytes, sentencepiece or a Hugging Face tokenizer.json) comes from the run's ``data.manifest`` (``--manifest`` to point
elsewhere). The prompt is encoded as is; an empty prompt starts a new document (a single EOD token). Generation
stops at EOD unless ``--ignore-eod``. The completion goes to stdout, timings to stderr.

The prompt goes through one normal forward (its logits and the caches, see :mod:`rtdist.model.cache`); every new
token then costs O(w d) attention per head. ``--no-cache`` re-runs the whole model on the prefix for every token:
the reference, and the only way for ``routing_mode: topk`` (not causal, so it has no incremental form).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .config import MODEL_LIMITS, TRAIN_LIMITS
from .errors import ArgumentParser, ConfigError, DataError, bounded, cli_main, torch_device
from .model.cache import decode_step, prefill


MAX_TOKENS = TRAIN_LIMITS["seq_length"]  # new tokens per sample: longer is a typo


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Logits [B, V] with everything outside the top-k and outside the nucleus (smallest set of most likely tokens
    whose probability reaches ``top_p``) set to -inf. The most likely token is always kept."""
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] -> [B] long; ``temperature <= 0`` is greedy (argmax)."""
    if temperature <= 0:
        return logits.float().argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
             eod_id: Optional[int] = None, use_cache: bool = True) -> tuple[torch.Tensor, dict]:
    """Continue ``prompt`` [B, n] (n >= 1, same length for every row) by up to ``max_new_tokens`` tokens.

    Returns (new tokens [B, m], stats). A row that emitted ``eod_id`` keeps emitting it; generation stops early
    once every row has. ``use_cache=False`` re-runs the model on the whole prefix for every token."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError("prompt must be [batch, n] with n >= 1 (start an empty prompt with the EOD token)")
    model.eval()
    B = prompt.shape[0]
    new: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    t0 = time.perf_counter()
    if use_cache:
        logits, cache = prefill(model, prompt)
        logits = logits[:, -1]
    else:
        seq = prompt
        logits = model(seq)[0][:, -1]
    t_prefill = time.perf_counter() - t0
    for i in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        if eod_id is not None:
            tok = torch.where(done, torch.full_like(tok, eod_id), tok)
            done |= tok == eod_id
        new.append(tok)
        if (eod_id is not None and bool(done.all())) or i == max_new_tokens - 1:
            break
        if use_cache:
            logits = decode_step(model, cache, tok)
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq)[0][:, -1]
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t_total = time.perf_counter() - t0
    out = torch.stack(new, dim=1) if new else prompt.new_zeros(B, 0)
    steps = max(len(new) - 1, 0)  # forwards after the prompt's
    stats = {"prompt_tokens": prompt.shape[1], "new_tokens": len(new), "batch": B, "cached": use_cache,
             "prefill_s": round(t_prefill, 4), "total_s": round(t_total, 4),
             "tokens_per_s": round(B * steps / (t_total - t_prefill), 2) if steps and t_total > t_prefill else None}
    return out, stats


def _tokenizer(cfg, manifest_arg: Optional[str], checkpoint: Path):
    from .data import build_tokenizer, load_manifest
    if manifest_arg:
        return build_tokenizer(load_manifest(manifest_arg))
    path = cfg.data.manifest
    if not path:
        raise ConfigError("the run config has no data.manifest: pass --manifest (the manifest the model was trained "
                          "on, for its tokenizer)")
    from .data.remote import is_url, options_from_config
    if is_url(path):  # trained from a URL: read it as the run did (its storage options)
        return build_tokenizer(load_manifest(path, options_from_config(cfg)))
    for p in [Path(path)] if Path(path).is_absolute() else [Path(path), checkpoint / path]:
        if p.exists() or p.with_name(p.name + "-manifest.json").exists():
            return build_tokenizer(load_manifest(p))
    raise DataError(f"no manifest at {path} (the run config's data.manifest): pass --manifest, the manifest the "
                    f"model was trained on")


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="run directory or model.safetensors")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-file", type=Path, help="prompt text (read as bytes; default: empty prompt)")
    src.add_argument("--prompt", help="prompt text given inline")
    p.add_argument("--max-new-tokens", type=bounded(int, 0, MAX_TOKENS), default=256)
    p.add_argument("--temperature", type=bounded(float, 0, 1e6), default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=bounded(int, 0, MODEL_LIMITS["vocab_size"]), default=0,
                   help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=bounded(float, 0, 1, above=True), default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 64 - 1), default=0)
    p.add_argument("--num-samples", type=bounded(int, 1, 2 ** 16), default=1,
                   help="independent samples of the same prompt (one batch)")
    p.add_argument("--manifest", default=None, help="default: the run config's data.manifest")
    p.add_argument("--device", type=torch_device, default="cpu")
    p.add_argument("--no-cache", action="store_true", help="re-run the model on the prefix for every token")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--echo-prompt", action="store_true", help="print the prompt before the completion")
    p.add_argument("--json", action="store_true", help="print one JSON object (samples, ids, stats) instead of text")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = p.parse_args(argv)

    from .export import load_model_for_inference
    model, cfg = load_model_for_inference(args.checkpoint, args.device)
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    tok = _tokenizer(cfg, args.manifest, run_dir)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer of {args.manifest or cfg.data.manifest} has {tok.vocab_size} ids, the model "
                        f"only {cfg.model.vocab_size}: pass --manifest, the manifest the model was trained on")
    if args.prompt_file and not args.prompt_file.is_file():
        raise DataError(f"--prompt-file {args.prompt_file} does not exist (or is not a file)")
    text = args.prompt_file.read_bytes() if args.prompt_file else (args.prompt or "").encode("utf-8")
    ids = [int(i) for i in tok.encode(text)] if text else []
    if not ids:
        ids = [tok.eod_id]
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out, stats = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                          args.top_p if args.top_p < 1.0 else None, gen,
                          eod_id=None if args.ignore_eod else tok.eod_id, use_cache=not args.no_cache)
    samples = []
    for row in out.tolist():
        if not args.ignore_eod and tok.eod_id in row:
            row = row[: row.index(tok.eod_id)]
        samples.append(tok.decode(row))
    prefix = tok.decode(ids) if args.echo_prompt and ids != [tok.eod_id] else ""
    if args.json:
        print(json.dumps({"samples": samples, "ids": out.tolist(), "stats": stats}))
    else:
        for i, s in enumerate(samples):
            if args.num_samples > 1:
                sys.stdout.write(f"{'' if i == 0 else chr(10)}=== sample {i} ===\n")
            sys.stdout.write(prefix + s + "\n")
        sys.stdout.flush()
    print(json.dumps(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
