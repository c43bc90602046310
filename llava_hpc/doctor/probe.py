"""The `--probe` job: one short job on the training stage's partition and nodes. On each node `probe_task` reports
CUDA and native bf16, writes a marker into the run directory and joins a gloo all-reduce; `probe_results` turns the
job's state and the markers into rows."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from llava_hpc.config import Pipeline
from llava_hpc.doctor.result import CheckResult
from llava_hpc.doctor.slurm import CommandResult, run_command, training_stage
from llava_hpc.secrets import without_secrets

PROBE_TIMEOUT_S = 180.0
PROBE_TIME_LIMIT_MIN = 3
_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
             "PREEMPTED", "REVOKED"}


# ---------------------------------------------------------------------------------------------- the probe job
def probe_script(pipeline: Pipeline, stage: str, out_dir: Path, python: str | None = None) -> str:
    """The sbatch script of the probe: the training stage's partition, account, QOS, nodes; one task and (on a GPU
    partition) one GPU per node; `PROBE_TIME_LIMIT_MIN` minutes."""
    resources = pipeline.resources(stage)
    python = python or pipeline.python or sys.executable
    lines = ["#!/bin/bash", "#SBATCH --job-name=llava-doctor",
             f"#SBATCH --nodes={resources.nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={min(resources.cpus, 4)}", f"#SBATCH --time={PROBE_TIME_LIMIT_MIN}",
             f"#SBATCH --output={out_dir}/slurm-%j.out"]
    for option, value in (("partition", resources.partition), ("account", resources.account), ("qos", resources.qos),
                          ("constraint", resources.constraint), ("wckey", resources.wckey)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    if resources.gpus:
        lines.append("#SBATCH --gpus-per-node=1")
    if resources.mem_gb:
        lines.append(f"#SBATCH --mem={max(1, int(min(resources.mem_gb, 4)))}G")
    for key, value in resources.additional.items():
        lines.append(f"#SBATCH --{key}={value}")
    code = "import sys; from llava_hpc.doctor import probe_task; sys.exit(probe_task(sys.argv[1]))"
    lines += [*resources.setup,
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
              f"srun --nodes={resources.nodes} --ntasks-per-node=1 --cpus-per-task={min(resources.cpus, 4)} "
              f"--kill-on-bad-exit=1 {shlex.quote(python)} -c {shlex.quote(code)} {shlex.quote(str(out_dir))}", ""]
    return "\n".join(lines)


def probe_task(out_dir: str) -> int:
    """One Slurm task of the probe (one per node): CUDA and bf16 here, a gloo all-reduce across the tasks, and a
    marker `node-<rank>.json` in the run directory that says so."""
    rank = int(os.environ.get("SLURM_PROCID", 0))
    world = int(os.environ.get("SLURM_NTASKS", 1))
    import socket

    result: dict = {"rank": rank, "world": world, "host": socket.gethostname(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": None, "gpu": None,
                    "capability": None, "bf16": None, "allreduce": None, "expected": world * (world + 1) / 2,
                    "error": None}
    code = 0
    try:
        import datetime

        import torch

        if torch.cuda.is_available():
            result.update(cuda=True, gpu=torch.cuda.get_device_name(0),
                          capability=list(torch.cuda.get_device_capability(0)))
            try:
                result["bf16"] = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # older torch: no emulation argument
                result["bf16"] = bool(torch.cuda.is_bf16_supported())
            result["bf16"] = result["bf16"] and tuple(result["capability"]) >= (8, 0)  # as train/loop.native_bf16
        else:
            result["cuda"] = False
        address = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", 29500))
        torch.distributed.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            tensor = torch.tensor([float(rank + 1)])
            torch.distributed.all_reduce(tensor)
            result["allreduce"] = float(tensor.item())
        finally:
            torch.distributed.destroy_process_group()
        if result["allreduce"] != result["expected"]:
            code = 1
    except Exception as exc:  # noqa: BLE001 - reported in the marker, which is the point of the probe
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        code = 1
    finally:
        target = Path(out_dir) / f"node-{rank}.json"
        temporary = target.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(result))
        os.replace(temporary, target)
    return code


def _sbatch_env(pipeline: Pipeline) -> dict:
    """sbatch exports the submitting environment to the job (and Slurm stores it): no secrets."""
    return {k: v for k, v in without_secrets(os.environ).items() if k != pipeline.judge.api_key_env}


def run_probe(pipeline: Pipeline, timeout_s: float = PROBE_TIMEOUT_S, poll_s: float = 2.0,
              run: Callable[..., CommandResult] | None = None, say: Callable[[str], None] | None = None
              ) -> list[CheckResult]:
    """Submit the probe job, wait for it (at most `timeout_s`, then cancel it), and read the nodes' markers."""
    run = run or run_command
    stage = training_stage(pipeline)
    if stage is None:
        return [CheckResult("probe job", "skipped", "no training stage in the pipeline: nothing to probe")]
    resources = pipeline.resources(stage)
    out_dir = Path(pipeline.run_dir) / "doctor" / f"probe-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        out_dir.mkdir(parents=True)
    except OSError as exc:
        return [CheckResult("probe job", "error", f"cannot create {out_dir}: {exc.strerror or exc}",
                            "make run_dir writable")]
    script = out_dir / "probe.sbatch"
    script.write_text(probe_script(pipeline, stage, out_dir))
    submitted = run(["sbatch", "--parsable", str(script)], timeout=60, env=_sbatch_env(pipeline))
    where = f"{resources.partition or 'default partition'}, {resources.nodes} node(s)"
    if not submitted.ok:
        return [CheckResult("probe job", "error", f"sbatch refused the probe ({where}): {submitted.why()}",
                            "fix the account/partition/GPU lines above; the script is " + str(script))]
    job = submitted.stdout.strip().split(";")[0]
    if say:
        say(f"probe job {job} submitted ({where}); waiting up to {timeout_s:.0f} s")
    started = time.monotonic()
    state, reason, timed_out = "PENDING", "", False
    try:
        while True:
            queue = run(["squeue", "-h", "-j", job, "-o", "%T|%r"])
            line = queue.stdout.strip().splitlines()[0] if queue.ok and queue.stdout.strip() else ""
            if line:
                state, _, reason = line.partition("|")
            if (queue.ok and not line) or state in _TERMINAL or state.startswith("CANCELLED"):
                break
            if time.monotonic() - started > timeout_s:
                timed_out = True
                run(["scancel", job])
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        run(["scancel", job])  # no probe left behind in the queue
        raise
    elapsed = time.monotonic() - started
    for _ in range(5):  # accounting can lag the queue by a second or two
        acct = run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"])
        text = acct.stdout.strip().splitlines()[0] if acct.ok and acct.stdout.strip() else ""
        if text and text.split("|")[0].split()[0] in _TERMINAL | {"CANCELLED"}:
            state = text.split("|")[0].split()[0]
            break
        if timed_out:
            break
        time.sleep(1.0)
    markers = []
    for path in sorted(out_dir.glob("node-*.json")):
        try:
            markers.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    log = out_dir / f"slurm-{job}.out"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    results = probe_results(pipeline, stage, job, state, reason, timed_out, elapsed, markers, tail, timeout_s)
    if all(r.status != "error" for r in results):
        for path in out_dir.iterdir():
            path.unlink()
        out_dir.rmdir()
        try:
            out_dir.parent.rmdir()  # RUN/doctor, if nothing else is in it
        except OSError:
            pass
    else:
        results[0].fix = (results[0].fix + "; " if results[0].fix else "") + f"the probe's files: {out_dir}"
    return results


