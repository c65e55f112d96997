#!/usr/bin/env python
"""Faults against real 2-rank training runs, as a hostile user or a cluster would cause them; prints a table.

    python tests/fault_campaign.py [--resubmits 20] [--kills 20] [--only NAME ...] [--out DIR]

Not part of the test suite (it takes ~15-25 min on 2 cores); the suite runs one short instance of each fault
(tests/test_train_cli.py). Scenarios:

- resubmit:  a finished run started again with the same command N times (a resubmission / a requeue): its final
             checkpoint must stay complete and verify every time, and no step is trained twice;
- kill9:     a run with a checkpoint every step, killed with SIGKILL (launcher and ranks) at N random moments and
             resumed each time: every resume must find a complete, verifying checkpoint, and the finished run's
             per-step losses must equal an uninterrupted run's (bit-exact);
- diskfull:  a run directory on a small tmpfs that fills up while saving: one clear error line, the earlier
             checkpoints still verify, nothing half-written under a final name (root only);
- corrupt:   one byte flipped in the newest checkpoint: --resume auto names it, skips it, resumes from the previous;
- sigstop:   a rank frozen with SIGSTOP: seconds until the other rank exits, and whether its line names the rank;
- sigterm:   SIGTERM to a rank blocked by a frozen peer: seconds until it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # a script in tests/: the test helpers are its neighbours

from rtdist import checkpoint as ckpt  # noqa: E402

BASE = ["--config", "configs/tiny.yaml", "--set", "train.seq_length=64", "--set", "model.window_size=16",
        "--set", "train.train_micro_batch_size_per_gpu=2", "--set", "data.num_workers=1", "--set",
        "train.log_interval=1"]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    e.update(extra)
    return e


def torchrun(manifest, run_dir, *sets, resume="auto"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rtdist.train",
           *BASE, "--set", f"data.manifest={manifest}", "--run-dir", str(run_dir), "--resume", resume]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def plain_ranks(manifest, run_dir, *sets, port):
    cmd = [sys.executable, "-m", "rtdist.train", *BASE, "--set", f"data.manifest={manifest}", "--run-dir",
           str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=str(port))) for r in range(2)]


def metrics(run_dir) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def last_loss_per_step(run_dir) -> dict:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}  # later lines (the resumed run's) win


def wait_steps(run_dir, n, timeout=180):
    t0 = time.time()
    while len(metrics(run_dir)) < n:
        if time.time() - t0 > timeout:
            raise RuntimeError(f"{n} steps not reached")
        time.sleep(0.2)


def error_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if "error:" in x or "SIGTERM" in x]


# ----------------------------------------------------------------------------------------------- scenarios


def resubmit(manifest, work: Path, n: int) -> dict:
    run_dir = work / "resubmit"
    first = subprocess.run(torchrun(manifest, run_dir, "train.train_iters=6"), cwd=ROOT, env=env(),
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    ok = 0
    for _ in range(n):
        r = subprocess.run(torchrun(manifest, run_dir, "train.train_iters=6"), cwd=ROOT, env=env(),
                           capture_output=True, text=True)
        step6 = run_dir / "checkpoints" / "global_step6"
        good = (r.returncode == 0 and ckpt.complete_steps(run_dir / "checkpoints") == [6]
                and not ckpt.verify(step6) and len(metrics(run_dir)) == 6)
        ok += good
    return {"fault": f"finished 2-rank run resubmitted {n} times", "survived": f"{ok}/{n}",
            "detail": "final checkpoint complete and verifying after every resubmission; 6 steps trained once"}


def kill9(manifest, work: Path, n: int, iters: int = 60) -> dict:
    ref = work / "kill_ref"
    r = subprocess.run(torchrun(manifest, ref, f"train.train_iters={iters}", "train.save_interval=1"), cwd=ROOT,
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = work / "kill"
    rng = random.Random(0)
    consistent, moments = 0, []
    for i in range(n):
        p = subprocess.Popen(torchrun(manifest, run_dir, f"train.train_iters={iters}", "train.save_interval=1"),
                             cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        at = rng.uniform(4, 16)
        moments.append(round(at, 1))
        try:
            p.wait(timeout=at)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks, mid-whatever
            p.wait()
        cands = ckpt.candidates(run_dir / "checkpoints")
        if not cands or not ckpt.verify(cands[0]):
            consistent += 1  # (nothing saved yet is consistent too: the next start begins at step 0)
    r = subprocess.run(torchrun(manifest, run_dir, f"train.train_iters={iters}", "train.save_interval=1"), cwd=ROOT,
                       env=env(), capture_output=True, text=True)
    same = r.returncode == 0 and last_loss_per_step(run_dir) == last_loss_per_step(ref)
    return {"fault": f"SIGKILL of launcher + ranks at {n} random moments (4-16 s), checkpoint every step",
            "survived": f"{consistent}/{n}",
            "detail": f"newest checkpoint complete and verifying after every kill; finished run's {iters} losses "
                      f"{'equal' if same else 'DIFFER from'} an uninterrupted run's"}


def diskfull(manifest, work: Path) -> dict:
    small = work / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)],
                      capture_output=True).returncode:
        return {"fault": "disk full while saving", "survived": "skipped", "detail": "needs root for a tmpfs"}
    try:
        r = subprocess.run(torchrun(manifest, small / "run", "train.train_iters=200", "train.save_interval=1"),
                           cwd=ROOT, env=env(), capture_output=True, text=True)
        lines = error_lines(r.stderr)
        steps = ckpt.complete_steps(small / "run" / "checkpoints")
        good = all(not ckpt.verify(small / "run" / "checkpoints" / f"global_step{s}") for s in steps)
        halves = [p.name for p in (small / "run" / "checkpoints").iterdir() if p.name.startswith("global_step")
                  and not p.name.split("global_step")[1].isdigit()]
        full = [x for x in lines if "no space left" in x.lower()]
        ok = r.returncode != 0 and good and full and all(".tmp-" in h for h in halves)
        return {"fault": "disk full while saving (24 MB tmpfs)", "survived": "yes" if ok else "NO",
                "detail": f"exit {r.returncode}; the {len(steps)} complete checkpoints all verify; unfinished "
                          f"(staging names, removed by the next save): {len(halves)}; line: "
                          f"{full[0][:200] if full else '-'}"}
    finally:
        subprocess.run(["umount", str(small)])


def corrupt(manifest, work: Path) -> dict:
    run_dir = work / "corrupt"
    r = subprocess.run(torchrun(manifest, run_dir, "train.train_iters=6", "train.save_interval=3"), cwd=ROOT,
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    target = run_dir / "checkpoints" / "global_step6" / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    target.write_bytes(bytes(data))
    r = subprocess.run(torchrun(manifest, run_dir, "train.train_iters=9", "train.save_interval=3"), cwd=ROOT,
                       env=env(), capture_output=True, text=True)
    named = "global_step6 is corrupt" in r.stdout and "resuming from global_step3" in r.stdout
    return {"fault": "one bit flipped in the newest checkpoint", "survived": "yes" if r.returncode == 0 and named
            else "NO", "detail": "named, skipped, resumed from the previous one, which the run then re-saved whole"}


def sigstop(manifest, work: Path, timeout_s: int = 30) -> dict:
    procs = plain_ranks(manifest, work / "stop", "train.train_iters=100000", f"train.dist_timeout_s={timeout_s}",
                        port=29650)
    try:
        wait_steps(work / "stop", 3)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        rc = procs[0].wait(timeout=timeout_s + 120)
        took = time.time() - t0
        lines = error_lines(procs[0].stderr.read())
    finally:
        procs[1].kill()
        procs[1].wait()
    return {"fault": f"rank 1 frozen (SIGSTOP), train.dist_timeout_s={timeout_s}",
            "survived": "yes" if rc and lines and "rank 1" in lines[-1] else "NO",
            "detail": f"rank 0 exited {rc} after {took:.1f} s: {lines[-1][:200] if lines else '-'}"}


def sigterm(manifest, work: Path) -> dict:
    procs = plain_ranks(manifest, work / "term", "train.train_iters=100000", "train.dist_timeout_s=300", port=29651)
    try:
        wait_steps(work / "term", 3)
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(1)
        procs[0].send_signal(signal.SIGTERM)
        t0 = time.time()
        rc = procs[0].wait(timeout=120)
        took = time.time() - t0
        lines = error_lines(procs[0].stderr.read())
    finally:
        procs[1].kill()
        procs[1].wait()
    return {"fault": "SIGTERM to a rank blocked in a collective by a frozen peer",
            "survived": "yes" if rc == 143 else "NO", "detail": f"exited {rc} after {took:.1f} s: "
                                                                f"{lines[-1][:160] if lines else '-'}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resubmits", type=int, default=20)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--only", nargs="+", choices=["resubmit", "kill9", "diskfull", "corrupt", "sigstop", "sigterm"])
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary one)")
    args = p.parse_args(argv)
    from data_helpers import pg19, run
    work = args.out or Path(tempfile.mkdtemp(prefix="rtdist-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = run([pg19(work / "pg19")], work / "shards" / "pg", seq_length=64)["manifest_path"]
    todo = args.only or ["resubmit", "kill9", "diskfull", "corrupt", "sigstop", "sigterm"]
    rows = []
    for name in todo:
        t0 = time.time()
        fn = {"resubmit": lambda: resubmit(manifest, work, args.resubmits), "kill9": lambda: kill9(manifest, work,
              args.kills), "diskfull": lambda: diskfull(manifest, work), "corrupt": lambda: corrupt(manifest, work),
              "sigstop": lambda: sigstop(manifest, work), "sigterm": lambda: sigterm(manifest, work)}[name]
        row = fn()
        row["seconds"] = round(time.time() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| fault | survived (nothing lost) | detail | s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['survived']} | {r['detail']} | {r['seconds']} |")
    return 0 if all(r["survived"] not in ("NO",) and not str(r["survived"]).startswith("0/") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
