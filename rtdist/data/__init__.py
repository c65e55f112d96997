"""Data for rtdist: corpora -> tokenized webdataset tar shards + manifest, and a streaming loader.

``ShardLoader`` (torch) is imported lazily so that preprocessing workers stay light.
"""

from .demo import build_demo_corpus
from ..errors import CorruptShardError, DataError
from .pipeline import preprocess
from .shards import (ShardReader, ShardWriter, check_shards, load_manifest, manifest_shards, shard_problem,
                     verify_shards)
from .tokenizers import (BytesTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer,
                         train_sentencepiece)

__all__ = ["BytesTokenizer", "CorruptShardError", "DataError", "HFTokenizer", "SentencePieceTokenizer", "ShardLoader",
           "ShardReader", "ShardWriter", "Tokenizer", "build_demo_corpus", "build_tokenizer", "check_shards",
           "load_manifest", "manifest_shards", "preprocess", "shard_problem", "train_sentencepiece", "verify_shards"]


def __getattr__(name):
    if name == "ShardLoader":
        from .loader import ShardLoader

        return ShardLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
