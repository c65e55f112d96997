"""A small, reproducible study of what routing attention learns that local attention cannot.

Two tasks, the same attention variants on each (local-only heads, local + routing heads in ``causal`` and ``topk``
mode, dense attention), equal steps and data for every variant:

- **retrieval**: synthetic sequences generated on the fly from a seed. Key/value pairs are defined at the start, a
  long filler of noise tokens follows, and the keys are queried at the end, far beyond the local window; loss and
  accuracy are measured on the answer (value) tokens only.
- **text**: a real corpus already on the machine (this Python installation's sources, :func:`build_demo_corpus`)
  through the real shard pipeline (:func:`preprocess` with the bytes tokenizer + :class:`ShardLoader`); validation
  bits per byte.

A study is described by YAML (``configs/experiments/*.yaml``) loaded into :class:`Study` with the same typed,
key-naming validation as training configs. :func:`run_study` writes ``results.json``, ``results.md`` and
``curves.png`` (the report: ``study_report.py``). ``tools/experiment.py`` is the command line.

A recipe on top of the library, not part of it: the model, the shard pipeline, the optimizer, its learning-rate
schedule and the training step are rtdist's own (:func:`rtdist.train.train_step` on a single-process
:class:`TorchEngine`); what is the study's alone is the retrieval task, its answer-only loss and length curriculum,
and the metrics.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rtdist.config import MAX_SEED, ModelConfig, build, load_yaml, merge, parse_override, validate_model
from rtdist.data import ShardLoader, build_demo_corpus, load_manifest, preprocess
from rtdist.errors import ConfigError, TrainingError
from rtdist.data.evalset import EvalWindows
from rtdist.evaluate import bytes_per_token, evaluate, plot_loss_by_position, with_bytes, with_text_figures
from rtdist.model import RoutingTransformerLM, count_parameters
from rtdist.parallel.engines import TorchEngine
from rtdist.parallel.optim import OptimConfig, lr_lambda
from rtdist.train import train_step

from study_report import markdown_report, write_plot, write_routing_plot

# ------------------------------------------------------------------------------------------------- the task


@dataclass
class RetrievalTask:
    """Associative recall over a long distance.

    Vocabulary: ``num_filler`` noise symbols, then ``num_keys`` key symbols, then ``num_values`` value symbols.
    A sequence of ``seq_length + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``) holds

    - ``num_pairs`` definitions at the start: distinct keys, each with a random value, written ``value key``
      (``order: value_key``) or ``key value`` (``order: key_value``),
    - filler drawn uniformly from the noise symbols,
    - ``num_queries`` queries at the end, ``key value`` each, every key at most once (so no query can copy the
      answer from a nearby earlier query: the only source is the definition at the start).

    The answer tokens are the values of the queries; the rest is unpredictable noise or bookkeeping. With
    ``value_key`` the earlier occurrence of the queried key is the content match (what shared-QK routing finds),
    and the answer is the token *before* it; with ``key_value`` it is the token after (an induction head).
    Either way the model needs a local "previous token" head in one layer and a retrieval head in the next."""

    seq_length: int = 2048
    num_pairs: int = 8
    num_keys: int = 8
    num_values: int = 8
    num_filler: int = 16
    num_queries: int = 8
    order: Literal["value_key", "key_value"] = "value_key"

    @property
    def vocab_size(self) -> int:
        return self.num_filler + self.num_keys + self.num_values

    def query_start(self, seq_length: Optional[int] = None) -> int:
        """Input position of the first query key."""
        return (seq_length or self.seq_length) + 1 - 2 * self.num_queries

    def min_distance(self, seq_length: Optional[int] = None) -> int:
        """Fewest positions between a query and the definition it needs (the last definition to the first query)."""
        return self.query_start(seq_length) - (2 * self.num_pairs - 1)

    def validate(self, where: str = "retrieval.task") -> None:
        for name in ("seq_length", "num_pairs", "num_keys", "num_values", "num_filler", "num_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.num_pairs > self.num_keys:
            raise ConfigError(f"{where}.num_pairs ({self.num_pairs}) cannot exceed {where}.num_keys "
                              f"({self.num_keys}): the keys of one sequence are distinct")
        if self.num_queries > self.num_pairs:
            raise ConfigError(f"{where}.num_queries ({self.num_queries}) cannot exceed {where}.num_pairs "
                              f"({self.num_pairs}): each key is queried at most once")
        if self.min_distance() < 1:
            raise ConfigError(f"{where}.seq_length ({self.seq_length}) is too short for {self.num_pairs} definitions "
                              f"and {self.num_queries} queries")

    def corrupt_definitions(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A copy of ``tokens`` whose definitions carry freshly drawn values (the queries keep the old ones as
        targets): a model that answers by reading the definitions drops to chance, one that does not is unmoved."""
        out = tokens.clone()
        v_off = 0 if self.order == "value_key" else 1
        V0 = self.num_filler + self.num_keys
        out[:, v_off: 2 * self.num_pairs: 2] = torch.randint(0, self.num_values, (tokens.shape[0], self.num_pairs),
                                                             generator=generator) + V0
        return out

    def definition_keys(self, tokens: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query key positions, their definition key positions), each [B, Q] input positions: what routing must put
        in one cluster block for the answer to be readable."""
        inputs = tokens[:, :-1]
        queries = answers.nonzero()[:, 1].view(tokens.shape[0], -1)  # [B, Q], the same columns in every row
        k_off = 1 if self.order == "value_key" else 0
        defs = inputs[:, k_off: 2 * self.num_pairs: 2]  # [B, P] definition keys
        match = defs[:, None, :] == inputs.gather(1, queries)[:, :, None]  # [B, Q, P], one True per row
        return queries, k_off + 2 * match.int().argmax(-1)

    def sample(self, batch_size: int, generator: torch.Generator, seq_length: Optional[int] = None):
        """(tokens [B, n + 1] int64, answers [B, n] bool): ``answers[b, i]`` marks input positions whose *target*
        ``tokens[b, i + 1]`` is a query's value."""
        n = seq_length or self.seq_length
        B, P, Q = batch_size, self.num_pairs, self.num_queries
        F0, K0 = 0, self.num_filler
        V0 = K0 + self.num_keys
        g = generator
        tokens = torch.randint(F0, self.num_filler, (B, n + 1), generator=g)
        keys = torch.rand(B, self.num_keys, generator=g).argsort(dim=1)[:, :P] + K0  # distinct per row
        values = torch.randint(0, self.num_values, (B, P), generator=g) + V0
        k_off, v_off = (1, 0) if self.order == "value_key" else (0, 1)
        tokens[:, k_off: 2 * P: 2] = keys
        tokens[:, v_off: 2 * P: 2] = values
        asked = torch.rand(B, P, generator=g).argsort(dim=1)[:, :Q]  # which definitions are queried, in order
        s = n + 1 - 2 * Q
        tokens[:, s::2] = keys.gather(1, asked)
        tokens[:, s + 1::2] = values.gather(1, asked)
        answers = torch.zeros(B, n, dtype=torch.bool)
        answers[:, s::2] = True
        return tokens, answers


