"""One owner for a run's checkpoints: which one to resume from, whether its files fit this layout or must be
resharded, restoring the weights (before ``parallelize``) and the engine, loader, counters and random streams
(after it), the global-batch rule, when to save, keeping an unchanged checkpoint, and retention.

To add a resume check, add it to :meth:`CheckpointManager.find`; a save rule, to :meth:`CheckpointManager.due`."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

from .. import dist as rdist
from ..config import Config, ConfigError, ModelConfig, TrainConfig, build, resolved, shape_keys
from ..errors import CheckpointError
from ..parallel import ParallelDims
from ..parallel import reshard
from ..parallel.reshard import Layout
from .marker import Marker, read_marker
from .state import TrainState, restore_rng, rng_state
from .store import load_rank_state, resolve_resume, save


def check_model_shape(step_dir: Path, marker: Marker, model: ModelConfig) -> None:
    """Refuse a checkpoint written for another model shape, listing the keys that differ (:func:`shape_keys`)."""
    if not marker.model:
        return
    known = {f.name for f in dataclasses.fields(ModelConfig)}  # keys of another rtdist version are not shape keys
    saved = vars(resolved(build(ModelConfig, {k: v for k, v in marker.model.items() if k in known}, "model")))
    now = vars(model)
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in shape_keys()
            if saved.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {step_dir} was written for another model ({'; '.join(diff)}): resume "
                              f"with the checkpoint's values, or train the new shape in a new --run-dir")


def kept_accumulation(step_dir: Path, marker: Marker, t: TrainConfig, dims: ParallelDims,
                      log: Callable = print) -> int:
    """The ``train.gradient_accumulation_steps`` a resume trains with: one that keeps the checkpoint's global batch
    (samples per optimizer step) on this layout, unless ``train.train_batch_size`` sets another, so that a job
    resubmitted on fewer or more nodes trains as it would have. A global batch the layout cannot split evenly is an
    error naming a layout that can."""
    saved = marker.train
    if marker.dp_size is None or "train_micro_batch_size_per_gpu" not in saved:
        return t.gradient_accumulation_steps  # a checkpoint that does not say its layout: the configuration's stands
    target = t.train_batch_size or (saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
                                    * marker.dp_size)
    micro, dp = t.train_micro_batch_size_per_gpu, dims.dp
    if dims.global_batch(micro, t.gradient_accumulation_steps) == target:
        return t.gradient_accumulation_steps
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
    return accumulation


class CheckpointManager:
    """A run's checkpoints in ``ckpt_dir`` (DeepSpeed's layout). Every method is collective: every rank calls it.

    The order of a run: :meth:`find` (before the model is parallelized: it may change the accumulation),
    :meth:`restore_weights`, ``parallelize``, :meth:`restore_state`, then :meth:`save` whenever :meth:`due` says
    and once at the end."""

    def __init__(self, ckpt_dir: Path, dims: ParallelDims, keep_last: Optional[int] = None, log: Callable = print):
        self.dir, self.dims, self.keep_last, self.log = Path(ckpt_dir), dims, keep_last, log
        self.cfg: Optional[Config] = None
        self.source: Optional[Path] = None  # the checkpoint this run resumes from
        self.marker: Optional[Marker] = None
        self._portable, self._scratch, self._read_s = None, None, 0.0
        self._unchanged_at: Optional[int] = None  # the step whose checkpoint already holds this run's state

    @property
    def resuming(self) -> bool:
        return self.source is not None

    def layout(self) -> Layout:
        t = self.cfg.train
        return Layout(t.engine, t.zero_stage, self.dims.world_size, t.precision)

    def find(self, resume: Optional[str], cfg: Config) -> Config:
        """Pick the checkpoint to resume from (``resume``: None, "auto", a path or a step name; see
        :func:`resolve_resume`), refuse one of another model shape, and return ``cfg`` with the accumulation that
        keeps its global batch (:func:`kept_accumulation`); the run's config from here on."""
        self.cfg = cfg
        self.source = resolve_resume(self.dir, resume, log=self.log)
        if self.source is None:
            return cfg
        self.marker = read_marker(self.source)
        check_model_shape(self.source, self.marker, cfg.model)
        accumulation = kept_accumulation(self.source, self.marker, cfg.train, self.dims, self.log)
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                      gradient_accumulation_steps=accumulation))
        return self.cfg

    def restore_weights(self, model) -> None:
        """When this layout cannot load the checkpoint's files as they are, convert them (:mod:`reshard`) and put
        the weights and buffers into the bare model, before the engine takes its copies of them."""
        if self.source is None or self.layout().loads(self.marker.layout):
            return
        t0 = time.perf_counter()
        self._portable, self._scratch = reshard.prepare(self.source, self.marker.layout, model, self.log)
        reshard.load_weights(model, self._portable)
        self._read_s = time.perf_counter() - t0

    def restore_state(self, engine, loader, state: TrainState) -> bool:
        """The engine's optimizer and schedule, the loader's position, the loop's counters (into ``state``) and this
        rank's random streams. Returns whether the streams were restored (not on another world or GPU count: the
        caller reseeds)."""
        if self.source is None:
            return False
        t0 = time.perf_counter()
        saved = load_rank_state(self.source)
        if self._portable is None:
            engine.load(self.source)
        else:
            engine.load_portable(self._portable)
            reshard.release(self._scratch)
        try:
            loader.load_state_dict(saved["loader"])
        except ValueError as e:  # other data: a position in another epoch order
            raise CheckpointError(f"{self.source}: its data position is a position in other data ({e}): resume "
                                  f"with the checkpoint's data.manifest, data.train_split and train.seed, or train "
                                  f"in a new --run-dir") from None
        state.load_state_dict(saved)
        restored = restore_rng(saved.get("rng"))
        rdist.barrier()  # every rank has read the checkpoint before any rank may write the next one
        # Nothing trained since this checkpoint: saving it again keeps it, unless it was written in another
        # layout (resharded), which the export and the next resume on this shape would have to convert again.
        self._unchanged_at = state.step if self._portable is None else None
        self.log(f"resumed from {self.source} at step {state.step}"
                 f"{' (resharded)' if self._portable is not None else ''}, read in "
                 f"{self._read_s + time.perf_counter() - t0:.2f} s", flush=True)
        return restored

    def due(self, step: int) -> bool:
        """Whether a save is due after ``step`` (``train.save_interval``; the last step saves in any case)."""
        t = self.cfg.train
        return bool(t.save_interval) and step % t.save_interval == 0 and step < t.train_iters

    def save(self, engine, state: TrainState, loader_state: dict) -> Path:
        """A complete checkpoint of ``state.step`` (kept as it is when it already holds this state), then
        retention (``train.keep_last``). Returns its folder."""
        t, dims = self.cfg.train, self.dims
        rank_state = {"loader": loader_state, "rng": rng_state(), **state.state_dict()}
        marker = Marker(step=state.step, world_size=dims.world_size, dp_size=dims.dp, sp_size=dims.sp,
                        engine=t.engine, zero_stage=t.zero_stage,
                        global_batch=dims.global_batch(t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps),
                        config=self.cfg.to_dict(), data=loader_state)
        return save(engine, self.dir, state.step, rank_state, marker, log=self.log,
                    keep_existing=state.step == self._unchanged_at, keep_last=self.keep_last)
