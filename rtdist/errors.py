"""The errors a user can fix, and the one place that turns them into one line at every command-line entry point.

Every class below carries a message that says what is wrong, where (the file, key or rank) and what would be
right. ``cli_main`` prints it as ``error: <message>`` and exits 2; the OS errors users meet (a missing file, a full
disk, no permission) get the same treatment with the path named. Anything else is a bug in rtdist and keeps its
traceback. ``--debug`` (or ``RTDIST_DEBUG=1``) shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from typing import Callable, Optional, Sequence


class RtdistError(Exception):
    """A mistake in the input, the configuration or the environment; the message names it and the fix."""


class ConfigError(RtdistError, ValueError):
    """A configuration value that cannot work; the message names the key (``model.window_size``)."""


class DataError(RtdistError):
    """Bad input, bad flags or bad shards: the message says what and where."""


class CorruptShardError(DataError):
    """A shard does not match its manifest (truncated, overwritten, not a tar of our layout)."""


class UsageError(RtdistError):
    """A command line that cannot work: an unknown flag, a value of the wrong type or range, a missing argument."""


class CheckpointError(RtdistError):
    """A checkpoint that is missing, incomplete, corrupt or written for another model or world."""


class LaunchError(RtdistError):
    """A mistake in the launch request or the launch environment (hostfile, SLURM variables, ports)."""


class PeerTimeoutError(RtdistError):
    """Another rank stopped answering: a collective or a step did not finish within ``train.dist_timeout_s``."""


class TrainingError(RtdistError):
    """Training cannot go on (non-finite losses in a row, ...)."""


# OS errors whose cause is the user's environment, with what to do about each.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "expected a file, got a folder",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOSPC: "no space left on the device: free space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free space or write somewhere else",
    errno.EEXIST: "remove it or pick another name",
}


def describe_os_error(e: OSError) -> Optional[str]:
    """One line for an OS error users meet (None for others): what, the path, and the fix."""
    if e.errno not in _OS_FIXES:
        return None
    paths = [p for p in (e.filename, e.filename2) if p]
    where = f" ({' -> '.join(map(str, paths))})" if paths else ""
    return f"{e.strerror or os.strerror(e.errno)}{where}: {_OS_FIXES[e.errno]}"


def is_peer_failure(e: BaseException) -> bool:
    """A collective that ended because another rank died, hung or was killed (gloo/NCCL raise RuntimeErrors)."""
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, RuntimeError) and not isinstance(e, RtdistError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "DistBackendError", "Broken pipe", "NCCL error", "Socket Timeout"))


def user_error_message(e: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, else None (a bug: keep the traceback).

    Looks through ``__cause__``/``__context__`` for OS errors that other libraries wrap (torch.save on a full disk
    raises a RuntimeError from the C++ stream), and for a user error that a second error interrupted while it was
    being handled (a rank being stopped by its launcher during the clean-up)."""
    if isinstance(e, RtdistError):
        return str(e)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RtdistError):
            return str(e)
        if isinstance(e, OSError):
            msg = describe_os_error(e)
            if msg:
                return msg
        if isinstance(e, RuntimeError) and any(s in str(e) for s in ("No space left", "iostream error",
                                                                       "file write failed")):
            return f"writing a file failed ({str(e).splitlines()[0][:120]}): is the disk full?"
        e = e.__cause__ or e.__context__
    return None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are raised as ``UsageError`` instead of printing the usage and exiting, so that
    ``cli_main`` prints them as the one ``error:`` line every other mistake gets."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def bounded(kind: type = int, low=None, high=None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a number in a range, the one range check every command's flags share:
    ``type=bounded(int, 1)`` is an integer >= 1, ``bounded(float, 0, 1, above=True)`` a number in (0, 1]. Anything
    else (NaN and infinities included) is the usage error ``argument --flag: must be ..., got '...'``."""
    def num(x) -> str:
        return f"{int(x):,}" if float(x).is_integer() else str(x)

    if low is not None and high is not None:
        want = f"in {'(' if above else '['}{num(low)}, {num(high)}]"
    else:
        want = f"<= {num(high)}" if low is None else f"{'>' if above else '>='} {num(low)}"
    want = f"{'an integer' if kind is int else 'a number'} {want}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if not math.isfinite(v) or (low is not None and (v <= low if above else v < low)) or \
                (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v
    return parse


def torch_device(text: str):
    """An argparse ``type`` for ``--device``: a device torch can parse and this machine has (cpu, cuda, cuda:N, mps)."""
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise argparse.ArgumentTypeError(f"{text!r} is not available here ({have}): use cpu or one of those")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available here: use cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda[:N] and mps devices are supported")
    return str(device)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("RTDIST_DEBUG", "") not in ("", "0")


def cli_main(main: Callable[[Optional[list]], int], argv: Optional[Sequence[str]] = None, prefix: str = "") -> int:
    """Run ``main(argv)`` as a command: user errors become one ``error:`` line on stderr and exit status 2,
    Ctrl-C exits 130, bugs keep their traceback (exit 1). ``prefix`` (e.g. ``[rank 1] ``) goes before the line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        status = main(argv)
        return status if isinstance(status, int) and not isinstance(status, bool) else 0  # a result, not a status
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        msg = user_error_message(e)
        if debug or msg is None:
            traceback.print_exc()
            if msg is None:
                return 1
        print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)
        return 2
