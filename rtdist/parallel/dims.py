"""The parallel layout, decided once: world = data-parallel (dp) x sequence-parallel (sp) ranks on a device mesh.

The ranks of one sequence-parallel group are consecutive (they read the same sample, each a slice of its tokens);
data-parallel replicas read different samples. Every question about ranks and groups goes through
:class:`ParallelDims`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError


@dataclass
class ParallelDims:
    """``world_size`` ranks as ``dp x sp``; :meth:`build_mesh` makes the device mesh (collective)."""

    sp: int
    world_size: int
    rank: int = 0
    mesh: Optional[object] = field(default=None, repr=False)

    def __post_init__(self):
        if self.sp < 1:
            raise ConfigError(f"parallel.sequence_parallel_size must be >= 1, got {self.sp}")
        if self.world_size % self.sp:
            fits = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise ConfigError(f"world size {self.world_size} is not divisible by parallel.sequence_parallel_size "
                              f"({self.sp}): use one of {fits}, or launch a multiple of {self.sp} ranks")

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def sp_ranks(self) -> list[int]:
        """Global ranks of this rank's sequence-parallel group, in sequence order."""
        first = self.dp_rank * self.sp
        return list(range(first, first + self.sp))

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    def build_mesh(self, device_type: str = "cpu") -> "ParallelDims":
        """Create the ("dp", "sp") device mesh on the default process group (every rank, same order)."""
        from torch.distributed.device_mesh import init_device_mesh
        if self.mesh is None and torch.distributed.is_initialized():
            self.mesh = init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))
        return self

    @property
    def sp_group(self):
        """The sequence-parallel process group (None without a mesh)."""
        return self.mesh["sp"].get_group() if self.mesh is not None else None

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    def describe(self, source: str = "") -> dict:
        """The layout in a few numbers (for a run's record)."""
        return {"world_size": self.world_size, "data_parallel": self.dp, "sequence_parallel": self.sp,
                **({"source": source} if source else {})}

    def global_batch(self, micro_batch: int, accumulation: int) -> int:
        """Samples per optimizer step: data-parallel replicas x micro batch x accumulation (sequence-parallel ranks
        share their samples)."""
        return micro_batch * accumulation * self.dp

    def check_batch(self, micro_batch: int, accumulation: int, train_batch_size: Optional[int]) -> None:
        """The global batch triple against the data-parallel size."""
        derived = self.global_batch(micro_batch, accumulation)
        if train_batch_size is not None and train_batch_size != derived:
            raise ConfigError(f"train.train_batch_size ({train_batch_size}) must equal train_micro_batch_size_per_gpu "
                              f"({micro_batch}) x gradient_accumulation_steps ({accumulation}) x data-parallel size "
                              f"({self.dp}) = {derived}")

    def local_slice(self, batch: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This rank's part of a ``[B, n + 1]`` token batch: its ``n / sp`` consecutive input positions plus one
        more token (the target of its last input), and those absolute positions (None without sequence
        parallelism)."""
        if self.sp == 1:
            return batch, None
        n = batch.shape[1] - 1
        if n % self.sp:
            raise ConfigError(f"sequence length {n} is not divisible by parallel.sequence_parallel_size ({self.sp})")
        m = n // self.sp
        start = self.sp_rank * m
        return batch[:, start:start + m + 1], torch.arange(start, start + m, device=batch.device)
