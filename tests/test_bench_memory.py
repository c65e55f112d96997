"""tools/bench_memory.py: the pipeline (JSON/CSV/PNG, series stops, skipped sequence parallelism) and the analytic
memory model of tools/benchlib.py (parameter count, ZeRO sharding, saved activations against what a forward
leaves alive)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtdist.config import ModelConfig, layer_head_split
from rtdist.model import RoutingTransformerLM, count_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_memory(tool, monkeypatch):
    # Its point processes run `python tools/bench_memory.py`: they import this checkout's rtdist, as the test does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return tool("bench_memory")


@pytest.fixture
def bench(tool):
    return tool("benchlib")


def run(bench_memory, tmp_path, *flags):
    return bench_memory.main(["--quick", "--no-progress", "--out-dir", str(tmp_path), *flags])


def test_quick_sweep_writes_json_csv_png_with_estimates(tmp_path, bench_memory):
    data = run(bench_memory, tmp_path)
    for name in ("bench_memory.json", "bench_memory.csv", "bench_memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "bench_memory.json").read_text())
    rows = saved["results"]
    assert [r["seq_length"] for r in rows] == [256, 512]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["peak_mb"] > 0 and r["time_s"] > 0 and r["tokens_per_s"] > 0
        for k in ("est_mb", "est_peak_mb", "est_saved_mb", "est_states_mb", "est_ratio", "saved_mb"):
            assert isinstance(r[k], float), k
    assert saved["meta"]["peak_method"].startswith("peak RSS")
    fit = saved["fits"]["routing ckpt=none sp=1"]
    assert fit["mem_exponent"] is not None and fit["stopped_at"] is None
    with open(tmp_path / "bench_memory.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert data["targets"]  # evaluated on what was measured


def test_a_sweep_killed_after_its_first_point_keeps_that_point_on_disk(tmp_path):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--quick", "--no-progress",
                             "--seq-lengths", "256,512,1024", "--out-dir", str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved, deadline = [], time.time() + 240
    while not saved and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        try:
            saved = json.loads((tmp_path / "bench_memory.json").read_text())["results"]
        except (OSError, ValueError):  # not there yet (an atomic write: never half a file)
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = json.loads((tmp_path / "bench_memory.json").read_text())
    assert data["meta"]["partial"] is True and data["results"][0]["seq_length"] == 256
    assert data["results"][0]["status"] == "ok" and data["results"][0]["peak_mb"] > 0
    with open(tmp_path / "bench_memory.csv") as f:
        assert [int(r["seq_length"]) for r in csv.DictReader(f)] == [r["seq_length"] for r in data["results"]]


def test_the_budget_search_says_what_it_measures_and_tables_one_unit_per_column(tmp_path, bench_memory, capsys):
    data = run(bench_memory, tmp_path, "--seq-lengths", "256", "--budget-gb", "0.5")
    out = capsys.readouterr().out
    assert "budget 0.5 GiB, routing ckpt=none sp=1: the estimate allows" in out
    assert "points tried for the budget:" in out and data["budget"][0]["variant"] == "routing ckpt=none sp=1"
    assert "partial" not in json.loads((tmp_path / "bench_memory.json").read_text())["meta"]


def test_max_mem_stops_series_before_starting_a_point(tmp_path, bench_memory):
    data = run(bench_memory, tmp_path, "--max-mem-gb", "0.01", "--checkpointing", "none,full")
    rows = data["results"]
    assert [(r["checkpointing"], r["seq_length"], r["status"]) for r in rows] == [("none", 256, "max-mem"),
                                                                                 ("full", 256, "max-mem")]
    assert "not started" in rows[0]["reason"]
    assert data["fits"]["routing ckpt=none sp=1"]["stopped_at"] == 256
    assert json.loads((tmp_path / "bench_memory.json").read_text())["results"][0]["status"] == "max-mem"


def test_timeout_stops_series_and_records_where(tmp_path, bench_memory):
    data = run(bench_memory, tmp_path, "--timeout", "0.3")
    assert [(r["seq_length"], r["status"]) for r in data["results"]] == [(256, "timeout")]
    assert data["fits"]["routing ckpt=none sp=1"]["stop_reason"].startswith("timeout")


def test_sp_without_sequence_parallelism_is_skipped(tmp_path, monkeypatch, bench_memory):
    monkeypatch.setattr(bench_memory, "sp_available", lambda: False)
    data = run(bench_memory, tmp_path, "--sp", "2", "--seq-lengths", "256")
    (r,) = data["results"]
    assert (r["sp"], r["status"], r["reason"]) == (2, "skipped", "sequence parallelism not available")


def test_estimate_only_prints_zero_stages(tmp_path, capsys, bench_memory):
    data = bench_memory.main(["--estimate-only", "--full-size", "--world-size", "8", "--attention", "routing",
                              "--checkpointing", "full", "--seq-lengths", "8k"])
    out = capsys.readouterr().out
    assert "ZeRO" in out and data["results"] == []
    assert not (tmp_path / "bench_memory.json").exists()


def test_bench_attention_point_still_works(bench):
    """tools/bench_attention.py takes its helpers from tools/benchlib.py; one point of its CLI (the sweep around it
    also measures the matmul rate, seconds of CPU, so the point is run directly)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's rtdist, as the test imports it
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_attention.py"), "--point", "--attention",
                           "routing", "--seq-length", "128", "--d-model", "32", "--heads", "4", "--local-heads", "2",
                           "--window", "32", "--repeats", "1"], check=True, capture_output=True, text=True, timeout=120,
                          env=env)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["time_s"] > 0 and r["flops"] == bench.model_flops(
        ModelConfig(vocab_size=256, d_model=32, n_heads=4, n_local_attn_heads=2, window_size=32, num_clusters=8), 128, 1)


