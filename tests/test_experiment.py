"""The routing-vs-local study (tools/study.py, tools/experiment.py): task generator, study config, centroid
seeding, causality probe, and the --quick pipeline end to end (it checks that every output is written for every
variant, not what the numbers are)."""
import json
from pathlib import Path

import pytest
import torch

from rtdist.config import ConfigError, ModelConfig
from rtdist.model import RoutingTransformerLM

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "experiments" / "default.yaml"


@pytest.fixture
def study(tool):
    return tool("study")


@pytest.mark.parametrize("order", ["value_key", "key_value"])
def test_retrieval_task_layout(study, order):
    task = study.RetrievalTask(seq_length=256, num_pairs=6, num_keys=8, num_values=5, num_filler=10, num_queries=4,
                               order=order)
    tokens, answers = task.sample(3, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 257) and answers.shape == (3, 256) and tokens.dtype == torch.int64
    K0, V0 = task.num_filler, task.num_filler + task.num_keys
    k_off, v_off = (1, 0) if order == "value_key" else (0, 1)
    for b in range(3):
        keys, values = tokens[b, k_off:12:2], tokens[b, v_off:12:2]
        assert ((keys >= K0) & (keys < V0)).all() and len(set(keys.tolist())) == 6  # distinct keys
        assert ((values >= V0) & (values < task.vocab_size)).all()
        filler = tokens[b, 12: task.query_start()]
        assert (filler < K0).all()
        pos = answers[b].nonzero().squeeze(1).tolist()
        assert len(pos) == 4 and pos[0] == task.query_start()
        asked = set()
        for p in pos:
            key, answer = tokens[b, p].item(), tokens[b, p + 1].item()  # input at p, its target at p + 1
            i = keys.tolist().index(key)
            assert answer == values[i].item() and key not in asked  # right value; every key asked at most once
            asked.add(key)
        assert task.min_distance() == task.query_start() - 11
    again = task.sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], tokens) and torch.equal(again[1], answers)  # a seed fixes the data
    control = task.corrupt_definitions(tokens, torch.Generator().manual_seed(5))
    changed = (control != tokens).nonzero()[:, 1]
    assert set(changed.tolist()) <= set(range(v_off, 12, 2)) and len(changed) > 0  # only definition values move
    assert ((control[:, v_off:12:2] >= V0) & (control[:, v_off:12:2] < task.vocab_size)).all()
    short, short_answers = task.sample(2, torch.Generator().manual_seed(1), seq_length=64)
    assert short.shape == (2, 65) and short_answers.sum() == 8


def test_study_config_checks_name_the_key(study):
    load_study = study.load_study
    loaded = load_study(DEFAULT)
    assert set(loaded.variants) == {"local", "routing_causal", "routing_topk", "dense"}
    assert loaded.retrieval.task.min_distance() > 2 * loaded.retrieval.model["local_window_size"]
    with pytest.raises(ConfigError, match="retrieval.model.*n_local_heads"):
        load_study(DEFAULT, ["retrieval.model.n_local_heads=2"])
    with pytest.raises(ConfigError, match="num_queries"):
        load_study(DEFAULT, ["retrieval.task.num_queries=9"])
    with pytest.raises(ConfigError, match=r"curriculum\[0\].*divisible"):
        load_study(DEFAULT, ["retrieval.train.curriculum=[{steps: 1, seq_length: 200, batch_size: 1}]"])
    with pytest.raises(ConfigError, match="tasks"):
        load_study(DEFAULT, ["tasks=[retrieval, images]"])
    with pytest.raises(ConfigError, match="vocab_size"):
        load_study(DEFAULT, ["variants.local.vocab_size=100"])


def test_lr_schedule_spans_curriculum_and_steps(study):
    lr_at = study.lr_at
    spec = study.load_study(DEFAULT).retrieval.train
    total = spec.total_steps
    assert total == sum(p.steps for p in spec.curriculum) + spec.steps
    assert lr_at(0, spec) < lr_at(spec.warmup, spec) == pytest.approx(spec.lr, rel=1e-2)
    assert lr_at(total - 1, spec) == pytest.approx(spec.min_lr, rel=1e-2)


