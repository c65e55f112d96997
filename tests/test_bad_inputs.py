"""Bad input at every command-line entry point ends in one clear line: a table of cases.

Each row of ``ROWS`` is ``(id, make, entry, args, expected)``:

- ``id``: a short name for the case (the pytest id);
- ``make(tmp)``: builds the bad input under the empty folder ``tmp`` (a ``Path``; the command runs with ``tmp`` as
  its working directory, so ``args`` use paths relative to it); ``None`` when nothing is needed. When it returns an
  ``Env``, those environment variables are set for the call (the launch variables rtdist reads);
- ``entry``: a key of ``ENTRY_POINTS``: a file under the repository (``tools/x.py``, imported with ``tools/`` on
  ``sys.path`` as ``python tools/x.py`` has it) or ``module:function``, whose ``main(argv)`` is run in-process
  through ``rtdist.errors.cli_main``;
- ``args``: the argv list given to ``main``;
- ``expected``: a substring of the error line (without the leading ``error: ``).

Every row must end with exit status 2 and exactly one non-empty stderr line starting with ``error: ``, no
traceback, the expected substring, and nothing half-written left under a final name: no new or changed manifest,
no leftover ``.tmp`` file, and every new or changed ``.tar`` a whole tar. Rows fail at validation, before any heavy
work: none trains, benchmarks or preprocesses more than a few kilobytes.
"""

import importlib.util
import json
import os
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import book, pg19, run, write_files

from rtdist.errors import cli_main

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"preprocess": "tools/preprocess.py", "inspect": "tools/inspect_shards.py",
                "train": "rtdist.train:main", "evaluate": "rtdist.evaluate:main", "generate": "rtdist.generate:main",
                "checkpoint": "rtdist.checkpoint:main", "plot_runs": "tools/plot_runs.py",
                "experiment": "tools/experiment.py", "gpu_check": "tools/gpu_check.py", "launch": "rtdist.launcher:launch",
                **{f"bench_{b}": f"tools/bench_{b}.py" for b in ("attention", "data", "generate", "memory",
                                                                  "sequence_parallel", "train")}}
_loaded = {}


class Env(dict):
    """Environment variables a row's ``make`` asks for."""


def entry_point(name: str):
    """The ``main`` function an ``ENTRY_POINTS`` value names (loaded once)."""
    if name not in _loaded:
        target = ENTRY_POINTS[name]
        if target.endswith(".py"):
            if str(REPO / "tools") not in sys.path:  # the tools import their siblings (benchlib, study)
                sys.path.insert(0, str(REPO / "tools"))
            spec = importlib.util.spec_from_file_location(f"_entry_{name}", REPO / target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            _loaded[name] = module.main
        else:
            module, _, function = target.partition(":")
            _loaded[name] = getattr(importlib.import_module(module), function)
    return _loaded[name]


# ------------------------------------------------------------------------------------------ inputs

def text(tmp: Path, rel: str = "in/a.txt", nbytes: int = 2000) -> None:
    write_files(tmp, {rel: book(1, nbytes)})


def png(path: Path, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 7, np.uint8)).save(path)


def fake_images(tmp: Path) -> None:
    write_files(tmp, {"img/a.png": b"not a png at all", "img/b.png": b"\x89PNG\r\n\x1a\n truncated"})


def binaries(tmp: Path) -> None:
    write_files(tmp, {"in/libfoo.so": b"\x7fELF" + bytes(range(256)) * 40, "in/blob.dat": b"abc\0def" * 100})


def shards(tmp: Path) -> dict:
    """Good shards at out/pg: 64-token samples, 5 per shard (several shards per split)."""
    return run([pg19(tmp / "pg19")], tmp / "out" / "pg", seq_length=64, maxcount=5)["manifest"]


def shard_path(tmp: Path, index: int = 1, split: str = "train") -> Path:
    return tmp / "out" / f"pg-{split}-{index:06d}.tar"


def edit_manifest(tmp: Path, edit) -> None:
    path = tmp / "out" / "pg-manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def damaged(tmp: Path, damage) -> None:
    """Good shards, then ``damage(bytes) -> bytes`` applied to the second train shard."""
    shards(tmp)
    path = shard_path(tmp)
    path.write_bytes(damage(path.read_bytes()))


def replaced_by(tmp: Path, dtype, seq_length: int) -> None:
    """Good shards, then the second train shard rewritten with samples of another dtype or length."""
    from rtdist.data.shards import SampleLayout, ShardWriter

    m = shards(tmp)
    entry = m["splits"]["train"]["shards"][1]
    writer = ShardWriter(tmp / "out" / "new", "train", SampleLayout(np.dtype(dtype), seq_length + 1), seq_length)
    for i in range(entry["samples"]):
        writer.write(f"x_{i:06d}", np.arange(seq_length + 1) % 200)
    writer.close()
    (tmp / "out" / "new-train-000000.tar").replace(shard_path(tmp))


def sp_failed_once(tmp: Path) -> None:
    """A first sentencepiece run that failed (vocabulary too small for the corpus) before writing any shard."""
    from rtdist.errors import DataError

    text(tmp)
    with pytest.raises(DataError, match="vocab"):
        run([tmp / "in"], tmp / "out" / "sp", tokenizer="sentencepiece", train_tokenizer=True, vocab_size=260)


def flip_token(data: bytes) -> bytes:
    out = bytearray(data)
    out[512 + 200] ^= 1
    return bytes(out)


