#!/usr/bin/env python
"""The main job end to end on CPU, in small (what `make demo` runs, about 3 minutes on 2 cores):

1. corpus: a real text corpus already on this machine (this Python installation's sources) in the PG-19 layout,
2. shards: webdataset tar shards of 8192-token samples (tools/preprocess.py, bytes tokenizer),
3. train: configs/demo.yaml on 2 processes as one sequence-parallel group (DP1 x SP2: each rank holds 4096 tokens
   of every sample, the routing clusters' blocks are split between the two) under DeepSpeed ZeRO-2 with
   activation checkpointing (torchrun, gloo),
4. evaluate: bits per byte of the exported model on the validation split (python -m rtdist.evaluate),
5. generate: a continuation of a validation prompt (python -m rtdist.generate),
6. plot: the loss curves as a PNG (tools/plot_runs.py),
and print which of these happened and where their files are. Every command it runs is printed first.

``--data-url URL`` (``make demo DATA_URL=URL``) trains from shards already at a URL instead (a manifest at s3://,
gs://, http(s)://, with 8192-token samples as step 2 writes them): steps 1-2 are not run, the S3 endpoint and
credentials come from AWS_* or ``--set data.storage_options...``-style settings in the config, and the prompt is the
start of the first validation sample. ``--data-cache-dir DIR`` reads it through a node cache there
(data.cache_dir).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Stages:
    """What happened, stage by stage, for the closing summary."""

    def __init__(self):
        self.rows: list[tuple[str, str, float, str]] = []

    def add(self, name: str, status: str, seconds: float, where: str = "") -> None:
        self.rows.append((name, status, seconds, where))

    def skip(self, names: list[str], why: str) -> None:
        for name in names:
            self.add(name, f"not run ({why})", 0.0)

    @property
    def ok(self) -> bool:
        return all(status in ("ok", "given") for _, status, _, _ in self.rows)

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        for name, status, seconds, where in self.rows:
            print(f"  {name:<{width}}  {status:<6} {seconds:5.0f} s  {where}")


def run(cmd: list[str], env: dict, capture: bool = False) -> subprocess.CompletedProcess:
    print("  $ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, text=True,
                          capture_output=capture)


def validation_prompt(corpus: Path, max_bytes: int = 320) -> bytes:
    """Whole lines of the first validation book, about ``max_bytes``, from the first function definition past its
    middle (the middle itself where it has none): text the model has not trained on."""
    book = sorted((corpus / "validation").glob("*.txt"))[0].read_bytes()
    start = book.find(b"\ndef ", len(book) // 2) + 1 or book.find(b"\n", len(book) // 2) + 1
    end = book.rfind(b"\n", start, start + max_bytes) + 1
    return book[start:end if end > start else start + max_bytes]


def url_prompt(url: str, max_tokens: int = 320) -> bytes:
    """The start of the first validation sample of the manifest at ``url``, as text."""
    from rtdist.data import load_manifest
    from rtdist.data.shards import read_sample
    from rtdist.data.tokenizers import build_tokenizer
    manifest = load_manifest(url)
    _, _, tokens = read_sample(manifest, "validation", 0)
    return build_tokenizer(manifest).decode(tokens[:max_tokens].tolist()).encode("utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--corpus-mb", type=float, default=8, help="size of the local corpus (MB)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=None, help="train.train_iters (default: the config's)")
    p.add_argument("--new-tokens", type=int, default=300, help="tokens to generate after the prompt")
    p.add_argument("--data-url", help="train from this manifest URL (s3://, gs://, http(s)://) instead of steps 1-2")
    p.add_argument("--data-cache-dir", help="--data-url: the node cache folder (data.cache_dir; unset: range reads)")
    args = p.parse_args()
    from rtdist.config import load_config
    from rtdist.data import build_demo_corpus

    t_start = time.time()
    out = args.out.resolve()
    run_dir = out / "run"
    overrides = [] if args.steps is None else [f"train.train_iters={args.steps}"]
    if args.data_cache_dir:
        if not args.data_url:
            p.error("--data-cache-dir goes with --data-url (local shards need no cache)")
        overrides.append(f"data.cache_dir={Path(args.data_cache_dir).resolve()}")
    cfg = load_config(args.config, overrides)
    sp, t = cfg.parallel.sequence_parallel_size, cfg.train
    nproc = sp  # one data-parallel replica: the demo shows one sequence-parallel group
    threads = max(1, (os.cpu_count() or 2) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    stages = Stages()
    if args.data_url and "://" not in args.data_url:
        p.error(f"--data-url {args.data_url}: give a manifest URL (s3://, gs://, http(s)://)")
    if (run_dir / "config.yaml").is_file():  # a previous demo's run: start afresh rather than append to it
        shutil.rmtree(run_dir)

    if args.data_url:
        print(f"[1-2/6] corpus and shards: not made here; training reads {args.data_url}", flush=True)
        for name in ("corpus", "shards"):
            stages.add(name, "given", 0.0, args.data_url)
        manifest = args.data_url
    else:
        print(f"[1/6] corpus: local Python sources in the PG-19 layout -> {out / 'corpus'}", flush=True)
        t0 = time.time()
        corpus = build_demo_corpus(out / "corpus", max_bytes=int(args.corpus_mb * 2 ** 20))
        print(f"      {corpus['bytes'] / 2 ** 20:.1f} MB in {corpus['files']} files, books per split "
              f"{corpus['books']}")
        stages.add("corpus", "ok", time.time() - t0, str(out / "corpus"))

        print(f"[2/6] shards: {t.seq_length}-token samples, bytes tokenizer", flush=True)
        t0 = time.time()
        prefix = out / "shards" / "demo"
        manifest = Path(f"{prefix}-manifest.json")
        r = run([sys.executable, "tools/preprocess.py", "--input", out / "corpus", "--output-prefix", prefix,
                 "--seq-length", t.seq_length, "--workers", 2, "--overwrite", "--no-progress"], env)
        if r.returncode != 0:
            stages.add("shards", f"FAILED (exit {r.returncode})", time.time() - t0)
            stages.skip(["train", "evaluate", "generate", "plot"], "no shards")
            return finish(stages, t_start)
        stages.add("shards", "ok", time.time() - t0, str(manifest))

    print(f"[3/6] train: {cfg.model.d_model}-wide {cfg.model.n_layers}-layer Routing Transformer, {t.train_iters} "
          f"steps of {t.train_micro_batch_size_per_gpu} x {t.seq_length} tokens; {nproc} processes = DP1 x SP{sp} "
          f"({t.seq_length // sp} tokens per rank, the {cfg.model.num_clusters} clusters' blocks split between "
          f"them), DeepSpeed ZeRO-{t.zero_stage}, activation checkpointing "
          f"{'on' if t.checkpoint_activations else 'off'}", flush=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rtdist.train", "--config", args.config, "--run-dir", run_dir, "--progress",
           "--set", f"data.manifest={manifest}", *[a for o in overrides for a in ("--set", o)]]
    r = run(cmd, env)
    if r.returncode != 0 or not (run_dir / "model.safetensors").is_file():
        stages.add("train", f"FAILED (exit {r.returncode})", time.time() - t0, str(run_dir))
        stages.skip(["evaluate", "generate"], "no trained model")
        plot(run_dir, out, env, stages)
        return finish(stages, t_start)
    stages.add("train", "ok", time.time() - t0, str(run_dir / "model.safetensors"))

    print("[4/6] evaluate the exported model on the validation split", flush=True)
    t0 = time.time()
    r = run([sys.executable, "-m", "rtdist.evaluate", "--checkpoint", run_dir, "--split", "validation",
             "--max-batches", 8], env, capture=True)
    evaluation = None
    if r.returncode == 0:
        evaluation = json.loads(r.stdout[r.stdout.index("{"):])
        (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1))
        print(f"      {evaluation['bits_per_byte']:.3f} bits/byte, loss {evaluation['loss']:.3f} nats/token over "
              f"{evaluation['tokens']:,} validation tokens")
        stages.add("evaluate", "ok", time.time() - t0, str(out / "evaluation.json"))
    else:
        print(r.stderr[-3000:], file=sys.stderr)
        stages.add("evaluate", f"FAILED (exit {r.returncode})", time.time() - t0)

    print("[5/6] generate: continue a validation prompt (cached decoding, top-k sampling)", flush=True)
    t0 = time.time()
    prompt_file = out / "prompt.txt"
    prompt_file.write_bytes(validation_prompt(out / "corpus") if not args.data_url else url_prompt(args.data_url))
    r = run([sys.executable, "-m", "rtdist.generate", "--checkpoint", run_dir, "--prompt-file", prompt_file,
             "--max-new-tokens", args.new_tokens, "--temperature", 0.9, "--top-k", 40, "--seed", 0], env,
            capture=True)
    if r.returncode == 0:
        (out / "generated.txt").write_text(r.stdout)
        stats = json.loads(r.stderr.strip().splitlines()[-1])
        prompt = prompt_file.read_text(errors="replace").rstrip("\n")
        print(f"---- prompt ({stats['prompt_tokens']} tokens of {prompt_file}) ----\n{prompt}\n"
              f"---- generated ({stats['new_tokens']} tokens, {stats['tokens_per_s']} tokens/s) ----\n"
              f"{r.stdout.rstrip()}\n" + "-" * 40)
        stages.add("generate", "ok", time.time() - t0, str(out / "generated.txt"))
    else:
        print(r.stderr[-3000:], file=sys.stderr)
        stages.add("generate", f"FAILED (exit {r.returncode})", time.time() - t0)

    plot(run_dir, out, env, stages)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"\n  train loss  {lines[0]['loss']:.3f} (step {lines[0]['step']}) -> {lines[-1]['loss']:.3f} "
          f"(step {lines[-1]['step']})")
    if evaluation:
        print(f"  validation  {evaluation['bits_per_byte']:.3f} bits/byte")
    print(f"  checkpoint  {run_dir / 'checkpoints'} (latest: {(run_dir / 'checkpoints' / 'latest').read_text()})")
    if (run_dir / "tensorboard").is_dir():
        print(f"  watch       tensorboard --logdir {run_dir / 'tensorboard'}")
    return finish(stages, t_start)


def plot(run_dir: Path, out: Path, env: dict, stages: Stages) -> None:
    print("[6/6] plot the loss curves", flush=True)
    t0 = time.time()
    if not (run_dir / "metrics.jsonl").is_file():
        stages.add("plot", "not run (no metrics)", 0.0)
        return
    r = run([sys.executable, "tools/plot_runs.py", run_dir, "--out", out / "loss.png"], env)
    stages.add("plot", "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})", time.time() - t0,
               str(out / "loss.png") if r.returncode == 0 else "")


def finish(stages: Stages, t_start: float) -> int:
    print(f"\nrtdist demo {'finished' if stages.ok else 'did not finish'} in {time.time() - t_start:.0f} s:")
    stages.print()
    return 0 if stages.ok else 1


if __name__ == "__main__":
    sys.exit(main())