def test_bench_attention_peer_table_compares_each_sides_fastest_step(tool):
    """--peer prints, per length, each side's fastest step and largest peak, and ours against the port's."""
    peer_table = tool("bench_attention").peer_table
    row = lambda impl, t, mb: {"impl": impl, "seq_length": 1024, "time_s": t, "cpu_s": t, "peak_mem_mb": mb,  # noqa: E731
                               "load": 0.5}
    table = peer_table([row("rtdist", 10.0, 100), row("port", 17.0, 200), row("rtdist", 8.0, 110),
                        row("port", 16.0, 190)])
    assert "| 1024 | 8.0 s, 110 MiB (load 0.5) | 16.0 s, 200 MiB (load 0.5) | 2.00x / 0.55x |" in table


# ------------------------------------------------------------------------------------------- memory model


BASE = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_local_attn_heads=2, window_size=32,
            local_window_size=16, num_clusters=4)
VARIANTS = [dict(), dict(attention_type="local"), dict(attention_type="full"), dict(attention_type="full_naive"),
            dict(n_local_attn_heads=0), dict(pos_emb="none"), dict(ff_glu=False), dict(routing_layers=[-1]),
            dict(shared_qk=False), dict(emb_dim=32, tie_embedding=False), dict(head_dim=8)]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "routing")
def test_param_count_and_saved_activations_match_the_model(bench, kw):
    cfg = ModelConfig(**{**BASE, **kw})
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg)
    assert bench.count_params(cfg) == count_parameters(model)
    n = 256
    x = torch.randint(0, cfg.vocab_size, (1, n + 1))
    _, measured = bench.kept_bytes(lambda: model(x[:, :-1], targets=x[:, 1:]))  # the training loss entry: no logits
    keep, head = bench.global_saved_floats_per_token(cfg)
    formula = 4 * n * (sum(bench.saved_floats_per_token(cfg, n, s) for s in layer_head_split(cfg)) + keep + head)
    assert formula == pytest.approx(measured, rel=0.03)
    est = bench.estimate(cfg, n)
    assert est.activations == pytest.approx(formula)


def test_checkpointing_keeps_only_layer_inputs(bench):
    cfg = ModelConfig(**BASE)
    none, full = bench.estimate(cfg, 4096), bench.estimate(cfg, 4096, checkpointing="full")
    keep, head = bench.global_saved_floats_per_token(cfg)
    assert full.activations == 4 * 4096 * (cfg.n_layers * cfg.d_model + keep + head)
    assert full.peak < none.peak
    assert bench.estimate(cfg, 8192, sp=2).activations == pytest.approx(bench.estimate(cfg, 4096).activations)


