"""Streaming loader over rtdist shards: equal batches on every data-parallel rank, exact mid-epoch resume.

Epoch ``e`` of a split, computed identically on every rank and worker from the manifest alone:

1. shard order: a permutation from (seed, e) (identity without shuffle); the epoch is the samples of the shards in
   that order, read front to back;
2. data-parallel split: rank r takes the contiguous positions ``[r * n, (r + 1) * n)`` with ``n`` = batches per
   epoch x micro batch, the same on every rank (see ``policy``), so shards split by rank even when they are
   uneven or fewer than ranks x workers. Ranks of one sequence-parallel group pass the same ``dp_rank`` and read
   the same samples;
3. worker split: global batch ``j`` of the rank belongs to worker ``j % W``; each worker reads a contiguous piece
   of the rank's positions (sequentially, by seeking in fixed-size tar members) through a shuffle buffer seeded by
   (seed, e, dp_rank, worker), and the DataLoader's in-order round robin hands the batches out as j = 0, 1, 2...

Since the order is a pure function of (manifest, seed, epoch, dp_world_size, micro_batch_size, num_workers,
shuffle_buffer), resuming is "skip the first c batches": each worker recomputes its buffer's content at batch c,
re-reads those (<= shuffle_buffer) samples and continues.

The shards are plain webdataset tars (``webdataset.WebDataset`` reads them); this loader reads them itself, seeking
to fixed-size members, because a tar stream cannot skip to a checkpointed position and webdataset's node splitting
follows the global ``RANK`` rather than the data-parallel rank. Nothing is loaded beyond the samples in flight.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import CorruptShardError, DataError, RtdistError
from .shards import ShardReader, load_manifest, split_info
from .tokenizers import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)
POLICIES = ("drop", "wrap")
# state_dict entries that fix the order of batches: all must match for an exact resume
ORDER_KEYS = ("split", "shards", "seed", "shuffle", "shuffle_buffer", "micro_batch_size", "dp_world_size",
              "num_workers", "policy")


def buffer_shuffle_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer of ``size`` over a stream of ``n`` items (webdataset-style: each arrival
    evicts a random slot, the rest leaves in random order at the end). Only indices: the data follows."""
    if n <= 1 or size <= 1:
        return np.arange(n)
    size = min(size, n)
    buf = list(range(size))
    out = []
    for i, slot in zip(range(size, n), rng.integers(0, size, n - size).tolist()):
        out.append(buf[slot])
        buf[slot] = i
    out += [buf[k] for k in rng.permutation(size)]
    return np.asarray(out)


class _WorkerFailed:
    """What a DataLoader worker yields instead of raising a user error: the error itself, re-raised by
    ``ShardLoader`` in the main process as it is (a worker's raise would arrive wrapped in its traceback text)."""

    def __init__(self, error: RtdistError):
        self.error = error


