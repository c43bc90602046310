"""The features stage in-process (debug executor): exact read-back, one row per unique image, the seeded shard
order, resume, bad images and records, checksums."""

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_pipeline_dict, write_pipeline
from PIL import Image

from llava_hpc.config import load_pipeline
from llava_hpc.data.features_io import (
    CorruptShardError,
    FeatureStore,
    read_shard,
    shard_paths,
    verify_shard,
    write_shard,
)
from llava_hpc.model.vision import build_vision_tower
from llava_hpc.orchestrate import Orchestrator
from llava_hpc.rundir import RunDir, read_jsonl
from llava_hpc.stages import StageContext
from llava_hpc.stages import features as features_stage
from llava_hpc.stages.common import ImageLoader, vision_spec
from llava_hpc.synthetic import SyntheticWorld


def _orchestrator(path):
    pipeline = load_pipeline(path)
    return Orchestrator(pipeline, RunDir(pipeline.run_dir)), pipeline


def test_synthetic_features_read_back_exactly(small_pipeline):
    orchestrator, pipeline = _orchestrator(small_pipeline)
    outcomes = orchestrator.submit("features")
    assert [o.action for o in outcomes] == ["submitted"]
    out = pipeline.run_dir / "features" / "pretrain"
    assert (out / "_SUCCESS").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 64 and summary["shards"] == 4 and summary["bad_records"] == 0
    # Every synthetic record has its own image (a bijection, shuffled or not): nothing to share.
    assert summary["unique_images"] == summary["image_records"] == 64 and summary["dedup_ratio"] == 1.0

    # Recompute directly with the same tower and compare with what the shards hold, bit for bit (fp16).
    world = SyntheticWorld.from_config(pipeline.synthetic)
    tower = build_vision_tower(vision_spec(pipeline))
    records = world.records("pretrain")
    pixels = tower.preprocess([world.load_image(r["image"]) for r in records])
    expected = tower(pixels).to(torch.float16).numpy()
    store = FeatureStore(out, verify=True)
    assert len(store) == 64 and (store.num_patches, store.hidden_size) == (64, 64)
    for i, record in enumerate(records):
        assert record["image"] in store
        np.testing.assert_array_equal(store.get(record["image"]), expected[i])
    # The synthetic world's content hash is of the rendered pixels (no file to hash).
    shard = read_shard(shard_paths(out)[0])
    image = world.load_image(shard.images[0])
    assert shard.content_hashes[0] == features_stage.content_hash(
        ImageLoader(pipeline.datasets["pretrain"], world), shard.images[0], image)
    assert shard.content_hashes[0].startswith("rgb-sha256:")

    # The `datasets` library reads the same shards.
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in shard_paths(out)], split="train")
    first = np.asarray(ds[0]["features"], dtype=np.float16).reshape(64, 64)
    np.testing.assert_array_equal(first, store.get(ds[0]["image"]))


def test_rerun_computes_only_missing_shards(small_pipeline):
    orchestrator, pipeline = _orchestrator(small_pipeline)
    orchestrator.submit("features")
    out = pipeline.run_dir / "features" / "pretrain"
    again = orchestrator.submit("features")
    assert [o.action for o in again] == ["skipped-done"]

    (out / "part-00002.parquet").unlink()
    (out / "_SUCCESS").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}
    tasks = features_stage.plan(StageContext(pipeline, RunDir(pipeline.run_dir)))
    assert [t.payload for t in tasks] == [{"dataset": "pretrain", "shards": [2]}]
    orchestrator.submit("features")
    assert (out / "_SUCCESS").exists()
    after = {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}
    assert {k: after[k] for k in before} == before  # untouched
    shard_log = [row["shard"] for row in read_jsonl(out / "metrics.jsonl")]
    assert sorted(shard_log) == [0, 1, 2, 2, 3]


