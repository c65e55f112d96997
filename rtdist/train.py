"""Training entry point.

    python -m rtdist.train --config configs/tiny.yaml [--config more.yaml] [--set train.lr=1e-3 ...] \\
        --run-dir runs/x [--resume auto]

Started unchanged by ``torchrun -m rtdist.train``, ``deepspeed --module rtdist.train``, ``srun``/``mpirun`` or
``launch/launch.py``. The run directory holds the resolved ``config.yaml``, ``metrics.jsonl`` (one JSON object per
logged step), ``checkpoints/`` (DeepSpeed layout) and, at the end, ``model.safetensors`` (fp32, for inference).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import checkpoint as ckpt
from . import dist as rdist
from .config import Config, ConfigError, check_world, load_config
from .errors import TrainingError
from .evaluate import bytes_per_token, evaluate, with_bytes
from .model import RoutingTransformerLM, count_parameters, lm_loss
from .parallel.engines import OptimConfig, build_engine
from .parallel.sequence import apply_sequence_parallel, build_groups, local_slice


class StopSignal:
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption) ask for a checkpoint and a clean
    exit at the next step boundary; ranks agree through an all-reduce so none is left in a collective."""

    def __init__(self):
        self.received: Optional[str] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        return bool(rdist.all_reduce_max(flag).item())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="YAML file; repeat to merge, later wins")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint, if any), or a checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar on rank 0 (default: when stderr is a terminal)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_loader(cfg: Config, split: str, dp_rank: int, dp_size: int, train: bool):
    from .data import ShardLoader
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set: preprocess a corpus first (python tools/preprocess.py "
                          "--input DIR --output-prefix data/x) and pass --set data.manifest=data/x-manifest.json")
    loader = ShardLoader(cfg.data.manifest, split, cfg.train.train_micro_batch_size_per_gpu, dp_rank, dp_size,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle=train,
                         shuffle_buffer=cfg.data.shuffle_buffer, policy="drop" if train else "wrap",
                         skip_corrupt=cfg.data.skip_corrupt)
    if loader.seq_length < cfg.train.seq_length:
        raise ConfigError(f"train.seq_length ({cfg.train.seq_length}) exceeds the shards' seq_length "
                          f"({loader.seq_length}) in {cfg.data.manifest}: preprocess with --seq-length "
                          f">= {cfg.train.seq_length} or lower train.seq_length")
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({loader.vocab_size}) in {cfg.data.manifest}")
    return loader


def check_engine(cfg: Config) -> None:
    t = cfg.train
    if t.engine == "torch" and t.zero_stage:
        raise ConfigError(f"train.zero_stage={t.zero_stage} needs engine deepspeed or fairscale, not torch")
    if t.engine == "fairscale" and t.zero_stage == 3 and not torch.cuda.is_available():
        raise ConfigError("train.zero_stage=3 with engine fairscale needs FullyShardedDataParallel, which needs CUDA; "
                          "use engine deepspeed for ZeRO-3 on CPU")


def train_step(engine, model, micro_batches, reduce_fn=None, world_size: int = 1, positions=None):
    """One optimizer step over the micro-batches ([mb, n + 1] token tensors of this rank; under sequence
    parallelism this rank's slice, at absolute ``positions``); returns the loss averaged over micro-batches and
    ranks, or None when a non-finite loss on any rank dropped the step. Every rank holds as many tokens as every
    other, so the mean of the ranks' means is the mean over all tokens, and the engines' gradient average over
    the world is the gradient of that global mean."""
    losses = []
    for batch in micro_batches:
        with engine.autocast():
            logits, aux = engine.model(batch[:, :-1], positions=positions)
            loss = lm_loss(logits, batch[:, 1:])
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
        if rdist.all_reduce_max(bad).item():  # every rank agrees, so none waits alone in a gradient collective
            drop_step(engine, model)
            return None
        engine.backward(loss + aux)
        engine.step()
        losses.append(loss.item())
    model.update_kmeans(reduce_fn)  # after the optimizer step, statistics summed over every replica
    total = torch.tensor([sum(losses) / len(losses)], dtype=torch.float64)
    return (rdist.all_reduce_sum(total) / world_size).item()


