"""The processes of the multi-rank tests that run a worker function per rank (torch.multiprocessing), forked from
a server process that has imported torch, rtdist and DeepSpeed once per test session (multiprocessing's
forkserver with those modules preloaded). Spawned instead, every rank imported them again: seconds per rank, most
of a short case's time on 2 cores.

A rank forked from the server still starts clean: the server imports modules and does nothing else (no model, no
process group, no random draws), and each worker sets its own environment (MASTER_PORT, RANK, ...) as before.
What a worker prints goes where the server's output went (the output of the test that started it); a worker's
exception comes back as torch.multiprocessing's error, with its traceback."""
import multiprocessing
import multiprocessing.forkserver
import os

import torch.multiprocessing as mp

# What the ranks import. A name that does not import here is left to the ranks (slower, not wrong).
PRELOAD = ["torch", "rtdist.train", "deepspeed", "fairscale"]


def _server_running() -> None:
    """Start the fork server, once per session, with DS_ACCELERATOR=cpu as every worker sets it: DeepSpeed picks
    its accelerator when it is imported (in the server), and these ranks run on the CPU (gloo), GPU or not."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    before = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"  # the server inherits this process's environment when it starts
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["DS_ACCELERATOR"]
        else:
            os.environ["DS_ACCELERATOR"] = before


def run_ranks(fn, nprocs: int, *args) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes at once; returns when all have ended, raises when one failed."""
    _server_running()
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver", join=True)