# ------------------------------------------------------------------------------------------ study config


@dataclass
class Phase:
    steps: int
    seq_length: int
    batch_size: int


@dataclass
class TrainSpec:
    steps: int = 300  # at the task's full length, after the curriculum
    batch_size: int = 4
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.0  # on matrices only, as in training (rtdist.parallel.optim.param_groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0: no clipping
    # retrieval only: train on the answer tokens ("answers") or on every token ("all")
    loss: Literal["answers", "all"] = "answers"
    # "data": seed each routing layer's centroids from the first batch's routing vectors (k-means++ and a few
    # Lloyd iterations, layer by layer) instead of the model's random unit vectors; "random": the model's own.
    kmeans_init: Literal["data", "random"] = "data"
    # retrieval only: phases run first, in order, each at its own (shorter) length; evaluation is always at full
    # length. The learning rate schedule spans curriculum + steps.
    curriculum: list[Phase] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.curriculum) + self.steps


@dataclass
class EvalSpec:
    every: int = 50  # evaluate every this many steps (and after the last)
    batches: int = 8
    batch_size: int = 4
    # text only: also score this many positions per validation sample, each from its prefix alone for a model
    # that is not causal (topk routing), so that every variant has one honest, comparable number
    sampled_positions: int = 16
    # text only: after training, score the first this many validation targets at stride = the sequence length and
    # at a quarter of it (every token once, fixed order), with the loss by position (0 = off)
    final_targets: int = 0


@dataclass
class RetrievalSpec:
    task: RetrievalTask = field(default_factory=RetrievalTask)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig keys; vocab_size comes from the task
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


