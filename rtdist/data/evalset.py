"""The evaluation set of a split: every target token scored once, in a fixed order, padded rather than repeated.

A split's samples, in manifest order (shards as listed, samples as written), are cut from one token stream per
*segment*: consecutive samples share one token (sample i holds stream tokens ``[i L, i L + L]``). With
``tail: pack`` (text, the default) the whole split is one segment, its documents concatenated as training saw them;
with ``tail: drop`` each document is its own segment, and a key ``{doc}_000000`` starts one (the chunk count of the
key restarts with every document). So documents come back whole from the shards, across sample boundaries.

Windows of ``seq_length`` (the model's length, at most the shards') slide over each segment with ``stride`` S:
the first window of a segment scores all its targets, each later one only its last S (those the previous window did
not score), with up to ``seq_length - S`` tokens of preceding context from the same segment; a last, shorter step
ends at the segment's end. Every target of every sample is scored exactly once whatever S, and S = seq_length
scores the samples themselves (cut to ``seq_length`` when the model is shorter than the shards: then the rest of
each sample is scored by the next window, not dropped).

The windows form one fixed sequence, the same for every layout; the first ``max_windows`` of it are the evaluation
set (training's periodic and final evaluations and ``rtdist.evaluate`` score the same ones). Rank r of R takes
rows ``[t R B + r B, t R B + (r + 1) B)`` of round t; rows past the end are padding whose mask is all False, so
every rank runs the same number of batches and no window is scored twice.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from .shards import ShardReader, split_info


def iter_segments(manifest: dict, split: str, keys=None):
    """(first sample, samples) of each segment of ``split`` (module docstring), in order. With ``tail: drop`` the
    keys tell where one starts: they are read from the shards as far as the caller iterates, unless given."""
    total = sum(s["samples"] for s in split_info(manifest, split)["shards"])
    tail = (manifest.get("config") or {}).get("tail", "pack")
    if tail == "pack":
        if total:
            yield 0, total
        return
    start = 0
    for i, key in enumerate(_read_keys(manifest, split) if keys is None else keys):
        if i and key.rsplit("_", 1)[-1] == "000000":
            yield start, i - start
            start = i
    if total:
        yield start, total - start


def _read_keys(manifest: dict, split: str):
    reader = ShardReader(manifest)
    try:
        for shard in split_info(manifest, split)["shards"]:
            for i in range(shard["samples"]):
                yield reader.read(shard, i)[0]
    finally:
        reader.close()


def plan_windows(segment_samples: list[tuple[int, int]], sample_length: int, seq_length: int,
                 stride: int) -> np.ndarray:
    """Windows over segments given as (first sample, samples): rows (first sample of the segment, samples of the
    segment, window start in the segment's stream, targets scored: the window's last ones), in order."""
    L, n, S = sample_length, seq_length, stride
    rows = []
    for first, count in segment_samples:
        T = count * L  # targets of the segment: stream tokens 1..T
        end = n
        rows.append((first, count, 0, n))
        while end < T:
            step = min(S, T - end)
            end += step
            rows.append((first, count, end - n, step))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


class EvalWindows:
    """Batches ``(tokens [B, seq_length + 1] int64, mask [B, seq_length] bool)`` of the evaluation set of ``split``
    (module docstring) for data-parallel rank ``dp_rank`` of ``dp_world_size``: ``mask`` marks the targets this
    row scores (none on a padding row). ``len()`` batches, the same on every rank. ``tokens`` counts the targets the
    set scores over all ranks (every target of the split when ``max_windows`` and ``max_targets`` are None).
    ``max_targets``: the first windows that score at most that many targets: the same targets at every stride
    when it is a multiple of the stride and of the sequence length (so figures of two strides compare)."""

    def __init__(self, manifest: dict, split: str, seq_length: int, stride: Optional[int] = None,
                 micro_batch_size: int = 1, dp_rank: int = 0, dp_world_size: int = 1,
                 max_windows: Optional[int] = None, max_targets: Optional[int] = None, cache_samples: int = 8):
        L = manifest["seq_length"]
        stride = seq_length if stride is None else stride
        where = manifest.get("manifest_path", "the manifest")
        if not 1 <= seq_length <= L:
            raise DataError(f"evaluation length {seq_length} must be in 1..{L} (the shards' seq_length in {where})")
        if not 1 <= stride <= seq_length:
            raise DataError(f"--stride {stride} must be in 1..{seq_length} (the sequence length): a window scores "
                            f"its last stride tokens")
        if not 0 <= dp_rank < dp_world_size or micro_batch_size < 1 or (max_windows or 1) < 1:
            raise ValueError(f"dp_rank {dp_rank} of {dp_world_size}, micro_batch_size {micro_batch_size}, "
                             f"max_windows {max_windows}")
        self.manifest, self.split, self.L, self.n, self.stride = manifest, split, L, seq_length, stride
        self.B, self.rank, self.world = micro_batch_size, dp_rank, dp_world_size
        self.shards = [s for s in split_info(manifest, split)["shards"] if s["samples"]]
        total = sum(s["samples"] for s in self.shards)
        if not total:
            raise DataError(f"split {split!r} of {where} has no samples")
        self._ends = np.cumsum([s["samples"] for s in self.shards])
        # Only as many segments as the windows asked for need their keys read (a few images of a large split).
        parts, count, scored, self.segments = [], 0, 0, 0
        for segment in iter_segments(manifest, split):
            part = plan_windows([segment], L, seq_length, stride)
            parts.append(part)
            count, scored, self.segments = count + len(part), scored + int(part[:, 3].sum()), self.segments + 1
            if (max_windows is not None and count >= max_windows) or (max_targets is not None and
                                                                       scored >= max_targets):
                break
        windows = np.concatenate(parts)
        if max_windows is not None:
            windows = windows[:max_windows]
        if max_targets is not None:  # the windows that together score at most the first max_targets targets
            windows = windows[:max(1, int(np.searchsorted(np.cumsum(windows[:, 3]), max_targets, side="right")))]
        self.windows = windows
        self.tokens = int(windows[:, 3].sum())
        per_round = micro_batch_size * dp_world_size
        self.batches = -(-len(windows) // per_round)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_samples

    def __len__(self) -> int:
        return self.batches

    def _sample(self, reader: ShardReader, g: int) -> np.ndarray:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        k = int(np.searchsorted(self._ends, g, side="right"))
        tokens = reader.read(self.shards[k], g - int(self._ends[k] - self.shards[k]["samples"]))[1]
        self._cache[g] = tokens
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tokens

    def _window(self, reader: ShardReader, first: int, count: int, start: int) -> np.ndarray:
        """Stream tokens ``[start, start + n]`` of the segment of ``count`` samples from sample ``first``."""
        out, p, end = [], start, start + self.n + 1
        while p < end:
            j = min(p // self.L, count - 1)  # the stream's last token lives only in the last sample
            offset = p - j * self.L
            take = min(end - p, self.L + 1 - offset) if j == count - 1 else min(end - p, self.L - offset)
            out.append(self._sample(reader, first + j)[offset:offset + take])
            p += take
        return np.concatenate(out)

    def __iter__(self):
        reader = ShardReader(self.manifest)
        per_round = self.B * self.world
        try:
            for t in range(self.batches):
                tokens = torch.zeros(self.B, self.n + 1, dtype=torch.int64)
                mask = torch.zeros(self.B, self.n, dtype=torch.bool)
                for b in range(self.B):
                    w = t * per_round + self.rank * self.B + b
                    if w >= len(self.windows):
                        continue  # padding: scored nowhere
                    first, count, start, scored = self.windows[w].tolist()
                    tokens[b] = torch.from_numpy(self._window(reader, first, count, start).astype(np.int64))
                    mask[b, self.n - scored:] = True
                yield tokens, mask
        finally:
            reader.close()
            self._cache.clear()
