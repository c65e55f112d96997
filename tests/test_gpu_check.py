"""tools/gpu_check.py on a machine without CUDA (what CI has): it says so, runs the dry pass of every check on the
CPU (the training command lines as users run them, the kernels, cached generation, the throughput step), prints
one line per check and a summary, and exits 0."""
import pytest
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402

LINE = re.compile(r"^(\S+)\s+(ok|dry|FAILED)\s+(\d+\.\d) s  (.*)$")


def run(*args, timeout=600):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("DS_ACCELERATOR", None)
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_without_cuda_every_check_has_a_dry_pass_and_the_tool_exits_0(tmp_path):
    r = run("--work", str(tmp_path), "--json", str(tmp_path / "result.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("no CUDA device here: checking that the GPU checks would run")
    names = [c.name for c in gpu_check.CHECKS]
    lines = [LINE.match(x) for x in out[1:1 + len(names)]]  # one line per check, as each finishes
    assert [m.group(1) for m in lines] == names and all(m.group(2) == "dry" for m in lines), out
    assert f"dry (CPU): {len(names)} dry passes (nothing measured on a GPU), 0 failed" in out[-1]
    saved = json.loads((tmp_path / "result.json").read_text())
    by_name = {x["name"]: x for x in saved["results"]}
    # The training commands really ran and trained: a run directory with an export for each.
    for check, run_dir in (("train_zero2_bf16", "zero2"), ("train_zero3_bf16", "zero3"),
                           ("activation_offload", "offload_on")):
        assert (tmp_path / run_dir / "model.safetensors").is_file(), check
    assert "--set train.precision=bf16" in (tmp_path / "zero2.log").read_text()  # the GPU command line, dry-tuned
    assert by_name["cached_generation"]["figures"]["tokens_equal"] is True
    assert set(by_name["sdpa_backend"]["figures"]) == {"local", "routing", "topk", "dense", "model"}
    assert by_name["throughput_8k"]["figures"]["tokens"] > 0


def test_an_unknown_check_name_is_one_error_line(tmp_path):
    r = run("--only", "train_zero4")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --only train_zero4: no such check; the checks are {', '.join(c.name for c in gpu_check.CHECKS)}"]


def test_the_two_rank_check_runs_its_cpu_pass_through_the_real_launcher(tmp_path):
    """What the GPU check of 2 ranks (ZeRO-2, sequence parallelism over both) does, on the CPU: rtdist's launcher
    starts both ranks, and their losses equal one rank's on the same global batch."""
    r = run("--only", "two_ranks_sp2", "--work", str(tmp_path), timeout=400)
    logs = "".join(f"\n--- {p.name}, last lines:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:])
                   for p in sorted(tmp_path.glob("*.log")))  # the ranks' own output: why one failed
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + logs
    m = LINE.match(r.stdout.splitlines()[1])
    assert m and m.group(1) == "two_ranks_sp2" and m.group(2) == "dry", r.stdout
    assert "layout sp2 zero2, backend gloo, gpus 0, steps 2" in m.group(4)
    assert float(m.group(4).split("max_loss_diff ")[1].split(",")[0]) <= 1e-4
    log = (tmp_path / "two_ranks_sp2.log").read_text()
    assert "-m rtdist.launcher --num_gpus 2" in log and "world 2 (env)" in log
