"""The node's shard cache (data.cache_dir, data.cache_limit_gb) against real servers on 127.0.0.1 (nginx, moto's S3
server): the same batches as without it, a second epoch served from disk, one download per shard when processes
want it at once, the limit held with two ranks sharing the folder, a corrupted object fetched again once and named, a
shard damaged once in transit fetched again and read right."""

import multiprocessing as mp
import re
import threading
import time

import pytest
from data_helpers import uneven_shards
from object_servers import DamagingServer, MotoServer, Nginx
from test_data_remote import BUCKET, MEMBER, batches, corrupt_copy, loader, s3_options, same

from rtdist.config import load_config
from rtdist.data import CorruptShardError, check_shards, load_manifest
from rtdist.data.cache import ShardCache, cache_usage, cached_name
from rtdist.data.remote import RemoteOptions, options_from_config, store_for
from rtdist.data.shards import shard_location
from rtdist.errors import ConfigError

COUNTS = [150, 40, 210, 100]  # shards of 150-220 KiB (1 KiB members, the tar end padded to 10 KiB records)


def sizes(manifest_path):
    """(largest shard, all shards) in bytes."""
    shards = load_manifest(manifest_path)["splits"]["train"]["shards"]
    return max(s["bytes"] for s in shards), sum(s["bytes"] for s in shards)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return uneven_shards(tmp_path_factory.mktemp("shards"), COUNTS, seq_length=64)


