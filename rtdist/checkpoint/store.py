"""The files of a checkpoint: saving under a staging name, the ``complete`` marker with every file's sha256,
finding the newest good one, verifying, retention, and this rank's own state file (see the package docstring)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dist as rdist
from ..errors import CheckpointError, is_peer_failure, user_error_message
from ..fileio import atomic_torch_save, atomic_write_text, fsync_dir, sha256_file
from .marker import MARKER, Marker, marker_or_problem, read_marker

_STEP_RE = re.compile(r"^global_step(\d+)$")
_STAGING_RE = re.compile(r"^global_step\d+\.(tmp|stale)-")
_OWNER_RE = re.compile(r"(?:zero_pp_rank_|rtdist_rank)(\d+)")


def fault_point(where: str, step: int) -> None:
    """Fault injection for the crash tests: RTDIST_FAULT="save:STEP[:RANK]" or "step:STEP[:RANK]" makes this
    process die abruptly (os._exit, like a SIGKILL: no cleanup, no atexit) at that point."""
    spec = os.environ.get("RTDIST_FAULT")
    if not spec:
        return
    kind, at, *who = spec.split(":")
    if kind == where and int(at) == step and (not who or int(who[0]) == rdist.rank()):
        sys.stderr.write(f"RTDIST_FAULT: rank {rdist.rank()} dies at {where} {step}\n")
        sys.stderr.flush()
        os._exit(17)


# ------------------------------------------------------------------------------------------------- finding


def is_complete(step_dir: Path) -> bool:
    """Whether a save got as far as its marker. A marker that is there but unreadable (a folder, junk bytes) still
    counts: that checkpoint is corrupt, to be skipped with a warning, not an unfinished save to be cleaned away."""
    return os.path.lexists(step_dir / MARKER)


def complete_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and is_complete(p):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _latest_named(ckpt_dir: Path) -> Optional[Path]:
    latest = ckpt_dir / "latest"
    try:
        return ckpt_dir / latest.read_text().strip() if latest.is_file() else None
    except OSError:
        return None


def candidates(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first (the one ``latest`` names first when it is complete)."""
    steps = [ckpt_dir / f"global_step{s}" for s in reversed(complete_steps(ckpt_dir))]
    named = _latest_named(ckpt_dir)
    if named is not None and named in steps:
        steps.remove(named)
        steps.insert(0, named)
    return steps


# ------------------------------------------------------------------------------------------------ checksums


def _owner(name: str, world: int) -> int:
    """The rank that wrote (so hashes, from its page cache) a file: DeepSpeed's per-rank files and ours name it."""
    m = _OWNER_RE.search(name)
    return int(m.group(1)) % world if m else 0


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MARKER)


