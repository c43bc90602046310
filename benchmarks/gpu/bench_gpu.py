"""One-GPU benchmark at real size: training steps, MFU, generation and memory, in one call of under 5 minutes.

Models have RANDOM weights, built from configs (nothing is downloaded; a lent GPU has no network):
  vision     CLIP ViT-L/14 at 224 px (patch 14 -> 256 patches x 1024, 24 layers; the seed recipe's features are
             CLIP-L 224 px, 256 x 1024), frozen, sdpa
  LLM        Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads / 8 kv heads, MLP 8192, vocab 128256, tied
             embeddings, llama3 rope with theta 500000), sdpa
  projector  linear 1024 -> 2048 (LLaVA v1)
put together with the project's own classes (LlavaForCausalLM, VisionTower, LlavaMultiModalProjector, Collator,
DeepSpeedEngine), so a row measures the code the pipeline runs. Weights do not change the cost of a step.

Rows (one function per measurement, each time-boxed, an OOM reported instead of ending the run):
  stage1 features  the project's stage 1: precomputed features -> projector (trains) -> frozen LLM, AdamW
  stage1 pixels    the reference's stage 1: pixels through the frozen CLIP every step, then the same
  stage2 features  the project's stage 2: projector + LLM train (full fine-tune, AdamW; no gradient checkpointing,
                   the project's default for <= 1.5B models on >= 40 GB GPUs; --gradient-checkpointing turns it on)
  stage2 pixels    the reference's stage 2 (CLIP every step), for the stage-2 ratio
  stage2 features (torch engine)  the same step on the single-process TorchEngine (zero_stage 0, fp32 weights +
                   bf16 autocast): what ZeRO-2's bf16 weights and partitioned optimizer cost or save on one GPU
  generate bN      LlavaForCausalLM.generate: greedy, KV cache, 128 new tokens, batch N (pixels in, the generate
                   stage's path), bf16 weights
  decode (1 core)  the reference's input work per image on ONE CPU core: JPEG decode + CLIP preprocessing; with the
                   stage-1 pixels row it says how many loader workers the reference needs to keep the GPU fed
Training runs the path users run: the project's `DeepSpeedEngine` (ZeRO-2, `zero_stage = 2`, the default) with
precision "bf16" (bf16 weights and gradients, fp32 master weights and AdamW state in the ZeRO optimizer; plain
torch AdamW, so DeepSpeed compiles no op), in a one-process world (torch.distributed as
llava_hpc/train/distributed.py sets it up for one task: nccl on the GPU, gloo for --tiny). --tiny on a CPU trains
in fp32 (DeepSpeed's bf16 on the CPU accelerator is not the path measured; the meta says so). Training batches are the same items every step (random token ids, fixed lengths,
no padding), collated and copied to the GPU every step as the training loop does; the Parquet read and image
decode costs are CPU-side and measured by benchmarks/bench_train.py and the decode row.

MFU = model FLOPs per step x steps/s / the card's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s, H100 PCIe 756,
H100 NVL 835, A100 312; else --peak-tflops). Model FLOPs per step, T = tokens in the batch (image positions
included), N = weights of every Linear in the LLM incl. the (tied) LM head, A = causal attention forward
= 2 * batch * layers * seq^2 * hidden (QK^T and AV over the causal half):
  stage 1:  4*N*T + 3*A   forward 2NT + A; backward through the frozen LLM for the activation gradients only
                          (2NT: frozen weights get no weight gradients) + 2A; + 6 * projector * image tokens
  stage 2:  6*N*T + 3*A   + 6 * projector * image tokens; the recompute of gradient checkpointing is NOT counted
                          (it is hardware work, not model work: MFU, not HFU)
  pixels:   + the CLIP forward, 2 * CLIP Linear/conv weights * 257 tokens + 4 * layers * 257^2 * 1024 per image
            (all 24 layers: the reference runs them, though it reads layer -2)
Generation rows give tokens/s (decode is memory-bound: MFU means little there).
Besides the table, each training row prints two JSON lines (the project's benchmark convention):
  {"metric": "train_samples_per_s", "value": ..., "unit": "samples/s", "detail": {...}}  and  {"metric": "mfu", ...}

    python benchmarks/gpu/bench_gpu.py --out $OUT/gpu.json          # ~3-4 min on one H100/H200
    python benchmarks/gpu/bench_gpu.py --tiny --out /tmp/tiny.json  # the same code at tiny sizes, CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # runs from a bare checkout: the GPU machine has no installed llava_hpc
    sys.path.insert(0, str(REPO))

from llava_hpc.data.datasets import Collator, file_image_loader  # noqa: E402
from llava_hpc.data.templates import IGNORE_INDEX  # noqa: E402
from llava_hpc.model.llava import LlavaForCausalLM, LlavaMultiModalProjector  # noqa: E402
from llava_hpc.model.vision import VisionTower  # noqa: E402
from llava_hpc.train import distributed  # noqa: E402
from llava_hpc.train.loop import DeepSpeedEngine, TorchEngine, TrainSettings  # noqa: E402

# Dense bf16 peaks (no sparsity), TFLOP/s. The first name found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Shapes:
    vision: dict  # CLIPVisionConfig kwargs
    llm: dict  # LlamaConfig kwargs
    stage1_batch: int
    stage1_text: int  # text tokens per sample besides the image (a pretrain caption)
    stage2_batch: int
    stage2_text: int  # an instruct conversation
    gen_batches: tuple[int, ...]
    gen_prompt_text: int
    gen_new_tokens: int
    decode_images: int
    image_file: tuple[int, int]  # (width, height) of the JPEGs the decode row reads
    bos_id: int = 1
    image_id: int = 0  # set below: the last vocabulary row
    pad_id: int = 0


LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                  max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
CLIP_L14_224 = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768)
REAL = Shapes(vision=CLIP_L14_224, llm=LLAMA32_1B, stage1_batch=16, stage1_text=64, stage2_batch=8,
              stage2_text=448, gen_batches=(1, 32), gen_prompt_text=32, gen_new_tokens=128, decode_images=32,
              image_file=(640, 480), bos_id=128000, image_id=128255, pad_id=128004)
# The same code paths in seconds on a CPU: how CI checks this script.
TINY = Shapes(vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, projection_dim=32),
              llm={**LLAMA32_1B, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
              stage1_batch=2, stage1_text=8, stage2_batch=2, stage2_text=16, gen_batches=(1, 32), gen_prompt_text=4,
              gen_new_tokens=8, decode_images=4, image_file=(64, 48), bos_id=1, image_id=1023, pad_id=1022)


@dataclass
class Context:
    shapes: Shapes
    device: torch.device
    row_budget_s: float  # timed seconds per row (warm-up and model building excluded)
    peak_tflops: float | None
    min_steps: int = 3
    max_steps: int = 100
    gradient_checkpointing: bool = False  # stage 2 (off: the project's default for a 1B LLM on a >= 40 GB GPU)


@dataclass
class Row:
    name: str
    kind: str  # train | generate | decode | ratio
    batch: int | None = None
    seq: int | None = None  # tokens per sample after the image is expanded (prompt length for generation)
    steps: int = 0  # timed steps (generate calls, images)
    seconds: float = 0.0
    steps_per_s: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None  # training: tokens through the model; generation: NEW tokens
    flops_per_step: float | None = None
    tflops: float | None = None  # achieved model TFLOP/s
    mfu: float | None = None  # fraction of the peak
    peak_mem_gib: float | None = None
    status: str = "ok"
    notes: str = ""


# ---------------------------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the row's torch.cuda.max_memory_allocated. CPU (--tiny): the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def detect_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak, name
    return None, name


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_one_process_world(device: torch.device) -> str:
    """A one-process torch.distributed world, as a one-task job gets it from llava_hpc/train/distributed.py
    (its setup() exports RANK/WORLD_SIZE/MASTER_*; it joins a process group only for > 1 task, so the group is
    joined here, with its backend: nccl on the GPU, gloo on the CPU). DeepSpeed then finds the group initialised.
    Returns the backend."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_backend()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    env = distributed.environment()
    if env.world_size != 1:
        raise SystemExit(f"bench_gpu runs in one process; the environment says WORLD_SIZE={env.world_size}")
    distributed.setup(env)
    if device.type == "cpu":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~30 s of C++ on 2 cores) that a
        # one-process world never uses: mark it unavailable for this process. (The GPU run uses nccl: no op built.)
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=0, world_size=1,
                                         init_method=f"tcp://{env.master_addr}:{env.master_port}")
    return backend


