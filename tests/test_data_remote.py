"""Shards streamed from real servers on 127.0.0.1 (moto's S3 server, with and without credential checks, nginx over
HTTP, a GCS emulator, a pipe: command): the same batches as local files, exact resume on any layout fetching only
what it needs, bounded and named faults, on every rank."""

import re
import threading
import time

import numpy as np
import pytest
from data_helpers import uneven_shards
from object_servers import GcsEmulator, MotoServer, Nginx

from rtdist.data import CorruptShardError, ShardLoader, check_shards, load_manifest
from rtdist.data.remote import RemoteError, RemoteOptions, permanent_cause, store_for
from rtdist.data.shards import BLOCK

COUNTS = [150, 40, 210, 100]  # 500 samples of 65 uint16 tokens: 1 KiB members, shards of 40-210 KiB
MEMBER = 1024
BUCKET = "rtdist-test"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return uneven_shards(root, COUNTS, seq_length=64)


@pytest.fixture(scope="module")
def moto(local):
    server = MotoServer()
    server.upload_dir(BUCKET, local.parent, "pg/")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nginx(local, tmp_path_factory):
    server = Nginx(local.parent, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def s3_options(moto, **kw):
    return RemoteOptions({"endpoint_url": moto.endpoint, "key": "testing", "secret": "testing"}, **kw)


def batches(loader, n=None):
    out = []
    for tokens, keys in loader:
        out.append((keys, tokens.numpy().copy()))
        if n is not None and len(out) == n:
            break
    return out


def same(a, b):
    return len(a) == len(b) and all(ka == kb and np.array_equal(ta, tb) for (ka, ta), (kb, tb) in zip(a, b))


def loader(where, rank=0, world=2, workers=2, **kw):
    kw.setdefault("shuffle_buffer", 16)
    return ShardLoader(where, "train", 4, rank, world, num_workers=workers, seed=3, with_keys=True, **kw)


@pytest.mark.parametrize("source", ["s3", "http", "pipe"])
def test_two_ranks_streaming_a_url_read_exactly_the_batches_of_the_local_files(local, moto, nginx, source):
    url, remote = {"s3": (f"s3://{BUCKET}/pg/u-manifest.json", s3_options(moto)),
                   "http": (f"{nginx.url}/u-manifest.json", None),
                   "pipe": (f"pipe:cat {local}", None)}[source]
    for rank in range(2):
        streamed = loader(url, rank, remote=remote)
        assert same(batches(streamed), batches(loader(local, rank)))
        assert streamed.stats["fetched_bytes"] > 0


def test_s3_endpoint_and_credentials_come_from_the_aws_environment(local, moto, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    assert same(batches(loader(f"s3://{BUCKET}/pg/u", workers=0)), batches(loader(local, workers=0)))


@pytest.mark.parametrize("layout", [dict(world=2, workers=2), dict(world=1, workers=1)])
def test_a_mid_epoch_resume_continues_exactly_and_fetches_about_a_member_per_sample_it_needs(local, nginx, layout):
    url = f"{nginx.url}/u-manifest.json"
    straight = [batches(loader(local, r)) for r in range(2)]
    interrupted = loader(url, 0, 2)
    batches(interrupted, 20)
    state = interrupted.state_dict()
    resumed = [loader(url, r, layout["world"], layout["workers"]) for r in range(layout["world"])]
    for r in resumed:
        r.load_state_dict(state)
    first = [batches(r, 1) for r in resumed]
    # the first batch needs 4 samples per rank (shuffle buffer refill on the same layout: <= 16 per worker)
    per_rank_bound = (16 * 2 + 4) * MEMBER + 2 * 64 * 1024
    assert all(r.stats["fetched_bytes"] <= per_rank_bound for r in resumed), [r.stats for r in resumed]
    rest = [f + batches(r) for f, r in zip(first, resumed)]
    global_order = lambda runs, start: [k for j in range(start, len(runs[0])) for run in runs  # noqa: E731
                                        for k in run[j][0]]
    want = global_order(straight, 20)
    got = [k for j in range(len(rest[0])) for run in rest for k in run[j][0]]
    assert got == want[:len(got)] and len(want) - len(got) < 4 * layout["world"]


def test_a_server_down_for_seconds_mid_epoch_changes_nothing(local, nginx):
    url = f"{nginx.url}/u-manifest.json"
    want = batches(loader(local, 0, 1, workers=1, shuffle=False))
    streamed = loader(url, 0, 1, workers=1, shuffle=False, remote=RemoteOptions(budget_s=20, timeout_s=5))
    got, it = [], iter(streamed)
    for tokens, keys in it:
        got.append((keys, tokens.numpy().copy()))
        if len(got) == 3:  # inside the first shard: the next ones are fetched while the server is down
            nginx.stop()
            threading.Timer(2.0, nginx.start).start()
            t0 = time.monotonic()
    assert same(got, want)
    assert time.monotonic() - t0 >= 1.5  # it did wait for the server


def test_a_server_gone_for_good_ends_in_one_error_naming_the_url_within_the_budget(local, nginx):
    url = f"{nginx.url}/u-manifest.json"
    streamed = loader(url, 0, 1, workers=1, remote=RemoteOptions(budget_s=3, timeout_s=1))
    nginx.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=rf"reading {nginx.url}/u-train-\d{{6}}\.tar: .*still failing after "
                                              r"\d+ tries over 3 s \(data.fetch_budget_s\)"):
            batches(streamed)
        assert 3 <= time.monotonic() - t0 < 3 + 1 + 3  # the whole budget, one request's timeout, worker start
    finally:
        nginx.start()


def test_a_stalled_server_is_cut_by_the_request_timeout_and_named(local, nginx):
    streamed = loader(f"{nginx.url}/u-manifest.json", 0, 1, workers=0, remote=RemoteOptions(budget_s=2, timeout_s=1))
    nginx.freeze()  # accepts connections (the kernel does), never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=rf"{nginx.url}/u-train-\d{{6}}\.tar: .*[Tt]imeout"):
            batches(streamed)
        assert time.monotonic() - t0 < 2 + 1 + 2
    finally:
        nginx.thaw()


def test_a_missing_object_a_missing_bucket_and_a_wrong_endpoint_each_end_in_one_line_naming_it(local, moto):
    client = moto.client()
    client.copy_object(Bucket=BUCKET, Key="gone/u-manifest.json", CopySource=f"{BUCKET}/pg/u-manifest.json")
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=rf"s3://{BUCKET}/gone/u-train-\d{{6}}.tar \(endpoint {moto.endpoint}\): "
                                          r"not found \(404\)"):
        batches(loader(f"s3://{BUCKET}/gone/u", workers=0, remote=s3_options(moto)))
    with pytest.raises(RemoteError, match=r"s3://no-such-bucket/u-manifest.json .*not found"):
        load_manifest("s3://no-such-bucket/u", s3_options(moto))
    assert time.monotonic() - t0 < 5  # not retried: retrying cannot fix them
    wrong = RemoteOptions({"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}, budget_s=1, timeout_s=1)
    with pytest.raises(RemoteError, match=r"s3://x-bucket/u-manifest.json \(endpoint http://127.0.0.1:9\): .*still "
                                          r"failing .* is the server up and the endpoint right"):
        load_manifest("s3://x-bucket/u", wrong)


@pytest.fixture(scope="module")
def moto_iam(local):
    """A second moto server that checks every request's credentials against its IAM users (MotoServer's
    iam_auth), holding the shards uploaded with its user's key."""
    server = MotoServer(iam_auth=True)
    server.upload_dir(BUCKET, local.parent, "pg/")
    yield server
    server.stop()


def test_bad_credentials_end_at_once_in_one_line_naming_the_url_and_the_settings_to_check(local, moto_iam,
                                                                                           monkeypatch):
    """A wrong secret (from data.storage_options) and an unknown key (from the environment): each ends at once, not
    after the retry budget, in one line naming the URL, the key and where it was set. A whole-object read starts
    with a HEAD, whose refusal has no body (on S3 too), so the manifest's line says 403; a shard's ranged GET
    carries S3's error code."""
    url = f"s3://{BUCKET}/pg/u-manifest.json"
    key, secret = moto_iam.key, moto_iam.secret
    right = RemoteOptions({"endpoint_url": moto_iam.endpoint, "key": key, "secret": secret})
    assert same(batches(loader(url, 0, 1, workers=0, remote=right)), batches(loader(local, 0, 1, workers=0)))
    # a long budget: an error that came from retrying would take it all
    wrong_secret = RemoteOptions({"endpoint_url": moto_iam.endpoint, "key": key, "secret": secret + "x"},
                                 budget_s=30)
    hint = rf"check the access key {key} and its secret \(data.storage_options key/secret; [^\n]+\), and the " \
           r"bucket's permissions for that key"
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as refused:
        loader(url, 0, 1, workers=0, remote=wrong_secret)
    assert time.monotonic() - t0 < 2
    assert re.fullmatch(rf"reading {url} \(endpoint {moto_iam.endpoint}\): access denied \(403: Forbidden\): {hint}",
                        str(refused.value)), str(refused.value)
    shard = f"s3://{BUCKET}/pg/u-train-000000.tar"
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as refused:
        store_for(wrong_secret).read_range(shard, 0, MEMBER)
    assert time.monotonic() - t0 < 2
    assert re.fullmatch(rf"reading {shard} \(endpoint {moto_iam.endpoint}\): access denied \(SignatureDoesNotMatch: "
                        rf"The request signature we calculated does not match [^\n]+\): {hint}", str(refused.value))
    # a key the server does not know, from the environment (as a node's job script would set it)
    for k, v in {"AWS_ENDPOINT_URL": moto_iam.endpoint, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000",
                 "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    unknown = RemoteOptions(budget_s=30)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as refused:
        load_manifest(f"s3://{BUCKET}/pg/u", unknown)
    with pytest.raises(RemoteError) as refused_shard:
        store_for(unknown).read_range(shard, 0, MEMBER)
    assert time.monotonic() - t0 < 2
    hint = r"check the access key AKIANOSUCHKEY0000000 and its secret \(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; "
    assert re.fullmatch(rf"reading {url} \(endpoint {moto_iam.endpoint}\): access denied \(403: Forbidden\): "
                        rf"{hint}[^\n]+", str(refused.value)), str(refused.value)
    assert re.fullmatch(rf"reading {shard} \(endpoint {moto_iam.endpoint}\): access denied \(InvalidAccessKeyId: "
                        rf"The AWS Access Key Id you provided does not exist in our records.\): {hint}[^\n]+",
                        str(refused_shard.value)), str(refused_shard.value)


GCS_BUCKET = "rtdist-gcs"


@pytest.fixture(scope="module")
def gcs(local):
    server = GcsEmulator()
    server.upload_dir(GCS_BUCKET, local.parent, "pg/")
    server.filesystem().put_file(str(local), f"{GCS_BUCKET}/gone/u-manifest.json")  # its shards were never uploaded
    yield server
    server.stop()


def test_gs_shards_read_the_batches_of_the_local_files_and_a_missing_one_is_named_at_once(local, gcs):
    options = RemoteOptions(gcs.options, budget_s=30)
    streamed = loader(f"gs://{GCS_BUCKET}/pg/u-manifest.json", 0, 1, workers=1, remote=options)
    assert same(batches(streamed), batches(loader(local, 0, 1, workers=1)))
    assert streamed.stats["fetched_bytes"] > 0
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=rf"gs://{GCS_BUCKET}/gone/u-train-\d{{6}}\.tar \(endpoint {gcs.endpoint}\): "
                                          r"not found \(404\)"):
        batches(loader(f"gs://{GCS_BUCKET}/gone/u", 0, 1, workers=0, remote=options))
    assert time.monotonic() - t0 < 2  # not retried


def test_a_gcs_server_gone_for_good_ends_in_one_error_naming_the_url_within_the_budget(local, tmp_path):
    """gcsfs's own retries (31-36 s of backoff per request) are off: data.fetch_budget_s bounds gs:// too."""
    server = GcsEmulator()
    try:
        server.upload_dir("gone-server", local.parent, "pg/")
        streamed = loader("gs://gone-server/pg/u-manifest.json", 0, 1, workers=0,
                          remote=RemoteOptions(server.options, budget_s=2, timeout_s=1))
    finally:
        server.stop()
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=rf"reading gs://gone-server/pg/u-train-\d{{6}}\.tar \(endpoint "
                                          rf"{server.endpoint}\): ClientConnectorError: .*still failing after \d+ "
                                          r"tries over 2 s \(data.fetch_budget_s\)"):
        batches(streamed)
    assert 2 <= time.monotonic() - t0 < 2 + 1 + 2


def test_gcs_refusals_are_access_denied_at_once_and_its_server_errors_are_retried():
    """gcsfs raises its own errors (OSError 'Forbidden: ...' for a 403, HttpError with a code otherwise): the
    GCS emulator has no credentials to refuse, so they come from gcsfs's own response check here."""
    retry = pytest.importorskip("gcsfs.retry")
    refused = []
    for status, body in ((403, b'{"error": {"message": "caller does not have storage.objects.get access"}}'),
                         (401, b'{"error": {"code": 401, "message": "Invalid Credentials"}}'),
                         (503, b'{"error": {"code": 503, "message": "backend unavailable"}}')):
        with pytest.raises(Exception) as e:
            retry.validate_response(status, body, "b/pg/u-manifest.json")
        refused.append(permanent_cause(e.value, "check the credentials (data.storage_options token, ...)"))
    assert refused[0].startswith("access denied (OSError: Forbidden: b/pg/u-manifest.json caller does not have "
                                 "storage.objects.get access): check the credentials (data.storage_options token")
    assert refused[1].startswith("access denied (HTTP 401: HttpError: Invalid Credentials, 401): check the credentials")
    assert refused[2] is None  # a server error may pass: retried within data.fetch_budget_s


def corrupt_copy(moto, prefix, offset):
    """The data under s3://BUCKET/{prefix}, the first shard with one byte flipped at ``offset``."""
    client = moto.client()
    for name in ("u-manifest.json", "u-train-000001.tar", "u-train-000002.tar", "u-train-000003.tar"):
        client.copy_object(Bucket=BUCKET, Key=f"{prefix}/{name}", CopySource=f"{BUCKET}/pg/{name}")
    data = bytearray(client.get_object(Bucket=BUCKET, Key="pg/u-train-000000.tar")["Body"].read())
    data[offset] ^= 1
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/u-train-000000.tar", Body=bytes(data))
    return f"s3://{BUCKET}/{prefix}/u-manifest.json"


def test_a_corrupted_object_is_detected_and_named(local, moto):
    # a token byte: the header checks cannot see it; the sha256 of the shard read front to back does
    url = corrupt_copy(moto, "tok", 7 * MEMBER + BLOCK + 128 + 10)
    with pytest.raises(CorruptShardError, match=rf"shard s3://{BUCKET}/tok/u-train-000000.tar: sha256 .* is not the "
                                                r"manifest's"):
        batches(loader(url, 0, 1, workers=0, shuffle=False, remote=s3_options(moto)))
    with pytest.raises(CorruptShardError, match="u-train-000000.tar: sha256"):
        check_shards(load_manifest(url, s3_options(moto)), mode="full")
    # a member header: met on the read of that sample, under any read pattern
    url = corrupt_copy(moto, "hdr", 7 * MEMBER + 3)
    with pytest.raises(CorruptShardError, match=rf"s3://{BUCKET}/hdr/u-train-000000.tar: sample 7 at byte {7 * MEMBER}: "
                                                r"tar header checksum mismatch"):
        batches(loader(url, 0, 1, workers=0, shuffle=False, remote=s3_options(moto)))


def test_quick_and_full_checks_and_inspect_shards_verify_shards_at_a_url(local, nginx, tool, capsys):
    manifest = load_manifest(f"{nginx.url}/u")
    for mode in ("quick", "full"):
        check_shards(manifest, mode=mode)
    inspect = tool("inspect_shards")
    assert inspect.main([f"{nginx.url}/u-manifest.json", "--no-progress", "--decode", "3"]) == 0
    out = capsys.readouterr().out
    assert "verified 4 shards (full check): all good" in out and "u-train-000000.tar shard0_000003" in out


def test_preprocess_to_a_bucket_uploads_every_shard_then_the_manifest_and_training_reads_it(moto, tool, tmp_path,
                                                                                             monkeypatch):
    from data_helpers import pg19
    for k, v in {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    client = moto.client()
    client.create_bucket(Bucket="preprocessed")
    corpus = pg19(tmp_path / "corpus")
    args = ["--input", str(corpus), "--seq-length", "32", "--maxcount", "20", "--no-progress"]
    assert tool("preprocess").main(args + ["--output-prefix", "s3://preprocessed/pg/c",
                                           "--staging-dir", str(tmp_path / "staging")]) == 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="preprocessed")["Contents"]]
    local = load_manifest(tmp_path / "staging" / "c")
    shards = [s["name"] for split in local["splits"].values() for s in split["shards"]]
    assert sorted(keys) == sorted(f"pg/{n}" for n in shards + ["c-manifest.json"])
    remote = load_manifest("s3://preprocessed/pg/c")
    check_shards(remote, mode="full")
    assert same(batches(ShardLoader(remote, "train", 2, num_workers=0, with_keys=True)),
                batches(ShardLoader(local, "train", 2, num_workers=0, with_keys=True)))


