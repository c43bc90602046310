import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from llava_hpc.synthetic import (
    BACKGROUNDS,
    COLOUR_JITTER,
    COLOURS,
    IMAGE_TOKEN,
    SPLITS,
    SyntheticSpec,
    SyntheticWorld,
    split_words,
)

SMALL = SyntheticSpec(n_pretrain=60, n_instruct=60, n_bench=48)
COUNTING = replace(
    SMALL,
    max_count=3,
    instruct_categories=("colour", "position", "shape", "background", "count"),
    bench_categories=("colour", "position", "shape", "background", "count"),
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def all_scenes(world: SyntheticWorld):
    for split in SPLITS:
        for index in range(world.split_size(split)):
            yield split, index, world.scene(split, index)


def test_same_spec_gives_identical_data_and_another_seed_differs():
    first, second = SyntheticWorld(SMALL), SyntheticWorld(SMALL)
    for split in SPLITS:
        assert [first.image(split, i).tobytes() for i in range(10)] == [
            second.image(split, i).tobytes() for i in range(10)
        ]
    assert first.pretrain_records() == second.pretrain_records()
    assert first.instruct_records() == second.instruct_records()
    assert first.bench_questions() == second.bench_questions()

    other = SyntheticWorld(replace(SMALL, seed=1))
    assert [first.image("pretrain", i).tobytes() for i in range(10)] != [
        other.image("pretrain", i).tobytes() for i in range(10)
    ]
    assert first.instruct_records() != other.instruct_records()


def test_a_sample_does_not_depend_on_how_many_are_generated():
    small, large = SyntheticWorld(SMALL), SyntheticWorld(replace(SMALL, n_pretrain=3000, n_instruct=3000))
    assert small.scene("pretrain", 7) == large.scene("pretrain", 7)
    assert small.instruct_records()[:60] == large.instruct_records()[:60]


def test_splits_are_disjoint():
    world = SyntheticWorld(SMALL)
    images = {split: {world.image(split, i).tobytes() for i in range(48)} for split in SPLITS}
    assert not images["pretrain"] & images["instruct"]
    assert not images["pretrain"] & images["bench"]
    assert not images["instruct"] & images["bench"]


@pytest.mark.parametrize("spec", [SMALL, COUNTING, replace(COUNTING, image_size=32), replace(SMALL, image_size=97)])
def test_image_content_matches_the_scene(spec):
    world = SyntheticWorld(spec)
    size = spec.image_size
    for split, index, scene in all_scenes(world):
        image = pixels(world.image(split, index))
        assert image.shape == (size, size, 3)
        assert np.abs(np.array(scene.rgb) - COLOURS[scene.colour]).max() <= COLOUR_JITTER
        assert len(scene.centres) == scene.count and (scene.x, scene.y) == scene.centres[0]
        for x, y in scene.centres:
            assert tuple(image[y, x]) == scene.rgb
        background = BACKGROUNDS[scene.background]
        for y, x in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
            assert tuple(image[y, x]) == background
        drawn_columns = np.nonzero((image != background).any(axis=2).any(axis=0))[0]
        # The shape lies wholly in its half, with clear columns on both sides of the centre line.
        if scene.position == "left":
            assert drawn_columns.max() < size / 2 - 2
        else:
            assert drawn_columns.min() > size / 2 + 1
        assert set(map(tuple, image.reshape(-1, 3))) == {background, scene.rgb}


def test_copies_of_the_count_variant_do_not_touch():
    world = SyntheticWorld(COUNTING)
    counts = Counter()
    for split, index, scene in all_scenes(world):
        counts[scene.count] += 1
        tops = [y - scene.size // 2 for _, y in scene.centres]
        assert all(lower - upper >= scene.size for upper, lower in zip(tops, tops[1:]))
    assert set(counts) == {1, 2, 3}


def check_conversation(conversations):
    assert len(conversations) % 2 == 0 and conversations
    assert [turn["from"] for turn in conversations] == ["human", "gpt"] * (len(conversations) // 2)
    assert conversations[0]["value"].startswith(IMAGE_TOKEN + "\n")
    assert sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations) == 1


@pytest.mark.parametrize("spec", [SMALL, COUNTING])
def test_records_are_valid_llava_and_answers_match_the_scene(spec):
    world = SyntheticWorld(spec)
    for index, record in enumerate(world.pretrain_records()):
        assert record["id"] == f"pretrain-{index:06d}"
        assert record["image"] == world.image_path("pretrain", index)
        check_conversation(record["conversations"])
        assert len(record["conversations"]) == 2
        scene = world.scene("pretrain", index)
        caption = record["conversations"][1]["value"]
        for word in (scene.colour, scene.position, scene.background):
            assert word in split_words(caption)
        assert scene.shape in caption

    turns = Counter()
    for index, record in enumerate(world.instruct_records()):
        assert record["id"] == f"instruct-{index:06d}"
        assert record["image"] == world.image_path("instruct", index)
        check_conversation(record["conversations"])
        turns[len(record["conversations"]) // 2] += 1
        scene = world.scene("instruct", index)
        scene_words = {scene.colour, scene.position, scene.shape, scene.background}
        scene_words.add(("one", "two", "three")[scene.count - 1])
        for reply in record["conversations"][1::2]:
            assert reply["value"] in scene_words
    assert set(turns) == {1, 2, 3}


def test_bench_is_balanced_and_answers_are_choices():
    for spec in (SyntheticSpec(), COUNTING):
        world = SyntheticWorld(spec)
        questions = world.bench_questions()
        assert [q["question_id"] for q in questions] == list(range(spec.n_bench))
        per_category = Counter(q["category"] for q in questions)
        assert set(per_category) == set(spec.bench_categories)
        assert max(per_category.values()) - min(per_category.values()) <= 1
        for category in spec.bench_categories:
            answers = Counter(q["answer"] for q in questions if q["category"] == category)
            assert set(answers) == set(world.answer_choices(category))
            assert max(answers.values()) - min(answers.values()) <= 1
        for question in questions:
            assert IMAGE_TOKEN not in question["text"]
            assert question["image"] == world.image_path("bench", question["question_id"])
            scene = world.scene("bench", question["question_id"])
            if question["category"] != "count":
                assert question["answer"] == getattr(scene, question["category"])


def test_default_bench_asks_only_learnable_categories():
    world = SyntheticWorld(SyntheticSpec())
    assert {q["category"] for q in world.bench_questions()} == {"colour", "position"}
    assert len(world.answer_choices("colour")) == 6
    assert world.answer_choices("position") == ["left", "right"]


def test_vocabulary_covers_every_text():
    for spec in (SMALL, COUNTING):
        world = SyntheticWorld(spec)
        vocabulary = world.vocabulary()
        assert vocabulary == sorted(set(vocabulary))
        records = world.pretrain_records() + world.instruct_records()
        texts = [turn["value"] for record in records for turn in record["conversations"]]
        texts += [q["text"] for q in world.bench_questions()] + [q["answer"] for q in world.bench_questions()]
        used = {word for text in texts for word in split_words(text)} - {IMAGE_TOKEN}
        assert used <= set(vocabulary)
        assert len(vocabulary) < 80
    words = ["<image>", "what", "colour", "is", "it", ",", "left", "?"]
    assert split_words("<image>\nWhat colour is it, left?") == words


def test_load_image_inverts_image_path():
    world = SyntheticWorld(SMALL)
    for split in SPLITS:
        path = world.image_path(split, 5)
        assert path == f"{split}/000005.png"
        assert world.load_image(path).tobytes() == world.image(split, 5).tobytes()


@pytest.mark.parametrize(
    "path",
    ["pretrain/000060.png", "train/000001.png", "pretrain/1.png", "pretrain/000001.jpg", "/abs/bench/000001.png", ""],
)
def test_load_image_rejects_foreign_paths(path):
    with pytest.raises(ValueError, match=repr(path)):
        SyntheticWorld(SMALL).load_image(path)


def test_shuffled_images_are_a_derangement_and_keep_the_text():
    plain, shuffled = SyntheticWorld(SMALL), SyntheticWorld(replace(SMALL, shuffle_images=True))
    for split in ("pretrain", "instruct"):
        plain_records, shuffled_records = plain.records(split), shuffled.records(split)
        for before, after in zip(plain_records, shuffled_records):
            assert before["id"] == after["id"] and before["conversations"] == after["conversations"]
            assert before["image"] != after["image"]
        assert sorted(r["image"] for r in shuffled_records) == sorted(r["image"] for r in plain_records)
        assert shuffled.records(split) == shuffled_records
    assert shuffled.bench_questions() == plain.bench_questions()
    assert shuffled.image("pretrain", 3).tobytes() == plain.image("pretrain", 3).tobytes()


def test_write_round_trips(tmp_path):
    world = SyntheticWorld(replace(SMALL, n_pretrain=12, n_instruct=10, n_bench=8))
    paths = world.write(tmp_path)
    assert json.loads(paths["pretrain"].read_text()) == world.pretrain_records()
    assert json.loads(paths["instruct"].read_text()) == world.instruct_records()
    bench_lines = paths["bench"].read_text().splitlines()
    assert [json.loads(line) for line in bench_lines] == world.bench_questions()
    assert json.loads(paths["spec"].read_text())["n_pretrain"] == 12
    for split in SPLITS:
        files = sorted(paths[f"{split}_images"].iterdir())
        assert len(files) == world.split_size(split)
        for index, file in enumerate(files):
            assert file.relative_to(tmp_path).as_posix() == world.image_path(split, index)
            with Image.open(file) as written:
                assert written.mode == "RGB"
                assert written.tobytes() == world.image(split, index).tobytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_invalid_specs_are_refused():
    for bad in (
        dict(image_size=16),
        dict(bench_categories=("colour", "smell")),
        dict(bench_categories=()),
        dict(bench_categories=("count",)),
        dict(max_count=4),
        dict(n_pretrain=1, shuffle_images=True),
        dict(n_bench=10**6 + 1),
        dict(seed=-1),
    ):
        with pytest.raises(ValueError):
            SyntheticSpec(**bad)
    assert SyntheticSpec(bench_categories=["colour"]).bench_categories == ("colour",)
    world = SyntheticWorld(SMALL)
    with pytest.raises(ValueError):
        world.scene("test", 0)
    with pytest.raises(IndexError):
        world.scene("bench", 48)
    with pytest.raises(ValueError):
        world.records("bench")
