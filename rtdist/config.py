"""Typed run configuration: dataclasses loaded from one or more YAML files plus ``--set key=value`` overrides.

Validation happens once, here at the edge; every error names the offending key (``model.window_size``) and what
would be right. Everything below this module takes plain, already-checked values.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


from .errors import ConfigError  # noqa: F401  (re-exported: callers catch it from here)


def key(default: Any = dataclasses.MISSING, help: str = "", *, shape: bool = False, factory=dataclasses.MISSING):
    """A config field with its help text (``python -m rtdist.train --help-config`` prints it). ``shape``: the key
    sets a tensor's shape or the model's structure, so a checkpoint resumes only with the same value."""
    return field(default=default, default_factory=factory, metadata={"help": help, "shape": shape})


@dataclass
class ModelConfig:
    vocab_size: int = key(257, "tokens in the vocabulary, at least the tokenizer's; unset in the YAML: the "
                               "data.manifest's tokenizer's (257 = bytes + EOD without a manifest)", shape=True)
    d_model: int = key(256, "width of the residual stream", shape=True)
    n_layers: int = key(2, "transformer blocks", shape=True)
    n_heads: int = key(4, "attention heads per layer (local + routing)", shape=True)
    head_dim: Optional[int] = key(None, "width of one head; default d_model / n_heads", shape=True)
    emb_dim: Optional[int] = key(None, "factorised embedding width (the Wikitext-103 preset); default d_model",
                                 shape=True)
    attention_type: Literal["routing", "local", "full", "full_naive"] = key(
        "routing", "routing: local + routing heads per layer; local: every head local; full: dense causal SDPA; "
        "full_naive: dense attention with a materialised n x n score matrix (the quadratic reference)", shape=True)
    n_local_attn_heads: int = key(2, "local heads per layer; the layer's other heads route", shape=True)
    routing_layers: Optional[list[int]] = key(None, "layer indices (negative from the end) with routing heads; "
                                                    "unset: every layer", shape=True)
    window_size: int = key(64, "routing block size w: a routed token attends within blocks of w of its cluster")
    local_window_size: Optional[int] = key(None, "local attention block; default window_size")
    num_clusters: int = key(4, "k-means clusters per routing layer (the paper: about sqrt(n))", shape=True)
    routing_mode: Literal["causal", "topk"] = key("causal", "causal: cluster blocks in position order; topk: each "
                                                            "cluster takes its window_size nearest tokens")
    shared_qk: bool = key(True, "routing heads use k = normalize(q)", shape=True)
    kmeans_ema_decay: float = key(0.999, "EMA decay of the centroids' running sums, in [0, 1)")
    commitment_factor: float = key(1e-4, "weight of the k-means commitment loss pulling routing vectors to their "
                                         "centroids (the study needed 1.0)")
    kmeans_reseed_after: int = key(0, "re-seed a cluster that received no token for this many steps from recent "
                                      "routing vectors (0 = never); routing vectors can collapse onto one cluster, "
                                      "leaving the others dead")
    ff_mult: float = key(4.0, "feed-forward hidden width as a multiple of d_model", shape=True)
    ff_glu: bool = key(True, "GEGLU feed-forward", shape=True)
    pos_emb: Literal["rotary", "none"] = key("rotary", "position encoding", shape=True)
    dropout: float = key(0.0, "dropout on the residual branches, in [0, 1)")
    attn_dropout: float = key(0.0, "dropout on the attention probabilities, in [0, 1)")
    tie_embedding: bool = key(True, "the output projection is the embedding matrix", shape=True)
    recompute_attention: bool = key(True, "recompute the attention kernels (gathers + SDPA) in backward instead of "
                                          "keeping their inputs: ~3-5% more time for several activations fewer per "
                                          "head; numerically identical")
    loss_chunk_size: int = key(1024, "tokens per chunk of the LM head + cross-entropy (0 = the whole sequence at "
                                     "once): logits exist for one chunk at a time, never [n, vocab]")
    init_std: float = key(0.02, "standard deviation of the initial weights")
    compile: Literal["auto", True, False] = key(
        "auto", "regional torch.compile of each block's position-wise part: true, false, or auto (CUDA only: on CPU "
                "a 16k step measured 1-3% faster than eager, less than the minute inductor takes to compile it)")


@dataclass
class DataConfig:
    manifest: Optional[str] = key(None, "manifest written by tools/preprocess.py")
    train_split: str = key("train", "the manifest's split to train on")
    eval_split: str = key("validation", "the manifest's split to evaluate on")
    num_workers: int = key(1, "data-loader worker processes per rank (0: read in the training process)")
    shuffle_buffer: int = key(64, "samples held for shuffling on top of the per-epoch shard order")
    crop_samples: bool = key(False, "train on the first train.seq_length + 1 tokens of each sample when the shards' "
                                    "samples are longer (the rest of each is skipped); unset, such shards are refused")
    skip_corrupt: bool = key(False, "replace the samples of corrupt shards by others (with a warning) instead of "
                                    "stopping")
    verify: Literal["quick", "full", "off"] = key(
        "quick", "pre-flight check of every shard the manifest lists, before step 1: quick (sizes, first/last member "
                 "headers), full (also every byte against the manifest's sha256) or off")
    storage_options: dict[str, Any] = key(
        factory=dict, help="for shards at a URL (data.manifest s3://, gs://, http(s)://, pipe:): fsspec's options for "
                           "the scheme, e.g. {endpoint_url: http://host:9000, key: ..., secret: ...}; AWS_* and "
                           "~/.aws apply too")
    fetch_budget_s: Optional[float] = key(None, "seconds a failing read of a URL is retried before one error "
                                                "naming it (below train.dist_timeout_s, so every rank ends with that "
                                                "error rather than a peer timeout); unset: half of "
                                                "train.dist_timeout_s, at most 60")
    request_timeout_s: Optional[float] = key(None, "seconds one request to a URL may stall before it is retried; "
                                                   "unset: 20, at most data.fetch_budget_s")
    cache_dir: Optional[str] = key(None, "for shards at a URL: a folder on the node's local disk, shared by its ranks "
                                         "and workers, that whole shards are downloaded into (sha256-checked) while "
                                         "range reads serve the first reads; unset: range reads only, no disk")
    cache_limit_gb: float = key(10.0, "bound on data.cache_dir (GB, 10^9 bytes; downloads in progress included): "
                                      "least recently used shards no process has open are evicted; at least the "
                                      "largest shard")


@dataclass
class TrainConfig:
    seq_length: int = key(256, "tokens per training sequence")
    train_micro_batch_size_per_gpu: int = key(4, "samples per rank per micro-batch")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step (a resume derives it to keep the "
                                              "checkpoint's global batch)")
    train_batch_size: Optional[int] = key(None, "samples per optimizer step; derived when unset, checked against "
                                                "micro x accumulation x data-parallel size when set")
    train_iters: int = key(50, "optimizer steps of the whole run")
    lr: float = key(1e-3, "peak learning rate (after warmup)")
    min_lr: float = key(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = key(10, "steps of linear warmup")
    weight_decay: float = key(0.1, "AdamW weight decay (matrices only)")
    adam_beta1: float = key(0.9, "AdamW beta1, in [0, 1)")
    adam_beta2: float = key(0.95, "AdamW beta2, in [0, 1)")
    gradient_clipping: float = key(1.0, "clip the global gradient norm to this (0 = no clipping)")
    precision: Literal["fp32", "bf16"] = key("fp32", "training precision")
    seed: int = key(1234, "seed of weights, centroids, data order and dropout, 0..2^32-1")
    log_interval: int = key(10, "steps between logged metric rows (metrics.jsonl, TensorBoard, the job log)")
    eval_interval: int = key(0, "steps between evaluations (0 = off)")
    eval_iters: int = key(10, "batches per evaluation")
    save_interval: int = key(0, "steps between checkpoints (0 = only at the end)")
    keep_last: Optional[int] = key(None, "complete checkpoints to keep (unset: all); the one latest names is kept "
                                         "in any case")
    checkpoint_policy: Optional[Literal["none", "selective", "full"]] = key(
        None, "activation checkpointing: none; selective (each block's position-wise second half, the feed-forward "
              "above all, recomputed in sequence chunks: ~0.4x the memory of none at 32k); full (blocks keep only "
              "their input and recompute their position-wise parts in chunks). Unset: full if "
              "checkpoint_activations, else none")
    checkpoint_activations: bool = key(False, "the older key for checkpoint_policy: full")
    checkpoint_chunk_size: int = key(4096, "tokens per recomputed chunk under selective/full (0 = no chunks: full "
                                           "recomputes whole blocks and selective does nothing)")
    checkpoint_num_layers: int = key(1, "checkpoint every k-th layer")
    checkpoint_offload: bool = key(False, "keep saved activations in host memory (CUDA)")
    engine: Literal["deepspeed", "fairscale", "torch"] = key("deepspeed", "the training engine")
    zero_stage: int = key(0, "ZeRO stage 0-3 (deepspeed; fairscale: 1-2 as OSS + ShardedDataParallel, 3 on CUDA)")
    max_nonfinite_steps: int = key(5, "stop after this many steps in a row with a non-finite loss")
    dist_timeout_s: int = key(300, "bound on one steady step's collectives and work and on the rendezvous: a stuck "
                                   "or dead peer ends every rank within it")
    startup_timeout_s: int = key(1800, "bound on the start-up phases (DeepSpeed op builds, a resharding resume, "
                                       "compile and the first step, the first evaluation): one slow rank there is "
                                       "not a dead one")
    kmeans_init: Literal["random", "data"] = key(
        "random", "initial routing centroids: random unit vectors, or data: k-means++ on the routing vectors of "
                  "rank 0's first micro-batch, shared with every rank (not on resume). The study needed data")


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = key(1, "ranks that share one sequence, each a slice of its tokens (and of the "
                                         "routing clusters)")


@dataclass
class Config:
    model: ModelConfig = key(factory=ModelConfig)
    data: DataConfig = key(factory=DataConfig)
    train: TrainConfig = key(factory=TrainConfig)
    parallel: ParallelConfig = key(factory=ParallelConfig)
    deepspeed: dict[str, Any] = key(factory=dict, help="DeepSpeed's own keys, passed through (zero_optimization.*, "
                                                       "offload, ...) except those a train.* key sets; and the "
                                                       "metric sinks (tensorboard, csv_monitor, wandb)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shape_keys() -> list[str]:
    """The ``model.*`` keys a checkpoint resumes only with unchanged (marked ``shape`` in their field)."""
    return [f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("shape")]


def _type_text(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in args)
    if typing.get_origin(tp) is Union:
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    return str(tp).replace("typing.", "") if args else _type_name(tp)


def describe_keys(cls=None, prefix: str = "") -> list[str]:
    """Every key with its type, default and meaning, one line each (``--help-config``)."""
    out = []
    for f in dataclasses.fields(cls or Config):
        name = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls or Config)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [f"{name}:"] + describe_keys(tp, f"{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(f"  {name} ({_type_text(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return out


# --------------------------------------------------------------------------------------------------- loading


def merge(base: dict, override: dict) -> dict:
    """Deep merge: nested dicts merge key by key, everything else in ``override`` replaces."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict:
    """``a.b=c`` -> ``{"a": {"b": c}}`` with ``c`` parsed as YAML (so 3, 1e-4, true, [1,2] get their types)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # PyYAML reads 1e-4 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan, .inf, 1e999: no key means anything by them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not in the YAML


def build(cls, data: Optional[dict], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys (with a close-match hint) and wrong types."""
    data = {} if data is None else data
    where = prefix or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}; known keys at {where}: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ConfigError(f"config file {str(path)!r} is a folder: give a YAML file"
                          + (f" (it holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {where}{what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def manifest_vocab_size(manifest: Optional[str]) -> Optional[int]:
    """The tokenizer vocabulary a local manifest records (what ``model.vocab_size`` defaults to), or None when there
    is none to read (the data loader then names what is wrong with the manifest)."""
    try:
        return int(json.loads(Path(manifest).read_text())["tokenizer"]["vocab_size"]) if manifest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_config(paths: list[str] | str = (), overrides: list[str] = (), validate_config: bool = True) -> Config:
    """Merge the YAML files in order, apply ``key=value`` overrides, build and validate a :class:`Config`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict = {}
    for p in paths:
        raw = merge(raw, load_yaml(p))
    for o in overrides:
        raw = merge(raw, parse_override(o))
    cfg = build(Config, raw)
    if "vocab_size" not in (raw.get("model") or {}):
        cfg.model.vocab_size = manifest_vocab_size(cfg.data.manifest) or cfg.model.vocab_size
    if validate_config:
        validate(cfg)
        cfg.model = resolved(cfg.model)
    return cfg


# ------------------------------------------------------------------------------------------------ validation


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def resolved(m: ModelConfig) -> ModelConfig:
    """``m`` with its derived values filled in once (``head_dim``, ``local_window_size``, ``emb_dim``), so that
    nothing below repeats the defaults."""
    return dataclasses.replace(m, head_dim=m.head_dim or m.d_model // m.n_heads,
                               local_window_size=m.local_window_size or m.window_size, emb_dim=m.emb_dim or m.d_model)


def layer_head_split(m: ModelConfig) -> list[int]:
    """Number of local heads in each layer (the rest of the layer's heads route)."""
    if m.attention_type != "routing":
        return [m.n_heads] * m.n_layers if m.attention_type == "local" else [0] * m.n_layers
    routed = set(range(m.n_layers)) if m.routing_layers is None else {i % m.n_layers for i in m.routing_layers}
    return [m.n_local_attn_heads if i in routed else m.n_heads for i in range(m.n_layers)]


MAX_SEED = 2 ** 32 - 1  # numpy's seeds
MAX_TIMEOUT_S = 10 ** 7  # ~115 days; far larger ones overflow the C++ timeouts (milliseconds) of the process group
# Sizes past these are typos, not models: no tensor of them could be allocated. One weight matrix holds at most
# MAX_MATRIX elements (64 GiB of fp32).
MODEL_LIMITS = {"vocab_size": 2 ** 31, "d_model": 2 ** 17, "emb_dim": 2 ** 17, "head_dim": 2 ** 14, "n_layers": 2 ** 12,
                "n_heads": 2 ** 12, "num_clusters": 2 ** 16, "window_size": 2 ** 24, "local_window_size": 2 ** 24,
                "ff_mult": 1024}
MAX_MATRIX = 2 ** 34
TRAIN_LIMITS = {"seq_length": 2 ** 24, "train_micro_batch_size_per_gpu": 2 ** 20, "gradient_accumulation_steps": 2 ** 20,
                "train_iters": 2 ** 40}
DATA_LIMITS = {"num_workers": 256, "shuffle_buffer": 2 ** 20}


def _at_most(section: str, obj, limits: dict, why: str) -> None:
    for name, limit in limits.items():
        v = getattr(obj, name)
        if v is not None and v > limit:
            raise ConfigError(f"{section}.{name} must be <= {limit:,} ({why}), got {v:,}")


def _positive(section: str, obj, *names: str, allow_zero: bool = False, what: str = "") -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        ok = v >= 0 if allow_zero else v > 0
        _check(ok, f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}{what}, got {v}")


def validate_model(m: ModelConfig, seq_length: Optional[int] = None) -> None:
    _positive("model", m, "vocab_size", "d_model", "n_layers", "n_heads", "window_size", "num_clusters", "head_dim",
              "emb_dim", "local_window_size", "ff_mult", "init_std")
    _positive("model", m, "commitment_factor", "kmeans_reseed_after", allow_zero=True)
    _positive("model", m, "loss_chunk_size", allow_zero=True, what=" (0 = the whole sequence in one chunk)")
    _at_most("model", m, MODEL_LIMITS, "larger is a typo, not a model: its tensors could not be allocated")
    head_dim = m.head_dim or m.d_model // m.n_heads
    hidden = int(m.d_model * m.ff_mult)
    _check(hidden >= 1, f"model.ff_mult ({m.ff_mult}) x model.d_model ({m.d_model}) rounds to {hidden} feed-forward "
                        f"units: model.ff_mult must be >= {1 / m.d_model:.3g}")
    for what, rows, cols in (("the embedding (model.vocab_size x model.emb_dim)", m.vocab_size, m.emb_dim or m.d_model),
                             ("the feed-forward (model.d_model x model.d_model * model.ff_mult, twice under "
                              "model.ff_glu)", m.d_model, hidden * (2 if m.ff_glu else 1)),
                             ("the attention projection (model.d_model x model.n_heads * head dim)", m.d_model,
                              m.n_heads * head_dim)):
        _check(rows * cols <= MAX_MATRIX, f"{what} would be {rows:,} x {cols:,} = {rows * cols:,} elements, more than "
                                          f"one weight matrix can hold here (at most {MAX_MATRIX:,}: 64 GiB of fp32)")
    _check(m.head_dim is not None or m.d_model % m.n_heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}), or set model.head_dim")
    _check(head_dim % 2 == 0 or m.pos_emb != "rotary", f"rotary positions need an even head dim, got {head_dim}")
    _check(0 <= m.n_local_attn_heads <= m.n_heads,
           f"model.n_local_attn_heads ({m.n_local_attn_heads}) must be between 0 and model.n_heads ({m.n_heads})")
    for i in m.routing_layers or []:
        _check(-m.n_layers <= i < m.n_layers,
               f"model.routing_layers entry {i} is outside the {m.n_layers} layers (use 0..{m.n_layers - 1} or negatives)")
    _check(0.0 <= m.kmeans_ema_decay < 1.0, f"model.kmeans_ema_decay must be in [0, 1), got {m.kmeans_ema_decay}")
    _check(0.0 <= m.dropout < 1.0 and 0.0 <= m.attn_dropout < 1.0, "model.dropout / model.attn_dropout must be in [0, 1)")
    if seq_length is not None:
        local_w = m.local_window_size or m.window_size
        _check(seq_length % local_w == 0,
               f"train.seq_length ({seq_length}) must be divisible by the local window "
               f"(model.local_window_size or model.window_size = {local_w})")
        _check(seq_length % m.window_size == 0,
               f"train.seq_length ({seq_length}) must be divisible by model.window_size ({m.window_size})")
        if m.attention_type == "routing" and m.routing_mode == "topk":
            _check(m.window_size <= seq_length,
                   f"model.window_size ({m.window_size}) cannot exceed train.seq_length ({seq_length}) in topk mode")


def sequence_parallel_sizes(seq_length: int, window: int) -> list[int]:
    """The sequence-parallel sizes a sequence of ``seq_length`` splits into: each rank's slice a whole number of
    attention windows (the larger of the local and the routing window)."""
    return [d for d in range(1, seq_length // window + 1) if seq_length % (d * window) == 0]


def checkpoint_policy(t: TrainConfig) -> str:
    """The activation checkpointing policy: ``train.checkpoint_policy``, else "full" if
    ``train.checkpoint_activations``, else "none"."""
    if t.checkpoint_policy is not None:
        return t.checkpoint_policy
    return "full" if t.checkpoint_activations else "none"


def validate(cfg: Config) -> None:
    """Ranges of every numeric key, and cross-field checks that would otherwise fail deep inside a run (or hang a
    process group)."""
    t, d = cfg.train, cfg.data
    _check(t.seq_length > 0, f"train.seq_length must be > 0, got {t.seq_length}")
    _at_most("train", t, TRAIN_LIMITS, "larger is a typo: its tensors could not be allocated")
    validate_model(cfg.model, t.seq_length)
    _positive("train", t, "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "lr", "log_interval", "eval_iters", "checkpoint_num_layers", "max_nonfinite_steps", "dist_timeout_s")
    _positive("train", t, "train_iters", "min_lr", "warmup_iters", "weight_decay", "gradient_clipping",
              allow_zero=True)
    _positive("train", t, "eval_interval", "save_interval", allow_zero=True, what=" (0 = off)")
    _positive("train", t, "keep_last", what=" (unset: keep every checkpoint)")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0.0 <= getattr(t, name) < 1.0, f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    _check(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr}): the schedule warms up to "
                             f"train.lr and decays to train.min_lr")
    _check(0 <= t.seed <= MAX_SEED, f"train.seed must be in 0..{MAX_SEED} (2^32 - 1), got {t.seed}")
    _positive("train", t, "startup_timeout_s")
    for name in ("dist_timeout_s", "startup_timeout_s"):
        _check(getattr(t, name) <= MAX_TIMEOUT_S, f"train.{name} must be <= {MAX_TIMEOUT_S:,} s (~115 days), got "
                                                  f"{getattr(t, name):,}")
    _check(0 <= t.zero_stage <= 3, f"train.zero_stage must be 0..3, got {t.zero_stage}")
    _check(t.engine != "torch" or t.zero_stage == 0,
           f"train.zero_stage={t.zero_stage} needs engine deepspeed or fairscale, not torch (set train.zero_stage: 0)")
    _check(not t.checkpoint_activations or t.checkpoint_policy in (None, "full"),
           f"train.checkpoint_activations: true (policy full) conflicts with train.checkpoint_policy: "
           f"{t.checkpoint_policy}; set only train.checkpoint_policy")
    _positive("train", t, "checkpoint_chunk_size", allow_zero=True, what=" (0 = no chunks)")
    _positive("data", d, "num_workers", "shuffle_buffer", allow_zero=True)
    _at_most("data", d, DATA_LIMITS, "worker processes per rank / samples held in memory")
    _check(d.cache_limit_gb > 0, f"data.cache_limit_gb must be > 0 (GB the shard cache in data.cache_dir may hold), "
                                 f"got {d.cache_limit_gb}")
    _check(d.cache_dir is None or (isinstance(d.cache_dir, str) and d.cache_dir.strip() != ""),
           f"data.cache_dir must be a folder path (or unset: no cache), got {d.cache_dir!r}")
    _check(cfg.parallel.sequence_parallel_size >= 1, "parallel.sequence_parallel_size must be >= 1")
    sp = cfg.parallel.sequence_parallel_size
    if sp > 1:
        w = max(cfg.model.window_size, cfg.model.local_window_size or cfg.model.window_size)
        fits = sequence_parallel_sizes(t.seq_length, w)
        _check(sp in fits,
               f"train.seq_length ({t.seq_length}) must be divisible by parallel.sequence_parallel_size x window "
               f"({sp} x {w}): use parallel.sequence_parallel_size in {fits}, or a train.seq_length that is a "
               f"multiple of {sp * w}")
    check_deepspeed(cfg)
    sink_settings(cfg.deepspeed)  # deepspeed.tensorboard / csv_monitor / wandb: DeepSpeed's keys only


_ABSENT = object()


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def deepspeed_owned(t: TrainConfig) -> dict[str, tuple[str, Any]]:
    """The ``deepspeed:`` keys that rtdist writes from ``train.*`` keys: {deepspeed key: (train key, value)}."""
    return {"zero_optimization.stage": ("train.zero_stage", t.zero_stage),
            "train_micro_batch_size_per_gpu": ("train.train_micro_batch_size_per_gpu", t.train_micro_batch_size_per_gpu),
            "gradient_accumulation_steps": ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
            "train_batch_size": ("train.train_batch_size", t.train_batch_size),
            "gradient_clipping": ("train.gradient_clipping", t.gradient_clipping),
            "bf16.enabled": ("train.precision", t.precision == "bf16"),
            "fp16.enabled": ("train.precision", False)}


def check_deepspeed(cfg: Config) -> None:
    """The rule for ``deepspeed:`` keys that say what a ``train.*`` key says: the ``train.*`` key is the one to set;
    the ``deepspeed:`` one may repeat it, and any other value is an error naming both (so the checkpoint, which
    records ``train.*``, always records what ran). DeepSpeed's optimizer and scheduler are not used: rtdist gives it
    AdamW and its schedule, from ``train.*``."""
    t = cfg.train
    for ds_key, (key, ours) in deepspeed_owned(t).items():
        theirs = _lookup(cfg.deepspeed, ds_key)
        if theirs is _ABSENT or theirs == ours:
            continue
        now = t.precision if key == "train.precision" else ours
        right = ("rtdist trains in fp32 or bf16: set train.precision" if ds_key == "fp16.enabled" else
                 f"set {key} only" + (" (unset, it is derived)" if ours is None else ""))
        raise ConfigError(f"deepspeed.{ds_key} ({theirs!r}) contradicts {key} ({now!r}): {right}; a deepspeed: key "
                          f"that a train.* key sets must agree with it")
    for ds_key, keys in (("optimizer", "train.lr, train.adam_beta1/2 and train.weight_decay"),
                         ("scheduler", "train.lr, train.min_lr and train.warmup_iters")):
        if ds_key in cfg.deepspeed:
            raise ConfigError(f"deepspeed.{ds_key} would be ignored: rtdist gives DeepSpeed its own "
                              f"{'AdamW' if ds_key == 'optimizer' else 'warmup + cosine schedule'} from {keys}; "
                              f"remove deepspeed.{ds_key} and set those")


# ------------------------------------------------------------------------------------------- metric sinks

SINKS = ("tensorboard", "csv_monitor", "wandb")
# DeepSpeed's keys for each sink (deepspeed.monitor.config); the default of ``enabled`` is ours.
_KEYS = {
    "tensorboard": {"enabled": True, "output_path": "", "job_name": "tensorboard"},
    "csv_monitor": {"enabled": False, "output_path": "", "job_name": "csv_monitor"},
    "wandb": {"enabled": False, "project": "rtdist", "team": None, "group": None},
}


def without_sinks(deepspeed_config: dict) -> dict:
    """The ``deepspeed:`` section less the sinks this module writes (what to pass to ``deepspeed.initialize``)."""
    return {k: v for k, v in deepspeed_config.items() if k not in SINKS}


def sink_settings(deepspeed_config: dict) -> dict[str, dict]:
    """Each sink's settings with defaults filled in; a key DeepSpeed does not know, or a wrong type, raises a
    ConfigError naming ``deepspeed.<sink>.<key>``."""
    out = {}
    for sink, defaults in _KEYS.items():
        given = deepspeed_config.get(sink) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"deepspeed.{sink}: expected a mapping such as {{enabled: true}}, got {given!r}")
        for key, value in given.items():
            if key not in defaults:
                close = difflib.get_close_matches(str(key), list(defaults), n=1)
                hint = f" (did you mean 'deepspeed.{sink}.{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown key 'deepspeed.{sink}.{key}'{hint}; known keys: {', '.join(defaults)}")
            if key == "enabled" and not isinstance(value, bool):
                raise ConfigError(f"deepspeed.{sink}.enabled: expected true/false, got {value!r}")
            if key != "enabled" and value is not None and not isinstance(value, str):
                raise ConfigError(f"deepspeed.{sink}.{key}: expected a string, got {value!r}")
        out[sink] = {**defaults, **given}
    return out
