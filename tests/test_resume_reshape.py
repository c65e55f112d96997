"""Resuming on another cluster shape (real processes, gloo): world size, data-parallel / sequence-parallel split,
ZeRO stage and engine may all change between a checkpoint and the run that resumes it.

One run is trained by a chain of jobs of different shapes, each resuming the previous job's checkpoint: every job but
the last trains one step and is killed during the next (like a preempted job), the last trains the rest. Keeping the global batch of 4 samples (data-parallel x
micro batch 2 x accumulation, the accumulation derived by the resume), its losses equal an uninterrupted run within
1e-5 and it ends with the same optimizer state; a sample ledger shows every sample of the epoch's order consumed
once, in order."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_train_cli import ROOT, losses, run, train_cmd

from rtdist import checkpoint as ckpt

STEPS = 6
# One schedule for every job; random centroids, since data-seeded ones read a batch of their own that the ledger
# would record as a training read.
COMMON = [f"train.train_iters={STEPS}", "train.save_interval=1", "train.kmeans_init=random"]
# One job per step: (ranks, settings, what changed from the job before).
JOBS = [
    (2, ["train.zero_stage=1"], "start: 2 data-parallel ranks, ZeRO-1"),
    (2, ["train.zero_stage=3"], "ZeRO-1 -> ZeRO-3"),
    (2, ["train.zero_stage=2", "parallel.sequence_parallel_size=2"], "DP2 -> DP1 x SP2 (accumulation 2), ZeRO-2"),
    (1, ["train.zero_stage=2"], "2 -> 1 rank under ZeRO-2"),
    (2, ["train.engine=torch", "train.zero_stage=0"], "1 -> 2 ranks (accumulation 2 -> 1), deepspeed -> torch DDP"),
]  # the last job trains the remaining steps
LEDGER = str(ROOT / "tests" / "ledger")


def job(manifest, run_dir, ranks, sets, **env):
    return run(train_cmd(ranks, manifest, run_dir, *COMMON, *sets, resume="auto"), timeout=300,
               PYTHONPATH=f"{LEDGER}{os.pathsep}{ROOT}", **env)


@pytest.fixture(scope="module")
def reshaped(manifest, tmp_path_factory):
    """The uninterrupted run and the run of one job per step."""
    tmp = tmp_path_factory.mktemp("reshape")
    # Saving only at the end: the reshaped chain saves every step, so a save that changed the training that
    # follows it would show as a difference too.
    straight = job(manifest, tmp / "straight", JOBS[0][0], [*JOBS[0][1], "train.save_interval=0"],
                   RTDIST_LEDGER=str(tmp / "ledger_straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    outs = []
    for i, (ranks, sets, what) in enumerate(JOBS):
        last = i == len(JOBS) - 1
        r = job(manifest, tmp / "reshaped", ranks, sets, RTDIST_LEDGER=str(tmp / f"ledger{i}"),
                **({} if last else {"RTDIST_FAULT": f"step:{i + 2}"}))  # killed during the next step
        assert (r.returncode == 0) == last, f"job {i + 1} ({what}): {r.stderr[-3000:]}"
        outs.append(r.stdout)
    return tmp, outs


def test_losses_equal_an_uninterrupted_run_across_every_change_of_shape(reshaped):
    tmp, outs = reshaped
    a, b = losses(tmp / "straight"), losses(tmp / "reshaped")
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= 1e-5, f"step {step} ({JOBS[min(step, len(JOBS)) - 1][2]}): {y} resumed, {x} uninterrupted"
    assert a[-1] < a[0] - 0.05  # it trains: a lost optimizer state would show
    assert all("resumed from" in out and "(resharded)" in out for out in outs[1:])
    assert "gradient_accumulation_steps 1 -> 2 keeps the global batch of 4 samples" in outs[2]


def test_optimizer_state_step_counts_and_centroids_carry_over(reshaped):
    from rtdist.model import RoutingTransformerLM
    from rtdist.parallel import reshard
    tmp, _ = reshaped
    ends = [tmp / name / "checkpoints" / f"global_step{STEPS}" for name in ("straight", "reshaped")]
    markers = [ckpt.read_marker(d) for d in ends]
    assert [(m.engine, m.zero_stage) for m in markers] == [("deepspeed", 1), ("torch", 0)]
    from rtdist.config import load_config
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["train.seq_length=64", "model.window_size=16"])
    module = RoutingTransformerLM(cfg.model)
    (tmp / "scratch").mkdir(exist_ok=True)
    a, b = (reshard.read_portable(d, m.layout, module, tmp / "scratch") for d, m in zip(ends, markers))
    assert a.step == b.step == STEPS and a.scheduler == b.scheduler
    for field in ("params", "buffers", "exp_avg", "exp_avg_sq"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys() and any("kmeans.ema_counts" in k for k in a.buffers)
        for k in x:
            torch.testing.assert_close(y[k].float(), x[k].float(), rtol=1e-4, atol=1e-6, msg=f"{field} {k}")


def consumed(ledger: str, ranks: int, sp: int, steps: int) -> list[str]:
    """The sample keys a job's trainer took in its first ``steps`` steps, in the epoch's global order (round by
    round: each data-parallel rank's micro batch in rank order)."""
    per_rank = 4 // (ranks // sp) * steps // 2  # micro batches of 2
    lines = [Path(f"{ledger}.{rank}").read_text().splitlines()[:per_rank] for rank in range(0, ranks, sp)]
    return [k for t in range(per_rank) for rank_lines in lines for k in rank_lines[t].split()[1:]]


def test_the_ledger_reads_every_sample_of_the_epochs_order_once(reshaped):
    tmp, _ = reshaped
    straight = consumed(str(tmp / "ledger_straight"), 2, 1, STEPS)
    ledger = []
    for i, (ranks, sets, _) in enumerate(JOBS):  # each job kept one step, the last the rest
        kept = 1 if i < len(JOBS) - 1 else STEPS - i
        ledger += consumed(str(tmp / f"ledger{i}"), ranks, 2 if "parallel.sequence_parallel_size=2" in sets else 1,
                           kept)
    assert len(ledger) == len(set(ledger)) == STEPS * 4  # no sample twice
    assert ledger == straight  # none skipped: the uninterrupted run's samples, in its order
    marker = ckpt.read_marker(tmp / "reshaped" / "checkpoints" / f"global_step{STEPS}")
    assert (marker.data["epoch"], marker.data["position"]) == (0, STEPS * 4)


def test_checkpoint_info_says_what_a_checkpoint_holds_and_resumes_on(reshaped):
    tmp, _ = reshaped
    r = run([sys.executable, "-m", "rtdist.checkpoint", "info", str(tmp / "reshaped")])
    assert r.returncode == 0, r.stderr
    assert f"step {STEPS}, written by 2 rank(s) = 2 data-parallel x 1 sequence-parallel, engine torch" in r.stdout
    assert f"data position: epoch 0, {STEPS * 4} samples of its global order consumed" in r.stdout
    assert "data-parallel sizes [1, 2] with micro batch 2" in r.stdout


def test_every_checkpoint_stays_as_written_and_no_conversion_is_left_behind(reshaped):
    tmp, _ = reshaped
    checkpoints = tmp / "reshaped" / "checkpoints"
    assert ckpt.complete_steps(checkpoints) == list(range(1, STEPS + 1))
    assert not any(ckpt.verify(checkpoints / f"global_step{s}") for s in range(1, STEPS + 1))  # read, never written
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("global_step")) == \
        ["latest", "zero_to_fp32.py", "zero_to_torch.py"]
    assert not list(checkpoints.glob("*.tmp-*"))