@dataclass
class CorpusSpec:
    dir: Optional[str] = None  # a directory of text (PG-19 layout: train/ validation/ ...); None = build the demo one
    max_mb: float = 8.0  # size of the demo corpus built from local sources


@dataclass
class TextSpec:
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    seq_length: int = 1024
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig keys; vocab_size comes from the tokenizer
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


@dataclass
class Study:
    seed: int = 0
    threads: int = 2  # torch intra-op threads
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "text"])
    # variant name -> ModelConfig overrides applied on top of each task's model
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)
    text: TextSpec = field(default_factory=TextSpec)

    def to_dict(self) -> dict:
        return asdict(self)


TASKS = ("retrieval", "text")


def load_study(paths, overrides=()) -> Study:
    """Merge the YAML files in order, apply ``key=value`` overrides, build and check a :class:`Study`."""
    raw: dict = {}
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        raw = merge(raw, load_yaml(p))
    for o in overrides:
        raw = merge(raw, parse_override(o))
    study = build(Study, raw)
    check_study(study)
    return study


def check_study(study: Study) -> None:
    if not study.variants:
        raise ConfigError("variants: name at least one variant (e.g. local: {attention_type: local})")
    for t in study.tasks:
        if t not in TASKS:
            raise ConfigError(f"tasks: {t!r} is not one of {list(TASKS)}")
    if not 1 <= study.threads <= 4096:
        raise ConfigError(f"threads must be in 1..4096, got {study.threads}")
    if not 0 <= study.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in 0..{MAX_SEED} (2^32 - 1), got {study.seed}")
    study.retrieval.task.validate()
    for task in study.tasks:
        spec = getattr(study, task)
        for name in ("steps", "batch_size", "warmup"):
            if getattr(spec.train, name) < (0 if name == "warmup" else 1):
                raise ConfigError(f"{task}.train.{name} must be positive, got {getattr(spec.train, name)}")
        t = spec.train
        for ok, what in ((t.lr > 0, f"lr must be > 0, got {t.lr}"),
                         (0 <= t.min_lr <= t.lr, f"min_lr must be in [0, lr = {t.lr}], got {t.min_lr}"),
                         (t.weight_decay >= 0, f"weight_decay must be >= 0, got {t.weight_decay}"),
                         (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
                          f"betas must be two numbers in [0, 1), got {t.betas}"),
                         (t.grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), got {t.grad_clip}")):
            if not ok:  # the schedule and optimizer would run, and report, whatever these say
                raise ConfigError(f"{task}.train.{what}")
        for i, ph in enumerate(spec.train.curriculum):
            if task == "text":
                raise ConfigError("text.train.curriculum: the text task trains at its shard length only")
            where = f"retrieval.train.curriculum[{i}]"
            if ph.steps < 0 or ph.batch_size < 1:
                raise ConfigError(f"{where}: steps must be >= 0 and batch_size positive")
            if study.retrieval.task.min_distance(ph.seq_length) < 1:
                raise ConfigError(f"{where}.seq_length ({ph.seq_length}) is too short for the definitions and queries")
        if spec.eval.every < 1 or spec.eval.batches < 1 or spec.eval.batch_size < 1:
            raise ConfigError(f"{task}.eval.every / batches / batch_size must be positive")
        for v in study.variants:
            cfg = model_config(study, task, v, vocab_size=257)  # raises naming the key
            for i, ph in enumerate(spec.train.curriculum):
                try:
                    validate_model(cfg, ph.seq_length)
                except ConfigError as e:
                    raise ConfigError(f"retrieval.train.curriculum[{i}] with variants.{v}: {e}") from None


def model_config(study: Study, task: str, variant: str, vocab_size: int) -> ModelConfig:
    """The task's model with the variant's overrides; errors name ``<task>.model`` / ``variants.<name>``."""
    spec = getattr(study, task)
    base = dict(spec.model)
    over = study.variants[variant] or {}
    for key in ("vocab_size",):
        if key in base or key in over:
            raise ConfigError(f"{task}.model / variants.{variant}: {key} is set by the task, leave it out")
    cfg = build(ModelConfig, merge(base, dict(over)), f"{task}.model+variants.{variant}")
    cfg.vocab_size = vocab_size
    seq = spec.task.seq_length if task == "retrieval" else spec.seq_length
    validate_model(cfg, seq)
    return cfg


# ------------------------------------------------------------------------------------------ training bits


def optim_config(spec: TrainSpec) -> OptimConfig:
    """The training optimizer's settings for a study run: AdamW, warmup + cosine over curriculum + steps."""
    return OptimConfig(lr=spec.lr, min_lr=spec.min_lr, warmup_iters=spec.warmup, train_iters=spec.total_steps,
                       weight_decay=spec.weight_decay, betas=tuple(spec.betas), gradient_clipping=spec.grad_clip)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate of ``step`` (0-based): the library's schedule (:func:`rtdist.parallel.optim.lr_lambda`)."""
    return spec.lr * lr_lambda(optim_config(spec))(step)


def train_loop(model, spec: TrainSpec, next_batch: Callable[[int], tuple], evaluate_fn: Callable[[], dict],
               every: int, log: Callable[[str], None], name: str, bar=None) -> dict:
    """Train ``model`` as rtdist does on one process (:class:`TorchEngine`: AdamW, warmup + cosine, clipping;
    ``update_kmeans`` after every step), evaluating every ``every`` steps and after the last. ``next_batch(step)
    -> (tokens, answers)``: ``answers`` [B, n] bool for an answer-only loss, or None (every target). ``bar``: a
    tqdm bar advanced once per step. Returns the curve and the evaluations."""
    engine = TorchEngine(model, optim_config(spec), accumulation=1, precision="fp32")
    # train_step returns the LM loss only; the curve also records the k-means commitment loss, which is the
    # model's second output.
    last_aux = {}
    hook = model.register_forward_hook(lambda module, inputs, out: last_aux.update(value=out[1].item()))
    curve, t0 = [], time.time()
    model.train()
    evals = []
    total = spec.total_steps
    try:
        for step in range(total):
            tokens, answers = next_batch(step)
            # the retrieval task's train.loss: answers scores only the query answers (``answers`` [B, n]), the one
            # part of a sequence that is not random filler or bookkeeping
            loss = train_step(engine, model, [tokens], loss_masks=None if answers is None else [answers])
            if loss is None:
                raise TrainingError(f"variant {name}: non-finite training loss at step {step + 1}: lower the task's "
                                    f"train.lr or raise its train.warmup")
            curve.append({"step": step + 1, "seq_length": tokens.shape[1] - 1, "train_loss": round(loss, 5),
                          "aux": round(last_aux["value"], 6), **routing_figures(model)})
            if bar is not None:
                bar.update(1)
            if (step + 1) % every == 0 or step + 1 == total:
                m = evaluate_fn()
                m.update(step=step + 1, wall_s=round(time.time() - t0, 2))
                evals.append(m)
                log(f"  {name:>16} step {step + 1:>5}/{total}  n {tokens.shape[1] - 1:>5}  train {loss:.4f}  "
                    + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)
                                and k != "wall_s" and (not LAYER_FIGURE.match(k) or k.endswith("_reach")))
                    + f"  ({time.time() - t0:.0f} s)")
    finally:
        hook.remove()
    return {"train": curve, "eval": evals, "final": evals[-1], "wall_s": round(time.time() - t0, 2)}


