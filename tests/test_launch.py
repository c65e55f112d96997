"""The launcher (rtdist.launcher, launch/launch.py), SLURM host lists (rtdist.slurm) and rank discovery
(rtdist.dist.discover).

Parsing and planning are checked on text and fake environments; the launch paths that need no cluster run for real
on this machine: mpirun (mpich) with discovery through mpi4py, the launcher's mpich path, its torchrun path (one
machine, and two nodes' shares started with --no_ssh --node_rank) and DeepSpeed's runner with a localhost hostfile.
SLURM runs in tests/test_slurm.py."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rtdist import dist
from rtdist import launcher as L
from rtdist import slurm

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "launch" / "launch.py")]
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))

# A distributed "hello": joins the world found by rtdist.dist, all-reduces, prints what it found.
PROBE = textwrap.dedent("""
    import os, sys, torch
    from rtdist import dist
    info = dist.init(timeout_s=60)
    t = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    print(f"PROBE rank={info.rank} world={info.world_size} local={info.local_rank} source={info.source} "
          f"addr={info.master_addr} sum={t.item():g} node={os.environ.get('SLURMD_NODENAME', '-')} "
          f"envfile={os.environ.get('RTDIST_TEST_VAR', '-').replace(' ', '_')} END", flush=True)
    dist.shutdown()
