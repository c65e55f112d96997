"""Evaluation as papers report it: every target token scored once (any stride, any number of ranks), windows that
never cross a document of per-document shards, a fixed evaluation set shared by training and ``rtdist.evaluate``,
word counts from preprocessing, and the loss by position."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rtdist.config import load_config
from rtdist.data import load_manifest, preprocess
from rtdist.data.evalset import EvalWindows, plan_windows
from rtdist.data.shards import ShardReader
from rtdist.data.textstats import count_words
from rtdist.evaluate import evaluate, plot_loss_by_position, position_buckets, with_text_figures
from rtdist.export import export_safetensors, load_model_for_inference
from rtdist.model import RoutingTransformerLM

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *a, **k: None)


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **extra)


def split_samples(manifest: dict, split: str) -> list[tuple[str, np.ndarray]]:
    reader = ShardReader(manifest)
    try:
        return [reader.read(s, i) for s in manifest["splits"][split]["shards"] for i in range(s["samples"])]
    finally:
        reader.close()


def scored_targets(manifest, split, seq_length, stride, batch, world, max_windows=None):
    """Every scored target as (its segment's first sample, its position in that segment's stream, its token), over
    all ranks, and the tokens of each scored target's window up to it (to check what context it had)."""
    out = []
    for rank in range(world):
        w = EvalWindows(manifest, split, seq_length, stride, batch, rank, world, max_windows=max_windows)
        assert len(w) == -(-len(w.windows) // (batch * world))  # the same number of batches on every rank
        for t, (tokens, mask) in enumerate(w):
            for b in range(batch):
                k = t * batch * world + rank * batch + b
                if k >= len(w.windows):
                    assert not mask[b].any()  # padding scores nothing
                    continue
                first, _, start, scored = w.windows[k].tolist()
                assert mask[b].sum() == scored and mask[b, -scored:].all()
                for j in np.flatnonzero(mask[b].numpy()):
                    out.append((first, start + j + 1, int(tokens[b, j + 1]), tokens[b, :j + 2].numpy()))
    return out


def segment_stream(samples, first, count):
    parts = [samples[i][1][:-1] for i in range(first, first + count - 1)] + [samples[first + count - 1][1]]
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------- the windows

def test_plan_windows_score_each_target_once_with_the_most_context_the_stride_allows():
    # a segment of 3 samples of 8 targets = 24 targets; windows of 8, stride 3
    rows = plan_windows([(5, 3)], 8, 8, 3).tolist()
    assert rows[0] == [5, 3, 0, 8]  # the first window scores all 8
    assert [r[2] + 8 for r in rows] == [8, 11, 14, 17, 20, 23, 24]  # window ends: stride 3, then a last step of 1
    assert sum(r[3] for r in rows) == 24 and rows[-1][3] == 1
    assert plan_windows([(0, 3)], 8, 8, 8).tolist() == [[0, 3, 0, 8], [0, 3, 8, 8], [0, 3, 16, 8]]


@pytest.mark.parametrize("stride", [64, 16, 5])
def test_every_target_of_a_packed_split_is_scored_once_whatever_the_stride_and_the_ranks(manifest, stride):
    m = load_manifest(manifest)
    samples = split_samples(m, "validation")
    stream = segment_stream(samples, 0, len(samples))
    for world, batch in ((1, 3), (2, 2), (3, 1)):
        got = scored_targets(m, "validation", 64, stride, batch, world, max_windows=40)
        positions = sorted(p for _, p, _, _ in got)
        assert positions == list(range(1, len(positions) + 1))  # a prefix of the stream, each target once
        for _, p, token, window in got[:200]:
            assert token == stream[p]
            assert (window == stream[p + 1 - len(window):p + 1]).all()  # its context is the stream before it
            assert len(window) - 1 >= min(p, 64 - stride + 1)  # as much context as the stride allows
    whole = EvalWindows(m, "validation", 64, stride)
    assert whole.tokens == m["splits"]["validation"]["tokens"]  # the whole split: exactly its targets


def test_a_model_shorter_than_the_shards_still_scores_every_target(manifest):
    m = load_manifest(manifest)  # shards of 64 tokens, windows of 48: the rest of each sample is not dropped
    w = EvalWindows(m, "validation", 48, 48)
    assert w.tokens == m["splits"]["validation"]["tokens"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Three documents of different lengths, preprocessed with --tail drop: one stream per document."""
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    for i, n in enumerate((300, 90, 170)):
        words = [bytes(rng.integers(97, 123, rng.integers(1, 8)).tolist()).decode() for _ in range(n)]
        (d / "in" / "validation").mkdir(parents=True, exist_ok=True)
        (d / "in" / "validation" / f"book{i}.txt").write_text(" ".join(words) + "\n")
    return preprocess([str(d / "in")], str(d / "out" / "x"), seq_length=32, tail="drop", **QUIET)["manifest_path"]


def test_windows_of_per_document_shards_never_reach_into_another_document(documents):
    m = load_manifest(documents)
    samples = split_samples(m, "validation")
    docs = {}
    for i, (key, _) in enumerate(samples):
        docs.setdefault(key.rsplit("_", 1)[0], []).append(i)
    assert len(docs) == 3
    got = scored_targets(m, "validation", 32, 8, 2, 2)
    for first, p, token, window in got:
        doc = next(v for v in docs.values() if v[0] == first)
        stream = segment_stream(samples, first, len(doc))
        assert token == stream[p] and (window == stream[max(0, p + 1 - len(window)):p + 1]).all()
    for doc in docs.values():
        assert sorted(p for f, p, _, _ in got if f == doc[0]) == list(range(1, 32 * len(doc) + 1))
    # a set of the first windows reads the keys of the documents it needs, not of the whole split
    assert EvalWindows(m, "validation", 32, 8, max_windows=2).segments == 1


# ------------------------------------------------------------------------------------------- words and bytes

def test_preprocessing_counts_each_documents_words_and_bytes(documents):
    m = load_manifest(documents)
    info = m["splits"]["validation"]
    texts = {Path(f["path"]).stem: Path(f["path"]).read_bytes() for f in info["files"]}
    rows = {doc: (words, nbytes) for doc, words, nbytes in info["document_stats"]["rows"]}
    assert sorted(rows.values()) == sorted((len(t.split()), len(t)) for t in texts.values())
    assert info["words"] == 300 + 90 + 170 and info["text_bytes"] == sum(map(len, texts.values()))


def test_a_word_cut_by_a_block_boundary_counts_once():
    text = b"the quick  brown\tfox\njumps"
    for cut in range(len(text) + 1):
        a, b = text[:cut], text[cut:]
        assert count_words(a) + count_words(b, after_space=not a or a[-1:].isspace()) == 5


def test_word_perplexity_is_the_token_loss_over_the_words():
    m = {"tokenizer": {"type": "bytes"},
         "splits": {"test": {"corpus_tokens": 1000, "tokens": 990, "words": 200, "text_bytes": 1000}}}
    got = with_text_figures({"loss": 0.5, "bits_per_token": 0.5 / math.log(2)}, m, "test")
    assert got["word_perplexity"] == pytest.approx(math.exp(0.5 * 1000 / 200))
    assert got["bits_per_byte"] == pytest.approx(0.5 / math.log(2))
    del m["splits"]["test"]["words"]  # a manifest from before word counts: the other figures still come
    assert "word_perplexity" not in with_text_figures({"loss": 0.5, "bits_per_token": 0.7}, m, "test")


def test_position_buckets_are_powers_of_two_up_to_the_length():
    assert position_buckets(8) == [(1, 1), (2, 3), (4, 8)]
    assert position_buckets(1) == [(1, 1)] and position_buckets(2) == [(1, 2)]
    assert position_buckets(100)[-2:] == [(32, 63), (64, 100)]
    assert all(sum(hi - lo + 1 for lo, hi in position_buckets(n)) == n for n in range(1, 300))


# ------------------------------------------------------------------------------- a tiny model, long repetition

def tiny_cfg(*sets):
    return load_config(["configs/tiny.yaml"], ["model.d_model=64", "model.window_size=16", "train.seq_length=64",
                                               "model.num_clusters=2", *sets])


@pytest.fixture(scope="module")
def repetition(tmp_path_factory):
    """Documents that repeat a random 7-letter line, and a one-layer model trained (here, 50 steps) on such text:
    it can predict a letter only from context at least one period (8 tokens) back."""
    d = tmp_path_factory.mktemp("rep")
    rng = np.random.default_rng(1)

    def doc():
        return (bytes(rng.integers(97, 123, 7).tolist()) + b"\n") * 60
    (d / "in" / "validation").mkdir(parents=True)
    for i in range(3):
        (d / "in" / "validation" / f"r{i}.txt").write_bytes(doc())
    path = preprocess([str(d / "in")], str(d / "out" / "rep"), seq_length=64, tail="drop", **QUIET)["manifest_path"]
    cfg = tiny_cfg("model.n_layers=1")
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        batch = torch.from_numpy(np.stack([np.frombuffer(doc()[:65], np.uint8) for _ in range(16)]).astype(np.int64))
        loss, aux = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    model.eval()
    return load_manifest(path), model


def test_a_smaller_stride_never_raises_the_loss_on_text_with_long_range_repetition(repetition):
    m, model = repetition
    results = {s: evaluate(model, EvalWindows(m, "validation", 64, s, 4)) for s in (64, 32, 16)}
    split_tokens = m["splits"]["validation"]["tokens"]
    assert all(r["tokens"] == split_tokens for r in results.values())  # every token scored once, any stride
    # strides 32 and 16 give every scored token >= 32 tokens of context, several periods: equal up to noise
    assert results[16]["loss"] <= results[32]["loss"] + 1e-3 and results[32]["loss"] <= results[64]["loss"]
    assert results[16]["loss"] < results[64]["loss"] - 0.05  # stride 64 scores a window's first period blind
    by_position = results[64]["loss_by_position"]
    assert by_position[0]["loss"] > 2 * by_position[-1]["loss"]  # the first letters of a window are guesses
    assert sum(r["tokens"] for r in by_position) == split_tokens


def test_the_loss_by_position_is_drawn_to_a_png(repetition, tmp_path):
    m, model = repetition
    curves = {f"stride {s}": evaluate(model, EvalWindows(m, "validation", 64, s, 4))["loss_by_position"]
              for s in (64, 16)}
    plot_loss_by_position(curves, tmp_path / "pos.png")
    assert (tmp_path / "pos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------------ the same totals on 1, 2 and 3 ranks

def exported_run(tmp_path, manifest):
    """A run directory as training leaves it (config.yaml, model.safetensors) for a randomly initialised tiny
    model: the figures need not be good, only the same whatever the ranks."""
    cfg = tiny_cfg()
    cfg.data.manifest = str(manifest)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg.model)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    export_safetensors(model.state_dict(), run / "model.safetensors", {"step": 0})
    return run


def evaluate_cli(nproc, run, *args):
    base = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1 else [sys.executable])
    r = subprocess.run(base + ["-m", "rtdist.evaluate", "--checkpoint", str(run), *args], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_one_two_and_three_ranks_give_the_same_totals(manifest, tmp_path):
    """7 batches of 2 windows (stride 32): 14 windows, which divide by neither 2 x 2 nor 3 x 2: the last round of
    2 and 3 ranks is partly padding, and no window is scored twice."""
    run = exported_run(tmp_path, manifest)
    args = ["--stride", "32", "--batch-size", "2", "--max-batches", "7", "--output", str(tmp_path / "e.json")]
    model, cfg = load_model_for_inference(run)  # one rank in this process: the command's path, less a start-up
    one = with_text_figures(evaluate(model, EvalWindows(load_manifest(manifest), "validation", 64, 32, 2,
                                                        max_windows=14)), load_manifest(manifest), "validation")
    two, three = (evaluate_cli(n, run, *args) for n in (2, 3))
    assert one["tokens"] == two["tokens"] == three["tokens"] == 64 + 13 * 32
    for other in (two, three):
        assert other["loss"] == pytest.approx(one["loss"], abs=1e-6)
        assert [r["tokens"] for r in other["loss_by_position"]] == [r["tokens"] for r in one["loss_by_position"]]
    assert {"bits_per_byte", "word_perplexity", "loss_by_position"} <= set(one)
    assert json.loads((tmp_path / "e.json").read_text()) == three


# ------------------------------------------------------------------- training's evaluations score the same set

def test_every_evaluation_of_one_model_scores_the_same_tokens(manifest, tmp_path):
    """What training's periodic evaluations rest on: the evaluation set starts from its first window each time
    (a loader that read on would score the next batches of the split instead)."""
    model, _ = load_model_for_inference(exported_run(tmp_path, manifest))
    windows = EvalWindows(load_manifest(manifest), "validation", 64, None, 2, max_windows=6)
    first, second = evaluate(model, windows), evaluate(model, windows)
    assert first == second and first["tokens"] == 6 * 64


@pytest.mark.slow
def test_a_sequence_parallel_evaluation_scores_what_one_process_does(manifest, tmp_path):
    """Training on one sequence-parallel group of 2 ranks (each scores its half of every window, its mask sliced
    with it): its final evaluation equals rtdist.evaluate's in one process on the export."""
    sets = [f"data.manifest={manifest}", "train.seq_length=64", "model.window_size=16", "model.d_model=64",
            "train.train_micro_batch_size_per_gpu=2", "train.train_iters=2", "train.eval_interval=2",
            "train.eval_iters=3", "train.engine=torch", "train.zero_stage=0", "data.num_workers=0",
            "train.save_interval=0", "parallel.sequence_parallel_size=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rtdist.train",
           "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path)]
    r = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((tmp_path / "result.json").read_text())["eval"]
    cli = evaluate_cli(1, tmp_path, "--batch-size", "2", "--max-batches", "3")
    assert cli["tokens"] == final["tokens"] == 3 * 2 * 64
    assert cli["loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert [r["tokens"] for r in cli["loss_by_position"]] == [r["tokens"] for r in final["loss_by_position"]]


@pytest.mark.slow
def test_periodic_final_and_command_line_evaluations_agree(manifest, tmp_path):
    """The eval point at the last step, result.json's final evaluation and rtdist.evaluate on the export with
    the same set (eval_iters x micro batch windows) give one loss, since they score the same tokens."""
    sets = [f"data.manifest={manifest}", "train.seq_length=64", "model.window_size=16", "model.d_model=64",
            "train.train_micro_batch_size_per_gpu=2", "train.train_iters=4", "train.log_interval=1",
            "train.eval_interval=2", "train.eval_iters=3", "train.engine=torch", "train.zero_stage=0",
            "data.num_workers=0", "train.save_interval=0"]
    cmd = [sys.executable, "-m", "rtdist.train", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path)]
    r = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    periodic = [x for x in rows if "eval_loss" in x]
    assert [x["step"] for x in periodic] == [2, 4]
    assert periodic[0]["eval_tokens"] == periodic[1]["eval_tokens"] == 3 * 2 * 64  # the same set each time
    final = json.loads((tmp_path / "result.json").read_text())["eval"]
    cli = evaluate_cli(1, tmp_path, "--batch-size", "2", "--max-batches", "3")
    assert periodic[-1]["eval_loss"] == pytest.approx(final["loss"], abs=1e-6)
    assert cli["loss"] == pytest.approx(final["loss"], abs=1e-6) and cli["tokens"] == final["tokens"]
    assert "eval_word_perplexity" in periodic[-1] and final["loss_by_position"]


def test_the_pg19_preset_scores_the_whole_test_split_with_a_quarter_stride():
    from rtdist.evaluate import load_preset
    assert load_preset(ROOT / "configs" / "eval" / "pg19.yaml") == {"split": "test", "stride": 2048, "batch_size": 1}


def test_word_counts_are_the_same_from_plain_compressed_and_parquet_inputs(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = ["one two  three", "four\nfive", "six"]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    for name, write in (("plain/validation/a.jsonl", lambda p: p.write_bytes(jsonl)),
                        ("gz/validation/a.jsonl.gz", lambda p: p.write_bytes(gzip.compress(jsonl))),
                        ("pq/validation/a.parquet", lambda p: pq.write_table(pa.table({"text": texts}), p))):
        path = tmp_path / name
        path.parent.mkdir(parents=True)
        write(path)
        out = preprocess([str(path.parents[1])], str(tmp_path / "out" / name.split("/")[0]), seq_length=4, **QUIET)
        info = out["manifest"]["splits"]["validation"]
        assert info["words"] == 6, name
        assert [row[1:] for row in info["document_stats"]["rows"]] == [[3, 14], [2, 9], [1, 3]], name
        assert info["text_bytes"] == sum(len(t) for t in texts), name