def drop_step(engine, model) -> None:
    """Forget a step's gradients and k-means statistics. A non-finite loss on the first micro-batch leaves nothing
    to forget; later ones drop the micro-batches already accumulated (DeepSpeed keeps its own accumulation
    counter, so with DeepSpeed and accumulation > 1 the remaining micro-batches of the step are still stepped)."""
    model.zero_grad(set_to_none=True)
    for km in model.kmeans_modules():
        km.step_counts.zero_()
        km.step_sums.zero_()
    if hasattr(engine, "_micro"):
        engine._micro = 0


def init_kmeans_from_first_batch(model, cfg: Config, dp_rank: int, dp_size: int, device) -> None:
    """Seed the centroids from the first training micro-batch (read by a loader of its own, so the training
    stream is unchanged) on the whole sequence, before sequence parallelism splits it; rank 0's centroids then go
    to every rank, so all replicas start from the same ones."""
    first = next(iter(build_loader(cfg, cfg.data.train_split, dp_rank, dp_size, train=True)))
    model.init_kmeans_from_data(first[:, : cfg.train.seq_length].to(device),
                                generator=torch.Generator().manual_seed(cfg.train.seed))
    rdist.broadcast_tensors([b for km in model.kmeans_modules()
                             for b in (km.means, km.ema_sums, km.ema_counts, km.initted)], src=0)


def forever(loader):
    while True:
        yield from loader


