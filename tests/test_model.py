"""The LM: causal safety, k-means bookkeeping, precision, checkpoint recomputation."""
import pytest
import torch

from rtdist.config import ModelConfig
from rtdist.model import RoutingTransformerLM, SphericalKMeans, lm_loss


def tiny(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_local_attn_heads=2, window_size=8,
                num_clusters=3)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg, seed=0, checkpoint_every=0):
    from rtdist.parallel.checkpointing import apply_activation_checkpointing
    torch.manual_seed(seed)
    model = RoutingTransformerLM(cfg)
    if checkpoint_every:
        apply_activation_checkpointing(model, checkpoint_every)
    return model


def step(model, tokens, valid=None):
    logits, aux = model(tokens, valid)
    loss = lm_loss(logits[:, :-1], tokens[:, 1:]) + aux
    loss.backward()
    return loss


def trained(model, steps=3, n=64, seed=0):
    """A few k-means updates so the centroids are data-shaped, not random."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step(model, torch.randint(0, model.cfg.vocab_size, (2, n), generator=g))
        model.update_kmeans()
    model.zero_grad()
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cfg", [tiny(), tiny(num_clusters=2, window_size=4, local_window_size=16),
                                 tiny(n_local_attn_heads=0, pos_emb="none", routing_layers=[-1])])
def test_causal_mode_logits_never_depend_on_later_tokens(cfg, seed):
    model = trained(make(cfg, seed)).eval()
    g = torch.Generator().manual_seed(100 + seed)
    n = 96
    x = torch.randint(0, cfg.vocab_size, (2, n), generator=g)
    base, _ = model(x)
    for t in (0, 7, 40, n - 2):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, cfg.vocab_size, (2, n - t - 1), generator=g)
        out, _ = model(y)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"logits at <= {t} changed"
        assert not torch.equal(out[:, t + 1:], base[:, t + 1:])


def test_topk_mode_leaks_the_future():
    cfg = tiny(routing_mode="topk", n_local_attn_heads=0, window_size=16, num_clusters=4)
    model = trained(make(cfg)).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(5))
    base, _ = model(x)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % cfg.vocab_size  # change only the last token
    out, _ = model(y)
    changed = (out[:, :-1] - base[:, :-1]).abs().amax(-1) > 0
    assert changed.sum() > 0  # earlier positions moved: top-k membership looks ahead


def test_kmeans_ema_update_matches_hand_computation():
    km = SphericalKMeans(num_heads=1, num_clusters=2, dim=2, decay=0.9)
    km.means.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    km.ema_sums.copy_(km.means)
    km.train()
    r = torch.tensor([[[[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]]]])  # tokens 0 and 2 -> cluster 0, token 1 -> cluster 1
    with torch.enable_grad():
        clusters, _ = km.assign(r)
    assert clusters.tolist() == [[[0, 1, 0]]]
    assert torch.allclose(km.step_counts, torch.tensor([[2.0, 1.0]]))
    km.apply_update()  # first update: decay 0 -> centroids are the normalised cluster sums
    s0 = torch.tensor([1.8, 0.6])
    torch.testing.assert_close(km.means[0, 0], s0 / s0.norm())
    torch.testing.assert_close(km.means[0, 1], torch.tensor([0.6, 0.8]))
    assert km.step_counts.sum() == 0 and bool(km.initted)
    with torch.enable_grad():
        km.assign(torch.tensor([[[[0.0, 1.0]]]]))  # one token, nearest cluster 1
    km.apply_update()  # now EMA with decay 0.9
    s1 = 0.9 * torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([0.0, 1.0])
    torch.testing.assert_close(km.means[0, 1], s1 / s1.norm())
    torch.testing.assert_close(km.means[0, 0], s0 / s0.norm())  # 0.9 * s0 only rescales: same direction
    torch.testing.assert_close(km.ema_counts, torch.tensor([[0.9 * 2, 0.9 * 1 + 0.1]]))
    moved = 1 - torch.tensor([0.6, 0.8]) @ (s1 / s1.norm())  # cluster 1 turned, cluster 0 kept its direction
    assert km.health()["move_max"] == pytest.approx(float(moved), abs=1e-6)
    assert km.health()["move"] == pytest.approx(float(moved) / 2, abs=1e-6)


def test_routing_clusters_are_each_layers_assignment_without_statistics():
    cfg = tiny(n_layers=3)
    model = trained(make(cfg)).train()
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    clusters = model.routing_clusters(x)
    assert sorted(clusters) == [0, 1, 2] and model.training  # every routing layer; mode restored
    assert all(c.shape == (2, 2, 48) and int(c.max()) < cfg.num_clusters for c in clusters.values())
    assert all(km.step_counts.sum() == 0 for km in model.kmeans_modules())  # nothing counted
    first = model.layers[0]
    proj = first.attn.project(first.norm1(model.embed(x)), model.rope(torch.arange(48)))
    assert torch.equal(clusters[0], first.attn.kmeans.nearest(proj.r)[0])


def test_padding_is_excluded_from_kmeans_statistics():
    cfg = tiny()
    model = make(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, 20:] = False
    step(model, x, valid)
    with_pad = [t.clone() for km in model.kmeans_modules() for t in km.stats()]
    ref = make(cfg).train()
    step(ref, x[:1])
    step(ref, x[1:, :20])
    only_valid = [t for km in ref.kmeans_modules() for t in km.stats()]
    for a, b in zip(with_pad, only_valid):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n_routing = sum(km.num_heads for km in model.kmeans_modules())
    assert sum(km.step_counts.sum() for km in model.kmeans_modules()) == n_routing * (32 + 20)


def centroids(model):
    return [km.means.clone() for km in model.kmeans_modules()]


def test_forward_eval_and_recomputation_never_move_centroids():
    cfg = tiny()
    model = make(cfg, checkpoint_every=1)
    before = centroids(model)
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    step(model, x)  # forward + backward with checkpoint recomputation
    model.eval()
    model(x)
    for a, b in zip(before, centroids(model)):
        assert torch.equal(a, b)


def test_checkpoint_recomputation_counts_statistics_once_and_keeps_gradients():
    cfg = tiny()
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    plain, ckpt = make(cfg), make(cfg, checkpoint_every=1)
    l1, l2 = step(plain, x), step(ckpt, x)
    assert torch.equal(l1, l2)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    for a, b in zip(plain.kmeans_modules(), ckpt.kmeans_modules()):
        assert torch.equal(a.step_counts, b.step_counts) and torch.equal(a.step_sums, b.step_sums)


def test_gradient_accumulation_sums_statistics_of_every_micro_batch():
    cfg = tiny()
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    step(model, x[:1])
    step(model, x[1:])
    n_routing = sum(km.num_heads for km in model.kmeans_modules())
    assert sum(km.step_counts.sum() for km in model.kmeans_modules()) == n_routing * 64


def test_kmeans_state_stays_fp32_under_bf16_autocast_and_casts():
    cfg = tiny()
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(x)
        loss = lm_loss(logits[:, :-1], x[:, 1:]) + aux
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    model.update_kmeans()
    model = model.to(torch.bfloat16)
    for km in model.kmeans_modules():
        for name, buf in km.named_buffers():
            if buf.is_floating_point():
                assert buf.dtype == torch.float32, name
    assert model.embedding.weight.dtype == torch.bfloat16


def test_update_kmeans_reduces_all_statistics_in_one_call():
    """Two replicas on different data, statistics summed by the hook == one replica that saw both batches."""
    cfg = tiny()
    x1, x2 = torch.randint(0, cfg.vocab_size, (2, 1, 32))
    a, b, both = make(cfg), make(cfg), make(cfg)
    step(a, x1)
    step(b, x2)
    step(both, x1)
    step(both, x2)
    other = torch.cat([t.reshape(-1) for km in b.kmeans_modules() for t in km.stats()])
    calls = []

    def all_reduce(flat):
        calls.append(flat.numel())
        flat.add_(other)

    a.update_kmeans(all_reduce)
    both.update_kmeans()
    assert calls == [other.numel()]
    for ka, kb in zip(a.kmeans_modules(), both.kmeans_modules()):
        torch.testing.assert_close(ka.means, kb.means)
        assert ka.step_counts.sum() == 0


def test_routing_layers_select_which_layers_route():
    model = make(tiny(n_layers=3, routing_layers=[-1]))
    assert [layer.attn.n_routing for layer in model.layers] == [0, 0, 2]
    assert len(model.kmeans_modules()) == 1


def test_data_init_finds_the_clusters_the_vectors_form_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    far = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=-1)
    r = centers[torch.arange(60) % 3] + 0.05 * torch.randn(60, 16, generator=g)
    r = torch.cat([r, far + 0.05 * torch.randn(40, 16, generator=g)])  # 40 padding vectors elsewhere
    valid = torch.arange(100) < 60
    km = SphericalKMeans(num_heads=1, num_clusters=3, dim=16)
    km.init_from_vectors(r[None, None], valid[None], generator=torch.Generator().manual_seed(1))
    cos = km.means[0] @ centers.T  # [cluster, true center]
    assert sorted(cos.argmax(dim=1).tolist()) == [0, 1, 2]  # one centroid per true cluster, none on the padding
    assert bool((cos.amax(dim=1) > 0.99).all())
    assert bool(km.initted) and torch.equal(km.ema_sums, km.means) and km.ema_counts.sum() == 0


def test_model_data_init_seeds_each_layer_from_vectors_routed_by_the_seeded_layers_below():
    cfg = tiny(num_clusters=4)
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    model = make(cfg).train()
    model.init_kmeans_from_data(x, generator=torch.Generator().manual_seed(9))
    assert model.training  # mode restored
    kms = model.kmeans_modules()
    assert all(bool(km.initted) and km.step_counts.sum() == 0 for km in kms)  # no statistics from the seeding pass
    # Reference: one full forward per layer, each after the layers below were seeded, one generator throughout;
    # the routing vectors recomputed here from the layer's input and its query weights.
    from rtdist.model import routing_vectors
    ref = make(cfg).eval()
    g = torch.Generator().manual_seed(9)
    for layer in ref.layers:
        attn = layer.attn
        seen = []
        hook = attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        with torch.no_grad():
            ref(x)
        hook.remove()
        q = attn.to_q(seen[0]).view(*x.shape, attn.n_heads, attn.head_dim)[:, :, attn.n_local:]
        attn.kmeans.init_from_vectors(routing_vectors(q.transpose(1, 2)).detach(), generator=g)
    for a, b in zip(kms, ref.kmeans_modules()):
        torch.testing.assert_close(a.means, b.means, rtol=0, atol=1e-6)
    assert not torch.allclose(kms[0].means, make(cfg).kmeans_modules()[0].means)  # moved off the random init


# ------------------------------------------------------------------------------------------- k-means health


def two_blobs(n=200, dim=8, seed=0):
    """Routing vectors around two directions, [1, 1, n, dim]."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(2, dim, generator=g), dim=-1)
    r = centers[torch.arange(n) % 2] + 0.05 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(r, dim=-1)[None, None], centers


