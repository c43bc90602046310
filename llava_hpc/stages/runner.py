"""What a job runs: rebuild the stage context from the run directory and run one task.

The job gets only the run directory's path and a Task; the pipeline comes from `RUN/pipeline.toml`, so the
pickled job holds no configuration (and so no secret), and a requeued job sees the same pipeline.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from llava_hpc.config import load_pipeline
from llava_hpc.rundir import RunDir, make_private
from llava_hpc.stages import StageContext, Task, get_stage


def load_context(run_dir: str | Path) -> StageContext:
    run = RunDir(Path(run_dir))
    return StageContext(pipeline=load_pipeline(run.pipeline_file), run=run)


def run_task(run_dir: str, task: Task) -> dict:
    make_private()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # CPU jobs share their cores with array siblings: take only what Slurm gave us.
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    ctx = load_context(run_dir)
    started = time.time()
    logging.getLogger("llava_hpc").info("stage %s task %s (%s) starting", task.stage, task.index, task.label)
    summary = get_stage(task.stage).run(ctx, task)
    logging.getLogger("llava_hpc").info("stage %s task %s done in %.1f s: %s", task.stage, task.index, time.time() - started, summary)
    return summary
