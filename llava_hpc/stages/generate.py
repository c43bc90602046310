"""Generate stage: every bench's questions answered by the trained model, in the reference answer format.

Answers are generated many questions at a time with the KV cache: prompts are LEFT-padded so every row continues
from its own last real token, and questions are taken in order of prompt length so a batch pads little. Greedy
(temperature 0) answers equal one-question-at-a-time answers, the reference's way (benchmarks/bench_generate.py
measures both).

The work is cut into chunks of CHUNK_SIZE questions of the length order (chunk c = the questions ranked
[c*CHUNK_SIZE, (c+1)*CHUNK_SIZE) by prompt length); a job array's tasks take chunks round-robin. A chunk is
`part-CCCCC.jsonl` (its answers) and then `part-CCCCC.json` (its question ids, bad questions, timing and the
generation key), each written atomically; the `.json`, written last, is the chunk's completion marker. The key is a
hash of the model's files, the generation settings and the questions, so a requeued or resubmitted task redoes
only chunks that are missing or were made by another model or settings, and stale answers are never merged.
Whichever task finishes the last chunk writes `answers.jsonl` (question order), `bad_questions.jsonl`,
`summary.json` and `_SUCCESS`.

A question whose image is missing or corrupt is listed in `bad_questions.jsonl` with the reason and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING


from llava_hpc import faults
from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.eval.benches import BenchData, load_bench
from llava_hpc.rundir import append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl
from llava_hpc.stages import Stage, StageContext, Task, deal_out
from llava_hpc.data.images import BadRecord
from llava_hpc.stages.common import (
    compute_device,
    load_trained_model,
    model_preflight,
    stage1_projector_path,
    stage2_model_dir,
)

if TYPE_CHECKING:  # torch and the model only where answers are generated: planning and status stay light
    import torch

    from llava_hpc.model.llava import LlavaForCausalLM

log = logging.getLogger("llava_hpc.generate")

CHUNK_SIZE = 64


def output_dir(ctx: StageContext, bench: str) -> Path:
    return ctx.run.stage_dir("generate") / bench


def is_done(ctx: StageContext) -> bool:
    return all(ctx.run.is_done(output_dir(ctx, name)) for name in ctx.pipeline.generate_benches())


def not_applicable(ctx: StageContext) -> str | None:
    return None if ctx.pipeline.generate_benches() else "no bench in this pipeline"


def needs(ctx: StageContext) -> list[str]:
    """Answers come from the stage-2 model, or from the stage-1 projector on the base LLM."""
    return [ctx.pipeline.stages.generate.model]


def reset(ctx: StageContext) -> None:
    """--force: forget finished chunks too, so every answer is generated again."""
    for name in ctx.pipeline.generate_benches():
        for path in output_dir(ctx, name).glob("part-*"):
            path.unlink()


def preflight(ctx: StageContext) -> list[str]:
    # The stage-2 model is exported with its tokenizer and vision tower; with stage 1's projector the base models load.
    return model_preflight(ctx.pipeline) if ctx.pipeline.stages.generate.model == "stage1" else []


def _load_bench(ctx: StageContext, name: str) -> BenchData:
    return load_bench(name, ctx.pipeline.benches[name], ctx.pipeline)


def _chunk_count(n_questions: int) -> int:
    return math.ceil(n_questions / CHUNK_SIZE)


def _chunk_paths(directory: Path, chunk: int) -> tuple[Path, Path]:
    """(answers, marker) of one chunk."""
    return directory / f"part-{chunk:05d}.jsonl", directory / f"part-{chunk:05d}.json"


def _finished_chunk(directory: Path, chunk: int, key: str) -> dict | None:
    """The chunk's marker if the chunk is done under this generation key, else None."""
    answers, marker = _chunk_paths(directory, chunk)
    if not (marker.exists() and answers.exists()):
        return None
    meta = json.loads(marker.read_text())
    return meta if meta["key"] == key else None


def _missing_chunks(directory: Path, count: int, key: str) -> list[int]:
    return [c for c in range(count) if _finished_chunk(directory, c, key) is None]