def update_with(km, r):
    km.train()
    with torch.enable_grad():
        km.assign(r.requires_grad_())
    km.apply_update()


@pytest.mark.parametrize("reseed_after", [0, 2])
def test_a_dead_cluster_is_reseeded_from_recent_vectors_and_comes_back(reseed_after):
    r, centers = two_blobs()
    km = SphericalKMeans(num_heads=1, num_clusters=3, dim=8, decay=0.9, reseed_after=reseed_after, candidates=16)
    with torch.no_grad():  # two centroids on the data, one pointing away from everything: it never wins a token
        km.means[0] = torch.stack([centers[0], centers[1], -(centers[0] + centers[1]) / (centers[0] + centers[1]).norm()])
        km.ema_sums.copy_(km.means)
        km.initted.fill_(True)
    for _ in range(3):
        update_with(km, r)
    if not reseed_after:
        assert km.health()["empty"] == 1 and km.health()["idle_max"] == 3 and km.reseeded == 0
        return
    assert km.reseeded == 1
    assert float((km.means[0, 2] @ centers.T).amax()) > 0.9  # now on the data
    update_with(km, torch.cat([r, r[:, :, :1] * 0 + km.means[0, 2]], dim=2))  # a token right at the new centroid
    assert km.last_counts[0, 2] > 0 and km.health()["empty"] == 0


