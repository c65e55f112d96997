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

The data position is global. An epoch's batches, taken round by round (batch 0 of ranks 0, 1, ..., then batch 1 of
every rank, ...), are one sequence of samples, the epoch's *global order*; after c batches per rank the first
``c x dp_world_size x micro_batch_size`` samples of it are consumed, whatever the gradient accumulation (an
optimizer step takes consecutive rounds). The loader's state is that count (``position``) with the layout that
ordered the epoch. Resumed under another layout (data-parallel size, micro batch, workers, shuffle buffer), the
rest of that epoch is the rest of the same global order, cut into rounds of the new layout: round t of the rest
gives rank r the samples ``[t x dp' x B' + r x B', ... + B')`` of it. So no sample is read twice or skipped, and a
run that keeps its global batch (dp x micro x accumulation) trains on exactly the batches it would have. A tail of
fewer samples than one new round is not read this epoch (as with ``policy="drop"``). Later epochs are ordered by
the new layout. The rest of an epoch is read sample by sample in that order (no shuffle buffer: it is already
shuffled).

The shards are plain webdataset tars (``webdataset.WebDataset`` reads them); this loader reads them itself, seeking
to fixed-size members, because a tar stream cannot skip to a checkpointed position and webdataset's node splitting
follows the global ``RANK`` rather than the data-parallel rank. Nothing is loaded beyond the samples in flight.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import CorruptShardError, DataError, RtdistError
from ..watchdog import leave_stop_signals_to_parent
from .shards import ShardReader, is_remote, load_manifest, manifest_store, split_info
from .tokenizers import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)
POLICIES = ("drop", "wrap")
# bytes a sequential reader takes in one read (a run of whole members, checked at once)
RUN_BYTES = 1 << 20
# a worker's batches handed to the rank in one item: about this many bytes, at most GROUP_MAX batches
GROUP_BYTES, GROUP_MAX = 256 << 10, 16
# state_dict entries that fix which samples an epoch holds and in what order: a position means nothing under others
DATA_KEYS = ("split", "shards", "seed", "shuffle")
# state_dict entries of the layout that ordered the epoch: another layout continues the same global order
LAYOUT_KEYS = ("micro_batch_size", "dp_world_size", "num_workers", "shuffle_buffer", "policy")


def batches_per_epoch(samples: int, micro_batch_size: int, dp_world_size: int, policy: str) -> int:
    per_round = micro_batch_size * dp_world_size
    return samples // per_round if policy == "drop" else math.ceil(samples / per_round)


def worker_piece(dp_rank: int, batches: int, micro_batch_size: int, num_workers: int, v: int) -> tuple[int, int]:
    """(first epoch position, number of samples) that worker ``v`` of ``dp_rank`` reads: its batches are the rank's
    batches ``v, v + W, ...``, taken from its contiguous piece of the rank's positions."""
    counts = [len(range(u, batches, num_workers)) for u in range(num_workers)]
    return dp_rank * batches * micro_batch_size + sum(counts[:v]) * micro_batch_size, counts[v] * micro_batch_size


def worker_order(n: int, seed: int, epoch: int, dp_rank: int, v: int, shuffle: bool, shuffle_buffer: int):
    rng = np.random.default_rng([seed, epoch, dp_rank, v])
    return buffer_shuffle_order(n, shuffle_buffer, rng) if shuffle else np.arange(n)


def global_order(samples: int, seed: int, epoch: int, shuffle: bool, micro_batch_size: int, dp_world_size: int,
                 num_workers: int, shuffle_buffer: int, policy: str) -> np.ndarray:
    """The epoch positions of epoch ``epoch``'s samples under this layout, in global order (round by round, rank by
    rank): entry ``(j x dp + r) x B + b`` is sample b of rank r's batch j."""
    B, dp, W = micro_batch_size, dp_world_size, max(1, num_workers)
    nb = batches_per_epoch(samples, B, dp, policy)
    out = np.empty(nb * dp * B, dtype=np.int64)
    for r in range(dp):
        for v in range(W):
            first, n = worker_piece(r, nb, B, W, v)
            order = worker_order(n, seed, epoch, r, v, shuffle, shuffle_buffer)
            j = np.arange(v, nb, W)  # the rank's batches this worker yields, in order
            out[((j[:, None] * dp + r) * B + np.arange(B)).ravel()] = first + order
    return out


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