# --------------------------------------------------------------------------------------------- the tasks


@torch.no_grad()
def retrieval_metrics(model, eval_set) -> dict:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for tokens, answers in eval_set:
        logits, _ = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        nll = F.cross_entropy(logits.float()[answers], targets[answers], reduction="sum")
        loss_sum += nll.item()
        correct += int((logits[answers].argmax(-1) == targets[answers]).sum())
        count += int(answers.sum())
    model.train()
    return {"answer_loss": loss_sum / count, "answer_acc": correct / count}


LAYER_FIGURE = re.compile(r"l\d+_")  # routing_figures' keys; the log line shows only their reach


def block_reach(clusters: torch.Tensor, num_clusters: int, window: int, queries: torch.Tensor,
                keys: torch.Tensor) -> torch.Tensor:
    """Whether causal routing lets each query read its key: same cluster, and the key in the query's cluster block
    or the one before (:func:`rtdist.model.kernels.causal_routing_attention`). ``clusters`` [B, H, n]; ``queries``,
    ``keys`` [B, Q] positions -> [B, Q] bool, True when any head reaches."""
    rank = F.one_hot(clusters, num_clusters).cumsum(2).gather(3, clusters[..., None]).squeeze(-1) - 1
    block = rank // window  # [B, H, n]: the token's block within its cluster
    at = lambda t, pos: t.gather(2, pos[:, None, :].expand(-1, t.shape[1], -1))  # noqa: E731  [B, H, Q]
    gap = at(block, queries) - at(block, keys)
    return ((at(clusters, queries) == at(clusters, keys)) & (gap >= 0) & (gap <= 1)).any(dim=1)


