"""Benchmark helpers shared by the tools in this folder (``bench_attention.py``, ``bench_memory.py``,
``bench_sequence_parallel.py``), and the analytic memory model of one training step. The tools import it as a
sibling module (``python tools/bench_memory.py`` puts tools/ first on ``sys.path``).

Process memory (Linux): ``rss_bytes`` is the resident set now; ``peak_rss_bytes`` is the kernel's high-water mark
(VmHWM), which :func:`reset_peak_rss` lowers to the current RSS (``echo 5 > /proc/self/clear_refs``), so a peak can
be taken over one step only, not over the process's whole life.

The memory model (:func:`estimate`) counts, per rank, in bytes (fp32 everywhere, as the benchmark runs):

* model states: parameters 4 B, gradients 4 B, AdamW m and v 8 B per parameter; ZeRO stage 1 divides the optimizer
  states by the world size, stage 2 the gradients too, stage 3 the parameters too. k-means buffers are counted
  apart (never sharded).
* saved activations: what autograd keeps between forward and backward, per token and per layer, derived from the
  model's code op by op (:func:`saved_floats_per_token`; checked in the tests against the tensors a forward leaves
  alive).
  With full activation checkpointing a layer keeps only its input (d floats per token); its backward rebuilds it
  one chunk at a time (:func:`layer_floats_per_token`: the recomputed chunk, the chunked attention's outputs and
  the gradients of the chunks already done; checked in the tests against the tensors a whole step holds at its
  peak).
* attention working set: the n x n tensors of ``full_naive`` (the kept probabilities with the saved activations;
  the probability and softmax gradients of the last layer's backward as working set); nothing quadratic for the
  flash and block kernels (their scratch is per block).
* transient working set (:func:`working_floats_per_token`): temporaries on top of what is still saved, at three
  candidate peaks, the start of backward (logits and their gradients), a layer's feed-forward backward (its
  GEGLU gradients; where the profiler finds the peak of the benchmark's models) and a layer's attention backward
  (its feed-forward activations already freed), plus the gradients produced by then (the head's, the later
  layers', this layer's feed-forward's).

Peak = parameters + buffers + max(largest backward candidate, optimizer phase = gradients + AdamW states + one
parameter-sized foreach temporary). The backward candidates are taken at every layer, from the last: the layers
below still keep their saved values, the layers above have left their gradients (with little kept per layer, as
under full checkpointing, the first layer's backward can be the peak). Sequence parallelism of degree ``sp``
divides the tokens (so every activation term) by ``sp``; halo and all-to-all buffers are not counted.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from rtdist.config import MODEL_LIMITS, TRAIN_LIMITS, ConfigError, ModelConfig, layer_head_split, validate_model
from rtdist.errors import UsageError, bounded
from rtdist.flops import matmul_rate, model_flops  # noqa: F401  (the tools' FLOP counts are the library's)

MB = 2 ** 20

# The range of each model-shaped flag the benchmarks share (argparse types): sizes past config validation's limits
# are typos, and would fail deep in a point's process instead of at the command line.
SEQ = bounded(int, 1, TRAIN_LIMITS["seq_length"])
WIDTH = bounded(int, 1, MODEL_LIMITS["d_model"])
LAYERS = bounded(int, 1, MODEL_LIMITS["n_layers"])
HEADS = bounded(int, 1, MODEL_LIMITS["n_heads"])
LOCAL_HEADS = bounded(int, 0, MODEL_LIMITS["n_heads"])
WINDOW = bounded(int, 1, MODEL_LIMITS["window_size"])
CLUSTERS = bounded(int, 0, MODEL_LIMITS["num_clusters"])  # 0: the tools' "n / window"
VOCAB = bounded(int, 2, MODEL_LIMITS["vocab_size"])
BATCH = bounded(int, 1, TRAIN_LIMITS["train_micro_batch_size_per_gpu"])
THREADS = bounded(int, 1, 4096)
COUNT = bounded(int, 1, 10 ** 6)  # repeats, rounds, steps
SECONDS = bounded(float, 0, 10 ** 7, above=True)


def check_model(cfg: ModelConfig, seq_lengths: Iterable[int], flags: dict[str, str]) -> None:
    """Config validation of a benchmark's model at each of its sequence lengths, before any point runs; its
    message names the tool's flags (``flags`` maps ``model.window_size`` -> ``--window``; ``train.seq_length`` is
    the sequence length). No lengths: the model alone."""
    for n in list(seq_lengths) or [None]:  # None: the model alone
        try:
            validate_model(cfg, n)
        except ConfigError as e:
            msg = str(e).replace("train.seq_length", "the sequence length")
            for key, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
                msg = msg.replace(key, flag)
            raise UsageError(msg) from None


# ------------------------------------------------------------------------------------------ process memory


def failed_status(rows: list[dict], failed, name) -> int:
    """A benchmark's exit status: 1, with one stderr line naming each, when any row of its table failed (a table
    with a failed row is no result), else 0. ``failed(row)`` says whether a row failed, ``name(row)`` names it."""
    import sys
    bad = [r for r in rows if failed(r)]
    if bad:
        sys.stderr.write(f"error: {len(bad)} of {len(rows)} rows failed: "
                         + "; ".join(name(r) for r in bad[:5]) + ("; ..." if len(bad) > 5 else "") + "\n")
    return 1 if bad else 0


def _status_kb(field: str, pid: int | str = "self") -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Lower this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since start or the last :func:`reset_peak_rss` (VmHWM); ru_maxrss where /proc has no VmHWM."""
    kb = _status_kb("VmHWM")
    if kb is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kb * 1024