def test_force_recomputes_everything(small_pipeline):
    orchestrator, pipeline = _orchestrator(small_pipeline)
    orchestrator.submit("features")
    outcomes = orchestrator.submit("features", force=True)
    assert outcomes[0].action == "submitted"
    rows = read_jsonl(pipeline.run_dir / "features" / "pretrain" / "metrics.jsonl")
    assert len(rows) == 8


def _llava_dataset(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "good1.jpg")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(images / "good2.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "secret.png").write_bytes(b"outside the root")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A thing."}]
    records = [
        {"id": "a", "image": "good1.jpg", "conversations": conv},
        {"id": "b", "image": "corrupt.jpg", "conversations": conv},
        {"id": "c", "image": "missing.jpg", "conversations": conv},
        {"id": "d", "image": "../outside.png", "conversations": conv},
        {"id": "e", "image": str(tmp_path / "outside.png"), "conversations": conv},
        {"id": "f", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"image": "good2.png", "conversations": conv},
        "not a record",
        {"id": "g", "image": 7, "conversations": conv},
        {"id": 8, "image": "good2.png", "conversations": conv},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json", images


def test_bad_records_are_skipped_and_reported(tmp_path):
    path, images = _llava_dataset(tmp_path)
    data = small_pipeline_dict(
        tmp_path / "run",
        datasets={"mine": {"kind": "llava-json", "path": str(path), "images": str(images)}},
        stages={"features": {"batch_size": 4, "shard_size": 4, "datasets": ["mine"]}},
    )
    orchestrator, pipeline = _orchestrator(write_pipeline(tmp_path / "p.toml", data))
    orchestrator.submit("features")
    out = pipeline.run_dir / "features" / "mine"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 2 and summary["text_only_records"] == 1 and summary["bad_records"] == 7
    assert summary["bad_images"] == 4 and summary["malformed_records"] == 3 and summary["unique_images"] == 6
    bad = read_jsonl(out / "bad_records.jsonl")
    by_id = {row.get("id"): row["reason"] for row in bad}
    assert "corrupt image" in by_id["b"] and "corrupt.jpg" in by_id["b"]
    assert "image file missing" in by_id["c"] and "missing.jpg" in by_id["c"]
    assert "escapes the image root" in by_id["d"]
    assert "escapes the image root" in by_id["e"]
    reasons = " | ".join(row["reason"] for row in bad)
    assert "record 'g': field 'image' must be a non-empty string" in reasons
    assert "record #6 has no 'id' field" in reasons and "record #7 is a str, not an object" in reasons
    assert {row["position"] for row in bad if "position" in row} == {6, 7, 8}
    store = FeatureStore(out)
    assert sorted(store.images) == ["good1.jpg", "good2.png"] and len(store) == 2
    assert orchestrator.status()[0].progress == "mine: 2/2 shards, 7 bad records"


def test_unreadable_dataset_file_fails_fast_naming_the_file(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text('[{"id": 1,\n "image": ')
    data = small_pipeline_dict(
        tmp_path / "run",
        datasets={"mine": {"kind": "llava-json", "path": str(bad), "images": str(tmp_path)}},
        stages={"features": {"datasets": ["mine"]}},
    )
    orchestrator, _ = _orchestrator(write_pipeline(tmp_path / "p.toml", data))
    with pytest.raises(ValueError, match=r"data\.json: not valid JSON at line 2"):
        orchestrator.submit("features")


def test_corrupt_shard_is_caught_by_checksum(small_pipeline):
    orchestrator, pipeline = _orchestrator(small_pipeline)
    orchestrator.submit("features")
    shard = pipeline.run_dir / "features" / "pretrain" / "part-00001.parquet"
    verify_shard(shard)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="part-00001.parquet: checksum"):
        verify_shard(shard)
    shard.write_bytes(b"PAR1 garbage")
    with pytest.raises(CorruptShardError, match="unreadable Parquet shard"):
        read_shard(shard)


def test_zstd_and_uncompressed_hold_the_same_numbers(tmp_path):
    results = {}
    for compression in ("zstd", "none"):
        data = small_pipeline_dict(tmp_path / f"run-{compression}", stages={"features": {"compression": compression, "datasets": ["instruct"], "shard_size": 48}})
        orchestrator, pipeline = _orchestrator(write_pipeline(tmp_path / f"{compression}.toml", data))
        orchestrator.submit("features")
        shard = pipeline.run_dir / "features" / "instruct" / "part-00000.parquet"
        results[compression] = read_shard(shard)[2]
        codec = pq.ParquetFile(shard).metadata.row_group(0).column(2).compression
        assert codec == ("ZSTD" if compression == "zstd" else "UNCOMPRESSED")
    np.testing.assert_array_equal(results["zstd"], results["none"])


def test_stale_temporary_files_of_a_killed_writer_are_removed(small_pipeline):
    orchestrator, pipeline = _orchestrator(small_pipeline)
    out = pipeline.run_dir / "features" / "pretrain"
    out.mkdir(parents=True)
    stale = out / ".part-00000.parquet.abc123.tmp"
    stale.write_bytes(b"half a shard")
    orchestrator.submit("features")
    assert not stale.exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_corrupt_shard_is_quarantined_and_only_it_is_recomputed(small_pipeline):
    """What training does on a failed checksum (FeatureStore(verify=True)): the shard goes to quarantine/, the
    dataset is no longer done, and the next features run recomputes exactly that shard, byte for byte."""
    orchestrator, pipeline = _orchestrator(small_pipeline)
    orchestrator.submit("features")
    out = pipeline.run_dir / "features" / "pretrain"
    shard = out / "part-00001.parquet"
    original = shard.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"part-00001.parquet: checksum .*moved to .*quarantine.*Resubmit"):
        _read_every_sample(FeatureStore(out, verify=True))
    assert not shard.exists() and not (out / "part-00001.json").exists()
    assert not (out / "_SUCCESS").exists()
    quarantined = read_jsonl(out / "quarantine" / "quarantined.jsonl")
    assert quarantined[0]["shard"] == "part-00001.parquet" and "checksum" in quarantined[0]["reason"]
    assert (out / "quarantine" / quarantined[0]["moved_to"]).read_bytes() == bytes(data)  # kept for a post-mortem

    tasks = features_stage.plan(StageContext(pipeline, orchestrator.run))
    assert [t.payload for t in tasks] == [{"dataset": "pretrain", "shards": [1]}]
    orchestrator.submit("features")
    assert shard.read_bytes() == original and (out / "_SUCCESS").exists()
    _read_every_sample(FeatureStore(out, verify=True))