def test_dead_clusters_are_reseeded_from_the_worst_fitting_vectors_each_a_different_one():
    # two blobs the live centroids hold, and two small groups of tokens far from both (a rare kind of token, as the
    # retrieval task's keys among the filler): the dead clusters must take those groups, one each
    r, centers = two_blobs(n=200, dim=8)
    g = torch.Generator().manual_seed(1)
    odd = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    rare = torch.nn.functional.normalize(odd[torch.tensor([0, 0, 1, 1])] + 0.01 * torch.randn(4, 8, generator=g), dim=-1)
    r = torch.cat([r[:, :, :100], rare[None, None], r[:, :, 100:]], dim=2)  # mid-sequence: no even spacing hits them
    km = SphericalKMeans(num_heads=1, num_clusters=4, dim=8, decay=0.9, reseed_after=1, candidates=16)
    with torch.no_grad():
        away = -(centers[0] + centers[1]) / (centers[0] + centers[1]).norm()
        km.means[0] = torch.stack([centers[0], centers[1], away, away])
        km.ema_sums.copy_(km.means)
        km.initted.fill_(True)
    update_with(km, r)  # the two clusters pointing away get nothing: dead after one update, re-seeded
    assert km.reseeded == 2
    taken = km.means[0, 2:] @ odd.T  # [2 re-seeded, 2 groups]
    assert float(taken.amax(dim=0).amin()) > 0.95  # each group got a centroid of its own
    update_with(km, r)
    assert km.last_counts[0, 2] == 2 and km.last_counts[0, 3] == 2  # and keeps its tokens


