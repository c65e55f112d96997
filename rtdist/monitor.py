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
import difflib
import os
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .fileio import atomic_path

SINKS = ("tensorboard", "csv_monitor", "wandb")
# DeepSpeed's keys for each sink (deepspeed.monitor.config); the default of ``enabled`` is ours.
_KEYS = {
    "tensorboard": {"enabled": True, "output_path": "", "job_name": "tensorboard"},
    "csv_monitor": {"enabled": False, "output_path": "", "job_name": "csv_monitor"},
    "wandb": {"enabled": False, "project": "rtdist", "team": None, "group": None},
}
_PREFIXES = (("eval_", "eval/"), ("kmeans_", "kmeans/"))


def without_sinks(deepspeed_config: dict) -> dict:
    """The ``deepspeed:`` section less the sinks this module writes (what to pass to ``deepspeed.initialize``)."""
    return {k: v for k, v in deepspeed_config.items() if k not in SINKS}


def sink_settings(deepspeed_config: dict) -> dict[str, dict]:
    """Each sink's settings with defaults filled in; a key DeepSpeed does not know, or a wrong type, raises a
    ConfigError naming ``deepspeed.<sink>.<key>``."""
    out = {}
    for sink, defaults in _KEYS.items():
        given = deepspeed_config.get(sink) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"deepspeed.{sink}: expected a mapping such as {{enabled: true}}, got {given!r}")
        for key, value in given.items():
            if key not in defaults:
                close = difflib.get_close_matches(str(key), list(defaults), n=1)
                hint = f" (did you mean 'deepspeed.{sink}.{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown key 'deepspeed.{sink}.{key}'{hint}; known keys: {', '.join(defaults)}")
            if key == "enabled" and not isinstance(value, bool):
                raise ConfigError(f"deepspeed.{sink}.enabled: expected true/false, got {value!r}")
            if key != "enabled" and value is not None and not isinstance(value, str):
                raise ConfigError(f"deepspeed.{sink}.{key}: expected a string, got {value!r}")
        out[sink] = {**defaults, **given}
    return out


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


class Monitor:
    """Writes each logged step's numeric metrics to the configured sinks; does nothing unless ``enabled`` (rank 0).

    ``start_step``: the step a resumed run starts after; what an earlier segment logged past it is hidden
    (TensorBoard) or dropped (CSV), as the resumed run logs those steps again."""

    def __init__(self, run_dir: Path, deepspeed_config: Optional[dict], enabled: bool, start_step: int = 0,
                 warn=print):
        self.enabled = enabled
        self.sinks: list[Any] = []
        settings = sink_settings(deepspeed_config or {})  # every rank checks, so a typo fails everywhere alike
        if not enabled:
            return
        run_dir = Path(run_dir)
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

    @property
    def destinations(self) -> list[Path]:
        """Where each open sink writes (for the run's log)."""
        return [s.where for s in self.sinks]

    def log(self, step: int, metrics: dict) -> None:
        if not self.sinks:
            return
        values = numeric_items(metrics)
        for sink in self.sinks:
            sink.write(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

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
                        f"kmeans_l{layer}_entropy": round(h["entropy"], 4), f"kmeans_l{layer}_empty": h["empty"]})
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
