"""Runs people can watch: each logged step's metrics go to the sinks DeepSpeed users already configure under the
``deepspeed:`` section of the YAML, with DeepSpeed's keys and meanings:

    deepspeed:
      tensorboard: {enabled: true, output_path: "", job_name: tensorboard}   # on by default: RUN_DIR/tensorboard/
      csv_monitor: {enabled: true, output_path: /shared/csv, job_name: run7}  # /shared/csv/run7/train_loss.csv, ...
      wandb: {enabled: true, project: rtdist, team: null, group: null}        # offline, in RUN_DIR/wandb/

A sink writes into ``output_path/job_name``; an empty or absent ``output_path`` means the run directory, and
``job_name`` defaults to the sink's name, so TensorBoard's event files land in ``RUN_DIR/tensorboard/`` beside
``metrics.jsonl`` unless ``tensorboard.enabled`` is false. Weights & Biases runs in offline mode (the machines may
have no network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads later; ``WANDB_MODE`` overrides) and only when
the ``wandb`` package is importable, otherwise one warning line says so.

Every numeric key of a logged step is written; names are grouped as ``train/loss``, ``train/lr``, ...,
``eval/loss`` (from ``eval_loss``) and ``kmeans/...`` (from ``kmeans_...``). The CSV sink keeps DeepSpeed's layout:
one file per metric, named after the tag with ``/`` as ``_`` (``train_loss.csv``), with a ``step,<name>`` header.

These sections must not also reach ``deepspeed.initialize``: DeepSpeed would open the same sinks a second time
(and Weights & Biases online). :func:`without_sinks` is the config to give DeepSpeed.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import SINKS, sink_settings, without_sinks  # noqa: F401  (validated with the config)
from .fileio import atomic_path
from .flops import flops_per_token, mfu, peak_flops

_PREFIXES = (("eval_", "eval/"), ("kmeans_", "kmeans/"))


def tag(key: str) -> str:
    """``eval_loss`` -> ``eval/loss``, ``kmeans_x`` -> ``kmeans/x``, anything else ``train/<key>``."""
    for prefix, group in _PREFIXES:
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return "train/" + key


def numeric_items(metrics: dict) -> dict[str, float]:
    """The metrics worth plotting: numbers (not booleans, not ``step``), under their tags."""
    return {tag(k): float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_dir(run_dir: Path, settings: dict) -> Path:
    return Path(settings["output_path"] or run_dir) / settings["job_name"]


class _TensorBoardSink:
    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides the events a crashed segment wrote past the checkpoint this run resumed from.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)
        self.where = log_dir

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a run people watch: TensorBoard sees each step when it is logged

    def close(self) -> None:
        self.writer.close()


class _CSVSink:
    """DeepSpeed's csv_monitor layout: ``<tag with _>.csv`` per metric, rows ``step,value``."""

    def __init__(self, log_dir: Path, start_step: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.where = log_dir
        if start_step:
            for path in log_dir.glob("*.csv"):
                _drop_rows_after(path, start_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            path = self.where / (name.replace("/", "_").replace(" ", "_") + ".csv")
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", name.rsplit("/", 1)[-1]])
                w.writerow([step, value])

    def close(self) -> None:
        pass


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the header and the rows up to ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) != len(rows):
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)


