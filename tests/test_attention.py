"""Routing and local attention equal dense attention under the mask they are meant to implement."""
import pytest
import torch

from rtdist.model import causal_routing_attention, local_attention, plan_causal_blocks, topk_routing_attention


def dense(q, k, v, mask):
    """Reference: materialised attention with a boolean [.., n, n] mask."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def self_rule(mask):
    """A query sees itself only when it can see nothing else (shared-QK rule)."""
    eye = torch.eye(mask.shape[-1], dtype=torch.bool)
    others = mask & ~eye
    return others | (eye & ~others.any(-1, keepdim=True))


def causal_routing_mask(clusters, w):
    """mask[b,h,i,j]: j in i's cluster, j <= i, and j's cluster-block is i's or the one before."""
    n = clusters.shape[-1]
    same = clusters[..., :, None] == clusters[..., None, :]
    onehot = torch.nn.functional.one_hot(clusters, int(clusters.max()) + 1)
    rank = (onehot.cumsum(-2) - onehot).gather(-1, clusters[..., None])[..., 0]  # earlier tokens in my cluster
    blk = rank // w
    diff = blk[..., :, None] - blk[..., None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return self_rule(same & causal & ((diff == 0) | (diff == 1)))


def rand_qkv(B=2, H=3, n=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]


def grads(out, tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    torch.autograd.backward(out, torch.randn(out.shape, generator=g, dtype=out.dtype))
    res = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return res


@pytest.mark.parametrize("crowded", [False, True])
@pytest.mark.parametrize("w", [4, 8])
def test_causal_routing_equals_masked_dense(w, crowded):
    q, k, v = rand_qkv()
    g = torch.Generator().manual_seed(2)
    C = 5
    clusters = torch.randint(0, C, q.shape[:3], generator=g)
    if crowded:  # one cluster holds most tokens: many blocks, others nearly empty
        clusters = torch.where(torch.rand(q.shape[:3], generator=g) < 0.8, 0, clusters)
    t = lambda x: x.transpose(1, 2)  # the kernel works in the projection layout [B, n, H, d]
    out = t(causal_routing_attention(t(q), t(k), t(v), t(clusters), C, w))
    ref = dense(q, k, v, causal_routing_mask(clusters, w))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(out, [q, k, v]), grads(ref, [q, k, v])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_block_plan_places_every_token_once_in_position_order():
    clusters = torch.tensor([[0, 1, 0, 0, 1, 0, 0, 2]])
    plan = plan_causal_blocks(clusters, num_clusters=3, window=2)
    # cluster 0: tokens 0,2 | 3,5 | 6 ; cluster 1: 1,4 ; cluster 2: 7  -> 5 blocks of 2 slots after a pad block
    assert plan.num_blocks == 5
    assert plan.token_of_slot.tolist() == [[0, 2], [3, 5], [6, 0], [1, 4], [7, 0]]  # 0 also fills empty slots
    assert plan.first_blocks.tolist() == [0, 3, 4] and plan.later_blocks.tolist() == [1, 2]
    assert (plan.token_of_slot.reshape(-1)[plan.slot_of_row] == torch.arange(8)).all()  # each reads its own slot


def topk_reference(q, k, v, sims, w):
    B, H, n, d = q.shape
    C = sims.shape[-1]
    total = torch.zeros_like(q)
    hits = torch.zeros(B, H, n, 1, dtype=q.dtype)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for c in range(C):
        top = sims[..., c].argsort(dim=-1, descending=True)[..., :w]
        member = torch.zeros(B, H, n, dtype=torch.bool).scatter(-1, top, True)
        mask = self_rule(member[..., :, None] & member[..., None, :] & causal)
        mask = mask | ~member[..., :, None]  # non-members: any row, discarded below
        out = dense(q, k, v, mask)
        total = total + out * member[..., None]
        hits = hits + member[..., None]
    return total / hits.clamp(min=1)


def test_topk_routing_equals_masked_dense():
    q, k, v = rand_qkv(n=48)
    sims = torch.randn(*q.shape[:3], 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = topk_routing_attention(q, k, v, sims, window=8)
    ref = topk_reference(q, k, v, sims, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(out, [q, k, v]), grads(ref, [q, k, v])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_topk_leaves_unpicked_tokens_at_zero():
    q, k, v = rand_qkv(n=32)
    sims = torch.randn(*q.shape[:3], 2, dtype=torch.float64)
    out = topk_routing_attention(q, k, v, sims, window=4)  # 2 clusters x 4 covers at most 8 of 32 tokens
    assert (out.abs().sum(-1) == 0).sum() >= 2 * 3 * 24


@pytest.mark.parametrize("n", [64, 60])  # 60: not a multiple of the window, padded internally
def test_local_attention_equals_banded_dense(n):
    q, k, v = rand_qkv(n=n)
    w = 8
    i = torch.arange(n)
    blk = i // w
    band = (i[None, :] <= i[:, None]) & ((blk[:, None] - blk[None, :]) <= 1)
    out = local_attention(q, k, v, w)
    ref = dense(q, k, v, band)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(out, [q, k, v]), grads(ref, [q, k, v])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("w", [4, 5])  # even blocks run the own block in halves, odd ones whole
@pytest.mark.parametrize("exclude_self", [True, False])
def test_masked_block_path_equals_merged_path(exclude_self, w):
    """Other devices and attention dropout run the blocks through SDPA with shared masks: the same attention, and
    the same gradients, as the merged CPU path (including a predecessor from extra keys, the SP halo)."""
    from rtdist.model.kernels import _masked_block_attention, attend_blocks
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(6, 2, w, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    ek, ev = (torch.randn(1, 2, w, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    preds = [(torch.tensor([2, 3, 5]), 0, torch.tensor([1, 2, 4])), (slice(0, 1), 1, slice(None))]
    out = attend_blocks(q, k, v, preds, exclude_self, 0.0, ek, ev)
    ref = _masked_block_attention(q, k, v, preds, exclude_self, 0.0, ek, ev)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(out, [q, k, v, ek, ev]), grads(ref, [q, k, v, ek, ev])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