def _read_every_sample(store: FeatureStore) -> None:
    for image in store.images:
        store.get(image)


def _shards(directory, shapes):
    """Shards of 3 images each, image `s{shard}-{row}.png` filled with its shard number."""
    for number, shape in enumerate(shapes):
        images = [f"s{number}-{row}.png" for row in range(3)]
        write_shard(directory, number, images=images, features=np.full((3, *shape), number, np.float16))


def test_store_decodes_shards_lazily_and_holds_at_most_its_cache(tmp_path):
    """Opening reads only image paths; features are decoded per shard when first asked for and at most
    `cache_shards` decoded shards are held, least recently used dropped first."""
    _shards(tmp_path, [(4, 2)] * 5)
    store = FeatureStore(tmp_path, verify=True, cache_shards=2)
    assert len(store) == 15 and store.shard_loads == 0 and (store.num_patches, store.hidden_size) == (4, 2)
    assert "s3-1.png" in store and "s3-1" not in store and store.shard_of("s3-1.png") == 3
    for shard in range(5):
        for row in range(3):
            assert (store.get(f"s{shard}-{row}.png") == shard).all()
    assert store.shard_loads == 5 and len(store._cache) == 2  # one decode per shard read in order
    store.get("s3-0.png"), store.get("s4-2.png")  # the two newest are still held
    assert store.shard_loads == 5
    store.get("s0-0.png")  # dropped long ago: decoded again
    assert store.shard_loads == 6
    with pytest.raises(KeyError, match="no features for image 'nope.png'"):
        store.get("nope.png")


