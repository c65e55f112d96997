"""Checkpoints in the DeepSpeed layout (``dir/global_step{N}/`` + ``dir/latest``) that cannot be lost or silently wrong.

* A checkpoint is written under a staging name (``global_step{N}.tmp-<nonce>``) and renamed to ``global_step{N}``
  only after every rank's files are written and its ``complete`` marker, which lists every file with its size and
  sha256, is in place; ``latest`` is replaced atomically after that. A crash at any moment leaves the previous
  checkpoint loadable and the staging folder unmistakably unfinished (it is removed by the next save).
* A complete checkpoint is never deleted or rewritten: saving a step that already has one is a no-op (a finished
  run that is resubmitted resumes at its last step, trains nothing and saves nothing).
* Loading verifies the files against the marker, each rank the files it wrote (agreement all-reduced).
  ``--resume auto`` skips a corrupt checkpoint for the previous complete one, with a line saying so.

Per-rank state (data-loader position, RNG states) goes next to the engine's files as ``rtdist_rank{r}.pt``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import dist as rdist
from .errors import CheckpointError, is_peer_failure, user_error_message

MARKER = "complete"
_STEP_RE = re.compile(r"^global_step(\d+)$")
_STAGING_RE = re.compile(r"^global_step\d+\.(tmp|stale)-")
_OWNER_RE = re.compile(r"(?:zero_pp_rank_|rtdist_rank)(\d+)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# ------------------------------------------------------------------------------------------------- finding


def is_complete(step_dir: Path) -> bool:
    """Whether a save got as far as its marker. A marker that is there but unreadable (a folder, junk bytes) still
    counts: that checkpoint is corrupt, to be skipped with a warning, not an unfinished save to be cleaned away."""
    return os.path.lexists(step_dir / MARKER)


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


def _marker(step_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the marker, None), or (None, what is wrong with it)."""
    path = step_dir / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a folder, no permission, empty, junk bytes, invalid JSON
        what = "it is empty" if path.is_file() and path.stat().st_size == 0 else str(e)
        return None, f"its '{MARKER}' marker cannot be read ({what})"
    problem = marker_problem(marker)
    return (None, f"its '{MARKER}' marker is damaged ({problem})") if problem else (marker, None)


def read_marker(step_dir: Path) -> dict:
    """The ``complete`` marker of a checkpoint; a CheckpointError naming it when it cannot be read or is damaged."""
    marker, problem = _marker(step_dir)
    if problem:
        raise CheckpointError(f"checkpoint {step_dir}: {problem}")
    return marker


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    marker, problem = _marker(step_dir)
    files, problems = (marker or {}).get("files"), [problem] if problem else []
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


