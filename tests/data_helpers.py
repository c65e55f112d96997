"""Small corpora and shard sets for the data tests (every test makes its own data; nothing is downloaded)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pytest` without an installed rtdist

import numpy as np  # noqa: E402

from rtdist.data import BytesTokenizer, preprocess  # noqa: E402
from rtdist.data.shards import SampleLayout, ShardWriter, build_manifest, write_json_atomic  # noqa: E402


def write_files(root: Path, files: dict) -> Path:
    """``files`` maps relative paths to str (UTF-8) or bytes."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def book(seed: int, nbytes: int) -> str:
    """Deterministic text with multi-byte characters and newlines."""
    rng = np.random.default_rng(seed)
    words = ["the", "routing", "transformer", "naïve", "café", "日本語", "λόγος", "sparse", "attention", "\n"]
    out, size = [], 0
    while size < nbytes:
        w = words[rng.integers(len(words))]
        out.append(w)
        size += len(w.encode()) + 1
    return " ".join(out)


def pg19(root: Path, sizes=None, splits=("train", "validation", "test")) -> Path:
    """A PG-19 layout: ``{split}/<book_id>.txt``; ``sizes`` maps split -> list of book sizes in bytes."""
    sizes = sizes or {"train": [3000, 200, 5000, 1200], "validation": [900], "test": [1100]}
    files = {}
    for k, s in enumerate(splits):
        for i, n in enumerate(sizes[s]):
            files[f"{s}/{100 + i}.txt"] = book(10 * k + i, n)
    return write_files(root, files)


def run(inputs, prefix, **kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda *a: None)
    return preprocess([str(i) for i in inputs], str(prefix), **kw)


def shard_set(prefix: Path) -> dict:
    """name -> bytes of everything a run wrote under ``prefix`` (for byte-identity checks)."""
    return {p.name: p.read_bytes() for p in sorted(prefix.parent.glob(prefix.name + "-*"))}


def stream_of(manifest: dict, split: str) -> np.ndarray:
    """The token stream a split's samples cover, undoing the one-token overlap of consecutive samples."""
    from rtdist.data.shards import ShardReader

    reader, parts = ShardReader(manifest), []
    for shard in manifest["splits"][split]["shards"]:
        for i in range(shard["samples"]):
            tokens = reader.read(shard, i)[1]
            parts.append(tokens if not parts else tokens[1:])
    reader.close()
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def uneven_shards(root: Path, counts, seq_length: int = 8) -> Path:
    """A split whose shards hold ``counts`` samples; sample ``shard{s}_{i:06d}`` has tokens all equal to a
    running id modulo 256. Returns the manifest path."""
    prefix = root / "u"
    writer = ShardWriter(prefix, "train", SampleLayout(np.dtype(np.uint16), seq_length + 1), seq_length,
                         maxcount=10 ** 6)
    n = 0
    for s, count in enumerate(counts):
        for i in range(count):
            writer.write(f"shard{s}_{i:06d}", np.full(seq_length + 1, n % 256, np.uint16))
            n += 1
        writer.next_shard()
    manifest = build_manifest(prefix.name, seq_length, BytesTokenizer().spec(), {"train": {"shards": writer.close()}})
    path = root / "u-manifest.json"
    write_json_atomic(path, manifest)
    return path


def train_hf_tokenizer(path: Path, texts, vocab_size: int = 400, eod: str = "<|endoftext|>") -> Path:
    """A byte-level BPE ``tokenizer.json`` trained here by the ``tokenizers`` library (GPT-2's scheme: exact round
    trip of any text), with ``eod`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