def _tiny(mode="causal", clusters=8):
    torch.manual_seed(0)
    return RoutingTransformerLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_local_attn_heads=1,
                                            window_size=16, num_clusters=clusters, routing_mode=mode))


def test_centroids_seeded_from_data_spread_the_tokens(study):
    model = _tiny()
    task = study.RetrievalTask(seq_length=128, num_keys=8, num_values=8, num_filler=24)
    tokens = task.sample(4, torch.Generator().manual_seed(0))[0][:, :-1]
    model.init_kmeans_from_data(tokens, generator=torch.Generator().manual_seed(0))
    assert model.training  # restored
    for km in model.kmeans_modules():
        assert bool(km.initted) and torch.allclose(km.means.norm(dim=-1), torch.ones(km.means.shape[:2]))
        assert torch.equal(km.ema_sums, km.means) and km.step_counts.sum() == 0  # no statistics left behind
    clusters = model.routing_clusters(tokens)[len(model.layers) - 1]  # [B, H, n]
    biggest = torch.stack([torch.bincount(c, minlength=8).max() for c in clusters.reshape(-1, 128)]).float()
    assert biggest.mean() < 0.5 * 128  # k-means++ seeds: no cluster swallows the sequence


def test_causality_probe_and_prefix_scoring(study):
    causal, topk = _tiny("causal"), _tiny("topk")
    assert study.is_causal(causal, 40, 64) and not study.is_causal(topk, 40, 64)
    task = study.RetrievalTask(seq_length=64, num_pairs=4, num_keys=8, num_values=8, num_filler=24, num_queries=4)
    eval_set = [task.sample(2, torch.Generator().manual_seed(3))]
    full, prefix = study.retrieval_metrics(causal, eval_set), study.retrieval_prefix_metrics(causal, eval_set)
    assert full["answer_loss"] == pytest.approx(prefix["answer_loss"], abs=1e-4)  # causal: the same numbers
    assert full["answer_acc"] == prefix["answer_acc"]


def test_quick_study_writes_every_output(tmp_path, tool):
    experiment = tool("experiment")
    out = tmp_path / "study"
    assert experiment.main(["--quick", "--out", str(out)]) == 0
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    variants = ["local", "routing_causal", "routing_topk", "dense"]
    assert results["variants"] == variants
    assert "--quick" in results["command"] and results["config"]["seed"] == 0
    for task, metric in (("retrieval", "answer_acc"), ("text", "val_bpb")):
        assert list(results["tasks"][task]) == variants
        for v in variants:
            r = results["tasks"][task][v]
            assert r["params"] > 0 and r["final"]["step"] == r["train"][-1]["step"] and metric in r["final"]
            assert task == "text" or "answer_acc" in r["control"]
    assert results["tasks"]["retrieval"]["routing_topk"]["causal"] is False
    assert "final_prefix_only" in results["tasks"]["retrieval"]["routing_topk"]
    assert results["tasks"]["retrieval"]["routing_causal"]["causal"] is True
    md = (out / "results.md").read_text()
    assert "## Long-range retrieval" in md and "## Real text" in md and "python tools/experiment.py" in md
    assert all(f"| {v} |" in md for v in variants)


def test_definition_keys_find_each_querys_definition(study):
    task = study.RetrievalTask(seq_length=128, num_pairs=6, num_keys=8, num_values=5, num_filler=10, num_queries=4)
    tokens, answers = task.sample(3, torch.Generator().manual_seed(1))
    queries, keys = task.definition_keys(tokens, answers)
    inputs = tokens[:, :-1]
    assert queries.shape == keys.shape == (3, 4) and (queries >= task.query_start()).all()
    assert torch.equal(inputs.gather(1, queries), inputs.gather(1, keys))  # the same key symbol
    assert (keys % 2 == 1).all() and (keys < 2 * task.num_pairs).all()  # value_key: keys at odd positions


