"""Monitor: each logged step reaches the sinks configured under `deepspeed:` (TensorBoard by default, CSV, W&B
offline), read back here the way TensorBoard and a spreadsheet would read them."""
import csv
import importlib.util

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rtdist.errors import ConfigError
from rtdist.monitor import Monitor, sink_settings, without_sinks

STEPS = [
    {"step": 1, "loss": 5.5, "lr": 1e-3, "grad_norm": 4.0, "epoch": 0},
    {"step": 2, "loss": 4.25, "lr": 2e-3, "grad_norm": 3.0, "epoch": 0, "eval_loss": 4.5, "eval_bits_per_byte": 6.5},
    {"step": 3, "loss": 3.75, "lr": 3e-3, "grad_norm": 2.0, "epoch": 0, "kmeans_balance": 0.5, "note": "text"},
]


def scalars(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def log_all(monitor, steps):
    with monitor:
        for m in steps:
            monitor.log(m["step"], m)


def test_default_config_writes_tensorboard_events_beside_the_metrics(tmp_path):
    log_all(Monitor(tmp_path, {}, enabled=True), STEPS)
    got = scalars(tmp_path / "tensorboard")
    assert set(got) == {"train/loss", "train/lr", "train/grad_norm", "train/epoch", "eval/loss",
                        "eval/bits_per_byte", "kmeans/balance"}  # numbers only: no step, no text
    assert got["train/loss"] == [(1, 5.5), (2, 4.25), (3, 3.75)]
    assert got["eval/bits_per_byte"] == [(2, 6.5)]
    assert [s for s, _ in got["train/lr"]] == [1, 2, 3] and got["train/lr"][2][1] == pytest.approx(3e-3)
    assert not (tmp_path / "csv_monitor").exists()  # CSV is off unless enabled


def test_csv_monitor_uses_deepspeeds_keys_and_layout(tmp_path):
    ds = {"tensorboard": {"enabled": False},
          "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run7"}}
    log_all(Monitor(tmp_path / "run", ds, enabled=True), STEPS)
    out = tmp_path / "csv" / "run7"
    assert rows(out / "train_loss.csv") == [["step", "loss"], ["1", "5.5"], ["2", "4.25"], ["3", "3.75"]]
    assert rows(out / "eval_loss.csv") == [["step", "loss"], ["2", "4.5"]]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_resumed_run_replaces_what_a_crashed_segment_logged_after_the_checkpoint(tmp_path):
    ds = {"csv_monitor": {"enabled": True}}
    log_all(Monitor(tmp_path, ds, enabled=True), [{"step": s, "loss": 10.0 - s} for s in range(1, 6)])
    # Checkpoint at step 3; the crashed segment had logged 4 and 5. The resumed run logs 4..6 again.
    log_all(Monitor(tmp_path, ds, enabled=True, start_step=3), [{"step": s, "loss": 100.0 + s} for s in (4, 5, 6)])
    assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0),
                                                               (5, 105.0), (6, 106.0)]
    assert [r[0] for r in rows(tmp_path / "csv_monitor" / "train_loss.csv")] == ["step", "1", "2", "3", "4", "5",
                                                                                  "6"]
    assert rows(tmp_path / "csv_monitor" / "train_loss.csv")[4] == ["4", "104.0"]


def test_ranks_other_than_0_write_nothing(tmp_path):
    log_all(Monitor(tmp_path, {"csv_monitor": {"enabled": True}}, enabled=False), STEPS)
    assert list(tmp_path.iterdir()) == []