""")


def probes(out: str):
    """The PROBE lines of all ranks (MPI may glue lines from different ranks together)."""
    rows = [dict(kv.split("=", 1) for kv in m.split()) for m in re.findall(r"PROBE (.*?) END", out)]
    return sorted(rows, key=lambda r: int(r["rank"]))


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    e.update(extra)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=180, cwd=ROOT, **extra):
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    r.wall = time.time() - t0
    return r


def train_args(manifest, run_dir, iters=4):
    return ["-m", "rtdist.train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
            "--set", f"data.manifest={manifest}", "--set", "train.seq_length=64", "--set", "model.window_size=16",
            "--set", "train.train_micro_batch_size_per_gpu=2", "--set", "data.num_workers=1",
            "--set", "train.log_interval=1", "--set", f"train.train_iters={iters}"]


def result(run_dir):
    return json.loads((Path(run_dir) / "result.json").read_text())


# ------------------------------------------------------------------------------------------------ hostfiles
def test_hostfile_parses_comments_blank_lines_and_inline_comments():
    text = "# cluster\n\nworker-0 slots=4\n  worker-1   slots = 2   # short node\n"
    assert dict(L.parse_hostfile(text)) == {"worker-0": 4, "worker-1": 2}
    assert L.format_hostfile(L.parse_hostfile(text)) == "worker-0 slots=4\nworker-1 slots=2\n"


@pytest.mark.parametrize("line, message", [
    ("worker-0 slot=4", "did you mean 'slots'"),
    ("worker-0 slots=four", "whole number"),
    ("worker-0", "missing slots"),
    ("worker-0:4", "MPICH machinefile syntax; write 'worker-0 slots=4'"),
    ("worker-0 4", "write 'worker-0 slots=4'"),
    ("worker-0 slots=0", "has no slots"),
])
def test_hostfile_typos_name_the_line_and_the_fix(line, message):
    with pytest.raises(L.LaunchError) as e:
        L.parse_hostfile(f"good slots=1\n{line}\n", "hosts.txt")
    assert "hosts.txt:2" in str(e.value) and message in str(e.value)


def test_hostfile_duplicate_hosts_and_empty_files_are_refused():
    with pytest.raises(L.LaunchError, match=r"hf:3: .*duplicate host 'a' \(first on line 1\)"):
        L.parse_hostfile("a slots=1\nb slots=1\na slots=2\n", "hf")
    with pytest.raises(L.LaunchError, match="no hosts"):
        L.parse_hostfile("# nothing\n\n", "hf")


def test_include_exclude_grammar_and_num_nodes():
    pool = L.parse_hostfile("w0 slots=4\nw1 slots=4\nw2 slots=2\n")
    assert L.select_resources(pool, include="w1:0,2@w2") == {"w1": [0, 2], "w2": [0, 1]}
    assert L.select_resources(pool, exclude="w0@w1:3") == {"w1": [0, 1, 2], "w2": [0, 1]}
    assert L.select_resources(pool, num_nodes=2, num_gpus=1) == {"w0": [0], "w1": [0]}
    with pytest.raises(L.LaunchError, match="host 'ww1' is not in .*did you mean 'w1'"):
        L.select_resources(pool, include="ww1")
    with pytest.raises(L.LaunchError, match="slots 0-1, not \\[5\\]"):
        L.select_resources(pool, include="w2:5")
    with pytest.raises(L.LaunchError, match="mutually exclusive"):
        L.select_resources(pool, include="w0", exclude="w1")
    with pytest.raises(L.LaunchError, match="slot 'x' of w0"):
        L.select_resources(pool, include="w0:x")
    with pytest.raises(L.LaunchError, match="only 3 host"):
        L.select_resources(pool, num_nodes=4)
    with pytest.raises(L.LaunchError, match="no hosts left"):
        L.select_resources(pool, exclude="w0@w1@w2")


# ------------------------------------------------------------------------------------------ .deepspeed_env
def test_env_file_is_read_like_a_shell_would():
    text = textwrap.dedent("""\
        # NCCL settings

        NCCL_DEBUG=INFO
        export NCCL_SOCKET_IFNAME = eth0   # inline comment
        QUOTED="a b # not a comment"
        SINGLE='$HOME stays literal'
        ESCAPED="say \\"hi\\""
        EMPTY=
        URL=http://x/y#frag
        """)
    assert L.parse_env_file(text) == {
        "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0", "QUOTED": "a b # not a comment",
        "SINGLE": "$HOME stays literal", "ESCAPED": 'say "hi"', "EMPTY": "", "URL": "http://x/y#frag"}


@pytest.mark.parametrize("line, message", [
    ("JUST_A_WORD", "expected KEY=VALUE"),
    ("1BAD=x", "not a valid variable name"),
    ('OPEN="never closed', "missing closing"),
    ('TAIL="x" y', "unexpected text after the closing quote"),
])
def test_env_file_errors_name_the_line(line, message):
    with pytest.raises(L.LaunchError) as e:
        L.parse_env_file(f"OK=1\n{line}\n", "my.env")
    assert "my.env:2" in str(e.value) and message in str(e.value)


def test_env_files_are_found_like_deepspeed_and_later_files_win(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("B=cwd\n")
    (tmp_path / "extra.env").write_text("C='extra'\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    paths = L.env_file_paths([str(tmp_path / "extra.env")])
    assert L.load_env_files(paths) == {"A": "home", "B": "cwd", "C": "extra"}
    with pytest.raises(L.LaunchError, match="does not exist"):
        L.env_file_paths([str(tmp_path / "missing.env")])


# ----------------------------------------------------------------------------------------------- SLURM plans
def slurm_env(**kw):
    e = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "8", "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}
    e.update(kw)
    return {k: v for k, v in e.items() if v is not None}


def test_slurm_hostlist_expansion_without_scontrol():
    assert slurm.expand_hostlist("gpu[01-03,7],login,n[8-10]x") == [
        "gpu01", "gpu02", "gpu03", "gpu7", "login", "n8x", "n9x", "n10x"]
    with pytest.raises(L.LaunchError, match="bad SLURM host list"):
        slurm.expand_hostlist("gpu[a-b]")


def test_rank_discovery_reads_slurm_host_lists_like_the_launcher(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: rtdist.slurm's expander, as in the launcher
    assert dist.slurm_master_addr("n[8-10]x,login") == "n8x"
    assert dist.slurm_master_addr("gpu[07-09]") == "gpu07"
    assert dist.slurm_master_port("4242") == slurm.master_port("4242") == 24242


def test_slurm_plan_one_task_per_gpu_or_per_cpu_slot():
    gpu = L.slurm_plan(slurm_env(SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4", SLURM_TASKS_PER_NODE="4(x2)"),
                       gpus=4)
    assert dict(gpu.hosts) == {"gpu01": [0, 1, 2, 3], "gpu02": [0, 1, 2, 3]}
    assert (gpu.world_size, gpu.master_addr, gpu.master_port) == (8, "gpu01", dist.slurm_master_port("4242"))
    cpu = L.slurm_plan(slurm_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1(x2)"), gpus=0)
    assert cpu.world_size == 2 and cpu.per_node == 1
    cpus_only = L.slurm_plan(slurm_env(SLURM_CPUS_PER_TASK="2"), gpus=0)  # no task count: CPUs / cpus-per-task
    assert cpus_only.per_node == 4
    cmd = L.srun_command(gpu, ["python", "-m", "rtdist.train"])
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--nodelist=gpu01,gpu02",
                       "--kill-on-bad-exit=1"]


def test_slurm_plan_for_one_launcher_per_node_counts_gpus_not_the_launcher_tasks():
    """srun --ntasks-per-node=1 launch.py on GPU nodes: the step's 2 tasks are the launchers, each starts 4 ranks."""
    step = slurm_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1(x2)", SLURM_STEP_ID="0")
    plan = L.slurm_plan(step, gpus=4, per_node_launch=True)
    assert (plan.world_size, plan.per_node) == (8, 4)