def training_precision(device: torch.device) -> str:
    """bf16 on the GPU (what users run); fp32 for --tiny on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


# ---------------------------------------------------------------------------------------------- models
def build_llm(shapes: Shapes, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # No bos/eos in the config: with no stop token every generation runs its full max_new_tokens.
    config = LlamaConfig(**shapes.llm, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    with torch.device(device):  # initialised on the GPU: seconds instead of a minute of CPU init
        return LlamaForCausalLM(config)


def clip_processor(image_size: int):
    try:  # transformers >= 5.2x: the PIL processor (no torchvision needed)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_tower(shapes: Shapes, device: torch.device) -> VisionTower:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device(device):
        model = CLIPVisionModel(CLIPVisionConfig(**shapes.vision, attn_implementation="sdpa"))
    return VisionTower(model, clip_processor(shapes.vision["image_size"]), select_layer=-2)


def build_llava(shapes: Shapes, device: torch.device, with_tower: bool) -> LlavaForCausalLM:
    """fp32 weights, as the project's training jobs build them (DeepSpeed's bf16 casts the module to bf16 and
    keeps fp32 master weights; TorchEngine keeps fp32 and autocasts)."""
    torch.manual_seed(0)
    llm = build_llm(shapes, device)
    tower = build_tower(shapes, device) if with_tower else None
    with torch.device(device):
        projector = LlavaMultiModalProjector("linear", shapes.vision["hidden_size"], shapes.llm["hidden_size"])
    return LlavaForCausalLM(tower, projector, llm, image_token_id=shapes.image_id, pad_token_id=shapes.pad_id,
                            num_patches=num_patches(shapes), max_length=1 << 20)


def num_patches(shapes: Shapes) -> int:
    return (shapes.vision["image_size"] // shapes.vision["patch_size"]) ** 2


# ---------------------------------------------------------------------------------------------- FLOPs
def linear_weights(module: nn.Module) -> int:
    """Weights that take part in matrix products: every Linear (the tied LM head once) and conv. Embedding
    lookups are free, biases and norms negligible."""
    seen, total = set(), 0
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)) and id(sub.weight) not in seen:
            seen.add(id(sub.weight))
            total += sub.weight.numel()
    return total


def llm_matmul_weights(shapes: Shapes) -> int:
    """N: per layer q, o (hidden^2 each), k, v (hidden x kv width each), the MLP (3 x hidden x intermediate); plus
    the LM head (tied to the embedding, which is a free lookup, so the matrix counts once)."""
    llm = shapes.llm
    hidden = llm["hidden_size"]
    kv = hidden // llm["num_attention_heads"] * llm["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * llm["intermediate_size"]
    return llm["num_hidden_layers"] * per_layer + llm["vocab_size"] * hidden


def train_flops(shapes: Shapes, stage: str, path: str, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (the formula is in the module docstring)."""
    n_llm, tokens = llm_matmul_weights(shapes), batch * seq
    llm = shapes.llm
    attention = 2 * batch * llm["num_hidden_layers"] * seq**2 * llm["hidden_size"]  # causal forward
    forward = 2 * n_llm * tokens + attention
    weight_grads = 0 if stage == "stage1" else 2 * n_llm * tokens  # a frozen LLM gets activation gradients only
    backward = 2 * n_llm * tokens + weight_grads + 2 * attention
    projector = 6 * shapes.vision["hidden_size"] * llm["hidden_size"] * batch * num_patches(shapes)  # it trains
    vision = batch * vision_forward_flops(shapes) if path == "pixels" else 0
    return float(forward + backward + projector + vision)