def save(engine, ckpt_dir: Path, step: int, rank_state: dict, meta: dict, log: Callable = print,
         keep_existing: bool = False) -> Path:
    """Collective: every rank calls it. Returns the step directory.

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
        atomic_write_text(staging / MARKER, json.dumps({**meta, "files": files}, indent=1))
        _fsync_dir(staging)
        aside = None
        if final.exists():
            aside = ckpt_dir / f"global_step{step}.stale-{nonce}"
            os.replace(final, aside)
        os.replace(staging, final)
        _fsync_dir(ckpt_dir)
        atomic_write_text(ckpt_dir / "latest", final.name)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    rdist.barrier()
    return final


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
    same_world = read_marker(step_dir).get("world_size") == rdist.world_size()
    path = step_dir / f"rtdist_rank{rdist.rank() if same_world else 0}.pt"
    if not path.is_file():
        raise CheckpointError(f"{step_dir} has no {path.name} (a checkpoint of an older rtdist?): resume with the "
                              f"world size that wrote it")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not same_world:
        state.pop("rng", None)
    return state


# ----------------------------------------------------------------------------------------------------- info


def global_batch(marker: dict) -> Optional[int]:
    """Samples per optimizer step of the run that wrote a checkpoint (data-parallel x micro x accumulation)."""
    t = (marker.get("config") or {}).get("train") or {}
    if marker.get("global_batch"):
        return marker["global_batch"]
    if "train_micro_batch_size_per_gpu" in t and marker.get("dp_size"):
        return t["train_micro_batch_size_per_gpu"] * t["gradient_accumulation_steps"] * marker["dp_size"]
    return None


def resume_shapes(marker: dict) -> list[str]:
    """What a checkpoint can resume on, in words: which shapes load its files as they are, which need resharding,
    and the layouts that keep its global batch."""
    from .parallel.reshard import whole_files
    cfg = marker.get("config") or {}
    t, m = cfg.get("train") or {}, cfg.get("model") or {}
    engine, stage, world = marker.get("engine", "?"), marker.get("zero_stage", 0), marker.get("world_size", "?")
    whole = whole_files(engine, stage, t.get("precision", "fp32"))
    lines = [f"as it is: {engine} ZeRO-{stage} on {'any world size' if whole else f'{world} rank(s)'}",
             "resharded at resume (DeepSpeed ZeRO files through ds_to_universal): any other world size, ZeRO stage "
             "0-3 or engine (deepspeed, torch, fairscale without FullyShardedDataParallel); the model shape stays"]
    batch, micro = global_batch(marker), t.get("train_micro_batch_size_per_gpu")
    if batch and micro:
        dps = [d for d in range(1, batch + 1) if batch % (micro * d) == 0]
        lines.append(f"the global batch of {batch} samples is kept (train.gradient_accumulation_steps derived) on "
                     f"data-parallel sizes {dps} with micro batch {micro}, "
                     f"{[d for d in range(1, batch + 1) if batch % d == 0]} with a smaller one")
    seq, w = t.get("seq_length"), max(m.get("window_size") or 1, m.get("local_window_size") or 1)
    if seq:
        lines.append(f"parallel.sequence_parallel_size {[s for s in range(1, seq // w + 1) if seq % (s * w) == 0]} "
                     f"(train.seq_length {seq}, window {w}); world = data-parallel size x that")
    return lines


def describe(step_dir: Path) -> list[str]:
    """A checkpoint in words: step, the shape that wrote it, its data position, what it can resume on."""
    marker = read_marker(step_dir)
    files = marker.get("files") or {}
    t = (marker.get("config") or {}).get("train") or {}
    out = [f"checkpoint {step_dir}: complete, {len(files)} files, "
           f"{sum(f['bytes'] for f in files.values()) / 2 ** 20:.1f} MiB",
           f"  step {marker.get('step')}, written by {marker.get('world_size')} rank(s) = {marker.get('dp_size')} "
           f"data-parallel x {marker.get('sp_size', 1)} sequence-parallel, engine {marker.get('engine')}, "
           f"ZeRO-{marker.get('zero_stage')}, {t.get('precision', 'fp32')}"]
    if global_batch(marker) and t:
        out.append(f"  global batch {global_batch(marker)} samples per step = {marker.get('dp_size')} data-parallel x "
                   f"micro batch {t['train_micro_batch_size_per_gpu']} x accumulation "
                   f"{t['gradient_accumulation_steps']}; train.seq_length {t.get('seq_length')}")
    data = marker.get("data")
    if data is None and (step_dir / "rtdist_rank0.pt").is_file():  # written before the marker held it
        data = torch.load(step_dir / "rtdist_rank0.pt", map_location="cpu", weights_only=False).get("loader")
    if data:
        position = data.get("position", data.get("batch", 0) * data["micro_batch_size"] * data["dp_world_size"])
        out.append(f"  data position: epoch {data['epoch']}, {position} samples of its global order consumed (the "
                   f"order of {data['dp_world_size']} data-parallel x micro batch {data['micro_batch_size']}, "
                   f"{data['num_workers']} worker(s); split {data['split']!r}, seed {data['seed']})")
    return out + ["  resumes on:"] + [f"    {line}" for line in resume_shapes(marker)]


def _find(path: Path) -> Path:
    if is_complete(path):
        return path
    inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    cands = candidates(inner)
    for cand in cands:  # the newest whose marker can be read, as --resume auto would (it also checks the files)
        problem = _marker(cand)[1]
        if problem is None:
            return cand
        print(f"warning: checkpoint {cand}: {problem}: --resume auto skips it")
    if cands:
        raise CheckpointError(f"{path}: no checkpoint there has a readable '{MARKER}' marker "
                              f"({', '.join(c.name for c in cands)})")
    raise CheckpointError(f"{path}: no complete checkpoint there (give a run directory, its checkpoints/ or a "
                          f"global_stepN folder with a '{MARKER}' marker)")


def main(argv=None) -> int:
    """``python -m rtdist.checkpoint info RUN_DIR``: what the newest complete checkpoint holds."""
    from .errors import cli_main
    return cli_main(_main, argv)


def _main(argv) -> int:
    from .errors import ArgumentParser
    p = ArgumentParser(prog="python -m rtdist.checkpoint", description="What a checkpoint holds.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="step, the shape that wrote it, data position, shapes it can resume on")
    info.add_argument("path", type=Path, help="a run directory, its checkpoints/ folder, or one global_stepN")
    info.add_argument("--verify", action="store_true", help="also check every file against its sha256")
    info.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = p.parse_args(argv)
    step_dir = _find(args.path)
    print("\n".join(describe(step_dir)))
    if args.verify:
        problems = verify(step_dir)
        print(f"  checksums: {'; '.join(problems) if problems else 'every file matches'}")
        return 2 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