def test_block_reach_is_same_cluster_and_this_or_the_previous_block(study):
    # one row, two heads, window 2; head 0 puts every token in cluster 0 (its block = position // 2),
    # head 1 alternates clusters 0/1 by position
    clusters = torch.stack([torch.zeros(12, dtype=torch.long), torch.arange(12) % 2])[None]  # [1, 2, 12]
    q = torch.tensor([[11, 11, 11, 10]])
    k = torch.tensor([[1, 9, 7, 4]])
    # (11, 1): head 0 blocks 5 vs 0, head 1 cluster 1 ranks 5, 0 -> blocks 2 vs 0: out of reach
    # (11, 9): head 0 blocks 5 vs 4: the previous block; (11, 7): head 1 cluster 1 ranks 5, 3 -> blocks 2 vs 1
    # (10, 4): head 0 blocks 5 vs 2; head 1 cluster 0 ranks 5, 2 -> blocks 2 vs 1: head 1 reaches
    assert study.block_reach(clusters, 2, 2, q, k).tolist() == [[False, True, True, True]]
    assert study.block_reach(clusters[:, :1], 2, 2, q, k).tolist() == [[False, True, False, False]]


def test_seeds_are_parsed_and_summarised(tool):
    experiment, report = tool("experiment"), tool("study_report")
    assert experiment.parse_seeds("0-3,9,2") == [0, 1, 2, 3, 9]
    for bad in ("a", "3-x", "-1", ""):
        with pytest.raises(Exception, match="--seeds"):
            experiment.parse_seeds(bad)

    def run(acc, control, reach):
        ev = [{"step": 50, "answer_acc": 1.0}, {"step": 100, "answer_acc": acc, "l1_reach": reach}]
        return {"tasks": {"retrieval": {"routing": {"final": ev[-1], "eval": ev,
                                                    "control": {"answer_acc": control}}}}}

    summary = report.summarise_seeds({0: run(0.5, 0.1, 0.6), 7: run(0.9, 0.2, 1.0)})
    figures = summary["tasks"]["retrieval"]["routing"]
    assert summary["seeds"] == [0, 7]
    assert figures["answer_acc"] == {"values": [0.5, 0.9], "mean": pytest.approx(0.7), "min": 0.5, "max": 0.9}
    assert figures["best_acc"]["values"] == [1.0, 1.0] and figures["l1_reach"]["min"] == 0.6
    md = report.seeds_markdown(summary, "python tools/experiment.py --seeds 0,7")
    assert "| routing | 0.700 [0.500, 0.900] |" in md and "0.500 0.900 |" in md


def test_quick_study_over_two_seeds(tmp_path, tool):
    experiment = tool("experiment")
    out = tmp_path / "seeds"
    assert experiment.main(["--quick", "--tasks", "retrieval", "--variants", "routing_causal", "--seeds", "3-4",
                            "--out", str(out)]) == 0
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [3, 4] and "--seeds 3-4" in summary["command"]
    for seed in (3, 4):
        results = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert results["config"]["seed"] == seed
        routing = results["tasks"]["retrieval"]["routing_causal"]
        assert {"l0_reach", "l1_reach"} <= set(routing["final"]) and "l1_move" in routing["train"][-1]
        assert (out / f"seed-{seed}" / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = summary["tasks"]["retrieval"]["routing_causal"]["answer_acc"]
    assert len(acc["values"]) == 2 and acc["min"] <= acc["mean"] <= acc["max"]
    assert "# The study over 2 seeds (3, 4)" in (out / "seeds.md").read_text()


def test_data_seeded_centroids_give_every_key_a_cluster_at_seed_23(study):
    # The cause of seed 23's lost retrieval: its layer-2 centroids, seeded by one k-means++ run, put the keys into a
    # cluster with ~16 filler tokens (reach 0.92), and training never separated them. The best of 8 restarts does.
    s = study.load_study(DEFAULT, ["seed=23"])
    task, spec = s.retrieval.task, s.retrieval
    torch.manual_seed(23)
    model = RoutingTransformerLM(study.model_config(s, "retrieval", "routing_causal", task.vocab_size))
    g = torch.Generator().manual_seed(23 + 3)  # as run_retrieval seeds them
    model.init_kmeans_from_data(task.sample(spec.train.batch_size, g)[0][:, :-1], generator=g)
    eval_set = [task.sample(4, torch.Generator().manual_seed(23 + 2))]
    figures = study.routing_figures(model, task, eval_set)
    assert figures["l0_reach"] == 1.0 and figures["l1_reach"] == 1.0
