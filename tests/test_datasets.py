"""LLaVA JSON loading, feature-joined and raw-image datasets, collators, the length-grouped sampler."""

import json
import time

import numpy as np
import pytest
import torch

from llava_hpc.data.datasets import (
    Collator,
    FeatureConversationDataset,
    ImageConversationDataset,
    LengthGroupedSampler,
    PromptDataset,
    file_image_loader,
)
from llava_hpc.data.encoded import NoUsableRecordsError
from llava_hpc.data.features_io import FeatureStore, write_shard
from llava_hpc.data.llava_json import DatasetFileError, UnparsedLine, read_records
from llava_hpc.data.templates import IGNORE_INDEX, ConversationTemplate
from llava_hpc.model.builders import LlavaSpec, LLMSpec, build_llava
from llava_hpc.synthetic import SyntheticSpec, SyntheticWorld

WORLD = SyntheticWorld(SyntheticSpec(n_pretrain=12, n_instruct=12, n_bench=4))


@pytest.fixture(scope="module")
def built():
    model, tokenizer = build_llava(LlavaSpec(llm=LLMSpec(vocabulary=WORLD.vocabulary())))
    model.eval()
    return model, tokenizer, ConversationTemplate("chat_template", tokenizer)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    WORLD.write(root)
    return root


@pytest.fixture(scope="module")
def feature_store(built, world_dir, tmp_path_factory):
    """Features of the instruct split in two shards, as the features stage writes them (fp16)."""
    model, _, _ = built
    records = WORLD.records("instruct")
    load = file_image_loader(world_dir)
    with torch.no_grad():
        features = model.vision_tower(model.vision_tower.preprocess([load(r["image"]) for r in records])).numpy()
    directory = tmp_path_factory.mktemp("features")
    assert len({r["image"] for r in records}) == len(records)  # one row per image: no dedup needed here
    for shard, rows in enumerate([slice(0, 7), slice(7, None)]):
        chosen = records[rows]
        write_shard(directory, shard, images=[r["image"] for r in chosen], features=features[rows].astype(np.float16))
    return FeatureStore(directory)


# ----- LLaVA JSON -----


def test_read_records_json_and_jsonl(tmp_path, world_dir):
    records = read_records(world_dir / "instruct.json")
    assert records == WORLD.records("instruct")
    lines = tmp_path / "train.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + "\n")
    assert read_records(lines) == records[:3]


