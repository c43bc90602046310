"""`llava-hpc doctor`: what a first submit would trip over, checked from the login node and reported as rows.

Each check takes the loaded pipeline (and what Slurm said, asked once) and returns `CheckResult`s: a name, a status
(`ok`, `warning`, `error`, `skipped`), what was found, and how to fix it. Nothing here submits a stage or writes
into the run directory, except `--probe`, which queues one short job (about a minute, `PROBE_TIMEOUT_S` at most) on
the training stage's partition and nodes: on each node it reports CUDA and native bf16, writes a marker into the run
directory (the proof that compute nodes see and can write it), and joins a gloo all-reduce across the nodes.

Slurm's tools run as subprocesses with timeouts; a missing tool is a row, never a traceback. The package imports
nothing heavy at import time (torch, transformers, huggingface_hub, openai are imported by the checks that need them),
so `llava-hpc --help` stays fast.

Where things are:

- `result`: `CheckResult` (a row), `has_errors`, `as_dicts`;
- this module: `run_checks`, which runs every check in order (with the
  pipeline row and the guard that turns a crashing check into a row);
- `slurm`: running commands (`run_command`, the one the tests replace), what `sinfo`/`sacctmgr` say
  (`slurm_facts`), the stages a pipeline would queue, and the Slurm, account, partition and GPU checks;
- `storage`: the run directory (writable, filesystem type, free space) and the planned feature bytes
  (`check_run_dir`, `check_disk_space`);
- `inputs`: models, data and the judge (`check_models`, `check_data`, `check_judge`, `ping_judge`);
- `probe`: the `--probe` job (`probe_script`, `probe_task`, `run_probe`, `probe_results`).

The public names of the submodules are re-exported here (`doctor.check_data`, `doctor.run_command`, ...); a test
that replaces a function must replace it in the submodule that looks it up (`doctor.slurm.run_command`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.doctor.inputs import (
    SAMPLE_RECORDS,
    TOKENIZER_FILES,
    check_data,
    check_dataset,
    check_judge,
    check_models,
    ping_judge,
)
from llava_hpc.doctor.probe import (  # probe_task too: the probe job's srun line imports it from here
    PROBE_TIME_LIMIT_MIN,
    PROBE_TIMEOUT_S,
    probe_results,
    probe_script,
    probe_task,
    run_probe,
)
from llava_hpc.doctor.result import STATUSES, CheckResult, as_dicts, has_errors
from llava_hpc.doctor.slurm import (
    COMMAND_TIMEOUT_S,
    NO_BF16_GPUS,
    Association,
    CommandResult,
    Gres,
    Partition,
    SlurmFacts,
    check_account,
    check_partitions,
    check_slurm,
    current_user,
    parse_gres,
    planned_stages,
    run_command,
    slurm_facts,
    training_stage,
)
from llava_hpc.doctor.storage import (
    FEATURE_COMPRESSION,
    HEADROOM,
    NODE_LOCAL_DIRS,
    RAM_FS,
    SHARED_FS,
    check_disk_space,
    check_run_dir,
    dataset_records,
    feature_bytes_per_image,
    feature_shape,
    filesystem_type,
    free_bytes,
    nearest_existing,
    planned_images,
)
from llava_hpc.eval.benches import judged_benches  # the kinds' one answer to 'judged?'

__all__ = [
    "STATUSES", "CheckResult", "has_errors", "as_dicts", "run_checks", "pipeline_row",
    # slurm
    "COMMAND_TIMEOUT_S", "NO_BF16_GPUS", "CommandResult", "run_command", "current_user", "Gres", "parse_gres",
    "Partition", "Association", "SlurmFacts", "slurm_facts", "judged_benches", "planned_stages", "training_stage",
    "check_slurm", "check_account", "check_partitions",
    # storage
    "FEATURE_COMPRESSION", "HEADROOM", "SHARED_FS", "RAM_FS", "NODE_LOCAL_DIRS", "nearest_existing", "filesystem_type",
    "free_bytes", "check_run_dir", "dataset_records", "feature_shape", "feature_bytes_per_image", "planned_images",
    "check_disk_space",
    # inputs
    "SAMPLE_RECORDS", "TOKENIZER_FILES", "check_models", "check_data", "check_dataset", "check_judge", "ping_judge",
    # probe
    "PROBE_TIMEOUT_S", "PROBE_TIME_LIMIT_MIN", "probe_script", "probe_task", "run_probe", "probe_results",
]


# ---------------------------------------------------------------------------------------------- all of it
def run_checks(pipeline: Pipeline, online: bool = False, probe: bool = False, pipeline_warnings: list[str] | None = None,
               source: str | Path | None = None, run: Callable[..., CommandResult] | None = None,
               say: Callable[[str], None] | None = None, probe_timeout_s: float = PROBE_TIMEOUT_S) -> list[CheckResult]:
    """Every check, in the order a user fixes things."""
    results = [pipeline_row(pipeline, pipeline_warnings or [], source)]
    facts = None
    if pipeline.executor != "slurm":
        results.append(CheckResult("slurm", "skipped", f"executor = '{pipeline.executor}': no Slurm involved"))
    else:
        facts = slurm_facts(run)
        results += check_slurm(pipeline, facts)
        if facts.reachable:
            results += _guarded("account", check_account, pipeline, facts)
            results += _guarded("partitions", check_partitions, pipeline, facts)
        else:
            results += [CheckResult(name, "skipped", "Slurm is not reachable") for name in ("account", "partitions")]
    results += _guarded("run dir", check_run_dir, pipeline, run)
    results += _guarded("models", check_models, pipeline)
    results += _guarded("data", check_data, pipeline)
    results += _guarded("judge", check_judge, pipeline, online)
    if probe:
        if facts is None or not facts.reachable:
            results.append(CheckResult("probe job", "skipped", "no Slurm to submit to"))
        else:
            probed = _guarded("probe job", lambda: run_probe(pipeline, run=run, say=say, timeout_s=probe_timeout_s))
            results += probed
            if any(r.name == "compute nodes" and r.status == "ok" for r in probed):
                for row in results:
                    if row.name == "filesystem" and row.status == "warning":
                        row.status, row.fix = "ok", ""
                        row.detail += "; but the probe's compute nodes wrote into it, so it is shared here"
    elif pipeline.executor == "slurm":
        results.append(CheckResult("probe job", "skipped", "bf16, compute-node writes and the all-reduce are checked "
                                   "with --probe (a 1-minute job)"))
    return results


def pipeline_row(pipeline: Pipeline, warnings: list[str], source: str | Path | None = None) -> CheckResult:
    """The pipeline loaded without checking files: unset variables (once each) and missing files."""
    unset, others = [], []
    for warning in dict.fromkeys(warnings):
        text = re.sub(r"^\S+?\.toml: ", "", warning)
        match = re.match(r"environment variable (\w+) is not set", text)
        if match:
            unset.append(match.group(1))
        else:
            others.append(text)
    unset = list(dict.fromkeys(unset))
    if not unset and not others:
        return CheckResult("pipeline", "ok", f"{source or pipeline.name}: valid")
    parts = ([f"environment variable(s) not set: {', '.join(unset)}"] if unset else []) + others
    fix = (f"export {unset[0]}=... (and the others) before llava-hpc commands" if unset else
           "fix the paths (or fetch the files)")
    return CheckResult("pipeline", "warning", "; ".join(parts), fix)


def _guarded(name: str, check: Callable[..., list[CheckResult]], *args) -> list[CheckResult]:
    """A check that fails in an unforeseen way is a row that says so, never the end of the report."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001
        return [CheckResult(name, "error", f"the check itself failed: {type(exc).__name__}: {exc}",
                            "please report this with the pipeline file")]
