"""Cached incremental decoding reproduces the training forward; sampling; the generate CLI (bytes, sentencepiece).

Tolerance: logits of step-by-step decoding vs one full forward over the same tokens, fp32, max abs diff <= 1e-5
at every position (observed ~2e-7; the logits are O(1), and a one-off error in a window moves them by ~4e-2,
see test_the_comparison_would_catch_a_wrong_window)."""
import json

import pytest
import torch
import yaml

from rtdist.config import Config, ModelConfig
from rtdist.generate import filter_logits, generate, main, sample_next
from rtdist.model import RoutingTransformerLM, lm_loss
from rtdist.model.cache import decode_step, new_cache, prefill

TOL = 1e-5  # fp32, max abs logit difference


def cfg_of(**kw):
    # 2 local + 2 routing heads, routing block w = 4, local window 8, 3 clusters
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_local_attn_heads=2, window_size=4,
                local_window_size=8, num_clusters=3)
    base.update(kw)
    return ModelConfig(**base)


def trained_model(cfg, seed=0, steps=3):
    """Random weights plus a few k-means updates, so the centroids are data-shaped (tests/test_model.py::trained)."""
    torch.manual_seed(seed)
    model = RoutingTransformerLM(cfg)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (2, 64), generator=g)
        logits, aux = model(x)
        (lm_loss(logits[:, :-1], x[:, 1:]) + aux).backward()
        model.update_kmeans()
    model.zero_grad()
    return model.eval()


def tokens(cfg, n=64, batch=2, seed=7):
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def stepwise(model, x, cache=None):
    cache = cache or new_cache(model, x.shape[0])
    start = cache.position
    return torch.stack([decode_step(model, cache, x[:, i]) for i in range(start, x.shape[1])], dim=1), cache


def assert_blocks_crossed(model, cache, n_tokens):
    """Non-vacuity: in every routing layer and head, at least two clusters went past two full blocks (so the
    previous-block ring was rotated), and the local window was crossed several times."""
    routed = 0
    for layer, counts in zip(model.layers, cache.cluster_counts()):
        if counts is None:
            continue
        routed += 1
        w = layer.attn.window
        assert int(counts.sum()) == counts.shape[0] * counts.shape[1] * n_tokens
        crossed = (counts > 2 * w).sum(-1)  # [B, heads]: clusters with more than two blocks
        assert bool((crossed >= 2).all()), counts.tolist()
    assert routed, "no routing layer"
    assert n_tokens >= 4 * (model.cfg.local_window_size or model.cfg.window_size)