def vision_forward_flops(shapes: Shapes) -> float:
    v = shapes.vision
    d, layers, patches = v["hidden_size"], v["num_hidden_layers"], num_patches(shapes)
    tokens = patches + 1  # CLS
    per_layer_weights = 4 * d * d + 2 * d * v["intermediate_size"]
    conv = 3 * v["patch_size"] ** 2 * d
    return 2.0 * (layers * per_layer_weights * tokens + conv * patches) + 4.0 * layers * tokens**2 * d


# ---------------------------------------------------------------------------------------------- inputs
def training_items(shapes: Shapes, stage: str, path: str, batch: int, generator: torch.Generator) -> list[dict]:
    """One batch of samples as the datasets give them: [bos, <image>, text...], labels on the answer, and the
    image as fp16 features (the Parquet rows) or as preprocessed fp32 pixels."""
    text = shapes.stage1_text if stage == "stage1" else shapes.stage2_text
    patches, vision = num_patches(shapes), shapes.vision
    special = {shapes.bos_id, shapes.image_id, shapes.pad_id}
    items = []
    for index in range(batch):
        words = torch.randint(0, shapes.llm["vocab_size"] - 256, (text - 1,), generator=generator)
        words[torch.isin(words, torch.tensor(sorted(special)))] = 5
        input_ids = torch.cat([torch.tensor([shapes.bos_id, shapes.image_id]), words])
        labels = input_ids.clone()
        # Stage 1 (plain): loss on the caption; stage 2: on the answers, here the second half of the text.
        answer_from = 2 if stage == "stage1" else 2 + (text - 1) // 2
        labels[:answer_from] = IGNORE_INDEX
        item = {"id": f"{stage}-{index}", "input_ids": input_ids, "labels": labels}
        if path == "features":
            item["image_features"] = torch.randn(1, patches, vision["hidden_size"], generator=generator).half()
        else:
            size = vision["image_size"]
            item["pixel_values"] = torch.randn(1, 3, size, size, generator=generator)
        items.append(item)
    return items


