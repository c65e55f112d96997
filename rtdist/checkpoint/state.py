"""What a rank carries from one segment of a run to the next besides the engine's files: the loop's counters
(:class:`TrainState`) and its random streams. Saved per rank (``rtdist_rank{r}.pt``) with the data loader's
position."""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class TrainState:
    """The training loop's counters, over every segment of a run (a resume continues them)."""
    step: int = 0  # optimizer steps taken
    skipped_steps: int = 0  # steps dropped for a non-finite loss
    tokens: int = 0  # tokens trained on, all ranks together
    elapsed_s: float = 0.0  # training time of the earlier segments
    nonfinite_streak: int = 0  # dropped steps in a row, up to now
    _clock: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def elapsed(self) -> float:
        """Training time so far, this segment included."""
        return self.elapsed_s + time.perf_counter() - self._clock

    def stepped(self, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens
        self.nonfinite_streak = 0

    def dropped(self) -> None:
        self.skipped_steps += 1
        self.nonfinite_streak += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "tokens": self.tokens,
                "elapsed_s": self.elapsed(), "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        """From a rank's saved state (keys an older rtdist did not save start at zero); the clock restarts."""
        for f in dataclasses.fields(self):
            if not f.name.startswith("_"):
                setattr(self, f.name, type(getattr(self, f.name))(state.get(f.name, 0)))
        self._clock = time.perf_counter()


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rng_state() -> dict:
    """This rank's random streams: Python, numpy, torch's CPU generator and its own GPU's (not every visible
    GPU's: a rank draws only on its device), with the number of GPUs it saw."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda_devices": _visible_gpus()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Optional[dict]) -> bool:
    """Put a rank's saved streams back if they map onto this process (same world, which the caller's state says
    by being there, and as many visible GPUs as the writer had: a GPU stream belongs to a local device); returns
    False and changes nothing otherwise, and the caller reseeds."""
    if not state:
        return False
    saved_cuda = state.get("cuda")
    # rtdist before per-device states saved every visible device's stream as a list
    saved_gpus = state.get("cuda_devices", len(saved_cuda) if isinstance(saved_cuda, list) else 0)
    if saved_gpus != _visible_gpus():
        return False
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if saved_cuda is not None:
        if isinstance(saved_cuda, list):
            torch.cuda.set_rng_state_all(saved_cuda)
        else:
            torch.cuda.set_rng_state(saved_cuda)
    return True


