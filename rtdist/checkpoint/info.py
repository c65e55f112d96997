"""``python -m rtdist.checkpoint info RUN_DIR``: what a checkpoint holds and what it can resume on, in words."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..config import sequence_parallel_sizes
from ..errors import ArgumentParser, CheckpointError, cli_main
from ..parallel.reshard import whole_files
from .marker import MARKER, Marker, marker_or_problem, read_marker
from .store import candidates, is_complete, verify


def resume_shapes(marker: Marker) -> list[str]:
    """What a checkpoint can resume on, in words: which shapes load its files as they are, which need resharding,
    and the layouts that keep its global batch."""
    t, m = marker.train, marker.model
    engine, stage, world = marker.engine or "?", marker.zero_stage or 0, marker.world_size or "?"
    whole = whole_files(engine, stage, marker.precision)
    lines = [f"as it is: {engine} ZeRO-{stage} on {'any world size' if whole else f'{world} rank(s)'}",
             "resharded at resume (DeepSpeed ZeRO files through ds_to_universal): any other world size, ZeRO stage "
             "0-3 or engine (deepspeed, torch, fairscale without FullyShardedDataParallel); the model shape stays"]
    batch, micro = marker.samples_per_step, t.get("train_micro_batch_size_per_gpu")
    if batch and micro:
        dps = [d for d in range(1, batch + 1) if batch % (micro * d) == 0]
        lines.append(f"the global batch of {batch} samples is kept (train.gradient_accumulation_steps derived) on "
                     f"data-parallel sizes {dps} with micro batch {micro}, "
                     f"{[d for d in range(1, batch + 1) if batch % d == 0]} with a smaller one")
    seq, w = t.get("seq_length"), max(m.get("window_size") or 1, m.get("local_window_size") or 1)
    if seq:
        lines.append(f"parallel.sequence_parallel_size {sequence_parallel_sizes(seq, w)} "
                     f"(train.seq_length {seq}, window {w}); world = data-parallel size x that")
    return lines


def describe(step_dir: Path) -> list[str]:
    """A checkpoint in words: step, the shape that wrote it, its data position, what it can resume on."""
    marker = read_marker(step_dir)
    t = marker.train
    out = [f"checkpoint {step_dir}: complete, {len(marker.files)} files, "
           f"{sum(f['bytes'] for f in marker.files.values()) / 2 ** 20:.1f} MiB",
           f"  step {marker.step}, written by {marker.world_size} rank(s) = {marker.dp_size} "
           f"data-parallel x {marker.sp_size or 1} sequence-parallel, engine {marker.engine}, "
           f"ZeRO-{marker.zero_stage}, {marker.precision}"]
    if marker.samples_per_step and t:
        out.append(f"  global batch {marker.samples_per_step} samples per step = {marker.dp_size} data-parallel x "
                   f"micro batch {t['train_micro_batch_size_per_gpu']} x accumulation "
                   f"{t['gradient_accumulation_steps']}; train.seq_length {t.get('seq_length')}")
    data = marker.data
    if data is None and (step_dir / "rtdist_rank0.pt").is_file():  # written before the marker held it
        data = torch.load(step_dir / "rtdist_rank0.pt", map_location="cpu", weights_only=False).get("loader")
    if data:
        position = data.get("position", data.get("batch", 0) * data["micro_batch_size"] * data["dp_world_size"])
        out.append(f"  data position: epoch {data['epoch']}, {position} samples of its global order consumed (the "
                   f"order of {data['dp_world_size']} data-parallel x micro batch {data['micro_batch_size']}, "
                   f"{data['num_workers']} worker(s); split {data['split']!r}, seed {data['seed']})")
    return out + ["  resumes on:"] + [f"    {line}" for line in resume_shapes(marker)]


def find(path: Path) -> Path:
    """The checkpoint a path means: itself, or the newest in a run directory or its checkpoints/ whose marker can
    be read (as ``--resume auto`` would take it; that also checks the files)."""
    if is_complete(path):
        return path
    inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    cands = candidates(inner)
    for cand in cands:
        problem = marker_or_problem(cand)[1]
        if problem is None:
            return cand
        print(f"warning: checkpoint {cand}: {problem}: --resume auto skips it")
    if cands:
        raise CheckpointError(f"{path}: no checkpoint there has a readable '{MARKER}' marker "
                              f"({', '.join(c.name for c in cands)})")
    raise CheckpointError(f"{path}: no complete checkpoint there (give a run directory, its checkpoints/ or a "
                          f"global_stepN folder with a '{MARKER}' marker)")


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv) -> int:
    p = ArgumentParser(prog="python -m rtdist.checkpoint", description="What a checkpoint holds.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="step, the shape that wrote it, data position, shapes it can resume on")
    info.add_argument("path", type=Path, help="a run directory, its checkpoints/ folder, or one global_stepN")
    info.add_argument("--verify", action="store_true", help="also check every file against its sha256")
    info.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = p.parse_args(argv)
    step_dir = find(args.path)
    print("\n".join(describe(step_dir)))
    if args.verify:
        problems = verify(step_dir)
        print(f"  checksums: {'; '.join(problems) if problems else 'every file matches'}")
        return 2 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