@pytest.mark.parametrize("sets, message", [
    (["train.train_micro_batch_size_per_gpu=3"],  # 1 rank x micro 3 cannot make the checkpoint's 4 samples per step
     "the global batch of global_step6 (4 samples per step) is not divisible by train.train_micro_batch_size_per_gpu "
     "(3) x data-parallel size (1 = world 1 / parallel.sequence_parallel_size 1); on this world set "
     "train.train_micro_batch_size_per_gpu to one of [1, 2, 4]"),
    (["parallel.sequence_parallel_size=3"],
     "must be divisible by parallel.sequence_parallel_size x window (3 x 16): use parallel.sequence_parallel_size in "
     "[1, 2, 4]"),
    (["train.seed=7"], "its data position is a position in other data (loader state was saved for other data: seed: "
                       "saved 1234, now 7): resume with the checkpoint's data.manifest, data.train_split and "
                       "train.seed"),
])
def test_a_resume_that_cannot_work_fails_before_training_naming_the_key_and_what_would(reshaped, manifest, sets,
                                                                                       message):
    tmp, _ = reshaped
    r = run(train_cmd(1, manifest, tmp / "reshaped", *COMMON, "train.train_iters=8", *sets, resume="auto"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
    assert len(losses(tmp / "reshaped")) == STEPS


def test_the_global_batch_is_kept_on_a_world_it_divides_and_refused_on_one_it_does_not(reshaped):
    from rtdist.config import ConfigError, load_config
    from rtdist.parallel import ParallelDims
    tmp, _ = reshaped
    step_dir = tmp / "reshaped" / "checkpoints" / f"global_step{STEPS}"
    marker = ckpt.read_marker(step_dir)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["train.train_micro_batch_size_per_gpu=1"])
    accumulation = ckpt.kept_accumulation(step_dir, marker, cfg.train, ParallelDims(1, 2), log=lambda *a, **k: None)
    assert accumulation == 2  # 2 ranks x micro 1 x 2 = 4
    with pytest.raises(ConfigError, match=r"x data-parallel size \(3 = world 3 / parallel.sequence_parallel_size 1\); "
                                          r"with micro batch 1 it needs a data-parallel size in \[1, 2, 4\]"):
        ckpt.kept_accumulation(step_dir, marker, cfg.train, ParallelDims(1, 3), log=lambda *a, **k: None)
