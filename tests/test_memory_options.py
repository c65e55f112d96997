"""The memory options equal the plain path: the chunked LM head + loss, and the activation checkpointing policies
(selective, full; with and without sequence chunks) give the same loss, the same gradients of every parameter and
the same k-means statistics (counted once: recomputation never adds to them, never moves centroids), in fp32.

Tolerances: losses 1e-6 relative, gradients 1e-5 absolute (only summation order differs)."""
import pytest
import torch

from rtdist.config import ConfigError, ModelConfig, checkpoint_policy, load_config
from rtdist.model import RoutingTransformerLM, lm_loss
from rtdist.model.transformer import FeedForward, chunked_lm_loss
from rtdist.parallel.checkpointing import apply_activation_checkpointing


def tiny(**kw):
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_local_attn_heads=2, window_size=8,
                local_window_size=16, num_clusters=3)
    base.update(kw)
    return ModelConfig(**base)


def tokens(cfg, n=97, batch=2, seed=1):
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(cfg, x, policy=None, chunk=0, logits_loss=False):
    """Loss, commitment, parameter gradients (by name) and k-means statistics of one forward + backward."""
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg)
    if policy is not None:
        apply_activation_checkpointing(model, 1, policy, chunk)
    if logits_loss:
        logits, aux = model(x[:, :-1])
        loss = lm_loss(logits, x[:, 1:])
    else:
        loss, aux = model(x[:, :-1], targets=x[:, 1:])
    (loss + aux).backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    stats = [t.clone() for km in model.kmeans_modules() for t in km.stats()]
    return loss.detach(), aux.detach(), grads, stats, model


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-9)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=0, atol=1e-5, msg=name)
    assert len(a[3]) == len(b[3])
    for s, t in zip(a[3], b[3]):
        assert torch.equal(s, t)  # counted once, whatever was recomputed


# --------------------------------------------------------------------------------------------- the LM head


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 500])
@pytest.mark.parametrize("kw", [{}, {"emb_dim": 16, "tie_embedding": False}])
def test_chunked_loss_equals_the_loss_of_the_logits(kw, chunk):
    cfg = tiny(loss_chunk_size=chunk, **kw)
    x = tokens(cfg)
    assert_same(run(cfg, x), run(cfg, x, logits_loss=True))


def test_loss_sum_for_evaluation_equals_the_summed_cross_entropy():
    cfg = tiny(loss_chunk_size=5)
    x = tokens(cfg)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg).eval()
    with torch.no_grad():
        total, _ = model(x[:, :-1], targets=x[:, 1:], reduction="sum")
        logits, _ = model(x[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1),
                                            reduction="sum")
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=0)


def test_chunked_loss_keeps_no_logits_for_backward():
    """Saved for backward: the gradients of the head's input and weight, nothing of size chunk x vocab or more."""
    V, N, e = 1000, 64, 8
    h, w = torch.randn(N, e, requires_grad=True), torch.randn(V, e, requires_grad=True)
    t = torch.randint(0, V, (N,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss = chunked_lm_loss(h, w, t, chunk=16)
    assert sorted(saved) == [N * e, V * e]
    loss.backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref_h @ ref_w.T, t, reduction="sum").backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=0, atol=1e-5)


def test_chunked_loss_under_bf16_autocast_runs_the_matmuls_in_bf16():
    cfg = tiny()
    x = tokens(cfg)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, aux = model(x[:, :-1], targets=x[:, 1:])
        logits, _ = model(x[:, :-1])
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, lm_loss(logits, x[:, 1:]), rtol=1e-2, atol=0)
    (loss + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------- what the plain path keeps for backward


@pytest.mark.parametrize("glu", [False, True])
def test_feed_forward_keeps_only_its_hidden_input_and_equals_autograd(glu, tool):
    """w_out saves its input before the activation (F or 2F wide) and recomputes the activation: not the
    activation's input and output both (2F or 4F); output and gradients are bit-identical to autograd's."""
    torch.manual_seed(0)
    ff = FeedForward(16, 4, glu, 0.0)
    x = torch.randn(2, 30, 16, requires_grad=True)
    out, kept = tool("benchlib").kept_bytes(lambda: ff(x))
    hidden = 64 * (2 if glu else 1)
    assert kept == 2 * 30 * hidden * 4 + 2 * 30 * 16 * 4  # w_in's output, and the result

    def reference(x):  # what autograd keeps: the activation's input and output
        h = ff.w_in(x)
        a, b = h.chunk(2, dim=-1) if glu else (h, 1)
        return torch.nn.functional.linear(torch.nn.functional.gelu(a) * b, ff.w_out.weight)
    ref = reference(x)
    g = torch.randn_like(out)
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad(out, [x, *ff.parameters()], g),
                    torch.autograd.grad(ref, [x, *ff.parameters()], g)):
        assert torch.equal(a, b)
    # only one of its inputs needing a gradient (a frozen w_out; a constant input)
    ff.w_out.weight.requires_grad_(False)
    assert torch.equal(torch.autograd.grad(ff(x), x, g)[0], torch.autograd.grad(reference(x), x, g)[0])
    ff.w_out.weight.requires_grad_(True)
    h = ff.w_in(x).detach()
    assert torch.equal(torch.autograd.grad(ff.w_out(h), ff.w_out.weight, g)[0],
                       torch.autograd.grad(reference(x), ff.w_out.weight, g)[0])