def test_a_sink_disabled_in_the_config_writes_nothing(tmp_path):
    log_all(Monitor(tmp_path, {"tensorboard": {"enabled": False}}, enabled=True), STEPS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("section, words", [
    ({"tensorboard": {"output_dir": "x"}}, ["deepspeed.tensorboard.output_dir", "deepspeed.tensorboard.output_path"]),
    ({"csv_monitor": True}, ["deepspeed.csv_monitor", "mapping"]),
    ({"wandb": {"enabled": "yes"}}, ["deepspeed.wandb.enabled", "true/false"]),
])
def test_a_sink_section_that_cannot_work_names_the_key(tmp_path, section, words):
    with pytest.raises(ConfigError) as e:
        Monitor(tmp_path, section, enabled=False)  # every rank checks, not only the one that writes
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_typo_in_a_sink_fails_when_the_config_loads():
    from rtdist.config import load_config
    with pytest.raises(ConfigError, match=r"unknown key 'deepspeed.csv_monitor.jobname' \(did you mean "
                                          r"'deepspeed.csv_monitor.job_name'\?\)"):
        load_config("configs/tiny.yaml", ["deepspeed.csv_monitor.jobname=run7"])


def test_deepspeed_gets_the_config_without_the_sinks():
    ds = {"tensorboard": {"enabled": True}, "wandb": {"enabled": True}, "csv_monitor": {},
          "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    assert without_sinks(ds) == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    assert sink_settings({})["tensorboard"]["enabled"] and not sink_settings({})["wandb"]["enabled"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_warns_once_and_keeps_the_other_sinks(tmp_path):
    lines = []
    log_all(Monitor(tmp_path, {"wandb": {"enabled": True, "project": "p"}}, enabled=True, warn=lines.append), STEPS)
    assert len(lines) == 1 and "wandb" in lines[0] and "pip install wandb" in lines[0]
    assert scalars(tmp_path / "tensorboard")["train/loss"][-1] == (3, 3.75)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed here")
def test_wandb_writes_an_offline_run_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log_all(Monitor(tmp_path, {"wandb": {"enabled": True, "project": "p", "group": "g"}}, enabled=True), STEPS)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def training_monitor(tmp_path, lines, progress=False, **sets):
    import torch

    from rtdist.checkpoint import TrainState
    from rtdist.config import load_config
    cfg = load_config("configs/tiny.yaml", ["train.log_interval=2", "train.train_iters=4", "train.seq_length=64",
                                            "model.window_size=16", *[f"{k}={v}" for k, v in sets.items()]])
    state = TrainState()
    monitor = Monitor.for_training(tmp_path, cfg, 1, True, state, torch.device("cpu"), progress=progress,
                                   log=lambda line, **k: lines.append(line))
    return cfg, state, monitor


def test_a_training_run_logs_throughput_memory_and_mfu_to_every_sink_and_one_plain_line_per_log_step(tmp_path,
                                                                                                     monkeypatch):
    import json
    import re
    from types import SimpleNamespace

    import rtdist.monitor
    from rtdist.flops import flops_per_token
    from rtdist.model import RoutingTransformerLM
    # A fixed peak: these "steps" take microseconds, so MFU against a measured one says nothing (it read 1.24 on a
    # fast box); what matters is that the figure is tokens/s x FLOP per token / peak.
    monkeypatch.setattr(rtdist.monitor, "peak_flops", lambda device, precision: (2e12, "a fixed peak"))
    lines = []
    cfg, state, monitor = training_monitor(tmp_path, lines)
    model = RoutingTransformerLM(cfg.model)
    engine = SimpleNamespace(lr=lambda: 1e-3, grad_norm=lambda: 0.5)
    with monitor:
        for _ in range(4):
            state.stepped(4 * 64)
            monitor.log(state.step, monitor.step_row(state, 2.0, engine, model, epoch=0))
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and logged[0].keys() == {"step", "loss", "time_s", "tokens"}
    full = logged[1]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "max_mem_mb", "skipped_steps", "epoch"} <= full.keys()
    assert full["tokens_per_s"] > 0 and full["tokens"] == 2 * 256
    fpt = flops_per_token(cfg.model, cfg.train.seq_length)
    assert full["mfu"] == pytest.approx(full["tokens_per_s"] * fpt / 2e12, rel=1e-3, abs=1e-5)
    assert any(k.startswith("kmeans_l") for k in full)
    assert {"train/mfu", "train/tokens_per_s", "train/max_mem_mb"} <= set(scalars(tmp_path / "tensorboard"))
    step_lines = [x for x in lines if x.startswith("step ")]
    assert len(step_lines) == 2 and not any("\r" in x for x in lines)
    assert re.fullmatch(r"step 2/4  loss 2\.0000  lr 0\.001  grad_norm 0\.5  tok/s [\d,]+  mfu \d+\.\d\d%  "
                        r"mem [\d,]+ MiB  elapsed 0:00:\d\d  eta 0:00:\d\d", step_lines[0]), step_lines[0]
    assert lines[0] == f"mfu: against 2.00 TFLOP/s per device (a fixed peak); {fpt / 1e6:.1f} MFLOP per token"


def test_the_peak_of_a_cpu_is_its_measured_matmul_rate():
    import torch

    from rtdist.flops import peak_flops
    peak, source = peak_flops(torch.device("cpu"))
    assert peak > 1e8 and source == "measured fp32 matmul of this CPU"


def test_with_a_progress_bar_the_job_log_gets_no_step_lines(tmp_path):
    lines = []
    _, state, monitor = training_monitor(tmp_path, lines, progress=True)
    with monitor:
        state.stepped(256)
        monitor.log(1, {"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "mfu": 0.1,
                        "max_mem_mb": 5.0, "time_s": 1.0, "tokens": 256})
    assert not [x for x in lines if x.startswith("step ")]