def _in_order(items, start: int, epoch: int):
    """The batches of ``items`` (single batches, or a worker's lists of them) by batch number from ``start``. The
    DataLoader's in-order round robin hands the workers' lists over a round at a time, so at most a round waits."""
    waiting, expected = {}, start
    for item in items:
        if isinstance(item, _WorkerFailed):
            raise item.error
        for batch in item if isinstance(item, list) else [item]:
            if batch[0] < expected or batch[0] in waiting:
                raise RuntimeError(f"loader got batch {batch[0]} of epoch {epoch} twice")
            waiting[batch[0]] = batch
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1
    if waiting:
        raise RuntimeError(f"epoch {epoch}: batch {expected} never came, while {sorted(waiting)[:5]} did")


def _as_is(item):
    """The DataLoader's collate_fn: the item unchanged (its default would make the numpy batch a tensor in the
    worker, sent through a shared-memory file)."""
    return item


def locator(shards: list[dict], seed: int, epoch: int, shuffle: bool):
    """Epoch position -> (shard, index in shard), through the epoch's shard order."""
    counts = np.array([s["samples"] for s in shards])
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    ends = np.cumsum(counts[order])
    total = int(ends[-1])

    def locate(p: int) -> tuple[dict, int]:
        p %= total  # policy "wrap" runs past the end into the start of the same order
        k = int(np.searchsorted(ends, p, side="right"))
        return shards[order[k]], p - int(ends[k] - counts[order[k]])
    return locate


def fetch_counter(manifest: dict):
    """A function returning (bytes, requests) this process fetched for ``manifest``'s shards since its last call."""
    if not is_remote(manifest):
        return lambda: (0, 0)
    store = manifest_store(manifest)
    last = [store.bytes, store.requests]

    def delta() -> tuple[int, int]:
        now = [store.bytes, store.requests]
        out = (now[0] - last[0], now[1] - last[1])
        last[:] = now
        return out
    return delta


class _BatchStream(IterableDataset):
    """Yields ``self._batches()``. In a DataLoader worker it yields them in lists of consecutive batches of this
    worker (1, 2, 4, ... up to ``group`` of them, about ``GROUP_BYTES``): each item through the DataLoader's queues
    costs a fraction of a millisecond in the rank's process whatever its size, which capped 2 workers at ~2000
    batches/s. An RtdistError is handed to the main process as a ``_WorkerFailed`` item (re-raised there as the
    one-line error), not as a worker traceback."""

    group = 1

    def __iter__(self):
        if get_worker_info() is None:
            yield from self._batches()
            return
        items, size = [], 1
        try:
            for item in self._batches():
                items.append(item)
                if len(items) == size:
                    yield items
                    items, size = [], min(self.group, 2 * size)
        except RtdistError as e:
            if items:
                yield items
            yield _WorkerFailed(e)
            return
        if items:
            yield items