def generation_key(ctx: StageContext, bench: str, questions: list[dict]) -> str:
    """What a chunk's answers depend on: the model's files (name, size, mtime), the model settings, the generation
    settings and the questions. Batch size is left out: it changes speed, not (greedy) answers."""
    settings = ctx.pipeline.stages.generate
    source = stage2_model_dir(ctx.run) if settings.model == "stage2" else stage1_projector_path(ctx.run)
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    fingerprint = [
        (p.relative_to(source.parent).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()
    ]
    described = {
        "model": settings.model,
        "files": fingerprint,
        "model_config": ctx.pipeline.model.model_dump(mode="json"),
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "chunk_size": CHUNK_SIZE,
        "bench": ctx.pipeline.benches[bench].model_dump(mode="json"),
        "questions": questions,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_ready(ctx: StageContext) -> bool:
    return ctx.run.is_done(ctx.run.stage_dir(ctx.pipeline.stages.generate.model))


def plan(ctx: StageContext) -> list[Task]:
    settings = ctx.pipeline.stages.generate
    tasks: list[Task] = []
    for name in ctx.pipeline.generate_benches():
        directory = output_dir(ctx, name)
        if ctx.run.is_done(directory):
            continue
        try:
            data = _load_bench(ctx, name)
        except (OSError, ValueError) as exc:
            if not ctx.dry_run:
                raise
            ctx.warnings.append(f"generate: bench {name!r}: {exc}; planned {settings.array_tasks} task(s)")
            tasks.extend(Task(stage="generate", index=len(tasks) + k, label=f"{name} {k + 1}/{settings.array_tasks}",
                              payload={"bench": name, "chunks": []}) for k in range(settings.array_tasks))
            continue
        count = _chunk_count(len(data.questions))
        if _model_ready(ctx):
            chunks = _missing_chunks(directory, count, generation_key(ctx, name, data.questions))
        else:
            # The model is still to be trained (a chain is queued at once), so the key is not known yet: deal every
            # chunk out; each task skips the chunks it finds done under the key of the model it loads.
            chunks = list(range(count))
        shares = deal_out(chunks, settings.array_tasks)
        tasks.extend(
            Task(stage="generate", index=len(tasks) + k,
                 label=f"{name} {k + 1}/{len(shares)} ({len(mine)} chunks of {CHUNK_SIZE} questions)",
                 payload={"bench": name, "chunks": mine})
            for k, mine in enumerate(shares)
        )
    return tasks


def run(ctx: StageContext, task: Task) -> dict:
    name = task.payload["bench"]
    directory = output_dir(ctx, name)
    directory.mkdir(parents=True, exist_ok=True)
    data = _load_bench(ctx, name)
    key = generation_key(ctx, name, data.questions)
    atomic_write_json(
        directory / "plan.json",
        {"questions": len(data.questions), "chunks": _chunk_count(len(data.questions)), "key": key},
    )
    todo = [c for c in task.payload["chunks"] if _finished_chunk(directory, c, key) is None]
    if todo:
        _generate_chunks(ctx, data, directory, todo, key)
    finalized = finalize(ctx, name, data, key)
    return {"bench": name, "chunks_written": len(todo), "bench_done": finalized}


def length_order(questions: list[dict], template: ConversationTemplate, num_patches: int) -> list[int]:
    """Question indices by prompt length (an image counts its patch embeddings), ties in question order."""
    lengths = []
    for question in questions:
        has_image = question.get("image") is not None
        ids = template.prompt_ids(question["text"], image=has_image)
        lengths.append(len(ids) + (num_patches - 1 if has_image else 0))
    return sorted(range(len(questions)), key=lambda i: (lengths[i], i))


def prepare_prompts(
    questions: list[dict], template: ConversationTemplate, preprocess, load_image, workers: int = 2
) -> tuple[list[dict], list[dict]]:
    """(prompt items for `generate_batched`, bad questions). Images are read in threads; a question whose image is
    missing or corrupt becomes a bad-question record with the reason instead of an item."""
    from llava_hpc.data.datasets import PromptDataset

    dataset = PromptDataset(questions, template, preprocess, load_image)

    def item(index: int):
        try:
            return dataset[index]
        except (BadRecord, FileNotFoundError) as exc:
            return exc

    items, bad = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for question, result in zip(questions, pool.map(item, range(len(questions)))):
            if isinstance(result, Exception):
                image = question.get("image")
                bad.append({"question_id": question["question_id"], "image": image, "reason": str(result)})
            else:
                items.append(result)
    return items, bad


def count_new_tokens(row: list[int], stop_token_ids: list[int]) -> int:
    """Tokens the model produced for one row: through its first stop token (rows are pad-filled after it)."""
    for position, token in enumerate(row):
        if token in stop_token_ids:
            return position + 1
    return len(row)


def generate_batched(
    model: LlavaForCausalLM,
    template: ConversationTemplate,
    items: list[dict],
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str | torch.device = "cpu",
) -> list[tuple[str, int]]:
    """(answer text, new tokens) per prompt item, in item order; items are `PromptDataset` items."""
    from llava_hpc.data.datasets import Collator

    collate = Collator(model.pad_token_id, padding_side="left")
    outputs = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size]).to(device)
        generated = model.generate(
            **batch.model_inputs(),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=template.stop_token_ids,
        )
        for row in generated.tolist():
            outputs.append((template.decode_answer(row), count_new_tokens(row, template.stop_token_ids)))
    return outputs