def routing_figures(model, task: Optional[RetrievalTask] = None, eval_set=()) -> dict:
    """Per routing layer: the k-means health of the last update (largest cluster's share, normalised entropy,
    empty clusters, centroid movement) and, for the retrieval task, ``reach``: the share of the evaluation's
    queries whose definition key the layer's routing puts within reach."""
    out = {}
    for layer, h in model.kmeans_health().items():
        out.update({f"l{layer}_max_share": h["max_share"], f"l{layer}_entropy": h["entropy"],
                    f"l{layer}_empty": h["empty"], f"l{layer}_move": h["move"]})
    if task is not None and eval_set:
        hits = {}
        for tokens, answers in eval_set:
            queries, keys = task.definition_keys(tokens, answers)
            for layer, clusters in model.routing_clusters(tokens[:, :-1]).items():
                attn = model.layers[layer].attn
                hit = block_reach(clusters, attn.cfg.num_clusters, attn.window, queries, keys)
                hits.setdefault(layer, []).append(hit.float().mean().item())
        out.update({f"l{layer}_reach": sum(v) / len(v) for layer, v in hits.items()})
    return out


@torch.no_grad()
def is_causal(model, vocab_size: int, seq_length: int, seed: int = 0) -> bool:
    """Probe: do logits before the middle of a sequence stay the same when every later token changes? (``topk``
    routing fails this: which earlier tokens a cluster keeps depends on later tokens.)"""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab_size, (1, seq_length), generator=g)
    b = a.clone()
    half = seq_length // 2
    b[:, half:] = torch.randint(0, vocab_size, (1, seq_length - half), generator=g)
    was_training = model.training
    model.eval()
    la, lb = model(a)[0][:, :half], model(b)[0][:, :half]
    model.train(was_training)
    return bool(torch.allclose(la, lb, atol=1e-5, rtol=0))


@torch.no_grad()
def prefix_logits(model, tokens: torch.Tensor, positions) -> torch.Tensor:
    """Logits for ``positions`` of ``tokens`` [B, n], each from a forward over the prefix that ends there only
    (what generation would see) -> [B, len(positions), vocab]."""
    was_training = model.training
    model.eval()
    out = torch.stack([model(tokens[:, : p + 1])[0][:, -1] for p in positions], dim=1)
    model.train(was_training)
    return out


@torch.no_grad()
def retrieval_prefix_metrics(model, eval_set) -> dict:
    """:func:`retrieval_metrics` with every answer's logits from its prefix alone: the honest number for a model
    that is not causal. Answers sit at the same positions in every row."""
    loss_sum, correct, count = 0.0, 0, 0
    for tokens, answers in eval_set:
        positions = answers[0].nonzero().squeeze(1).tolist()
        if not bool((answers == answers[:1]).all()):
            raise ValueError("answer positions differ between rows")
        logits = prefix_logits(model, tokens[:, :-1], positions).float()
        targets = tokens[:, 1:][:, positions]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    return {"answer_loss": loss_sum / count, "answer_acc": correct / count}


