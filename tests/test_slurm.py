"""launch/slurm.sbatch and the launcher's SLURM paths on a real SLURM cluster started by the tests: slurmctld, two
slurmd daemons simulating two nodes (rtnode1, rtnode2) on this machine, a private munged (tests/slurm_cluster.py).

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (.ci/setup_slurm.sh installs them); otherwise every
test here skips with the reason."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
SBATCH = str(ROOT / "launch" / "slurm.sbatch")
SBATCH_GPU = str(ROOT / "launch" / "slurm_gpu.sbatch")
GPUS_PER_NODE = 2  # simulated (device files standing for GPUs): enough for SLURM to schedule and bind them


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        warnings.warn(f"SLURM tests skipped: {reason}")
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), gpus_per_node=GPUS_PER_NODE)
    t0 = time.time()
    c.start()
    print(f"SLURM cluster up in {time.time() - t0:.1f}s")
    try:
        yield c
    finally:
        c.stop()


def job_env(run_dir, **extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), PYTHON=sys.executable,
             CONFIG="configs/tiny.yaml", RUN_DIR=str(run_dir),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    e.update(extra)
    return e


def train_sets(manifest, iters):
    sets = [f"data.manifest={manifest}", "train.seq_length=64", "model.window_size=16",
            "train.train_micro_batch_size_per_gpu=2", "data.num_workers=1", "train.log_interval=1",
            f"train.train_iters={iters}"]
    return [a for s in sets for a in ("--set", s)]


def steps(run_dir):
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x)["step"] for x in p.read_text().splitlines()] if p.exists() else []


def result(run_dir):
    return json.loads((Path(run_dir) / "result.json").read_text())


def signal_when(cluster, jid, ready, what, sig="USR1", timeout=120):
    """Send ``sig`` to the job's tasks (scancel --signal) once ``ready()`` holds."""
    deadline = time.time() + timeout
    while not ready():
        info = cluster.job(jid)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), info
        assert time.time() < deadline, f"no {what} after {timeout}s: {info}"
        time.sleep(0.1)
    cluster.signal(jid, sig)


def signal_after_steps(cluster, jid, run_dir, n, timeout=120, sig="USR1"):
    """Send ``sig`` to the job's tasks once training has logged ``n`` steps."""
    signal_when(cluster, jid, lambda: len(steps(run_dir)) >= n, f"{n} steps", sig, timeout)


def submit(cluster, tmp_path, name, run_dir, args, nodes=2, **env):
    out = tmp_path / f"{name}.out"
    jid = cluster.sbatch([f"-N{nodes}", "--ntasks-per-node=1", f"--output={out}", "--time=10", SBATCH, *args],
                         job_env(run_dir, **env), cwd=ROOT)
    return jid, out


@pytest.mark.slow  # the -N1 resubmission below covers the same path and a reshard
def test_sbatch_trains_on_two_nodes_stops_on_sigusr1_and_a_second_submission_resumes(cluster, manifest, tmp_path):
    run_dir, iters = tmp_path / "run", 60
    t0 = time.time()
    jid, out = submit(cluster, tmp_path, "first", run_dir, train_sets(manifest, iters), RTDIST_REQUEUE="0")
    signal_after_steps(cluster, jid, run_dir, 2)
    info = cluster.wait(jid)
    first_wall = time.time() - t0
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert "slurm: 2 node(s) [rtnode1,rtnode2] x 1 = world 2, MASTER_ADDR=rtnode1" in log
    assert "world 2 (slurm)" in log
    first = result(run_dir)
    k = first["step"]
    assert first["status"] == "stopped by SIGUSR1" and 2 <= k < iters, first
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{k}"
    assert steps(run_dir) == list(range(1, k + 1))
    assert not (run_dir / "model.safetensors").exists()

    t0 = time.time()
    jid2, out2 = submit(cluster, tmp_path, "second", run_dir, train_sets(manifest, iters), RTDIST_REQUEUE="0")
    info2 = cluster.wait(jid2)
    log2 = out2.read_text()
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", (info2, log2[-3000:])
    assert f"resumed from {run_dir / 'checkpoints' / f'global_step{k}'} at step {k}" in log2
    second = result(run_dir)
    assert second["status"] == "completed" and second["step"] == iters
    assert steps(run_dir) == list(range(1, iters + 1))  # one continuous run: no step lost or repeated
    assert (run_dir / "model.safetensors").exists()
    print(f"sbatch 2 nodes x 1 task: first (stopped at step {k}) {first_wall:.1f}s, resumed {time.time() - t0:.1f}s")


