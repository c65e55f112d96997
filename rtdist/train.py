"""Training entry point.

    python -m rtdist.train --config configs/tiny.yaml [--config more.yaml] [--set train.lr=1e-3 ...] \\
        --run-dir runs/x [--resume auto | --overwrite]
    python -m rtdist.train --help-config        # every config key: type, default, meaning

Started unchanged by ``torchrun -m rtdist.train``, ``deepspeed --module rtdist.train``, ``srun``/``mpirun`` or
``launch/launch.py``. The run directory holds the resolved ``config.yaml``, ``metrics.jsonl`` (one JSON object per
logged step), ``checkpoints/`` (DeepSpeed layout) and, at the end, ``model.safetensors`` (fp32, for inference).
A run directory that holds an earlier run is continued with ``--resume auto`` or started over with ``--overwrite``;
with neither, training refuses to start there.

Where things live: the resume and save policy in :class:`rtdist.checkpoint.CheckpointManager`, the metrics in
:class:`rtdist.monitor.Monitor`, the layout in :class:`rtdist.parallel.ParallelDims`, parallelism in
:func:`rtdist.parallel.parallelize`; :func:`_train` composes them.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from . import dist as rdist
from .checkpoint import CheckpointManager, TrainState, complete_steps, fault_point
from .config import Config, ConfigError, describe_keys, load_config
from .data import ShardLoader
from .data.prefetch import DevicePrefetcher
from .data.remote import options_from_config
from .data.shards import CorruptShardError, corrupt_shards_message, manifest_shards, shard_problems
from .errors import (ArgumentParser, PeerTimeoutError, RtdistError, TrainingError, UsageError, cli_main,
                     is_peer_failure)
from .evaluate import evaluate, with_text_figures
from .export import export_safetensors
from .fileio import atomic_write_text
from .launcher import nccl_env
from .model import RoutingTransformerLM, count_parameters
from .monitor import Monitor
from .parallel import ParallelDims, check_engine, parallelize
from .provenance import record_segment
from .run_dir import RunDir, RunLock
from .watchdog import FailureNotes, StopRequest, Watchdog


class _PrintConfigKeys(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(describe_keys()))
        parser.exit()


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="YAML file; repeat to merge, later wins")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint, if any), or a checkpoint; "
                   "a --run-dir that holds an earlier run needs it (or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 in a --run-dir that holds an earlier run, deleting its checkpoints, "
                        "metrics, result and export first")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar on rank 0 (default: when stderr is a terminal)")
    p.add_argument("--help-config", action=_PrintConfigKeys,
                   help="print every config key with its type, default and meaning, and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)  # the per-rank and per-step offsets may pass numpy's largest seed
    torch.manual_seed(seed)


def build_loader(cfg: Config, split: str, dp_rank: int, dp_size: int, train: bool) -> ShardLoader:
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set: preprocess a corpus first (python tools/preprocess.py "
                          "--input DIR --output-prefix data/x) and pass --set data.manifest=data/x-manifest.json")
    loader = ShardLoader(cfg.data.manifest, split, cfg.train.train_micro_batch_size_per_gpu, dp_rank, dp_size,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle=train,
                         shuffle_buffer=cfg.data.shuffle_buffer, policy="drop" if train else "wrap",
                         skip_corrupt=cfg.data.skip_corrupt, pin_memory=torch.cuda.is_available(),
                         remote=options_from_config(cfg))
    if loader.seq_length < cfg.train.seq_length:
        raise ConfigError(f"train.seq_length ({cfg.train.seq_length}) exceeds the shards' seq_length "
                          f"({loader.seq_length}) in {cfg.data.manifest}: preprocess with --seq-length "
                          f">= {cfg.train.seq_length} or lower train.seq_length")
    if loader.seq_length > cfg.train.seq_length and not cfg.data.crop_samples:
        n, S = cfg.train.seq_length, loader.seq_length
        raise ConfigError(f"the samples of {cfg.data.manifest} hold {S} tokens and train.seq_length is {n}: training "
                          f"would read the first {n + 1} of each and skip {1 - (n + 1) / (S + 1):.0%} of the corpus. "
                          f"Preprocess with --seq-length {n} (tools/preprocess.py), or set train.seq_length: {S}, or "
                          f"set data.crop_samples: true to train on the first tokens of each sample")
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({loader.vocab_size}) in {cfg.data.manifest}")
    return loader


def check_data(cfg: Config, manifest: dict, log: Callable) -> None:
    """Check the shards training will read before step 1 (``data.verify``), each rank a slice of them; every rank
    raises the same error naming every bad shard (or, with ``data.skip_corrupt``, logs one warning)."""
    mode = cfg.data.verify
    if mode == "off":
        return
    t0 = time.perf_counter()
    shards = manifest_shards(manifest, [cfg.data.train_split] + ([cfg.data.eval_split] if cfg.train.eval_interval
                                                                 else []))
    mine = shard_problems(manifest, mode=mode, shards=shards[rdist.rank()::rdist.world_size()])
    bad = [line for part in rdist.all_gather_object(mine) for line in part]
    if bad:
        what = f"data.verify: {corrupt_shards_message(manifest, bad, len(shards), mode)}"
        if not cfg.data.skip_corrupt:
            raise CorruptShardError(f"{what}. Re-run tools/preprocess.py with the same flags to rewrite them, or set "
                                    f"data.skip_corrupt: true to train without them")
        log(f"warning: {what} (data.skip_corrupt: true: their samples are replaced by others)")
    log(f"data.verify {mode}: {len(shards)} shards checked in {time.perf_counter() - t0:.2f} s", flush=True)


def train_step(engine, model, micro_batches, reduce_fn=None, world_size: int = 1, positions=None,
               loss_masks=None) -> Optional[float]:
    """One optimizer step over the micro-batches ([mb, n + 1] token tensors of this rank; under sequence
    parallelism this rank's slice, at absolute ``positions``); returns the loss averaged over micro-batches and
    ranks, or None when a non-finite loss on any rank dropped the step. Every rank holds as many tokens as every
    other, so the mean of the ranks' means is the mean over all tokens, and the engines' gradient average over
    the world is the gradient of that global mean. ``loss_masks``: per micro-batch, [mb, n] bool marking the
    targets the loss scores (default every target).

    The host waits for the device once per micro-batch and nowhere else (:func:`agree_on_loss`: one all-reduce of
    a device vector, one read), so with one micro-batch per step, as long sequences train, once per step. The
    decision comes before each backward rather than once at the step's end because a non-finite loss must never
    reach the engines' gradient buffers: ZeRO reduces into its partitions at every micro-batch, and no engine API
    clears them for a step that is dropped."""
    total = 0.0
    for i, batch in enumerate(micro_batches):
        with engine.autocast():
            loss, aux = engine.model(batch[:, :-1], positions=positions, targets=batch[:, 1:],
                                     loss_mask=loss_masks[i] if loss_masks is not None else None)
        nonfinite, loss_sum = agree_on_loss(loss)
        if nonfinite:  # every rank agrees, so none waits alone in a gradient collective
            drop_step(engine, model)
            return None
        engine.backward(loss + aux)
        engine.step()
        total += loss_sum
    # After the optimizer step, statistics summed over every replica; re-seeding (if on) uses rank 0's candidates.
    model.update_kmeans(reduce_fn, broadcast_fn=lambda t: rdist.broadcast_tensors([t], src=0))
    return total / (len(micro_batches) * world_size)


def agree_on_loss(loss: torch.Tensor) -> tuple[bool, float]:
    """(whether any rank's loss is non-finite, the sum of the ranks' losses): one all-reduce of a vector on the
    loss's device (NCCL on a GPU, no host copy before it) and one read of the result."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float64), loss.detach().to(torch.float64)])
    nonfinite, loss_sum = rdist.all_reduce_sum(flags).tolist()
    return nonfinite > 0, loss_sum


def drop_step(engine, model) -> None:
    """Forget a step's gradients and k-means statistics (a non-finite loss on some rank)."""
    engine.discard_step()
    model.discard_kmeans_stats()


def init_kmeans_from_first_batch(model, cfg: Config, dims: ParallelDims, device) -> None:
    """Seed the centroids from the first training micro-batch (read by a loader of its own, so the training
    stream is unchanged) on the whole sequence, before sequence parallelism splits it; rank 0's centroids then go
    to every rank, so all replicas start from the same ones."""
    first = next(iter(build_loader(cfg, cfg.data.train_split, dims.dp_rank, dims.dp, train=True)))
    model.init_kmeans_from_data(first[:, : cfg.train.seq_length].to(device),
                                generator=torch.Generator().manual_seed(cfg.train.seed))
    rdist.broadcast_tensors(model.kmeans_state(), src=0)


def forever(loader):
    while True:
        yield from loader


def train(cfg: Config, run_dir: Path, resume: Optional[str] = None, progress: Optional[bool] = None,
          overwrite: bool = False) -> dict:
    """Train as ``cfg`` says, in ``run_dir``. Bounded everywhere: a stuck peer or a stop signal ends every rank
    within about ``train.dist_timeout_s`` (:mod:`rtdist.watchdog`). A ``run_dir`` that holds an earlier run is
    refused unless ``resume`` continues it or ``overwrite`` deletes it (:meth:`RunDir.refusal`)."""
    t = cfg.train
    check_engine(t.engine, t.zero_stage)
    info = rdist.discover()  # before the handlers: a launch variable it refuses must not leave them installed
    stop = StopRequest()
    watchdog = Watchdog(t.dist_timeout_s, info.rank, info.world_size, (info.master_addr, info.master_port)).start()
    lock = None
    try:
        for k, v in nccl_env(run_dir).items():  # the user's own settings win
            os.environ.setdefault(k, v)
        rdist.init(timeout_s=t.dist_timeout_s, info=info, startup_timeout_s=t.startup_timeout_s)
        rd = RunDir(run_dir)
        lock = RunLock(rd)
        busy = None
        refusal = rd.refusal(resume, overwrite) if info.is_main else None  # before anything is written
        segment = f"{os.getpid()}-{time.time_ns()}" if info.is_main else None  # names this segment's failure notes
        if info.is_main and refusal is None:
            rd.create()
            busy = lock.acquire()
            if busy is None and overwrite and (removed := rd.clear()):
                print(f"--overwrite: deleted {', '.join(removed)} of the earlier run in {run_dir}; starting from "
                      f"step 0", flush=True)
        refusal, busy, segment = rdist.broadcast_object((refusal, busy, segment))
        if refusal:
            raise UsageError(refusal)
        if busy:
            raise RtdistError(f"--run-dir {run_dir} is in use by another job ({busy}): wait for it to finish, or "
                              f"use another --run-dir")
        if info.world_size > 1:
            watchdog.notes = FailureNotes(rd.failures, info.rank, info.world_size, segment)
        return _train(cfg, rd, resume, progress, info, stop, watchdog)
    except Exception as e:
        if is_peer_failure(e):
            raise PeerTimeoutError(f"rank {info.rank}: a collective failed ({str(e).splitlines()[0][:160]})"
                                   f"{watchdog.peers_suffix()}") from e
        if watchdog.notes is not None:  # before this rank leaves the group: the peers' lines will say why
            watchdog.notes.record(e)
        raise
    finally:
        if lock is not None:
            lock.release()
        watchdog.close()
        stop.restore()


def _train(cfg: Config, rd: RunDir, resume: Optional[str], progress: Optional[bool], info, stop: StopRequest,
           watchdog: Watchdog) -> dict:
    """The recipe: build -> restore weights -> parallelize -> restore state -> loop (step, log, eval, save, stop)
    -> final save, export and evaluation."""
    t, startup = cfg.train, cfg.train.startup_timeout_s  # startup: op builds, compile, conversions, first step
    dims = ParallelDims(cfg.parallel.sequence_parallel_size, info.world_size, info.rank)
    if resume in (None, "", "none"):  # early; a resume may first derive the accumulation from its checkpoint
        dims.check_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps, t.train_batch_size)
    device = rdist.local_device(info)
    dims.build_mesh(device.type)
    log = print if info.is_main else (lambda *a, **k: None)

    seed_all(t.seed)  # same initial weights and centroids on every rank
    model = RoutingTransformerLM(cfg.model).to(device)
    loader = build_loader(cfg, cfg.data.train_split, dims.dp_rank, dims.dp, train=True)
    with watchdog.phase("data check", 0, startup):
        check_data(cfg, loader.manifest, log)
    ckpts = CheckpointManager(rd.checkpoints, dims, keep_last=t.keep_last, log=log)
    with watchdog.phase("resume", 0, startup):
        cfg = ckpts.find(resume, cfg)
        t = cfg.train
        ckpts.restore_weights(model)
    dims.check_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps, t.train_batch_size)
    if t.kmeans_init == "data" and not ckpts.resuming:
        init_kmeans_from_first_batch(model, cfg, dims, device)
    engine = parallelize(model, dims, cfg)

    state = TrainState()
    with watchdog.phase("resume", 0, startup):
        if not ckpts.restore_state(engine, loader, state):  # a fresh run, or streams that do not map here
            seed_all(t.seed + 1000 * info.rank + state.step)  # after the shared init: dropout differs per rank
    if info.is_main:  # only now: a resume that fails leaves the run's config as it was
        atomic_write_text(rd.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    record_segment(rd.run_info, dims.describe(info.source), ckpts.source, state.step)
    batches = DevicePrefetcher(loader, forever(loader), device, t.gradient_accumulation_steps,
                               transform=lambda b: dims.local_slice(b[:, : t.seq_length + 1]))
    evaluator = Evaluator(cfg, dims, engine, device, loader.manifest, stop, watchdog) if t.eval_interval else None
    monitor = Monitor.for_training(rd.path, cfg, info.world_size, info.is_main, state, device, progress, log)
    log(f"rtdist: {count_parameters(model) / 1e6:.2f}M parameters, world {info.world_size} ({info.source}), engine "
        f"{engine.name}, zero {t.zero_stage}, {len(loader)} batches/epoch/rank", flush=True)
    tokens_per_step = dims.global_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps) \
        * t.seq_length
    reduce_fn = rdist.all_reduce_sum if info.world_size > 1 else None
    status, first_step = "completed", state.step + 1
    model.train()
    with monitor:
        while state.step < t.train_iters:
            with watchdog.phase("step", state.step + 1, startup if state.step + 1 == first_step else None):
                parts = next(batches)
                loss = train_step(engine, model, [p[0] for p in parts], reduce_fn, info.world_size, parts[0][1])
            if state.step + 1 == first_step:
                rdist.steady(t.dist_timeout_s)
            if loss is None:
                state.dropped()
                check_nonfinite_streak(state, t.max_nonfinite_steps, rd)
                continue
            fault_point("step", state.step + 1)
            state.stepped(tokens_per_step)
            row = monitor.step_row(state, loss, engine, model, loader.epoch)
            if evaluator is not None and evaluator.due(state.step):
                row.update({f"eval_{k}": v for k, v in (evaluator.run(state.step) or {}).items()})
            monitor.log(state.step, row)
            if ckpts.due(state.step):
                with watchdog.phase("save", state.step):
                    ckpts.save(engine, state, batches.state_dict())
            if stop.agreed(rdist.all_reduce_max):
                status = f"stopped by {stop.received or 'a signal on another rank'}"
                break
    with watchdog.phase("save", state.step):
        step_dir = ckpts.save(engine, state, batches.state_dict())
    return finish(status, state, step_dir, engine, evaluator, monitor.last, rd, info, stop, watchdog)


