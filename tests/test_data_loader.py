"""ShardLoader: equal batches on every data-parallel rank, deterministic order, exact resume, named corruption."""

import json

import numpy as np
import pytest
import torch
from data_helpers import pg19, run, uneven_shards

from rtdist.data import CorruptShardError, DataError, ShardLoader, check_shards, load_manifest, manifest_shards

COUNTS = [5, 1, 11, 3, 2, 14]  # 36 samples in uneven shards: 36 = 2 ranks x 9 x 2 = 3 ranks x 6 x 2
ALL = {f"shard{s}_{i:06d}" for s, n in enumerate(COUNTS) for i in range(n)}


def keys(batches):
    return [k for _, ks in batches for k in ks]


def take(loader, n):
    """``n`` batches, continuing across epochs (and across interrupted iterations) like a trainer does."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("dp", [2, 3])
def test_every_rank_gets_equal_batches_and_an_epoch_reads_every_sample_once(tmp_path, dp):
    path = uneven_shards(tmp_path, COUNTS)
    loaders = [ShardLoader(path, "train", 2, r, dp, num_workers=2, seed=1, shuffle_buffer=4, with_keys=True)
               for r in range(dp)]
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [len(loader) for loader in loaders] == [36 // (2 * dp)] * dp
    seen = [k for b in batches for k in keys(b)]
    assert sorted(seen) == sorted(ALL)
    assert loaders[0].stats["dropped_per_epoch"] == loaders[0].stats["repeated_per_epoch"] == 0


@pytest.mark.parametrize("dp", [2, 3])
def test_a_remainder_is_dropped_or_wrapped_and_counted_never_lost_silently(tmp_path, dp):
    path = uneven_shards(tmp_path, COUNTS + [1])  # 37 samples: no rank count divides them
    for policy in ("drop", "wrap"):
        loaders = [ShardLoader(path, "train", 2, r, dp, num_workers=2, seed=1, policy=policy, with_keys=True)
                   for r in range(dp)]
        batches = [list(loader) for loader in loaders]
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(loaders[0])
        seen = [k for b in batches for k in keys(b)]
        stats = loaders[0].stats
        if policy == "drop":
            assert len(seen) == len(set(seen)) and 37 - len(seen) == stats["dropped_per_epoch"] > 0
        else:
            assert set(seen) == ALL | {"shard6_000000"}
            assert len(seen) - 37 == stats["repeated_per_epoch"] > 0


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    path = uneven_shards(tmp_path, [10, 8])
    batches = [list(ShardLoader(path, "train", 1, r, 3, num_workers=2, with_keys=True)) for r in range(3)]
    assert [len(b) for b in batches] == [6, 6, 6]
    assert len({k for b in batches for k in keys(b)}) == 18


def test_order_depends_only_on_seed_and_epoch_and_sp_ranks_share_it(tmp_path):
    path = uneven_shards(tmp_path, COUNTS)
    order = lambda seed=0, epoch=0, **kw: keys(  # noqa: E731
        take(_set_epoch(ShardLoader(path, "train", 3, 1, 2, num_workers=0, seed=seed, with_keys=True, **kw),
                        epoch), 6))
    assert order() == order()  # a second sequence-parallel rank (same dp_rank) reads the same samples
    assert order() != order(epoch=1) and order() != order(seed=1)
    plain = order(shuffle=False)
    assert plain == sorted(plain, key=lambda k: (int(k[5:k.index("_")]), k))  # shards in order, samples in order


def _set_epoch(loader, epoch):
    loader.set_epoch(epoch)
    return loader


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_uninterrupted_batches(tmp_path, workers):
    path = uneven_shards(tmp_path, COUNTS)
    make = lambda: ShardLoader(path, "train", 2, 1, 2, num_workers=workers, seed=7, shuffle_buffer=5)  # noqa: E731
    n = len(make())
    full = take(make(), 2 * n)  # two epochs, uninterrupted
    assert not torch.equal(torch.stack(full[:n]), torch.stack(full[n:]))
    for stop in (1, 4, n, n + 3):
        first = make()
        head = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's client_state
        second = make()
        second.load_state_dict(state)
        second.set_epoch(state["epoch"])  # what a trainer's epoch loop does after resuming: keeps the position
        tail = take(second, 2 * n - stop)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, full)), f"resume after {stop} batches differs"


def layout_loaders(path, dp, micro, workers):
    return [ShardLoader(path, "train", micro, r, dp, num_workers=workers, seed=7, shuffle_buffer=5, with_keys=True)
            for r in range(dp)]


def global_keys(loaders, rounds):
    """The keys of ``rounds`` batches of every rank, round by round (rank 0's batch, rank 1's, ...)."""
    per_rank = [keys(take(loader, rounds)) for loader in loaders]
    micro = loaders[0].micro_batch_size
    return [k for t in range(rounds) for ks in per_rank for k in ks[t * micro:(t + 1) * micro]]


@pytest.mark.parametrize("layouts", [
    [(2, 2, 2, 3), (1, 2, 1, None)],  # 2 ranks -> 1 rank, same micro batch (a trainer doubles accumulation)
    [(1, 2, 0, 5), (2, 2, 2, None)],  # 1 -> 2 ranks
    [(2, 2, 1, 2), (3, 1, 0, None)],  # other micro batch and workers
    [(2, 2, 2, 2), (1, 3, 0, 3), (2, 2, 2, None)],  # and back, mid-round: the first layout's order still holds
])
def test_a_new_layout_continues_the_epochs_global_order_without_repeating_or_skipping(tmp_path, layouts):
    """Each layout (dp, micro, workers) reads some rounds, hands its state to the next; the last reads to the end of
    the epoch. The samples read are the uninterrupted first layout's, in its global order: so a run that keeps
    dp x micro x accumulation gets exactly the batches of every optimizer step it would have had."""
    path = uneven_shards(tmp_path, COUNTS + [3])  # 39 samples: rounds of 2, 3 or 4 leave a remainder
    first = layout_loaders(path, *layouts[0][:3])
    straight = global_keys(first, len(first[0]))
    ledger, state = [], None
    for dp, micro, workers, rounds in layouts:
        loaders = layout_loaders(path, dp, micro, workers)
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))  # rank 0's state serves every rank
        if rounds is None:  # to the end of the epoch
            rounds = (len(straight) - (state["position"] if state else 0)) // (dp * micro)
        ledger += global_keys(loaders, rounds)
        states = [loader.state_dict() for loader in loaders]
        assert all(st == states[0] for st in states)  # the position is global: every rank holds the same state
        state = states[0]
    assert state["epoch"] == 1 and state["position"] == 0  # the epoch is over for the last layout
    assert len(ledger) == len(set(ledger))  # nothing read twice
    assert ledger == straight[:len(ledger)]  # the same samples in the same order, none skipped
    assert len(straight) - len(ledger) < dp * micro  # but the tail shorter than one round of the last layout
    # The next epoch is the last layout's own.
    fresh = layout_loaders(path, dp, micro, workers)
    for loader in fresh:
        loader.set_epoch(1)
    assert global_keys(loaders, 2) == global_keys(fresh, 2)


def test_a_state_of_other_data_is_refused_or_approximate_and_old_states_load(tmp_path):
    path = uneven_shards(tmp_path, COUNTS)
    saved = ShardLoader(path, "train", 2, 0, 2, num_workers=0)
    take(saved, 6)
    other = ShardLoader(path, "train", 2, 0, 3, num_workers=0, seed=1)
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        other.load_state_dict(saved.state_dict())
    other.load_state_dict(saved.state_dict(), strict=False)
    assert other.state_dict()["position"] == 6 * 2 * 2 // (2 * 3) * 2 * 3  # same share of the epoch's samples
    old = {k: v for k, v in saved.state_dict().items() if k != "position"} | {"batch": 6}  # written before positions
    again = ShardLoader(path, "train", 2, 0, 2, num_workers=0)
    again.load_state_dict(old)
    assert torch.equal(next(iter(again)), next(iter(saved)))


def test_batches_are_int64_samples_and_the_loader_knows_its_tokenizer(tmp_path):
    root = pg19(tmp_path / "pg19")
    run([root], tmp_path / "pg", seq_length=32, maxcount=7)
    loader = ShardLoader(tmp_path / "pg-manifest.json", "train", 4, 0, 1, num_workers=0)
    batch = next(iter(loader))
    assert batch.dtype == torch.int64 and batch.shape == (4, 33)
    assert (loader.seq_length, loader.vocab_size, loader.eod_id) == (32, 257, 256)
    corpus = b"".join(p.read_bytes() for p in sorted((root / "train").iterdir()))
    assert loader.tokenizer.decode_bytes(batch[0]) in corpus
    with pytest.raises(DataError, match="split 'dev' not in"):
        ShardLoader(tmp_path / "pg-manifest.json", "dev", 4)
    with pytest.raises(DataError, match="fewer than micro_batch_size x dp_world_size"):
        ShardLoader(tmp_path / "pg-manifest.json", "test", 64)


def test_a_corrupt_shard_is_named_or_skipped_and_counted(tmp_path):
    path = uneven_shards(tmp_path, COUNTS)
    shard = tmp_path / "u-train-000002.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:4096])
    with pytest.raises(CorruptShardError, match=r"u-train-000002\.tar: 4096 bytes but the manifest says .*trunc"):
        list(ShardLoader(path, "train", 2, 0, 1, num_workers=2))
    loader = ShardLoader(path, "train", 2, 0, 1, num_workers=2, skip_corrupt=True, with_keys=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 18
    assert loader.stats["corrupt_shards"] == ["u-train-000002.tar"] and loader.stats["substituted_samples"] == 11
    assert not any(k.startswith("shard2_") for k in keys(batches))
    damaged = bytearray(good)
    damaged[3 * 1024 + 10] ^= 0xFF  # inside the 4th member's tar header name
    shard.write_bytes(bytes(damaged))
    with pytest.raises(CorruptShardError, match=r"u-train-000002\.tar: sample 3 at byte 3072"):
        list(ShardLoader(path, "train", 2, 0, 1, num_workers=0, shuffle=False))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_shard_met_in_a_worker_is_raised_as_itself_in_one_line_without_its_bytes(tmp_path, workers):
    path = uneven_shards(tmp_path, COUNTS)
    shard = tmp_path / "u-train-000002.tar"
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))  # same size: found at the first read
    with pytest.raises(CorruptShardError) as caught:
        list(ShardLoader(path, "train", 2, 0, 1, num_workers=workers, shuffle=False))
    message = str(caught.value)
    assert "u-train-000002.tar: sample 0 at byte 0: member name" in message
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert len(message) < 400  # a short repr of the name field, never the random bytes themselves


# ------------------------------------------------------------------------------------------ pre-flight check

def test_preflight_check_names_every_bad_shard_before_any_is_read(tmp_path):
    path = uneven_shards(tmp_path, COUNTS)
    manifest = load_manifest(path)
    for mode in ("quick", "full", "off"):
        check_shards(manifest, ["train"], mode)  # good shards pass every mode
    (tmp_path / "u-train-000003.tar").write_bytes((tmp_path / "u-train-000003.tar").read_bytes()[:2048])
    (tmp_path / "u-train-000005.tar").unlink()
    with pytest.raises(CorruptShardError) as caught:
        check_shards(manifest, ["train"], "quick")
    message = str(caught.value)
    assert "2 of 6 shards" in message and "\n" not in message
    assert f"{tmp_path / 'u-train-000003.tar'}: 2048 bytes but the manifest says" in message
    assert f"{tmp_path / 'u-train-000005.tar'}: missing" in message
    assert "re-run tools/preprocess.py" in message.lower() and "data.skip_corrupt: true" in message
    check_shards(manifest, ["train"], "off")


def test_full_check_reads_every_member_where_quick_reads_the_first_and_last(tmp_path):
    path = uneven_shards(tmp_path, COUNTS)
    manifest = load_manifest(path)
    shard = tmp_path / "u-train-000002.tar"  # 11 samples of 1 KiB
    data = bytearray(shard.read_bytes())
    data[5 * 1024 + 644] ^= 1  # a token of sample 5 (tokens start at 640): still valid, only the sha256 can tell
    shard.write_bytes(bytes(data))
    check_shards(manifest, ["train"], "quick")
    with pytest.raises(CorruptShardError, match=r"u-train-000002\.tar: sha256 .* is not the manifest's"):
        check_shards(manifest, ["train"], "full")
    data[5 * 1024 + 10] ^= 1  # inside sample 5's tar header: the member check names the sample
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"u-train-000002\.tar: sample 5 at byte 5120: tar header checksum"):
        check_shards(manifest, ["train"], "full")
    last = bytearray(data)
    last[10 * 1024 + 640] = 0xFF  # the last sample's first token: 0x??FF >= vocab_size 257
    last[10 * 1024 + 641] = 0xFF
    shard.write_bytes(bytes(last))
    with pytest.raises(CorruptShardError, match=r"sample 10 at byte 10240: token 65535 >= vocab_size 257"):
        check_shards(manifest, ["train"], "quick")


def test_preflight_check_of_a_slice_checks_only_those_shards(tmp_path):
    path = uneven_shards(tmp_path, COUNTS)
    manifest = load_manifest(path)
    (tmp_path / "u-train-000003.tar").unlink()
    shards = manifest_shards(manifest, ["train"])
    check_shards(manifest, ["train"], "quick", shards=shards[0::2])  # rank 0 of 2: shards 0, 2, 4
    with pytest.raises(CorruptShardError, match=r"1 of 3 shards .*u-train-000003\.tar: missing"):
        check_shards(manifest, ["train"], "quick", shards=shards[1::2])  # rank 1 of 2: shards 1, 3, 5
    with pytest.raises(CorruptShardError, match="1 of 1 shards"):
        check_shards(manifest, ["train"], "quick", shards=["u-train-000003.tar"])
    with pytest.raises(DataError, match="not in splits"):
        check_shards(manifest, ["train"], "quick", shards=["u-validation-000000.tar"])
    with pytest.raises(DataError, match="verify mode 'fast'"):
        check_shards(manifest, ["train"], "fast")