CONFIGS = {
    "routing": cfg_of(),
    "routing_last_layer_only": cfg_of(routing_layers=[-1]),
    "no_rotary": cfg_of(pos_emb="none"),
    "separate_qk": cfg_of(shared_qk=False),
    "factorised_embedding": cfg_of(emb_dim=16, tie_embedding=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stepwise_logits_equal_one_full_forward(name):
    cfg = CONFIGS[name]
    model = trained_model(cfg)
    x = tokens(cfg)
    with torch.no_grad():
        full, _ = model(x)
    steps, cache = stepwise(model, x)
    assert_blocks_crossed(model, cache, x.shape[1])
    assert (steps - full).abs().max().item() <= TOL


@pytest.mark.parametrize("n_prompt", [1, 13, 32])  # inside a block, and exactly at local and routing boundaries
def test_prefill_then_steps_equal_one_full_forward(n_prompt):
    cfg = CONFIGS["routing"]
    model = trained_model(cfg, seed=1)
    x = tokens(cfg, seed=11)
    with torch.no_grad():
        full, _ = model(x)
        ref_prompt, _ = model(x[:, :n_prompt])
    logits, cache = prefill(model, x[:, :n_prompt])
    assert torch.equal(logits, ref_prompt)  # the prefill *is* the model's forward
    assert cache.position == n_prompt
    steps, cache = stepwise(model, x, cache)
    assert_blocks_crossed(model, cache, x.shape[1])
    assert (torch.cat([logits, steps], dim=1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("attention_type", ["local", "full"])
def test_other_attention_types_decode_exactly(attention_type):
    cfg = cfg_of(attention_type=attention_type)
    model = trained_model(cfg, steps=0)
    x = tokens(cfg, n=40)
    with torch.no_grad():
        full, _ = model(x)
    logits, cache = prefill(model, x[:, :9])
    steps, _ = stepwise(model, x, cache)
    assert (torch.cat([logits, steps], dim=1) - full).abs().max().item() <= TOL


def test_the_comparison_would_catch_a_wrong_window():
    cfg = CONFIGS["routing"]
    model = trained_model(cfg)
    x = tokens(cfg)
    with torch.no_grad():
        full, _ = model(x)
    for layer in model.layers:  # the cache (only) now uses routing blocks of 5 instead of 4
        layer.attn.window = 5
    steps, _ = stepwise(model, x)
    assert (steps - full).abs().max().item() > 1000 * TOL


def test_topk_routing_has_no_cache():
    model = trained_model(cfg_of(routing_mode="topk"), steps=0)
    with pytest.raises(NotImplementedError, match="not causal"):
        new_cache(model, 1)
    out, _ = generate(model, tokens(model.cfg, n=5, batch=1), 3, temperature=0, use_cache=False)
    assert out.shape == (1, 3)


def test_cached_generation_equals_rerunning_the_model():
    cfg = CONFIGS["routing"]
    model = trained_model(cfg)
    prompt = tokens(cfg, n=10)
    fast, stats = generate(model, prompt, 40, temperature=0)
    slow, _ = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(fast, slow) and fast.shape == (2, 40)
    assert stats["new_tokens"] == 40 and stats["cached"]
    a, _ = generate(model, prompt, 20, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b, _ = generate(model, prompt, 20, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generation_stops_at_eod():
    model = trained_model(CONFIGS["routing"], steps=0)
    with torch.no_grad():
        model.embedding.weight[5] *= 50  # tied embedding: token 5 now predicts itself overwhelmingly
    out, stats = generate(model, torch.tensor([[5, 5]]), 10, temperature=0, eod_id=5)
    assert out.tolist() == [[5]] and stats["new_tokens"] == 1


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.8, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert sample_next(logits, 0.0).item() == 0


# ------------------------------------------------------------------------------------------------------- CLI


def write_run(tmp_path, tokenizer_spec, vocab_size, manifest_dir):
    from rtdist.export import export_safetensors
    from rtdist.data.shards import build_manifest
    manifest = build_manifest("toy", 64, tokenizer_spec, {})
    (manifest_dir / "toy-manifest.json").write_text(json.dumps(manifest))
    cfg = Config(model=cfg_of(vocab_size=vocab_size))
    cfg.train.seq_length = 64
    cfg.data.manifest = str(manifest_dir / "toy-manifest.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    export_safetensors(trained_model(cfg.model, steps=1).state_dict(), run / "model.safetensors")
    return run


def test_cli_bytes(tmp_path, capsys):
    from rtdist.data import BytesTokenizer
    run = write_run(tmp_path, BytesTokenizer().spec(), 257, tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello, wörld")
    args = ["--checkpoint", str(run), "--prompt-file", str(prompt), "--max-new-tokens", "12", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.95", "--seed", "1", "--num-samples", "2", "--ignore-eod", "--json"]
    main(args)
    out = json.loads(capsys.readouterr().out)
    main(args + ["--no-cache"])
    ref = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) == 2 and all(len(r) == 12 for r in out["ids"])
    assert out["stats"]["cached"] and not ref["stats"]["cached"]
    assert out["ids"] == ref["ids"]  # same seed: the cache changes nothing
    assert out["samples"][0] == BytesTokenizer().decode(out["ids"][0])
    main(["--checkpoint", str(run), "--prompt", "", "--max-new-tokens", "3", "--temperature", "0"])  # empty prompt
    assert capsys.readouterr().out.endswith("\n")


def test_cli_sentencepiece(tmp_path, capsys):
    from rtdist.data import train_sentencepiece
    sp = train_sentencepiece([f"the quick brown fox jumps over the lazy dog {i}." for i in range(200)],
                             tmp_path / "sp.model", 300)
    run = write_run(tmp_path, sp.spec(), 300, tmp_path)
    main(["--checkpoint", str(run), "--prompt", "the quick", "--max-new-tokens", "8", "--seed", "0", "--json",
          "--ignore-eod"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"][0]) == 8
    assert out["samples"][0] == sp.decode(out["ids"][0])


def test_cli_hf_tokenizer(tmp_path, capsys):
    """A Hugging Face tokenizer.json (as tools/preprocess.py --tokenizer-type hf records it): the prompt is
    encoded and the samples decoded with it."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from data_helpers import train_hf_tokenizer

    from rtdist.data.tokenizers import HFTokenizer
    path = train_hf_tokenizer(tmp_path / "toy-tokenizer.json",
                              [f"the quick brown fox jumps over the lazy dog {i}." for i in range(200)], 300)
    tok = HFTokenizer(path)
    spec = {**tok.spec(), "file": path.name}
    run = write_run(tmp_path, spec, 300, tmp_path)
    main(["--checkpoint", str(run), "--prompt", "the quick", "--max-new-tokens", "8", "--seed", "0", "--json",
          "--ignore-eod", "--echo-prompt"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"][0]) == 8
    assert out["samples"][0] == tok.decode(out["ids"][0])
    assert tok.decode(tok.encode(b"the quick")) == "the quick"