@pytest.mark.parametrize("kw, flags, message", [
    (dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1(x2)"), dict(num_gpus=2),
     "SLURM_NTASKS=2 .* asks for 4 processes .*--ntasks-per-node=2"),
    (dict(SLURM_NNODES="3", SLURM_JOB_NUM_NODES="3"), {}, "SLURM_NNODES=3 but .* 2 host"),
    (dict(SLURM_NTASKS="3"), {}, "does not divide over 2 nodes"),
    (dict(SLURM_CPUS_ON_NODE="1", SLURM_JOB_CPUS_PER_NODE="1(x2)", SLURM_CPUS_PER_TASK="2"), {},
     "no GPUs or CPU slots"),
    (dict(SLURM_JOB_ID=None), {}, "needs a SLURM allocation"),
    (dict(SLURM_JOB_NODELIST="a,b,a", SLURM_NNODES="3", SLURM_JOB_NUM_NODES="3"), {}, "more than once"),
    ({}, dict(include="gpu1"), "not in the SLURM allocation .*did you mean 'gpu01'"),
])
def test_slurm_plan_refuses_inconsistent_variables(kw, flags, message):
    with pytest.raises(L.LaunchError, match=message):
        L.slurm_plan(slurm_env(**kw), gpus=0, **flags)


def test_slurm_plan_more_tasks_than_gpus_is_refused():
    with pytest.raises(L.LaunchError, match="only 2 GPU"):
        L.slurm_plan(slurm_env(), num_gpus=4, gpus=2)