def kept_bytes(fn, device_type: Optional[str] = None):
    """``fn()``'s result and the bytes of every storage that ``fn``'s ops created (on ``device_type``, or any) and
    that is still referenced once it returned: what a forward keeps for its backward. Seen by a dispatch mode from
    outside autograd: saved-tensor hooks would count it too, but hooks of our own turn off the model's own handling
    of what it saves (it recomputes norm outputs only where no hooks are active), so they would measure another
    path. Costs a few microseconds per op."""
    import gc

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    created = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs  # views are not new
                        and (device_type is None or t.device.type == device_type)):
                    st = t.untyped_storage()
                    created.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
            return out

    with Track():
        out = fn()
    gc.collect()
    kept = sum(nbytes for ref, nbytes in created.values() if not ref.expired())
    # The dispatch mode (a reference cycle) outlives this call: its weak references must not keep the forward's
    # temporaries alive through the backward the caller measures next (20-30 MB at 2k tokens, routing).
    created.clear()
    return out, kept


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a torchrun launcher's workers run in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += _children(p)
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident set of ``pid`` and all its descendants."""
    return sum((_status_kb("VmRSS", p) or 0) * 1024 for p in process_tree(pid))


# ----------------------------------------------------------------------------------------------- compute


def fit_exponent(xs: Iterable[float], ys: Iterable[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x): y ~ x^slope. None with fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# ------------------------------------------------------------------------------------------- memory model


def _heads(cfg: ModelConfig, n_local_split: int) -> tuple[int, int]:
    """(local heads, routing heads) of a layer, as RoutingAttention decides them."""
    if cfg.attention_type == "routing":
        return n_local_split, cfg.n_heads - n_local_split
    if cfg.attention_type == "local":
        return cfg.n_heads, 0
    return 0, 0


def layer_param_count(cfg: ModelConfig, n_local_split: int) -> int:
    """Parameters of one block (``Block(cfg, n_local_split)``): two LayerNorms, q/k/v/out, the feed-forward."""
    d, H = cfg.d_model, cfg.n_heads
    hd = cfg.head_dim or d // H
    _, nr = _heads(cfg, n_local_split)
    n_k = H - (nr if cfg.shared_qk else 0)
    return 4 * d + d * H * hd * 3 + d * n_k * hd + ff_param_count(cfg)


def ff_param_count(cfg: ModelConfig) -> int:
    """Parameters of one block's feed-forward (w_in, w_out)."""
    hidden = int(cfg.d_model * cfg.ff_mult)
    return cfg.d_model * hidden * (2 if cfg.ff_glu else 1) + hidden * cfg.d_model


def count_params(cfg: ModelConfig) -> int:
    """Parameters of ``RoutingTransformerLM(cfg)``, from the config alone."""
    d = cfg.d_model
    e = cfg.emb_dim or d
    total = cfg.vocab_size * e + 2 * d  # embedding, final norm
    if e != d:
        total += 2 * e * d  # emb_proj, out_proj
    if not cfg.tie_embedding:
        total += cfg.vocab_size * e
    return total + sum(layer_param_count(cfg, nl) for nl in layer_head_split(cfg))


