"""The one training loop both stages use, readable top to bottom.

    for step in steps not yet done:
        read this rank's samples of the step; all ranks agree they could, and whether the scheduler's checkpoint
        signal came during the step before (then: checkpoint that step's end, hand over to the requeue)
        ask the dataset to decode the next step's samples in the background
        for each micro-batch: forward, backward (the loss stays on the device)
        clip, optimizer step, lr schedule step
        every `log_every_steps` (and at checkpoints): mean loss since the last row -> metrics.jsonl
        (and TensorBoard's event files beside it);
        every `save_every_steps` save a checkpoint

Data order is a pure function of (seed, step, rank, world size) (llava_hpc/data/sampling.py). Resuming at step s
therefore sees exactly the samples an uninterrupted run would have, so an interrupted-and-resumed run ends with the
same weights (bitwise on CPU). Between logging steps nothing waits for the device: with one process there is no
host-device sync at all, with several one small CPU all-reduce of flags per step.

Two engines behind one interface: plain torch (one process, `zero_stage = 0`) and DeepSpeed ZeRO-2/3
(any number of processes, one per Slurm task).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from llava_hpc import checkpoint_signal, faults
from llava_hpc.data.sampling import SampleStream
from llava_hpc.rundir import (
    DiskFullError,
    is_disk_full,
    append_jsonl,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    disk_full_error,
)
from llava_hpc.train import distributed
from llava_hpc.train.tracking import TensorBoardMirror

log = logging.getLogger("llava_hpc.train")

# Written last into a checkpoint folder, by rank 0 once every rank has saved: only a folder with it is resumed from.
COMPLETE = "_COMPLETE"


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    grad_accum: int
    lr: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    epochs: float
    max_steps: int | None
    seed: int
    precision: str  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool
    save_every_steps: int
    keep_checkpoints: int
    zero_stage: int  # 0: plain torch; 2, 3: DeepSpeed ZeRO
    offload_optimizer: bool = False
    offload_params: bool = False
    shuffle_window_shards: int = 4  # data order: shards mixed at a time (SampleStream), so memory is bounded
    log_every_steps: int = 10  # a metrics row (mean loss since the last) every so many steps, and at checkpoints
    tensorboard: bool = True  # mirror each metrics row into TensorBoard event files (tracking.py)
    group_by_length: bool = True  # micro-batches of similar length (less padding), from `dataset.lengths`
    projector_lr: float | None = None  # the projector's own peak lr (the reference's mm_projector_lr); None: `lr`


class ResumeError(RuntimeError):
    pass


class RankDataError(RuntimeError):
    """Another rank could not read its share of a step's batch: every rank stops with that rank's message."""


# ---------------------------------------------------------------------------------------------- schedule & data
def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then cosine to zero (the reference's `cosine` with warmup_ratio)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def total_steps(num_samples: int, settings: TrainSettings, world_size: int) -> int:
    global_batch = settings.batch_size * settings.grad_accum * world_size
    steps = max(1, math.floor(settings.epochs * num_samples / global_batch))
    return min(steps, settings.max_steps) if settings.max_steps else steps


def native_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and newer compute in bf16; V100 and T4 would emulate it, slowly. A CPU
    computes in bf16 with AVX-512 BF16 or AMX; without them bf16 autocast is emulated (measured on an AVX2 EPYC:
    a frozen SmolLM2 step 65 s in bf16 against 1.7 s in fp32)."""
    if device.type == "cpu":
        # torch's own probes (private, so looked up): where a build lacks them, nothing is refused.
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        probes = [probe for probe in probes if probe is not None]
        return not probes or any(probe() for probe in probes)
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type == "cuda" and precision == "bf16" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"precision = 'bf16', but {name} (compute capability {major}.{minor}) has no native bf16 "
                         "and would emulate it: set precision = 'fp16' (with loss scaling) or 'auto' for this GPU")
    if device.type == "cpu" and precision == "bf16" and not native_bf16(device):
        raise ValueError(f"precision = 'bf16', but this CPU ({torch.backends.cpu.get_cpu_capability()}) has neither "
                         "AVX-512 BF16 nor AMX and would emulate bf16, ~40x slower than fp32: set precision = 'fp32' "
                         "or 'auto' on this machine")
    if precision != "auto":
        if precision in ("bf16", "fp16") and device.type == "cpu":
            return "fp32" if precision == "fp16" else "bf16"
        return precision
    if device.type == "cuda":
        # V100-class GPUs have no bf16: fp16 with loss scaling there.
        return "bf16" if native_bf16(device) else "fp16"
    return "fp32"


# ---------------------------------------------------------------------------------------------- engines
PROJECTOR_PREFIX = "multi_modal_projector."


