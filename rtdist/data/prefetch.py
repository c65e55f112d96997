"""Batches on the training device, one step ahead, with the loader position of what was actually used.

On CUDA each step's batches are pinned and copied with ``non_blocking`` on a side stream as soon as the previous
step has been handed out, so the copy runs while that step computes; the compute stream waits for the copy only
when it takes the batches, and no host-device synchronisation happens here. On the CPU the batches pass through.

Reading ahead moves the loader past batches no step has used yet, so :meth:`DevicePrefetcher.state_dict` is the
loader's position *before* the batches held back: a checkpoint resumes at the first batch not trained on.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


def _to(x, device: torch.device):
    """Tensors (in tuples/lists) to ``device``, pinned first and without blocking the host."""
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    if x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _record(x, stream) -> None:
    """Tell the caching allocator that ``stream`` uses ``x`` (made on the side stream): its memory is not reused
    before that stream's work on it is done."""
    if isinstance(x, (tuple, list)):
        for v in x:
            _record(v, stream)
    elif isinstance(x, torch.Tensor):
        x.record_stream(stream)


class DevicePrefetcher:
    """Groups of ``per_step`` items of ``loader`` (after ``transform``, e.g. this rank's slice of a batch), on
    ``device``; the next group is copied while the current one is in use (see the module docstring).
    ``loader`` needs ``state_dict()``; ``batches`` is the iterator drawn from (``iter(loader)`` across epochs).
    ``read_ahead`` defaults to CUDA only: on the CPU there is no copy to overlap."""

    def __init__(self, loader, batches: Iterable, device, per_step: int = 1, transform: Optional[Callable] = None,
                 read_ahead: Optional[bool] = None):
        self.loader, self.batches = loader, iter(batches)
        self.device, self.per_step = torch.device(device), per_step
        self.transform = transform or (lambda b: b)
        self.cuda = self.device.type == "cuda"
        self.read_ahead = self.cuda if read_ahead is None else read_ahead
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ahead = None  # (loader state before it, the group on the device)

    def _read(self):
        state = self.loader.state_dict()
        group = [self.transform(next(self.batches)) for _ in range(self.per_step)]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                group = _to(group, self.device)
        return state, group

    def __iter__(self):
        return self

    def __next__(self) -> list:
        _, group = self._ahead if self._ahead is not None else self._read()
        self._ahead = None
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            _record(group, current)
        if self.read_ahead:
            self._ahead = self._read()  # copied on the side stream while the caller computes on this group
        return group

    def state_dict(self) -> dict:
        """The loader's position after the last group handed out (not after the one read ahead)."""
        return self._ahead[0] if self._ahead is not None else self.loader.state_dict()