def buffer_bytes(cfg: ModelConfig) -> int:
    """k-means buffers (means, EMA sums, step sums, counts) and the rotary frequencies, fp32."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    floats = hd // 2 if cfg.pos_emb == "rotary" else 0
    for nl in layer_head_split(cfg):
        _, nr = _heads(cfg, nl)
        floats += nr * cfg.num_clusters * (3 * hd + 2)
    return 4 * floats


def model_state_bytes(n_params: int, world_size: int = 1, zero_stage: int = 0) -> dict[str, float]:
    """Per-rank bytes of fp32 parameters, gradients and AdamW states under ZeRO ``zero_stage`` (0-3)."""
    if not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    w = max(1, world_size)
    return {"params": 4 * n_params / (w if zero_stage >= 3 else 1),
            "grads": 4 * n_params / (w if zero_stage >= 2 else 1),
            "optim": 8 * n_params / (w if zero_stage >= 1 else 1)}


CHECKPOINTING = ("none", "selective", "full")


def _routes_fused(cfg: ModelConfig, R: int) -> bool:
    """Causal routing heads run as one recomputed function (``RoutingAttention.routing_heads``)."""
    return R > 0 and cfg.attention_type in ("routing", "local") and cfg.routing_mode == "causal"


def _chunkable(cfg: ModelConfig, R: int) -> bool:
    """The layer's attention can run in sequence chunks (``RoutingAttention.chunkable``)."""
    return cfg.attention_type in ("routing", "local") and (R == 0 or cfg.routing_mode == "causal")


def saved_floats_per_token(cfg: ModelConfig, n: int, n_local_split: int, norms_recomputed: bool = True) -> float:
    """fp32 values (int64 indices count as two) that autograd keeps per token for one layer without checkpointing
    (``norms_recomputed``; inside a recomputed block, where the model keeps the norm outputs: False).

    Op by op (H heads of hd, L local and R routing heads, d model width, F feed-forward width):
    LayerNorm 1 input d + mean/rstd 2; projection input (LayerNorm 1 output) d, unless recomputed from the
    LayerNorm input in backward (``norm_then``). Dense: rotated q and k 2*H*hd, v
    H*hd, SDPA output H*hd and log-sum-exp H (flash), or the n x n probabilities H*n and the causal mask n/4
    (bool) for ``full_naive``. Local heads: rotated q and k 2*L*hd and the whole v H*hd (the kernel's input is a
    view of it). Causal routing heads (one recomputed function from their raw projections): a copy of their
    queries R*hd (and of their keys without shared QK), v (a view of the whole v, kept once whether local heads read
    it too or not). ``topk`` routing heads (project, route, attend): the whole q H*hd (normalize/layer_norm read a
    view of it), k = normalize(q) norms 2R, routing vectors R*hd + LayerNorm stats 2R, centroid scores R*C, cluster
    ids 2R, rotated q and k 2*R*hd, v. Output projection input H*hd; LayerNorm 2 input d + 2; feed-forward input d
    (unless recomputed, as LayerNorm 1's output); w_in output 2F for GEGLU, F for GELU (the activation is
    recomputed by w_out's backward).
    """
    d, H = cfg.d_model, cfg.n_heads
    hd = cfg.head_dim or d // H
    rotary = cfg.pos_emb == "rotary"
    L, R = _heads(cfg, n_local_split)
    f = (d + 2) + (0 if norms_recomputed else d) + H * hd  # LayerNorm 1, projection input, output-projection input
    f += ff_saved_floats_per_token(cfg, norms_recomputed)
    if cfg.attention_type in ("full", "full_naive"):
        f += 3 * H * hd  # q, k (rotated or the projections), v
        if cfg.attention_type == "full":
            f += H * hd + H  # output and log-sum-exp
        else:
            f += H * n + n / 4  # probabilities, causal mask
        return f
    n_k = H - (R if cfg.shared_qk else 0)
    q_kept = False
    if L:
        f += 2 * L * hd if rotary else H * hd + n_k * hd  # rotated q, k (else views of the projections)
        f += H * hd  # v
        q_kept = not rotary
    if _routes_fused(cfg, R):
        f += R * hd * (1 if cfg.shared_qk else 2)  # copies of the routing heads' q (and k)
        f += 0 if L else H * hd  # v
    elif R:
        if not q_kept:
            f += H * hd  # q, read through a view by normalize and layer_norm
        f += (2 * R if cfg.shared_qk else 0) + R * hd + 2 * R + R * cfg.num_clusters + 2 * R
        f += 2 * R * hd if rotary else (R * hd if cfg.shared_qk else 0)
        f += 0 if L else H * hd
        f += 4 * R  # block plan (int64 slot and output indices), not visible to saved-tensor hooks
    return f


