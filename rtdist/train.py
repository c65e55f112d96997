"""Training entry point.

    python -m rtdist.train --config configs/tiny.yaml [--config more.yaml] [--set train.lr=1e-3 ...] \\
        --run-dir runs/x [--resume auto | --overwrite]

Started unchanged by ``torchrun -m rtdist.train``, ``deepspeed --module rtdist.train``, ``srun``/``mpirun`` or
``launch/launch.py``. The run directory holds the resolved ``config.yaml``, ``metrics.jsonl`` (one JSON object per
logged step), ``checkpoints/`` (DeepSpeed layout) and, at the end, ``model.safetensors`` (fp32, for inference).
A run directory that holds an earlier run is continued with ``--resume auto`` or started over with ``--overwrite``;
with neither, training refuses to start there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import checkpoint as ckpt
from . import dist as rdist
from .config import Config, ConfigError, ModelConfig, build, load_config, resolved
from .data.prefetch import DevicePrefetcher
from .errors import (ArgumentParser, CheckpointError, PeerTimeoutError, RtdistError, TrainingError,
                     UsageError, cli_main, is_peer_failure)
from .evaluate import bytes_per_token, evaluate, with_bytes
from .export import export_safetensors
from .launcher import nccl_env
from .model import RoutingTransformerLM, count_parameters
from .monitor import KMeansWatch, Monitor
from .parallel import ParallelDims, check_engine, parallelize, reshard
from .run_dir import RunDir, RunLock
from .watchdog import StopRequest, Watchdog


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
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)  # the per-rank and per-step offsets may pass numpy's largest seed
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_loader(cfg: Config, split: str, dp_rank: int, dp_size: int, train: bool):
    from .data import ShardLoader
    from .data.remote import options_from_config
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
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({loader.vocab_size}) in {cfg.data.manifest}")
    return loader


def preflight_shards(cfg: Config, manifest: dict, splits: list[str], log) -> None:
    """Check the shards training will read before step 1 (``data.verify``), each rank a slice of them; every rank
    raises the same error naming every bad shard (or, with ``data.skip_corrupt``, logs one warning)."""
    from .data.shards import CorruptShardError, manifest_shards, shard_location, shard_problem
    if cfg.data.verify == "off":
        return
    t0 = time.perf_counter()
    shards = manifest_shards(manifest, splits)
    mine = [f"{shard_location(manifest, s)}: {problem}" for s in shards[rdist.rank()::rdist.world_size()]
            if (problem := shard_problem(manifest, s, full=cfg.data.verify == "full"))]
    bad = [line for part in rdist.all_gather_object(mine) for line in part]
    if bad:
        what = (f"{len(bad)} of {len(shards)} shards of {manifest['manifest_path']} failed the data.verify "
                f"{cfg.data.verify} check: {'; '.join(bad[:10])}{'; ...' if len(bad) > 10 else ''}")
        if not cfg.data.skip_corrupt:
            raise CorruptShardError(f"{what}. Re-run tools/preprocess.py with the same flags to rewrite them, or set "
                                    f"data.skip_corrupt: true to train without them")
        log(f"warning: {what} (data.skip_corrupt: true: their samples are replaced by others)")
    log(f"data.verify {cfg.data.verify}: {len(shards)} shards checked in {time.perf_counter() - t0:.2f} s", flush=True)


def train_step(engine, model, micro_batches, reduce_fn=None, world_size: int = 1, positions=None):
    """One optimizer step over the micro-batches ([mb, n + 1] token tensors of this rank; under sequence
    parallelism this rank's slice, at absolute ``positions``); returns the loss averaged over micro-batches and
    ranks, or None when a non-finite loss on any rank dropped the step. Every rank holds as many tokens as every
    other, so the mean of the ranks' means is the mean over all tokens, and the engines' gradient average over
    the world is the gradient of that global mean.

    The host waits for the device once per micro-batch and nowhere else (:func:`agree_on_loss`: one all-reduce of
    a device vector, one read), so with one micro-batch per step, as long sequences train, once per step. The
    decision comes before each backward rather than once at the step's end because a non-finite loss must never
    reach the engines' gradient buffers: ZeRO reduces into its partitions at every micro-batch, and no engine API
    clears them for a step that is dropped."""
    total = 0.0
    for batch in micro_batches:
        with engine.autocast():
            loss, aux = engine.model(batch[:, :-1], positions=positions, targets=batch[:, 1:])
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


MODEL_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "emb_dim", "attention_type",
                    "n_local_attn_heads", "routing_layers", "num_clusters", "shared_qk", "ff_mult", "ff_glu",
                    "pos_emb", "tie_embedding")


def check_resumable(step_dir: Path, cfg: Config, dims: ParallelDims, log=print) -> bool:
    """Refuse to resume a checkpoint written for another model shape (listing the keys that differ); on another
    layout keep its global batch (:func:`keep_global_batch`). Returns whether the engine can load the checkpoint's
    own files; if not, the resume reshards them (:mod:`rtdist.parallel.reshard`)."""
    marker = ckpt.read_marker(step_dir)
    saved = (marker.get("config") or {}).get("model")
    if saved:  # keys another rtdist version has and this one lacks are not shape keys here
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        saved = vars(resolved(build(ModelConfig, {k: v for k, v in saved.items() if k in known}, "model")))
        now = vars(cfg.model)
        diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in MODEL_SHAPE_KEYS
                if saved.get(k) != now.get(k)]
        if diff:
            raise CheckpointError(f"checkpoint {step_dir} was written for another model ({'; '.join(diff)}): resume "
                                  f"with the checkpoint's values, or train the new shape in a new --run-dir")
    keep_global_batch(step_dir, marker, cfg, dims, log)
    return reshard.files_fit(marker, cfg.train.engine, cfg.train.zero_stage, dims.world_size)


def keep_global_batch(step_dir: Path, marker: dict, cfg: Config, dims: ParallelDims, log=print) -> None:
    """A resumed run trains on the checkpoint's global batch (samples per optimizer step: data-parallel ranks x
    micro batch x accumulation) unless ``train.train_batch_size`` sets another: on another layout
    ``train.gradient_accumulation_steps`` is derived to keep it, so that a job resubmitted on fewer or more nodes
    trains as it would have. A global batch the new layout cannot split evenly is an error naming a layout that can."""
    t, saved = cfg.train, (marker.get("config") or {}).get("train") or {}
    if marker.get("dp_size") is None or "train_micro_batch_size_per_gpu" not in saved:
        return  # a checkpoint that does not say its layout: the configuration's batch stands
    target = t.train_batch_size or (saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
                                    * marker["dp_size"])
    micro, dp = t.train_micro_batch_size_per_gpu, dims.dp
    if micro * t.gradient_accumulation_steps * dp == target:
        return
    if target % (micro * dp):
        dps = [d for d in range(1, target + 1) if target % (micro * d) == 0]
        micros = [m for m in range(1, target // dp + 1) if (target // dp) % m == 0] if target % dp == 0 else []
        where = "train.train_batch_size" if t.train_batch_size else f"the global batch of {step_dir.name}"
        fixes = ([f"with micro batch {micro} it needs a data-parallel size in {dps} (world = that x {dims.sp})"]
                 if dps else []) + \
            ([f"on this world set train.train_micro_batch_size_per_gpu to one of {micros}"] if micros else []) + \
            [f"set train.train_batch_size to a multiple of {micro * dp} to train on another global batch"]
        raise ConfigError(f"resuming {step_dir}: {where} ({target} samples per step) is not divisible by "
                          f"train.train_micro_batch_size_per_gpu ({micro}) x data-parallel size ({dp} = world "
                          f"{dims.world_size} / parallel.sequence_parallel_size {dims.sp}); {', or '.join(fixes)}")
    accumulation = target // (micro * dp)
    log(f"resume: train.gradient_accumulation_steps {t.gradient_accumulation_steps} -> {accumulation} keeps the "
        f"global batch of {target} samples on {dp} data-parallel rank(s) x micro batch {micro}", flush=True)
    t.gradient_accumulation_steps = accumulation


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
        if info.is_main and refusal is None:
            rd.create()
            busy = lock.acquire()
            if busy is None and overwrite and (removed := rd.clear()):
                print(f"--overwrite: deleted {', '.join(removed)} of the earlier run in {run_dir}; starting from "
                      f"step 0", flush=True)
        refusal, busy = rdist.broadcast_object((refusal, busy))
        if refusal:
            raise UsageError(refusal)
        if busy:
            raise RtdistError(f"--run-dir {run_dir} is in use by another job ({busy}): wait for it to finish, or "
                              f"use another --run-dir")
        return _train(cfg, rd, resume, progress, info, stop, watchdog)
    except Exception as e:
        if is_peer_failure(e):
            raise PeerTimeoutError(f"rank {info.rank}: a collective failed ({str(e).splitlines()[0][:160]})"
                                   f"{watchdog.peers_suffix()}") from e
        raise
    finally:
        if lock is not None:
            lock.release()
        watchdog.close()
        stop.restore()


def _train(cfg: Config, rd: RunDir, resume: Optional[str], progress: Optional[bool], info, stop: StopRequest,
           watchdog: Watchdog) -> dict:
    t = cfg.train
    dims = ParallelDims(cfg.parallel.sequence_parallel_size, info.world_size, info.rank)
    if resume in (None, "", "none"):  # early; a resume may first derive the accumulation from its checkpoint
        dims.check_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps, t.train_batch_size)
    device = rdist.local_device(info)
    startup = t.startup_timeout_s  # op builds, compile, a conversion: the phases before the first step is done
    dims.build_mesh(device.type)
    log = print if info.is_main else (lambda *a, **k: None)

    seed_all(t.seed)  # same initial weights and centroids on every rank
    model = RoutingTransformerLM(cfg.model).to(device)
    loader = build_loader(cfg, cfg.data.train_split, dims.dp_rank, dims.dp, train=True)
    with watchdog.phase("data check", 0, startup):
        preflight_shards(cfg, loader.manifest, [cfg.data.train_split] + ([cfg.data.eval_split] if t.eval_interval
                                                                           else []), log)
    resume_from = ckpt.resolve_resume(rd.checkpoints, resume, log=log)
    portable, resume_s = None, 0.0  # the time spent reading the checkpoint (not building the engine)
    if resume_from is not None and not check_resumable(resume_from, cfg, dims, log):
        with watchdog.phase("resume", 0, startup):  # the weights go in before the engine takes its copies
            t0 = time.perf_counter()
            portable, scratch = reshard.prepare(resume_from, ckpt.read_marker(resume_from), model, log)
            reshard.load_weights(model, portable)
            resume_s = time.perf_counter() - t0
    dims.check_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps, t.train_batch_size)
    if t.kmeans_init == "data" and resume_from is None:
        init_kmeans_from_first_batch(model, cfg, dims, device)
    engine = parallelize(model, dims, cfg)

    step = 0
    skipped_total = 0
    tokens_seen, elapsed_before = 0, 0.0  # over all segments of the run (a resume continues them)
    if resume_from is not None:
        with watchdog.phase("resume", 0, startup):
            t0 = time.perf_counter()
            state = ckpt.load_rank_state(resume_from)
            if portable is None:
                engine.load(resume_from)
            else:
                engine.load_portable(portable)
                reshard.release(scratch)
            try:
                loader.load_state_dict(state["loader"])
            except ValueError as e:  # other data: a position in another epoch order
                raise CheckpointError(f"{resume_from}: its data position is a position in other data ({e}): "
                                      f"resume with the checkpoint's data.manifest, data.train_split and train.seed, "
                                      f"or train in a new --run-dir") from None
            step, skipped_total = state["step"], state.get("skipped_steps", 0)
            tokens_seen, elapsed_before = state.get("tokens", 0), state.get("elapsed_s", 0.0)
            if not ckpt.restore_rng(state.get("rng")):  # another world or GPU count: the streams do not map
                seed_all(t.seed + 1000 * info.rank + step)
            rdist.barrier()  # every rank has read the checkpoint before any rank may write the next one
            resume_s += time.perf_counter() - t0
        log(f"resumed from {resume_from} at step {step}{' (resharded)' if portable is not None else ''}, read in "
            f"{resume_s:.2f} s", flush=True)
    else:
        seed_all(t.seed + 1000 * info.rank)  # after the shared init: dropout streams differ per rank
    if info.is_main:  # only now: a resume that fails leaves the run's config as it was
        ckpt.atomic_write_text(rd.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    meta = {"world_size": info.world_size, "dp_size": dims.dp, "sp_size": dims.sp, "engine": t.engine,
            "zero_stage": t.zero_stage, "global_batch": t.train_micro_batch_size_per_gpu *
            t.gradient_accumulation_steps * dims.dp, "config": cfg.to_dict()}

    # Nothing trained since this checkpoint: saving it again keeps it, unless it was written in another engine's
    # format (resharded), which the export and the next resume on this shape would have to convert again.
    resumed_at = step if resume_from is not None and portable is None else None

    def save(at_step: int) -> Path:
        rank_state = {"loader": batches.state_dict(), "rng": ckpt.rng_state(), "step": at_step,
                      "skipped_steps": skipped_total, "tokens": tokens_seen, "elapsed_s": elapsed()}
        with watchdog.phase("save", at_step):
            return ckpt.save(engine, rd.checkpoints, at_step, rank_state,
                             {"step": at_step, **meta, "data": rank_state["loader"]}, log=log,
                             keep_existing=at_step == resumed_at)

    eval_loader = None
    bpt = None
    if t.eval_interval:
        eval_loader = build_loader(cfg, cfg.data.eval_split, dims.dp_rank, dims.dp, train=False)
        bpt = bytes_per_token(loader.manifest, cfg.data.eval_split)

    evals = 0

    def run_eval(at_step: int) -> Optional[dict]:
        """The eval metrics, or None when a stop signal abandoned the evaluation (on every rank at once)."""
        nonlocal evals
        evals += 1
        with watchdog.phase("eval", at_step, startup if evals == 1 else None):
            m = evaluate(engine.model, eval_loader, t.eval_iters, seq_length=t.seq_length, autocast=engine.autocast(),
                         device=str(device), dims=dims if dims.sp_enabled else None,
                         should_stop=lambda: stop.agreed(rdist.all_reduce_max))
        return with_bytes(m, bpt) if m is not None else None

    reduce_fn = rdist.all_reduce_sum if info.world_size > 1 else None
    log_file = open(rd.metrics, "a") if info.is_main else None
    monitor = Monitor(rd.path, cfg.deepspeed, enabled=info.is_main, start_step=step, warn=log)
    bar = None
    if info.is_main and (progress if progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=t.train_iters, initial=step, desc="train", unit="step", dynamic_ncols=True)
    log(f"rtdist: {count_parameters(model) / 1e6:.2f}M parameters, world {info.world_size} ({info.source}), engine "
        f"{engine.name}, zero {t.zero_stage}, {len(loader)} batches/epoch/rank", flush=True)

    kmeans_watch = KMeansWatch(log)
    tokens_per_step = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dims.dp * t.seq_length
    batches = DevicePrefetcher(loader, forever(loader), device, t.gradient_accumulation_steps,
                               transform=lambda b: dims.local_slice(b[:, : t.seq_length + 1]))
    first_step = step + 1
    nonfinite_in_a_row = 0
    last = {}
    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    model.train()
    t_log = time.perf_counter()
    steps_since_log = 0
    status = "completed"
    try:
        while step < t.train_iters:
            with watchdog.phase("step", step + 1, startup if step + 1 == first_step else None):
                parts = next(batches)
                micro, positions = [p[0] for p in parts], parts[0][1]
                loss_avg = train_step(engine, model, micro, reduce_fn, info.world_size, positions)
            if step + 1 == first_step:
                rdist.steady(t.dist_timeout_s)
            if loss_avg is None:
                skipped_total += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= t.max_nonfinite_steps:
                    have = ckpt.complete_steps(rd.checkpoints)
                    raise TrainingError(f"{nonfinite_in_a_row} steps in a row had a non-finite loss (last at step "
                                        f"{step + 1}); lower train.lr or check the data. Last complete checkpoint: "
                                        f"{f'global_step{have[-1]}' if have else 'none'}")
                continue
            ckpt.fault_point("step", step + 1)
            nonfinite_in_a_row = 0
            step += 1
            tokens_seen += tokens_per_step
            steps_since_log += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_avg:.3f}")
            if step % t.log_interval == 0 or step == t.train_iters:
                now = time.perf_counter()
                last = {"step": step, "loss": round(loss_avg, 6), "lr": engine.lr(),
                        "grad_norm": engine.grad_norm(), "tokens_per_s": round(tokens_per_step * steps_since_log /
                                                                                (now - t_log), 1),
                        "max_mem_mb": round(peak_memory_mb(), 1), "skipped_steps": skipped_total,
                        "epoch": loader.epoch, **kmeans_watch.metrics(model)}
                t_log, steps_since_log = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            else:
                last = {"step": step, "loss": round(loss_avg, 6)}
            last.update(time_s=round(elapsed(), 3), tokens=tokens_seen)
            if t.eval_interval and step % t.eval_interval == 0:
                last.update({f"eval_{k}": v for k, v in (run_eval(step) or {}).items()})
            if log_file:
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
            monitor.log(step, last)
            if t.save_interval and step % t.save_interval == 0 and step < t.train_iters:
                save(step)
            if stop.agreed(rdist.all_reduce_max):
                status = f"stopped by {stop.received or 'a signal on another rank'}"
                break
    finally:
        if bar is not None:
            bar.close()
        if log_file:
            log_file.close()
        monitor.close()

    step_dir = save(step)
    result = {"status": status, "step": step, "run_dir": str(rd.path), "checkpoint": str(step_dir),
              "last": last, "skipped_steps": skipped_total}
    if status == "completed":
        with watchdog.phase("export", step):
            state = engine.consolidated_state_dict(step_dir)
            if info.is_main:
                export_safetensors(state, rd.export, {"step": step})
                result["export"] = str(rd.export)
        if eval_loader is not None:
            ev = run_eval(step)
            if ev is None:  # the checkpoint and the export are complete: a resubmission only evaluates
                result["status"] = f"stopped by {stop.received or 'a signal on another rank'} during the final evaluation"
            else:
                result["eval"] = ev
    if info.is_main:
        ckpt.atomic_write_text(rd.result, json.dumps(result, indent=1))
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
    sys.exit(main())
