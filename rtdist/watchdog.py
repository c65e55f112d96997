"""Bounded waits for a training process: a watchdog over phases (step, eval, save) and the stop signals.

A rank stuck in a collective because a peer stopped (SIGSTOP, a hung GPU, an NFS stall) cannot notice anything
itself: the main thread sits in C++ and Python signal handlers do not run. So a thread watches:

* **Phases.** The trainer wraps each step, evaluation and save in ``watchdog.phase(name, step)``. A phase that has
  not ended ``timeout_s`` after it began ends the process (exit status 3) with one line naming the rank(s) that
  stopped answering.
* **Heartbeats.** Every rank's thread bumps a counter in the rendezvous store once a second. A stopped process
  bumps nothing, so comparing two readings a few seconds apart names it (no clocks compared across hosts). A stuck
  but running rank still beats: it is named by its phase and step, behind everyone else's.
* **Signals.** SIGUSR1 and SIGTERM ask for a checkpoint and a clean exit at the next step boundary (SLURM's warning
  before the time limit, and preemption); the ranks agree through a collective (:meth:`StopRequest.agreed`).
  The C-level handler also writes the signal number to a wakeup socket this thread reads, so SIGTERM is seen even
  while the main thread is blocked: if no step boundary comes within ``grace_s``, the process exits (143) without a
  checkpoint; outside a step (start-up) at once; a second SIGTERM (not a copy of the first, below) at once.
* **Why a peer stopped.** A rank that fails on its own (a URL it cannot read, a corrupt shard, a bug) writes its
  error line where every rank can read it (:class:`FailureNotes`, in the run directory) before it leaves the process
  group; a peer whose collective then breaks ends with that line rather than only the name of the rank that stopped.
* **One stop, many deliveries.** A signal to the job reaches a rank several times: SLURM, ``kill -TERM -PGID`` and
  Ctrl-C signal the whole process group, and torchrun / srun / our launcher pass the same signal on to each rank.
  Copies within ``DUPLICATE_S`` of the first are the same request; only a later one is the impatient second
  signal. Processes a rank starts (DataLoader and preprocessing workers) ignore the stop signals
  (:func:`leave_stop_signals_to_parent`): the rank decides, and its workers must live until it has saved.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

EXIT_PEER_TIMEOUT = 3
EXIT_SIGTERM = 143
DUPLICATE_S = 5.0
_HB_KEY = "rtdist/heartbeat/{}"


def _where(phase: str, step) -> str:
    return f"step {step}" if phase == "step" else f"{phase} at step {step}"


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def leave_stop_signals_to_parent(*_args) -> None:
    """In a process a rank started (a DataLoader worker's ``worker_init_fn``, a pool's initializer): ignore the
    stop signals, which reach the whole process group, and write nothing to the parent's wakeup socket (a forked
    child inherits it). The parent stops at a step boundary and needs its workers until it has saved; they end
    with it."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing was inherited there
        signal.set_wakeup_fd(-1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """SIGUSR1 / SIGTERM (and SIGINT) received: stop at the next step boundary. Python handlers only record it."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.received: Optional[str] = None
        self._at: Optional[float] = None
        self._old = {}
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGINT and self.received == "SIGINT" and now > self._at + DUPLICATE_S:
            raise KeyboardInterrupt  # a second Ctrl-C, not the terminal's and the launcher's copies of the first
        if self.received is None or signum != signal.SIGUSR1:  # SIGTERM/SIGINT name the stop over an earlier USR1
            self.received = signal.Signals(signum).name
            self._at = self._at or now

    def agreed(self, all_reduce_max: Callable) -> bool:
        """True on every rank when any rank received a stop signal (a collective: call it on all ranks)."""
        import torch
        flag = torch.tensor([1.0 if self.received else 0.0])
        return bool(all_reduce_max(flag).item())

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class FailureNotes:
    """Each rank's one-line cause of failure, as files in ``folder`` (``RUN_DIR/failures/rank-N.txt``) that its
    peers read when their collective breaks. A rank writes its line before it leaves the process group, so the line
    is there by the time a peer's collective fails. Each note carries the run segment's id (rank 0's, given to every
    rank at start): a note an earlier segment left is never read as this one's. Notes are a courtesy to the error
    lines: a folder that cannot be written (or that other nodes do not share) only leaves the peers' lines as they
    were, naming the rank that stopped."""

    MAX_CHARS = 1000

    def __init__(self, folder, rank: int, world_size: int, segment: str):
        self.folder, self.rank, self.world_size, self.segment = Path(folder), rank, world_size, segment

    def _path(self, rank: int):
        return self.folder / f"rank-{rank}.txt"

    def record(self, error: BaseException) -> None:
        """Write this rank's cause of failure: the error's one-line message (its type and text for a bug)."""
        from .errors import user_error_message
        from .fileio import atomic_write_text
        line = " ".join((user_error_message(error) or f"{type(error).__name__}: {error}").split())
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._path(self.rank), f"{self.segment}\n{line[:self.MAX_CHARS]}\n")
        except OSError:
            pass  # the rank's own error line still says it; only its peers' lines stay less specific

    def peers(self) -> list[tuple[int, str]]:
        """(rank, its line) of every other rank that failed in this segment, in rank order."""
        out = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                segment, _, line = self._path(r).read_text().partition("\n")
            except (OSError, UnicodeDecodeError):
                continue
            if segment == self.segment and line.strip():
                out.append((r, line.strip()))
        return out


class Watchdog:
    """See the module docstring. ``store_addr`` (host, port) is the rendezvous store's; None in a single process
    (no peers to wait for: only the signal handling runs)."""

    def __init__(self, timeout_s: float, rank: int = 0, world_size: int = 1,
                 store_addr: Optional[tuple[str, int]] = None, grace_s: float = 10.0, beat_s: float = 1.0):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.grace_s, self.beat_s = grace_s, beat_s
        self.store_addr = store_addr if world_size > 1 else None
        self._phase, self._step, self._deadline, self._bound = "startup", 0, None, timeout_s
        self._sigterm_at: Optional[float] = None
        self._longest_step = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats = 0
        self._threads: list[threading.Thread] = []
        self._rfd = self._wfd = None
        self._old_wakeup = None
        self.notes: Optional[FailureNotes] = None  # set once the run directory and the segment are known

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Watchdog":
        """Start the threads; call from the main thread after the stop-signal handlers are installed."""
        self._rfd, self._wfd = socket.socketpair()
        self._wfd.setblocking(False)
        self._rfd.settimeout(0.25)  # here, not in the thread: close() may come before the thread first runs
        self._old_wakeup = signal.set_wakeup_fd(self._wfd.fileno(), warn_on_full_buffer=False)
        self._spawn(self._watch)
        if self.store_addr is not None:
            self._spawn(self._heartbeat)
        return self

    def _spawn(self, fn) -> None:
        t = threading.Thread(target=fn, name=f"rtdist-{fn.__name__.strip('_')}", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Stop watching (the threads are daemons and end at their next tick; nothing waits for them)."""
        self._stop.set()
        if self._rfd is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            self._rfd.close()
            self._wfd.close()
            self._rfd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str, step: int, timeout_s: Optional[float] = None):
        """Bound a phase by ``timeout_s`` (default the watchdog's: the steady steps' bound; the trainer gives the
        start-up phases a longer one); ends the process when it overruns (see the module docstring)."""
        t0 = time.monotonic()
        with self._lock:
            self._phase, self._step = name, step
            self._deadline, self._bound = t0 + (timeout_s or self.timeout_s), timeout_s or self.timeout_s
        try:
            yield
        finally:
            took = time.monotonic() - t0
            with self._lock:
                if name == "step":
                    self._longest_step = max(self._longest_step, took)
                self._phase, self._deadline = "idle", None

    def _bound_key(self, bound: float) -> str:
        return "train.dist_timeout_s" if bound == self.timeout_s else "train.startup_timeout_s"

    def grace(self) -> float:
        """How long SIGTERM waits for a step boundary: a healthy step always fits."""
        return max(self.grace_s, 2 * self._longest_step)

    # ------------------------------------------------------------------------------------------------ threads
    def _watch(self) -> None:
        rfd = self._rfd
        while not self._stop.is_set():
            try:
                data = rfd.recv(64)
            except (socket.timeout, BlockingIOError):
                data = b""
            except OSError:
                return
            for signum in data:
                self._on_signal(signum)
            now = time.monotonic()
            with self._lock:
                phase, step, deadline, term = self._phase, self._step, self._deadline, self._sigterm_at
                bound = self._bound
            # a save or an export under way is waited for: it leaves a complete checkpoint or the final model
            if term is not None and phase not in ("save", "export") and now > term + self.grace():
                _say(f"rank {self.rank}: SIGTERM, and no step boundary came within {self.grace():.0f} s "
                     f"({_where(phase, step)}){self.peers_suffix()}: exiting without a checkpoint; the last "
                     f"complete checkpoint stays loadable")
                os._exit(EXIT_SIGTERM)
            if deadline is not None and now > deadline:
                _say(f"error: rank {self.rank}: {_where(phase, step)} did not finish within {self._bound_key(bound)} = "
                     f"{bound:g} s{self.peers_suffix()}: exiting (the last complete checkpoint "
                     f"stays loadable; raise {self._bound_key(bound)} if it really takes this long)")
                os._exit(EXIT_PEER_TIMEOUT)

    def _on_signal(self, signum: int) -> None:
        if signum not in (signal.SIGTERM, signal.SIGINT):
            return  # SIGUSR1 is only a request for a checkpoint: the step boundary handles it
        now = time.monotonic()
        with self._lock:
            phase, first = self._phase, self._sigterm_at
            if first is None:
                self._sigterm_at = now
            elif now <= first + DUPLICATE_S:
                return  # another copy of the same stop (process group + launcher)
            again = first is not None
        if again or phase == "startup":
            _say(f"rank {self.rank}: stopped by {signal.Signals(signum).name} "
                 f"{'(second time)' if again else 'before training started'}")
            os._exit(EXIT_SIGTERM if signum == signal.SIGTERM else 130)

    def _heartbeat(self) -> None:
        store, beating = None, False
        while not self._stop.is_set():
            try:
                if store is None:
                    if not self._reachable():
                        if beating:
                            return  # the store went away with the process that held it: nothing left to beat to
                        self._stop.wait(self.beat_s)
                        continue
                    store = self._client(timeout_s=max(5.0, 3 * self.beat_s))
                self._beats += 1
                with self._lock:
                    phase, step = self._phase, self._step
                store.set(_HB_KEY.format(self.rank), f"{self._beats} {step} {phase} {socket.gethostname()} "
                                                     f"{os.getpid()}")
                beating = True
            except Exception:  # noqa: BLE001 - the deadline still holds without heartbeats
                store = None
            self._stop.wait(self.beat_s)

    def _reachable(self, timeout_s: float = 2.0) -> bool:
        """A plain connect first: torch's store client logs every failed retry loudly."""
        try:
            socket.create_connection(self.store_addr, timeout=timeout_s).close()
            return True
        except OSError:
            return False

    def _client(self, timeout_s: float):
        from torch.distributed import TCPStore
        host, port = self.store_addr
        return TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                        wait_for_workers=False)

    # --------------------------------------------------------------------------------------------- diagnosis
    def _read_beats(self, store) -> dict[int, list[str]]:
        out = {}
        for r in range(self.world_size):
            try:
                out[r] = store.get(_HB_KEY.format(r)).decode().split()
            except Exception:  # noqa: BLE001 - never beat (died before its first beat)
                out[r] = None
        return out

    def diagnose(self, wait_s: Optional[float] = None) -> str:
        """Which peers stopped answering: ranks whose heartbeat did not advance over ``wait_s`` (default three
        beats), else the ranks furthest behind. Bounded: gives up on a store that does not answer."""
        if self.store_addr is None:
            return ""
        wait_s = 3 * self.beat_s if wait_s is None else wait_s
        result: list[str] = []

        def probe():
            if not self._reachable():
                return
            store = self._client(timeout_s=3.0)
            first = self._read_beats(store)
            time.sleep(wait_s)
            second = self._read_beats(store)
            stopped = [r for r in range(self.world_size) if r != self.rank
                       and (second[r] is None or first[r] is None or second[r][0] == first[r][0])]
            if stopped:
                who = ", ".join(f"rank {r}" + (f" ({second[r][3]} pid {second[r][4]}, last seen in "
                                               f"{_where(second[r][2], second[r][1])})" if second[r] else " (never seen)")
                                for r in stopped)
                result.append(f"{who} stopped answering (no heartbeat for {wait_s:g} s)")
                return
            steps = {r: (int(b[1]), b[2]) for r, b in second.items() if b}
            low = min(s for s, _ in steps.values())
            behind = [r for r, (s, _) in steps.items() if s == low and r != self.rank]
            if behind and low < max(s for s, _ in steps.values()):
                result.append(", ".join(f"rank {r} (alive, in {_where(steps[r][1], steps[r][0])})" for r in behind)
                              + " is behind the others: it is stuck in its own work")
            else:
                result.append("every rank is alive and at the same step: a collective itself is stuck")

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(wait_s + 3)
        if not result:
            host, port = self.store_addr
            return (f"the rendezvous store at {host}:{port} does not answer: the process that holds it (rank 0 or "
                    f"the launcher) or its host stopped")
        return result[0]

    def noted_failures(self) -> str:
        """The error lines of the peers that failed on their own ("" when none left one)."""
        noted = self.notes.peers() if self.notes is not None else []
        return "; ".join(f"rank {r} failed: {line}" for r, line in noted)

    def peers_suffix(self) -> str:
        """``": <why the peers stopped>"`` for an error line ("" in a single process): the error line of a peer that
        failed on its own, else which peers stopped answering."""
        if self.store_addr is None:
            return ""
        noted = self.noted_failures()
        if noted:
            return f": {noted}"
        try:
            d = self.diagnose()
        except Exception as e:  # noqa: BLE001
            d = f"could not ask the other ranks ({type(e).__name__}: {e})"
        noted = self.noted_failures()  # a peer may have written its line while we were asking
        return f": {noted or d}" if noted or d else ""
