"""The GPU cluster path, checked where CI runs (no GPU): the backend each collective's tensors meet, the host-device
synchronisations of a training step, the RNG streams a resume restores, the batches read ahead onto the device,
the per-phase time bounds."""
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rtdist import checkpoint as ckpt
from rtdist import dist as rdist
from rtdist.data.prefetch import DevicePrefetcher


# ----------------------------------------------------------------------------------------------- backends

def test_host_tensors_meet_gloo_and_device_tensors_nccl(monkeypatch):
    monkeypatch.delenv("RTDIST_DIST_BACKEND", raising=False)
    assert rdist.default_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert rdist.default_backend(cuda=False) == "gloo"
    monkeypatch.setenv("RTDIST_DIST_BACKEND", "cpu:gloo,cuda:gloo")  # ranks sharing one GPU (NCCL refuses)
    assert rdist.default_backend(cuda=True) == "cpu:gloo,cuda:gloo"


def test_a_rank_takes_its_local_gpu_among_the_visible_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task (CUDA_VISIBLE_DEVICES per task)
    assert rdist.local_device(rdist.DistInfo(rank=5, world_size=8, local_rank=3)) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert rdist.local_device(rdist.DistInfo(rank=5, world_size=8, local_rank=3)) == torch.device("cuda", 3)


def test_a_rendezvous_host_that_does_not_resolve_is_named_at_once():
    info = rdist.DistInfo(rank=1, world_size=2, master_addr="no-such-host.invalid", master_port=29999, source="env")
    with pytest.raises(rdist.LaunchError, match="MASTER_ADDR 'no-such-host.invalid'.*does not resolve"):
        rdist.rendezvous(info, 5)


def test_a_rendezvous_nobody_answers_ends_within_the_timeout_naming_the_address(monkeypatch):
    import time
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="1", RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    info = rdist.DistInfo(rank=1, world_size=2, master_addr="127.0.0.1", master_port=1, source="env")
    t0 = time.time()
    with pytest.raises(rdist.LaunchError, match=r"no rendezvous at 127\.0\.0\.1:1 within 3 s.*rank 0's store"):
        rdist.rendezvous(info, 3)
    assert time.time() - t0 < 15


def test_a_world_the_processes_do_not_fill_is_named_by_its_size(monkeypatch):
    """Rank 0 alone where WORLD_SIZE says 2: the store counted 1 of 2, so the world size is what is wrong."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    info = rdist.DistInfo(rank=0, world_size=2, master_addr="127.0.0.1", master_port=port, source="env")
    with pytest.raises(rdist.LaunchError, match=r"only 1 of 2 processes \(WORLD_SIZE=2\) joined the rendezvous"):
        rdist.rendezvous(info, 3)


# --------------------------------------------------------------------------------- syncs of a training step

class HostReads(TorchDispatchMode):
    """Where rtdist's own code reads a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``:
    aten._local_scalar_dense, each a device synchronisation on a GPU): the Python frame that asked, when it is
    rtdist's (torch's own reads, e.g. Adam's step counter, a host tensor even on a GPU, are not counted)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback
            wrappers = ("_python_dispatch.py", "_dynamo/eval_frame.py", "_compile.py")  # around this method
            caller = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(wrappers)][-1]
            if "/rtdist/" in caller.filename and "/tests/" not in caller.filename:
                self.reads.append(f"{caller.filename.split('/rtdist/')[-1]}:{caller.name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_a_training_step_reads_the_device_once_per_micro_batch(monkeypatch, accumulation):
    """One read by the step (the all-reduced non-finite flag and loss, as one ``tolist()``) per micro-batch; the
    k-means update, the gradient norm and the loss stay on the device. The model's one read is causal routing's
    block count (how many blocks of the window its clusters fill: the shape of the work), in each routing layer's
    forward and again when backward recomputes the routing heads. On a GPU, with one micro-batch per step as long
    sequences train: 1 + 2 x routing layers per step (the PG-19 preset routes in one layer: 3)."""
    from rtdist.config import load_config
    from rtdist.model import RoutingTransformerLM
    from rtdist.parallel import OptimConfig, build_engine
    from rtdist.train import train_step

    cfg = load_config("configs/tiny.yaml", ["train.seq_length=64", "model.window_size=16"])
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg.model)
    eng = build_engine("torch", model, OptimConfig(1e-3, 1e-4, 2, 10, 0.1, (0.9, 0.95), 1.0), micro_batch=2,
                       accumulation=accumulation, dp_size=1, zero_stage=0, precision="fp32", deepspeed_overrides={})
    tolists = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolists.append(1) or real_tolist(t))
    g = torch.Generator().manual_seed(1)
    with HostReads() as mode:
        for _ in range(3):
            micro = [torch.randint(0, 257, (2, 65), generator=g) for _ in range(accumulation)]
            assert train_step(eng, model, micro) is not None
    routing_layers = len(model.kmeans_modules())
    assert routing_layers >= 1
    assert mode.reads == ["model/kernels.py:cluster_blocks"] * (3 * accumulation * routing_layers * 2)
    assert len(tolists) == 3 * accumulation
    assert eng.grad_norm() > 0  # read when logged, not in the step