def check_nonfinite_streak(state: TrainState, limit: int, rd: RunDir) -> None:
    """Stop the run after ``limit`` dropped steps in a row."""
    if state.nonfinite_streak >= limit:
        have = complete_steps(rd.checkpoints)
        raise TrainingError(f"{state.nonfinite_streak} steps in a row had a non-finite loss (last at step "
                            f"{state.step + 1}); lower train.lr or check the data. Last complete checkpoint: "
                            f"{f'global_step{have[-1]}' if have else 'none'}")


class Evaluator:
    """Periodic and final evaluation on ``data.eval_split``, bounded by the watchdog (the first one gets the
    start-up bound) and abandoned, on every rank at once, by a stop signal.

    Every evaluation scores the same tokens: the first ``eval_iters x micro batch x data-parallel size`` windows of
    the split's fixed evaluation order (:mod:`rtdist.data.evalset`), split between the ranks with padding, never
    repeating one; ``python -m rtdist.evaluate --max-batches eval_iters x dp --batch-size micro`` scores them too."""

    def __init__(self, cfg: Config, dims: ParallelDims, engine, device, manifest: dict, stop: StopRequest,
                 watchdog: Watchdog):
        from .data.evalset import EvalWindows
        self.cfg, self.dims, self.engine, self.device, self.stop, self.watchdog = cfg, dims, engine, device, stop, \
            watchdog
        t = cfg.train
        self.windows = EvalWindows(manifest, cfg.data.eval_split, t.seq_length, None,
                                   t.train_micro_batch_size_per_gpu, dims.dp_rank, dims.dp,
                                   max_windows=t.eval_iters * t.train_micro_batch_size_per_gpu * dims.dp)
        self.manifest = manifest
        self.runs = 0

    def due(self, step: int) -> bool:
        return step % self.cfg.train.eval_interval == 0

    def run(self, step: int) -> Optional[dict]:
        """The periodic eval metrics (numbers only, for metrics.jsonl), or None when a stop signal abandoned it."""
        m = self.final(step)
        if m is not None:
            m.pop("loss_by_position")  # a list; result.json's final evaluation keeps it
        return m

    def final(self, step: int) -> Optional[dict]:
        """The eval metrics with the loss by position, or None when a stop signal abandoned the evaluation."""
        t = self.cfg.train
        self.runs += 1
        with self.watchdog.phase("eval", step, t.startup_timeout_s if self.runs == 1 else None):
            m = evaluate(self.engine.model, self.windows, autocast=self.engine.autocast(), device=str(self.device),
                         dims=self.dims if self.dims.sp_enabled else None,
                         should_stop=lambda: self.stop.agreed(rdist.all_reduce_max))
        return with_text_figures(m, self.manifest, self.cfg.data.eval_split) if m is not None else None