class _ContinuedStream(_BatchStream):
    """Yields (j, tokens, keys, info) for this worker's batches j >= ``start_batch`` of an epoch continued under
    another layout: batch j is the samples at epoch positions ``positions[j x B:(j + 1) x B]``; worker v of W
    yields j = v, v + W, ... (rotated like ``_EpochStream``). A corrupt shard's sample (``skip_corrupt``) is
    replaced by the worker's previous good sample."""

    def __init__(self, manifest: dict, shards: list[dict], positions: np.ndarray, micro_batch_size: int,
                 num_workers: int, seed: int, epoch: int, shuffle: bool, start_batch: int, skip_corrupt: bool):
        self.manifest, self.shards, self.positions = manifest, shards, positions
        self.B, self.W = micro_batch_size, max(1, num_workers)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.start, self.skip_corrupt = start_batch, skip_corrupt

    def _batches(self):
        info = get_worker_info()
        v = ((info.id if info else 0) + self.start) % self.W
        locate, reader = locator(self.shards, self.seed, self.epoch, self.shuffle), ShardReader(self.manifest)
        fetched = fetch_counter(self.manifest)
        bad: set[str] = set()
        last_good = None
        try:
            for j in range(self.start + (v - self.start) % self.W, len(self.positions) // self.B, self.W):
                tokens, keys, substituted, corrupt = [], [], 0, []
                for p in self.positions[j * self.B:(j + 1) * self.B].tolist():
                    shard, index = locate(p)
                    sample = None
                    if shard["name"] not in bad:
                        try:
                            sample = last_good = reader.read(shard, index)
                        except CorruptShardError as e:
                            if not self.skip_corrupt:
                                raise
                            bad.add(shard["name"])
                            corrupt.append(shard["name"])
                            log.warning("skipping corrupt shard (its samples are replaced): %s", e)
                    if sample is None:
                        if last_good is None:
                            raise DataError(f"no readable sample left to stand in for corrupt shards {sorted(bad)}")
                        sample, substituted = last_good, substituted + 1
                    keys.append(sample[0])
                    tokens.append(sample[1])
                yield j, np.stack(tokens), keys, {"substituted": substituted, "corrupt": corrupt, "fetched": fetched()}
        finally:
            reader.close()


class _EpochStream(_BatchStream):
    """Yields (j, tokens[B, L+1] in the shards' dtype, keys, info) for this worker's batches j of one epoch, from
    ``start_batch``. A worker reads its piece front to back in runs of whole members (``RUN_BYTES``)."""

    def __init__(self, manifest: dict, shards: list[dict], micro_batch_size: int, dp_rank: int,
                 batches: int, num_workers: int, seed: int, epoch: int, shuffle: bool, shuffle_buffer: int,
                 start_batch: int, skip_corrupt: bool):
        self.manifest, self.shards = manifest, shards
        self.B, self.rank, self.nb, self.W = micro_batch_size, dp_rank, batches, max(1, num_workers)
        self.seed, self.epoch, self.shuffle, self.K = seed, epoch, shuffle, shuffle_buffer
        self.start, self.skip_corrupt = start_batch, skip_corrupt

    def _batches(self):
        info = get_worker_info()
        v = ((info.id if info else 0) + self.start) % self.W  # rotate so DataLoader worker 0 yields batch `start`
        first, n = worker_piece(self.rank, self.nb, self.B, self.W, v)  # this worker's piece of the epoch
        order = worker_order(n, self.seed, self.epoch, self.rank, v, self.shuffle, self.K)
        need = np.maximum.accumulate(order) + 1 if n else order  # samples read before output t can leave
        locate, reader = locator(self.shards, self.seed, self.epoch, self.shuffle), ShardReader(self.manifest)
        fetched = fetch_counter(self.manifest)
        run, runs = max(1, RUN_BYTES // reader.layout.member_bytes), [1]
        bad: set[str] = set()

        def read(i: int, count: int = 1) -> list:
            """Samples i .. i + count - 1 of the piece (within one shard): (key, tokens) each, None where corrupt."""
            shard, index = locate(first + i)
            if shard["name"] in bad:
                return [None] * count
            try:  # each sample its own array: a held sample must not keep its whole run in memory
                keys, tokens = reader.read_run(shard, index, count)
                return [(key, row.copy()) for key, row in zip(keys, tokens)] if count > 1 else [(keys[0], tokens[0])]
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise
                if count > 1:  # the samples before the bad one are good, as they would be read one at a time
                    out = []
                    while len(out) < count and shard["name"] not in bad:
                        out += read(i + len(out))
                    return out + [None] * (count - len(out))
                bad.add(shard["name"])
                log.warning("skipping corrupt shard (its samples are replaced): %s", e)
                return [None]

        def read_ahead(i: int) -> list:
            """The run of samples from i on, to the end of i's shard and of the piece: 1 sample at first, twice as
            many each time up to ``run`` (a first batch, also after a resume, waits on no more than it needs)."""
            shard, index = locate(first + i)
            count = min(runs[0], shard["samples"] - index, n - i)
            runs[0] = min(run, 2 * runs[0])
            left = shard["samples"] - index - count
            if runs[0] == run and left <= run and i + count + left < n:  # streaming (not a first batch), in this
                reader.prefetch(locate(first + i + count + left)[0])  # shard's last runs: start the next one
            return read(i, count)

        counts = n // self.B
        k0 = len(range(v, self.start, self.W))  # batches of this worker before `start`
        t0, held, next_read = k0 * self.B, {}, 0
        if t0:  # resume: the buffer holds what was read and not yet emitted (read one by one: only those)
            next_read = int(need[t0 - 1])
            emitted = np.zeros(next_read, bool)
            emitted[order[:t0]] = True
            held = {int(i): read(int(i))[0] for i in np.flatnonzero(~emitted)}
        reported: set[str] = set()
        try:
            for k in range(k0, counts):
                tokens, keys, substituted = [], [], 0
                for t in range(k * self.B, (k + 1) * self.B):
                    while next_read < need[t]:
                        for sample in read_ahead(next_read):
                            held[next_read] = sample
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
                yield v + k * self.W, np.stack(tokens), keys, {"substituted": substituted,
                                                               "corrupt": sorted(bad - reported), "fetched": fetched()}
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
    epoch after the last batch. ``state_dict()``/``load_state_dict()`` save and restore that position as the number
    of samples of the epoch's global order consumed (the same on every rank: rank 0's state serves every rank). The
    restored loader yields exactly the batches the uninterrupted one would have; under another layout
    (dp_world_size, micro_batch_size, num_workers, shuffle_buffer, policy) it continues the same epoch's global
    order (module docstring), reading every sample the interrupted run had not.

    A corrupt or truncated shard raises ``CorruptShardError`` naming it; with ``skip_corrupt=True`` its samples are
    replaced by other samples of the same worker (batch counts stay equal), logged and counted in ``stats``.

    ``manifest_path`` may be a URL (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``), read with ``remote``
    (``remote.RemoteOptions``): samples are then range-read from the shard objects, only those the position needs
    (``stats["fetched_bytes"]``/``["requests"]`` count what every worker fetched); a server that stays down past
    the retry budget ends iteration with one ``RemoteError`` naming the URL.
    """

    def __init__(self, manifest_path, split: str, micro_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1,
                 *, num_workers: int = 2, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1024,
                 policy: str = "drop", skip_corrupt: bool = False, with_keys: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, multiprocessing_context=None, remote=None):
        self.manifest = manifest_path if isinstance(manifest_path, dict) else load_manifest(manifest_path, remote)
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
        self.batches = batches_per_epoch(self.samples, micro_batch_size, dp_world_size, policy)
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
                      "substituted_samples": 0, "corrupt_shards": [], "fetched_bytes": 0, "requests": 0}
        self._shards_id = hashlib.sha256("".join(s["name"] + s["sha256"] for s in self.shards).encode()).hexdigest()
        self._epoch, self._batch = 0, 0
        # The rest of the current epoch when it was ordered by another layout: (that layout's keys, the position
        # this loader started at in its global order, this rank's epoch positions for the batches left).
        self._continued: Optional[tuple[dict, int, np.ndarray]] = None
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
            self._epoch, self._batch, self._continued = epoch, 0, None

    @property
    def per_round(self) -> int:
        """Samples one batch of every rank takes from the epoch's global order."""
        return self.micro_batch_size * self.dp_world_size

    def _keys(self) -> dict:
        return {"split": self.split, "shards": self._shards_id, "seed": self.seed, "shuffle": self.shuffle,
                "micro_batch_size": self.micro_batch_size, "dp_world_size": self.dp_world_size,
                "num_workers": self.num_workers, "shuffle_buffer": self.shuffle_buffer, "policy": self.policy}

    def state_dict(self) -> dict:
        """``{"epoch", "position"}`` (samples of the epoch's global order consumed) with the keys of the data and
        of the layout that ordered the epoch."""
        keys = self._keys()
        if self._continued is not None and self._batch < self._batches_now():
            layout, start, _ = self._continued
            return {"epoch": self._epoch, "position": start + self._batch * self.per_round, **keys, **layout}
        if self._continued is not None or self._batch >= self.batches:
            return {"epoch": self._epoch + 1, "position": 0, **keys}
        return {"epoch": self._epoch, "position": self._batch * self.per_round, **keys}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``state``'s position, under this loader's layout or another (module docstring). A state of
        other data (split, shards, seed, shuffle) raises ``ValueError`` naming the difference; ``strict=False`` then
        resumes at the same fraction of the epoch's samples instead (approximate: some samples may repeat or be
        skipped). States written before positions existed (``batch``) load too."""
        mine = self._keys()
        layout = {k: state.get(k) for k in LAYOUT_KEYS}
        position = state["position"] if "position" in state else state["batch"] * layout["micro_batch_size"] * \
            layout["dp_world_size"]
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in DATA_KEYS if state.get(k) != mine[k]]
        self._continued = None
        if diff:
            if strict:
                raise ValueError("loader state was saved for other data: " + "; ".join(diff))
            batch = min(position // self.per_round, self.batches)
            log.warning("approximate loader resume (%s): epoch %d, batch %d", "; ".join(diff), state["epoch"], batch)
            self._epoch, self._batch = state["epoch"], batch
            return
        self._epoch, self._batch = state["epoch"], 0
        if layout == {k: mine[k] for k in LAYOUT_KEYS} and position % self.per_round == 0:
            self._batch = position // self.per_round
            return
        order = global_order(self.samples, self.seed, self._epoch, self.shuffle, **layout)[position:]
        rounds = len(order) // self.per_round if self.policy == "drop" else math.ceil(len(order) / self.per_round)
        mine_at = (np.arange(rounds)[:, None] * self.per_round + self.dp_rank * self.micro_batch_size
                   + np.arange(self.micro_batch_size)).ravel()
        self._continued = (layout, position, order[mine_at % max(1, len(order))])  # "wrap" runs round to the start
        log.info("loader: epoch %d continues at sample %d of the global order of layout %s", self._epoch, position,
                 layout)

    def _batches_now(self) -> int:
        """Batches of the current epoch for this loader (fewer in an epoch continued from another layout)."""
        return len(self._continued[2]) // self.micro_batch_size if self._continued is not None else self.batches

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if self._batch >= self._batches_now():
            self._epoch, self._batch, self._continued = self._epoch + 1, 0, None
        epoch, start, total = self._epoch, self._batch, self._batches_now()
        if self._continued is not None:
            stream = _ContinuedStream(self.manifest, self.shards, self._continued[2], self.micro_batch_size,
                                      self.num_workers, self.seed, epoch, self.shuffle, start, self.skip_corrupt)
        else:
            stream = _EpochStream(self.manifest, self.shards, self.micro_batch_size, self.dp_rank, self.batches,
                                  self.num_workers, self.seed, epoch, self.shuffle, self.shuffle_buffer, start,
                                  self.skip_corrupt)
        batch_bytes = self.micro_batch_size * self.manifest["sample_tokens"] * np.dtype(self.manifest["dtype"]).itemsize
        stream.group = max(1, min(GROUP_MAX, GROUP_BYTES // batch_bytes))
        # Workers hand over numpy batches in the shards' dtype (uint16 for most vocabularies): pickled through the
        # queue, a quarter of the int64 bytes and no shared-memory file per batch, which is what limited 2 workers
        # on 2 cores. They become int64 tensors here.
        batches = stream if self.num_workers == 0 else DataLoader(
            stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context,
            worker_init_fn=leave_stop_signals_to_parent)  # a stop signal to the job is the rank's to handle
        expected = start
        for j, tokens, keys, info in _in_order(batches, start, epoch):
            self._batch = expected = j + 1
            tokens = torch.from_numpy(tokens.astype(np.int64))
            if self.pin_memory:
                tokens = tokens.pin_memory()
            self.stats["fetched_bytes"] += info["fetched"][0]
            self.stats["requests"] += info["fetched"][1]
            if info["substituted"] or info["corrupt"]:
                self.stats["substituted_samples"] += info["substituted"]
                for name in info["corrupt"]:
                    if name not in self.stats["corrupt_shards"]:
                        self.stats["corrupt_shards"].append(name)
                        log.warning("split %s: corrupt shard %s skipped (skip_corrupt=True)", self.split, name)
            yield (tokens, keys) if self.with_keys else tokens
        if expected != total:
            raise RuntimeError(f"epoch {epoch} ended after {expected} of {total} batches")
        self._epoch, self._batch, self._continued = epoch + 1, 0, None
