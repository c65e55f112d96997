"""The training command as users run it (torchrun, 2 gloo ranks): exact resume, crash-safe checkpoints, faults."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtdist import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    e.update(extra)
    return e


def train_cmd(nproc, manifest, run_dir, *sets, resume=None):
    base = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1 else [sys.executable])
    cmd = base + ["-m", "rtdist.train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
                  "--set", f"data.manifest={manifest}", "--set", "train.seq_length=64", "--set", "model.window_size=16",
                  "--set", "train.train_micro_batch_size_per_gpu=2", "--set", "data.num_workers=1",
                  "--set", "train.log_interval=1"]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def run(cmd, timeout=240, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=env(**kw), capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# The run most tests here start from: 2 ranks (torchrun), DeepSpeed ZeRO-2, data-seeded centroids (tiny.yaml),
# checkpoints at steps 2 and 4, the export. Trained once per module (each torchrun start-up costs ~10 s); a test
# that changes it works on its own copy (copy_of).
FINISHED_SETS = ("train.train_iters=4", "train.save_interval=2")


@pytest.fixture(scope="module")
def finished(manifest, tmp_path_factory):
    """The finished run's directory; read it, never change it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = run(train_cmd(2, manifest, run_dir, *FINISHED_SETS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt.complete_steps(run_dir / "checkpoints") == [2, 4] and (run_dir / "model.safetensors").is_file()
    return run_dir