P, I = "preprocess", "inspect"
OUT = ["--output-prefix", "out/x"]
ROWS = [
    # --- preprocess: flags checked before any work
    ("seq-length-0", text, P, ["--input", "in", *OUT, "--seq-length", "0"], "--seq-length 0: "),
    ("seq-length-negative", text, P, ["--input", "in", *OUT, "--seq-length", "-5"], "--seq-length -5: "),
    ("seq-length-not-int", text, P, ["--input", "in", *OUT, "--seq-length", "1.5"], "--seq-length: invalid int"),
    ("maxcount-0", text, P, ["--input", "in", *OUT, "--maxcount", "0"], "--maxcount 0: "),
    ("validation-fraction-1.5", text, P, ["--input", "in", *OUT, "--validation-fraction", "1.5"],
     "--validation-fraction 1.5: expected a fraction in [0, 1)"),
    ("maxsize-0", text, P, ["--input", "in", *OUT, "--maxsize", "0"], "--maxsize 0: "),
    ("maxsize-below-one-sample", text, P, ["--input", "in", *OUT, "--seq-length", "4096", "--maxsize", "4k"],
     "--maxsize 4096: "),
    ("maxsize-not-a-size", text, P, ["--input", "in", *OUT, "--maxsize", "lots"], "not a size: 'lots'"),
    ("workers-0", text, P, ["--input", "in", *OUT, "--workers", "0"], "--workers 0: "),
    ("image-size-0", text, P, ["--input", "in", *OUT, "--image-size", "0"], "--image-size 0: "),
    ("vocab-size-1", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece", "--train-tokenizer",
                               "--vocab-size", "1"], "--vocab-size 1: "),
    ("vocab-size-with-bytes", text, P, ["--input", "in", *OUT, "--vocab-size", "1000"],
     "--vocab-size 1000: only --tokenizer-type sentencepiece"),
    ("block-size-0", text, P, ["--input", "in", *OUT, "--block-size", "0"], "--block-size 0: "),
    ("tokenizer-train-bytes-0", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece",
                                          "--train-tokenizer", "--vocab-size", "400", "--tokenizer-train-bytes", "0"],
     "--tokenizer-train-bytes 0: "),
    ("unknown-flag", text, P, ["--input", "in", *OUT, "--seq-lenght", "64"], "unrecognized arguments: --seq-lenght"),
    ("missing-required", None, P, ["--input", "in"], "required: --output-prefix"),
    ("unknown-tokenizer-type", text, P, ["--input", "in", *OUT, "--tokenizer-type", "wordpiece"],
     "invalid choice: 'wordpiece'"),
    ("sentencepiece-without-model", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece"],
     "--tokenizer-model FILE or --train-tokenizer"),
    ("tokenizer-model-missing", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece",
                                          "--tokenizer-model", "nope.model"], "--tokenizer-model nope.model"),
    ("tokenizer-model-not-a-model", lambda t: (text(t), write_files(t, {"bad.model": b"junk"})), P,
     ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece", "--tokenizer-model", "bad.model"], "bad.model"),
    ("train-tokenizer-without-vocab", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece",
                                                "--train-tokenizer"], "--vocab-size"),
    ("sentencepiece-vocab-too-small", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece",
                                                "--train-tokenizer", "--vocab-size", "260"], "--vocab-size 260"),
    ("sentencepiece-retry-other-flags", sp_failed_once, P,  # the failed run wrote no shard: it blocks nothing
     ["--input", "in", "--output-prefix", "out/sp", "--tokenizer-type", "sentencepiece", "--train-tokenizer",
      "--vocab-size", "265"], "--vocab-size 265"),
    ("split-name", text, P, ["--input", "in", *OUT, "--split", "my split"], "split name 'my split'"),
    ("splits-missing-folder", lambda t: pg19(t / "pg19", splits=("train",)), P,
     ["--input", "pg19", *OUT, "--splits", "train", "test"], "no test/ folder"),
    # --- preprocess: inputs
    ("missing-input", None, P, ["--input", "nope", *OUT], "--input nope does not exist"),
    ("glob-matches-nothing", None, P, ["--input", "in/*.txt", *OUT], "matches no file"),
    ("empty-input-folder", lambda t: (t / "in").mkdir(), P, ["--input", "in", *OUT], "no usable input in in"),
    ("only-empty-files", lambda t: write_files(t, {"in/empty.txt": b""}), P, ["--input", "in", *OUT],
     "empty.txt"),
    ("all-images-bad", fake_images, P, ["--input", "img", *OUT], "a.png"),
    ("binary-only", binaries, P, ["--input", "in", *OUT], "libfoo.so"),
    ("binary-by-content", lambda t: write_files(t, {"in/notes.txt": b"abc\0def" * 100}), P,
     ["--input", "in", *OUT], "notes.txt: binary"),
    ("mixed-fake-image-and-binary", lambda t: (fake_images(t), binaries(t)), P, ["--input", "img", "in", *OUT],
     "a.png"),
    ("mixed-image-and-text", lambda t: (png(t / "in" / "p.png"), text(t)), P, ["--input", "in", *OUT],
     "p.png"),
    ("image-seq-length", lambda t: png(t / "img" / "p.png"), P,
     ["--input", "img", *OUT, "--image-size", "8", "--seq-length", "256"], "--seq-length is implied"),
    ("image-tail-pack", lambda t: png(t / "img" / "p.png"), P,
     ["--input", "img", *OUT, "--image-size", "8", "--tail", "pack"], "--tail pack"),
    ("images-of-another-size", lambda t: png(t / "img" / "p.png", 8), P, ["--input", "img", *OUT],
     "p.png: uint8[8, 8, 3]: expected uint8 RGB 64x64x3 (--image-size 8 if all images are 8x8x3)"),
    ("text-shorter-than-a-sample", lambda t: text(t, nbytes=50), P, ["--input", "in", *OUT, "--seq-length", "64"],
     "fewer than --seq-length + 1"),
    ("jsonl-without-the-key", lambda t: write_files(t, {"in/d.jsonl": '{"body": "x"}\n' * 50}), P,
     ["--input", "in", *OUT], "d.jsonl"),
    # --- preprocess: output
    ("output-prefix-under-a-file", lambda t: (text(t), write_files(t, {"some_file.txt": "x"})), P,
     ["--input", "in", "--output-prefix", "some_file.txt/x"], "some_file.txt"),
    ("output-prefix-is-a-folder", lambda t: (text(t), (t / "out").mkdir()), P,
     ["--input", "in", "--output-prefix", "out/"], "must end in a file name prefix"),
    ("output-holds-other-flags", lambda t: (text(t), run([t / "in"], t / "out" / "x", seq_length=64)), P,
     ["--input", "in", *OUT, "--seq-length", "32"], "already holds shards from different flags"),
    ("output-holds-unlisted-shards", lambda t: (text(t), write_files(t, {"out/x-train-000000.tar": b""})), P,
     ["--input", "in", *OUT], "no manifest describes"),
    # --- inspect_shards: manifests
    ("manifest-missing", None, I, ["out/pg"], "no manifest at out/pg-manifest.json"),
    ("manifest-not-json", lambda t: write_files(t, {"out/pg-manifest.json": "{not json"}), I, ["out/pg"],
     "cannot read manifest out/pg-manifest.json"),
    ("manifest-not-ours", lambda t: write_files(t, {"out/pg-manifest.json": '{"format": "other/1"}'}), I,
     ["out/pg"], "not an rtdist shard manifest"),
    ("manifest-without-splits", lambda t: (shards(t), edit_manifest(t, lambda m: m.pop("splits"))), I,
     ["out/pg"], "pg-manifest.json: 'splits' is missing"),
    ("manifest-shard-outside", lambda t: (shards(t), edit_manifest(
        t, lambda m: m["splits"]["train"]["shards"][0].update(name="../../etc/passwd"))), I, ["out/pg"],
     "'../../etc/passwd' is not a file name"),
    ("manifest-dtype-int32", lambda t: (shards(t), edit_manifest(t, lambda m: m.update(dtype="int32"))), I,
     ["out/pg"], "dtype 'int32'"),
    ("manifest-shard-listed-twice", lambda t: (shards(t), edit_manifest(t, lambda m: m["splits"]["train"][
        "shards"].append(m["splits"]["train"]["shards"][0]))), I, ["out/pg"],
     "name 'pg-train-000000.tar' is listed twice (also as splits.train.shards[0])"),
    ("manifest-shard-in-two-splits", lambda t: (shards(t), edit_manifest(t, lambda m: m["splits"]["test"][
        "shards"].append(m["splits"]["train"]["shards"][1]))), I, ["out/pg"],
     "'pg-train-000001.tar' is listed twice (also as splits.train.shards[1])"),
    ("split-missing", shards, I, ["out/pg", "--split", "tset"], "split 'tset' not in"),
    ("tokenizer-model-gone", lambda t: (shards(t), edit_manifest(t, lambda m: m["tokenizer"].update(
        type="sentencepiece", file="pg-tokenizer.model", sha256=None))), I, ["out/pg", "--verify", "off",
                                                                            "--decode", "0"],
     "pg-tokenizer.model (named in the manifest) is missing"),
    ("manifest-unknown-tokenizer", lambda t: (shards(t), edit_manifest(t, lambda m: m["tokenizer"].update(
        type="wordpiece"))), I, ["out/pg", "--verify", "off", "--decode", "0"], "unknown tokenizer type 'wordpiece'"),
    ("decode-out-of-range", shards, I, ["out/pg", "--verify", "off", "--decode", "9999"], "index 9999"),
    ("decode-negative", shards, I, ["out/pg", "--verify", "off", "--decode", "-1"],
     "argument --decode: must be an integer >= 0, got '-1'"),
    ("key-not-found", shards, I, ["out/pg", "--verify", "off", "--key", "nosuch_000000"], "'nosuch_000000'"),
    ("chars-negative", shards, I, ["out/pg", "--chars", "-1"], "argument --chars: must be an integer >= 0, got '-1'"),
    # --- inspect_shards: shards
    ("shard-missing", lambda t: (shards(t), shard_path(t).unlink()), I, ["out/pg"], "pg-train-000001.tar: missing"),
    ("shard-truncated", lambda t: damaged(t, lambda b: b[:3000]), I, ["out/pg"],
     "pg-train-000001.tar: 3000 bytes but the manifest says"),
    ("shard-truncated-quick", lambda t: damaged(t, lambda b: b[:3000]), I, ["out/pg", "--verify", "quick"],
     "pg-train-000001.tar: 3000 bytes but the manifest says"),
    ("shard-random-bytes", lambda t: damaged(t, lambda b: np.random.default_rng(0).bytes(len(b))), I,
     ["out/pg"], "pg-train-000001.tar: sample 0"),
    ("shard-random-bytes-decode", lambda t: damaged(t, lambda b: np.random.default_rng(0).bytes(len(b))), I,
     ["out/pg", "--verify", "off", "--decode", "5"], "pg-train-000001.tar: sample 0"),
    ("shard-one-token-flipped", lambda t: damaged(t, flip_token), I, ["out/pg"], "pg-train-000001.tar: sha256"),
    ("shard-int32", lambda t: replaced_by(t, np.int32, 64), I, ["out/pg"], "pg-train-000001.tar: "),
    ("shard-wrong-length", lambda t: replaced_by(t, np.uint16, 32), I, ["out/pg", "--verify", "quick"],
     "pg-train-000001.tar: sample 0 at byte 0: member size is not 258 bytes"),
    ("shard-token-out-of-range", lambda t: damaged(t, lambda b: b[:700] + b"\xff\xff" + b[702:]), I,
     ["out/pg", "--verify", "off", "--decode", "5"], "token 65535 >= vocab_size 257"),
]


