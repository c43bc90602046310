"""The encoded-records cache: built once per run, reused, keyed by its inputs, split across ranks, bad records
skipped and named; seeded subsets."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import small_pipeline_dict, write_pipeline

from llava_hpc.config import load_pipeline
from llava_hpc.data.encoded import EncodedCache, EncodeSettings, NoUsableRecordsError, cache_spec, file_fingerprint
from llava_hpc.data.llava_json import read_records
from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.model.builders import build_tiny_tokenizer
from llava_hpc.rundir import RunDir
from llava_hpc.stages import StageContext
from llava_hpc.stages.common import load_positioned_records, subset_positions
from llava_hpc.stages.training import build_cache, encoded_cache
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld
from llava_hpc.train.distributed import DistributedEnv

WORLD = SyntheticWorld(SyntheticSpec(n_pretrain=40, n_instruct=12, n_bench=4))
SINGLE = DistributedEnv(0, 0, 1, "127.0.0.1", 29500)
SETTINGS = EncodeSettings(image_tokens=16, max_length=128, overlong="skip")


def bad_records(good: list[dict]) -> list[dict]:
    """Three malformed records and one over-long one, between good ones."""
    no_token = {**good[0], "id": "no-token", "conversations": [{"from": "human", "value": "What is it?"},
                                                                {"from": "gpt", "value": "red"}]}
    no_answer = {"id": "no-answer", "image": good[1]["image"], "conversations": [{"from": "human", "value": "<image>"}]}
    bad_image = {**good[2], "id": "bad-image", "image": 7}
    caption = good[3]["conversations"][1]["value"]
    overlong = {**good[3], "id": "overlong",
                "conversations": [good[3]["conversations"][0], {"from": "gpt", "value": " ".join([caption] * 40)}]}
    return [no_token, no_answer, bad_image, overlong]


@pytest.fixture(scope="module")
def template():
    return ConversationTemplate("plain", build_tiny_tokenizer(WORLD.vocabulary()))


@pytest.fixture
def json_pipeline(tmp_path):
    """A llava-json pretrain dataset: the synthetic captions with the bad records spliced in at 5, 10, 15, 20."""
    root = tmp_path / "data"
    WORLD.write(root)
    records = WORLD.records("pretrain")
    for offset, bad in enumerate(bad_records(records)):
        records.insert(5 * (offset + 1), bad)
    (root / "pretrain.json").write_text(json.dumps(records))
    data = small_pipeline_dict(
        tmp_path / "run",
        synthetic={"n_pretrain": 40, "n_instruct": 12, "n_bench": 4},
        datasets={"pretrain": {"kind": "llava-json", "path": str(root / "pretrain.json"), "images": str(root)},
                  "instruct": {"kind": "synthetic", "split": "instruct"}},
        stages={"features": {"batch_size": 16, "shard_size": 16, "array_tasks": 1},
                "stage1": {"dataset": "pretrain", "zero_stage": 0, "overlong": "skip", "batch_size": 8},
                "stage2": {"dataset": "instruct", "zero_stage": 0}},
    )
    path = write_pipeline(tmp_path / "pipeline.toml", data)
    return path, records


def context(path) -> StageContext:
    pipeline = load_pipeline(path)
    return StageContext(pipeline, RunDir(pipeline.run_dir))


def counting_encodes(monkeypatch) -> list:
    calls = []
    original = EncodedCache.encode_part

    def encode_part(self, *args, **kwargs):
        calls.append(args[4:6])  # (rank, world)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EncodedCache, "encode_part", encode_part)
    return calls


def test_built_once_then_reused_memory_mapped_with_bad_records_named(json_pipeline, template, monkeypatch):
    path, records = json_pipeline
    ctx = context(path)
    calls = counting_encodes(monkeypatch)
    cache = encoded_cache(ctx, "stage1", template, SETTINGS)
    build_cache(ctx, "stage1", cache, template, SETTINGS, SINGLE)
    assert calls == [(0, 1)] and cache.is_complete()
    assert cache.directory.parent == ctx.run.root / "cache" / "encoded" / "stage1"
    assert cache.directory.name.startswith("pretrain-")
    assert not cache.build_directory(1).exists()

    # A rerun (another rank, a requeue) finds it complete: nothing is encoded again.
    again = encoded_cache(ctx, "stage1", template, SETTINGS)
    build_cache(ctx, "stage1", again, template, SETTINGS, SINGLE)
    assert calls == [(0, 1)] and again.directory == cache.directory

    report = cache.report()
    assert report["counts"] == {"records": 44, "encoded": 40, "truncated": 0, "skipped_bad_record": 3,
                                "skipped_overlong": 1, "encode_seconds_max_rank": report["counts"]["encode_seconds_max_rank"]}
    skipped = {s["id"]: s for s in cache.skipped()}
    source = str(load_pipeline(path).datasets["pretrain"].path)
    assert skipped["no-token"] == {"file": source, "position": 5, "id": "no-token", "kind": "bad_record",
                                   "field": "conversations",
                                   "reason": "the record has an image but no <image> in its turns"}
    assert skipped["no-answer"]["position"] == 10 and skipped["no-answer"]["field"] == "conversations"
    assert skipped["bad-image"]["field"] == "image" and skipped["bad-image"]["position"] == 15
    assert skipped["overlong"]["kind"] == "overlong" and skipped["overlong"]["position"] == 20

    before = pa.total_allocated_bytes()
    samples = cache.open()
    assert pa.total_allocated_bytes() - before < 4096  # the columns are views of the mapped files, not copies
    assert len(samples) == 40
    good_positions = [i for i, r in enumerate(records) if r["id"] not in skipped]
    assert samples.positions.tolist() == good_positions
    assert [samples.id(i) for i in range(3)] == [records[p]["id"] for p in good_positions[:3]]
    ids, labels = samples.tokens(0)
    assert ids.dtype == np.int32 and len(ids) == len(labels) and samples.lengths[0] == len(ids) + 15
    assert samples.image(0) == records[0]["image"]


def test_jsonl_with_a_broken_line_and_repeated_ids(tmp_path, template):
    """LLaVA-665K repeats some ids: each record trains, named by position. A line that is not JSON is skipped and
    named by its line; the records after it keep their file positions."""
    records = WORLD.records("pretrain")[:6]
    repeated = {**records[4], "id": records[1]["id"]}
    lines = [json.dumps(r) for r in records[:3]] + ['{"id": "cut-off", "conversations": [{"from"'] + \
        [json.dumps(records[3]), json.dumps(repeated)]
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = read_records(path)
    subset = {"max_samples": None}
    cache = EncodedCache(tmp_path / "cache", "mix", cache_spec(file_fingerprint(path), template, SETTINGS, subset))
    cache.encode_part(loaded, np.arange(len(loaded)), template, SETTINGS, 0, 1, str(path))
    cache.finalize(1, subset)
    samples = cache.open()
    assert samples.positions.tolist() == [0, 1, 2, 4, 5]
    assert [samples.id(i) for i in range(5)].count(records[1]["id"]) == 2
    (skip,) = cache.skipped()
    assert skip["position"] == 3 and skip["file"] == str(path) and skip["field"] == "<record>"
    assert "line 4 is not valid JSON" in skip["reason"]


def test_key_follows_the_data_file_max_length_and_template(json_pipeline, template):
    path, records = json_pipeline
    ctx = context(path)
    key = encoded_cache(ctx, "stage1", template, SETTINGS).key
    assert encoded_cache(ctx, "stage1", template, SETTINGS).key == key
    assert encoded_cache(ctx, "stage1", template, EncodeSettings(16, 64, "skip")).key != key
    assert encoded_cache(ctx, "stage1", template, EncodeSettings(16, 128, "truncate")).key != key
    assert encoded_cache(ctx, "stage1", template, EncodeSettings(8, 128, "skip")).key != key
    other_template = ConversationTemplate("chat_template", template.tokenizer)
    assert encoded_cache(ctx, "stage1", other_template, SETTINGS).key != key
    data_file = load_pipeline(path).datasets["pretrain"].path
    data_file.write_text(json.dumps(records[:-1]))
    assert encoded_cache(ctx, "stage1", template, SETTINGS).key != key
    ctx.pipeline.stages.stage1.max_samples = 10
    assert encoded_cache(ctx, "stage1", template, SETTINGS).key != encoded_cache(context(path), "stage1", template,
                                                                                 SETTINGS).key


def test_a_new_key_replaces_the_stages_old_cache_only(json_pipeline, template):
    path, records = json_pipeline
    ctx = context(path)
    old = encoded_cache(ctx, "stage1", template, SETTINGS)
    build_cache(ctx, "stage1", old, template, SETTINGS, SINGLE)
    other_stage = EncodedCache(ctx.run.root / "cache" / "encoded" / "stage2", "pretrain", old.spec)
    other_stage.encode_part(records, np.arange(len(records)), template, SETTINGS, 0, 1)
    other_stage.finalize(1, {})
    unfinished = old.directory.with_name(f".pretrain-{'0' * 16}.build-w2")
    unfinished.mkdir()
    lookalike = old.directory.with_name(f"pretrain-big-{'1' * 16}")  # another dataset whose name extends this one
    lookalike.mkdir()

    load_pipeline(path).datasets["pretrain"].path.write_text(json.dumps(records[:-1]))  # the data file changes
    new = encoded_cache(ctx, "stage1", template, SETTINGS)
    build_cache(ctx, "stage1", new, template, SETTINGS, SINGLE)
    assert new.key != old.key and new.is_complete()
    assert not old.directory.exists() and not unfinished.exists()
    assert lookalike.exists() and other_stage.is_complete()  # another dataset's, another stage's: kept


def encode(root, records, template, world, ranks=None):
    cache = EncodedCache(root, "data", cache_spec({"test": 1}, template, SETTINGS, {}))
    for rank in ranks if ranks is not None else range(world):
        cache.encode_part(records, np.arange(len(records)), template, SETTINGS, rank, world, "data.json")
    return cache


def test_two_ranks_build_the_same_cache_as_one(tmp_path, template):
    records = WORLD.records("pretrain")
    records[7] = bad_records(records)[0]
    one = encode(tmp_path / "one", records, template, world=1)
    one.finalize(1, {})
    two = encode(tmp_path / "two", records, template, world=2)
    two.finalize(2, {})
    assert [p["file"] for p in two.report()["parts"]] == ["part-00000-of-00002.arrow", "part-00001-of-00002.arrow"]
    assert two.open().table.equals(one.open().table) and one.report()["counts"]["encoded"] == 39
    assert two.skipped() == one.skipped() and one.skipped()[0]["position"] == 7


def test_a_dead_rank_never_leaves_a_complete_cache_and_a_requeue_keeps_finished_parts(tmp_path, template):
    records = WORLD.records("pretrain")
    cache = encode(tmp_path, records, template, world=2, ranks=[0])  # rank 1 died before writing its part
    with pytest.raises(FileNotFoundError, match="rank 1's part"):
        cache.finalize(2, {})
    assert not cache.is_complete() and not cache.directory.exists()
    part0 = cache.build_directory(2) / "part-00000-of-00002.arrow"
    written = part0.stat().st_mtime_ns
    encode(tmp_path, records, template, world=2)  # the requeue: rank 0's part is kept as it is
    assert part0.stat().st_mtime_ns == written
    cache.finalize(2, {})
    assert cache.is_complete() and len(cache.open()) == len(records)


def test_racing_jobs_leave_one_valid_cache(tmp_path, template):
    records = WORLD.records("pretrain")
    first = encode(tmp_path, records, template, world=1)
    second = encode(tmp_path, records, template, world=2)  # another job, same key, still building
    first.finalize(1, {})
    report = second.finalize(2, {})  # finds the published cache, discards its own copy
    assert report["world_size"] == 1 and not second.build_directory(2).exists()
    assert len(second.open()) == len(records)


def test_every_record_bad_fails_naming_the_first(json_pipeline, template):
    path, records = json_pipeline
    ctx = context(path)
    data_file = load_pipeline(path).datasets["pretrain"].path
    data_file.write_text(json.dumps(bad_records(records[:4])))
    ctx = context(path)
    cache = encoded_cache(ctx, "stage1", template, SETTINGS)
    with pytest.raises(NoUsableRecordsError, match=r"pretrain\.json: all 4 records were skipped \(3 malformed, 1 "
                                                   r"over-long\), e.g. position 0 id 'no-token' field conversations"):
        build_cache(ctx, "stage1", cache, template, SETTINGS, SINGLE)
    assert not cache.is_complete()


def test_seeded_subsets(json_pipeline, template):
    a, b, c = subset_positions(1000, 50, 0), subset_positions(1000, 50, 0), subset_positions(1000, 50, 1)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert a.tolist() != list(range(50)) and a.tolist() == sorted(set(a.tolist())) and len(a) == 50
    assert subset_positions(10, None, 0).tolist() == subset_positions(10, 20, 0).tolist() == list(range(10))

    path, records = json_pipeline
    ctx = context(path)
    dataset = ctx.pipeline.datasets["pretrain"]
    dataset.max_samples = 20
    chosen, positions = load_positioned_records("pretrain", dataset, SyntheticWorld.from_config(ctx.pipeline.synthetic))
    assert positions.tolist() == subset_positions(len(records), 20, 0).tolist()
    assert chosen == [records[p] for p in positions] and chosen != records[:20]
    dataset.subset_seed = 3
    assert load_positioned_records("pretrain", dataset, SyntheticWorld.from_config(ctx.pipeline.synthetic))[0] != chosen

    # The stage's subset is drawn from the dataset's and recorded beside the cache.
    ctx.pipeline.stages.stage1.max_samples = 12
    cache = encoded_cache(ctx, "stage1", template, SETTINGS)
    build_cache(ctx, "stage1", cache, template, SETTINGS, SINGLE)
    subset = json.loads((cache.directory / "subset.json").read_text())
    in_dataset = subset_positions(len(records), 20, 3)
    assert subset["positions"] == in_dataset[subset_positions(20, 12, 3)].tolist()
    assert subset["seed"] == 3 and subset["dataset_max_samples"] == 20 and subset["stage_max_samples"] == 12
    skipped = {s["position"] for s in cache.skipped()}
    assert cache.open().positions.tolist() == [p for p in subset["positions"] if p not in skipped]


def test_training_skips_bad_records_and_trains_on_exactly_the_rest(json_pipeline, monkeypatch):
    """3 malformed records, 1 over-long one and 1 whose image is not on disk, among 45: training runs on the other
    40 and one file names all 5 (file, position, id, field, why), in file order; a rerun redoes nothing."""
    from llava_hpc.orchestrate import Orchestrator

    path, records = json_pipeline
    pipeline = load_pipeline(path)
    no_file = {**records[0], "id": "no-file", "image": "pretrain/not-there.png"}
    records.insert(30, no_file)
    pipeline.datasets["pretrain"].path.write_text(json.dumps(records))
    calls = counting_encodes(monkeypatch)
    orchestrator = Orchestrator(pipeline, RunDir(pipeline.run_dir))
    outcomes = orchestrator.submit("features") + orchestrator.submit("stage1")
    assert all(o.action != "failed" for o in outcomes), [o.message for o in outcomes]
    summary = json.loads((pipeline.run_dir / "stage1" / "summary.json").read_text())
    assert summary["samples"] == 40 and summary["encoded_cache"]["counts"]["encoded"] == 41
    assert summary["skipped"]["by_kind"] == {"bad_record": 3, "overlong": 1, "image": 1}
    skipped = [json.loads(line) for line in (pipeline.run_dir / "stage1" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["position"], s["id"], s["field"]) for s in skipped] == [
        (5, "no-token", "conversations"), (10, "no-answer", "conversations"), (15, "bad-image", "image"),
        (20, "overlong", "conversations"), (30, "no-file", "image")]
    assert all(s["file"] == str(pipeline.datasets["pretrain"].path) for s in skipped)
    assert "image file missing" in skipped[-1]["reason"] and "not-there.png" in skipped[-1]["reason"]
    assert summary["data"]["skipped_missing_features"] == 1 and calls == [(0, 1)]
    assert os.path.isdir(summary["encoded_cache"]["path"])

    again = orchestrator.submit("features") + orchestrator.submit("stage1")
    assert [o.action for o in again] == ["skipped-done", "skipped-done"] and calls == [(0, 1)]


POOL_IN_A_JOB = """
import signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_encoded_cache import SETTINGS, WORLD, EncodedCache, cache_spec, ConversationTemplate, build_tiny_tokenizer
# As in a submitit job: SIGTERM is answered by a Python handler that carries on; USR2 would requeue the job.
signal.signal(signal.SIGTERM, lambda signum, frame: print("bypassing SIGTERM", file=sys.stderr))
signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit("a worker took the job's USR2"))
import llava_hpc.data.encoded as encoded
encode_span = encoded._encode_span
def checked_span(*args):
    # In each worker: SIGTERM must end it (the pool's terminate), USR2 and Ctrl-C are the parent's.
    got = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGINT))
    if got != (signal.SIG_DFL, signal.SIG_IGN, signal.SIG_IGN):
        raise RuntimeError(f"worker signal handlers: {{got}}")
    return encode_span(*args)
encoded._encode_span = checked_span
template = ConversationTemplate("plain", build_tiny_tokenizer(WORLD.vocabulary()))
records = WORLD.records("pretrain") * 100
cache = EncodedCache({root!r}, "data", cache_spec({{"test": 1}}, template, SETTINGS, {{}}))
cache.encode_part(records, np.arange(len(records)), template, SETTINGS, 0, 1, "data.json", workers=2)
print(cache.finalize(1, {{}})["counts"]["encoded"])
"""


def test_the_encoding_pool_ends_inside_a_job_that_bypasses_sigterm(tmp_path):
    """A job's handlers are inherited by the pool's forked workers: with submitit's SIGTERM bypass the pool's
    terminate could not end an idle worker (a 558K-record encode hung there, in a local-executor job), and a
    worker would answer Slurm's USR2 by requeueing the job. Workers run with the default SIGTERM, USR2 ignored."""
    import subprocess
    import sys

    script = POOL_IN_A_JOB.format(tests=str(Path(__file__).parent), root=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(len(WORLD.records("pretrain")) * 100)