def test_a_job_preempted_on_two_nodes_resumes_on_one(cluster, manifest, tmp_path):
    """Resubmitted with -N1, the run reshards the two ranks' ZeRO-2 checkpoint for one rank, doubles the gradient
    accumulation to keep the global batch of 4 samples, and finishes."""
    run_dir, iters = tmp_path / "run", 30
    jid, out = submit(cluster, tmp_path, "two", run_dir, train_sets(manifest, iters), RTDIST_REQUEUE="0")
    signal_after_steps(cluster, jid, run_dir, 2)
    info = cluster.wait(jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out.read_text()[-3000:])
    first = result(run_dir)
    k = first["step"]
    assert first["status"] == "stopped by SIGUSR1" and 2 <= k < iters, first

    t0 = time.time()
    jid2, out2 = submit(cluster, tmp_path, "one", run_dir, train_sets(manifest, iters), nodes=1, RTDIST_REQUEUE="0")
    info2 = cluster.wait(jid2)
    log2 = out2.read_text()
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", (info2, log2[-3000:])
    assert "world 1 (slurm)" in log2
    assert "gradient_accumulation_steps 1 -> 2 keeps the global batch of 4 samples" in log2
    assert f"resumed from {run_dir / 'checkpoints' / f'global_step{k}'} at step {k} (resharded)" in log2
    second = result(run_dir)
    assert second["status"] == "completed" and second["step"] == iters
    assert steps(run_dir) == list(range(1, iters + 1))
    print(f"2 nodes stopped at step {k}, resumed on 1 node and finished in {time.time() - t0:.1f}s")


# the final evaluation's stop through rtdist's launcher is in the default run (test_stop_signals.py)
@pytest.mark.parametrize("phase", ["training", pytest.param("final evaluation", marks=pytest.mark.slow)])
def test_scancel_signal_term_saves_the_run_and_a_resubmission_continues(cluster, manifest, tmp_path, phase):
    """scancel --signal=TERM reaches every task of the step (and so each rank's data workers' process group):
    every rank stops at the same boundary, the checkpoint is complete, the job ends COMPLETED 0:0, and the
    same script submitted again finishes the run (for a stop in the final evaluation: only evaluates)."""
    run_dir, iters = tmp_path / "run", 40 if phase == "training" else 4
    sets = train_sets(manifest, iters) + (["--set", "train.eval_interval=1000", "--set", "train.eval_iters=100000"]
                                          if phase != "training" else [])
    jid, out = submit(cluster, tmp_path, "term", run_dir, sets, RTDIST_REQUEUE="0")
    if phase == "training":
        signal_after_steps(cluster, jid, run_dir, 3, sig="TERM")
    else:
        signal_when(cluster, jid, lambda: (run_dir / "model.safetensors").exists(), "export", sig="TERM")
    info = cluster.wait(jid)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert "Traceback" not in log and "killed by signal" not in log, log[-3000:]
    first = result(run_dir)
    k = first["step"]
    during = "" if phase == "training" else " during the final evaluation"
    assert first["status"] == f"stopped by SIGTERM{during}" and (3 <= k < iters or during), first
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{k}"
    jid2, out2 = submit(cluster, tmp_path, "again", run_dir, train_sets(manifest, iters) + (
        ["--set", "train.eval_interval=1000", "--set", "train.eval_iters=2"] if during else []), RTDIST_REQUEUE="0")
    info2 = cluster.wait(jid2)
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", (info2, out2.read_text()[-3000:])
    second = result(run_dir)
    assert second["status"] == "completed" and second["step"] == iters
    assert steps(run_dir) == list(range(1, iters + 1))


def test_the_gpu_template_places_one_rank_per_gpu_with_its_own_device(cluster, tmp_path):
    """launch/slurm_gpu.sbatch as written (its --gpus-per-node/--ntasks-per-node/--cpus-per-task lines, given
    this cluster's sizes on the command line), in dry-run form: SLURM schedules the GPUs, each task sees only its
    own, ranks and NCCL settings are what training would get."""
    out = tmp_path / "gpu.out"
    jid = cluster.sbatch(["-N2", f"--gpus-per-node={GPUS_PER_NODE}", f"--ntasks-per-node={GPUS_PER_NODE}",
                          "--cpus-per-task=1", f"--output={out}", SBATCH_GPU, "--set", "train.lr=1e-3"],
                         job_env(tmp_path / "run", RTDIST_DRY_RUN="1"), cwd=ROOT)
    info = cluster.wait(jid, timeout=120)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert "TresPerNode=gres:gpu:2" in " ".join(f"{k}={v}" for k, v in info.items()), info
    rows = sorted(re.findall(r"\[task\] rank (\d+)/4 local (\d) node (\S+) gpu (\S+) of (\S+) cpus \S+ omp 1 "
                             r"nccl_async 1: .* -m rtdist\.train --config configs/tiny\.yaml --run-dir \S+ "
                             r"--resume auto --set train\.lr=1e-3", log))
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("0", "0", "rtnode1", "0"), ("1", "1", "rtnode1", "1"), ("2", "0", "rtnode2", "0"), ("3", "1", "rtnode2", "1")], log
    assert all(r[4] == "0,1" for r in rows), log  # SLURM gave each node's tasks both GPUs; each task took its own