def test_store_refuses_shards_of_different_shapes(tmp_path):
    _shards(tmp_path, [(4, 2), (4, 2), (5, 2)])
    with pytest.raises(ValueError, match=r"part-00002.parquet: features of shape \[5, 2\], but part-00000.parquet"):
        FeatureStore(tmp_path)


def test_store_names_a_truncated_shard_and_quarantines_it_when_verifying(tmp_path):
    _shards(tmp_path, [(4, 2)] * 2)
    shard = tmp_path / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])  # the footer is gone: not even the ids can be read
    with pytest.raises(CorruptShardError, match=r"part-00001.parquet: unreadable Parquet shard"):
        FeatureStore(tmp_path)
    with pytest.raises(CorruptShardError, match=r"part-00001.parquet: checksum .*moved to .*quarantine"):
        FeatureStore(tmp_path, verify=True)
    assert not shard.exists() and (tmp_path / "quarantine" / "quarantined.jsonl").exists()


def _shared_image_dataset(tmp_path):
    """An instruct-shaped set: 12 records over 5 images (4 files and one missing, used by two records)."""
    images = tmp_path / "images"
    images.mkdir()
    colours = {"a.png": (200, 0, 0), "b.png": (0, 200, 0), "c.png": (0, 0, 200), "d.png": (90, 90, 90)}
    for name, colour in colours.items():
        Image.new("RGB", (24, 24), colour).save(images / name)
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Some colour."}]
    uses = ["a.png", "b.png", "a.png", "c.png", "gone.png", "a.png", "d.png", "b.png", "c.png", "gone.png", "a.png", "d.png"]
    records = [{"id": f"r{i}", "image": image, "conversations": conv} for i, image in enumerate(uses)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json", images, records


def _shared_pipeline(tmp_path, path, images, **features):
    data = small_pipeline_dict(
        tmp_path / "run",
        datasets={"mine": {"kind": "llava-json", "path": str(path), "images": str(images)}},
        stages={"features": {"batch_size": 3, "shard_size": 2, "array_tasks": 2, "datasets": ["mine"], **features}},
    )
    return _orchestrator(write_pipeline(tmp_path / "p.toml", data))


def test_features_are_computed_once_per_unique_image(tmp_path):
    path, images, records = _shared_image_dataset(tmp_path)
    orchestrator, pipeline = _shared_pipeline(tmp_path, path, images)
    orchestrator.submit("features")
    out = pipeline.run_dir / "features" / "mine"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["records"], summary["image_records"], summary["unique_images"]) == (12, 12, 5)
    assert summary["dedup_ratio"] == 2.4 and summary["rows"] == 4 and summary["shards"] == 3
    assert summary["bad_images"] == 1 and summary["bad_records"] == 2
    assert summary["bytes_per_image"] == round(summary["bytes"] / 4, 1)

    # One row per unique image, across all shards; every good record resolves by its image path.
    shards = [read_shard(p) for p in shard_paths(out)]
    held = [image for shard in shards for image in shard.images]
    assert sorted(held) == ["a.png", "b.png", "c.png", "d.png"]
    tower = build_vision_tower(vision_spec(pipeline))
    store = FeatureStore(out, verify=True)
    for record in records:
        if record["image"] == "gone.png":
            assert record["image"] not in store
            continue
        with Image.open(images / record["image"]) as image:
            expected = tower(tower.preprocess([image.convert("RGB")])).to(torch.float16).numpy()[0]
        np.testing.assert_array_equal(store.get(record["image"]), expected)
    # The content hash is the file's sha256: what `sha256sum` says.
    hashes = {image: digest for shard in shards for image, digest in zip(shard.images, shard.content_hashes)}
    assert hashes == {name: "sha256:" + hashlib.sha256((images / name).read_bytes()).hexdigest() for name in held}

    # The missing image names both records that use it, in the sidecar and in bad_records.jsonl.
    sidecar_bad = [row for p in shard_paths(out) for row in json.loads(p.with_suffix(".json").read_text())["bad_images"]]
    assert [(row["image"], row["record_ids"]) for row in sidecar_bad] == [("gone.png", ["r4", "r9"])]
    assert "image file missing" in sidecar_bad[0]["reason"]
    bad = read_jsonl(out / "bad_records.jsonl")
    assert [(row["id"], row["image"]) for row in bad] == [("r4", "gone.png"), ("r9", "gone.png")]

    # The permutation is on disk: image -> shard, position, and the records that use it.
    listing = pq.read_table(out / "images.parquet").to_pylist()
    assert [row["position"] for row in listing] == list(range(5))
    assert all(row["shard"] == row["position"] // 2 for row in listing)
    assert {row["image"]: row["record_ids"] for row in listing}["a.png"] == ["r0", "r2", "r5", "r10"]
    plan_info = json.loads((out / "plan.json").read_text())
    assert plan_info["unique_images"] == 5 and plan_info["seed"] == 0 and plan_info["shards"] == 3
    for shard_index, shard in enumerate(shards):  # a shard holds its positions of the order, less bad images
        planned = [row["image"] for row in listing if row["shard"] == shard_index]
        assert shard.images == [image for image in planned if image != "gone.png"]


def _plan_of(tmp_path, n_images, seed):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A thing."}]
    records = [{"id": str(i), "image": f"img{i:03d}.png", "conversations": conv} for i in range(n_images)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    _, pipeline = _shared_pipeline(tmp_path, tmp_path / "data.json", images, seed=seed, shard_size=8)
    return features_stage.dataset_plan(StageContext(pipeline, RunDir(pipeline.run_dir)), "mine")


def test_shard_order_is_a_seeded_permutation_stable_across_reruns(tmp_path):
    first, again, other = _plan_of(tmp_path, 64, seed=0), _plan_of(tmp_path, 64, seed=0), _plan_of(tmp_path, 64, seed=1)
    file_order = [f"img{i:03d}.png" for i in range(64)]
    assert sorted(first.order) == file_order and first.order != file_order
    assert first.order == again.order
    membership = [set(first.shard_images(i)) for i in range(first.shards)]
    assert membership == [set(again.shard_images(i)) for i in range(again.shards)]
    assert membership != [set(other.shard_images(i)) for i in range(other.shards)]
    # Each shard draws from the whole file, not a run of it: a shard-local window is close to a global shuffle.
    assert all(max(int(name[3:6]) for name in shard) - min(int(name[3:6]) for name in shard) > 16 for shard in membership)


def test_shards_of_another_order_are_not_mixed(tmp_path):
    """A rerun with another seed would interleave two orders: refused until --force recomputes everything."""
    path, images, _ = _shared_image_dataset(tmp_path)
    orchestrator, pipeline = _shared_pipeline(tmp_path, path, images)
    orchestrator.submit("features")
    out = pipeline.run_dir / "features" / "mine"
    (out / "part-00001.parquet").unlink()
    (out / "_SUCCESS").unlink()
    orchestrator, pipeline = _shared_pipeline(tmp_path, path, images, seed=7)
    with pytest.raises(ValueError, match=r"mine/plan.json: the existing shards were planned with a different seed.*--force"):
        features_stage.plan(StageContext(pipeline, orchestrator.run))
    orchestrator.submit("features", force=True)
    assert json.loads((out / "summary.json").read_text())["seed"] == 7
    assert json.loads((out / "plan.json").read_text())["seed"] == 7
