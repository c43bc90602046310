"""FeatureStore: keyed by image, bounded memory, background prefetch, corrupt shards found in the background."""

import gc
import pickle
import threading
import time
import weakref

import numpy as np
import pytest

from llava_hpc.data.features_io import (
    CorruptShardError, FeatureStore, feature_statistics, shard_bytes_estimate, write_shard,
)
from llava_hpc.rundir import read_jsonl


def _shards(directory, count, rows=3, shape=(4, 2)):
    """`count` shards of `rows` images each, image `s{shard}-{row}.png` filled with shard * 10 + row."""
    for number in range(count):
        images = [f"s{number}-{row}.png" for row in range(rows)]
        features = np.stack([np.full(shape, number * 10 + row, np.float16) for row in range(rows)])
        write_shard(directory, number, images=images, features=features)


def _loads_by_thread(store):
    """Wrap the store's decode to record which thread did each one."""
    seen, decode = [], store._load

    def load(number):
        seen.append((number, threading.current_thread().name))
        return decode(number)

    store._load = load
    return seen


def _wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_prefetched_shards_are_decoded_once_in_the_background(tmp_path):
    _shards(tmp_path, 4)
    with FeatureStore(tmp_path, verify=True, cache_shards=4) as store:
        seen = _loads_by_thread(store)
        store.prefetch([0, 1, 2, 3])
        _wait_until(lambda: store.shard_loads == 4)
        for shard in range(4):
            for row in range(3):
                assert (store.get(f"s{shard}-{row}.png") == shard * 10 + row).all()
        store.prefetch([0, 1, 2, 3])  # all decoded already: nothing happens
        store.get("s3-0.png")
        assert store.shard_loads == 4 and sorted(number for number, _ in seen) == [0, 1, 2, 3]
        assert all(name.startswith("feature-prefetch") for _, name in seen)  # none in the reading thread


def test_get_waits_for_an_in_flight_prefetch_instead_of_decoding_again(tmp_path):
    _shards(tmp_path, 2)
    store = FeatureStore(tmp_path, cache_shards=2)
    seen = _loads_by_thread(store)
    release = threading.Event()
    decode = store._load

    def gated(number):  # a slow decode: the reading thread asks while it is still in flight
        release.wait(10)
        return decode(number)

    store._load = gated
    store.prefetch([1])
    threading.Timer(0.2, release.set).start()
    started = time.perf_counter()
    assert (store.get("s1-2.png") == 12).all()
    assert time.perf_counter() - started >= 0.15  # it waited for the prefetch thread
    assert store.shard_loads == 1 and [number for number, _ in seen] == [1]
    assert seen[0][1].startswith("feature-prefetch")
    store.close()


def test_cache_bound_includes_prefetches_in_flight(tmp_path):
    """Never more than cache_shards decoded shards alive, counting decodes in flight; a prefetch beyond the bound
    stops (get decodes what it skipped) and never evicts the shard being read nor one it was asked for."""
    _shards(tmp_path, 6)
    store = FeatureStore(tmp_path, cache_shards=3)
    decoded: list[weakref.ref] = []  # every decode, held weakly: alive while the store (or a caller) holds it
    most_alive = [0]
    decode = store._load

    def alive() -> int:
        gc.collect()
        return sum(ref() is not None for ref in decoded)

    def tracked(number):
        features = decode(number)
        decoded.append(weakref.ref(features))
        most_alive[0] = max(most_alive[0], alive())
        return features

    store._load = tracked
    store.get("s0-0.png")
    store.prefetch([1, 2, 3, 4])  # room for two beside shard 0, which is being read
    assert sorted(store._inflight) == [1, 2] and store._occupied() == 3
    _wait_until(lambda: all(f.done() for f in store._inflight.values()))
    for shard in range(6):  # reading on: every window prefetches the next shards
        store.prefetch([shard + 1, shard + 2] if shard < 4 else [])
        for row in range(3):
            assert (store.get(f"s{shard}-{row}.png") == shard * 10 + row).all()
        assert store._occupied() <= 3
    assert most_alive[0] == 3 and store.shard_loads == 6
    store.close()
    assert alive() == 0  # close drops them


def test_get_makes_room_when_every_slot_is_a_prefetch(tmp_path):
    _shards(tmp_path, 3)
    store = FeatureStore(tmp_path, cache_shards=2)
    store.prefetch([1, 2])
    assert (store.get("s0-1.png") == 1).all()  # a pending prefetch was cancelled or dropped for it
    assert store._occupied() <= 2
    for shard in (1, 2):
        assert (store.get(f"s{shard}-0.png") == shard * 10).all()
    store.close()