@pytest.mark.parametrize("kw", [{}, {"ff_glu": False}, {"attention_type": "local"}, {"attention_type": "full"}])
def test_plain_path_recomputes_the_norm_outputs_instead_of_keeping_them(kw, tool):
    """Without checkpointing, the LayerNorm outputs the projections and the feed-forward read are recomputed from
    the norms' inputs in backward: two [n, d] activations fewer per layer, same loss and gradients bit for bit.
    Any saved-tensor hooks already active (here an identity pair, as checkpointing's would be) turn it off: that
    is the reference."""
    cfg = tiny(**kw)
    x = tokens(cfg)
    kept_bytes = tool("benchlib").kept_bytes

    def step(outer_hooks):
        torch.manual_seed(0)
        model = RoutingTransformerLM(cfg)
        def fwd():
            return model(x[:, :-1], targets=x[:, 1:])
        if outer_hooks:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                (loss, aux), kept = kept_bytes(fwd)
        else:
            (loss, aux), kept = kept_bytes(fwd)
        (loss + aux).backward()
        return loss, kept, {n: p.grad for n, p in model.named_parameters()}

    loss, kept, grads = step(False)
    ref_loss, ref_kept, ref_grads = step(True)
    n_tokens = x[:, :-1].numel()
    norm_params = 2 * cfg.d_model * 4  # each norm's weight and bias, copied for the recomputation
    assert ref_kept - kept == cfg.n_layers * 2 * (n_tokens * cfg.d_model * 4 - norm_params)
    assert torch.equal(loss, ref_loss)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


# ---------------------------------------------------------------------------------------------- policies


CONFIGS = {"routing": {}, "routing only": {"n_local_attn_heads": 0, "pos_emb": "none"},
           "local": {"attention_type": "local"}, "keys not shared": {"shared_qk": False},
           "dense": {"attention_type": "full"}, "topk": {"routing_mode": "topk"}}


@pytest.mark.parametrize("policy, chunk", [("selective", 16), ("selective", 40), ("full", 16), ("full", 40),
                                           ("full", 0), ("full", 1000)])
@pytest.mark.parametrize("kw", list(CONFIGS.values()), ids=list(CONFIGS))
def test_checkpoint_policies_equal_the_plain_path(kw, policy, chunk):
    """Chunks that do not divide the sequence (97 - 1 tokens), chunks rounded up to the local window (40 -> 48),
    a single chunk (1000), no chunks (0)."""
    cfg = tiny(**kw)
    x = tokens(cfg)
    assert_same(run(cfg, x, policy, chunk), run(cfg, x))


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_chunked_blocks_never_run_the_feed_forward_on_the_whole_sequence(policy):
    """Neither forward nor the recomputation in backward gives the feed-forward more than one chunk of tokens."""
    cfg = tiny()
    n, chunk = 96, 32
    x = tokens(cfg, n + 1)

    def lengths(policy):
        torch.manual_seed(0)
        model = RoutingTransformerLM(cfg)
        if policy:
            apply_activation_checkpointing(model, 1, policy, chunk)
        seen = []
        for layer in model.modules():
            if hasattr(layer, "w_in"):
                layer.w_in.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        loss, aux = model(x[:, :-1], targets=x[:, 1:])
        (loss + aux).backward()
        return seen

    assert lengths(None) == [n] * cfg.n_layers
    seen = lengths(policy)
    assert max(seen) == chunk and len(seen) > cfg.n_layers * n // chunk  # forward and recomputation


def test_recomputation_never_moves_centroids_and_counts_statistics_once():
    cfg = tiny()
    x = tokens(cfg)
    for policy in ("selective", "full"):
        model = run(cfg, x, policy, 16)[4]
        kms = model.kmeans_modules()
        assert sum(km.step_counts.sum() for km in kms) == x[:, :-1].numel() * sum(km.num_heads for km in kms)
        before = [km.means.clone() for km in kms]
        model.eval()
        model(x)
        assert all(torch.equal(a, km.means) for a, km in zip(before, kms))


# ------------------------------------------------------------------------------------------------- config


def test_policy_keys_and_the_older_boolean():
    assert checkpoint_policy(load_config([], []).train) == "none"
    assert checkpoint_policy(load_config([], ["train.checkpoint_activations=true"]).train) == "full"
    assert checkpoint_policy(load_config([], ["train.checkpoint_policy=selective"]).train) == "selective"
    with pytest.raises(ConfigError, match="train.checkpoint_policy"):
        load_config([], ["train.checkpoint_activations=true", "train.checkpoint_policy=selective"])
    with pytest.raises(ConfigError, match="train.checkpoint_chunk_size"):
        load_config([], ["train.checkpoint_chunk_size=-1"])
    with pytest.raises(ConfigError, match="model.loss_chunk_size"):
        load_config([], ["model.loss_chunk_size=-2"])