def test_kmeans_init_keeps_the_restart_that_gives_a_rare_group_its_own_cluster():
    # 7 common groups of 200 vectors and one rare group of 4 (as 16 keys among 2048 filler tokens): one k-means++
    # run rarely seeds the rare group and then merges it into a common cluster; the lowest-distortion of 8 runs
    # usually isolates it
    from rtdist.model.kmeans import kmeans_plus_plus
    g = torch.Generator().manual_seed(100)
    centers = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    x = torch.cat([centers[i] + 0.05 * torch.randn(200 if i < 7 else 4, 16, generator=g) for i in range(8)])
    x = torch.nn.functional.normalize(x, dim=-1)

    def isolated(restarts):
        hits = 0
        for seed in range(30):
            c = kmeans_plus_plus(x, 8, torch.Generator().manual_seed(seed), restarts=restarts)
            assigned = (x @ c.T).argmax(1)
            hits += bool((assigned[-4:] == assigned[-1]).all() and (assigned == assigned[-1]).sum() == 4)
        return hits

    once, best_of_8 = isolated(1), isolated(8)
    assert best_of_8 >= 20 and best_of_8 >= 2 * once


def test_kmeans_watch_reports_occupancy_and_warns_once_about_a_collapsing_layer():
    from rtdist.monitor import KMeansWatch
    model = make(tiny(n_layers=2))
    for km in model.kmeans_modules():
        km.last_counts.zero_()
        km.last_counts[:, 0] = 100.0  # every token in cluster 0
    lines = []
    watch = KMeansWatch(lambda line, **kw: lines.append(line), limit=0.5, patience=3)
    for _ in range(5):
        metrics = watch.metrics(model)
    assert metrics["kmeans_l0_max_share"] == 1.0 and metrics["kmeans_l0_entropy"] == 0.0
    assert metrics["kmeans_l1_empty"] == 2 * 2  # 2 heads x 2 empty clusters
    assert len(lines) == 2 and "routing layer 0" in lines[0] and "routing layer 1" in lines[1]
    assert "model.commitment_factor" in lines[0] and "train.kmeans_init: data" in lines[0]


def test_assignment_in_chunks_and_commitment_gradient_match_the_direct_formulas():
    """The assignment is scored a chunk of tokens at a time and the commitment loss reuses its scores with a
    hand-written gradient: both equal the plain formulas (argmax of all scores; autograd of mean ||r - c||^2)."""
    km = SphericalKMeans(num_heads=2, num_clusters=5, dim=8, commitment_factor=0.5)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 2, 37, 8, generator=g).requires_grad_()
    valid = torch.rand(2, 37, generator=g) > 0.2
    clusters, score = km.nearest(r, chunk=4)
    assert torch.equal(clusters, km.similarities(r.detach()).argmax(-1))
    loss = km.commitment_loss(r, clusters, valid, score)
    (grad,) = torch.autograd.grad(loss, r)
    c = km.means[torch.arange(2)[None, :, None], clusters]  # [B, H, n, d]
    err = (r - c).pow(2).sum(-1)
    w = valid[:, None, :].expand_as(err).float()
    ref = 0.5 * (err * w).sum() / w.sum()
    (ref_grad,) = torch.autograd.grad(ref, r)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