def copy_of(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_resume_mid_run_gives_the_losses_of_an_uninterrupted_run(manifest, finished, tmp_path):
    # With data-seeded centroids: the resumed run continues from the checkpoint's centroids, not new ones.
    first = run(train_cmd(2, manifest, tmp_path / "b", *FINISHED_SETS),
                RTDIST_FAULT="step:3")  # killed abruptly during step 3, after the step-2 checkpoint
    assert first.returncode != 0
    assert ckpt.resolve_resume(tmp_path / "b" / "checkpoints", "auto").name == "global_step2"
    second = run(train_cmd(2, manifest, tmp_path / "b", *FINISHED_SETS, resume="auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    a = losses(finished)  # the uninterrupted run
    b = losses(tmp_path / "b")  # steps 1-2 from the first process, 3-4 from the resumed one
    steps_b = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 4 and steps_b == list(range(1, 5))
    assert a == b  # identical, not merely close: weights, optimizer, centroids, data position and RNG restored
    segments = json.loads((tmp_path / "b" / "run_info.json").read_text())["segments"]
    assert [s["start_step"] for s in segments] == [0, 2] and segments[1]["resumed_from"].endswith("global_step2")
    first = segments[0]
    assert first["world"] == {"world_size": 2, "data_parallel": 2, "sequence_parallel": 1, "source": "env"}
    assert len(first["hosts"]) == 2 and "rtdist.train" in first["command"] and first["torch"]
    if (ROOT / ".git").exists():  # run from a checkout (CI's clone): the commit and whether it had changes
        assert len(first["git"]["commit"]) == 40 and isinstance(first["git"]["dirty"], bool)


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(manifest, tmp_path):
    r = run(train_cmd(2, manifest, tmp_path, "train.train_iters=6", "train.save_interval=2"),
            RTDIST_FAULT="save:4:1")  # rank 1 dies after writing its files for step 4, before the marker
    assert r.returncode != 0
    staging = list((tmp_path / "checkpoints").glob("global_step4.tmp-*"))
    assert len(staging) == 1 and not ckpt.is_complete(staging[0])  # half written, under a name never taken for whole
    assert not (tmp_path / "checkpoints" / "global_step4").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step2"
    assert ckpt.resolve_resume(tmp_path / "checkpoints", "auto").name == "global_step2"
    resumed = run(train_cmd(2, manifest, tmp_path, "train.train_iters=6", "train.save_interval=2", resume="auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "global_step2" in resumed.stdout
    assert ckpt.complete_steps(tmp_path / "checkpoints") == [2, 4, 6]
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))  # the next save cleaned up the crashed one


def assert_the_export_evaluates(run_dir):
    ev = run([sys.executable, "-m", "rtdist.evaluate", "--checkpoint", str(run_dir), "--max-batches", "2"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert metrics["tokens"] == 2 * 64 and 0 < metrics["loss"] < 6
    assert metrics["bits_per_byte"] == pytest.approx(metrics["bits_per_token"], rel=0.05)  # bytes tokenizer


def test_the_export_of_two_ranks_zero_partitions_loads_for_evaluation(finished):
    assert_the_export_evaluates(finished)


def test_the_export_loads_for_evaluation_when_blocks_are_checkpointed(manifest, tmp_path):
    """Blocks wrapped for activation checkpointing: their parameters' names carry the wrapper's level in ZeRO's
    checkpoint; the export must use the model's own names and keep the k-means state."""
    r = run(train_cmd(1, manifest, tmp_path, "train.train_iters=4", "train.zero_stage=2",
                      "train.checkpoint_policy=full"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_the_export_evaluates(tmp_path)


def test_a_dead_rank_makes_the_others_exit_within_the_timeout(manifest, tmp_path):
    # Plain processes (no torchrun agent to clean up): rank 1 dies at step 3, rank 0 must not hang.
    procs = []
    for rank in range(2):
        cmd = train_cmd(1, manifest, tmp_path, "train.train_iters=50", "train.dist_timeout_s=20")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200),
                                              RTDIST_FAULT="step:3:1")))
    t0 = time.time()
    rcs = [p.wait(timeout=120) for p in procs]
    assert rcs[1] == 17 and rcs[0] != 0
    assert time.time() - t0 < 90


def test_nonfinite_losses_are_skipped_then_stop_the_run_with_a_message(manifest, tmp_path):
    r = run(train_cmd(1, manifest, tmp_path, "train.train_iters=30", "train.lr=1e6", "train.warmup_iters=0",
                      "train.gradient_clipping=0", "train.max_nonfinite_steps=3", "train.engine=torch",
                      "train.zero_stage=0"))
    assert r.returncode != 0
    assert "3 steps in a row had a non-finite loss" in r.stderr


# Each row starts 2 ranks under torchrun (~7 s). The slow rows are also rows of test_bad_inputs.py (one rank,
# in-process); the default run keeps the 2-rank path for a global batch check (data-parallel size 2) and a data
# check.
@pytest.mark.parametrize("sets, message", [
    (["train.train_batch_size=3"], "train.train_batch_size (3) must equal"),
    pytest.param(["train.engine=torch", "train.zero_stage=2"], "needs engine deepspeed or fairscale",
                 marks=pytest.mark.slow),
    pytest.param(["train.seq_length=128"], "exceeds the shards' seq_length (64)", marks=pytest.mark.slow),
    pytest.param(["model.vocab_size=100"], "model.vocab_size (100) is smaller than the tokenizer's vocabulary (257)",
                 marks=pytest.mark.slow),
    (["train.seq_length=32"], "hold 64 tokens and train.seq_length is 32: training would read the first 33 of each "
                              "and skip 49% of the corpus. Preprocess with --seq-length 32"),
])
def test_impossible_configs_fail_before_training_with_the_key_named(manifest, tmp_path, sets, message):
    r = run(train_cmd(2, manifest, tmp_path, *sets), timeout=120)
    assert r.returncode != 0
    assert message in r.stderr


def seeding_worker(rank, world, port, manifest, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    from rtdist import dist as rdist
    from rtdist.config import load_config
    from rtdist.model import RoutingTransformerLM
    from rtdist.train import build_loader, init_kmeans_from_first_batch
    torch.set_num_threads(1)
    rdist.init(timeout_s=60)
    cfg = load_config("configs/tiny.yaml", [f"data.manifest={manifest}", "train.seq_length=64", "model.window_size=16",
                                            "train.train_micro_batch_size_per_gpu=2", "train.kmeans_init=data"])

    def fresh():
        torch.manual_seed(cfg.train.seed)
        return RoutingTransformerLM(cfg.model)

    shared = fresh()
    from rtdist.parallel import ParallelDims
    init_kmeans_from_first_batch(shared, cfg, ParallelDims(1, world, rank), torch.device("cpu"))
    own = fresh()  # what this rank alone would seed from its own first batch
    own.init_kmeans_from_data(next(iter(build_loader(cfg, "train", rank, world, train=True)))[:, :64],
                              generator=torch.Generator().manual_seed(cfg.train.seed))
    torch.save({"shared": [km.means for km in shared.kmeans_modules()],
                "initted": [bool(km.initted) for km in shared.kmeans_modules()],
                "own": [km.means for km in own.kmeans_modules()]}, f"{out}.{rank}")
    rdist.barrier()
    rdist.shutdown()


def test_data_seeded_centroids_are_rank_zeros_on_every_rank(manifest, tmp_path):
    import socket

    import torch
    from rank_processes import run_ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(seeding_worker, 2, 2, port, manifest, str(tmp_path / "m"))
    r0, r1 = (torch.load(tmp_path / f"m.{r}") for r in range(2))
    assert all(r0["initted"]) and all(r1["initted"])
    for a, b, own0, own1 in zip(r0["shared"], r1["shared"], r0["own"], r1["own"]):
        assert torch.equal(a, b) and torch.equal(a, own0)
        assert not torch.allclose(own0, own1)  # the ranks' batches differ: without the broadcast they would disagree


# ------------------------------------------------------------------------------------ trust under faults


def start_ranks(manifest, run_dir, *sets, world=2):
    """Plain processes (no launcher agent to clean up after them), one per rank."""
    port = str(29700 + (os.getpid() + hash(str(run_dir))) % 250)
    return [subprocess.Popen(train_cmd(1, manifest, run_dir, *sets), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=port)) for r in range(world)]


def wait_for_steps(run_dir, n, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = Path(run_dir) / "metrics.jsonl"
        if f.is_file() and len(f.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{n} steps not reached in {timeout} s")


def with_rank1_frozen(manifest, run_dir, timeout_s: int, then=None):
    """Two ranks; after 3 steps rank 1 is frozen (SIGSTOP: alive but stuck, like a hung GPU or an NFS stall) and
    ``then(rank0_process)`` runs. Returns (rank 0's exit status, seconds from then on, its stderr)."""
    import signal
    procs = start_ranks(manifest, run_dir, "train.train_iters=100000", f"train.dist_timeout_s={timeout_s}")
    try:
        wait_for_steps(run_dir, 3)
        procs[1].send_signal(signal.SIGSTOP)
        if then is not None:
            time.sleep(1)
            then(procs[0])
        t0 = time.time()
        rc = procs[0].wait(timeout=timeout_s + 90)
        return rc, time.time() - t0, procs[0].stderr.read()
    finally:
        procs[1].kill()
        procs[1].wait()


def test_a_stopped_rank_makes_the_other_exit_within_the_timeout_naming_it(manifest, tmp_path):
    rc, took, err = with_rank1_frozen(manifest, tmp_path, 10)
    assert rc not in (0, None) and took < 10 + 20
    line = [ln for ln in err.splitlines() if "error:" in ln][-1]
    assert "rank 1" in line and "stopped answering" in line


def test_sigterm_ends_a_rank_whose_peer_is_stopped_within_seconds(manifest, tmp_path):
    import signal
    # Blocked in a collective, the main thread cannot run Python signal handlers.
    rc, took, err = with_rank1_frozen(manifest, tmp_path, 300, then=lambda p: p.send_signal(signal.SIGTERM))
    assert rc == 143 and took < 25
    assert "SIGTERM" in err and "rank 1" in err


def test_resubmitting_a_finished_run_never_loses_its_checkpoint(manifest, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    for _ in range(2):  # what a resubmission or a SLURM requeue of a finished job does, twice
        r = run(train_cmd(2, manifest, run_dir, *FINISHED_SETS, resume="auto"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stdout and "nothing left to train" in r.stdout
        assert ckpt.complete_steps(run_dir / "checkpoints") == [2, 4]
        assert not ckpt.verify(run_dir / "checkpoints" / "global_step4")
    assert len(losses(run_dir)) == 4  # trained once


def test_a_rerun_without_resume_is_refused_and_overwrite_starts_over(manifest, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    refused = run(train_cmd(1, manifest, run_dir, "train.train_iters=5"))  # the forgotten --resume
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        f"error: --run-dir {run_dir} holds an earlier run (last complete checkpoint {run_dir}/checkpoints/"
        f"global_step4, result.json: completed at step 4, metrics.jsonl with 4 logged steps, model.safetensors): "
        f"continue it with --resume auto, or start over in a new --run-dir, or here with --overwrite (deletes its "
        f"checkpoints and metrics)")
    assert {p: p.read_bytes() for p in before} == before and not (run_dir / "checkpoints" / "global_step5").exists()
    again = run(train_cmd(1, manifest, run_dir, "train.train_iters=2") + ["--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert ("--overwrite: deleted checkpoints, metrics.jsonl, result.json, model.safetensors, tensorboard, "
            "run_info.json of the earlier run") in again.stdout
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert ckpt.complete_steps(run_dir / "checkpoints") == [2]


def flip_byte(path: Path, offset: int = 2000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupt_checkpoint_is_named_and_skipped_for_the_previous_one(manifest, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    flip_byte(run_dir / "checkpoints" / "global_step4" / "rtdist_rank1.pt")
    r = run(train_cmd(2, manifest, run_dir, "train.train_iters=6", "train.save_interval=2", resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global_step4 is corrupt (rtdist_rank1.pt does not match its sha256" in r.stdout
    assert "resumed from" in r.stdout and "global_step2 at step 2" in r.stdout
    assert ckpt.complete_steps(run_dir / "checkpoints") == [2, 4, 6]
    assert not ckpt.verify(run_dir / "checkpoints" / "global_step4")  # rewritten whole by the resumed run
    explicit = run(train_cmd(1, manifest, tmp_path / "other", resume=str(run_dir / "checkpoints" / "nope")))
    assert explicit.returncode == 2 and "error: --resume" in explicit.stderr and "no such checkpoint" in explicit.stderr


def test_a_failed_resume_names_the_model_keys_and_leaves_the_run_as_it_was(manifest, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    before = (run_dir / "config.yaml").read_text()
    r = run(train_cmd(1, manifest, run_dir, "train.train_iters=6", "model.d_model=64", resume="auto"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "return func" not in ln]
    assert lines[-1].startswith("error: checkpoint") and "model.d_model: 128 in the checkpoint, 64 now" in lines[-1]
    assert "Traceback" not in r.stderr
    assert (run_dir / "config.yaml").read_text() == before
    ev = run([sys.executable, "-m", "rtdist.evaluate", "--checkpoint", str(run_dir), "--max-batches", "1"])
    assert ev.returncode == 0, ev.stderr[-2000:]


def test_single_process_runs_need_no_port_and_no_mpi(manifest, tmp_path):
    # Two runs side by side (each would bind 29500 if it used a TCP rendezvous), with mpi4py unimportable.
    fake = tmp_path / "no_mpi"
    fake.mkdir()
    (fake / "mpi4py.py").write_text("raise ModuleNotFoundError(\"No module named 'mpi4py'\")\n")
    procs = [subprocess.Popen(train_cmd(1, manifest, tmp_path / f"r{i}", "train.train_iters=3"), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]


def test_a_second_job_on_the_same_run_dir_is_refused(manifest, tmp_path):
    first = subprocess.Popen(train_cmd(1, manifest, tmp_path, "train.train_iters=100000"), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(tmp_path, 1)
        second = run(train_cmd(1, manifest, tmp_path, "train.train_iters=3", resume="auto"))
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"error: --run-dir {tmp_path} is in use by another job" in second.stderr
    assert f'"pid": {first.pid}' in second.stderr