class _EpochStream(IterableDataset):
    """Yields (j, tokens[B, L+1] int64, keys, info) for this worker's batches j of one epoch, from ``start_batch``."""

    def __init__(self, manifest: dict, shards: list[dict], micro_batch_size: int, dp_rank: int,
                 batches: int, num_workers: int, seed: int, epoch: int, shuffle: bool, shuffle_buffer: int,
                 start_batch: int, skip_corrupt: bool):
        self.manifest, self.shards = manifest, shards
        self.B, self.rank, self.nb, self.W = micro_batch_size, dp_rank, batches, max(1, num_workers)
        self.seed, self.epoch, self.shuffle, self.K = seed, epoch, shuffle, shuffle_buffer
        self.start, self.skip_corrupt = start_batch, skip_corrupt

    def _locate(self):
        """Epoch position -> (shard, index in shard), through the epoch's shard order."""
        counts = np.array([s["samples"] for s in self.shards])
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(len(counts)) if self.shuffle
                 else np.arange(len(counts)))
        ends = np.cumsum(counts[order])
        total = int(ends[-1])

        def locate(p: int) -> tuple[dict, int]:
            p %= total  # policy "wrap" runs past the end into the start of the same order
            k = int(np.searchsorted(ends, p, side="right"))
            return self.shards[order[k]], p - int(ends[k] - counts[order[k]])
        return locate

    def __iter__(self):
        try:
            yield from self._batches()
        except RtdistError as e:
            if get_worker_info() is None:
                raise
            yield _WorkerFailed(e)

    def _batches(self):
        info = get_worker_info()
        v = ((info.id if info else 0) + self.start) % self.W  # rotate so DataLoader worker 0 yields batch `start`
        counts = [len(range(u, self.nb, self.W)) for u in range(self.W)]
        first = self.rank * self.nb * self.B + sum(counts[:v]) * self.B  # this worker's piece of the epoch
        n = counts[v] * self.B
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, v])
        order = buffer_shuffle_order(n, self.K, rng) if self.shuffle else np.arange(n)
        need = np.maximum.accumulate(order) + 1 if n else order  # samples read before output t can leave
        locate, reader = self._locate(), ShardReader(self.manifest)
        bad: set[str] = set()

        def read(i: int):
            shard, index = locate(first + i)
            if shard["name"] in bad:
                return None
            try:
                return reader.read(shard, index)
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise
                bad.add(shard["name"])
                log.warning("skipping corrupt shard (its samples are replaced): %s", e)
                return None

        k0 = len(range(v, self.start, self.W))  # batches of this worker before `start`
        t0, held, next_read = k0 * self.B, {}, 0
        if t0:  # resume: the buffer holds what was read and not yet emitted
            next_read = int(need[t0 - 1])
            emitted = np.zeros(next_read, bool)
            emitted[order[:t0]] = True
            held = {int(i): read(int(i)) for i in np.flatnonzero(~emitted)}
        reported: set[str] = set()
        try:
            for k in range(k0, counts[v]):
                tokens, keys, substituted = [], [], 0
                for t in range(k * self.B, (k + 1) * self.B):
                    while next_read < need[t]:
                        held[next_read] = read(next_read)
                        next_read += 1
                    sample = held.pop(int(order[t]))
                    if sample is None:  # corrupt shard, skip_corrupt: the lowest held good sample stands in
                        good = [i for i in sorted(held) if held[i] is not None]
                        if good:
                            sample = held[good[0]]
                        elif tokens:
                            sample = (keys[-1], tokens[-1])
                        else:
                            raise DataError(f"no readable sample left to stand in for corrupt shards {sorted(bad)}")
                        substituted += 1
                    keys.append(sample[0])
                    tokens.append(sample[1])
                batch = torch.from_numpy(np.stack(tokens).astype(np.int64))
                yield v + k * self.W, batch, keys, {"substituted": substituted, "corrupt": sorted(bad - reported)}
                reported |= bad
        finally:
            reader.close()


