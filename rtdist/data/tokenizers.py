"""Tokenizers: ``bytes`` (256 byte ids + EOD, exact round trip), ``sentencepiece`` (trained here or loaded) and
``hf`` (a Hugging Face ``tokenizer.json``, loaded with the ``tokenizers`` library; nothing is downloaded).

``spec()`` is what goes into the manifest; ``build_tokenizer(manifest)`` rebuilds the tokenizer from it and checks
the model file against the recorded sha256.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fileio import atomic_path, sha256_file
from .shards import fetch_beside, is_remote, manifest_dir, os_error_at, token_dtype

# Text tokenizers read bytes with errors="replace"; this handler also counts the replacements (per process).
_replaced = [0]


def _count_replace(err: UnicodeDecodeError):
    _replaced[0] += 1
    return "\ufffd", err.end


codecs.register_error("rtdist_replace", _count_replace)


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with U+FFFD for invalid bytes; returns (text, number of replacements)."""
    before = _replaced[0]
    text = data.decode("utf-8", "rtdist_replace")
    return text, _replaced[0] - before


class Tokenizer:
    name: str
    vocab_size: int
    eod_id: int
    takes_bytes: bool  # encode() wants the raw bytes (no decoding, nothing replaced)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids, eod_text: str = "") -> str:
        """Text of ``ids``; EOD tokens become ``eod_text``."""
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError


class BytesTokenizer(Tokenizer):
    """Ids 0..255 are the bytes themselves, EOD = 256, vocab_size 257. Nothing to train, nothing lost."""

    name, vocab_size, eod_id, takes_bytes = "bytes", 257, 256, True

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        return np.frombuffer(data, np.uint8).astype(np.uint16)

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes()

    def decode(self, ids, eod_text: str = "") -> str:
        ids = np.asarray(ids)
        pieces = np.split(ids, np.flatnonzero(ids == self.eod_id))  # each piece after the first starts with EOD
        texts = [self.decode_bytes(p).decode("utf-8", "replace") for p in pieces]
        return eod_text.join(texts)

    def spec(self) -> dict:
        return {"type": "bytes", "vocab_size": self.vocab_size, "eod_id": self.eod_id, "file": None, "sha256": None}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; EOD is its ``</s>`` (eos) id. Models trained by ``train_sentencepiece`` round-trip
    text exactly (identity normalisation, no dummy prefix, byte fallback, newline as its own piece)."""

    name, takes_bytes = "sentencepiece", False

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot load sentencepiece model {self.path}: {' '.join(str(e).split())[:200]}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        if self.eod_id < 0:
            raise DataError(f"sentencepiece model {self.path} has no eos piece to use as EOD (eos_id=-1): "
                            "train it with eos_id >= 0 (tools/preprocess.py --train-tokenizer does)")

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = decode_text(text)[0]
        return np.asarray(self.sp.encode(text), dtype=self.dtype)

    def decode(self, ids, eod_text: str = "") -> str:
        ids = [int(i) for i in ids]
        out, piece = [], []
        for i in ids + [self.eod_id]:
            if i == self.eod_id:
                out.append(self.sp.decode(piece))
                piece = []
            else:
                piece.append(i)
        return eod_text.join(out)

    def spec(self) -> dict:
        return {"type": "sentencepiece", "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "file": self.path.name, "sha256": sha256_file(self.path)}


# End-of-document tokens looked for in a tokenizer.json, in this order, when neither --eod-token nor a
# tokenizer_config.json next to it names one (GPT-2/NeoX/Qwen, Llama 3, Llama 2/Mistral/T5, Gemma)
HF_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (BPE, WordPiece, Unigram...; the fast tokenizers' one-file format). Texts
    are encoded without the special tokens its post-processor would add (BOS/EOS are not document text); EOD is
    ``eod_token``, or else the ``eos_token`` of a ``tokenizer_config.json`` next to the file, or else the first of
    ``HF_EOD_CANDIDATES`` in its vocabulary."""

    name, takes_bytes = "hf", False

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self.tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises its own Exception subclass with a serde message
            raise DataError(f"cannot load Hugging Face tokenizer {self.path}: {' '.join(str(e).split())[:200]} "
                            "(expected a tokenizer.json)") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eod_token = eod_token or self._eod_from_files()
        eod = self.tok.token_to_id(self.eod_token) if self.eod_token else None
        if eod is None:
            said = f"--eod-token {self.eod_token!r} is not in it" if self.eod_token else (
                f"none of {', '.join(HF_EOD_CANDIDATES)} is in it")
            raise DataError(f"Hugging Face tokenizer {self.path}: no end-of-document token ({said}): pass "
                            "--eod-token with one of its special tokens")
        self.eod_id = eod
        # ids above the largest one the vocabulary uses would not fit the recorded vocab_size
        self.vocab_size = max(self.vocab_size, eod + 1)

    def _eod_from_files(self) -> str | None:
        config = self.path.with_name("tokenizer_config.json")
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token") if config.is_file() else None
        except (OSError, ValueError, AttributeError):
            eos = None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and self.tok.token_to_id(eos) is not None:
            return eos
        return next((t for t in HF_EOD_CANDIDATES if self.tok.token_to_id(t) is not None), None)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = decode_text(text)[0]
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def decode(self, ids, eod_text: str = "") -> str:
        out, piece = [], []
        for i in [int(i) for i in ids] + [self.eod_id]:
            if i == self.eod_id:
                out.append(self.tok.decode(piece, skip_special_tokens=False))
                piece = []
            else:
                piece.append(i)
        return eod_text.join(out)

    def spec(self) -> dict:
        return {"type": "hf", "vocab_size": self.vocab_size, "eod_id": self.eod_id, "eod_token": self.eod_token,
                "file": self.path.name, "sha256": sha256_file(self.path)}


