"""The generate stage in-process on a tiny exported model: answer format and order, array tasks, resume, left padding,
bad images; and bench loading against the real LLaVA-Bench (COCO) questions file with fake images."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import LLAVA_EVAL, REQUIRE_EVAL_DATA, small_pipeline_dict, write_pipeline
from PIL import Image

from llava_hpc.config import load_pipeline
from llava_hpc.eval.benches import BenchFileError, load_bench
from llava_hpc.model.builders import build_llava
from llava_hpc.model.export import export_llava
from llava_hpc.orchestrate import Orchestrator
from llava_hpc.rundir import RunDir, read_jsonl
from llava_hpc.stages import StageContext
from llava_hpc.stages import generate as generate_stage
from llava_hpc.data.images import BadRecord
from llava_hpc.stages.common import llava_spec, load_trained_model, stage2_model_dir

QA90 = LLAVA_EVAL / "qa90_questions.jsonl"
needs_qa90 = pytest.mark.skipif(not REQUIRE_EVAL_DATA and not QA90.exists(), reason=f"{QA90} is not on this machine")
ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
# qa90's first four images (three questions each): stored without prefix, with prefix, missing, corrupt.
COCO_IMAGES = ("000000441147.jpg", "000000353536.jpg", "000000506095.jpg", "000000514915.jpg")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 20 bench questions in chunks of 8: three chunks, so two array tasks and resume have something to share.
    monkeypatch.setattr(generate_stage, "CHUNK_SIZE", 8)


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> Path:
    """A tiny random model of the test pipeline, exported once as stage 2 would."""
    root = tmp_path_factory.mktemp("export")
    pipeline = load_pipeline(write_pipeline(root / "pipeline.toml", small_pipeline_dict(root / "run")))
    model, tokenizer = build_llava(llava_spec(pipeline))
    return export_llava(model, tokenizer, model.vision_tower.image_processor, root / "model", pipeline.model.template)


def fake_coco_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(folder / COCO_IMAGES[0], "JPEG")
    Image.new("RGB", (12, 16), (30, 30, 200)).save(folder / f"COCO_val2014_{COCO_IMAGES[1]}", "JPEG")
    (folder / COCO_IMAGES[3]).write_bytes(b"not a jpeg")
    return folder


def coco_bench(images: Path, **extra) -> dict:
    return {
        "kind": "llava-bench-coco",
        "questions": str(QA90),
        "answers": str(LLAVA_EVAL / "qa90_gpt4_answer.jsonl"),
        "context": str(LLAVA_EVAL / "caps_boxes_coco2014_val_80.jsonl"),
        "rules": str(LLAVA_EVAL / "rule.json"),
        "images": str(images),
        **extra,
    }


def make_context(tmp_path, exported_model, **sections) -> StageContext:
    """A run directory whose stage 2 is done: the exported model copied into RUN/stage2/model."""
    generate = {"batch_size": 4, "max_new_tokens": 5, "array_tasks": 2, **sections.pop("generate", {})}
    data = small_pipeline_dict(tmp_path / "run", **sections)
    data["stages"]["generate"] = generate
    pipeline = load_pipeline(write_pipeline(tmp_path / "pipeline.toml", data))
    run = RunDir(pipeline.run_dir)
    ctx = StageContext(pipeline, run)
    shutil.copytree(exported_model, stage2_model_dir(run))
    run.mark_done(run.stage_dir("stage2"))
    return ctx


def run_all(ctx) -> list[dict]:
    return [generate_stage.run(ctx, task) for task in generate_stage.plan(ctx)]


def test_two_array_tasks_write_answers_in_question_order(tmp_path, exported_model):
    ctx = make_context(tmp_path, exported_model)
    tasks = generate_stage.plan(ctx)
    assert [t.payload for t in tasks] == [
        {"bench": "synthetic", "chunks": [0, 2]}, {"bench": "synthetic", "chunks": [1]}
    ]
    first = generate_stage.run(ctx, tasks[0])
    assert first == {"bench": "synthetic", "chunks_written": 2, "bench_done": False}
    assert not generate_stage.is_done(ctx)
    assert generate_stage.progress(ctx) == "synthetic: 12/20 answers"
    second = generate_stage.run(ctx, tasks[1])
    assert second["bench_done"] and generate_stage.is_done(ctx)

    out = ctx.run.stage_dir("generate") / "synthetic"
    answers = read_jsonl(out / "answers.jsonl")
    questions = load_bench("synthetic", ctx.pipeline.benches["synthetic"], ctx.pipeline).questions
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for answer, question in zip(answers, questions):
        assert set(answer) == ANSWER_KEYS
        assert answer["prompt"] == question["text"] and answer["model_id"] == "test/stage2"
        assert answer["answer_id"] == generate_stage.answer_id("test/stage2", question["question_id"], answer["text"])
        assert answer["metadata"] | {"new_tokens": 0} == {
            "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 5, "model_stage": "stage2", "new_tokens": 0
        }
        assert 1 <= answer["metadata"]["new_tokens"] <= 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == summary["questions"] == 20 and summary["bad_questions"] == 0
    assert summary["new_tokens"] == sum(a["metadata"]["new_tokens"] for a in answers) and summary["tokens_per_s"] > 0
    assert read_jsonl(out / "bad_questions.jsonl") == []
    assert sorted(row["chunk"] for row in read_jsonl(out / "metrics.jsonl")) == [0, 1, 2]
    assert generate_stage.progress(ctx) == "synthetic: 20/20 answers"
    assert generate_stage.plan(ctx) == []


def test_resume_recomputes_only_the_missing_chunk(tmp_path, exported_model):
    ctx = make_context(tmp_path, exported_model)
    run_all(ctx)
    out = ctx.run.stage_dir("generate") / "synthetic"
    before = (out / "answers.jsonl").read_text()
    (out / "part-00001.jsonl").unlink()  # a task killed between its answers and ...
    (out / "_SUCCESS").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-0000[02].*")}

    tasks = generate_stage.plan(ctx)
    assert [t.payload for t in tasks] == [{"bench": "synthetic", "chunks": [1]}]
    assert generate_stage.run(ctx, tasks[0]) == {"bench": "synthetic", "chunks_written": 1, "bench_done": True}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-0000[02].*")} == kept
    assert sorted(row["chunk"] for row in read_jsonl(out / "metrics.jsonl")) == [0, 1, 1, 2]
    assert (out / "answers.jsonl").read_text() == before  # greedy: the same answers, the same answer ids


def test_chunks_of_other_settings_are_redone(tmp_path, exported_model):
    ctx = make_context(tmp_path, exported_model)
    run_all(ctx)
    (ctx.run.stage_dir("generate") / "synthetic" / "_SUCCESS").unlink()
    pipeline = ctx.pipeline.model_copy(deep=True)
    pipeline.stages.generate.max_new_tokens = 3
    changed = StageContext(pipeline, ctx.run)
    assert [t.payload["chunks"] for t in generate_stage.plan(changed)] == [[0, 2], [1]]
    run_all(changed)
    answers = read_jsonl(ctx.run.stage_dir("generate") / "synthetic" / "answers.jsonl")
    assert {a["metadata"]["max_new_tokens"] for a in answers} == {3}


def test_plan_deals_every_chunk_while_the_model_is_not_trained(tmp_path, exported_model):
    ctx = make_context(tmp_path, exported_model)
    ctx.run.clear_done(ctx.run.stage_dir("stage2"))
    assert [t.payload["chunks"] for t in generate_stage.plan(ctx)] == [[0, 2], [1]]


def test_batched_answers_equal_one_by_one(tmp_path, exported_model):
    ctx = make_context(tmp_path, exported_model)
    model, template, _ = load_trained_model(ctx, "stage2", "cpu")
    data = load_bench("synthetic", ctx.pipeline.benches["synthetic"], ctx.pipeline)
    questions = data.questions[:10]
    # One text-only question: its row has no image embeddings and is much shorter, the hardest case for padding.
    questions[3] = {**questions[3], "image": None}
    items, bad = generate_stage.prepare_prompts(questions, template, model.vision_tower.preprocess, data.load_image)
    assert bad == [] and len({len(item["input_ids"]) for item in items}) > 1
    batched = generate_stage.generate_batched(model, template, items, batch_size=10, max_new_tokens=8)
    alone = generate_stage.generate_batched(model, template, items, batch_size=1, max_new_tokens=8)
    assert batched == alone


@needs_qa90
def test_bad_images_are_listed_and_skipped(tmp_path, exported_model):
    images = fake_coco_images(tmp_path / "coco")
    ctx = make_context(
        tmp_path, exported_model, benches={"coco": coco_bench(images, max_questions=12)},
        generate={"array_tasks": 1, "benches": ["coco"]},
    )
    assert [r["bench_done"] for r in run_all(ctx)] == [True]
    out = ctx.run.stage_dir("generate") / "coco"
    assert [a["question_id"] for a in read_jsonl(out / "answers.jsonl")] == [0, 1, 2, 3, 4, 5]
    bad = read_jsonl(out / "bad_questions.jsonl")
    assert [b["question_id"] for b in bad] == [6, 7, 8, 9, 10, 11]
    assert all("missing" in b["reason"] and COCO_IMAGES[2] in b["reason"] for b in bad[:3])
    assert all("corrupt" in b["reason"] and COCO_IMAGES[3] in b["reason"] for b in bad[3:])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n"], summary["bad_questions"], summary["questions"]) == (6, 6, 12)
    assert generate_stage.progress(ctx) == "coco: 6/12 answers, 6 bad questions"


def test_orchestrator_runs_generate_on_the_debug_executor(tmp_path, exported_model):
    ctx = make_context(tmp_path, exported_model)
    outcomes = Orchestrator(ctx.pipeline, ctx.run).submit("generate")
    assert [o.action for o in outcomes] == ["submitted"] and generate_stage.is_done(ctx)
    assert len(read_jsonl(ctx.run.stage_dir("generate") / "synthetic" / "answers.jsonl")) == 20


# ----- bench loading -----


@needs_qa90
def test_coco_questions_and_images_with_or_without_prefix(tmp_path):
    images = fake_coco_images(tmp_path / "coco")
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", small_pipeline_dict(
        tmp_path / "run", benches={"coco": coco_bench(images)})))
    data = load_bench("coco", pipeline.benches["coco"], pipeline)
    assert len(data.questions) == 90 and not data.exact
    assert data.questions[0] == {
        "question_id": 0, "image": COCO_IMAGES[0], "text": "What is the color of the two suitcases in the image?",
        "category": "conv",
    }
    assert {q["category"] for q in data.questions} == {"conv", "detail", "complex"}
    assert data.load_image(COCO_IMAGES[0]).size == (16, 12)  # stored as named
    assert data.load_image(COCO_IMAGES[1]).size == (12, 16)  # stored with the COCO_val2014_ prefix
    with pytest.raises(FileNotFoundError, match=f"{COCO_IMAGES[2]}.*also tried .*COCO_val2014_{COCO_IMAGES[2]}"):
        data.load_image(COCO_IMAGES[2])
    with pytest.raises(BadRecord, match=f"corrupt image .*{COCO_IMAGES[3]}"):
        data.load_image(COCO_IMAGES[3])
    with pytest.raises(BadRecord, match="escapes"):
        data.load_image("../../etc/passwd")
    with pytest.raises(ValueError, match="needs the judge"):
        data.choices("conv")


@needs_qa90
def test_wild_bench_tries_no_prefix_and_bad_question_files_name_the_line(tmp_path):
    images = fake_coco_images(tmp_path / "images")
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", small_pipeline_dict(
        tmp_path / "run", benches={"wild": coco_bench(images) | {"kind": "llava-bench-wild"}})))
    data = load_bench("wild", pipeline.benches["wild"], pipeline)
    with pytest.raises(FileNotFoundError) as missing:
        data.load_image(COCO_IMAGES[1])
    assert "also tried" not in str(missing.value)

    broken = tmp_path / "questions.jsonl"
    broken.write_text(QA90.read_text().splitlines()[0] + '\n{"question_id": 1, "image": "a.jpg"}\n')
    bench = pipeline.benches["wild"].model_copy(update={"questions": broken})
    with pytest.raises(BenchFileError, match=r"questions.jsonl:2: missing text, category"):
        load_bench("wild", bench, pipeline)


def test_folder_bench_asks_every_image_in_sorted_order(tmp_path):
    root = tmp_path / "landing"
    for relative in ("b/2.png", "a/1.jpg", "top.JPEG", "a/notes.txt"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith("txt"):
            (root / relative).write_text("not an image")
        else:
            Image.new("RGB", (4, 4)).save(root / relative, "PNG")
    bench = {"kind": "folder", "images": str(root), "question": "Is it safe to land here?"}
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", small_pipeline_dict(
        tmp_path / "run", benches={"landing": bench})))
    data = load_bench("landing", pipeline.benches["landing"], pipeline)
    assert data.questions == [
        {"question_id": "a/1.jpg", "image": "a/1.jpg", "text": "Is it safe to land here?", "category": "a"},
        {"question_id": "b/2.png", "image": "b/2.png", "text": "Is it safe to land here?", "category": "b"},
        {"question_id": "top.JPEG", "image": "top.JPEG", "text": "Is it safe to land here?", "category": "folder"},
    ]
    assert data.load_image("b/2.png").size == (4, 4)


def test_synthetic_bench_has_exact_answers_and_choices(tmp_path):
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", small_pipeline_dict(
        tmp_path / "run", benches={"synthetic": {"kind": "synthetic", "max_questions": 7}})))
    data = load_bench("synthetic", pipeline.benches["synthetic"], pipeline)
    assert data.exact and len(data.questions) == 7
    assert data.questions[0]["answer"] in data.choices(data.questions[0]["category"])
    assert data.load_image(data.questions[0]["image"]).size == (64, 64)
    with pytest.raises(BadRecord, match="not an image of this synthetic world"):
        data.load_image("bench/999999.png")
