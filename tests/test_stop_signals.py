"""A stop signal is the job's, however it arrives: through raw torchrun, rtdist's launcher or DeepSpeed's runner,
to the launcher alone or to the whole process group (what SLURM, ``kill -TERM -PGID`` and Ctrl-C do), during
training or during the final evaluation. Every rank stops at the same step boundary, writes a complete
checkpoint and ``result.json`` ("stopped by SIG..."), and exits 0; ``--resume auto`` then continues exactly.
(The SLURM path, ``scancel --signal``, is in test_slurm.py.)"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtdist import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))


def train_args(manifest, run_dir, iters, *sets, resume="auto"):
    args = ["-m", "rtdist.train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), "--resume", resume]
    for s in (f"data.manifest={manifest}", "train.seq_length=64", "model.window_size=16",
              "train.train_micro_batch_size_per_gpu=2", "data.num_workers=2", "train.log_interval=1",
              f"train.train_iters={iters}", *sets):
        args += ["--set", s]
    return args


def launch_cmd(launcher, tmp_path):
    """The command line in front of ``-m rtdist.train ...`` for 2 ranks on this machine."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(free_port())]
    if launcher == "rtdist":
        return [sys.executable, "-m", "rtdist.launcher", "--num_gpus", "2", "--master_port", str(free_port()), "--",
                sys.executable]
    hostfile = tmp_path / "hostfile"  # DeepSpeed's runner, through the launcher's hostfile path
    hostfile.write_text("localhost slots=2\n")
    return [sys.executable, "-m", "rtdist.launcher", "-H", str(hostfile), "--master_port", str(free_port()), "--",
            sys.executable]


def metrics(run_dir):
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def wait_until(cond, what, timeout=180):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def stop_run(launcher, manifest, tmp_path, sig, target, when, iters=400, sets=()):
    """Start 2 ranks in a session of their own, send ``sig`` to the launcher (``target="leader"``) or its
    whole process group once ``when(run_dir)`` holds; returns (launcher's exit status, seconds it took after the
    signal, its output, run_dir)."""
    run_dir = tmp_path / "run"
    p = subprocess.Popen(launch_cmd(launcher, tmp_path) + train_args(manifest, run_dir, iters, *sets), cwd=ROOT,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        wait_until(lambda: when(run_dir) or p.poll() is not None, "the moment to signal")
        assert p.poll() is None, p.stdout.read()[-3000:]
        t0 = time.time()
        if target == "group":
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
        return p.returncode, time.time() - t0, out, run_dir
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def training(n):
    return lambda run_dir: len(metrics(run_dir)) >= n


def final_evaluation(run_dir):
    """The final checkpoint and the export are written: the final evaluation is running."""
    return (run_dir / "model.safetensors").exists() and not (run_dir / "result.json").exists()


def assert_saved(run_dir, out, sig, during=""):
    res = json.loads((run_dir / "result.json").read_text())
    assert res["status"] == f"stopped by {sig.name}{during}", res
    step_dir = run_dir / "checkpoints" / f"global_step{res['step']}"
    assert ckpt.is_complete(step_dir) and not ckpt.verify(step_dir), step_dir
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_dir.name
    # no rank's traceback (torchrun's and DeepSpeed's runners print their own for the signal they got)
    assert "/rtdist/" not in "".join(ln for ln in out.splitlines(True) if ln.lstrip().startswith("File ")), out[-3000:]
    assert "killed by signal" not in out and "error:" not in out, out[-3000:]
    return res


# Exit status of each launcher once its ranks have stopped cleanly: torchrun reports the signal it got (1) whatever
# its workers did; DeepSpeed's runner dies of the SIGTERM itself (143) while its launch process gives the ranks 30 s;
# rtdist's launcher passes the stop on and reports the ranks' 0.
LAUNCHER_STATUS = {"torchrun": 1, "rtdist": 0, "deepspeed": 143}


# The default run covers raw torchrun's process group (with exact continuation, below) and rtdist's launcher (the
# final-evaluation test); these are the other launchers and deliveries.
@pytest.mark.slow
@pytest.mark.parametrize("launcher,sig,target", [
    ("torchrun", signal.SIGTERM, "group"),   # SLURM preemption, kill -TERM -PGID
    ("rtdist", signal.SIGINT, "group"),      # Ctrl-C in a terminal
    ("rtdist", signal.SIGTERM, "leader"),
    ("deepspeed", signal.SIGTERM, "group"),
])
def test_a_stop_signal_during_training_saves_the_run_and_resume_continues(manifest, tmp_path, launcher, sig, target):
    rc, took, out, run_dir = stop_run(launcher, manifest, tmp_path, sig, target, training(3))
    assert rc == LAUNCHER_STATUS[launcher] and took < 30, (rc, took, out[-3000:])
    res = assert_saved(run_dir, out, sig)
    k = res["step"]
    assert 3 <= k < 400 and [m["step"] for m in metrics(run_dir)] == list(range(1, k + 1))
    # --resume auto continues from the stop: k + 3 steps in all, numbered without a gap
    r = subprocess.run([sys.executable] + train_args(manifest, run_dir, k + 3), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and f"resumed from {run_dir / 'checkpoints' / f'global_step{k}'}" in r.stdout, \
        r.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, k + 4))