def _lines(texts):
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(texts, model_path: str | os.PathLike, vocab_size: int, model_type: str = "unigram",
                        num_threads: int = 1, seed: int = 0) -> SentencePieceTokenizer:
    """Train a SentencePiece model on the lines of ``texts`` (an iterable of str) and write it atomically to
    ``model_path``. The same texts and arguments give the same model bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
            # exact round trip: keep text as is, spaces and newlines included
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, byte_fallback=True, user_defined_symbols=["\n"],
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, hard_vocab_limit=False, max_sentence_length=1 << 16,
            num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise DataError(_training_failure(str(e), vocab_size, model_type)) from None
    try:
        with atomic_path(Path(model_path), suffix=".tmp") as tmp:
            tmp.write_bytes(model.getvalue())
    except OSError as e:
        raise os_error_at(e, Path(f"{model_path}.tmp")) from None
    return SentencePieceTokenizer(model_path)


def _training_failure(message: str, vocab_size: int, model_type: str) -> str:
    """sentencepiece's error (a C++ assertion) as one line that says what to change."""
    small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:
        return (f"--vocab-size {vocab_size} is too small for this corpus: sentencepiece needs at least "
                f"{small.group(2)} (256 byte pieces, 3 special pieces and one per distinct character)")
    if "sentences_.empty()" in message:
        return "sentencepiece found no text to train on: the training split's files hold no non-blank line"
    detail = " ".join(message.split())[:300]
    return f"sentencepiece training (--vocab-size {vocab_size}, --sp-model-type {model_type}) failed: {detail}"


def build_tokenizer(manifest_or_spec: dict, base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer a manifest (or a ``spec()`` dict) describes. Model files are looked up next to the manifest
    (or in ``base_dir``) and must match the recorded sha256."""
    spec = manifest_or_spec.get("tokenizer", manifest_or_spec)
    where = manifest_or_spec.get("manifest_path", "the manifest")
    if spec["type"] == "bytes":
        return BytesTokenizer()
    if spec["type"] in ("sentencepiece", "hf"):
        if not isinstance(spec.get("file"), str) or Path(spec["file"]).name != spec["file"]:
            raise DataError(f"{where}: tokenizer.file {spec.get('file')!r} does not name a model file next to it; "
                            "re-run tools/preprocess.py")
        if base_dir is None and "manifest_path" in manifest_or_spec and is_remote(manifest_or_spec):
            base_dir = fetch_beside(manifest_or_spec, spec["file"]).parent  # a manifest at a URL
        if base_dir is None:
            base_dir = manifest_dir(manifest_or_spec) if "manifest_path" in manifest_or_spec else "."
        path = Path(base_dir) / spec["file"]
        if not path.exists():
            raise DataError(f"tokenizer model {path} (named in the manifest) is missing")
        tok = (SentencePieceTokenizer(path) if spec["type"] == "sentencepiece"
               else HFTokenizer(path, spec.get("eod_token")))
        if spec.get("vocab_size") is not None and tok.vocab_size != spec["vocab_size"]:
            raise DataError(f"tokenizer {path} has {tok.vocab_size} ids, {where} says "
                            f"{spec['vocab_size']}: the shards were written with another tokenizer (re-run "
                            "tools/preprocess.py, or put back the file it copied there)")
        if spec.get("sha256") and sha256_file(path) != spec["sha256"]:
            raise DataError(f"tokenizer model {path} does not match the manifest's sha256 "
                            f"{spec['sha256'][:12]}..: the shards were written with another model")
        if tok.eod_id != spec.get("eod_id", tok.eod_id):
            raise DataError(f"tokenizer {path}: end-of-document id {tok.eod_id}, the manifest says {spec['eod_id']}")
        return tok
    raise DataError(f"{where}: unknown tokenizer type {spec['type']!r} (known: bytes, sentencepiece, hf)")
