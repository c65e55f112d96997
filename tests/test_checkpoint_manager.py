"""The checkpoint manager's rules without a training run: a fake engine that writes real files, one process.

Resume, reshard decision, the global-batch rule, save rules, keeping an unchanged checkpoint, and retention."""
import os
from pathlib import Path

import pytest
import torch

from rtdist import checkpoint as ckpt
from rtdist.checkpoint import CheckpointManager, Marker, TrainState
from rtdist.config import ConfigError, load_config
from rtdist.errors import CheckpointError
from rtdist.parallel import ParallelDims
from rtdist.parallel.reshard import Layout

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda *a, **k: None  # noqa: E731


class FileEngine:
    """Writes and reads one tensor file, as an engine writes its state into a step folder."""
    name = "torch"

    def __init__(self, value: float = 0.0):
        self.value = torch.tensor([value])

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.value, path / "engine_states.pt")

    def load(self, path: Path) -> None:
        self.value = torch.load(path / "engine_states.pt")


class Position:
    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"epoch": 0, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def config(*sets):
    return load_config(str(ROOT / "configs" / "tiny.yaml"), ["train.engine=torch", "train.zero_stage=0", *sets])


def manager(tmp_path, cfg, resume=None, keep_last=None, world=1):
    m = CheckpointManager(tmp_path / "checkpoints", ParallelDims(1, world), keep_last=keep_last, log=QUIET)
    return m, m.find(resume, cfg)


def save_steps(m, steps, engine=None):
    engine = engine or FileEngine()
    for step in steps:
        engine.value += 1
        m.save(engine, TrainState(step=step, tokens=step * 64), Position(step * 4).state_dict())


def test_a_saved_step_resumes_with_its_engine_loader_and_counters(tmp_path):
    m, cfg = manager(tmp_path, config())
    save_steps(m, [2, 4])
    m2, _ = manager(tmp_path, cfg, resume="auto")
    engine, loader, state = FileEngine(), Position(), TrainState()
    assert m2.source.name == "global_step4" and m2.resuming
    m2.restore_state(engine, loader, state)
    assert (engine.value.item(), loader.position, state.step, state.tokens) == (2.0, 16, 4, 256)


def test_the_marker_is_typed_and_records_the_layout(tmp_path):
    m, _ = manager(tmp_path, config("train.train_micro_batch_size_per_gpu=2"))
    save_steps(m, [3])
    marker = ckpt.read_marker(tmp_path / "checkpoints" / "global_step3")
    assert isinstance(marker, Marker)
    assert (marker.step, marker.world_size, marker.dp_size, marker.global_batch) == (3, 1, 1, 2)
    assert marker.layout == Layout("torch", 0, 1, "fp32") and marker.data == {"epoch": 0, "position": 12}
    assert set(marker.files) == {"engine_states.pt", "rtdist_rank0.pt"}


def test_retention_keeps_the_newest_and_never_the_one_latest_names(tmp_path):
    m, _ = manager(tmp_path, config(), keep_last=2)
    save_steps(m, [2, 4, 6, 8])
    assert ckpt.complete_steps(tmp_path / "checkpoints") == [6, 8]
    (tmp_path / "checkpoints" / "latest").write_text("global_step6")  # e.g. a run resumed from 6 by name
    assert ckpt.prune(tmp_path / "checkpoints", 1) == []  # 8 is the newest, 6 is latest's: both stay
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".stale" in p.name or ".tmp" in p.name]


def test_without_keep_last_every_checkpoint_stays(tmp_path):
    m, _ = manager(tmp_path, config())
    save_steps(m, [1, 2, 3])
    assert ckpt.complete_steps(tmp_path / "checkpoints") == [1, 2, 3]


def test_a_resumed_run_that_trained_nothing_keeps_its_checkpoint_as_it_is(tmp_path):
    m, cfg = manager(tmp_path, config())
    save_steps(m, [4])
    step_dir = tmp_path / "checkpoints" / "global_step4"
    before = {p.name: p.stat().st_mtime_ns for p in step_dir.iterdir()}
    m2, _ = manager(tmp_path, cfg, resume="auto")
    engine, state = FileEngine(), TrainState()
    m2.restore_state(engine, Position(), state)
    m2.save(engine, state, Position(16).state_dict())
    assert {p.name: p.stat().st_mtime_ns for p in step_dir.iterdir()} == before


def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_keys(tmp_path):
    m, _ = manager(tmp_path, config())
    save_steps(m, [2])
    with pytest.raises(CheckpointError, match=r"model.d_model: 128 in the checkpoint, 32 now; model.n_heads: 4 in the checkpoint, 2 now"):
        manager(tmp_path, config("model.d_model=32", "model.n_heads=2"), resume="auto")


def test_another_world_keeps_the_global_batch_without_touching_the_given_config(tmp_path):
    m, cfg = manager(tmp_path, config("train.train_micro_batch_size_per_gpu=1", "train.gradient_accumulation_steps=4"))
    save_steps(m, [2])
    m2, resumed = manager(tmp_path, cfg, resume="auto", world=2)
    assert resumed.train.gradient_accumulation_steps == 2 and cfg.train.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"data-parallel size \(3 = world 3"):
        manager(tmp_path, cfg, resume="auto", world=3)


def test_files_of_another_layout_are_resharded_and_of_the_same_are_loaded_as_they_are():
    zero2_on_4 = Layout("deepspeed", 2, 4)
    assert Layout("deepspeed", 2, 4).loads(zero2_on_4)
    assert not Layout("deepspeed", 2, 2).loads(zero2_on_4)  # partitions of 4 ranks
    assert not Layout("torch", 0, 4).loads(zero2_on_4)
    assert Layout("torch", 0, 2).loads(Layout("torch", 0, 8))  # whole files: any world
    assert not Layout("deepspeed", 0, 2).loads(Layout("deepspeed", 0, 1, "bf16"))  # bf16 keeps fp32 partitions


def test_saves_are_due_at_the_interval_but_not_at_the_last_step(tmp_path):
    m, _ = manager(tmp_path, config("train.save_interval=3", "train.train_iters=9"))
    assert [s for s in range(1, 10) if m.due(s)] == [3, 6]  # 9 is the final save's
    m, _ = manager(tmp_path, config("train.save_interval=0"))
    assert not any(m.due(s) for s in range(1, 100))


def test_train_state_round_trips_and_reads_the_counters_of_older_checkpoints():
    state = TrainState(step=7, skipped_steps=1, tokens=448, elapsed_s=3.5, nonfinite_streak=0)
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert (again.step, again.skipped_steps, again.tokens) == (7, 1, 448) and again.elapsed_s >= 3.5
    old = TrainState()
    old.load_state_dict({"step": 5, "loader": {}, "rng": None})  # before tokens, elapsed time and the streak
    assert (old.step, old.tokens, old.elapsed_s, old.nonfinite_streak) == (5, 0, 0.0, 0)


def test_a_damaged_marker_is_named(tmp_path):
    m, _ = manager(tmp_path, config())
    save_steps(m, [2])
    marker = tmp_path / "checkpoints" / "global_step2" / ckpt.MARKER
    marker.write_text('{"step": "two"}')
    with pytest.raises(CheckpointError, match=r"global_step2: its 'complete' marker is damaged \(step is 'two'"):
        ckpt.read_marker(marker.parent)
    os.remove(marker)