def test_a_stop_after_the_last_step_continues_exactly_like_an_uninterrupted_run(manifest, tmp_path):
    """Stopped by SIGTERM to torchrun's process group at step k, resumed on one process: the losses after k are
    those of a run that was never stopped (1e-5: another world size)."""
    rc, took, out, run_dir = stop_run("torchrun", manifest, tmp_path, signal.SIGTERM, "group", training(3))
    assert rc == LAUNCHER_STATUS["torchrun"] and took < 30, (rc, took, out[-3000:])
    k = assert_saved(run_dir, out, signal.SIGTERM)["step"]
    assert 3 <= k < 400 and [m["step"] for m in metrics(run_dir)] == list(range(1, k + 1))
    r = subprocess.run([sys.executable] + train_args(manifest, run_dir, k + 2), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = tmp_path / "straight"
    r = subprocess.run(launch_cmd("torchrun", tmp_path) + train_args(manifest, straight, k + 2), cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["loss"] for m in metrics(run_dir)] == pytest.approx([m["loss"] for m in metrics(straight)], abs=1e-5)


def test_a_stop_during_the_final_evaluation_keeps_the_checkpoint_and_the_export(manifest, tmp_path):
    """The final checkpoint and model.safetensors are complete before the final evaluation; a stop there abandons
    the evaluation on every rank at once, says so in result.json and exits 0; a resubmission only evaluates."""
    sets = ("train.eval_interval=1000", "train.eval_iters=100000", "train.save_interval=0")
    rc, took, out, run_dir = stop_run("rtdist", manifest, tmp_path, signal.SIGTERM, "group", final_evaluation,
                                      iters=4, sets=sets)
    assert rc == 0 and took < 30, (rc, took, out[-3000:])
    res = assert_saved(run_dir, out, signal.SIGTERM, " during the final evaluation")
    assert res["step"] == 4 and "eval" not in res
    r = subprocess.run([sys.executable] + train_args(manifest, run_dir, 4, "train.eval_interval=1000",
                                                     "train.eval_iters=3"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run_dir / "result.json").read_text())
    assert res["status"] == "completed" and res["step"] == 4 and res["eval"]["tokens"] > 0


def test_a_rank_that_crashes_in_native_code_leaves_its_python_stack_in_the_log(manifest, tmp_path):
    """SIGABRT is what a C++ exception in a communication thread ends a rank with; the launcher can only say "exit
    status -6", so the rank prints every thread's Python stack on its way down."""
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, *train_args(manifest, run_dir, 400, "data.num_workers=0")], cwd=ROOT,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: training(1)(run_dir) or p.poll() is not None, "the first step")
        p.send_signal(signal.SIGABRT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in out and "rtdist/train.py" in out, out[-3000:]