class ShardLoader:
    """Batches of ``[micro_batch_size, seq_length + 1]`` int64 tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``)
    from one split of a manifest, for data-parallel rank ``dp_rank`` of ``dp_world_size``.

    ``len(loader)`` batches per epoch, the same on every rank, computed from the manifest. ``policy`` says how the
    split's S samples become ``len x micro_batch x dp_world_size``:

    - ``"drop"`` (training): ``len = S // (micro_batch x dp_world_size)``; the remainder of the epoch's order is not
      read this epoch (with shuffle, different samples each epoch). Counted in ``stats["dropped_per_epoch"]``.
    - ``"wrap"`` (evaluation): ``len = ceil(...)``; the last batches wrap around to the start of the epoch's order,
      so every sample is read at least once. Counted in ``stats["repeated_per_epoch"]``.

    Iterating continues from the current position: epoch ``e`` batch ``c`` (0 at start), advancing to the next
    epoch after the last batch. ``state_dict()``/``load_state_dict()`` save and restore that position; the restored
    loader yields exactly the batches the uninterrupted one would have (same manifest, seed, dp_world_size,
    micro_batch_size, num_workers, shuffle_buffer, policy; rank 0's state serves every rank).

    A corrupt or truncated shard raises ``CorruptShardError`` naming it; with ``skip_corrupt=True`` its samples are
    replaced by other samples of the same worker (batch counts stay equal), logged and counted in ``stats``.
    """

    def __init__(self, manifest_path, split: str, micro_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1,
                 *, num_workers: int = 2, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1024,
                 policy: str = "drop", skip_corrupt: bool = False, with_keys: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, multiprocessing_context=None):
        self.manifest = manifest_path if isinstance(manifest_path, dict) else load_manifest(manifest_path)
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        if micro_batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"micro_batch_size {micro_batch_size} (>= 1), num_workers {num_workers} (>= 0), "
                             f"shuffle_buffer {shuffle_buffer} (>= 0)")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
        info = split_info(self.manifest, split)
        self.shards = [s for s in info["shards"] if s["samples"]]
        self.split, self.samples = split, sum(s["samples"] for s in self.shards)
        per_step = micro_batch_size * dp_world_size
        if not self.samples:
            raise DataError(f"split {split!r} of {self.manifest['manifest_path']} has no samples")
        self.batches = self.samples // per_step if policy == "drop" else math.ceil(self.samples / per_step)
        if not self.batches:
            raise DataError(f"split {split!r} of {self.manifest['manifest_path']} has {self.samples} samples, "
                            f"fewer than micro_batch_size x dp_world_size = {per_step}: use policy='wrap' or a "
                            "smaller batch")
        self.micro_batch_size, self.dp_rank, self.dp_world_size = micro_batch_size, dp_rank, dp_world_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.shuffle_buffer, self.policy, self.skip_corrupt = shuffle_buffer, policy, skip_corrupt
        self.with_keys, self.pin_memory, self.prefetch_factor = with_keys, pin_memory, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        used = self.batches * per_step
        self.stats = {"batches_per_epoch": self.batches, "samples_per_epoch": used,
                      "dropped_per_epoch": max(0, self.samples - used),
                      "repeated_per_epoch": max(0, used - self.samples),
                      "substituted_samples": 0, "corrupt_shards": []}
        self._shards_id = hashlib.sha256("".join(s["name"] + s["sha256"] for s in self.shards).encode()).hexdigest()
        self._epoch, self._batch = 0, 0
        self._tokenizer = None

    # ------------------------------------------------------------------ what the trainer needs to know
    @property
    def seq_length(self) -> int:
        return self.manifest["seq_length"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eod_id(self) -> int:
        return self.manifest["tokenizer"]["eod_id"]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.manifest)
        return self._tokenizer

    def __len__(self) -> int:
        return self.batches

    # ------------------------------------------------------------------ position
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless it is the current epoch (e.g. the one a
        ``load_state_dict`` resumed into): then the position is kept."""
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0

    def state_dict(self) -> dict:
        epoch, batch = (self._epoch + 1, 0) if self._batch >= self.batches else (self._epoch, self._batch)
        return {"epoch": epoch, "batch": batch, "split": self.split, "shards": self._shards_id, "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "micro_batch_size": self.micro_batch_size, "dp_world_size": self.dp_world_size,
                "num_workers": self.num_workers, "policy": self.policy}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``state``'s position. A state saved under a different order (other dp_world_size, batch,
        workers, seed, data...) raises ``ValueError`` naming the difference; ``strict=False`` then resumes at the
        same fraction of the epoch's samples instead (approximate: some samples may repeat or be skipped)."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in ORDER_KEYS if state.get(k) != mine[k]]
        batch = state["batch"]
        if diff:
            if strict:
                raise ValueError("loader state was saved with a different order (" + "; ".join(diff) +
                                 "): an exact resume needs the same values; load_state_dict(state, strict=False) "
                                 "resumes approximately")
            seen = batch * state.get("micro_batch_size", 0) * state.get("dp_world_size", 0)
            batch = min(seen // (self.micro_batch_size * self.dp_world_size), self.batches)
            log.warning("approximate loader resume (%s): epoch %d, batch %d", "; ".join(diff), state["epoch"], batch)
        self._epoch, self._batch = state["epoch"], batch

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if self._batch >= self.batches:
            self._epoch, self._batch = self._epoch + 1, 0
        epoch, start = self._epoch, self._batch
        stream = _EpochStream(self.manifest, self.shards, self.micro_batch_size, self.dp_rank, self.batches,
                              self.num_workers, self.seed, epoch, self.shuffle, self.shuffle_buffer, start,
                              self.skip_corrupt)
        batches = stream if self.num_workers == 0 else DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context)
        expected = start
        for item in batches:
            if isinstance(item, _WorkerFailed):
                raise item.error
            j, tokens, keys, info = item
            if j != expected:  # the order guarantee rests on the DataLoader's in-order round robin
                raise RuntimeError(f"loader got batch {j} of epoch {epoch} while batch {expected} was due")
            self._batch = expected = j + 1
            if info["substituted"] or info["corrupt"]:
                self.stats["substituted_samples"] += info["substituted"]
                for name in info["corrupt"]:
                    if name not in self.stats["corrupt_shards"]:
                        self.stats["corrupt_shards"].append(name)
                        log.warning("split %s: corrupt shard %s skipped (skip_corrupt=True)", self.split, name)
            yield (tokens, keys) if self.with_keys else tokens
        if expected != self.batches:
            raise RuntimeError(f"epoch {epoch} ended after {expected} of {self.batches} batches")
        self._epoch, self._batch = epoch + 1, 0