@pytest.fixture(scope="module")
def nginx(local, tmp_path_factory):
    server = Nginx(local.parent, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def cached(folder, limit=10 ** 6, **kw):
    return RemoteOptions(cache_dir=str(folder), cache_limit_bytes=limit, **kw)


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def shard_files(folder):
    return sorted(p.name for p in folder.glob("*.shard"))


def test_with_a_cache_the_batches_are_those_without_it_and_the_next_epoch_fetches_nothing(local, nginx, tmp_path):
    url = f"{nginx.url}/u-manifest.json"
    folder = tmp_path / "cache"
    first = loader(url, 0, 1, workers=0, remote=cached(folder))
    assert same(batches(first), batches(loader(local, 0, 1, workers=0)))
    # the first epoch range-reads (up to RANGE_BYTES of each shard, more than these small shards hold) while each
    # shard downloads once in the background: at most twice the shards' bytes
    wait_for(lambda: len(shard_files(folder)) == len(COUNTS))
    total = sizes(local)[1]
    assert total <= store_for(cached(folder)).bytes - local.stat().st_size <= 2 * total
    manifest = load_manifest(url)
    assert shard_files(folder) == sorted(cached_name(s) for s in manifest["splits"]["train"]["shards"])
    assert not list(folder.glob("*.tmp"))
    # another process (two workers here; another rank alike) reads every sample from the node's copies
    for rank in range(2):
        again = loader(url, rank, 2, workers=2, remote=cached(folder))
        assert same(batches(again), batches(loader(local, rank, 2)))
        assert again.stats["fetched_bytes"] == 0 and again.stats["requests"] == 0, again.stats


def test_a_mid_epoch_resume_with_a_cold_cache_fetches_little_before_its_first_batch(local, nginx, tmp_path):
    url = f"{nginx.url}/u-manifest.json"
    straight = batches(loader(local, 0, 1, workers=1))
    state = loader(local, 0, 1, workers=1).state_dict() | {"epoch": 0, "position": 60 * 4}
    resumed = loader(url, 0, 1, workers=1, remote=cached(tmp_path / "cache"))
    resumed.load_state_dict(state)
    got = batches(resumed, 1)
    # range reads serve the first batch; the background download of its shard may add at most that shard
    assert resumed.stats["fetched_bytes"] <= (16 + 4) * MEMBER + 64 * 1024 + sizes(local)[0], resumed.stats
    assert same(got + batches(resumed), straight[60:])


def test_a_cache_limit_below_the_largest_shard_or_an_unwritable_folder_is_one_error_at_start(local, nginx, tmp_path):
    url = f"{nginx.url}/u-manifest.json"
    with pytest.raises(ConfigError, match=r"data.cache_limit_gb \(0.0002\) is below the largest shard of .*"
                                          r"\(u-train-000002.tar, 0.00022528 GB\): data.cache_dir .* could never "
                                          r"hold it; raise data.cache_limit_gb to at least 0.001, or unset"):
        load_manifest(url, cached(tmp_path / "cache", limit=200_000))
    cfg = load_config([], [f"data.cache_dir={tmp_path / 'c2'}", "data.cache_limit_gb=0.0001"])
    with pytest.raises(ConfigError, match=r"data.cache_limit_gb \(0.0001\) is below the largest shard"):
        load_manifest(url, options_from_config(cfg))
    with pytest.raises(ConfigError, match=r"data.cache_limit_gb must be > 0"):
        load_config([], ["data.cache_limit_gb=-1"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"data.cache_dir {tmp_path / 'file'}: cannot write there"):
        batches(loader(url, 0, 1, workers=0, remote=cached(tmp_path / "file")))


def _want_shard(url, shard, folder, barrier, out):
    """One process asking the cache for ``shard`` at the same moment as another: (downloads, bytes fetched)."""
    store = store_for(RemoteOptions())
    cache = ShardCache(folder, 10 ** 6, store)
    barrier.wait()
    path = cache.download(url, shard).result()
    if path is None:  # the other process holds the shard's lock: its copy appears when complete
        wait_for(lambda: (folder / cached_name(shard)).exists())
    out.put((cache.downloaded, store.bytes))


def test_a_shard_wanted_by_two_processes_at_once_is_downloaded_once(local, nginx, tmp_path):
    manifest = load_manifest(f"{nginx.url}/u-manifest.json")
    shard = manifest["splits"]["train"]["shards"][2]
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_want_shard, args=(shard_location(manifest, shard), shard, tmp_path, barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert sorted(n for n, _ in results) == [0, 1] and sum(b for _, b in results) == shard["bytes"], results
    assert (tmp_path / cached_name(shard)).read_bytes() == (local.parent / shard["name"]).read_bytes()


def test_temporary_files_of_a_process_that_died_mid_download_are_reclaimed(local, nginx, tmp_path):
    """A killed process leaves NAME.PID.tmp (its locks die with it): the next download of that shard removes it, and
    one of another shard is evicted when its space is needed."""
    manifest = load_manifest(f"{nginx.url}/u-manifest.json")
    small, large = (manifest["splits"]["train"]["shards"][i] for i in (1, 2))
    largest, _ = sizes(local)
    cache = ShardCache(tmp_path, largest + 25 * MEMBER, store_for(RemoteOptions()))
    own = tmp_path / f"{cached_name(large)}.999999.tmp"
    other = tmp_path / f"{cached_name(small)}.999998.tmp"
    own.write_bytes(b"\0" * 1000)
    other.write_bytes(b"\0" * small["bytes"])  # with the large shard's reservation, more than the limit
    path = cache.download(shard_location(manifest, large), large).result(timeout=60)
    assert path == tmp_path / cached_name(large) and path.read_bytes() == (local.parent / large["name"]).read_bytes()
    assert not own.exists() and not other.exists() and cache_usage(tmp_path) == large["bytes"]


def _rank(url, folder, limit, rank, epochs, out):
    """A rank reading ``epochs`` epochs through the shared cache (in its own process, whose download threads live
    across epochs): its batches and the shards it downloaded."""
    from rtdist.data.cache import _CACHES
    got = []
    ld = loader(url, rank, 2, workers=0, remote=cached(folder, limit))
    for epoch in range(epochs):
        ld.set_epoch(epoch)
        got.append(batches(ld))
    out.put((rank, got, sum(c.downloaded for c in _CACHES.values())))


def test_two_ranks_sharing_a_cache_smaller_than_their_shards_stay_within_its_limit(local, nginx, tmp_path):
    """Ranks read different shards within an epoch and each other's in the next: the folder holds at most two of
    the four shards, so downloads evict the least recently used ones nobody has open; a consistent snapshot of the
    folder's size, taken every few milliseconds, never passes the limit."""
    epochs = 2
    largest, total = sizes(local)
    url, folder, limit = f"{nginx.url}/u-manifest.json", tmp_path / "cache", largest + 160 * MEMBER
    assert limit < total
    folder.mkdir()
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], cache_usage(folder))
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    ctx = mp.get_context("spawn")  # two ranks: processes of their own, as a launcher starts them
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(url, folder, limit, r, epochs, out)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        results, downloads = {}, 0
        for _ in procs:
            rank, got, n = out.get(timeout=120)
            results[rank], downloads = got, downloads + n
        for p in procs:
            p.join(10)
    finally:
        done.set()
        watcher.join()
    assert 0 < peak[0] <= limit, (peak[0], limit)
    assert downloads >= 3, downloads  # room for two shards at a time: the third one evicted one of them
    for rank in range(2):
        for epoch in range(epochs):
            want = loader(local, rank, 2, workers=0)
            want.set_epoch(epoch)
            assert same(results[rank][epoch], batches(want)), (rank, epoch)
    assert cache_usage(folder) <= limit and not list(folder.glob("*.tmp"))


@pytest.fixture(scope="module")
def moto(local):
    server = MotoServer()
    server.upload_dir(BUCKET, local.parent, "pg/")
    yield server
    server.stop()


def test_a_corrupted_object_is_downloaded_again_once_then_named_with_both_hashes(local, moto, tmp_path):
    url = corrupt_copy(moto, "cachetok", 7 * MEMBER + 512 + 128 + 10)  # a token byte: only the sha256 sees it
    options = s3_options(moto)
    manifest = load_manifest(url, options)
    shard = manifest["splits"]["train"]["shards"][0]
    store = store_for(options)
    cache = ShardCache(tmp_path / "cache", 10 ** 6, store)
    before = store.bytes
    with pytest.raises(CorruptShardError, match=rf"shard s3://{BUCKET}/cachetok/u-train-000000.tar: downloaded twice "
                                                rf"into data.cache_dir, sha256 ([0-9a-f]{{64}}) then \1, but the "
                                                rf"manifest says {shard['sha256']}"):
        cache.download(shard_location(manifest, shard), shard).result(timeout=60)
    assert store.bytes - before == 2 * shard["bytes"]  # fetched again once, not more
    assert not list((tmp_path / "cache").glob("*.shard")) and not list((tmp_path / "cache").glob("*.tmp"))
    # through the loader: the shard's reads end in that error (or the range reads' own sha256 check)
    with pytest.raises(CorruptShardError, match=rf"s3://{BUCKET}/cachetok/u-train-000000.tar: .*sha256"):
        batches(loader(url, 0, 1, workers=0, shuffle=False,
                       remote=RemoteOptions(s3_options(moto).storage_options, cache_dir=str(tmp_path / "c2"),
                                            cache_limit_bytes=10 ** 6)))


def test_a_shard_damaged_on_its_first_download_and_right_on_the_second_is_read_right(local, tmp_path):
    """The server sends one damaged copy of a shard (a token byte: only the sha256 sees it) to its first download,
    then the right bytes: the cache fetches it again and keeps the second copy, and the reader's batches are those
    of the local files, with no error."""
    name = "u-train-000000.tar"
    server = DamagingServer(local.parent, damaged={name}, offset=7 * MEMBER + 512 + 128 + 10)
    folder = tmp_path / "cache"
    try:
        got = batches(loader(f"{server.url}/u-manifest.json", 0, 1, workers=0, shuffle=False, remote=cached(folder)))
        wait_for(lambda: len(shard_files(folder)) == len(COUNTS))
    finally:
        server.stop()
    assert same(got, batches(loader(local, 0, 1, workers=0, shuffle=False)))
    assert server.whole_gets[name] == 2  # the damaged download, then the one kept
    shard = load_manifest(local)["splits"]["train"]["shards"][0]
    assert (folder / cached_name(shard)).read_bytes() == (local.parent / name).read_bytes()
    assert not list(folder.glob("*.tmp"))


@pytest.mark.slow  # two 2-rank training jobs (~2 min on 2 cores)
def test_two_rank_training_through_a_shared_cache_has_the_losses_of_local_files(manifest, tmp_path):
    """data.cache_dir from the command line reaches every rank's loader workers: the same losses as local files,
    and the node's cache holds the shards the run read, within data.cache_limit_gb."""
    from pathlib import Path

    from test_train_cli import losses, run, train_cmd
    steps = ["train.train_iters=6"]
    local = run(train_cmd(2, manifest, tmp_path / "local", *steps))
    assert local.returncode == 0, local.stderr[-3000:]
    server = Nginx(Path(manifest).parent, tmp_path / "nginx")
    try:
        cache = tmp_path / "cache"
        streamed = run(train_cmd(2, f"{server.url}/{Path(manifest).name}", tmp_path / "http", *steps,
                                 f"data.cache_dir={cache}", "data.cache_limit_gb=0.05"))
    finally:
        server.stop()
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert losses(tmp_path / "http") == pytest.approx(losses(tmp_path / "local"), abs=1e-5)
    assert list(cache.glob("*.shard")) and cache_usage(cache) <= 0.05e9 and not list(cache.glob("*.tmp"))


def test_a_preprocessed_shard_is_uploaded_as_soon_as_it_is_complete_and_the_manifest_last(moto, tmp_path):
    """ShardUploader (what tools/preprocess.py --output-prefix s3://... runs beside preprocessing) puts each shard
    up once its final name appears, before the next one is written; publish_shards then skips the shards already up
    and uploads the manifest last."""
    import numpy as np

    from rtdist.data.shards import SampleLayout, ShardUploader, ShardWriter, build_manifest, publish_shards, \
        write_json_atomic
    from rtdist.data import BytesTokenizer
    client = moto.client()
    client.create_bucket(Bucket="early")
    options = s3_options(moto)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "e-train-000000.tar").write_bytes(b"a previous run's shard")  # older than the uploader: never put up
    lines = []
    uploader = ShardUploader(staging / "e", "s3://early/pg/e", options, interval_s=0.05, log=lines.append)
    writer = ShardWriter(staging / "e", "train", SampleLayout(np.dtype(np.uint16), 9), 8, maxcount=3)
    keys = lambda: [o["Key"] for o in client.list_objects_v2(Bucket="early").get("Contents", [])]  # noqa: E731
    for i in range(6):
        writer.write(f"k{i}", np.full(9, i, np.uint16))
        if i == 3:  # the first shard is complete (the writer started the second): it goes up now
            wait_for(lambda: keys() == ["pg/e-train-000000.tar"])
    shards = writer.close()
    manifest = staging / "e-manifest.json"
    write_json_atomic(manifest, build_manifest("e", 8, BytesTokenizer().spec(), {"train": {"shards": shards}}))
    uploaded = uploader.close()
    assert sorted(uploaded) == ["e-train-000000.tar", "e-train-000001.tar"] and "pg/e-manifest.json" not in keys()
    lines.clear()
    url = publish_shards(manifest, "s3://early/pg/e", options, log=lines.append, uploaded=uploaded)
    assert not any(line.startswith("uploaded") for line in lines), lines  # nothing put up twice
    assert sorted(keys()) == ["pg/e-manifest.json", "pg/e-train-000000.tar", "pg/e-train-000001.tar"]
    check_shards(load_manifest(url, options), mode="full")