def global_saved_floats_per_token(cfg: ModelConfig) -> tuple[float, float]:
    """Per-token values kept once for the whole model, as (kept through the layers' backward, freed by the head's
    backward): token ids and rotary tables (and the embedding projection's input); the final LayerNorm's input and
    stats, the gradient of the head's input that the chunked loss computes in forward (and the output projection's
    input). No logits: the loss runs over chunks (``RoutingTransformerLM.loss``)."""
    d = cfg.d_model
    e = cfg.emb_dim or d
    hd = cfg.head_dim or d // cfg.n_heads
    keep = 2 + (hd if cfg.pos_emb == "rotary" else 0) + (e if e != d else 0)
    head = (d + 2) + e + (d if e != d else 0)
    return keep, head


def ff_saved_floats_per_token(cfg: ModelConfig, norms_recomputed: bool = True) -> float:
    """Saved values of a block's second half (LayerNorm 2 input and stats, feed-forward input unless recomputed,
    w_in's output)."""
    hidden = int(cfg.d_model * cfg.ff_mult)
    return (cfg.d_model + 2) + (0 if norms_recomputed else cfg.d_model) + (2 * hidden if cfg.ff_glu else hidden)


def working_floats_per_token(cfg: ModelConfig, n: int, n_local_split: int) -> dict[str, float]:
    """Temporaries alive on top of the saved activations during the last layer's backward, per token:

    * ``ff``: its w_out backward (where the peak is without chunks): residual gradients 2d, and for GEGLU the
      recomputed gelu F, the activation's gradient F and the gradients of both halves 2F (plain GELU: the
      recomputed activation, then its gradient, F).
    * ``attn``: its attention backward, its feed-forward's saved values already freed, always with the gradients
      of the block input d and of the heads' output H*hd. Causal routing and local heads (the measured
      composition): first the routing heads' recomputed function (as ``routing`` below), then the local kernel,
      recomputed (its output L*hd and log-sum-exp L) with its dq, dk, dv (3 L*hd) and one part's gradients at a
      time (1.5 L*hd), while the routing heads' q and v gradients wait as whole-width [n, H, hd] tensors (2 H*hd,
      the slices' backward); the larger of the two. ``topk`` routing kernels: the re-gathered q, k, v (k and v
      twice: a block sees its predecessor), the output and their gradients, ~10 per head dim; for dense SDPA the
      q, k, v and output gradients 4 per head dim; for ``full_naive`` also the n x n probability gradient and
      the softmax gradient (2 H n) and the causal mask (n / 8, bool): the quadratic attention working set.
    * ``routing``: the routing heads' recomputed function and its backward when the rest of the layer runs in
      chunks (``full`` with chunks): the residual gradient d, the heads' output gradient H*hd, and ~9 per routing
      head dim (routing vectors, rotated q and k, re-gathered blocks, output, gradients)."""
    d, H = cfg.d_model, cfg.n_heads
    hd = cfg.head_dim or d // H
    hidden = int(d * cfg.ff_mult)
    L, R = _heads(cfg, n_local_split)
    ff = 2 * d + (4 * hidden if cfg.ff_glu else hidden)
    if cfg.attention_type == "full":
        attn = 2 * d + 4 * H * hd
    elif cfg.attention_type == "full_naive":
        attn = 2 * d + 4 * H * hd + 2 * H * n + n / 4
    elif _chunkable(cfg, R):
        local = d + H * hd + (2 * H * hd if R else 0) + (5.5 * L * hd + L if L else 0)
        attn = max(local, d + H * hd + 9 * R * hd if R else 0)
    else:
        attn = 2 * d + 10 * (L + R) * hd
    return {"ff": ff, "attn": attn, "routing": d + H * hd + 9 * R * hd}