# ---------------------------------------------------------------------------------------------- RNG resume

def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_streams_come_back_only_where_they_map(monkeypatch):
    saved = ckpt.rng_state()
    first = _draws()
    assert ckpt.restore_rng(saved) and _draws() == first  # same world, same GPUs: exactly the same streams
    # Written on a node with 4 visible GPUs, read on one with none (or another count): reseeded by the caller
    ckpt.restore_rng(saved)
    elsewhere = dict(saved, cuda_devices=4, cuda=torch.zeros(16, dtype=torch.uint8))
    assert not ckpt.restore_rng(elsewhere)
    assert _draws() == first  # restore_rng changed nothing
    # A checkpoint of an older rtdist saved every visible GPU's stream as a list: its length is the GPU count
    older = {k: v for k, v in saved.items() if k != "cuda_devices"}
    assert not ckpt.restore_rng(dict(older, cuda=[torch.zeros(16, dtype=torch.uint8)] * 2))
    assert ckpt.restore_rng(older) and _draws() == first  # ... and with no GPU stream, none saw a GPU
    assert not ckpt.restore_rng(None)


# --------------------------------------------------------------------------------------- batches read ahead

class CountingLoader:
    """A loader whose position is the number of batches handed out."""

    def __init__(self):
        self.taken = 0

    def __iter__(self):
        while True:
            self.taken += 1
            yield torch.full((2, 5), self.taken)

    def state_dict(self):
        return {"position": self.taken}


@pytest.mark.parametrize("read_ahead", [False, True])
def test_the_position_saved_is_after_the_last_batch_used_not_the_one_read_ahead(read_ahead):
    loader = CountingLoader()
    batches = DevicePrefetcher(loader, iter(loader), "cpu", per_step=2, transform=lambda b: (b[:, :3], None),
                               read_ahead=read_ahead)
    assert batches.state_dict() == {"position": 0}
    first, second = next(batches), next(batches)
    assert [g[0][0, 0].item() for g in first + second] == [1, 2, 3, 4]  # in order, transformed
    assert first[0][0].shape == (2, 3)
    assert batches.state_dict() == {"position": 4}  # two steps of two batches used
    assert loader.taken == (6 if read_ahead else 4)  # the next step's batches are already read when ahead


# --------------------------------------------------------------------------------------------- phase bounds

def test_a_start_up_phase_gets_its_own_bound_and_a_steady_step_the_tight_one(capfd):
    """A phase past its bound ends the process naming the key to raise: train.startup_timeout_s for the start-up
    phases, train.dist_timeout_s for a steady step. Run in a child process (the watchdog calls os._exit)."""
    import subprocess
    import sys
    code = ("import time\nfrom rtdist.watchdog import Watchdog\nw = Watchdog(1).start()\n"
            "with w.phase('step', 1, 3): time.sleep(1.8)\n"  # a first step: 1.8 s is within its 3 s
            "with w.phase('step', 2): time.sleep(5)\n")      # a steady step: 1 s
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "step 2 did not finish within train.dist_timeout_s = 1 s" in r.stderr, r.stderr
    code = ("import time\nfrom rtdist.watchdog import Watchdog\nw = Watchdog(1).start()\n"
            "with w.phase('resume', 0, 2): time.sleep(5)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "resume at step 0 did not finish within train.startup_timeout_s = 2 s" in r.stderr