def probe_results(pipeline: Pipeline, stage: str, job: str, state: str, reason: str, timed_out: bool, elapsed: float,
                  markers: list[dict], log_tail: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> list[CheckResult]:
    """What the probe's job state and its nodes' markers say (a pure function: the tests feed it markers)."""
    resources = pipeline.resources(stage)
    nodes = resources.nodes
    hosts = ", ".join(m["host"] for m in sorted(markers, key=lambda m: m["rank"]))
    tail = f"; log: {' | '.join(log_tail)}" if log_tail else ""
    if timed_out and not markers and state == "PENDING":
        return [CheckResult("probe job", "warning", f"job {job} still pending after {timeout_s:.0f} s "
                            f"({reason or 'no reason given'}); cancelled",
                            "the partition is busy: rerun `llava-hpc doctor --probe` later"),
                CheckResult("compute nodes", "skipped", "the probe did not run")]
    if timed_out:
        job_row = CheckResult("probe job", "error", f"job {job} did not finish within {timeout_s:.0f} s ({state}); "
                              f"cancelled{tail}", "a hang between nodes: see the all-reduce row")
    elif state != "COMPLETED":
        job_row = CheckResult("probe job", "error", f"job {job} ended {state}{tail}",
                              "read the probe's log (below) for why")
    else:
        job_row = CheckResult("probe job", "ok", f"job {job} ran on {hosts} in {elapsed:.0f} s ({stage}'s "
                              f"{resources.partition or 'default partition'}, {nodes} node(s))")
    results = [job_row]
    if len(markers) < nodes:
        results.append(CheckResult("compute nodes", "error", f"{len(markers)} of {nodes} node(s) wrote their marker "
                                   f"into {pipeline.run_dir}{' (' + hosts + ')' if hosts else ''}",
                                   "put run_dir on a filesystem the compute nodes mount and can write"))
    else:
        results.append(CheckResult("compute nodes", "ok", f"{hosts} wrote into {pipeline.run_dir}"))
    if not markers:
        return results
    results.append(_bf16_row(pipeline, markers))
    errors = [f"{m['host']}: {m['error']}" for m in markers if m.get("error")]
    values = {m.get("allreduce") for m in markers}
    expected = markers[0].get("expected")
    if errors:
        results.append(CheckResult("all-reduce", "error", "; ".join(errors)[:400],
                                   "nodes must reach the first node's MASTER_ADDR:MASTER_PORT (firewall? hostname "
                                   "resolution?)"))
    elif len(markers) < nodes or values != {expected}:
        results.append(CheckResult("all-reduce", "error", f"results {sorted(map(str, values))}, expected {expected} "
                                   f"from {nodes} node(s)", "see the probe's log"))
    else:
        results.append(CheckResult("all-reduce", "ok", f"gloo all_reduce over {len(markers)} node(s) ({hosts}): "
                                   f"{expected}"))
    return results


def _bf16_row(pipeline: Pipeline, markers: list[dict]) -> CheckResult:
    wants_bf16 = [s for s in ("stage1", "stage2")
                  if getattr(pipeline.stages, s) is not None and getattr(pipeline.stages, s).precision == "bf16"]
    no_cuda = [m for m in markers if not m.get("cuda")]
    if len(no_cuda) == len(markers):
        seen = markers[0].get("cuda_visible_devices")
        why = "torch could not start" if markers[0].get("error") and markers[0].get("cuda") is None else \
            "no CUDA on the node"
        return CheckResult("bf16", "warning", f"{why} (CUDA_VISIBLE_DEVICES={seen}): bf16 not checked",
                           "a CUDA build of torch in the jobs' venv, and a GPU partition" if seen is None else
                           "install a CUDA build of torch in the jobs' venv (fine on a CPU-only test cluster)")
    without = [m for m in markers if m.get("cuda") and not m.get("bf16")]
    gpus = ", ".join(dict.fromkeys(f"{m['gpu']} (sm {'.'.join(map(str, m['capability']))})" for m in markers
                                   if m.get("cuda")))
    if without and wants_bf16:
        return CheckResult("bf16", "error", f"{gpus}: no native bf16, but {', '.join(wants_bf16)} set precision = "
                           "'bf16'", "set precision = \"fp16\" (loss scaling) or \"auto\" for those stages")
    if without:
        return CheckResult("bf16", "warning", f"{gpus}: no native bf16; precision 'auto' trains in fp16 there")
    return CheckResult("bf16", "ok", f"{gpus}: native bf16")