# --- training, evaluation, generation
_RUN_CACHE: dict = {}


def finished_run(tmp: Path) -> Path:
    """A finished 2-step tiny run (checkpoint every step, export) copied to tmp/run, with its shards at tmp/out/pg.
    Trained once per session, in a subprocess (as users run it), with the torch engine: the rows fail before any
    engine is built (the model shape, the checkpoint files, the export), and it starts without DeepSpeed."""
    import shutil
    import subprocess
    import sys
    import tempfile
    if "dir" not in _RUN_CACHE:
        cache = Path(tempfile.mkdtemp(prefix="rtdist-bad-inputs-"))
        shards(cache)
        r = subprocess.run([sys.executable, "-m", "rtdist.train", *TINY, "--set", "data.manifest=out/pg-manifest.json",
                            "--set", "train.train_iters=2", "--set", "train.save_interval=1", "--set",
                            "train.engine=torch", "--set", "train.zero_stage=0", "--run-dir", "run"],
                           cwd=cache, capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
        assert r.returncode == 0, r.stderr[-3000:]
        _RUN_CACHE["dir"] = cache
    for name in ("out", "run"):
        shutil.copytree(_RUN_CACHE["dir"] / name, tmp / name)
    return tmp / "run"


def unexported_run(tmp: Path) -> None:
    finished_run(tmp)
    (tmp / "run" / "model.safetensors").unlink()


TINY = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", "train.seq_length=64", "--set",
        "model.window_size=16", "--set", "train.train_micro_batch_size_per_gpu=2", "--set", "data.num_workers=0"]
TR, EV, GE = "train", "evaluate", "generate"
DATA = ["--set", "data.manifest=out/pg-manifest.json"]
RUN = ["--run-dir", "run"]
ROWS += [
    ("train-config-missing", None, TR, ["--config", "nope.yaml", *RUN], "config file 'nope.yaml' does not exist"),
    ("train-config-not-yaml", lambda t: write_files(t, {"c.yaml": "model: [unclosed"}), TR,
     ["--config", "c.yaml", *RUN], "is not valid YAML"),
    ("train-unknown-key", None, TR, [*TINY, "--set", "train.lr_max=1", *RUN], "unknown key 'train.lr_max'"),
    ("train-key-typo-hint", None, TR, [*TINY, "--set", "model.windw_size=8", *RUN], "did you mean 'model.window_size'"),
    ("train-wrong-type", None, TR, [*TINY, "--set", "train.train_iters=many", *RUN],
     "train.train_iters: expected an integer"),
    ("train-log-interval-0", None, TR, [*TINY, "--set", "train.log_interval=0", *RUN], "train.log_interval must be > 0"),
    ("train-save-interval-negative", None, TR, [*TINY, "--set", "train.save_interval=-1", *RUN],
     "train.save_interval must be >= 0 (0 = off)"),
    ("train-num-workers-negative", None, TR, [*TINY, "--set", "data.num_workers=-1", *RUN],
     "data.num_workers must be >= 0"),
    ("train-lr-negative", None, TR, [*TINY, "--set", "train.lr=-1e-3", *RUN], "train.lr must be > 0"),
    ("train-dist-timeout-0", None, TR, [*TINY, "--set", "train.dist_timeout_s=0", *RUN],
     "train.dist_timeout_s must be > 0"),
    ("train-verify-typo", None, TR, [*TINY, "--set", "data.verify=fast", *RUN], "data.verify: 'fast' is not one of"),
    # streaming keys (rtdist/data/remote.py): checked before the manifest is read
    ("train-fetch-budget-over-dist-timeout", None, TR, [*TINY, *DATA, "--set", "data.fetch_budget_s=300", *RUN],
     "data.fetch_budget_s (300) must be below train.dist_timeout_s (300)"),
    ("train-request-timeout-0", None, TR, [*TINY, *DATA, "--set", "data.request_timeout_s=0", *RUN],
     "data.request_timeout_s (0) must be > 0 and at most data.fetch_budget_s"),
    ("train-storage-options-not-mapping", None, TR, [*TINY, *DATA, "--set", "data.storage_options=5", *RUN],
     "data.storage_options"),
    ("train-seq-not-divisible", None, TR, [*TINY, "--set", "train.seq_length=100", *RUN],
     "must be divisible by the local window"),
    ("train-sp-not-dividing", None, TR, [*TINY, "--set", "train.seq_length=96", "--set", "parallel.sequence_parallel_size=3", *RUN],
     "world size 1 is not divisible by parallel.sequence_parallel_size (3)"),
    ("train-torch-with-zero", None, TR, [*TINY, "--set", "train.engine=torch", "--set", "train.zero_stage=2", *RUN],
     "needs engine deepspeed or fairscale"),
    ("train-no-manifest", None, TR, [*TINY, *RUN], "data.manifest is not set"),
    ("train-manifest-missing", None, TR, [*TINY, "--set", "data.manifest=nope-manifest.json", *RUN],
     "no manifest at nope-manifest.json"),
    ("train-split-typo", shards, TR, [*TINY, *DATA, "--set", "data.train_split=trian", *RUN], "split 'trian' not in"),
    ("train-seq-longer-than-shards", shards, TR, [*TINY, *DATA, "--set", "train.seq_length=128", *RUN],
     "exceeds the shards' seq_length (64)"),
    ("train-vocab-too-small", shards, TR, [*TINY, *DATA, "--set", "model.vocab_size=100", *RUN],
     "model.vocab_size (100) is smaller than the tokenizer's vocabulary (257)"),
    ("train-truncated-second-shard", lambda t: damaged(t, lambda b: b[:3000]), TR, [*TINY, *DATA, *RUN],
     "pg-train-000001.tar: 3000 bytes but the manifest says"),
    ("train-run-dir-under-a-file", lambda t: (shards(t), write_files(t, {"f.txt": "x"})), TR,
     [*TINY, *DATA, "--run-dir", "f.txt/run"], "--run-dir f.txt/run"),
    ("train-resume-missing", shards, TR, [*TINY, *DATA, *RUN, "--resume", "runs/old/checkpoints/global_step3"],
     "--resume runs/old/checkpoints/global_step3: no such checkpoint"),
    ("train-resume-other-model", finished_run, TR, [*TINY, *DATA, "--set", "model.d_model=64", *RUN, "--resume",
                                                   "auto"], "model.d_model: 128 in the checkpoint, 64 now"),
    ("train-resume-incomplete", lambda t: (finished_run(t), (t / "run/checkpoints/global_step2/complete").unlink()),
     TR, [*TINY, *DATA, *RUN, "--resume", "run/checkpoints/global_step2"], "is not a complete checkpoint"),
    ("train-resume-corrupt", lambda t: (finished_run(t), flip(t / "run/checkpoints/global_step2/rtdist_rank0.pt")),
     TR, [*TINY, *DATA, *RUN, "--resume", "run/checkpoints/global_step2"], "rtdist_rank0.pt does not match its sha256"),
    ("train-every-checkpoint-corrupt", lambda t: (finished_run(t), [flip(p) for p in t.glob(
        "run/checkpoints/global_step*/rtdist_rank0.pt")]), TR, [*TINY, *DATA, *RUN, "--resume", "auto"],
     "every complete checkpoint in run/checkpoints is corrupt"),
    ("train-run-dir-holds-a-run", finished_run, TR, [*TINY, *DATA, *RUN],
     "--run-dir run holds an earlier run (last complete checkpoint run/checkpoints/global_step2, result.json: "
     "completed at step 2, metrics.jsonl with 2 logged steps, model.safetensors): continue it with --resume auto, or "
     "start over in a new --run-dir, or here with --overwrite"),
    ("train-run-dir-resume-none", finished_run, TR, [*TINY, *DATA, *RUN, "--resume", "none"],
     "--run-dir run holds an earlier run (last complete checkpoint run/checkpoints/global_step2"),
    ("train-run-dir-only-metrics", lambda t: (shards(t), write_files(t, {"run/metrics.jsonl": '{"step": 1}\n'})), TR,
     [*TINY, *DATA, *RUN], "holds an earlier run (no complete checkpoint, metrics.jsonl with 1 logged steps)"),
    ("train-overwrite-and-resume", finished_run, TR, [*TINY, *DATA, *RUN, "--overwrite", "--resume", "auto"],
     "--overwrite starts over from step 0 and --resume auto continues a checkpoint: give only one"),
    ("evaluate-missing-run", None, EV, ["--checkpoint", "nope"], "--checkpoint nope does not exist"),
    ("evaluate-not-exported", unexported_run, EV, ["--checkpoint", "run"],
     "its training did not finish (resume it with --resume auto)"),
    ("evaluate-split-typo", finished_run, EV, ["--checkpoint", "run", "--split", "tset"], "split 'tset' not in"),
    ("evaluate-export-corrupt", lambda t: (finished_run(t), write_files(t, {"run/model.safetensors": b"junk"})),
     EV, ["--checkpoint", "run"], "is not a readable safetensors file"),
    ("evaluate-batch-size-0", None, EV, ["--checkpoint", "run", "--batch-size", "0"],
     "argument --batch-size: must be an integer in [1, 1,048,576], got '0'"),
    ("generate-missing-run", None, GE, ["--checkpoint", "nope", "--prompt", "x"], "--checkpoint nope does not exist"),
    ("generate-missing-prompt-file", finished_run, GE, ["--checkpoint", "run", "--prompt-file", "p.txt"],
     "--prompt-file p.txt does not exist"),
    ("generate-top-p", None, GE, ["--checkpoint", "run", "--top-p", "2"],
     "argument --top-p: must be a number in (0, 1], got '2'"),
    ("generate-manifest-missing", finished_run, GE, ["--checkpoint", "run", "--manifest", "nope.json"],
     "no manifest at nope.json"),
    ("generate-sentencepiece-model-missing", lambda t: (finished_run(t), edit_manifest(
        t, lambda m: m["tokenizer"].update(type="sentencepiece", file="pg-tokenizer.model", sha256=None))), GE,
     ["--checkpoint", "run", "--prompt", "x"], "pg-tokenizer.model (named in the manifest) is missing"),
]