def run_retrieval(study: Study, variant: str, log, bar=None) -> dict:
    spec = study.retrieval
    task = spec.task
    cfg = model_config(study, "retrieval", variant, task.vocab_size)
    torch.manual_seed(study.seed)
    model = RoutingTransformerLM(cfg)
    params = count_parameters(model)
    g_train = torch.Generator().manual_seed(study.seed + 1)  # the same batches for every variant
    g_eval = torch.Generator().manual_seed(study.seed + 2)
    eval_set = [task.sample(spec.eval.batch_size, g_eval) for _ in range(spec.eval.batches)]
    if spec.train.kmeans_init == "data":
        g_init = torch.Generator().manual_seed(study.seed + 3)
        model.init_kmeans_from_data(task.sample(spec.train.batch_size, g_init)[0][:, :-1], generator=g_init)

    schedule = [(p.steps, p.seq_length, p.batch_size) for p in spec.train.curriculum]
    schedule.append((spec.train.steps, task.seq_length, spec.train.batch_size))
    bounds = [sum(s[0] for s in schedule[: i + 1]) for i in range(len(schedule))]

    def next_batch(step):
        _, n, b = schedule[next(i for i, end in enumerate(bounds) if step < end)]
        tokens, answers = task.sample(b, g_train, seq_length=n)
        return tokens, (answers if spec.train.loss == "answers" else None)

    out = train_loop(model, spec.train, next_batch,
                     lambda: {**retrieval_metrics(model, eval_set), **routing_figures(model, task, eval_set)},
                     spec.eval.every, log, variant, bar)
    g_control = torch.Generator().manual_seed(study.seed + 4)
    control_set = [(task.corrupt_definitions(tokens, g_control), answers) for tokens, answers in eval_set]
    out["control"] = retrieval_metrics(model, control_set)
    out["causal"] = is_causal(model, task.vocab_size, min(task.seq_length, 512), study.seed)
    if not out["causal"]:  # the full-sequence numbers may use later tokens: score each answer from its prefix
        out["final_prefix_only"] = retrieval_prefix_metrics(model, eval_set)
        log(f"  {variant:>16} not causal; answers scored from their prefix only: "
            f"acc {out['final_prefix_only']['answer_acc']:.4f} loss {out['final_prefix_only']['answer_loss']:.4f}")
    return {"params": params, "model": asdict(cfg), **out}


def prepare_text(study: Study, out_dir: Path, log) -> dict:
    """Corpus -> bytes-tokenizer shards with a manifest (rebuilt each run; a few seconds for a few MB)."""
    spec = study.text
    if spec.corpus.dir:
        corpus_dir, info = Path(spec.corpus.dir), {"dir": spec.corpus.dir}
    else:
        corpus_dir = out_dir / "corpus"
        info = build_demo_corpus(corpus_dir, max_bytes=int(spec.corpus.max_mb * 2 ** 20))
    summary = preprocess([str(corpus_dir)], str(out_dir / "shards" / "text"), tokenizer="bytes",
                         seq_length=spec.seq_length, workers=1, progress=False, overwrite=True, log=lambda *_: None)
    splits = {k: v.get("samples") for k, v in summary["manifest"].get("splits", {}).items()}
    log(f"text: corpus {corpus_dir} ({info.get('bytes', 0) / 2 ** 20:.1f} MB), samples per split {splits}")
    return {"manifest_path": summary["manifest_path"], "corpus": info, "samples": splits}