def checksum_files(step_dir: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file of a checkpoint, each rank hashing its own (collective;
    every rank's files must be written before it is called)."""
    files = rdist.broadcast_object(_files(step_dir) if rdist.rank() == 0 else None)
    world, me = rdist.world_size(), rdist.rank()
    mine = {f: {"bytes": (step_dir / f).stat().st_size, "sha256": sha256_file(step_dir / f)}
            for f in files if _owner(f, world) == me}
    out = {}
    for part in rdist.all_gather_object(mine):
        out.update(part)
    return out


def verify(step_dir: Path) -> list[str]:
    """Problems of a complete checkpoint's files against its marker (collective; the same list on every rank).
    A marker without a file list (written before checksums existed) verifies trivially; an unreadable or damaged
    marker is a problem."""
    marker, problem = marker_or_problem(step_dir)
    files, problems = marker.files if marker else {}, [problem] if problem else []
    if files:
        world, me = rdist.world_size(), rdist.rank()
        for name, want in files.items():
            if _owner(name, world) != me:
                continue
            path = step_dir / name
            try:
                size = path.stat().st_size
            except OSError as e:
                problems.append(f"{name} is missing ({e.strerror})")
                continue
            if size != want["bytes"]:
                problems.append(f"{name} has {size} bytes, the marker says {want['bytes']}")
            elif sha256_file(path) != want["sha256"]:
                problems.append(f"{name} does not match its sha256 in the marker (flipped or overwritten bytes)")
    return sorted({p for part in rdist.all_gather_object(problems) for p in part})  # every rank reads the marker


# ----------------------------------------------------------------------------------------------------- save


def _clean_staging(ckpt_dir: Path) -> None:
    """Remove what crashed saves left behind (rank 0, under the run directory's lock)."""
    for p in ckpt_dir.iterdir():
        if _STAGING_RE.match(p.name) or (p.name.startswith("latest.tmp")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        elif _STEP_RE.match(p.name) and p.is_dir() and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)  # an unfinished save of an older rtdist (never complete)


def save(engine, ckpt_dir: Path, step: int, rank_state: dict, marker: Marker, log: Callable = print,
         keep_existing: bool = False, keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the step directory. ``marker``: what the ``complete`` marker says
    besides the file list, which this adds. ``keep_last``: then keep that many complete checkpoints (:func:`prune`).

    ``keep_existing``: when the step already has a complete checkpoint, write nothing (the trainer passes it when
    nothing was trained since resuming from that very checkpoint). Otherwise an existing checkpoint of the step is
    replaced by a switch of names once the new one is complete: nothing is deleted before its replacement is
    whole, and no rank is reading it then (every rank finished loading before training began)."""
    final = ckpt_dir / f"global_step{step}"
    exists = rdist.broadcast_object(is_complete(final) if rdist.rank() == 0 else None)
    if exists and keep_existing:
        if rdist.rank() == 0:
            log(f"checkpoint {final} already holds this state: kept as it is")
        return final
    nonce = rdist.broadcast_object(f"{os.getpid()}-{time.time_ns()}" if rdist.rank() == 0 else None)
    staging = ckpt_dir / f"global_step{step}.tmp-{nonce}"
    error = None
    if rdist.rank() == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _clean_staging(ckpt_dir)
            staging.mkdir()
        except OSError as e:
            error = e
    if rdist.broadcast_object(error is not None):
        raise CheckpointError(_save_failed(ckpt_dir, step, error))
    try:
        engine.save(staging)
        atomic_torch_save(rank_state, staging / f"rtdist_rank{rdist.rank()}.pt")
    except Exception as e:
        # Raise at once: the engine's save has collectives of its own, so this rank cannot join a common one now;
        # the other ranks stop at their next collective, and the staging folder is never taken for a checkpoint.
        if rdist.rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if is_peer_failure(e):
            raise  # another rank failed first: the trainer names it
        raise CheckpointError(_save_failed(ckpt_dir, step, e)) from e
    fault_point("save", step)  # the crash tests kill a rank here: files written, no marker yet
    rdist.barrier()  # every rank's files are written before rank 0 lists them
    files = checksum_files(staging)
    if rdist.rank() == 0:
        marker = dataclasses.replace(marker, files=files)
        atomic_write_text(staging / MARKER, json.dumps(marker.to_dict(), indent=1))
        fsync_dir(staging)
        aside = None
        if final.exists():
            aside = ckpt_dir / f"global_step{step}.stale-{nonce}"
            os.replace(final, aside)
        os.replace(staging, final)
        fsync_dir(ckpt_dir)
        atomic_write_text(ckpt_dir / "latest", final.name)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if keep_last:
            removed = prune(ckpt_dir, keep_last)
            if removed:
                log(f"train.keep_last {keep_last}: removed {', '.join(removed)}")
    rdist.barrier()
    return final


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Remove complete checkpoints beyond the newest ``keep_last`` (rank 0, under the run directory's lock, after
    a save: no rank reads an older one then). The one ``latest`` names is never removed. Each goes by a rename to a
    ``.stale-`` name first, so a crash mid-removal leaves debris the next save cleans, never a checkpoint that
    looks complete and is not. Returns the names removed."""
    steps = complete_steps(ckpt_dir)
    keep = {ckpt_dir / f"global_step{s}" for s in steps[-keep_last:]} | {_latest_named(ckpt_dir)}
    removed = []
    for step in steps:
        path = ckpt_dir / f"global_step{step}"
        if path in keep:
            continue
        aside = ckpt_dir / f"{path.name}.stale-prune-{os.getpid()}"
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(path.name)
    if removed:
        fsync_dir(ckpt_dir)
    return removed


def _save_failed(ckpt_dir: Path, step: int, e: BaseException) -> str:
    what = user_error_message(e) or f"{type(e).__name__}: {e}"
    try:
        free = shutil.disk_usage(ckpt_dir).free
        if free < 64 << 20:
            what = f"no space left on the device ({free / 2 ** 20:.0f} MiB free there): free space or save elsewhere"
    except OSError:
        pass
    prev = complete_steps(ckpt_dir)
    keep = f"global_step{prev[-1]}" if prev else "none"
    return (f"saving checkpoint step {step} in {ckpt_dir} failed: {what}; nothing was replaced: the last complete "
            f"checkpoint ({keep}) stays loadable")


# ----------------------------------------------------------------------------------------------------- load


def resolve_resume(ckpt_dir: Path, resume: Optional[str], log: Callable = print) -> Optional[Path]:
    """The checkpoint to resume from (collective: it verifies checksums).

    ``None``/"none": no resume. "auto": the newest complete checkpoint that verifies (``latest``'s first); a
    corrupt one is skipped with a line saying so, and only when every one is corrupt it is an error. A path (a
    step directory, or a run/checkpoints directory whose newest one is meant) or a bare step name
    (``global_step6``, looked up in ``ckpt_dir``): that checkpoint, which must be complete and verify."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return _newest_good(ckpt_dir, "--resume auto", log, none_ok=True)
    path = Path(resume)
    if not path.exists() and os.sep not in resume and (ckpt_dir / resume).exists():
        path = ckpt_dir / resume
    if not path.exists():
        have = complete_steps(ckpt_dir)
        raise CheckpointError(f"--resume {resume}: no such checkpoint ({path.resolve()} does not exist); complete "
                              f"ones in {ckpt_dir}: {', '.join(f'global_step{s}' for s in have) or 'none'} "
                              f"(--resume auto takes the newest)")
    if not _STEP_RE.match(path.name) and not is_complete(path):  # a run or checkpoints directory
        inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        return _newest_good(inner, f"--resume {resume}", log, none_ok=False)
    if not is_complete(path):
        raise CheckpointError(f"--resume {resume}: {path} is not a complete checkpoint (no '{MARKER}' marker: its "
                              f"save never finished); complete ones in {path.parent}: "
                              f"{', '.join(f'global_step{s}' for s in complete_steps(path.parent)) or 'none'}")
    problems = verify(path)
    if problems:
        raise CheckpointError(f"--resume {resume}: checkpoint {path} is corrupt: {'; '.join(problems[:3])}; "
                              f"resume from an earlier one (--resume auto skips corrupt ones)")
    return path


def _newest_good(ckpt_dir: Path, what: str, log: Callable, none_ok: bool) -> Optional[Path]:
    cands = candidates(ckpt_dir)
    bad = []
    for cand in cands:
        problems = verify(cand)
        if not problems:
            if bad and rdist.rank() == 0:
                log(f"{what}: resuming from {cand.name} instead")
            return cand
        bad.append(cand.name)
        if rdist.rank() == 0:
            log(f"warning: checkpoint {cand} is corrupt ({'; '.join(problems[:2])}): skipping it")
    if bad:
        raise CheckpointError(f"{what}: every complete checkpoint in {ckpt_dir} is corrupt ({', '.join(bad)}); "
                              f"restore them from a copy, or start over with --resume none in a new --run-dir")
    if not none_ok:
        raise CheckpointError(f"{what}: no complete checkpoint in {ckpt_dir}")
    return None


def load_rank_state(step_dir: Path) -> dict:
    """This rank's state (data position, step counts, RNG streams). On another world size, rank 0's without its
    RNG streams: the data position and the step counts are the same on every rank, the streams belong to ranks
    that no longer exist."""
    same_world = read_marker(step_dir).world_size == rdist.world_size()
    path = step_dir / f"rtdist_rank{rdist.rank() if same_world else 0}.pt"
    if not path.is_file():
        raise CheckpointError(f"{step_dir} has no {path.name} (a checkpoint of an older rtdist?): resume with the "
                              f"world size that wrote it")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not same_world:
        state.pop("rng", None)
    return state