def layer_floats_per_token(cfg: ModelConfig, n: int, n_local_split: int, checkpointing: str = "none",
                           chunk: float = 0) -> dict[str, float]:
    """One layer under a checkpoint policy: ``kept`` (per token, from its forward until its backward), and during the
    layer's own backward its two phases, ``ff`` (its second half) and ``attn`` (its attention), each as what it holds
    per token of the sequence (temporaries included) plus ``ff_chunk`` / ``attn_chunk`` per token of the one
    recomputed chunk alive then. ``chunk``: tokens per chunk when the policy runs position-wise parts in sequence
    chunks (``train.checkpoint_chunk_size`` > 0), else 0.

    With chunks (the measured composition, tests/test_bench_memory.py): the second half's backward runs one chunk at
    a time from the last; what a chunk holds is its recomputed feed-forward (:func:`ff_chunk_floats_per_token`), and
    the whole sequence holds the layer's kept part, the gradient arriving at the block output (d) and the
    gradients the finished chunks sent to the block input and the heads' output (d + H*hd per token of those
    chunks: autograd sums them only once every chunk is done). Under ``full`` the attention part kept is only what
    the chunked attention hands on: the local heads' output L*hd, the routing heads' raw q, (k,) v and their
    output; its recomputed attention chunks (:func:`attn_chunk_floats_per_token`) come after the second half."""
    d, H = cfg.d_model, cfg.n_heads
    hd = cfg.head_dim or d // H
    L, R = _heads(cfg, n_local_split)
    whole = saved_floats_per_token(cfg, n, n_local_split)
    ffs = ff_saved_floats_per_token(cfg)
    work = working_floats_per_token(cfg, n, n_local_split)
    chunked = chunk > 0 and checkpointing != "none"
    if not chunked and checkpointing != "full":  # none, and selective without chunks: nothing changes
        return {"kept": whole, "ff": whole + work["ff"], "attn": whole - ffs + work["attn"], "ff_chunk": 0.0,
                "attn_chunk": 0.0}
    if checkpointing == "full":  # recomputed under checkpointing's own saved-tensor hooks: norm outputs kept there
        whole, ffs = saved_floats_per_token(cfg, n, n_local_split, False), ff_saved_floats_per_token(cfg, False)
    if not chunked:  # full, whole blocks recomputed
        return {"kept": d, "ff": whole + work["ff"], "attn": whole - ffs + work["attn"], "ff_chunk": 0.0,
                "attn_chunk": 0.0}
    finished = max(0.0, 1 - chunk / n)  # share of the sequence whose chunks are done when the last one runs
    grads_2nd_half = d + finished * (d + H * hd)
    ff_chunk = ff_chunk_floats_per_token(cfg, n_local_split)
    if checkpointing == "selective" or not _chunkable(cfg, R):  # attention whole, kept (recomputed under full)
        attention = whole - ffs
        return {"kept": d if checkpointing == "full" else attention, "ff": attention + grads_2nd_half,
                "attn": attention + work["attn"], "ff_chunk": ff_chunk, "attn_chunk": 0.0}
    between = L * hd + R * hd * (2 if cfg.shared_qk else 3) + R * hd  # local output; routing q, (k,) v; routed out
    return {"kept": d, "ff": d + between + grads_2nd_half,
            "attn": d + between - (L + R) * hd + work["routing"], "ff_chunk": ff_chunk,
            "attn_chunk": attn_chunk_floats_per_token(cfg, n_local_split)}


def ff_chunk_floats_per_token(cfg: ModelConfig, n_local_split: int) -> float:
    """What one recomputed second-half chunk holds during its feed-forward backward, per token of the chunk: the
    feed-forward's saved values (norm output included: recomputed under checkpointing's hooks), the heads'
    concatenation (H*hd, only with more than one group of heads) and the GEGLU/GELU backward's temporaries (4F /
    F, see ``ActivatedLinear``)."""
    d, H = cfg.d_model, cfg.n_heads
    hd = cfg.head_dim or d // H
    hidden = int(d * cfg.ff_mult)
    L, R = _heads(cfg, n_local_split)
    groups = (L > 0) + (R > 0) if cfg.attention_type in ("routing", "local") else 1
    work = 4 * hidden if cfg.ff_glu else hidden
    return ff_saved_floats_per_token(cfg, False) + (H * hd if groups > 1 else 0) + work


def attn_chunk_floats_per_token(cfg: ModelConfig, n_local_split: int) -> float:
    """What one recomputed attention chunk (``full`` with chunks) holds during its backward, per token of the chunk:
    LayerNorm 1's input stats and output, the raw q, k, v projections, the local heads' rotated q and k, output and
    log-sum-exp, and their gradients (~ the same again, plus the projections' input gradient d)."""
    d, H = cfg.d_model, cfg.n_heads
    hd = cfg.head_dim or d // H
    L, R = _heads(cfg, n_local_split)
    n_k = H - (R if cfg.shared_qk else 0)
    saved = 2 + d + (2 * H + n_k) * hd + (3 * L * hd + L)
    return 2 * saved + d