def test_zero_stages_shard_states(bench):
    P, W = 1000, 4
    s = [bench.model_state_bytes(P, W, z) for z in range(4)]
    assert s[0] == {"params": 4000, "grads": 4000, "optim": 8000}
    assert s[1] == {"params": 4000, "grads": 4000, "optim": 2000}
    assert s[2] == {"params": 4000, "grads": 1000, "optim": 2000}
    assert s[3] == {"params": 1000, "grads": 1000, "optim": 2000}
    with pytest.raises(ValueError):
        bench.model_state_bytes(P, W, 4)


def test_memory_exponents_of_the_model(bench):
    """Linear in n for block attention, quadratic for the materialised scores."""
    def exp(kind):
        c = ModelConfig(**{**BASE, "attention_type": kind})
        xs = [16384, 32768, 65536]
        return bench.fit_exponent(xs, [bench.estimate(c, n).growth for n in xs])
    assert exp("routing") == pytest.approx(1.0, abs=0.02)
    assert exp("full") == pytest.approx(1.0, abs=0.02)
    assert exp("full_naive") == pytest.approx(2.0, abs=0.1)
    assert bench.fit_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert bench.fit_exponent([1], [1]) is None


def test_a_table_with_a_failed_row_is_no_result_and_exits_1(tool, capsys):
    """A benchmark whose table has an errored point exits 1 with one line naming it; out-of-memory and over-budget
    points are measurements, not failures."""
    bm = tool("bench_memory")
    measured = [{"variant": "routing", "seq_length": 4096, "status": "ok"},
                {"variant": "full", "seq_length": 65536, "status": "oom", "reason": "out of memory"},
                {"variant": "full", "seq_length": 131072, "status": "max-mem", "reason": "estimated 90 GiB"}]
    assert bm.exit_status({"results": measured}) == 0
    failed = measured + [{"variant": "local", "seq_length": 8192, "status": "error", "reason": "RuntimeError: boom"}]
    assert bm.exit_status({"results": failed}) == 1
    assert capsys.readouterr().err.strip() == "error: 1 of 4 rows failed: local n=8192: error RuntimeError: boom"


def peak_live_bytes(step) -> int:
    """The most bytes that storages created by ``step()``'s ops (forward, backward, optimizer) hold at once, taken
    between ops: what the estimate counts (parameters are not created by the step, so not counted), free of the
    allocator's and the process's noise."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    live, peak = {}, [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                    st = t.untyped_storage()
                    live.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
            for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                del live[key]
            peak[0] = max(peak[0], sum(nbytes for _, nbytes in live.values()))
            return out

    with Track():
        step()
    return peak[0]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("attention,policy,chunk", [
    ("routing", "full", 1024), ("routing", "full", 256),
    pytest.param("routing", "none", 0, marks=SLOW), pytest.param("local", "none", 0, marks=SLOW),
    pytest.param("local", "full", 1024, marks=SLOW), pytest.param("local", "full", 256, marks=SLOW),
    pytest.param("routing", "selective", 256, marks=SLOW)],
    ids=["routing-full-one-chunk", "routing-full-four-chunks", "routing-none", "local-none", "local-full-one-chunk",
         "local-full-four-chunks", "routing-selective"])
def test_estimated_peak_matches_the_step_tensor_by_tensor(bench, attention, policy, chunk):
    """The estimate's peak growth against the tensors a real training step (forward, backward, AdamW) holds at its
    peak, per policy. Under full with chunks a layer keeps only its input, and its backward holds one recomputed
    feed-forward chunk plus, over the whole sequence, the chunked attention's outputs and the gradients of the
    chunks already done: with one chunk over the whole sequence the step peaks about twice as high as with four
    (8.2 against 3.8 MiB here), and the estimate must follow both (it once counted a whole layer's saved set per
    chunk token: 1.29-1.37x the measured peak)."""
    from rtdist.parallel.checkpointing import apply_activation_checkpointing
    n = 1024
    cfg = ModelConfig(**{**BASE, "n_layers": 3, "attention_type": attention})
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg)
    if policy != "none":
        apply_activation_checkpointing(model, 1, policy, chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(1))

    def step():
        loss, aux = model(x[:, :-1], targets=x[:, 1:])
        (loss + aux).backward()
        opt.step()

    measured = peak_live_bytes(step)
    est = bench.estimate(cfg, n, checkpointing=policy, chunk_size=chunk)
    assert est.phase in ("ff", "attn")  # the activations' peak, not the optimizer's: what this test is about
    assert est.growth == pytest.approx(measured, rel=0.10), (est.phase, est.growth / 2 ** 20, measured / 2 ** 20)