def test_records_keep_their_places_repeated_ids_and_all(tmp_path):
    """What a record holds is checked where it is used (skip and report); ids may repeat, as in LLaVA-665K's mix.
    A JSON Lines line that does not parse stays in its place, so later positions are still file positions."""
    same = {"id": "a", "conversations": []}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([same, 3, same]))
    assert read_records(path) == [same, 3, same]
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(same) + "\n{oops\n\n" + json.dumps(same) + "\n")
    first, broken, last = read_records(lines)
    assert first == last == same and isinstance(broken, UnparsedLine) and broken.line == 2
    assert "line 2 is not valid JSON" in broken.describe()


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('[{"id": "a", "conversations": []},\n {"id": ', ".json", "not valid JSON at line 2"),
        ('{"id": "a"}', ".json", "expected a JSON list"),
        (b"[\xff]", ".json", "not UTF-8"),
    ],
)
def test_unreadable_files_name_the_file_and_line(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetFileError) as info:
        read_records(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_json_file(tmp_path):
    with pytest.raises(DatasetFileError, match="dataset 'pretrain': .*nothing.json does not exist"):
        read_records(tmp_path / "nothing.json", "pretrain")


# ----- datasets -----


def test_feature_dataset_joins_by_id_and_matches_pixels(built, feature_store, world_dir):
    model, tokenizer, template = built
    records = WORLD.records("instruct")
    from_features = FeatureConversationDataset.from_records(records, feature_store, template, max_length=512)
    from_pixels = ImageConversationDataset(
        records, template, model.vision_tower.preprocess, file_image_loader(world_dir), model.num_patches, 512
    )
    assert len(from_features) == len(from_pixels) == len(records)
    item = from_features[0]
    assert item["image_features"].shape == (1, model.num_patches, 64) and item["image_features"].dtype == torch.float16
    assert from_features.lengths[0] == len(item["input_ids"]) + model.num_patches - 1

    collate = Collator(tokenizer.pad_token_id)
    a = collate([from_features[i] for i in range(4)])
    b = collate([from_pixels[i] for i in range(4)])
    assert a.ids == b.ids and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    with torch.no_grad():
        out_features, out_pixels = model(**a.model_inputs()), model(**b.model_inputs())
    assert abs(out_features.loss.item() - out_pixels.loss.item()) < 1e-3  # fp16 storage vs fp32 tower output


def test_samples_without_features_are_dropped_and_counted(built, feature_store):
    _, _, template = built
    records = WORLD.records("instruct")
    orphan = {**records[0], "id": "orphan", "image": "not-featurized.png"}
    text_only = {"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "yes"}]}
    dataset = FeatureConversationDataset.from_records(records + [orphan, text_only], feature_store, template, max_length=512)
    assert len(dataset) == len(records) + 1 and dataset.stats["skipped_missing_features"] == 1
    assert dataset.missing_features == [{"position": len(records), "id": "orphan", "image": "not-featurized.png"}]
    assert "image_features" not in dataset[len(dataset) - 1] and dataset.groups[-1] == -1
    assert list(dataset.groups[:7]) == [0] * 7 and list(dataset.groups[7:-1]) == [1] * 5
    with pytest.raises(KeyError, match="none of the"):
        FeatureConversationDataset.from_records([orphan], feature_store, template, max_length=512)


def test_overlong_samples_are_counted_per_policy(built, feature_store):
    _, _, template = built
    records = WORLD.records("instruct")
    limit = feature_store.num_patches + 20  # some samples fit, some do not
    truncated = FeatureConversationDataset.from_records(records, feature_store, template, max_length=limit, overlong="truncate")
    skipped = FeatureConversationDataset.from_records(records, feature_store, template, max_length=limit, overlong="skip")
    assert truncated.stats["truncated"] > 0 and max(truncated.lengths) <= limit
    assert skipped.stats["skipped_overlong"] == truncated.stats["truncated"] + truncated.stats["skipped_overlong"]
    assert 0 < len(skipped) < len(records) and len(skipped) + skipped.stats["skipped_overlong"] == len(records)
    assert all(s["kind"] == "overlong" and f"> max_length {limit}" in s["reason"] for s in skipped.skipped)


def test_bad_record_in_a_dataset_names_the_file(built, feature_store):
    _, _, template = built
    bad = {
        **WORLD.records("instruct")[0],
        "conversations": [{"from": "human", "value": "no image token"}, {"from": "gpt", "value": "red"}],
    }
    good = WORLD.records("instruct")[1]
    dataset = FeatureConversationDataset.from_records([bad, good], feature_store, template, 512, source="instruct.json")
    assert len(dataset) == 1 and dataset[0]["id"] == good["id"]
    assert dataset.skipped == [{"file": "instruct.json", "position": 0, "id": "instruct-000000", "kind": "bad_record",
                                "field": "conversations", "reason": "the record has an image but no <image> in its turns"}]
    # Every record bad: a wrong file or template, not a few bad records; the error names the first.
    with pytest.raises(NoUsableRecordsError, match=r"instruct\.json: all 1 records.*id 'instruct-000000' field conversations"):
        FeatureConversationDataset.from_records([bad], feature_store, template, 512, source="instruct.json")


def test_missing_image_file_names_the_file(built, tmp_path):
    model, _, template = built
    records = WORLD.records("instruct")[:2]
    dataset = ImageConversationDataset(
        records, template, model.vision_tower.preprocess, file_image_loader(tmp_path), model.num_patches, 512
    )
    with pytest.raises(FileNotFoundError) as info:
        dataset[1]
    assert str(tmp_path / records[1]["image"]) in str(info.value) and records[1]["id"] in str(info.value)


def test_prompts_collate_left_padded_for_generation(built, world_dir):
    model, tokenizer, template = built
    questions = WORLD.bench_questions()
    dataset = PromptDataset(questions, template, model.vision_tower.preprocess, file_image_loader(world_dir))
    batch = Collator(tokenizer.pad_token_id, padding_side="left")([dataset[i] for i in range(len(questions))])
    assert batch.ids == [q["question_id"] for q in questions] and batch.labels is None
    assert (batch.attention_mask[:, -1] == 1).all() and (batch.input_ids[:, -1] == batch.input_ids[0, -1]).all()
    assert batch.pixel_values.shape[0] == len(questions)
    generated = model.generate(**batch.model_inputs(), max_new_tokens=3, stop_token_ids=template.stop_token_ids)
    assert generated.shape[0] == len(questions)


def test_right_padding_collator(built):
    _, tokenizer, template = built
    items = [
        {"id": "a", "input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {
            "id": "b",
            "input_ids": torch.tensor([5]),
            "labels": torch.tensor([5]),
            "image_features": torch.zeros(1, 4, 2),
        },
    ]
    batch = Collator(tokenizer.pad_token_id)(items)
    assert batch.input_ids.tolist() == [[5, 6, 7], [5, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.image_features.shape == (1, 4, 2) and batch.pixel_values is None
    assert set(batch.to("cpu").model_inputs()) == {"input_ids", "attention_mask", "labels", "image_features"}
    with pytest.raises(ValueError, match="padding_side"):
        Collator(0, "middle")


def test_length_grouped_sampler():
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 500, size=103)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1, megabatch_mult=5)
    order = list(sampler)
    assert len(order) == len(sampler) == 104 and set(order) == set(range(103))
    batches = [order[i : i + 4] for i in range(0, 100, 4)]
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 100  # random batches of 4 from U(10, 500) spread ~290
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    ranks = [list(LengthGroupedSampler(lengths, 4, seed=1, megabatch_mult=5, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 52 and set(ranks[0]) | set(ranks[1]) == set(range(103))


def test_prefetch_decodes_the_shards_of_the_given_samples(built, feature_store):
    _, _, template = built
    store = FeatureStore(feature_store.directory, cache_shards=2)
    dataset = FeatureConversationDataset.from_records(WORLD.records("instruct"), store, template, max_length=512)
    assert list(dataset.groups[7:9]) == [1, 1]
    with store:
        dataset.prefetch([8, 9])  # both in shard 1: decoded in the background, before any read asks
        deadline = time.time() + 30
        while store.shard_loads == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert store.shard_loads == 1
        dataset[8]
        assert store.shard_loads == 1  # the read found the prefetched shard
        dataset.prefetch([0, 1, 8])
        dataset[0]
        assert store.shard_loads == 2