# ------------------------------------------------------------------ training from a bucket (real ranks, gloo)

@pytest.mark.slow  # three 2-rank jobs (~5 min on 2 cores); the loader tests above cover the same reads
def test_two_rank_training_from_s3_has_the_losses_of_local_files_and_a_killed_run_resumes_exactly(manifest, moto,
                                                                                                   tmp_path):
    from pathlib import Path

    from test_train_cli import losses, run, train_cmd
    url = moto.upload_dir(BUCKET, Path(manifest).parent, "demo/") + Path(manifest).name
    steps = ["train.train_iters=8"]
    local = run(train_cmd(2, manifest, tmp_path / "local", *steps))
    assert local.returncode == 0, local.stderr[-3000:]
    aws = {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    first = run(train_cmd(2, url, tmp_path / "s3", *steps, "train.save_interval=4"), RTDIST_FAULT="step:6", **aws)
    assert first.returncode != 0 and (tmp_path / "s3" / "checkpoints" / "global_step4").is_dir(), first.stderr[-3000:]
    # the resumed job names the endpoint in data.storage_options instead of the environment
    second = run(train_cmd(2, url, tmp_path / "s3", *steps, f"data.storage_options.endpoint_url={moto.endpoint}",
                           "data.storage_options.key=testing", "data.storage_options.secret=testing",
                           resume="auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(tmp_path / "s3")[-4:] == pytest.approx(losses(tmp_path / "local")[-4:], abs=1e-5)


@pytest.mark.slow  # two training ranks (~1 min on 2 cores)
def test_a_server_gone_mid_training_ends_every_rank_within_the_bound_and_the_reader_names_the_url(tmp_path):
    """The rank whose read fails first ends with the URL's error; a peer waiting for it in a collective ends within
    the same bound with that rank's error line (its own reads may still have been served from its window).
    Each rank first trains on what it has read ahead (its shard and the next, and the DataLoader's prefetch): the
    shards are 100 samples here, so that lasts seconds, as a few MB would last minutes on a GPU step."""
    from pathlib import Path

    from test_train_cli import start_ranks, wait_for_steps

    from rtdist.data import build_demo_corpus, preprocess
    build_demo_corpus(tmp_path / "corpus", max_bytes=1 << 20, book_bytes=64 << 10)
    manifest = preprocess([str(tmp_path / "corpus")], str(tmp_path / "shards" / "demo"), seq_length=64, maxcount=100,
                          progress=False, log=lambda *a, **k: None)["manifest_path"]
    server = Nginx(Path(manifest).parent, tmp_path / "nginx")
    run_dir = tmp_path / "run"
    ranks = start_ranks(f"{server.url}/{Path(manifest).name}", run_dir, "train.train_iters=100000",
                        "data.fetch_budget_s=5", "data.request_timeout_s=2", "train.dist_timeout_s=60")
    try:
        wait_for_steps(run_dir, 2, timeout=240)
        server.stop()  # each rank's next window (past what it has read ahead) fails from now on
        t0 = time.monotonic()
        errs = [p.communicate(timeout=120)[1] for p in ranks]
        took = time.monotonic() - t0
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
        server.stop()
    assert all(p.returncode == 2 for p in ranks), errs
    url_error = rf"reading {server.url}/demo-train-\d{{6}}\.tar: .*still failing after \d+ " \
                r"tries over 5 s \(data.fetch_budget_s\)"
    lines = [error_line(err) for err in errs]
    named = [rank for rank, line in enumerate(lines) if re.match(rf"\[rank {rank}\] error: {url_error}", line)]
    assert named, errs
    for rank, line in enumerate(lines):  # a rank whose own reads were served names the URL through the failed one's
        if rank not in named:
            assert re.match(rf"\[rank {rank}\] error: rank {rank}: a collective failed \(.*\): rank {named[0]} "
                            rf"failed: {url_error}", line), errs
    assert took < 60, took  # every rank within the bound, before a peer timeout (60 s) would end it


def error_line(stderr: str) -> str:
    """A rank's error line: the last ``[rank N] error: ...`` line of its stderr."""
    return [line for line in stderr.splitlines() if re.match(r"\[rank \d+\] error: ", line)][-1]


def test_a_peer_error_line_carries_the_line_of_the_rank_that_failed_in_the_same_segment(tmp_path):
    """A rank that fails on its own leaves its error line in the run directory (FailureNotes) before it leaves the
    process group; the peer whose collective breaks then ends with it, instead of only naming the rank that stopped.
    A note an earlier segment of the run left is not taken for this one's."""
    from object_servers import free_port

    from rtdist.watchdog import FailureNotes, Watchdog
    folder = tmp_path / "run" / "failures"
    gone = ("127.0.0.1", free_port())  # the rendezvous store went away with rank 0, which held it
    cause = ("reading http://127.0.0.1:9/u-train-000003.tar: ClientConnectorError: refused; still failing after 9 "
             "tries over 5 s (data.fetch_budget_s): is the server up and the endpoint right?")
    FailureNotes(folder, 0, 2, "segment-1").record(RemoteError(cause))
    peer = Watchdog(60, rank=1, world_size=2, store_addr=gone)
    peer.notes = FailureNotes(folder, 1, 2, "segment-1")
    assert peer.peers_suffix() == f": rank 0 failed: {cause}"
    peer.notes = FailureNotes(folder, 1, 2, "segment-2")  # the run resumed: rank 0's note is the last segment's
    assert peer.peers_suffix() == f": the rendezvous store at 127.0.0.1:{gone[1]} does not answer: the process that " \
                                  "holds it (rank 0 or the launcher) or its host stopped"
    FailureNotes(folder, 0, 2, "segment-2").record(ValueError("a bug's error\nover two lines"))
    assert peer.peers_suffix() == ": rank 0 failed: ValueError: a bug's error over two lines"  # one line, its type


def test_a_rank_refused_by_the_server_is_named_with_its_url_on_every_rank(manifest, tmp_path):
    """One node's secret is wrong: its rank ends at start with the URL's access-denied line, and the other rank,
    waiting for it in a collective, ends with that same line rather than only 'rank 0 stopped answering'. The failing
    rank is rank 0, which holds the rendezvous store: its peer cannot ask the store what happened."""
    import subprocess
    from pathlib import Path

    from object_servers import free_port
    from test_train_cli import ROOT, env, train_cmd
    server = MotoServer(iam_auth=True)
    procs = []
    try:
        url = server.upload_dir(BUCKET, Path(manifest).parent, "demo/") + Path(manifest).name
        port = str(free_port())
        for rank, secret in enumerate([server.secret + "x", server.secret]):
            procs.append(subprocess.Popen(
                train_cmd(1, url, tmp_path / "run", "train.train_iters=4"), cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
                env=env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=server.key,
                        AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1")))
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop()
    assert [p.returncode for p in procs] == [2, 2], errs
    denied = rf"reading {url} \(endpoint {server.endpoint}\): access denied \(403: Forbidden\): check the access key " \
             rf"{server.key} and its secret \(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; "
    assert re.match(rf"\[rank 0\] error: {denied}", error_line(errs[0])), errs[0]
    assert re.match(rf"\[rank 1\] error: rank 1: a collective failed \(.*\): rank 0 failed: {denied}",
                    error_line(errs[1])), errs[1]