def timed_loop(step, ctx: Context, warmup: int) -> tuple[int, float]:
    """Warm-up steps (untimed: allocations, kernel choice, AdamW state), then steps until the row's budget is
    spent (at least min_steps, at most max_steps)."""
    for _ in range(warmup):
        step()
    sync(ctx.device)
    started, steps = time.perf_counter(), 0
    while steps < ctx.min_steps or (time.perf_counter() - started < ctx.row_budget_s and steps < ctx.max_steps):
        step()
        steps += 1
    sync(ctx.device)
    return steps, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- measurements
def measure_train(ctx: Context, stage: str, path: str, engine_kind: str = "deepspeed") -> Row:
    """One optimizer step of `stage` from `path` ("features": the project's; "pixels": the reference's) on the
    project's DeepSpeedEngine (ZeRO-2), or with engine_kind "torch" on its TorchEngine."""
    shapes, device = ctx.shapes, ctx.device
    batch = shapes.stage1_batch if stage == "stage1" else shapes.stage2_batch
    seq = num_patches(shapes) + (shapes.stage1_text if stage == "stage1" else shapes.stage2_text)
    name = f"{stage} {path}" + (" (torch engine)" if engine_kind == "torch" else "")
    row = Row(name, "train", batch=batch, seq=seq)
    model = build_llava(shapes, device, with_tower=path == "pixels")
    # The FLOP formula counts from the shapes; it must describe the model actually built.
    assert linear_weights(model.language_model) == llm_matmul_weights(shapes), "FLOP count does not match the LLM"
    model.freeze_language_model(stage == "stage1")
    checkpointing = stage == "stage2" and ctx.gradient_checkpointing
    if checkpointing:
        model.gradient_checkpointing_enable()  # the project's non-reentrant checkpointing
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if engine_kind == "torch":
        engine_cls, zero_stage, precision = TorchEngine, 0, "bf16"  # autocast; on the CPU too (as now)
    else:
        engine_cls, zero_stage, precision = DeepSpeedEngine, 2, training_precision(device)
        setup_one_process_world(device)
    settings = TrainSettings(batch_size=batch, grad_accum=1, lr=2e-3 if stage == "stage1" else 2e-5,
                             warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, epochs=1.0, max_steps=None,
                             seed=0, precision=precision, gradient_checkpointing=checkpointing,
                             save_every_steps=10**9, keep_checkpoints=1, zero_stage=zero_stage)
    # Only the engine's public interface: loss(), backward(), step() (whichever of them steps the optimizer).
    engine = engine_cls(model, settings, total=10**6, warmup=0, precision=precision, device=device)
    collate = Collator.for_training(model, shapes.pad_id)
    items = training_items(shapes, stage, path, batch, torch.Generator().manual_seed(0))

    def step() -> None:
        # As train() does it: collate, copy to the device, forward, backward, clip + AdamW, read the loss.
        inputs = collate(items).to(device).model_inputs()
        loss = engine.loss(inputs)
        engine.backward(loss)
        engine.step()
        loss.item()

    row.steps, row.seconds = timed_loop(step, ctx, warmup=2)
    row.steps_per_s = row.steps / row.seconds
    row.samples_per_s = row.steps_per_s * batch
    row.tokens_per_s = row.samples_per_s * seq
    row.flops_per_step = train_flops(shapes, stage, path, batch, seq)
    engine_name = "TorchEngine, fp32 weights + bf16 autocast" if engine_kind == "torch" else f"DeepSpeed ZeRO-2, {precision}"
    row.notes = (f"{engine_name}, trainable {trainable:,} params"
                 + (", gradient checkpointing" if checkpointing else ""))
    del engine, model
    return row


