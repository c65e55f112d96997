"""The ``complete`` marker of a checkpoint, as one typed object: the step, the layout that wrote the files, the
resolved config, the data position and every file's size and sha256. Its presence is what makes a checkpoint
complete; its JSON keys are the file format (older markers lack some, which read as None)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import CheckpointError
from ..parallel.reshard import Layout

MARKER = "complete"
# Marker keys read as counts (global batch, layouts) and as mappings; other types mean the marker is damaged.
_MARKER_INTS = ("step", "world_size", "dp_size", "sp_size", "zero_stage", "global_batch")
_MARKER_DICTS = ("config", "files", "data")


def marker_problem(marker) -> Optional[str]:
    """What is wrong with a parsed marker's structure, else None."""
    if not isinstance(marker, dict):
        return f"it holds {type(marker).__name__} {str(marker)[:40]}, not an object"
    for key in _MARKER_INTS:
        v = marker.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"{key} is {v!r}, not a count"
    for key in _MARKER_DICTS:
        if marker.get(key) is not None and not isinstance(marker[key], dict):
            return f"{key} is {type(marker[key]).__name__}, not an object"
    for section in ("model", "train"):
        if not isinstance((marker.get("config") or {}).get(section) or {}, dict):
            return f"config.{section} is not an object"
    for name, want in (marker.get("files") or {}).items():
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
            return f"files[{name!r}] is not {{bytes, sha256}}"
    return None


@dataclass
class Marker:
    step: Optional[int] = None
    world_size: Optional[int] = None
    dp_size: Optional[int] = None
    sp_size: Optional[int] = None
    engine: Optional[str] = None
    zero_stage: Optional[int] = None
    global_batch: Optional[int] = None
    config: dict = field(default_factory=dict)  # the resolved run config (Config.to_dict())
    data: Optional[dict] = None  # the training loader's position (ShardLoader.state_dict())
    files: dict = field(default_factory=dict)  # {relative path: {"bytes", "sha256"}}
    extra: dict = field(default_factory=dict, repr=False)  # keys of another rtdist version, kept as they are

    @classmethod
    def from_dict(cls, raw: dict) -> "Marker":
        """From the parsed JSON; a CheckpointError when its structure is damaged (:func:`marker_problem`)."""
        problem = marker_problem(raw)
        if problem:
            raise CheckpointError(f"its '{MARKER}' marker is damaged ({problem})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}

    @property
    def model(self) -> dict:
        """The ``model:`` section of the config that wrote it ({} when the marker holds none)."""
        return self.config.get("model") or {}

    @property
    def train(self) -> dict:
        return self.config.get("train") or {}

    @property
    def precision(self) -> str:
        return self.train.get("precision", "fp32")

    @property
    def layout(self) -> Layout:
        """The layout that wrote the engine's files (what :meth:`Layout.loads` compares)."""
        return Layout(self.engine or "?", self.zero_stage or 0, self.world_size or 0, self.precision)

    @property
    def samples_per_step(self) -> Optional[int]:
        """The global batch of the run that wrote it (data-parallel x micro x accumulation), None if unsaid."""
        if self.global_batch:
            return self.global_batch
        t = self.train
        if "train_micro_batch_size_per_gpu" in t and self.dp_size:
            return t["train_micro_batch_size_per_gpu"] * t["gradient_accumulation_steps"] * self.dp_size
        return None


def marker_or_problem(step_dir: Path) -> tuple[Optional[Marker], Optional[str]]:
    """(the marker, None), or (None, what is wrong with it)."""
    path = step_dir / MARKER
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a folder, no permission, empty, junk bytes, invalid JSON
        what = "it is empty" if path.is_file() and path.stat().st_size == 0 else str(e)
        return None, f"its '{MARKER}' marker cannot be read ({what})"
    try:
        return Marker.from_dict(raw), None
    except CheckpointError as e:
        return None, str(e)


def read_marker(step_dir: Path) -> Marker:
    """The marker of a checkpoint; a CheckpointError naming it when it cannot be read or is damaged."""
    marker, problem = marker_or_problem(step_dir)
    if problem:
        raise CheckpointError(f"checkpoint {step_dir}: {problem}")
    return marker