def param_groups(model, settings: TrainSettings) -> list[dict]:
    """The trainable parameters, the projector in a group of its own where it has its own lr: a projector met
    fresh in stage 2 (or a frozen pretrained LLM's) learns at a far higher rate than the LLM can bear. The LR
    schedule scales every group's peak alike."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if settings.projector_lr is None:
        return [{"params": [p for _, p in trainable], "lr": settings.lr}]
    groups = [{"params": [p for n, p in trainable if not n.startswith(PROJECTOR_PREFIX)], "lr": settings.lr},
              {"params": [p for n, p in trainable if n.startswith(PROJECTOR_PREFIX)], "lr": settings.projector_lr}]
    return [group for group in groups if group["params"]]


def adamw(groups: list[dict], settings: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """One fused kernel for all parameters on CUDA; on CPU the multi-tensor (foreach) loop."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay, **fused)


class TorchEngine:
    """One process, plain torch: AdamW, optional autocast and loss scaling."""

    def __init__(self, model, settings: TrainSettings, total: int, warmup: int, precision: str, device):
        self.model, self.settings, self.precision, self.device = model, settings, precision, device
        groups = param_groups(model, settings)
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = adamw(groups, settings, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, warmup))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._grad_norm = torch.zeros(())  # a device tensor: read (a sync) only when logging

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def loss(self, inputs: dict) -> torch.Tensor:
        with self._autocast():
            return self.model(**inputs).loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.settings.grad_accum).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def grad_norm(self) -> float:
        return float(self._grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, client_state: dict) -> None:
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {"model": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "client": client_state}
        with atomic_path(directory / "state.pt") as tmp:
            torch.save(state, tmp)

    def load(self, directory: Path) -> dict:
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        missing = self.model.load_state_dict(state["model"], strict=False).unexpected_keys
        if missing:
            raise ResumeError(f"{directory}: checkpoint holds parameters this model lacks: {missing[:3]}")
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(self.optimizer.param_groups):
            raise ResumeError(f"{directory}: checkpoint was trained with {saved_groups} optimizer group(s), this run has "
                              f"{len(self.optimizer.param_groups)}: projector_lr was set or unset since; restore it "
                              "to resume, or train into a new run directory")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return state["client"]

    def full_state_dict(self) -> dict:
        return {n: t.detach().cpu() for n, t in self.model.state_dict().items()}


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 over the trainable parameters; one process per Slurm task."""

    def __init__(self, model, settings: TrainSettings, total: int, warmup: int, precision: str, device):
        import deepspeed

        self.settings, self.precision = settings, precision
        zero: dict = {"stage": settings.zero_stage, "contiguous_gradients": True, "overlap_comm": device.type == "cuda",
                      "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
        if settings.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e4,
                        stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                        stage3_gather_16bit_weights_on_model_save=True)
            if settings.offload_params:
                zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if settings.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        config = {
            "train_micro_batch_size_per_gpu": settings.batch_size,
            "gradient_accumulation_steps": settings.grad_accum,
            "gradient_clipping": settings.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        params = param_groups(model, settings)
        if settings.offload_optimizer:
            # ZeRO-Offload needs DeepSpeed's CPU Adam (compiled on first use, cached in TORCH_EXTENSIONS_DIR).
            config["optimizer"] = {"type": "AdamW", "params": {"lr": settings.lr, "weight_decay": settings.weight_decay}}
            optimizer = None
        else:
            optimizer = adamw(params, settings, device)
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup)))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = self.engine.module

    def loss(self, inputs: dict) -> torch.Tensor:
        return self.engine(**inputs).loss

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum itself
        self.engine.step()  # steps the optimizer only at the accumulation boundary

    def step(self) -> None:
        """The optimizer stepped inside the last backward(); nothing left to do but read the norm."""

    @property
    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, client_state: dict) -> None:
        # Frozen parameters (the LLM in stage 1) are rebuilt from the base model: not written every time.
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client_state,
                                    save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> dict:
        path, client = self.engine.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=False)
        if path is None:
            raise ResumeError(f"{directory}: DeepSpeed could not load this checkpoint")
        return client

    def full_state_dict(self) -> dict | None:
        """Every parameter, gathered (ZeRO-3 partitions them: a plain state_dict() would be empty tensors).
        Collective: every rank must call it; rank 0 gets the dict, the others None."""
        if self.settings.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            return None if state is None else {n: t.detach().cpu() for n, t in state.items()}
        return {n: t.detach().cpu() for n, t in self.engine.module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- checkpoints
def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob(f"step-*/{COMPLETE}"))


def rotate_checkpoints(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        (old / COMPLETE).unlink()  # first unmark, so a crash mid-delete never leaves a "complete" half
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float
    engine: object


def train(
    model: torch.nn.Module,
    dataset,
    collate: Callable,
    settings: TrainSettings,
    out_dir: Path,
    env: distributed.DistributedEnv,
    device: torch.device,
    stage: str,
) -> TrainResult:
    started = time.time()
    precision = resolve_precision(settings.precision, device)
    total = total_steps(len(dataset), settings, env.world_size)
    warmup = math.ceil(settings.warmup_ratio * total)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    engine_cls = TorchEngine if settings.zero_stage == 0 else DeepSpeedEngine
    if engine_cls is TorchEngine and env.world_size > 1:
        raise ValueError(f"{stage}: zero_stage = 0 trains in one process; use zero_stage 2 or 3 for {env.world_size} tasks")
    engine = engine_cls(model, settings, total, warmup, precision, device)

    checkpoints = out_dir / "checkpoints"
    start = _resume(engine, checkpoints, env, settings)
    per_rank = settings.batch_size * settings.grad_accum
    lengths = getattr(dataset, "lengths", None) if settings.group_by_length else None
    stream = SampleStream(len(dataset), per_rank, settings.seed, groups=getattr(dataset, "groups", None),
                          window=settings.shuffle_window_shards, rank=env.rank, world_size=env.world_size,
                          lengths=lengths, micro_batch=settings.batch_size)
    prefetch = getattr(dataset, "prefetch", None)  # decodes feature shards in a background thread
    metrics_file = out_dir / "metrics.jsonl"
    if env.is_main and metrics_file.exists():
        # Steps after the checkpoint we resume from are done again: drop their rows so each step has at most one.
        kept = [line for line in metrics_file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        atomic_write_text(metrics_file, "".join(line + "\n" for line in kept))
    fault_step = faults.exit_after_step()
    mirror = TensorBoardMirror(out_dir, start) if env.is_main and settings.tensorboard else None
    log.info("%s: %d samples, %d steps (global batch %d = %d x %d x %d ranks), %s, %s, resuming at step %d",
             stage, len(dataset), total, per_rank * env.world_size, settings.batch_size, settings.grad_accum,
             env.world_size, precision, type(engine).__name__, start)

    # What the next metrics row averages: the steps since the last row. The loss sum stays on the device.
    window_loss, window_steps, window_tokens, window_started = torch.zeros((), device=device), 0, 0, time.time()
    loss_value, last_saved = float("nan"), start

    def write_metrics(done: int) -> None:
        nonlocal loss_value, window_loss, window_steps, window_tokens, window_started
        loss_value = distributed.mean_over_ranks(window_loss / window_steps)  # collective; waits for the device
        seconds = time.time() - window_started
        if env.is_main:
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{engine.lr:.2e}")
            row = {
                "step": done, "total_steps": total, "resumed_from": start, "loss": loss_value, "lr": engine.lr,
                "grad_norm": engine.grad_norm,
                "samples_per_s": window_steps * per_rank * env.world_size / seconds,
                "tokens_per_s": window_tokens * env.world_size / seconds,
                "memory_gb": _memory_gb(device), "time": time.time(),
            }
            append_jsonl(metrics_file, row)
            if mirror is not None:
                mirror.write(row)
        window_loss, window_steps, window_tokens, window_started = torch.zeros((), device=device), 0, 0, time.time()

    progress = tqdm(range(start, total), initial=start, total=total, desc=stage, disable=not env.is_main,
                    mininterval=5, dynamic_ncols=True)
    with checkpoint_signal.checkpoint_window():
        for step in progress:
            batches, error = _read_step(dataset, collate, stream.step_indices(step), settings.batch_size)
            # Before any collective of the step, every rank agrees it could read its batch (a rank that cannot must
            # not leave the others waiting in a gradient all-reduce), and whether any got the checkpoint signal
            # during the step before: then that step's end is checkpointed, and the requeue takes over.
            failed, interrupted = distributed.any_rank(error is not None, checkpoint_signal.requested())
            if failed:
                _raise_read_failure(error, step, env)
            if interrupted:
                if window_steps:
                    write_metrics(step)
                if step > last_saved:
                    save_checkpoint(engine, checkpoints, step, env, settings)
                log.warning("%s: checkpoint at step %d after the scheduler's signal", stage, step)
                checkpoint_signal.release()
            if prefetch is not None and step + 1 < total:
                prefetch(stream.step_indices(step + 1))

            step_loss = torch.zeros((), device=device)
            for batch in batches:
                window_tokens += _tokens(batch)  # counted on the host copy: no sync
                batch = batch.to(device)
                loss = engine.loss(batch.model_inputs())
                engine.backward(loss)
                step_loss += loss.detach().float()
            engine.step()
            window_loss += step_loss / len(batches)
            window_steps += 1

            done = step + 1
            checkpoint_due = done % settings.save_every_steps == 0 or done == total
            if checkpoint_due or done % settings.log_every_steps == 0 or done == start + 1:
                write_metrics(done)
            if checkpoint_due:
                save_checkpoint(engine, checkpoints, done, env, settings)
                last_saved = done
            if fault_step is not None and done == fault_step and done < total:
                log.warning("fault injection: exiting after step %d", done)
                os._exit(3)
            faults.pause("after_step")
    progress.close()
    if mirror is not None:
        mirror.close()
    return TrainResult(total, start, loss_value, time.time() - started, engine)


def _tokens(batch) -> int:
    """Positions the model computes: real text tokens plus each image's patches beyond its placeholder."""
    images = 0 if batch.image_features is None else batch.image_features.shape[0] * (batch.image_features.shape[1] - 1)
    return int(batch.attention_mask.sum()) + images