def measure_generate(ctx: Context, batch: int) -> Row:
    """Greedy generation with the KV cache, pixels in (the generate stage's path), bf16 weights."""
    shapes, device = ctx.shapes, ctx.device
    prompt = num_patches(shapes) + 1 + shapes.gen_prompt_text  # image + bos + question
    row = Row(f"generate b{batch}", "generate", batch=batch, seq=prompt)
    model = build_llava(shapes, device, with_tower=True).to(torch.bfloat16).eval()
    reset_memory(device)  # the peak is the bf16 model's, not the fp32 one it was cast from
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(0, shapes.llm["vocab_size"] - 256, (batch, shapes.gen_prompt_text), generator=generator)
    input_ids = torch.cat([torch.full((batch, 1), shapes.bos_id), torch.full((batch, 1), shapes.image_id), words], 1)
    size = shapes.vision["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    new_tokens = 0

    def call(max_new_tokens: int) -> int:
        out = model.generate(input_ids.to(device), torch.ones_like(input_ids).to(device),
                             pixel_values=pixels.to(device), max_new_tokens=max_new_tokens, temperature=0.0)
        return out.shape[0] * out.shape[1]  # no stop token: every row runs to max_new_tokens

    call(min(8, shapes.gen_new_tokens))  # warm-up: kernels for prefill and decode
    sync(device)

    def step() -> None:
        nonlocal new_tokens
        new_tokens += call(shapes.gen_new_tokens)

    row.steps, row.seconds = timed_loop(step, replace(ctx, min_steps=2), warmup=0)
    row.steps_per_s = row.steps / row.seconds
    row.samples_per_s = row.steps_per_s * batch
    row.tokens_per_s = new_tokens / row.seconds
    row.notes = f"{shapes.gen_new_tokens} new tokens per sequence, prefill {prompt} tokens included"
    return row


def measure_decode(ctx: Context) -> Row:
    """The reference's per-image input work on one CPU core: read a JPEG, decode, CLIP resize/crop/normalise."""
    shapes = ctx.shapes
    row = Row("decode (1 core)", "decode", batch=1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-decode-") as root:
        width, height = shapes.image_file
        y, x = np.mgrid[0:height, 0:width]
        gradient = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], -1)
        names = []
        for index in range(shapes.decode_images):
            # A gradient plus noise: the JPEG is about as large (and as slow to decode) as a photo (COCO's
            # 640x480 average ~160 KiB).
            pixels = np.clip(gradient + rng.normal(0, 18, gradient.shape), 0, 255).astype(np.uint8)
            names.append(f"{index:04d}.jpg")
            Image.fromarray(pixels).save(Path(root) / names[-1], quality=90)
        kib = sum((Path(root) / name).stat().st_size for name in names) / len(names) / 1024
        load = file_image_loader(root)
        # VisionTower.preprocess reads only these two attributes: the project's preprocessing, without a model.
        tower = SimpleNamespace(image_processor=clip_processor(shapes.vision["image_size"]), image_aspect_ratio="crop")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cursor = 0

            def step() -> None:
                nonlocal cursor
                VisionTower.preprocess(tower, [load(names[cursor % len(names)])])
                cursor += 1

            decode_ctx = replace(ctx, device=torch.device("cpu"), min_steps=len(names), max_steps=4 * len(names),
                                 row_budget_s=min(ctx.row_budget_s, 5.0))
            row.steps, row.seconds = timed_loop(step, decode_ctx, warmup=2)
        finally:
            torch.set_num_threads(threads)
    row.steps_per_s = row.samples_per_s = row.steps / row.seconds
    row.notes = (f"{shapes.image_file[0]}x{shapes.image_file[1]} JPEG ({kib:.0f} KiB) -> "
                 f"{shapes.vision['image_size']} px; images/s per loader worker")
    return row