def answer_id(model_id: str, question_id, text: str) -> str:
    """Deterministic (the reference draws a random shortuuid): the same answer gets the same id on every rerun."""
    return hashlib.sha256(json.dumps([model_id, question_id, text]).encode()).hexdigest()[:22]


def answer_line(question: dict, text: str, new_tokens: int, model_id: str, ctx: StageContext) -> dict:
    settings = ctx.pipeline.stages.generate
    return {
        "question_id": question["question_id"],
        "prompt": question["text"],
        "text": text,
        "answer_id": answer_id(model_id, question["question_id"], text),
        "model_id": model_id,
        "metadata": {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens,
            "model_stage": settings.model,
            "new_tokens": new_tokens,
        },
    }


def _generate_chunks(ctx: StageContext, data: BenchData, directory: Path, chunks: list[int], key: str) -> None:
    import torch
    from tqdm import tqdm

    settings = ctx.pipeline.stages.generate
    device, dtype = compute_device()
    model, template, model_id = load_trained_model(ctx, settings.model, device)
    model.to(dtype)
    order = length_order(data.questions, template, model.num_patches)
    workers = int(os.environ.get("SLURM_CPUS_PER_TASK", "2"))
    sizes = {c: len(order[c * CHUNK_SIZE : (c + 1) * CHUNK_SIZE]) for c in chunks}
    bar = tqdm(total=sum(sizes.values()), desc=f"generate {data.name}", unit="question", mininterval=10)
    for chunk in chunks:
        if _finished_chunk(directory, chunk, key) is not None:  # another task or an earlier attempt made it
            bar.update(sizes[chunk])
            continue
        questions = [data.questions[i] for i in order[chunk * CHUNK_SIZE : (chunk + 1) * CHUNK_SIZE]]
        started = time.time()
        items, bad = prepare_prompts(questions, template, model.vision_tower.preprocess, data.load_image, workers)
        generating = time.time()
        # Sampling (temperature > 0) is seeded per chunk, so a redone chunk gives the answers it gave before.
        torch.manual_seed(chunk)
        outputs = generate_batched(
            model, template, items, settings.batch_size, settings.max_new_tokens,
            settings.temperature, settings.top_p, device,
        )
        finished = time.time()
        by_id = {q["question_id"]: q for q in questions}
        rows = [answer_line(by_id[item["id"]], text, n, model_id, ctx) for item, (text, n) in zip(items, outputs)]
        new_tokens = sum(n for _, n in outputs)
        answers_path, marker_path = _chunk_paths(directory, chunk)
        atomic_write_jsonl(answers_path, rows)
        meta = {
            "key": key,
            "chunk": chunk,
            "model_id": model_id,
            "question_ids": [q["question_id"] for q in questions],
            "answered": len(rows),
            "bad": bad,
            "seconds": round(finished - started, 3),
            "generate_seconds": round(finished - generating, 3),
            "new_tokens": new_tokens,
        }
        atomic_write_json(marker_path, meta)
        append_jsonl(
            directory / "metrics.jsonl",
            {"chunk": chunk, "questions": len(questions), "answered": len(rows), "bad": len(bad),
             "seconds": meta["seconds"], "new_tokens": new_tokens, "batch_size": settings.batch_size,
             "tokens_per_s": round(new_tokens / max(finished - generating, 1e-9), 1), "time": time.time()},
        )
        log.info("%s chunk %d: %d answers, %d bad, %.1f new tokens/s", data.name, chunk, len(rows), len(bad),
                 new_tokens / max(finished - generating, 1e-9))
        bar.update(len(questions))
        faults.pause("after_chunk")
    bar.close()