# --- configuration keys (through the training command: each fails in config validation, before any process group)
def cfg_row(key_value: str, expected: str, row_id: str = ""):
    return (row_id or "config-" + key_value.split("=")[0].replace(".", "-"), None, TR,
            [*TINY, "--set", key_value, *RUN], expected)


def flag_rows(entry: str, cases: list, base: tuple = (), tail: tuple = ()) -> list:
    """Rows from ``(flag, value, expected)`` for one tool (its argv: ``base``, the flag, ``tail``); an argparse
    complaint (``must be ...``, ``invalid choice``, ``'value' ...``) is expected as ``argument FLAG: <expected>``."""
    return [(f"{entry}{flag}-{value}".replace("_", "-"), None, entry, [*base, flag, value, *tail],
             f"argument {flag}: {expected}" if expected.startswith(("must be", "invalid choice", "'")) else expected)
            for flag, value, expected in cases]


INT_IN = "must be an integer in "


def wider(tmp: Path, vocab: int = 300) -> None:
    """A finished run whose manifest now says its tokenizer has ``vocab`` ids (more than the model's 257)."""
    finished_run(tmp)
    edit_manifest(tmp, lambda m: m["tokenizer"].update(vocab_size=vocab))


ROWS += [cfg_row(*row) if len(row) <= 3 else row for row in [  # (key=value, expected[, id])
    ("train-config-is-a-folder", lambda t: write_files(t, {"cfgs/a.yaml": "model: {}"}), TR, ["--config", "cfgs", *RUN],
     "config file 'cfgs' is a folder: give a YAML file (it holds a.yaml)"),
    ("train-config-not-a-mapping", lambda t: write_files(t, {"c.yaml": "- 1\n- 2\n"}), TR, ["--config", "c.yaml", *RUN],
     "must hold a mapping at the top level"),
    ("train-no-config", None, TR, [*RUN], "the following arguments are required: --config"),
    ("train-override-without-value", None, TR, [*TINY, "--set", "model", *RUN], "override 'model' must look like"),
    ("train-unknown-flag", None, TR, [*TINY, *RUN, "--epochs", "3"], "unrecognized arguments: --epochs 3"),
    ("train.seed=-1", "train.seed must be in 0..4294967295 (2^32 - 1), got -1", "config-seed-negative"),
    ("train.seed=4294967296", "train.seed must be in 0..4294967295", "config-seed-past-2-32"),
    ("train.dist_timeout_s=100000000000", "train.dist_timeout_s must be <= 10,000,000 s"),
    ("train.dist_timeout_s=-5", "train.dist_timeout_s must be > 0", "config-dist-timeout-negative"),
    ("train.startup_timeout_s=100000000000", "train.startup_timeout_s must be <= 10,000,000 s"),
    ("train.startup_timeout_s=0", "train.startup_timeout_s must be > 0", "config-startup-timeout-zero"),
    ("model.vocab_size=4294967296", "model.vocab_size must be <= 2,147,483,648"),
    ("model.d_model=1000000", "model.d_model must be <= 131,072"),
    ("model.n_layers=100000", "model.n_layers must be <= 4,096"),
    ("model.n_heads=0", "model.n_heads must be > 0"),
    ("model.num_clusters=1000000", "model.num_clusters must be <= 65,536"),
    ("model.window_size=100000000", "model.window_size must be <= 16,777,216"),
    ("model.local_window_size=0", "model.local_window_size must be > 0"),
    ("model.emb_dim=-1", "model.emb_dim must be > 0"),
    ("model.head_dim=3", "rotary positions need an even head dim, got 3"),
    ("config-embedding-too-large", None, TR, [*TINY, "--set", "model.vocab_size=1000000", "--set",
                                             "model.d_model=65536", *RUN],
     "the embedding (model.vocab_size x model.emb_dim) would be 1,000,000 x 65,536"),
    ("model.ff_mult=0.001", "model.ff_mult (0.001) x model.d_model (128) rounds to 0 feed-forward units"),
    ("model.ff_mult=100000", "model.ff_mult must be <= 1,024", "config-ff-mult-huge"),
    ("config-feed-forward-too-large", None, TR, [*TINY, "--set", "model.d_model=131072", "--set", "model.ff_mult=1024",
                                                "--set", "model.n_heads=4", *RUN],
     "the feed-forward (model.d_model x model.d_model * model.ff_mult, twice under model.ff_glu) would be"),
    ("model.init_std=.inf", "model.init_std: expected a finite number, got inf"),
    ("model.init_std=0", "model.init_std must be > 0", "config-init-std-0"),
    ("model.kmeans_ema_decay=1", "model.kmeans_ema_decay must be in [0, 1)"),
    ("model.commitment_factor=.nan", "model.commitment_factor: expected a finite number, got nan"),
    ("model.dropout=1.5", "model.dropout / model.attn_dropout must be in [0, 1)"),
    ("model.routing_layers=[5]", "model.routing_layers entry 5 is outside the 2 layers"),
    ("model.attention_type=sparse", "model.attention_type: 'sparse' is not one of"),
    ("model.loss_chunk_size=-1", "model.loss_chunk_size must be >= 0"),
    ("model.compile=maybe", "model.compile: 'maybe' is not one of"),
    ("train.weight_decay=.nan", "train.weight_decay: expected a finite number, got nan"),
    ("train.weight_decay=.inf", "train.weight_decay: expected a finite number, got inf", "config-weight-decay-inf"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0", "config-weight-decay-negative"),
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=1e999", "train.lr: expected a finite number, got inf", "config-lr-overflows"),
    ("train.min_lr=0.1", "train.min_lr (0.1) must not exceed train.lr (0.003)"),
    ("train.warmup_iters=-1", "train.warmup_iters must be >= 0"),
    ("train.adam_beta1=1", "train.adam_beta1 must be in [0, 1)"),
    ("train.adam_beta2=-0.5", "train.adam_beta2 must be in [0, 1)"),
    ("train.gradient_clipping=-1", "train.gradient_clipping must be >= 0"),
    ("train.seq_length=100000000", "train.seq_length must be <= 16,777,216"),
    ("train.seq_length=0", "train.seq_length must be > 0", "config-seq-length-0"),
    ("train.train_micro_batch_size_per_gpu=0", "train.train_micro_batch_size_per_gpu must be > 0"),
    ("train.train_micro_batch_size_per_gpu=10000000", "train.train_micro_batch_size_per_gpu must be <= 1,048,576",
            "config-micro-batch-huge"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps must be > 0"),
    ("train.train_batch_size=3", "train.train_batch_size (3) must equal"),
    ("train.train_iters=-1", "train.train_iters must be >= 0"),
    ("train.eval_iters=0", "train.eval_iters must be > 0"),
    ("train.eval_interval=-1", "train.eval_interval must be >= 0 (0 = off)"),
    ("train.zero_stage=4", "train.zero_stage must be 0..3, got 4"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be > 0"),
    ("train.checkpoint_num_layers=0", "train.checkpoint_num_layers must be > 0"),
    ("train.checkpoint_chunk_size=-1", "train.checkpoint_chunk_size must be >= 0 (0 = no chunks)"),
    ("train.checkpoint_policy=some", "train.checkpoint_policy: 'some' is not one of"),
    ("train.precision=fp16", "train.precision: 'fp16' is not one of ['fp32', 'bf16']"),
    ("train.engine=megatron", "train.engine: 'megatron' is not one of"),
    ("train.kmeans_init=kmeans", "train.kmeans_init: 'kmeans' is not one of"),
    ("data.num_workers=1000", "data.num_workers must be <= 256"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer must be >= 0"),
    ("data.shuffle_buffer=100000000", "data.shuffle_buffer must be <= 1,048,576", "config-shuffle-buffer-huge"),
    ("data.skip_corrupt=maybe", "data.skip_corrupt: expected true/false"),
    ("parallel.sequence_parallel_size=0", "parallel.sequence_parallel_size must be >= 1"),
    # deepspeed: keys that say what a train.* key says: the train key is the one to set (README, Training)
    ("deepspeed.zero_optimization={stage: 3}", "deepspeed.zero_optimization.stage (3) contradicts "
                                                      "train.zero_stage (2): set train.zero_stage only"),
    ("deepspeed.optimizer={type: Adam}", "deepspeed.optimizer would be ignored"),
    ("deepspeed.scheduler={type: WarmupLR}", "deepspeed.scheduler would be ignored"),
    ("deepspeed.train_micro_batch_size_per_gpu=8", "deepspeed.train_micro_batch_size_per_gpu (8) contradicts "
                                                          "train.train_micro_batch_size_per_gpu (2)"),
    ("deepspeed.gradient_accumulation_steps=4", "deepspeed.gradient_accumulation_steps (4) contradicts"),
    ("deepspeed.train_batch_size=64", "deepspeed.train_batch_size (64) contradicts train.train_batch_size"),
    ("deepspeed.gradient_clipping=0.5", "deepspeed.gradient_clipping (0.5) contradicts train.gradient_clipping"),
    ("deepspeed.bf16={enabled: true}", "deepspeed.bf16.enabled (True) contradicts train.precision ('fp32')"),
    ("deepspeed.fp16={enabled: true}", "deepspeed.fp16.enabled (True) contradicts train.precision ('fp32')"),
    ("deepspeed.tensorboard={enabld: true}", "unknown key 'deepspeed.tensorboard.enabld' (did you mean"),
]]

# --- launch environment variables (read by every rank before anything else)
ROWS += [
    ("env-master-port-not-int", lambda t: Env(MASTER_PORT="29500x"), TR, [*TINY, *RUN],
     "environment variable MASTER_PORT='29500x' is not an integer"),
    ("env-master-port-past-65535", lambda t: Env(MASTER_PORT="70000"), TR, [*TINY, *RUN],
     "MASTER_PORT=70000 is not a port: it must be in 1..65535"),
    ("env-master-port-0", lambda t: Env(MASTER_PORT="0"), TR, [*TINY, *RUN], "MASTER_PORT=0 is not a port"),
    ("env-rank-not-int", lambda t: Env(RANK="zero", WORLD_SIZE="1"), TR, [*TINY, *RUN],
     "environment variable RANK='zero' is not an integer"),
    ("env-world-size-not-int", lambda t: Env(RANK="0", WORLD_SIZE="2.0"), TR, [*TINY, *RUN],
     "environment variable WORLD_SIZE='2.0' is not an integer"),
    ("env-local-rank-not-int", lambda t: Env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="gpu0"), TR, [*TINY, *RUN],
     "environment variable LOCAL_RANK='gpu0' is not an integer"),
    ("env-local-rank-negative", lambda t: Env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="-1"), TR, [*TINY, *RUN],
     "LOCAL_RANK=-1 must be >= 0"),
    ("env-rank-outside-world", lambda t: Env(RANK="2", WORLD_SIZE="2"), TR, [*TINY, *RUN],
     "RANK=2 is outside a world of WORLD_SIZE=2 (ranks 0..1"),
    ("env-world-size-0", lambda t: Env(RANK="0", WORLD_SIZE="0"), TR, [*TINY, *RUN], "outside a world of WORLD_SIZE=0"),
    ("env-rank-empty", lambda t: Env(RANK="", WORLD_SIZE="1"), TR, [*TINY, *RUN],
     "RANK and WORLD_SIZE must both be set to integers"),
    ("env-slurm-procid-not-int", lambda t: Env(SLURM_PROCID="x", SLURM_NTASKS="2", SLURM_STEP_ID="0"), TR,
     [*TINY, *RUN], "environment variable SLURM_PROCID='x' is not an integer"),
    ("env-slurm-ntasks-not-int", lambda t: Env(SLURM_PROCID="0", SLURM_NTASKS="two", SLURM_STEP_ID="0"), TR,
     [*TINY, *RUN], "environment variable SLURM_NTASKS='two' is not an integer"),
    ("env-openmpi-rank-not-int", lambda t: Env(OMPI_COMM_WORLD_RANK="r0", OMPI_COMM_WORLD_SIZE="2",
                                                MASTER_ADDR="127.0.0.1"), TR, [*TINY, *RUN],
     "environment variable OMPI_COMM_WORLD_RANK='r0' is not an integer"),
    ("env-pmi-size-not-int", lambda t: Env(PMI_RANK="0", PMI_SIZE="", MASTER_ADDR="127.0.0.1"), TR, [*TINY, *RUN],
     "PMI_RANK and PMI_SIZE must both be set to integers"),
    ("env-evaluate-master-port", lambda t: Env(MASTER_PORT="-1"), EV, ["--checkpoint", "run"],
     "MASTER_PORT=-1 is not a port"),
]

# --- evaluate and generate: every flag (parse errors need no run; the others a finished one)
ROWS += [
    ("evaluate-no-checkpoint", None, EV, [], "the following arguments are required: --checkpoint"),
    ("evaluate-manifest-missing", finished_run, EV, ["--checkpoint", "run", "--manifest", "nope-manifest.json"],
     "no manifest at nope-manifest.json"),
    ("evaluate-tokenizer-wider-than-model", wider, EV, ["--checkpoint", "run"],
     "the tokenizer of out/pg-manifest.json has 300 ids, the model of run only 257 (model.vocab_size)"),
    ("evaluate-unknown-flag", None, EV, ["--checkpoint", "run", "--splt", "test"], "unrecognized arguments: --splt"),
    ("generate-no-checkpoint", None, GE, ["--prompt", "x"], "the following arguments are required: --checkpoint"),
    ("generate-prompt-and-prompt-file", None, GE, ["--checkpoint", "run", "--prompt", "x", "--prompt-file", "p.txt"],
     "not allowed with argument"),
    ("generate-checkpoint-not-exported", unexported_run, GE, ["--checkpoint", "run"],
     "its training did not finish (resume it with --resume auto)"),
]

CHECKPOINT = ("--checkpoint", "run")  # the flags fail before the run is looked at
ROWS += flag_rows(EV, [
    ("--batch-size", "99999999", INT_IN + "[1, 1,048,576], got '99999999'"), ("--batch-size", "two", "must be an integer"),
    ("--max-batches", "0", "must be an integer >= 1, got '0'"), ("--stride", "0", "must be an integer >= 1, got '0'"),
    ("--seq-length", "0", INT_IN + "[1, "),
], CHECKPOINT)
ROWS += [
    ("evaluate-stride-past-the-window", finished_run, EV, ["--checkpoint", "run", "--stride", "100000"],
     "--stride 100000 must be in 1..64 (the sequence length)"),
    ("evaluate-preset-unknown-key", lambda t: write_files(t, {"e.yaml": "strid: 4\n"}), EV,
     ["--checkpoint", "run", "--config", "e.yaml"], "--config e.yaml: unknown key(s) ['strid']"),
]
ROWS += flag_rows(GE, [
    ("--temperature", "-0.5", "must be a number in [0, 1,000,000], got '-0.5'"),
    ("--temperature", "nan", "must be a number in [0, 1,000,000], got 'nan'"),
    ("--top-p", "0", "must be a number in (0, 1], got '0'"), ("--top-p", "nan", "must be a number in (0, 1]"),
    ("--top-k", "-1", INT_IN + "[0, 2,147,483,648], got '-1'"),
    ("--max-new-tokens", "-1", INT_IN + "[0, 16,777,216], got '-1'"), ("--max-new-tokens", "1e12", "must be an integer"),
    ("--num-samples", "0", INT_IN + "[1, 65,536], got '0'"), ("--seed", "-3", "must be an integer"),
    ("--device", "gpu", "'gpu' is not a device: use cpu, cuda or cuda:N"),
    ("--device", "cuda:99", "'cuda:99' is not available here"),
    ("--device", "meta", "'meta': only cpu, cuda[:N] and mps devices are supported"),
], CHECKPOINT)

# --- python -m rtdist.checkpoint
CK = "checkpoint"
ROWS += [
    ("checkpoint-no-command", None, CK, [], "the following arguments are required: command"),
    ("checkpoint-unknown-command", None, CK, ["show", "run"], "invalid choice: 'show'"),
    ("checkpoint-info-no-path", None, CK, ["info"], "the following arguments are required: path"),
    ("checkpoint-info-missing", None, CK, ["info", "nope"], "nope: no complete checkpoint there"),
    ("checkpoint-info-marker-junk", lambda t: fake_checkpoints(t / "checkpoints", "invalid-json"), CK,
     ["info", "checkpoints/global_step4"], "checkpoint checkpoints/global_step4: its 'complete' marker cannot be read"),
    ("checkpoint-info-every-marker-junk", lambda t: (fake_checkpoints(t / "a" / "checkpoints", "empty"), write_files(
        t, {"a/checkpoints/global_step2/complete": b"\xff"})), CK, ["info", "a"],
     "no checkpoint there has a readable 'complete' marker (global_step4, global_step2)"),
]

# --- preprocess and inspect_shards: the flags the rows above leave out
ROWS += [
    ("named-pipe-only", lambda t: os.mkfifo(t / "pipe.txt"), P, ["--input", "pipe.txt", *OUT],
     "special_files_skipped: 1 (pipe.txt: a named pipe, not read)"),
    ("input-type-unknown", text, P, ["--input", "in", *OUT, "--input-type", "pdf"], "invalid choice: 'pdf'"),
    ("json-keys-empty", text, P, ["--input", "in", *OUT, "--json-keys", ""], "--json-keys ['']: expected one or more"),
    ("tail-unknown", text, P, ["--input", "in", *OUT, "--tail", "keep"], "invalid choice: 'keep'"),
    ("sp-model-type-unknown", text, P, ["--input", "in", *OUT, "--sp-model-type", "wordpiece"],
     "invalid choice: 'wordpiece'"),
    ("seq-length-huge", text, P, ["--input", "in", *OUT, "--seq-length", "100000000"],
     "--seq-length 100000000: must be in 1..16,777,216"),
    ("workers-huge", text, P, ["--input", "in", *OUT, "--workers", "100000"], "--workers 100000: must be in 1..1024"),
    ("block-size-huge", text, P, ["--input", "in", *OUT, "--block-size", "1T"], "--block-size 1099511627776: "),
    ("image-size-huge", text, P, ["--input", "in", *OUT, "--image-size", "100000"], "--image-size 100000: "),
    ("vocab-size-huge", text, P, ["--input", "in", *OUT, "--tokenizer-type", "sentencepiece", "--train-tokenizer",
                                  "--vocab-size", "9999999999"], "--vocab-size 9999999999: must be <= 2,147,483,648"),
    ("maxcount-not-int", text, P, ["--input", "in", *OUT, "--maxcount", "ten"], "--maxcount: invalid int value"),
    ("splits-bad-name", lambda t: pg19(t / "pg19"), P, ["--input", "pg19", *OUT, "--splits", "train", "dev set"],
     "split name 'dev set'"),
    ("decode-not-int", shards, I, ["out/pg", "--verify", "off", "--decode", "first"],
     "argument --decode: must be an integer >= 0, got 'first'"),
    ("verify-unknown", shards, I, ["out/pg", "--verify", "fast"], "invalid choice: 'fast'"),
    ("inspect-no-manifest-argument", None, I, [], "the following arguments are required: manifest"),
]

# --- preprocess: corpora as they ship (compressed, parquet, URLs, input lists, Hugging Face tokenizers)
def parquet_without_text(tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "pq").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "body": ["a b", "c d"]}), tmp / "pq" / "d.parquet")