# ---------------------------------------------------------------------------------------------- the run
def run_row(name: str, measure, ctx: Context) -> Row:
    """Run one measurement in isolation: its memory peak is its own, an OOM or error becomes the row's status."""
    reset_memory(ctx.device)
    status = "ok"
    try:
        row = measure()
    except Exception as exc:  # noqa: BLE001 -- one failing row must not cost the other rows of a one-shot run
        status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if status != "OOM":
            traceback.print_exc()
        row = Row(name, "failed")
    row.peak_mem_gib = peak_memory_gib(ctx.device)
    row.status = status
    if row.flops_per_step and row.steps_per_s:
        row.tflops = row.flops_per_step * row.steps_per_s / 1e12
        row.mfu = row.tflops / ctx.peak_tflops if ctx.peak_tflops else None
    reset_memory(ctx.device)
    return row


def ratio_rows(rows: list[Row]) -> list[Row]:
    """features / pixels per stage: > 1x samples/s = the project's path is faster; < 1x memory = it needs less."""
    by_name = {row.name: row for row in rows}
    ratios = []
    for stage in ("stage1", "stage2"):
        features, pixels = by_name.get(f"{stage} features"), by_name.get(f"{stage} pixels")
        if not (features and pixels and features.status == pixels.status == "ok"):
            continue
        ratio = Row(f"{stage} features/pixels", "ratio", batch=features.batch, seq=features.seq)
        ratio.steps_per_s = features.steps_per_s / pixels.steps_per_s
        ratio.samples_per_s = features.samples_per_s / pixels.samples_per_s
        ratio.tokens_per_s = features.tokens_per_s / pixels.tokens_per_s
        ratio.peak_mem_gib = features.peak_mem_gib / pixels.peak_mem_gib if pixels.peak_mem_gib else None
        ratio.notes = "ratios; peak mem < 1x = less memory"
        ratios.append(ratio)
    decode, stage1_pixels = by_name.get("decode (1 core)"), by_name.get("stage1 pixels")
    if decode and stage1_pixels and decode.status == stage1_pixels.status == "ok":
        workers = stage1_pixels.samples_per_s / decode.samples_per_s
        decode.notes += f"; the stage1 pixels row needs >= {math.ceil(workers)} such workers"
    return ratios


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