def run_text(study: Study, variant: str, manifest_path: str, log, bar=None) -> dict:
    spec = study.text
    manifest = load_manifest(manifest_path)
    train = ShardLoader(manifest_path, "train", spec.train.batch_size, num_workers=0, seed=study.seed,
                        shuffle=True, shuffle_buffer=256, policy="drop")
    cfg = model_config(study, "text", variant, train.vocab_size)
    torch.manual_seed(study.seed)
    model = RoutingTransformerLM(cfg)
    params = count_parameters(model)
    bpt = bytes_per_token(manifest, "validation")
    if spec.train.kmeans_init == "data":  # from the first training batch, read by a loader of its own
        first = next(iter(ShardLoader(manifest_path, "train", spec.train.batch_size, num_workers=0, seed=study.seed,
                                      shuffle=True, shuffle_buffer=256, policy="drop")))
        model.init_kmeans_from_data(first[:, :-1], generator=torch.Generator().manual_seed(study.seed + 3))

    def batches_forever():
        while True:
            yield from train

    stream = batches_forever()

    def next_batch(step):
        return next(stream), None

    val = EvalWindows(manifest, "validation", spec.seq_length, None, spec.eval.batch_size,
                      max_windows=spec.eval.batches * spec.eval.batch_size)  # the same windows every time

    def evaluate_fn():
        m = with_bytes(evaluate(model, val), bpt)
        return {"val_loss": m["loss"], "val_bpb": m.get("bits_per_byte", m["bits_per_token"]), **routing_figures(model)}

    out = train_loop(model, spec.train, next_batch, evaluate_fn, spec.eval.every, log, variant, bar)
    if spec.eval.final_targets:
        out["final_eval"] = {}
        for stride in (spec.seq_length, spec.seq_length // 4):
            windows = EvalWindows(manifest, "validation", spec.seq_length, stride, spec.eval.batch_size,
                                  max_targets=spec.eval.final_targets)
            out["final_eval"][str(stride)] = with_text_figures(evaluate(model, windows), manifest, "validation")
    out["causal"] = is_causal(model, train.vocab_size, min(spec.seq_length, 512), study.seed)
    out["sampled"] = text_sampled_bpb(model, manifest_path, spec, study.seed, bpt, prefix_only=not out["causal"])
    return {"params": params, "model": asdict(cfg), **out}


@torch.no_grad()
def text_sampled_bpb(model, manifest_path: str, spec: TextSpec, seed: int, bpt: Optional[float],
                     prefix_only: bool) -> dict:
    """Validation bits/byte at ``spec.eval.sampled_positions`` positions per sample, spread over the sequence (the
    same for every variant). With ``prefix_only`` each position's logits come from a forward over its prefix alone;
    otherwise from the full-sequence forward, which is the same thing for a causal model."""
    n = spec.seq_length
    k = spec.eval.sampled_positions
    positions = sorted({int(round(x)) for x in torch.linspace(n / k, n - 1, k).tolist()})
    val = ShardLoader(manifest_path, "validation", spec.eval.batch_size, num_workers=0, seed=seed, shuffle=False,
                      policy="wrap")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    it = iter(val)
    for _ in range(min(spec.eval.batches, len(val))):
        batch = next(it)
        inputs, targets = batch[:, :-1], batch[:, 1:][:, positions]
        logits = prefix_logits(model, inputs, positions) if prefix_only else model(inputs)[0][:, positions]
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    bits = total / count / math.log(2)
    return {"positions_per_sample": len(positions), "tokens": count, "prefix_only": prefix_only,
            "val_bpb": bits / bpt if bpt else bits}


# --------------------------------------------------------------------------------------------- the study


def _load() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_study(study: Study, out_dir, command: str = "", variants: Optional[list[str]] = None,
              log: Callable[[str], None] = tqdm.write, progress: bool = False) -> dict:
    """Train every variant on every task; write results.json, results.md and curves.png under ``out_dir``.
    ``progress``: a tqdm bar (on stderr) over the training steps of every task and variant."""
    names = list(variants or study.variants)
    unknown = [v for v in names if v not in study.variants]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; the config defines {list(study.variants)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(study.threads)
    t0 = time.time()
    results: dict[str, Any] = {
        "command": command, "config": study.to_dict(), "variants": names,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_start": _load()},
        "tasks": {}}
    steps = len(names) * sum(getattr(study, task).train.total_steps for task in study.tasks)
    with tqdm(total=steps, desc="study", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        if "retrieval" in study.tasks:
            task = study.retrieval.task
            local_w = [model_config(study, "retrieval", v, task.vocab_size) for v in names]
            reach = max(2 * (c.local_window_size or c.window_size) - 1 for c in local_w)
            results["retrieval_min_distance"] = task.min_distance()
            results["local_reach"] = reach
            if task.min_distance() <= reach:
                log(f"warning: queries are only {task.min_distance()} positions from their definitions, within the "
                    f"local reach ({reach}): local attention can answer them")
            log(f"retrieval: {task.seq_length} tokens, vocab {task.vocab_size}, answers >= {task.min_distance()} "
                f"positions back (local reach {reach})")
            results["tasks"]["retrieval"] = {}
            for v in names:
                bar.set_description(f"retrieval {v}")
                results["tasks"]["retrieval"][v] = run_retrieval(study, v, log, bar)
        if "text" in study.tasks:
            data = prepare_text(study, out_dir, log)
            results["text_data"] = data
            results["tasks"]["text"] = {}
            for v in names:
                bar.set_description(f"text {v}")
                results["tasks"]["text"][v] = run_text(study, v, data["manifest_path"], log, bar)
    results["wall_s"] = round(time.time() - t0, 1)
    results["environment"]["load_end"] = _load()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_plot(results, out_dir / "curves.png")
    write_routing_plot(results, out_dir / "routing.png")
    text = results["tasks"].get("text", {})
    curves = {f"{v} (stride {spec})": r["final_eval"][spec]["loss_by_position"] for v, r in text.items()
              if "final_eval" in r for spec in list(r["final_eval"])[:1]}
    if curves:  # where in the context each variant's loss falls: routing's gain is at long context, if anywhere
        plot_loss_by_position(curves, out_dir / "positions.png", "text: validation loss by position")
    (out_dir / "results.md").write_text(markdown_report(results))
    return results


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + argv)