@dataclass
class MemoryEstimate:
    n_params: int
    params: float
    grads: float
    optim: float
    buffers: float
    activations: float  # saved activations at the end of forward
    working: float  # peak minus everything else: transients (incl. the quadratic ones of full_naive) and the
    #                 gradients already produced, at the activation peak
    peak: float  # per-rank peak bytes
    growth: float  # peak minus what exists before the step (parameters, buffers): what the benchmark measures
    act_per_token_layer: float  # saved bytes per token per layer (mean over layers), without checkpointing
    phase: str  # where the peak is: head / ff / attn (backward of the last layer) or optimizer
    tokens: float  # per rank

    @property
    def bytes_per_token(self) -> float:
        """Growth per token of this rank: what each more token costs, model states included."""
        return self.growth / self.tokens


def estimate(cfg: ModelConfig, seq_len: int, batch: int = 1, checkpointing: str = "none", world_size: int = 1,
             zero_stage: int = 0, sp: int = 1, chunk_size: int = 4096) -> MemoryEstimate:
    """Analytic per-rank peak memory of one fp32 forward + backward + AdamW step (see the module docstring)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    n_params = count_params(cfg)
    states = model_state_bytes(n_params, world_size, zero_stage)
    tokens = batch * seq_len / sp
    chunked = chunk_size > 0 and checkpointing != "none"
    chunk_tokens = batch * min(chunk_size, seq_len / sp) if chunked else 0
    splits = layer_head_split(cfg)
    layers = [layer_floats_per_token(cfg, seq_len / sp, s, checkpointing, chunk_tokens / batch) for s in splits]
    keep, head = global_saved_floats_per_token(cfg)
    saved = sum(x["kept"] for x in layers) + keep + head
    e = cfg.emb_dim or cfg.d_model
    grad_bytes = states["grads"] / n_params  # per parameter
    head_grads = (cfg.vocab_size * e * (1 if cfg.tie_embedding else 2) + 2 * cfg.d_model
                  + (2 * e * cfg.d_model if e != cfg.d_model else 0)) * grad_bytes
    # End of forward: every saved value, the loss's gradient of the head weight (fp32, computed in forward) and
    # one chunk of logits, their softmax in place and its gradient cast.
    loss_chunk = min(cfg.loss_chunk_size or tokens, tokens)
    phases = {"head": 4 * tokens * saved + 4 * (cfg.vocab_size * e + 2 * loss_chunk * cfg.vocab_size)}
    # Each layer's backward, from the last: the layers below still keep theirs, the layers above have left their
    # gradients (so with little activation per layer, as under full, the first layer's can be the peak).
    below = keep
    later_grads = [sum(layer_param_count(cfg, s) for s in splits[i + 1:]) for i in range(len(splits))]
    for i, (s, x) in enumerate(zip(splits, layers)):
        # Gradients by then: the head's, the later layers', and this layer's feed-forward ones (its w_out; with
        # chunks w_in too, from the chunks already done).
        grads = head_grads + (later_grads[i] + (ff_param_count(cfg) if chunked else
                                                 cfg.d_model * int(cfg.d_model * cfg.ff_mult))) * grad_bytes
        for name in ("ff", "attn"):
            value = 4 * tokens * (below + x[name]) + 4 * chunk_tokens * x[f"{name}_chunk"] + grads
            if value > phases.get(name, 0):
                phases[name] = value
        below += x["kept"]
    phase = max(phases, key=phases.get)
    act_peak = phases[phase]
    optim_phase = states["grads"] + states["optim"] + states["params"]  # AdamW's foreach temporaries: <= 1 param copy
    if optim_phase > act_peak:
        act_peak, phase = optim_phase, "optimizer"
    activations = 4 * tokens * saved
    bufs = float(buffer_bytes(cfg))
    peak = states["params"] + bufs + act_peak
    per_layer = [saved_floats_per_token(cfg, seq_len, s) for s in splits]
    return MemoryEstimate(n_params=n_params, params=states["params"], grads=states["grads"], optim=states["optim"],
                          buffers=bufs, activations=activations, working=act_peak - activations, peak=peak,
                          growth=act_peak, act_per_token_layer=4 * sum(per_layer) / len(per_layer), phase=phase,
                          tokens=tokens)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows of possibly different keys as one CSV (union of keys, first-seen order)."""
    import csv
    from rtdist.fileio import atomic_path
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:  # a reader never sees half a table
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