TABLE = (("row", 30, lambda r: r.name), ("batch", 5, lambda r: _fmt(r.batch, "d")),
         ("seq", 5, lambda r: _fmt(r.seq, "d")),
         ("steps/s", 8, lambda r: _fmt(r.steps_per_s, ".2f", "x" if r.kind == "ratio" else "")),
         ("samples/s", 9, lambda r: _fmt(r.samples_per_s, ".2f" if r.kind == "ratio" else ".1f",
                                         "x" if r.kind == "ratio" else "")),
         ("tokens/s", 9, lambda r: _fmt(r.tokens_per_s, ".0f" if r.kind != "ratio" else ".2f",
                                        "x" if r.kind == "ratio" else "")),
         ("TFLOP/s", 7, lambda r: _fmt(r.tflops, ".1f")),
         ("MFU", 6, lambda r: _fmt(None if r.mfu is None else 100 * r.mfu, ".1f", "%")),
         ("peak GiB", 8, lambda r: _fmt(r.peak_mem_gib, ".2f", "x" if r.kind == "ratio" else "")),
         ("status", 6, lambda r: r.status))


def format_text(rows: list[Row]) -> str:
    lines = [" ".join(f"{title:>{width}}" if i else f"{title:<{width}}" for i, (title, width, _) in enumerate(TABLE))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = [get(row) for _, _, get in TABLE]
        lines.append(" ".join(f"{cell:>{width}}" if i else f"{cell:<{width}}"
                              for i, (cell, (_, width, _)) in enumerate(zip(cells, TABLE))))
    return "\n".join(lines)


def format_markdown(rows: list[Row], meta: dict) -> str:
    head = [title for title, _, _ in TABLE] + ["notes"]
    lines = [f"# bench_gpu: {meta['device_name']}", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, peak {meta['peak_tflops']} TFLOP/s "
             f"(bf16 dense), {meta['mode']} shapes, {meta['wall_s']:.0f} s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([get(row) for _, _, get in TABLE] + [row.notes]) + " |")
    return "\n".join(lines) + "\n"


def metric_lines(rows: list[Row], meta: dict) -> list[dict]:
    """The headline numbers, one JSON object per line: samples/s and MFU of each training row."""
    lines = []
    for row in rows:
        if row.kind != "train" or row.status != "ok":
            continue
        detail = {"row": row.name, "batch": row.batch, "seq": row.seq, "steps": row.steps,
                  "tokens_per_s": row.tokens_per_s, "tflops": row.tflops, "peak_mem_gib": row.peak_mem_gib,
                  "device": meta["device_name"], "peak_tflops": meta["peak_tflops"], "mode": meta["mode"],
                  "engine": "TorchEngine" if "torch engine" in row.name else "DeepSpeedEngine ZeRO-2",
                  "precision": ("bf16 autocast" if "torch engine" in row.name else meta["training_precision"])}
        lines.append({"metric": "train_samples_per_s", "value": row.samples_per_s, "unit": "samples/s",
                      "detail": detail})
        lines.append({"metric": "mfu", "value": row.mfu, "unit": "fraction of peak", "detail": detail})
    return lines


def write_outputs(out: Path | None, rows: list[Row], meta: dict) -> None:
    """JSON at --out and markdown beside it (same stem, .md); rewritten after every row, so a run cut short by
    its time limit still leaves the rows it finished."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(row) for row in rows]}, indent=2) + "\n")
    out.with_suffix(".md").write_text(format_markdown(rows, meta))


def plan(shapes: Shapes) -> list[tuple[str, object]]:
    """(name, measurement) in the order they run: the headline rows first, so a deadline cuts the least."""
    rows = [(f"{stage} {path}", (measure_train, stage, path))
            for stage in ("stage1", "stage2") for path in ("features", "pixels")]
    rows.append(("stage2 features (torch engine)", (measure_train, "stage2", "features", "torch")))
    rows += [(f"generate b{batch}", (measure_generate, batch)) for batch in shapes.gen_batches]
    rows.append(("decode (1 core)", (measure_decode,)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the same code paths in seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here and as markdown (.md)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="timed seconds shared by all rows (warm-up and building excluded; default 120, "
                             "--tiny 4)")
    parser.add_argument("--deadline-s", type=float, default=270.0,
                        help="rows not started by this many seconds after launch are skipped (default 270)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak, where it is not detected (H100/H200/A100 are)")
    parser.add_argument("--rows", nargs="+", default=None, help="run only these rows (names as in the table)")
    parser.add_argument("--stage1-batch", type=int, default=None)
    parser.add_argument("--stage2-batch", type=int, default=None)
    parser.add_argument("--stage2-text", type=int, default=None, help="text tokens per stage-2 sample (448)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="stage 2 with gradient checkpointing (off by default, as the project's default for a 1B LLM "
                             "on a >= 40 GB GPU; the recompute is not counted in MFU)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    shapes = TINY if args.tiny else REAL
    overrides = {key: value for key, value in (("stage1_batch", args.stage1_batch), ("stage2_batch", args.stage2_batch),
                                              ("stage2_text", args.stage2_text)) if value is not None}
    shapes = Shapes(**{**asdict(shapes), **overrides})
    budget_s = args.budget_s if args.budget_s is not None else (4.0 if args.tiny else 120.0)
    if args.tiny:
        device = torch.device("cpu")
        # One thread: tiny ops gain nothing from more, and on a loaded CI box a second thread that is descheduled
        # stalls every op (measured here: 60x slower steps with 2 threads at load 4 on 2 cores).
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        # As the reference trains (bf16 + tf32): fp32 matmuls outside autocast use TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        parser.error("no CUDA device: run with --tiny on a CPU")
    detected, device_name = detect_peak_tflops(device)
    peak = args.peak_tflops or detected

    selected = [(name, spec) for name, spec in plan(shapes) if args.rows is None or name in args.rows]
    if not selected:
        parser.error(f"--rows matched nothing; rows: {[name for name, _ in plan(shapes)]}")
    ctx = Context(shapes, device, row_budget_s=budget_s / len(selected), peak_tflops=peak,
                  gradient_checkpointing=args.gradient_checkpointing)
    import transformers

    meta = {"device_name": device_name, "peak_tflops": peak, "mode": "tiny" if args.tiny else "real",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "shapes": asdict(shapes), "budget_s": budget_s,
            "precision": (f"training: DeepSpeedEngine ZeRO-2, one-process world "
                          f"({'nccl' if device.type == 'cuda' else 'gloo'}), precision {training_precision(device)}"
                          + (" (--tiny on the CPU: fp32, not the bf16 the GPU run measures)" if device.type == "cpu"
                             else " (bf16 weights, fp32 master weights + AdamW state)")
                          + "; the torch engine row: fp32 weights + bf16 autocast; generation: bf16 weights"),
            "engine": "DeepSpeedEngine", "zero_stage": 2, "training_precision": training_precision(device),
            "gradient_checkpointing": args.gradient_checkpointing,
            "wall_s": 0.0}
    print(f"bench_gpu: {device_name}, peak {peak} TFLOP/s, {len(selected)} rows, "
          f"{ctx.row_budget_s:.0f} s timed per row", flush=True)

    rows: list[Row] = []
    for name, (measure, *arguments) in selected:
        if time.perf_counter() - started > args.deadline_s:
            rows.append(Row(name, "skipped", status="skipped (deadline)"))
            continue
        row = run_row(name, lambda: measure(ctx, *arguments), ctx)
        rows.append(row)
        print(f"  {name}: {row.status}, {_fmt(row.samples_per_s, '.1f')} samples/s, "
              f"{_fmt(row.peak_mem_gib, '.2f')} GiB ({time.perf_counter() - started:.0f} s)", flush=True)
        meta["wall_s"] = time.perf_counter() - started
        write_outputs(args.out, rows, meta)
    rows += ratio_rows(rows)
    meta["wall_s"] = time.perf_counter() - started
    write_outputs(args.out, rows, meta)
    print(format_text(rows))
    for line in metric_lines(rows, meta):
        print(json.dumps(line))
    print(f"MFU counts model FLOPs (stage 1: 4NT, stage 2: 6NT, + attention, + CLIP forward on pixel rows) against "
          f"{peak or 'an unknown (--peak-tflops)'} TFLOP/s; peak GiB = torch.cuda.max_memory_allocated per row"
          + (" (CPU: peak RSS so far)" if device.type == "cpu" else "") + f"; {meta['wall_s']:.0f} s")
    return 1 if any(row.status.startswith("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
