"""TensorBoard event files beside metrics.jsonl, so `tensorboard --logdir RUN` shows every stage's loss, lr, grad
norm and throughput, offline and without an account (a compute node or a laptop alike).

metrics.jsonl stays the record: each of its rows is mirrored, nothing else is logged here. A resumed attempt opens
its writer with `purge_step` = the first step it redoes, so TensorBoard hides what the killed attempt logged past
the checkpoint, as the loop drops those rows from metrics.jsonl: each step is shown once.
"""

from __future__ import annotations

from pathlib import Path

EVENTS_DIR = "tensorboard"  # under the stage's directory: `tensorboard --logdir RUN` names each run by its stage
SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "memory_gb")


class TensorBoardMirror:
    """Writes the scalars of each metrics row as TensorBoard summaries at the row's step."""

    def __init__(self, stage_dir: Path, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter  # ~1 s of imports, paid only by a training job

        # flush_secs: a preempted job loses at most the rows of the last few seconds from the events (never from
        # metrics.jsonl); write() flushes anyway, rows come every log_every_steps.
        self.writer = SummaryWriter(str(stage_dir / EVENTS_DIR), purge_step=resumed_from + 1 if resumed_from else None,
                                    flush_secs=10)

    def write(self, row: dict) -> None:
        for name in SCALARS:
            value = row.get(name)
            if value is not None:
                self.writer.add_scalar(name, value, row["step"], walltime=row.get("time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (a resume's purge applied): for tests and checks."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage_dir / EVENTS_DIR), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(point.step, point.value) for point in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
