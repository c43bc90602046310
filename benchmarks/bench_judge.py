"""Judge throughput (concurrent vs sequential) and the cost of one LLaVA-Bench (COCO) run, sync vs Batch API.

1. Throughput: the 90 real LLaVA-Bench (COCO) judge requests (qa90 + captions/boxes + rules, made-up candidate
   answers) sent through the sync transport and the real openai client to the local stub server answering every
   request after a fixed latency (200 ms, a fast real judge takes 2-10 s: the ratio is what carries over).
   Sequential (max_concurrency 1, the reference's loop) vs 8 and 16 at a time, in one run.
2. Cost: the dry-run estimate of the same bench for each model in the price table, sync and via the Batch API,
   text-only (the reference protocol) and with the image (the seed's variant; 640x480 stand-in images, the size of
   most COCO val2014 pictures). Estimates: characters / 4, OpenAI's image tile rule, 167 completion tokens a review.

    .venv/bin/python benchmarks/bench_judge.py [--latency-ms 200] [--data /work/shared/data/llava-eval]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_stub import OpenAIStub  # noqa: E402  (the test server lives with the tests)

from llava_hpc.config import load_pipeline  # noqa: E402
from llava_hpc.eval.bench_judging import BenchJudging, read_candidate_answers  # noqa: E402
from llava_hpc.eval.benches import load_bench  # noqa: E402
from llava_hpc.eval.judge import PRICES_PER_MILLION  # noqa: E402
from llava_hpc.eval.judge_estimate import dry_run_estimate  # noqa: E402
from llava_hpc.eval.judge_transport import SyncTransport, make_client  # noqa: E402
from llava_hpc.rundir import RunDir, atomic_write_jsonl  # noqa: E402
from llava_hpc.stages import StageContext  # noqa: E402

BENCH = "llava-bench"
PRICED_MODELS = ["gpt-4o-2024-11-20", "gpt-4o-mini", "gpt-4.1", "gpt-4-turbo"]


def coco_context(root: Path, data: Path, model: str = "gpt-4o-2024-11-20", include_image: bool = False,
                 base_url: str | None = None) -> StageContext:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    pipeline = {
        "name": "bench-judge", "run_dir": str(root / "run"), "executor": "debug",
        "benches": {BENCH: {"kind": "llava-bench-coco", "questions": str(data / "qa90_questions.jsonl"),
                            "answers": str(data / "qa90_gpt4_answer.jsonl"),
                            "context": str(data / "caps_boxes_coco2014_val_80.jsonl"),
                            "rules": str(data / "rule.json"), "images": str(images)}},
        "judge": {"model": model, "include_image": include_image, "api_key_env": "BENCH_JUDGE_KEY",
                  **({"base_url": base_url} if base_url else {})},
    }
    path = root / "pipeline.toml"
    path.write_text(tomli_w.dumps(pipeline))
    loaded = load_pipeline(path)
    return StageContext(loaded, RunDir(loaded.run_dir))


def made_up_answers(ctx: StageContext) -> None:
    """A candidate answer per question, of a typical small model's length (about 60 words)."""
    questions = load_bench(BENCH, ctx.pipeline.benches[BENCH], ctx.pipeline).questions
    sentence = "The image shows a scene with several objects, and the answer describes them in some detail. "
    directory = ctx.run.stage_dir("generate") / BENCH
    atomic_write_jsonl(directory / "answers.jsonl", [
        {"question_id": q["question_id"], "prompt": q["text"], "text": sentence * 4,
         "answer_id": f"a{q['question_id']}", "model_id": "made-up/stage2", "metadata": {}} for q in questions])
    ctx.run.mark_done(directory)


def throughput(data: Path, latency_s: float) -> list[tuple[int, float]]:
    with tempfile.TemporaryDirectory() as tmp, OpenAIStub() as stub:
        stub.script.latency_s = latency_s
        ctx = coco_context(Path(tmp), data, base_url=stub.url)
        made_up_answers(ctx)
        judging = BenchJudging(ctx.pipeline, ctx.run, BENCH)
        answers = read_candidate_answers(ctx.run.stage_dir("generate") / BENCH / "answers.jsonl",
                                         {q["question_id"] for q in judging.data.questions})
        requests = [item.request(judging.settings, 1) for item in judging.items(answers, judging.table_references)]
        client = make_client(stub.url, "sk-bench", max_retries=2, timeout_s=30)
        rows = []
        for concurrency in (1, 8, 16):
            started = time.perf_counter()
            failures = SyncTransport(client, concurrency).complete(requests, lambda key, reply: None)
            assert not failures, failures[:1]
            rows.append((concurrency, time.perf_counter() - started))
        return rows


def stand_in_images(root: Path, ctx: StageContext) -> None:
    for question in load_bench(BENCH, ctx.pipeline.benches[BENCH], ctx.pipeline).questions:
        Image.new("RGB", (640, 480), (120, 110, 100)).save(root / "images" / question["image"])


def cost_rows(data: Path) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for include_image in (False, True):
            for model in PRICED_MODELS:
                root = Path(tmp) / f"{model}-{include_image}"
                ctx = coco_context(root, data, model=model, include_image=include_image)
                if include_image:
                    stand_in_images(root, ctx)
                made_up_answers(ctx)
                total = dry_run_estimate(ctx.pipeline, ctx.run)[BENCH]["total"]
                rows.append({"model": model, "include_image": include_image, **total})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/llava-eval"))
    args = parser.parse_args()

    rows = throughput(args.data, args.latency_ms / 1000)
    sequential = rows[0][1]
    print(f"\nJudge throughput: 90 LLaVA-Bench (COCO) requests, stub latency {args.latency_ms:.0f} ms, "
          "real openai client")
    print(f"{'max_concurrency':>15} | {'seconds':>8} | {'requests/s':>10} | {'speed-up':>8}")
    print("-" * 52)
    for concurrency, seconds in rows:
        print(f"{concurrency:>15} | {seconds:>8.2f} | {90 / seconds:>10.1f} | {sequential / seconds:>7.1f}x")

    print("\nCost of one LLaVA-Bench (COCO) run: 90 judge requests, dry-run estimate (chars/4, image tile rule, "
          "167 completion tokens a review; list prices in llava_hpc/eval/judge.py)")
    print(f"{'judge model':>18} | {'image':>5} | {'prompt tok':>10} | {'compl. tok':>10} | {'$ in/out per 1M':>15} | "
          f"{'sync $':>7} | {'batch $':>7}")
    print("-" * 92)
    for row in cost_rows(args.data):
        prices = "/".join(f"{p:g}" for p in PRICES_PER_MILLION[row["model"]])
        print(f"{row['model']:>18} | {'yes' if row['include_image'] else 'no':>5} | {row['prompt_tokens']:>10} | "
              f"{row['completion_tokens']:>10} | {prices:>15} | {row['cost_sync_usd']:>7.3f} | "
              f"{row['cost_batch_usd']:>7.3f}")


if __name__ == "__main__":
    main()
