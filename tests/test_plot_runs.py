"""tools/plot_runs.py: two real small runs overlaid in one PNG with a comparison table; resumed runs, runs that log
time_s/tokens and older runs that do not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import plot_runs  # noqa: E402

from rtdist.errors import cli_main  # noqa: E402

STEPS, MICRO, SEQ = 8, 2, 64


@pytest.fixture(scope="module")
def two_runs(manifest, tmp_path_factory):
    """Two 8-step runs of the tiny model (one process, engine torch), eval and a checkpoint every 4 steps; side by
    side, one thread each (mostly start-up: together they take little more than one)."""
    d = tmp_path_factory.mktemp("runs")
    procs = []
    for name, lr in (("fast", "3e-3"), ("slow", "3e-4")):
        sets = [f"data.manifest={manifest}", f"train.seq_length={SEQ}", "model.window_size=16",
                f"train.train_micro_batch_size_per_gpu={MICRO}", f"train.train_iters={STEPS}", "train.log_interval=1",
                "train.eval_interval=4", "train.eval_iters=2", "train.save_interval=4", "train.engine=torch",
                "train.zero_stage=0", f"train.lr={lr}", "data.num_workers=0"]
        cmd = [sys.executable, "-m", "rtdist.train", "--config", "configs/tiny.yaml", "--run-dir", str(d / name)]
        procs.append(subprocess.Popen(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}))
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    return d / "fast", d / "slow"


def logged(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_overlay_into_one_png_and_a_table(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert plot_runs.main([str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    text = capsys.readouterr().out
    for run_dir in two_runs:
        row = next(line for line in text.splitlines() if line.startswith(run_dir.name + " "))
        lines = logged(run_dir)
        evals = [x for x in lines if "eval_loss" in x]
        best_loss, best_bpb = min(x["eval_loss"] for x in evals), min(x["eval_bits_per_byte"] for x in evals)
        # final loss, best eval loss and bits/byte, steps, tokens (one process: micro x seq per step)
        assert row.split()[1:6] == [f"{lines[-1]['loss']:.4f}", f"{best_loss:.4f}", f"{best_bpb:.4f}", str(STEPS),
                                    f"{STEPS * MICRO * SEQ:,}"]
    assert f"wrote {out}" in text and "4 eval points" in text


def test_every_panel_marks_the_eval_points_on_the_runs_curves(two_runs, tmp_path):
    runs = [plot_runs.load_run(r) for r in two_runs]
    fig = plot_runs.plot(runs, tmp_path / "x.png")
    step_axis, tokens_axis = fig.axes[0], fig.axes[1]
    for ax, scale in ((step_axis, 1), (tokens_axis, MICRO * SEQ)):
        marked = [line for line in ax.lines if line.get_marker() == "o"]
        assert [line.get_label() for line in marked] == ["fast eval", "slow eval"]
        assert all(list(line.get_xdata()) == [4 * scale, 8 * scale] for line in marked)
    assert tokens_axis.get_xscale() == "log"


def write_run(path, lines, config=None, dp_size=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if config is not None:
        (path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    if dp_size is not None:
        (path / "checkpoints" / "global_step4").mkdir(parents=True)
        (path / "checkpoints" / "global_step4" / "complete").write_text(json.dumps({"dp_size": dp_size}))
    return path


def test_logged_time_and_tokens_are_used_and_a_resumed_segment_replaces_the_crashed_one(tmp_path):
    first = [{"step": s, "loss": 9.0 - s, "tokens": 100 * s, "time_s": 2.0 * s} for s in (1, 2, 3, 4)]
    resumed = [{"step": s, "loss": 5.0 - s, "tokens": 100 * s, "time_s": 10.0 + s} for s in (3, 4, 5)]
    resumed[-1].update(eval_loss=1.5, eval_bits_per_byte=2.5)
    run = plot_runs.load_run(write_run(tmp_path / "r", first + resumed))
    assert run.step == [1, 2, 3, 4, 5] and run.loss == [8.0, 7.0, 2.0, 1.0, 0.0]
    assert run.time_s == [2.0, 4.0, 13.0, 14.0, 15.0]
    row = plot_runs.summary(run)
    assert row["tokens"] == 500 and row["time_s"] == 15.0 and row["tokens_per_s"] == pytest.approx(500 / 15)
    assert row["best_eval_loss"] == 1.5 and row["best_eval_bpb"] == 2.5


def test_an_older_run_takes_tokens_from_its_config_and_checkpoint_and_has_no_wall_time(tmp_path):
    lines = [{"step": s, "loss": 3.0, "tokens_per_s": 1000.0 * s} for s in (1, 2, 3, 4)]
    config = {"train": {"seq_length": 100, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}}
    run = plot_runs.load_run(write_run(tmp_path / "old", lines, config, dp_size=4))
    assert run.tokens == [2400, 4800, 7200, 9600] and run.time_s == [None] * 4
    row = plot_runs.summary(run)
    assert row["time_s"] is None and row["tokens_per_s"] == 2500.0  # the mean of the logged rates
    fig = plot_runs.plot([run], tmp_path / "old.png")
    assert not fig.axes[2].lines  # nothing to draw against wall time


def test_a_half_written_last_line_is_skipped_and_counted(tmp_path):
    path = write_run(tmp_path / "live", [{"step": 1, "loss": 2.0, "tokens": 10, "time_s": 1.0}])
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    run = plot_runs.load_run(path)
    assert run.step == [1] and run.skipped_lines == 1


@pytest.mark.parametrize("argv, words", [
    (["{tmp}/missing"], ["run directory", "missing", "does not exist"]),
    (["{tmp}", "--labels", "a", "b"], ["--labels", "2 names for 1 runs"]),
])
def test_a_command_that_cannot_work_says_why_in_one_line(tmp_path, capsys, argv, words):
    assert cli_main(plot_runs.main, [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err


def test_the_runs_loss_by_position_is_drawn_on_one_plot(two_runs, tmp_path, capsys):
    """From each run's final evaluation (result.json); a run without one is named with what to do."""
    out, positions = tmp_path / "cmp.png", tmp_path / "pos.png"
    assert plot_runs.main([str(two_runs[0]), str(two_runs[1]), "--out", str(out), "--positions", str(positions)]) == 0
    assert positions.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss by position: fast, slow" in capsys.readouterr().out
    final = json.loads((two_runs[0] / "result.json").read_text())["eval"]
    assert sum(r["tokens"] for r in final["loss_by_position"]) == final["tokens"]
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(Exception, match="empty.json has no loss_by_position"):
        plot_runs.positions_of([two_runs[0]], ["fast"], [tmp_path / "empty.json"])