def zstd_garbage(tmp: Path) -> None:
    write_files(tmp, {"in/bad.jsonl.zst": b"\x28\xb5\x2f\xfd" + b"\x07" * 300})


def hf_tokenizer(tmp: Path) -> None:
    from data_helpers import train_hf_tokenizer

    text(tmp)
    train_hf_tokenizer(tmp / "tok" / "tokenizer.json", [book(1, 2000)], 300, eod="<|im_end|>")


ROWS += [
    ("corrupt-zst", zstd_garbage, P, ["--input", "in", *OUT], "bad.jsonl.zst: corrupt zstd data"),
    ("parquet-without-the-column", parquet_without_text, P, ["--input", "pq", *OUT],
     "d.parquet: no column 'text' (it has id, body): name one with --text-column"),
    ("parquet-column-not-text", parquet_without_text, P, ["--input", "pq", *OUT, "--text-column", "id"],
     "d.parquet: column 'id' is int64, not text"),
    ("parquet-as-text", parquet_without_text, P, ["--input", "pq", *OUT, "--input-type", "text"],
     "d.parquet is a parquet file: --input-type text would tokenize its raw bytes"),
    ("input-list-missing", None, P, ["--input-list", "nope.txt", *OUT], "--input-list nope.txt: cannot be read"),
    ("input-list-empty", lambda t: write_files(t, {"list.txt": "# none\n"}), P, ["--input-list", "list.txt", *OUT],
     "--input-list list.txt names no input"),
    ("no-input-at-all", None, P, OUT, "one of --input or --input-list is required"),
    ("storage-options-not-json", text, P, ["--input", "in", *OUT, "--storage-options", "anon=true"],
     "--storage-options: not JSON: 'anon=true'"),
    ("storage-options-not-an-object", text, P, ["--input", "in", *OUT, "--storage-options", "[1]"],
     "expected a JSON object"),
    ("hf-without-model", text, P, ["--input", "in", *OUT, "--tokenizer-type", "hf"],
     "--tokenizer-type hf needs --tokenizer-model path/to/tokenizer.json"),
    ("hf-model-not-a-tokenizer", lambda t: (text(t), write_files(t, {"tok.json": "{}"})), P,
     ["--input", "in", *OUT, "--tokenizer-type", "hf", "--tokenizer-model", "tok.json"],
     "cannot load Hugging Face tokenizer tok.json"),
    ("hf-without-eod", hf_tokenizer, P, ["--input", "in", *OUT, "--tokenizer-type", "hf", "--tokenizer-model",
                                         "tok/tokenizer.json"], "no end-of-document token"),
    ("hf-eod-token-unknown", hf_tokenizer, P, ["--input", "in", *OUT, "--tokenizer-type", "hf", "--tokenizer-model",
                                               "tok/tokenizer.json", "--eod-token", "</s>"],
     "--eod-token '</s>' is not in it"),
    ("hf-train-tokenizer", text, P, ["--input", "in", *OUT, "--tokenizer-type", "hf", "--train-tokenizer"],
     "--train-tokenizer : only --tokenizer-type sentencepiece trains"),
    ("eod-token-with-bytes", text, P, ["--input", "in", *OUT, "--eod-token", "</s>"],
     "--eod-token </s>: only --tokenizer-type hf uses it"),
]