def _read_step(dataset, collate: Callable, indices: list[int], batch_size: int) -> tuple[list, BaseException | None]:
    """This rank's micro-batches of a step, or the error that kept it from reading them (a corrupt shard)."""
    try:
        return [collate([dataset[i] for i in indices[start : start + batch_size]])
                for start in range(0, len(indices), batch_size)], None
    except Exception as exc:  # reported to every rank (_raise_read_failure), then raised with its own traceback
        return [], exc


def _raise_read_failure(error: BaseException | None, step: int, env) -> None:
    """Every rank stops: the failing rank with its own error, the others with the failing rank's message."""
    failures = distributed.failure_messages(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    rank, message = failures[0]
    raise RankDataError(f"step {step + 1}: rank {rank} of {env.world_size} could not read its batch: {message}")


def save_checkpoint(engine, checkpoints: Path, step: int, env, settings: TrainSettings) -> None:
    directory = checkpoints / f"step-{step:08d}"
    if env.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    client = {"step": step, "world_size": env.world_size, "zero_stage": settings.zero_stage}
    try:
        engine.save(directory, client)
        with atomic_path(directory / f"rng-rank{env.rank}.pt") as tmp:
            torch.save(_rng_state(), tmp)
    except BaseException as exc:
        # Half a checkpoint is never resumed from (no _COMPLETE), but on a full disk its files hold the space
        # the error message asks the user to free.
        if env.is_main:
            shutil.rmtree(directory, ignore_errors=True)
        if not isinstance(exc, DiskFullError) and is_disk_full(exc, checkpoints):
            raise disk_full_error(directory, exc) from exc
        raise
    distributed.barrier()
    if env.is_main:
        atomic_write_json(directory / COMPLETE, client)
        rotate_checkpoints(checkpoints, settings.keep_checkpoints)
    distributed.barrier()


def _resume(engine, checkpoints: Path, env, settings: TrainSettings) -> int:
    found = complete_checkpoints(checkpoints)
    if not found:
        return 0
    latest = found[-1]
    meta = json.loads((latest / COMPLETE).read_text())
    if meta["world_size"] != env.world_size or meta["zero_stage"] != settings.zero_stage:
        raise ResumeError(
            f"{latest} was written by {meta['world_size']} process(es) with zero_stage {meta['zero_stage']}; this job "
            f"has {env.world_size} with zero_stage {settings.zero_stage}. Resume with the same nodes x tasks_per_node "
            f"and zero_stage, or start the stage over with `llava-hpc submit <stage> --force`."
        )
    engine.load(latest)
    rng = latest / f"rng-rank{env.rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    log.info("resumed from %s", latest)
    return meta["step"]


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plot_loss(curves: list[tuple[str, Path]], target: Path, title: str) -> None:
    """The loss of one or more stages in order (stage 1 then stage 2) on one log-scale axis, steps counted on from
    stage to stage; a solid line where a stage begins, a dashed one where an attempt resumed from a checkpoint
    (a requeue, a resubmission): the rows say which attempt wrote them (`resumed_from`)."""
    from llava_hpc.plots import new_figure, png_bytes

    figure = new_figure(6.5, 3.6)
    axis = figure.add_subplot()
    offset, plotted = 0, False
    for stage, metrics_file in curves:
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
            if metrics_file.exists() else []
        if not rows:
            continue
        if plotted:
            axis.axvline(offset, color="black", lw=0.8)
        axis.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=stage)
        for before, row in zip(rows, rows[1:]):
            if row.get("resumed_from") != before.get("resumed_from"):
                axis.axvline(offset + row["resumed_from"], color="grey", lw=0.8, ls="--")
                axis.annotate(f"resumed at {row['resumed_from']}", (offset + row["resumed_from"], 1), fontsize=7,
                              xycoords=("data", "axes fraction"), va="top", rotation=90, color="grey")
        offset += rows[-1]["step"]
        plotted = True
    if not plotted:
        return
    axis.set_yscale("log")  # the tail of a loss curve is where the differences are
    axis.set_xlabel("optimizer step" + (" (stages in order)" if len(curves) > 1 else ""))
    axis.set_ylabel("loss (log scale)")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write_bytes(target, png_bytes(figure, dpi=120))
