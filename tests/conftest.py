"""Fixtures shared by several test modules."""
import importlib
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a second path to something the default run already covers (real "
                            "mpirun, the same-shape sbatch resubmission, tool dry runs, aliases of a tested policy, engine cases and "
                            "config rows another default test covers); "
                            "`make test` leaves them out, `make test-all` runs them")


@pytest.fixture
def tool(monkeypatch):
    """``tool("bench_memory")`` imports a module of tools/ with tools/ first on sys.path, as ``python tools/X.py``
    has it, so that the tools' imports of their sibling modules (``benchlib``, ``study``) resolve; sys.path is
    restored after the test."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return importlib.import_module


@pytest.fixture(scope="session")
def manifest(tmp_path_factory):
    """A 1 MB local corpus (build_demo_corpus) preprocessed into 64-token byte shards; the manifest's path.
    Tests only read it."""
    from rtdist.data import build_demo_corpus, preprocess
    d = tmp_path_factory.mktemp("data")
    build_demo_corpus(d / "corpus", max_bytes=1 << 20, book_bytes=64 << 10)
    return preprocess([str(d / "corpus")], str(d / "shards" / "demo"), seq_length=64, progress=False,
                      log=lambda *a, **k: None)["manifest_path"]