def test_sigusr1_requeues_the_job_and_the_requeued_run_resumes(cluster, manifest, tmp_path):
    requeue_and_resume(cluster, manifest, tmp_path)


def requeue_and_resume(cluster, manifest, tmp_path):
    run_dir, iters = tmp_path / "run", 40
    t0 = time.time()
    jid, out = submit(cluster, tmp_path, "requeue", run_dir, train_sets(manifest, iters))
    signal_after_steps(cluster, jid, run_dir, 2)
    deadline = time.time() + 120
    released = False

    def explain(info):
        logs = "\n".join(line for line in cluster.logs(tail=200_000).splitlines() if jid in line)
        return f"{json.dumps(info)}\n--- job output\n{out.read_text()[-3000:]}\n--- daemon log lines of job {jid}\n" \
               f"{logs[-4000:]}"

    while True:
        info = cluster.job(jid)
        state, restarts = info.get("JobState"), info.get("Restarts")
        # the second run's own banner, not a passing COMPLETED/REQUEUED state of the first run, ends the wait
        if restarts == "1" and state == "COMPLETED" and "restart 1 on" in out.read_text():
            break
        if restarts == "1" and state == "PENDING" and info.get("Reason") == "BeginTime" and not released:
            # SLURM holds a requeued job for the credential lifetime (cred_expire, 120 s by default): the nodes
            # revoked the first run's credential, and a relaunch stamped within the same second as that revocation
            # is refused (the job then ends FAILED). A test need not wait 2 minutes, only be past that second.
            subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now+3"], env=cluster.env,
                           capture_output=True, timeout=30)
            released = True
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), explain(info)
        assert time.time() < deadline, explain(info)
        time.sleep(0.2)
    log = out.read_text()  # --open-mode=append: both runs
    assert "requeueing job" in log and log.count("[slurm.sbatch] job") == 2, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    res = result(run_dir)
    assert res["status"] == "completed" and res["step"] == iters
    assert steps(run_dir) == list(range(1, iters + 1))
    print(f"sbatch with requeue after SIGUSR1: {time.time() - t0:.1f}s")


PROBE = textwrap.dedent("""
    import os, torch
    from rtdist import dist
    info = dist.init(timeout_s=60)
    t = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    print(f"PROBE rank={info.rank} world={info.world_size} source={info.source} sum={t.item():g} "
          f"node={os.environ.get('SLURMD_NODENAME')} END", flush=True)
    dist.shutdown()
""")


def test_launcher_started_once_per_node_by_srun(cluster, tmp_path):
    """srun --ntasks-per-node=1 launch.py: each node's launcher starts its own share (here 2 processes per
    node from the allocation's CPUs), ranks 0-3 across the two nodes."""
    (tmp_path / "probe.py").write_text(PROBE)
    out = tmp_path / "pernode.out"
    wrap = (f"srun --ntasks-per-node=1 {sys.executable} {ROOT / 'launch' / 'launch.py'} -- "
            f"python {tmp_path / 'probe.py'}")
    jid = cluster.sbatch(["-N2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={out}", "--wrap", wrap],
                         job_env(tmp_path), cwd=ROOT)
    info = cluster.wait(jid, timeout=120)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", (info, log[-3000:])
    rows = sorted(re.findall(r"PROBE (.*?) END", log))  # lines from different tasks may be glued together
    assert len(rows) == 4 and all("world=4 source=env sum=10" in r for r in rows), log[-3000:]
    assert sorted(r.split("node=")[1].split()[0] for r in rows) == ["rtnode1", "rtnode1", "rtnode2", "rtnode2"]


def test_launcher_errors_and_hostfile_inside_a_real_allocation(cluster, tmp_path):
    out = tmp_path / "errors.out"
    launch = f"{sys.executable} {ROOT / 'launch' / 'launch.py'}"
    wrap = (f"{launch} --write-hostfile {tmp_path / 'hostfile'}; echo rc=$?; "
            f"{launch} --num_gpus 2 -- true; echo rc=$?; "
            f"srun -N1 -n2 --overcommit {launch} -- true; echo rc=$?")
    jid = cluster.sbatch(["-N2", "--ntasks-per-node=1", f"--output={out}", "--wrap", wrap], job_env(tmp_path),
                         cwd=ROOT)
    info = cluster.wait(jid, timeout=120)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", (info, log)
    assert (tmp_path / "hostfile").read_text() == "rtnode1 slots=1\nrtnode2 slots=1\n"
    assert "SLURM_NTASKS=2" in log and "asks for 4 processes" in log  # --num_gpus 2 x 2 nodes vs 2 tasks
    assert "started 2 times on 1 node(s) by srun" in log  # one launcher per node, or one per job
    assert [x for x in log.splitlines() if x.startswith("rc=")] == ["rc=0", "rc=2", "rc=2"], log