# --- tools/plot_runs.py, tools/experiment.py, tools/gpu_check.py
PR, EX, GC = "plot_runs", "experiment", "gpu_check"


def logged_run(tmp: Path) -> None:
    write_files(tmp, {"r/metrics.jsonl": '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'})


ROWS += [
    ("plot-runs-missing-run", None, PR, ["nope"], "run directory nope does not exist"),
    ("plot-runs-no-run", None, PR, [], "the following arguments are required: RUN_DIR"),
    ("plot-runs-smooth-1", logged_run, PR, ["r", "--smooth", "1"], "--smooth 1.0: must be in [0, 1)"),
    ("plot-runs-smooth-nan", logged_run, PR, ["r", "--smooth", "nan"], "--smooth nan: must be in [0, 1)"),
    ("plot-runs-labels-count", logged_run, PR, ["r", "--labels", "a", "b"], "--labels has 2 names for 1 runs"),
    ("plot-runs-out-not-an-image", logged_run, PR, ["r", "--out", "r.txt"], "--out r.txt: name an image file"),
    ("plot-runs-out-a-folder", logged_run, PR, ["r", "--out", "r"], "--out r: name an image file"),
    ("experiment-min-lr-above-lr", None, EX, ["--set", "text.train.min_lr=1"],
     "text.train.min_lr must be in [0, lr = 0.003], got 1.0"),
    ("experiment-seed-negative", None, EX, ["--set", "seed=-1"], "seed must be in 0..4294967295"),
    ("experiment-lr-nan", None, EX, ["--set", "retrieval.train.lr=.nan"], "retrieval.train.lr: expected a finite number"),
    ("experiment-betas", None, EX, ["--set", "text.train.betas=[0.9]"], "text.train.betas must be two numbers in [0, 1)"),
    ("experiment-threads-0", None, EX, ["--set", "threads=0"], "threads must be in 1..4096, got 0"),
    ("experiment-unknown-task", None, EX, ["--tasks", "vision"], "tasks: 'vision' is not one of"),
    ("experiment-unknown-variant", None, EX, ["--variants", "sparse"], "unknown variant(s) ['sparse']"),
    ("experiment-config-folder", lambda t: (t / "cfg").mkdir(), EX, ["--config", "cfg"], "config file 'cfg' is a folder"),
    ("experiment-config-missing", None, EX, ["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    ("experiment-bad-override", None, EX, ["--set", "seed"], "override 'seed' must look like key.sub=value"),
    ("gpu-check-unknown-check", None, GC, ["--only", "train_zero4"], "--only train_zero4: no such check"),
    ("gpu-check-unknown-child", None, GC, ["--child", "nope"], "argument --child: invalid choice: 'nope'"),
    ("gpu-check-unknown-flag", None, GC, ["--fast"], "unrecognized arguments: --fast"),
]

# --- tools/bench_*.py: every flag that takes a length, count, size, time or device (and the model they make)
BA, BD, BG, BM, BS, BT = ("bench_attention", "bench_data", "bench_generate", "bench_memory",
                          "bench_sequence_parallel", "bench_train")


# The ranges the bench tools' flags share (tools/benchlib.py), each with a value just outside it.
SEQ_R, WIDTH_R, LAYERS_R, LOCAL_R = ("0", "[1, 16,777,216]"), ("0", "[1, 131,072]"), ("0", "[1, 4,096]"), ("-1", "[0, 4,096]")
VOCAB_R, BATCH_R, COUNT_R, CLUSTERS_R = ("1", "[2, 2,147,483,648]"), ("0", "[1, 1,048,576]"), ("0", "[1, 1,000,000]"), \
    ("0", "[1, 65,536]")


def outside(**flags) -> list:
    """``(flag, value, expected)`` cases, one per ``flag_name=(value just outside, the integer range)``."""
    return [("--" + name.replace("_", "-"), value, f"{INT_IN}{rng}, got '{value}'")
            for name, (value, rng) in flags.items()]


ROWS += flag_rows(BA, outside(seq_lengths=SEQ_R, d_model=WIDTH_R, depth=LAYERS_R, heads=LAYERS_R, local_heads=LOCAL_R,
                              window=SEQ_R, clusters=("-1", "[0, 65,536]"), vocab=VOCAB_R, batch=BATCH_R,
                              threads=LAYERS_R, repeats=COUNT_R, rounds=COUNT_R, profile=("-1", "[0, 16,777,216]"),
                              profile_rows=COUNT_R) + [
    ("--seq-lengths", "4k", INT_IN + "[1, 16,777,216]"), ("--timeout", "0", "must be a number in (0, 10,000,000]"),
    ("--timeout", "nan", "must be a number in (0, 10,000,000], got 'nan'"),
    ("--device", "gpu", "'gpu' is not a device"), ("--device", "cuda:99", "'cuda:99' is not available here"),
    ("--attention", "sparse", "invalid choice: 'sparse'"),
    ("--local-heads", "9", "--local-heads (9) must be between 0 and --heads (8)"),
    ("--d-model", "100", "--d-model (100) must be divisible by --heads (8)"),
    ("--window", "1000", "the sequence length (4096) must be divisible by the local window (--window"),
])
ROWS += flag_rows(BD, outside(mb=("0", "[1, 1,048,576]"), workers=("0", "[1, 1,024]"), seq_length=SEQ_R,
                              maxcount=COUNT_R, micro_batch=BATCH_R, loader_workers=("-1", "[0, 256]"),
                              train_steps=COUNT_R, repeat=COUNT_R) + [
    ("--loader-batches", "-1", "must be an integer >= 0"), ("--corpus", "nope", "--corpus nope is not a folder"),
    ("--resume-at", "2", "must be a number in [0, 1]"),
    ("--model-config", "nope.yaml", "--model-config nope.yaml with --seq-length 8192: config file 'nope.yaml' does not"),
])
ROWS += flag_rows(BD, [("--storage-option", "endpoint", "--storage-option 'endpoint': expected KEY=VALUE")],
                  ("--url", "http://127.0.0.1:9/x-manifest.json"))
ROWS += flag_rows(BD, [("--url", "http://127.0.0.1:9/x-manifest.json",
                        "--peers needs an s3:// --url (MosaicML streaming reads no http)")], ("--peers",))
ROWS += flag_rows(BD, [("--seq-length", "100", "--model-config "
                                               f"{REPO / 'configs' / 'tiny.yaml'} with --seq-length 100: train.seq_length "
                                               "(100) must be divisible by the local window")],
                  ("--model-config", str(REPO / "configs" / "tiny.yaml")))
ROWS += flag_rows(BG, outside(context=SEQ_R, new_tokens=("1", "[2, 16,777,216]"), rerun_tokens=COUNT_R,
                              d_model=WIDTH_R, n_layers=LAYERS_R, n_heads=LAYERS_R, n_local_heads=LOCAL_R, window=SEQ_R,
                              clusters=CLUSTERS_R, vocab=VOCAB_R, threads=LAYERS_R,
                              seed=("-1", "[0, 18,446,744,073,709,551,615]")) + [
    ("--device", "tpu", "'tpu' is not a device"),
    ("--rerun-tokens", "200", "--rerun-tokens 200 exceeds --new-tokens 128"),
    ("--n-local-heads", "9", "--n-local-heads (9) must be between 0 and --n-heads (8)"),
])
ROWS += flag_rows(BM, outside(chunk_size=("-1", "[0, 16,777,216]"), d_model=WIDTH_R, depth=LAYERS_R, heads=LAYERS_R,
                              head_dim=("0", "[1, 16,384]"), local_heads=LOCAL_R, window=SEQ_R, local_window=SEQ_R,
                              clusters=CLUSTERS_R, vocab=VOCAB_R, batch=BATCH_R, threads=LAYERS_R,
                              world_size=BATCH_R) + [
    ("--seq-lengths", "0", "--seq-lengths: '0' must be in [1, 16,777,216]"),
    ("--seq-lengths", "lots", "--seq-lengths: 'lots' is not a number"),
    ("--sp", "0", "--sp: '0' must be in [1, 16,777,216]"), ("--max-seq", "full", "--max-seq 'full': expected"),
    ("--max-seq", "dense=4k", "--max-seq 'dense=4k': expected attention=length pairs"),
    ("--fit-min", "x", "--fit-min: 'x' is not a number"), ("--ff-mult", "0", "must be a number in (0, 1,024]"),
    ("--routing-layers", "last", "--routing-layers 'last': expected 'all' or layer indices"),
    ("--routing-layers", "7", "--routing-layers entry 7 is outside the"),
    ("--device", "tpu", "invalid choice: 'tpu'"), ("--budget-gb", "-1", "must be a number in (0, 1,048,576]"),
    ("--max-mem-gb", "0", "must be a number in (0, 1,048,576]"), ("--timeout", "0", "must be a number in (0, "),
    ("--zero-stage", "4", "invalid choice: 4"), ("--attention", "sparse", "--attention 'sparse' is not one of"),
    ("--checkpointing", "some", "--checkpointing 'some' is not none, selective or full"),
    ("--config", "nope.yaml", "config file 'nope.yaml' does not exist"),
    ("--replot", "nope.json", "No such file or directory (nope.json)"),
    ("--heads", "3", "--d-model (64) must be divisible by --heads (3)"),
], ("--quick", "--estimate-only"))
ROWS += flag_rows(BS, outside(seq_lengths=SEQ_R, sp=LAYERS_R, d_model=WIDTH_R, depth=LAYERS_R, heads=LAYERS_R,
                              window=SEQ_R, threads=("-1", "[0, 4,096]")) + [
    ("--local-heads", "9", "--local-heads (9) must be between 0 and --heads"),
    ("--clusters", "0", "--clusters must be > 0, got 0"), ("--timeout", "-5", "must be a number in (0, 10,000,000]"),
    ("--sp", "3", "--seq-lengths 8192 is not divisible by --sp 3 x --window 256"),
])
ROWS += flag_rows(BT, outside(seq_length=SEQ_R, nproc=("0", "[1, 1,024]"), steps=("1", "[2, 1,000,000]")) + [
    ("--seq-length", "100", "--models tiny with --seq-length 100: --seq-length (100) must be divisible"),
    ("--models", "huge", "invalid choice: 'huge'"), ("--zero", "4", "invalid choice: 4"),
    ("--checkpointing", "maybe", "invalid choice: 'maybe'"), ("--corpus-mb", "0", "must be a number in (0, 1,048,576]"),
])

LA, GPUS = "launch", "--num_accelerators: " + INT_IN + "[1, 1,024], got"  # every row fails while planning
ROWS += flag_rows(LA, [
    ("--num_gpus", "0", GPUS + " '0' (or -1: one per GPU)"), ("--num_gpus", "-5", GPUS + " '-5'"),
    ("--num_gpus", "two", GPUS + " 'two'"), ("--num_gpus", "100000", GPUS + " '100000'"),
    ("--num_gpus", "1000", "--num_gpus 1000 would start 1000 processes on this machine's"),
    ("--num_nodes", "0", INT_IN + "[1, 100,000], got '0' (or -1: every host)"),
    ("--num_nodes", "2", "--num_nodes 2 needs a hostfile or a SLURM allocation"),
    ("--master_port", "0", INT_IN + "[1, 65,535], got '0'"), ("--master_port", "70000", INT_IN + "[1, 65,535]"),
    ("--ssh_port", "-1", INT_IN + "[1, 65,535]"), ("--node_rank", "-3", INT_IN + "[0, 100,000], got '-3'"),
    ("--master_addr", "no-such-host.invalid", "--master_addr / MASTER_ADDR 'no-such-host.invalid' does not resolve"),
    ("--launcher", "slurmx", "invalid choice: 'slurmx'"),
    ("--env-file", "missing.env", "environment file missing.env does not exist (--env-file)"),
    ("-H", "missing-hostfile", "missing-hostfile"),
], tail=("--", "true")) + [
    ("launch-no-command", None, LA, ["--num_gpus", "1"], "no command to launch (nothing after '--')"),
]


def flip(path: Path, offset: int = 600) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def files_state(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def whole_tar(path: Path) -> bool:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if len(tar.extractfile(member).read()) != member.size:
                    return False
        return True
    except (tarfile.TarError, OSError, EOFError):
        return False


def assert_one_clean_error(tmp: Path, before: dict, code: int, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and expected in lines[0], err
    changed = [p for p, state in files_state(tmp).items() if before.get(p) != state]
    assert not [p for p in changed if p.name.endswith((".tmp", "-manifest.json"))], changed
    assert all(whole_tar(p) for p in changed if p.suffix == ".tar"), changed


@pytest.mark.parametrize("make, entry, args, expected", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_ends_in_one_clear_error_line(tmp_path, monkeypatch, capsys, make, entry, args, expected):
    monkeypatch.chdir(tmp_path)
    made = make(tmp_path) if make is not None else None
    for name, value in (made.items() if isinstance(made, Env) else ()):
        monkeypatch.setenv(name, value)
    before = files_state(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    capsys.readouterr()
    code = cli_main(entry_point(entry), args)
    assert_one_clean_error(tmp_path, before, code, capsys.readouterr().err, expected)
    # in-process, a stop handler left behind would outlive the command (a later pool could not be terminated)
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == handlers


def test_a_disk_filling_up_while_preprocessing_leaves_only_whole_shards(tmp_path, monkeypatch, capsys):
    import subprocess

    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                      capture_output=True).returncode:
        pytest.skip("needs root to mount a 2 MB tmpfs")
    try:
        write_files(tmp_path, {f"in/{i}.txt": book(i, 400_000) for i in range(8)})  # 3.2 MB into 2 MB
        for workers in ("1", "2"):  # 1: the main process writes; 2: workers write shards straight from the files
            before = files_state(tmp_path)
            code = cli_main(entry_point(P), ["--input", "in", "--output-prefix", f"small/w{workers}",
                                             "--seq-length", "1024", "--maxcount", "100", "--workers", workers])
            err = capsys.readouterr().err
            assert_one_clean_error(tmp_path, before, code, err, "No space left on device")
            assert f"small/w{workers}-train-" in err  # the file that did not fit
            assert list(small.glob(f"w{workers}-train-*.tar")), "the disk filled before the first shard"
            for p in small.glob("*"):
                p.unlink()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_help_says_that_input_type_text_forces_binary_files_through(capsys):
    with pytest.raises(SystemExit):
        entry_point(P)(["--help"])
    assert "binary" in capsys.readouterr().out


# --- checkpoints whose 'complete' marker itself is damaged
MARKER_DAMAGE = {"invalid-json": b'{"step": 4, "files": {', "flipped-bytes": b'{"step": 4\xff\xfe\x00}', "empty": b"",
                 "a-list": b"[1, 2]", "files-not-a-mapping": b'{"step": 4, "files": [1]}', "folder": None}


def fake_checkpoints(ckpt_dir: Path, damage: str) -> None:
    """Complete checkpoints at steps 2 and 4 (one small file each, as the marker lists it); step 4's marker then
    damaged as ``MARKER_DAMAGE[damage]`` says (None: the marker is a folder)."""
    import hashlib
    for step in (2, 4):
        d = ckpt_dir / f"global_step{step}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(bytes(step))
        files = {"model.pt": {"bytes": step, "sha256": hashlib.sha256(bytes(step)).hexdigest()}}
        (d / "complete").write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    (ckpt_dir / "latest").write_text("global_step4")
    marker = ckpt_dir / "global_step4" / "complete"
    marker.unlink()
    marker.mkdir() if MARKER_DAMAGE[damage] is None else marker.write_bytes(MARKER_DAMAGE[damage])


@pytest.mark.parametrize("damage", MARKER_DAMAGE)
def test_resume_auto_skips_a_checkpoint_whose_marker_is_unreadable_for_the_previous_one(tmp_path, damage):
    from rtdist import checkpoint as ckpt
    fake_checkpoints(tmp_path / "checkpoints", damage)
    said = []
    assert ckpt.resolve_resume(tmp_path / "checkpoints", "auto", log=said.append).name == "global_step2"
    assert said[0].startswith(f"warning: checkpoint {tmp_path / 'checkpoints' / 'global_step4'} is corrupt (its "
                              f"'complete' marker ") and said[0].endswith("skipping it")
    assert said[1] == "--resume auto: resuming from global_step2 instead"
    with pytest.raises(ckpt.CheckpointError, match="global_step4 is corrupt: its 'complete' marker"):
        ckpt.resolve_resume(tmp_path / "checkpoints", "global_step4")
    ckpt._clean_staging(tmp_path / "checkpoints")  # the next save's clean-up keeps it: a corrupt checkpoint, no crash
    assert ckpt.complete_steps(tmp_path / "checkpoints") == [2, 4]


@pytest.mark.parametrize("damage", MARKER_DAMAGE)
def test_checkpoint_info_names_an_unreadable_marker_in_one_line(tmp_path, capsys, damage):
    from rtdist import checkpoint as ckpt
    fake_checkpoints(tmp_path / "checkpoints", damage)
    assert ckpt.main(["info", str(tmp_path / "checkpoints" / "global_step4")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint ") and "'complete' marker" in err[0], err
    assert ckpt.main(["info", str(tmp_path)]) == 0  # a run directory: the newest readable one, the other named
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"warning: checkpoint {tmp_path / 'checkpoints' / 'global_step4'}: its 'complete' "
                             f"marker ") and out[0].endswith("--resume auto skips it")
    assert out[1].startswith(f"checkpoint {tmp_path / 'checkpoints' / 'global_step2'}: complete")