def finish(status: str, state: TrainState, step_dir: Path, engine, evaluator: Optional[Evaluator], last: dict,
           rd: RunDir, info, stop: StopRequest, watchdog: Watchdog) -> dict:
    """After the last save: the export and the final evaluation of a completed run, and ``result.json``."""
    result = {"status": status, "step": state.step, "run_dir": str(rd.path), "checkpoint": str(step_dir),
              "last": last, "skipped_steps": state.skipped_steps}
    if status == "completed":
        with watchdog.phase("export", state.step):
            weights = engine.consolidated_state_dict(step_dir)
            if info.is_main:
                export_safetensors(weights, rd.export, {"step": state.step})
                result["export"] = str(rd.export)
        if evaluator is not None:
            ev = evaluator.final(state.step)
            if ev is None:  # the checkpoint and the export are complete: a resubmission only evaluates
                result["status"] = f"stopped by {stop.received or 'a signal on another rank'} during the final evaluation"
            else:
                result["eval"] = ev
    if info.is_main:
        atomic_write_text(rd.result, json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        info = rdist.discover()
        prefix = f"[rank {info.rank}] " if info.world_size > 1 else ""
    except RtdistError:
        prefix = ""  # cli_main reports the discovery error itself
    try:
        return cli_main(_main, argv, prefix=prefix)
    finally:
        rdist.shutdown()


def _main(argv) -> int:
    args = parse_args(argv)
    if args.overwrite and args.resume not in (None, "", "none"):
        raise UsageError(f"--overwrite starts over from step 0 and --resume {args.resume} continues a checkpoint: "
                         f"give only one")
    cfg = load_config(args.config, args.set)
    r = train(cfg, args.run_dir, args.resume, args.progress, args.overwrite)
    if rdist.rank() == 0:
        ev = r.get("eval")
        loss = r["last"].get("loss")
        print(f"\n{r['status']} at step {r['step']}: " + (f"loss {loss}" if loss is not None else "nothing left to train")
              + (f", eval loss {ev['loss']:.4f} ({ev.get('bits_per_byte', ev['bits_per_token']):.3f}"
                 f" bits/{'byte' if 'bits_per_byte' in ev else 'token'})" if ev else "")
              + f"\n  metrics:    {Path(r['run_dir']) / 'metrics.jsonl'}\n  checkpoint: {r['checkpoint']}"
              + (f"\n  model:      {r['export']}" if "export" in r else ""), flush=True)
    return 0


if __name__ == "__main__":
    # A rank killed by a crash in native code (SIGABRT from a C++ exception in a communication thread, SIGSEGV)
    # otherwise leaves only "exit status -6" in the launcher's line: print every thread's Python stack first.
    # (Here, not in main(): callers in-process may have an stderr without a file descriptor.)
    faulthandler.enable(all_threads=True)
    sys.exit(main())