@pytest.mark.slow  # the demo's training, evaluation and generation (~1 min on 2 cores)
def test_the_demo_trains_evaluates_and_generates_from_a_url_through_a_cache(tmp_path):
    """make demo DATA_URL=... (tools/demo.py --data-url): every stage after the shards runs from the URL."""
    import subprocess
    import sys
    from pathlib import Path

    from rtdist.data import build_demo_corpus, preprocess
    build_demo_corpus(tmp_path / "corpus", max_bytes=2 << 20)
    preprocess([str(tmp_path / "corpus")], str(tmp_path / "shards" / "demo"), seq_length=8192, progress=False,
               log=lambda *a, **k: None)
    server = Nginx(tmp_path / "shards", tmp_path / "nginx")
    try:
        r = subprocess.run([sys.executable, "tools/demo.py", "--out", str(tmp_path / "out"), "--steps", "2",
                            "--new-tokens", "20", "--data-url", f"{server.url}/demo-manifest.json",
                            "--data-cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600,
                           cwd=Path(__file__).resolve().parents[1])
    finally:
        server.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"corpus +given .*\n +shards +given .*\n +train +ok .*\n +evaluate +ok .*\n +generate +ok",
                     r.stdout), r.stdout[-2000:]
    assert len(list((tmp_path / "cache").glob("*.shard"))) == 2  # the train and validation shards