def test_corrupt_shard_found_by_the_prefetch_thread_raises_on_get_and_is_quarantined(tmp_path):
    _shards(tmp_path, 3)
    shard = tmp_path / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (tmp_path / "_SUCCESS").write_text("{}")
    store = FeatureStore(tmp_path, verify=True, cache_shards=3)
    store.prefetch([0, 1, 2])
    _wait_until(lambda: not shard.exists() and store.shard_loads == 2)
    assert (store.get("s0-0.png") == 0).all() and (store.get("s2-0.png") == 20).all()  # the others are fine
    with pytest.raises(CorruptShardError, match=r"part-00001.parquet: checksum .*moved to .*quarantine.*Resubmit"):
        store.get("s1-0.png")
    assert not (tmp_path / "_SUCCESS").exists()
    assert read_jsonl(tmp_path / "quarantine" / "quarantined.jsonl")[0]["shard"] == "part-00001.parquet"
    with pytest.raises(CorruptShardError, match="part-00001.parquet: gone while reading"):
        store.get("s1-0.png")  # asked again: the shard is not there any more, and it says so
    store.close()


def test_prefetch_of_an_unknown_shard_names_it(tmp_path):
    _shards(tmp_path, 2)
    with FeatureStore(tmp_path) as store, pytest.raises(KeyError, match="no shard 5"):
        store.prefetch([5])


def test_a_pickled_store_reads_on_its_own(tmp_path):
    """DataLoader workers get a copy: no decoded shards, no prefetch thread of the parent's."""
    _shards(tmp_path, 2)
    store = FeatureStore(tmp_path, cache_shards=2)
    store.prefetch([0, 1])
    copy = pickle.loads(pickle.dumps(store))
    assert len(copy._cache) == 0 and not copy._inflight
    copy.prefetch([1])
    assert (copy.get("s1-1.png") == 11).all() and (copy.get("s0-0.png") == 0).all()
    copy.close(), store.close()


def test_shard_bytes_estimate_is_the_largest_decoded_shard(tmp_path):
    _shards(tmp_path, 2, rows=3, shape=(4, 2))
    write_shard(tmp_path, 2, images=[f"big-{i}.png" for i in range(5)], features=np.zeros((5, 4, 2), np.float16))
    assert shard_bytes_estimate(tmp_path) == 5 * 4 * 2 * 2
    store = FeatureStore(tmp_path)
    assert store.get("big-0.png").nbytes * 5 == shard_bytes_estimate(tmp_path)
    with pytest.raises(FileNotFoundError, match="no feature shards"):
        shard_bytes_estimate(tmp_path / "nowhere")


def test_an_image_in_two_shards_is_refused(tmp_path):
    write_shard(tmp_path, 0, images=["a.png", "b.png"], features=np.zeros((2, 4, 2), np.float16))
    write_shard(tmp_path, 1, images=["c.png", "a.png"], features=np.zeros((2, 4, 2), np.float16))
    with pytest.raises(ValueError, match=r"part-00001.parquet: image 'a.png' is also in part-00000.parquet"):
        FeatureStore(tmp_path)
    with pytest.raises(ValueError, match="'b.png' appears more than once"):
        write_shard(tmp_path, 2, images=["b.png", "b.png"], features=np.zeros((2, 4, 2), np.float16))


def test_feature_statistics_are_per_dimension_over_the_first_images(tmp_path):
    rng = np.random.default_rng(0)
    features = [rng.normal([1.0, -2.0, 5.0], [0.5, 3.0, 0.0], size=(10, 4, 3)).astype(np.float16) for _ in range(3)]
    for number, shard in enumerate(features):
        write_shard(tmp_path, number, images=[f"s{number}-{row}.png" for row in range(10)], features=shard)
    mean, std, images = feature_statistics(tmp_path, max_images=15)
    sample = np.concatenate([features[0], features[1][:5]]).reshape(-1, 3).astype(np.float64)
    assert images == 15
    np.testing.assert_allclose(mean, sample.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std[:2], sample.std(0)[:2], rtol=1e-4)
    assert std[2] == 1.0  # a constant dimension is left unscaled, not divided by ~0
    with pytest.raises(FileNotFoundError, match="run the features stage"):
        feature_statistics(tmp_path / "missing")