def train(cfg: Config, run_dir: Path, resume: Optional[str] = None, progress: Optional[bool] = None) -> dict:
    t = cfg.train
    check_engine(cfg)
    info = rdist.init(timeout_s=t.dist_timeout_s)
    dp_size = check_world(cfg, info.world_size)
    sp = cfg.parallel.sequence_parallel_size
    dp_rank = info.rank // sp
    groups = build_groups(sp) if sp > 1 else None
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main:
        ckpt.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    seed_all(t.seed)  # same initial weights and centroids on every rank
    model = RoutingTransformerLM(cfg.model, checkpoint_every=t.checkpoint_num_layers if t.checkpoint_activations else 0,
                                 checkpoint_offload=t.checkpoint_offload).to(device)
    loader = build_loader(cfg, cfg.data.train_split, dp_rank, dp_size, train=True)
    resume_from = ckpt.resolve_resume(ckpt_dir, resume)
    if t.kmeans_init == "data" and resume_from is None:
        init_kmeans_from_first_batch(model, cfg, dp_rank, dp_size, device)
    if groups is not None:
        apply_sequence_parallel(model, groups)
    optim = OptimConfig(t.lr, t.min_lr, t.warmup_iters, t.train_iters, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                        t.gradient_clipping)
    # Engines average gradients over the whole world (SP ranks included, see train_step), so to DeepSpeed's batch
    # accounting every rank is a data-parallel replica.
    engine = build_engine(t.engine, model, optim, micro_batch=t.train_micro_batch_size_per_gpu,
                          accumulation=t.gradient_accumulation_steps, dp_size=info.world_size, zero_stage=t.zero_stage,
                          precision=t.precision, deepspeed_overrides=cfg.deepspeed)

    step = 0
    skipped_total = 0
    if resume_from is not None:
        engine.load(resume_from)
        state = ckpt.load_rank_state(resume_from)
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        step, skipped_total = state["step"], state.get("skipped_steps", 0)
        if info.is_main:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    if resume_from is None:
        seed_all(t.seed + 1000 * info.rank)  # after the shared init: dropout streams differ per rank

    def save(at_step: int) -> Path:
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state(), "step": at_step,
                      "skipped_steps": skipped_total}
        return ckpt.save(engine, ckpt_dir, at_step, rank_state, {"step": at_step, "world_size": info.world_size})

    eval_loader = None
    bpt = None
    if t.eval_interval:
        eval_loader = build_loader(cfg, cfg.data.eval_split, dp_rank, dp_size, train=False)
        bpt = bytes_per_token(loader.manifest, cfg.data.eval_split)

    def run_eval() -> dict:
        return with_bytes(evaluate(engine.model, eval_loader, t.eval_iters, seq_length=t.seq_length,
                                   autocast=engine.autocast(), device=str(device), sp=groups), bpt)

    reduce_fn = rdist.all_reduce_sum if info.world_size > 1 else None
    stop = StopSignal()
    log_file = open(run_dir / "metrics.jsonl", "a") if info.is_main else None
    bar = None
    if info.is_main and (progress if progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=t.train_iters, initial=step, desc="train", unit="step", dynamic_ncols=True)
    if info.is_main:
        print(f"rtdist: {count_parameters(model) / 1e6:.2f}M parameters, world {info.world_size} "
              f"({info.source}), engine {engine.name}, zero {t.zero_stage}, {len(loader)} batches/epoch/rank",
              flush=True)

    tokens_per_step = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dp_size * t.seq_length
    batches = forever(loader)
    nonfinite_in_a_row = 0
    last = {}
    model.train()
    t_log = time.perf_counter()
    steps_since_log = 0
    status = "completed"
    while step < t.train_iters:
        micro = [next(batches)[:, : t.seq_length + 1].to(device) for _ in range(t.gradient_accumulation_steps)]
        positions = None
        if groups is not None:
            parts = [local_slice(b, groups.sp_rank, groups.sp_size) for b in micro]
            micro, positions = [p[0] for p in parts], parts[0][1]
        loss_avg = train_step(engine, model, micro, reduce_fn, info.world_size, positions)
        if loss_avg is None:
            skipped_total += 1
            nonfinite_in_a_row += 1
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise TrainingError(f"{nonfinite_in_a_row} steps in a row had a non-finite loss (last at step "
                                    f"{step + 1}); lower train.lr or check the data. Last good checkpoint: "
                                    f"{ckpt.resolve_resume(ckpt_dir, 'auto')}")
            continue
        ckpt.fault_point("step", step + 1)
        nonfinite_in_a_row = 0
        step += 1
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
                    "epoch": loader.epoch}
            t_log, steps_since_log = now, 0
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        else:
            last = {"step": step, "loss": round(loss_avg, 6)}
        if t.eval_interval and step % t.eval_interval == 0:
            last.update({f"eval_{k}": v for k, v in run_eval().items()})
        if log_file:
            log_file.write(json.dumps(last) + "\n")
            log_file.flush()
        if t.save_interval and step % t.save_interval == 0 and step < t.train_iters:
            save(step)
        if stop.agreed():
            status = f"stopped by {stop.received or 'a signal on another rank'}"
            break

    if bar is not None:
        bar.close()
    step_dir = save(step)
    result = {"status": status, "step": step, "run_dir": str(run_dir), "checkpoint": str(step_dir),
              "last": last, "skipped_steps": skipped_total}
    if status == "completed":
        state = engine.consolidated_state_dict(step_dir)
        if info.is_main:
            ckpt.export_safetensors(state, run_dir / "model.safetensors", {"step": step})
            result["export"] = str(run_dir / "model.safetensors")
        if eval_loader is not None:
            result["eval"] = run_eval()
    if log_file:
        log_file.close()
    if info.is_main:
        ckpt.atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .data import DataError
    try:
        result = train(cfg, args.run_dir, args.resume, args.progress)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if rdist.rank() == 0:
        r = result
        print(f"\n{r['status']} at step {r['step']}: loss {r['last'].get('loss')}"
              + (f", eval loss {r['eval']['loss']:.4f} ({r['eval'].get('bits_per_byte', r['eval']['bits_per_token']):.3f}"
                 f" bits/{'byte' if 'bits_per_byte' in r['eval'] else 'token'})" if "eval" in r else "")
              + f"\n  metrics:    {Path(r['run_dir']) / 'metrics.jsonl'}\n  checkpoint: {r['checkpoint']}"
              + (f"\n  model:      {r['export']}" if "export" in r else ""), flush=True)
    rdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