class _WandbSink:
    def __init__(self, run_dir: Path, settings: dict):
        import wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings["project"], entity=settings["team"], group=settings["group"],
                              name=run_dir.name, dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"))
        self.where = Path(self.run.dir).parent if getattr(self.run, "dir", None) else run_dir / "wandb"

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def peak_memory_mb() -> float:
    """The peak memory of this process: the GPU allocator's on CUDA, the resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Monitor:
    """A run's metrics: each logged step's row goes to ``metrics.jsonl``, to the sinks configured under
    ``deepspeed:`` and, as one plain line, to the job log (or a tqdm bar on a terminal). Rank 0 writes
    (``enabled``); every rank validates the sink settings.

    For training (:meth:`for_training`) it also keeps the log interval, tokens/s, peak memory and MFU (model FLOPs
    per token against the peak FLOP/s of the device it runs on; on a CPU, its measured fp32 matmul rate). To add a
    metric, add it to :meth:`step_row`.

    ``start_step``: the step a resumed run starts after; what an earlier segment logged past it is hidden
    (TensorBoard) or dropped (CSV), as the resumed run logs those steps again."""

    def __init__(self, run_dir: Path, deepspeed_config: Optional[dict], enabled: bool, start_step: int = 0,
                 warn=print, metrics_file: Optional[Path] = None):
        self.enabled = enabled
        self.sinks: list[Any] = []
        self.warn = warn
        self.last: dict = {}
        self._file = None
        self._bar = None
        self._training: Optional[dict] = None
        settings = sink_settings(deepspeed_config or {})  # every rank checks, so a typo fails everywhere alike
        if not enabled:
            return
        run_dir = Path(run_dir)
        if metrics_file is not None:
            self._file = open(metrics_file, "a")
        tb, cs, wb = settings["tensorboard"], settings["csv_monitor"], settings["wandb"]
        if tb["enabled"]:
            try:
                self.sinks.append(_TensorBoardSink(_log_dir(run_dir, tb), start_step))
            except ImportError:
                warn("warning: deepspeed.tensorboard is enabled but the tensorboard package is not installed "
                     "(pip install tensorboard); no event files are written")
        if cs["enabled"]:
            self.sinks.append(_CSVSink(_log_dir(run_dir, cs), start_step))
        if wb["enabled"]:
            try:
                import wandb  # noqa: F401
            except ImportError:
                warn("warning: deepspeed.wandb is enabled but the wandb package is not installed (pip install wandb); "
                     "metrics go to the other sinks only")
            else:
                self.sinks.append(_WandbSink(run_dir, wb))

    @classmethod
    def for_training(cls, run_dir: Path, cfg, world_size: int, enabled: bool, state, device: torch.device,
                     progress: Optional[bool] = None, log: Callable = print) -> "Monitor":
        """The monitor of a training run: ``RUN_DIR/metrics.jsonl`` and the sinks, with the throughput figures of
        ``cfg`` (a :class:`rtdist.config.Config`) on ``world_size`` ranks of ``device``, from ``state`` (the
        :class:`rtdist.checkpoint.TrainState` it starts at). ``progress``: a tqdm bar (default: when stderr is a
        terminal); without one, rank 0 prints a line per logged step."""
        t, start_step = cfg.train, state.step
        self = cls(run_dir, cfg.deepspeed, enabled, start_step, warn=log, metrics_file=Path(run_dir) / "metrics.jsonl")
        peak, source = peak_flops(device, t.precision) if enabled else (None, "")
        self._training = {"interval": t.log_interval, "total": t.train_iters, "devices": world_size, "peak": peak,
                          "flops_per_token": flops_per_token(cfg.model, t.seq_length), "log": log,
                          "since": time.perf_counter(), "since_tokens": state.tokens, "start_step": start_step,
                          "started": time.perf_counter(), "kmeans": KMeansWatch(log)}
        if enabled and (progress if progress is not None else sys.stderr.isatty()):
            from tqdm import tqdm
            self._bar = tqdm(total=t.train_iters, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if enabled and peak:
            log(f"mfu: against {peak / 1e12:.2f} TFLOP/s per device ({source}); "
                f"{self._training['flops_per_token'] / 1e6:.1f} MFLOP per token", flush=True)
        return self

    def step_row(self, state, loss: float, engine, model, epoch: int) -> dict:
        """The metrics of training step ``state.step`` (a :class:`rtdist.checkpoint.TrainState`): at the log interval
        (and the last step) every figure, otherwise the loss; always the time and tokens so far."""
        tr = self._training
        step = state.step
        row = {"step": step, "loss": round(loss, 6)}
        if step % tr["interval"] == 0 or step == tr["total"]:
            now = time.perf_counter()
            tokens_per_s = (state.tokens - tr["since_tokens"]) / max(now - tr["since"], 1e-9)
            util = mfu(tokens_per_s, tr["flops_per_token"], tr["peak"], tr["devices"])
            row.update(lr=engine.lr(), grad_norm=engine.grad_norm(), tokens_per_s=round(tokens_per_s, 1),
                       mfu=round(util, 5) if util is not None else None, max_mem_mb=round(peak_memory_mb(), 1),
                       skipped_steps=state.skipped_steps, epoch=epoch, **tr["kmeans"].metrics(model))
            tr.update(since=now, since_tokens=state.tokens)
        row.update(time_s=round(state.elapsed(), 3), tokens=state.tokens)
        return row

    @property
    def destinations(self) -> list[Path]:
        """Where each open sink writes (for the run's log)."""
        return [s.where for s in self.sinks]

    def log(self, step: int, metrics: dict) -> None:
        """One row: to metrics.jsonl, the sinks, and the job log's line or bar."""
        self.last = metrics
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(metrics) + "\n")
            self._file.flush()
        values = numeric_items(metrics)
        for sink in self.sinks:
            sink.write(step, values)
        if self._training is not None:
            self._show(step, metrics)

    def _show(self, step: int, m: dict) -> None:
        tr = self._training
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{m[k]:.3f}" if k == "loss" else f"{m[k]:.0f}" for k in ("loss", "tokens_per_s")
                                   if m.get(k) is not None})
        elif "lr" in m:
            done = step - tr["start_step"]
            spent = time.perf_counter() - tr["started"]
            eta = spent / done * (tr["total"] - step) if done else 0.0
            parts = [f"step {step}/{tr['total']}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3g}",
                     f"grad_norm {m['grad_norm']:.3g}" if m.get("grad_norm") is not None else "grad_norm -",
                     f"tok/s {m['tokens_per_s']:,.0f}", f"mfu {m['mfu']:.2%}" if m.get("mfu") is not None else "",
                     f"mem {m['max_mem_mb']:,.0f} MiB", f"elapsed {_clock(m['time_s'])}", f"eta {_clock(eta)}"]
            tr["log"]("  ".join(p for p in parts if p), flush=True)
        if "eval_loss" in m and self._bar is None:
            figures = [f"loss {m['eval_loss']:.4f}", f"ppl {m['eval_perplexity']:.2f}" if "eval_perplexity" in m
                       else "", f"bits/byte {m['eval_bits_per_byte']:.3f}" if "eval_bits_per_byte" in m else ""]
            tr["log"](f"eval at step {step}: " + "  ".join(f for f in figures if f), flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KMeansWatch:
    """k-means health at each log step: per routing layer the largest cluster's share, the normalised entropy and
    the empty clusters of the last update, as metrics; one warning when a layer's largest cluster has held more
    than ``limit`` of the tokens for ``patience`` log steps in a row (routing collapsing onto one cluster)."""

    def __init__(self, log, limit: float = 0.5, patience: int = 3):
        self.log, self.limit, self.patience = log, limit, patience
        self.crowded: dict[int, int] = {}
        self.warned: set[int] = set()

    def metrics(self, model) -> dict:
        out = {}
        for layer, h in model.kmeans_health().items():
            out.update({f"kmeans_l{layer}_max_share": round(h["max_share"], 4),
                        f"kmeans_l{layer}_entropy": round(h["entropy"], 4), f"kmeans_l{layer}_empty": h["empty"],
                        f"kmeans_l{layer}_move": float(f"{h['move']:.3g}")})
            if h["reseeded"]:
                out[f"kmeans_l{layer}_reseeded"] = h["reseeded"]
            self.crowded[layer] = self.crowded.get(layer, 0) + 1 if h["max_share"] > self.limit else 0
            if self.crowded[layer] >= self.patience and layer not in self.warned:
                self.warned.add(layer)
                self.log(f"warning: routing layer {layer}: its largest k-means cluster has held "
                         f"{h['max_share']:.0%} of the tokens for {self.patience} log steps ({h['empty']} clusters "
                         f"empty): routing is collapsing. Try model.commitment_factor 1.0 (the study's value), "
                         f"train.kmeans_init: data, or model.kmeans_reseed_after: 100", flush=True)
        return out