def finalize(ctx: StageContext, name: str, data: BenchData, key: str) -> bool:
    """Once every chunk is done: merge into answers.jsonl in question order, with bad questions and a summary, then
    `_SUCCESS`. Idempotent, so whichever task finishes last does it (two at once write the same bytes)."""
    directory = output_dir(ctx, name)
    count = _chunk_count(len(data.questions))
    metas = [_finished_chunk(directory, c, key) for c in range(count)]
    missing = [c for c, meta in enumerate(metas) if meta is None]
    if missing:
        log.info("%s: %d of %d chunks still to do", name, len(missing), count)
        return False
    position = {q["question_id"]: i for i, q in enumerate(data.questions)}
    rows = sorted(
        (row for c in range(count) for row in read_jsonl(_chunk_paths(directory, c)[0])),
        key=lambda row: position[row["question_id"]],
    )
    bad = sorted((b for meta in metas for b in meta["bad"]), key=lambda b: position[b["question_id"]])
    covered = sorted(position[q] for q in [r["question_id"] for r in rows] + [b["question_id"] for b in bad])
    if covered != list(range(len(data.questions))):
        raise RuntimeError(f"{directory}: the chunks do not hold each of the {len(data.questions)} questions once")
    atomic_write_jsonl(directory / "bad_questions.jsonl", bad)
    if not rows:
        raise RuntimeError(
            f"bench {name!r}: no question could be answered, every image failed ({bad[0]['reason']}); "
            f"see {directory / 'bad_questions.jsonl'}"
        )
    atomic_write_jsonl(directory / "answers.jsonl", rows)
    settings = ctx.pipeline.stages.generate
    generate_seconds = sum(meta["generate_seconds"] for meta in metas)
    new_tokens = sum(meta["new_tokens"] for meta in metas)
    summary = {
        "bench": name,
        "questions": len(data.questions),
        "n": len(rows),
        "bad_questions": len(bad),
        "model_id": metas[0]["model_id"],
        "model_stage": settings.model,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "chunks": count,
        "seconds": round(sum(meta["seconds"] for meta in metas), 3),
        "generate_seconds": round(generate_seconds, 3),
        "new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / max(generate_seconds, 1e-9), 1),
    }
    atomic_write_json(directory / "summary.json", summary)
    ctx.run.mark_done(directory, summary)
    return True


def progress(ctx: StageContext) -> str | None:
    notes = []
    for name in ctx.pipeline.generate_benches():
        directory = output_dir(ctx, name)
        if (directory / "summary.json").exists():
            summary = json.loads((directory / "summary.json").read_text())
            note = f"{name}: {summary['n']}/{summary['questions']} answers"
            if summary["bad_questions"]:
                note += f", {summary['bad_questions']} bad questions"
            notes.append(note)
        elif (directory / "plan.json").exists():
            plan_info = json.loads((directory / "plan.json").read_text())
            metas = [_finished_chunk(directory, c, plan_info["key"]) for c in range(plan_info["chunks"])]
            answered = sum(meta["answered"] for meta in metas if meta is not None)
            notes.append(f"{name}: {answered}/{plan_info['questions']} answers")
    return "; ".join(notes) or None


STAGE = Stage(name="generate", after=("stage2",), plan=plan, run=run, is_done=is_done, progress=progress, reset=reset,
              preflight=preflight, not_applicable=not_applicable, needs=needs)