def test_write_hostfile_from_a_slurm_allocation(tmp_path):
    out = tmp_path / "hostfile"
    e = env(**slurm_env(SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2(x2)"))
    e["PATH"] = "/nonexistent:" + os.path.dirname(sys.executable)  # no scontrol: the built-in expander
    assert L.main(["--write-hostfile", str(out)], env=e) == 0
    assert out.read_text() == "gpu01 slots=2\ngpu02 slots=2\n"


def test_launcher_started_more_than_once_per_node_by_srun_is_refused(capsys):
    e = env(**slurm_env(SLURM_NTASKS="4", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NUM_NODES="2",
                        SLURM_NODEID="0"))
    assert L.main(["--", "python", "-c", "pass"], env=e) == 2
    assert "started 4 times on 2 node(s) by srun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ports, CLI
def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(L.LaunchError, match=f"MASTER_PORT {port} is already in use"):
            L.check_port_free(port)
        r = run(LAUNCH + ["--num_gpus", "2", "--master_port", str(port), "--", "python", "-c", "pass"], timeout=60)
    assert r.returncode == 2 and "already in use" in r.stderr


def error_line(r):
    """The launcher's one-line error: 'error: <what> (<where>): <what to do>'."""
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(r"^error: [^(]+ \(.+\): .+", last), r.stderr
    return last


def test_cli_errors_exit_2_with_the_message(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\nlocalhost slots=1\n")
    r = run(LAUNCH + ["-H", str(hf), "--", "python", "-c", "pass"], timeout=60)
    assert r.returncode == 2 and "duplicate host 'localhost'" in r.stderr
    assert error_line(r) == (f"error: bad hostfile line ({hf}:2: 'localhost slots=1'): duplicate host 'localhost' "
                             f"(first on line 1); list each host once with its slots")
    hf.write_text("localhost slots=2\n")
    r = run(LAUNCH + ["-H", str(hf), "--include", "localhots", "--", "python", "-c", "pass"], timeout=60)
    assert r.returncode == 2 and "did you mean 'localhost'" in r.stderr
    assert error_line(r).startswith("error: host 'localhots' is not in hostfile")
    r = run(LAUNCH + ["--num_nodes", "2", "--", "python", "-c", "pass"], timeout=60)
    assert r.returncode == 2 and "needs a hostfile" in r.stderr
    error_line(r)
    r = run(LAUNCH + ["--launcher", "slurm", "--", "python", "-c", "pass"], timeout=60)
    assert r.returncode == 2 and "needs a SLURM allocation" in r.stderr
    error_line(r)


def test_dry_run_shows_the_commands_for_each_launcher(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("node-a slots=2\nnode-b slots=2\n")
    r = run(LAUNCH + ["--dry-run", "--launcher", "openmpi", "-H", str(hf), "--", "python", "-m", "rtdist.train"],
            timeout=60, FOO="1")
    assert r.returncode == 0, r.stderr
    assert "-n 4 -H node-a:2,node-b:2 -x MASTER_ADDR=node-a -x MASTER_PORT=29500" in r.stderr
    r = run(LAUNCH + ["--dry-run", "--launcher", "mpich", "--num_gpus", "3", "--master_port", "29555", "--",
                      "python", "-m", "rtdist.train"], timeout=60)
    assert "-n 3 -genv MASTER_ADDR 127.0.0.1 -genv MASTER_PORT 29555" in r.stderr, r.stderr
    r = run([sys.executable, "-m", "rtdist.launcher", "--dry-run", "--num_gpus", "3", "--master_port", "29556", "--",
             "python", "train.py", "--lr", "1"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert (f"-m torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node 3 --master_addr 127.0.0.1 "
            f"--master_port 29556 --signals_to_handle SIGHUP,SIGQUIT --no-python {sys.executable} train.py --lr 1") \
        in r.stderr, r.stderr


def test_dry_run_of_a_two_host_hostfile_prints_the_plan_and_warns_of_what_it_lacks(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("node-a slots=2\nnode-b slots=2\n")
    r = run(LAUNCH + ["--dry-run", "-H", str(hf), "--", "python", "-m", "rtdist.train"], timeout=60,
            PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")  # no pdsh there
    assert r.returncode == 0, r.stderr
    assert "pdsh: 2 node(s) [node-a,node-b] x 2 = world 4" in r.stderr
    assert "warning: a hostfile with other hosts needs pdsh" in r.stderr
    assert "command: " in r.stderr and "deepspeed.launcher.runner --hostfile" in r.stderr


def test_split_argv_accepts_deepspeed_style_without_double_dash():
    assert L.split_argv(["--num_gpus", "2", "train.py", "--lr", "1"]) == (["--num_gpus", "2"],
                                                                         ["train.py", "--lr", "1"])
    assert L.split_argv(["-H", "hf", "--no_ssh_check", "--", "python", "-m", "x"]) == (
        ["-H", "hf", "--no_ssh_check"], ["python", "-m", "x"])


# --------------------------------------------------------------------------------------------- discovery
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_", "PMIX_")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)


def test_discovery_order_and_sources(monkeypatch):
    _clean_env(monkeypatch)
    assert dist.discover().source == "single"
    assert dist.discover(rank=1, world_size=2).source == "explicit"
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert (dist.discover().source, dist.discover().rank, dist.discover().master_addr) == ("openmpi", 1, "10.0.0.1")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    d = dist.discover()
    assert (d.source, d.rank, d.world_size, d.master_port) == ("slurm", 3, 4, dist.slurm_master_port("77"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.discover().source == "env"


def test_slurm_variables_outside_an_srun_step_do_not_make_a_world(monkeypatch, capsys):
    _clean_env(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")  # a batch script running python directly sees these
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert dist.discover().source == "single"
    assert "not started by srun" in capsys.readouterr().err


def test_pmi_without_a_master_address_falls_back_to_one_host(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(dist, "_mpi4py_info", lambda: None)  # no mpi4py here
    d = dist.discover()
    assert (d.source, d.rank, d.world_size, d.master_addr) == ("pmi", 1, 2, "127.0.0.1")


def test_inconsistent_rank_variables_are_an_error(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(dist.DiscoveryError, match=r"RANK=2 is outside a world of WORLD_SIZE=2 \(ranks 0..1"):
        dist.discover()


# ------------------------------------------------------------------------------------------ real launches
@pytest.fixture
def probe(tmp_path):
    p = tmp_path / "probe.py"
    p.write_text(PROBE)
    return str(p)


def test_local_launcher_starts_ranks_propagates_env_file_and_forwards_sigusr1(tmp_path, probe):
    """The local path runs torchrun; SIGUSR1, which would end torchrun itself, still reaches the workers."""
    (tmp_path / ".deepspeed_env").write_text("# from the env file\n\nRTDIST_TEST_VAR='hello world'\n")
    port = str(free_port())
    r = run(LAUNCH + ["--num_gpus", "2", "--master_port", port, "--", "python", probe], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"-m torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node 2 --master_addr 127.0.0.1 " \
           f"--master_port {port}" in r.stderr
    rows = probes(r.stdout)
    assert [(x["rank"], x["world"], x["local"], x["source"], x["sum"]) for x in rows] == [
        ("0", "2", "0", "env", "3"), ("1", "2", "1", "env", "3")]
    assert all(x["envfile"] == "hello_world" for x in rows)  # the probe prints spaces as _
    # SIGUSR1 to the launcher reaches every process; a failing rank takes the others down with its status
    waiter = tmp_path / "wait.py"
    waiter.write_text(textwrap.dedent("""
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        open(os.path.join(sys.argv[1], f"ready{os.environ['RANK']}"), "w").close()
        t = time.time()
        while not got and time.time() - t < 60:
            time.sleep(0.05)
        sys.exit(0 if got else 5)
    """))
    p = subprocess.Popen(LAUNCH + ["--num_gpus", "2", "--master_port", str(free_port()), "--", "python",
                                   str(waiter), str(tmp_path)], cwd=ROOT, env=env(), stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 60
    while not ((tmp_path / "ready0").exists() and (tmp_path / "ready1").exists()) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(60) == 0
    r = run(LAUNCH + ["--num_gpus", "2", "--master_port", str(free_port()), "--", "python", "-c",
                      "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"],
            timeout=60)
    assert r.returncode == 3 and r.wall < 30


def test_each_node_starts_its_share_with_no_ssh_and_node_rank(tmp_path, probe):
    """Two 'nodes' of a hostfile on this machine, one launcher each (--no_ssh --node_rank R): torchrun on each
    starts that node's processes, with global ranks in hostfile order."""
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(LAUNCH + ["--launcher", "local", "-H", str(hf), "--no_ssh", "--node_rank", str(r),
                                        "--master_port", port, "--", "python", probe], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=120) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    node1, node0 = ([(x["rank"], x["local"], x["world"], x["sum"]) for x in probes(out)] for out, _ in outs)
    assert node0 == [("0", "0", "3", "6"), ("1", "1", "3", "6")] and node1 == [("2", "0", "3", "6")]
    r = run(LAUNCH + ["--launcher", "local", "-H", str(hf), "--no_ssh", "--node_rank", "2", "--", "python", probe])
    assert r.returncode == 2 and "--node_rank (got 2)" in error_line(r)


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install mpi4py mpich)")
def test_real_mpirun_trains_with_discovery_through_mpi4py(manifest, tmp_path):
    pytest.importorskip("mpi4py")
    r = run([MPIRUN, "-n", "2", sys.executable] + train_args(manifest, tmp_path / "run"),
            MASTER_PORT=str(free_port()))  # no MASTER_ADDR: rank 0 broadcasts its own through mpi4py
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "world 2 (mpi4py)" in r.stdout  # PMI_RANK/PMI_SIZE alone carry no master address: mpi4py's rank 0 does
    assert result(tmp_path / "run")["status"] == "completed"
    print(f"mpirun -n 2 python -m rtdist.train: {r.wall:.1f}s")


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install mpi4py mpich)")
def test_launcher_mpich_path_runs_mpirun_with_the_master_address(tmp_path, probe):
    (tmp_path / "extra.env").write_text("RTDIST_TEST_VAR=viaenvfile\n")
    r = run(LAUNCH + ["--launcher", "mpich", "--num_gpus", "2", "--master_port", str(free_port()),
                      "--env-file", str(tmp_path / "extra.env"), "--", "python", probe], timeout=120,
            PATH=os.path.dirname(MPIRUN) + os.pathsep + os.environ.get("PATH", ""))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = probes(r.stdout)
    assert [(x["rank"], x["source"], x["sum"], x["envfile"]) for x in rows] == [
        ("0", "pmi", "3", "viaenvfile"), ("1", "pmi", "3", "viaenvfile")]


def test_deepspeed_runner_with_a_localhost_hostfile_trains(manifest, tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# one machine, two CPU processes\n\nlocalhost slots=2   # this box\n")
    r = run(LAUNCH + ["-H", str(hf), "--master_port", str(free_port()), "--", sys.executable]
            + train_args(manifest, tmp_path / "run"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "deepspeed.launcher.launch" in r.stdout + r.stderr and "world 2 (env)" in r.stdout
    res = result(tmp_path / "run")
    assert res["status"] == "completed" and res["step"] == 4
    assert (tmp_path / "run" / "model.safetensors").exists()
    print(f"launch.py -H hostfile (DeepSpeed runner): {r.wall:.1f}s")


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun (pip install mpi4py mpich)")
def test_an_mpi_flavour_other_than_the_installed_one_is_refused_before_anything_runs(tmp_path):
    from rtdist.launcher import mpi_flavour
    installed = mpi_flavour(MPIRUN)
    assert installed in ("mpich", "openmpi")
    other = "openmpi" if installed == "mpich" else "mpich"
    r = run(LAUNCH + ["--launcher", other, "--num_gpus", "2", "--master_port", str(free_port()), "--", "python", "-c",
                      f"open({str(tmp_path / 'ran')!r}, 'w')"], timeout=60,
            PATH=os.path.dirname(MPIRUN) + os.pathsep + os.environ.get("PATH", ""))
    assert r.returncode == 2 and f"pass --launcher {installed}" in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "ran").exists()
