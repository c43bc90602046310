"""Fault injection on the real local Slurm: the whole pipeline (features -> stage1 -> stage2 -> generate -> judge ->
report, with an OpenAI-compatible judge) under the faults a shared cluster produces. Every case ends with exactly the
final artifacts of a clean run: the same feature shards, the same weights bit for bit, the same answers, judgements
and reports. docs/reliability.md has the table of cases.

Faults are injected at known points: the jobs sleep there (llava_hpc.faults, LLAVA_HPC_FAULT_SLEEP_*), and the test
strikes while a job is inside that window."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    SLURM_ACCOUNT,
    cluster_address,
    openai_stub_fixture,
    small_pipeline_dict,
    wait_for,
    write_pipeline,
)
from openai_stub import OpenAIStub
from PIL import Image, ImageDraw

from llava_hpc.config import load_pipeline
from llava_hpc.orchestrate import Orchestrator
from llava_hpc.rundir import RunDir, read_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLI = str(Path(sys.executable).parent / "llava-hpc")
KEY = "sk-llava-hpc-fault-test-" + secrets.token_hex(16)  # distinctive: the security scan greps for it
# Where the judge jobs read it: the user's private key file, outside every directory the security test scans.
KEY_FILE = Path(tempfile.mkdtemp(prefix="llava-hpc-keys-")) / "OPENAI_API_KEY"
STAGE_ORDER = ["features", "stage1", "stage2", "generate", "judge", "report"]
# Where each stage sleeps, so a fault lands mid-stage (the report sleeps before writing anything, long enough that
# an urgent job submitted once it runs is scheduled and preempts it first: at 6 s a loaded CI machine once let the
# report finish before the preemption struck).
SLOW = {
    "LLAVA_HPC_FAULT_SLEEP_AFTER_SHARD": "3",
    "LLAVA_HPC_FAULT_SLEEP_AFTER_STEP": "1",
    "LLAVA_HPC_FAULT_SLEEP_AFTER_CHUNK": "3",
    "LLAVA_HPC_FAULT_SLEEP_BEFORE_REPORT": "15",
}
# Fields that measure the run rather than make up its results: wall times, speeds, memory, job bookkeeping.
VOLATILE = {"time", "seconds", "generate_seconds", "finished_at", "samples_per_s", "tokens_per_s", "memory_gb",
            "images_per_s", "resumed_from_step", "resumed_from", "elapsed_s", "started_at", "latency_s", "wall_s", "key",
            # how this run's judgements were obtained (sent now, or from the cache of an earlier attempt), not what
            # they are: the tests check separately that nothing was paid for twice
            "requests_sent", "requests_from_cache"}


# ---------------------------------------------------------------------------------------------- the pipeline
def landing_images(folder: Path) -> Path:
    """A folder bench of four aerial-ish images: the judged bench (reference answers, reviews, a baseline)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (ground, thing) in enumerate([((40, 140, 40), "road"), ((30, 60, 160), "lake"),
                                         ((120, 120, 120), "roof"), ((90, 160, 60), "field")]):
        image = Image.new("RGB", (48, 40), ground)
        draw = ImageDraw.Draw(image)
        draw.rectangle([8 + 4 * i, 10, 24 + 4 * i, 30], fill=(200, 200, 40 * i))
        image.save(folder / f"{i:02d}-{thing}.png")
    return folder


def fault_pipeline(run_dir: Path, judge_url: str, images: Path, **judge) -> dict:
    return small_pipeline_dict(
        run_dir,
        name="faults",
        executor="slurm",
        python=sys.executable,
        slurm={"partition": "standard", "account": SLURM_ACCOUNT, "cpus": 1, "mem_gb": 1, "time": 20},
        synthetic={"n_pretrain": 64, "n_instruct": 48, "n_bench": 130},  # 130 questions: 3 generate chunks
        stages={
            "features": {"batch_size": 16, "shard_size": 16, "array_tasks": 2},  # 4 + 3 shards, 4 array tasks
            # A metrics row per step: the curve of an interrupted run must equal the clean one's step for step (with
            # windows, a resumed job's first row would average fewer steps).
            "stage1": {"dataset": "pretrain", "zero_stage": 0, "batch_size": 8, "epochs": 1, "save_every_steps": 2,
                       "log_every_steps": 1},
            "stage2": {"dataset": "instruct", "zero_stage": 0, "batch_size": 8, "epochs": 1, "save_every_steps": 2,
                       "log_every_steps": 1},
            "generate": {"batch_size": 32, "max_new_tokens": 4},
        },
        benches={"synthetic": {"kind": "synthetic"},
                 "landing": {"kind": "folder", "images": str(images), "question": "Is it safe to land here?"}},
        # The endpoint is inside the cluster (the bridge address): the judge runs as a job on an offline node, and
        # reads its key from the private key file (sbatch is never given it).
        judge={"base_url": judge_url, "model": "gpt-4o-mini", "reference_model": "gpt-4o-mini", "max_retries": 2,
               "timeout_s": 10, "max_concurrency": 2, "api_key_file": str(KEY_FILE), **judge},
    )


class Run:
    """One run directory driven the way a user drives it: `llava-hpc submit` in a shell whose environment holds
    the API key (llava-hpc keeps it from sbatch; the judge job reads the key file), status read through the
    orchestrator."""

    created: list[Run] = []  # every test's runs: their jobs are cancelled when the test ends, however it ends

    def __init__(self, root: Path, judge_url: str, images: Path, seed_from: Path | None = None,
                 stages_from: tuple[str, ...] = (), **judge):
        self.root = root
        self.dir = root / "run"
        if seed_from is not None:  # start from a clean run's finished stages, as a user resubmitting would
            self.dir.mkdir(parents=True)
            for stage in stages_from:
                shutil.copytree(seed_from / stage, self.dir / stage)
        self.pipeline_file = write_pipeline(root / "pipeline.toml", fault_pipeline(self.dir, judge_url, images, **judge))
        pipeline = load_pipeline(self.pipeline_file)
        self.orchestrator = Orchestrator(pipeline, RunDir(pipeline.run_dir))
        Run.created.append(self)

    def cancel_jobs(self) -> None:
        ids = sorted({s.array_job_id for s in self.orchestrator.run.submissions()})
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)

    def cli(self, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([CLI, *args, "-p", str(self.pipeline_file)], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "COLUMNS": "250", "OPENAI_API_KEY": KEY, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"llava-hpc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def submit_all(self, env: dict | None = None) -> str:
        return self.cli("submit", "all", env=env).stdout

    def submissions(self, stage: str) -> list:
        return [s for s in self.orchestrator.run.submissions() if s.stage == stage]

    def latest(self, stage: str):
        found = self.submissions(stage)
        return found[-1] if found else None

    def rows(self) -> dict:
        return {row.stage: row for row in self.orchestrator.status()}

    def wait_done(self, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while True:
            rows = self.rows()
            bad = [r for r in rows.values() if r.state in ("failed", "cancelled")]
            if bad:
                raise AssertionError(f"{bad[0].stage} {bad[0].state}: {bad[0].reason}\n{_tail(bad[0].log)}")
            if all(rows[s].state == "done" for s in STAGE_ORDER):
                return
            assert time.time() < deadline, {s: (r.state, r.reason) for s, r in rows.items()}
            time.sleep(2)


def _tail(path: str, chars: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-chars:] if path and Path(path).exists() else ""



def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id as submitted ("12" or "12_3") -> (state, Slurm's own job id of that task) for jobs still queued."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids})),
                          "-o", "%i|%T|%A"], capture_output=True, text=True).stdout
    rows = dict((parts[0], (parts[1], parts[2])) for parts in (line.split("|") for line in out.splitlines()) if len(parts) == 3)
    return {j: rows[j] for j in job_ids if j in rows}


def sacct_states(job_id: str) -> list[str]:
    """Every attempt's state, oldest first (a requeued job has several)."""
    out = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def nodes_of(raw_job_id: str) -> list[str]:
    nodelist = subprocess.run(["squeue", "-h", "-j", raw_job_id, "-o", "%N"], capture_output=True, text=True).stdout
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist.strip()], capture_output=True, text=True).stdout
    return out.split()


def kill_task(raw_job_id: str) -> int:
    """SIGKILL every process of one running Slurm task (batch script, srun, the Python worker), as the OOM killer
    or a crashed library would leave it: no signal handler runs, nothing is flushed."""
    pids = []
    for node in nodes_of(raw_job_id):  # the pids live in each node's slurmd spool (SlurmdSpoolDir=.../%n)
        out = subprocess.run(["scontrol", "listpids", raw_job_id, node], capture_output=True, text=True).stdout
        pids += [int(line.split()[0]) for line in out.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return len(pids)


def preempt_everything() -> str:
    """A job in `urgent` that wants every node whole: Slurm preempts (requeues) whatever runs anywhere."""
    out = subprocess.run(["sbatch", "--parsable", "-A", SLURM_ACCOUNT, "-p", "urgent", "-N2", "--exclusive",
                          "--time=2", "-o", "/dev/null", "--wrap", "sleep 2"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------------------------------------- what must match
def _normalized(value):
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def _json_digest(path: Path) -> str:
    if path.suffix == ".jsonl":
        rows = [_normalized(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = _normalized(json.loads(path.read_text()))
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def final_artifacts(run_dir: Path) -> dict[str, str]:
    """Digest of everything a run produces for its user: shards (bytes), weights (bytes), answers, judgements,
    reports and training curves (without wall-clock fields), and which stages are marked done."""
    found: dict[str, str] = {}
    patterns = ["features/*/part-*.parquet", "features/*/bad_records.jsonl", "features/*/summary.json",
                "stage1/projector.safetensors", "stage1/metrics.jsonl", "stage2/model/*.safetensors",
                "stage2/model/config.json", "stage2/metrics.jsonl", "generate/*/answers.jsonl",
                "generate/*/bad_questions.jsonl", "judge/*/reviews.jsonl", "judge/*/baseline_reviews.jsonl",
                "judge/*/reference_answers.jsonl", "judge/*/summary.json", "report/*/summary.json", "report/*/report.md",
                "*/_SUCCESS", "*/*/_SUCCESS"]
    for pattern in patterns:
        for path in sorted(run_dir.glob(pattern)):
            relative = str(path.relative_to(run_dir))
            if path.name == "_SUCCESS":
                found[relative] = "done"
            elif path.suffix in (".json", ".jsonl"):
                found[relative] = _json_digest(path)
            else:
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_same_artifacts(run_dir: Path, clean: dict[str, str]) -> None:
    mine = final_artifacts(run_dir)
    assert mine.keys() == clean.keys(), (sorted(mine.keys() - clean.keys()), sorted(clean.keys() - mine.keys()))
    differ = sorted(k for k in clean if mine[k] != clean[k])
    assert not differ, f"differ from the clean run: {differ}"
    leftovers = [p for p in run_dir.rglob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A failed case must not leave jobs that slow down the next one."""
    before = len(Run.created)
    yield
    for run in Run.created[before:]:
        run.cancel_jobs()


@pytest.fixture(scope="module", autouse=True)
def key_file():
    KEY_FILE.write_text(KEY)
    KEY_FILE.chmod(0o600)
    yield KEY_FILE
    shutil.rmtree(KEY_FILE.parent, ignore_errors=True)


# On the cluster bridge, which compute nodes reach; a job without the key would get 401.
stub = openai_stub_fixture(scope="module", host=cluster_address, expected_key=KEY)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return landing_images(tmp_path_factory.mktemp("landing") / "images")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, stub, images) -> Run:
    """The reference: the whole pipeline, submitted once, no faults."""
    run = Run(tmp_path_factory.mktemp("clean"), stub.url, images)
    run.submit_all()
    run.wait_done()
    run.artifacts = final_artifacts(run.dir)
    return run


def test_clean_run_is_complete_and_deterministic_enough_to_compare(clean):
    artifacts = clean.artifacts
    for stage in STAGE_ORDER:
        assert any(key.startswith(f"{stage}/") and key.endswith("_SUCCESS") for key in artifacts), stage
    assert len([k for k in artifacts if k.endswith(".parquet")]) == 7
    summary = json.loads((clean.dir / "report" / "landing" / "summary.json").read_text())
    assert summary["all"]["n"] == 4 and summary["all"]["parse_failures"] == 0
    for stage in STAGE_ORDER:
        assert len(clean.submissions(stage)) == 1


# ---------------------------------------------------------------------------------------------- security
def test_api_key_is_nowhere_on_disk_and_nothing_is_world_readable(clean):
    """The key was in the submitting shell's environment: no file of the run directory, the submitit folders (pickled
    jobs, logs), the local cluster's logs, or the controller's stored job environments and scripts holds it, and
    `scontrol show job` does not show it. The judge job got it from the private key file (its requests carried it:
    the stub answers 401 without it)."""
    slurm_logs = Path("/var/lib/llava-hpc-slurm/log")
    slurm_jobs = Path("/var/lib/llava-hpc-slurm/ctld")  # every job's stored environment and batch script
    stored = list(slurm_jobs.rglob("environment"))  # jobs still known to the controller (test_cluster_pipeline
    scanned = 0                                      # checks one held in the queue)
    for path in stored:
        assert KEY.encode() not in path.read_bytes(), f"the API key is in Slurm's stored job environment {path}"
    for submission in clean.orchestrator.run.submissions():
        shown = subprocess.run(["scontrol", "show", "job", "-dd", submission.array_job_id], capture_output=True,
                               text=True).stdout
        assert KEY not in shown
    for root in (clean.dir, clean.root, slurm_logs):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert KEY.encode() not in path.read_bytes(), f"the API key is in {path}"
                scanned += 1
    assert scanned > 50
    assert any(p.suffix == ".pkl" for p in (clean.dir / "logs").rglob("*")), "submitit pickles were scanned"
    exposed = [p for p in clean.dir.rglob("*") if p.stat().st_mode & 0o007]
    assert not exposed, f"world-accessible: {exposed[:5]}"
    assert clean.dir.stat().st_mode & 0o007 == 0


def test_nothing_unpickles_outside_the_run_directory():
    """torch.load only with weights_only=True; pickle.load only on submitit's result files inside the run directory;
    no model code from a hub (trust_remote_code)."""
    for path in (REPO / "llava_hpc").rglob("*.py"):
        text = path.read_text()
        for line_number, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code:
                assert "weights_only=True" in code, f"{path}:{line_number}"
            if "pickle.load" in code or "pickle.loads" in code:
                assert path.name == "scheduler.py", f"{path}:{line_number}"
            assert "trust_remote_code=True" not in code, f"{path}:{line_number}"
    scheduler = (REPO / "llava_hpc" / "scheduler.py").read_text()
    assert "is_relative_to(self.run.root.resolve())" in scheduler


# ---------------------------------------------------------------------------------------------- faults
def _progressed(run: Run, stage: str) -> bool:
    """The stage has done part of its work (and, with the sleeps in SLOW, has more to do)."""
    d = run.dir
    return {
        "features": lambda: (d / "features/pretrain/part-00000.parquet").exists(),
        "stage1": lambda: any((d / "stage1/checkpoints").glob("step-*/_COMPLETE")),
        "stage2": lambda: any((d / "stage2/checkpoints").glob("step-*/_COMPLETE")),
        "generate": lambda: any((d / "generate").glob("*/part-00000.json")),
        "judge": lambda: len(list((d / "judge").glob("*/cache/*.json"))) >= 2,
        "report": lambda: True,
    }[stage]()


def _running_task(run: Run, stage: str, index: int = 0) -> tuple[str, str] | None:
    """(job id as submitted, e.g. "12_0"; Slurm's own id of that task) once the stage's task `index` runs."""
    submission = run.latest(stage)
    if submission is None:
        return None
    job_id = submission.job_ids[index]
    state = squeue_states([job_id]).get(job_id)
    return (job_id, state[1]) if state and state[0] == "RUNNING" else None


def test_sigkill_in_each_stage_then_resubmit(tmp_path, stub, images, clean):
    """In every stage one task is killed with SIGKILL mid-work; the jobs waiting on it `afterok` can never run.
    `llava-hpc submit all` again: each time only what is missing is redone."""
    run = Run(tmp_path, stub.url, images)
    stub.script.latency_s = 1.0  # the judge takes long enough to be caught mid-way
    stub.reset_log()
    try:
        run.submit_all(SLOW)
        for stage in STAGE_ORDER:
            job_id, raw = wait_for(lambda: _progressed(run, stage) and _running_task(run, stage),
                                   what=f"{stage} mid-work")
            assert kill_task(raw) > 0
            wait_for(lambda: sacct_states(job_id)[-1:] == ["FAILED"], timeout=60, what=f"{stage} task {job_id} to fail")
            output = run.submit_all(SLOW)
            assert re.search(rf"^{stage}\s+submitted", output, re.M), output
        run.wait_done()
    finally:
        stub.script.latency_s = 0.0
    for stage in STAGE_ORDER:
        assert len(run.submissions(stage)) >= 2, stage  # each was killed and submitted again
    # The resubmission plans only the shards still missing then (the killed task's, and those its siblings, still
    # running, had not written yet), not all 7.
    replanned = sum(int(re.search(r"\((\d+) shards\)", label).group(1)) for label in run.submissions("features")[1].tasks)
    assert 1 <= replanned < 7
    # Judgements cached before the kill were not bought again; only those in flight at the kill (at most
    # max_concurrency) were sent twice.
    answered = stub.answered_keys()
    assert len(set(answered)) == 12 and len(answered) - 12 <= 2, len(answered)
    assert_same_artifacts(run.dir, clean.artifacts)


def test_preemption_in_each_stage_requeues_and_resumes(tmp_path, stub, images, clean):
    """In every stage the running jobs are preempted by an urgent job; Slurm requeues them and they resume from
    what is on disk, with no resubmission at all."""
    run = Run(tmp_path, stub.url, images)
    stub.script.latency_s = 1.0
    try:
        run.submit_all(SLOW)
        for stage in STAGE_ORDER:
            job_id, _ = wait_for(lambda: _progressed(run, stage) and _running_task(run, stage),
                                 what=f"{stage} mid-work")
            preempt_everything()
            wait_for(lambda: len(sacct_states(job_id)) >= 2, timeout=90, what=f"{stage} job {job_id} to be preempted")
        run.wait_done()
    finally:
        stub.script.latency_s = 0.0
    for stage in STAGE_ORDER:
        submissions = run.submissions(stage)
        assert len(submissions) == 1, stage  # requeued by Slurm, never resubmitted
    stage2 = json.loads((run.dir / "stage2" / "summary.json").read_text())
    assert stage2["resumed_from_step"] >= 2
    assert_same_artifacts(run.dir, clean.artifacts)


def node_fault(action: str, node: str) -> None:
    subprocess.run(["bash", str(REPO / "slurm" / "local" / "node.sh"), action, node],
                   check=True, capture_output=True, text=True, timeout=120)


def test_node_crash_and_slurmd_restart_mid_stage(tmp_path, stub, images, clean):
    """Mid stage 2 its node crashes (slurmd and every process of the node SIGKILLed, slurmd started again): Slurm finds
    the job gone (NODE_FAIL) and requeues it; it resumes from its last checkpoint. Mid generate that node's slurmd
    alone is restarted: the job lives on. No resubmission is needed for either."""
    run = Run(tmp_path, stub.url, images, seed_from=clean.dir, stages_from=("features", "stage1"))
    # At 8 s a step stage 2's 6 steps take ~55 s: the crash at ~25 s, after a checkpoint, cannot miss the job.
    run.submit_all({**SLOW, "LLAVA_HPC_FAULT_SLEEP_AFTER_STEP": "8"})
    stage2_job, raw = wait_for(lambda: _progressed(run, "stage2") and _running_task(run, "stage2"), what="stage2 mid-work")
    wait_for(lambda: run.rows()["stage2"].elapsed_s >= 24, timeout=60, what="stage2 to run 24 s")
    (node,) = nodes_of(raw)
    node_fault("crash", node)
    # A registering node is purged of a missing batch job only if the controller last saw the job over
    # BatchStartTimeout + MessageTimeout (~20 s) ago, and it sees it at each periodic registration (one fell within
    # 20 s of a crash in CI once, and the job stayed RUNNING). Down for 22 s, the node comes back with the job
    # stale: whichever comes first, the registration or SlurmdTimeout's ping, ends it NODE_FAIL.
    time.sleep(22)
    node_fault("start", node)
    wait_for(lambda: len(sacct_states(stage2_job)) >= 2, timeout=120, what="stage2 requeued after the node crash")
    assert sacct_states(stage2_job)[0] == "NODE_FAIL"
    generate_job, raw = wait_for(lambda: _progressed(run, "generate") and _running_task(run, "generate"),
                                 what="generate mid-work")
    (node,) = nodes_of(raw)
    node_fault("restart", node)
    run.wait_done()
    assert sacct_states(generate_job) == ["COMPLETED"]  # the same attempt finished
    assert json.loads((run.dir / "stage2" / "summary.json").read_text())["resumed_from_step"] >= 2
    for stage in STAGE_ORDER[2:]:
        assert len(run.submissions(stage)) == 1, stage
    assert_same_artifacts(run.dir, clean.artifacts)


def test_corrupt_shard_is_detected_by_checksum_and_recomputed(tmp_path, stub, images, clean):
    """A byte of a finished shard flips on the shared filesystem. Training refuses it by checksum, quarantines it and
    withdraws the features stage's _SUCCESS; the next `submit all` recomputes exactly that shard."""
    run = Run(tmp_path, stub.url, images, seed_from=clean.dir, stages_from=("features",))
    shard = run.dir / "features" / "pretrain" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, same mtime order: only the checksum can tell
    shard.write_bytes(bytes(data))
    run.submit_all()
    row = wait_for(lambda: (r := run.rows()["stage1"]).state == "failed" and r, timeout=240, what="stage1 to fail")
    log = Path(row.log).read_text()
    assert "CorruptShardError" in log and "part-00001.parquet" in log and "checksum" in log, log[-2000:]
    assert "CorruptShardError" in row.reason
    quarantined = read_jsonl(run.dir / "features" / "pretrain" / "quarantine" / "quarantined.jsonl")
    assert [q["shard"] for q in quarantined] == ["part-00001.parquet"]
    assert not (run.dir / "features" / "pretrain" / "_SUCCESS").exists()

    output = run.submit_all()
    assert re.search(r"^features\s+submitted job", output, re.M), output  # one task, not an array
    assert run.submissions("features")[-1].tasks == ["pretrain 1/1 (1 shards)"]
    run.wait_done()
    assert_same_artifacts(run.dir, clean.artifacts)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for the seeded features and stage 1 and the logs, not for one stage-2 checkpoint."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0750", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_clearly_and_nothing_half_written_is_done(small_disk, stub, images, clean):
    run = Run(small_disk, stub.url, images, seed_from=clean.dir, stages_from=("features", "stage1"))
    run.submit_all()
    row = wait_for(lambda: (r := run.rows()["stage2"]).state == "failed" and r, timeout=240, what="stage2 to fail")
    log = Path(row.log).read_text()
    assert "DiskFullError" in log and "no space left on the device" in log and "state.pt" in log, log[-2000:]
    assert "DiskFullError" in row.reason
    stage2 = run.dir / "stage2"
    assert not (stage2 / "_SUCCESS").exists()
    assert not list(stage2.rglob("*.tmp")) and not list((stage2 / "checkpoints").glob("step-*"))  # no half checkpoint
    assert not (stage2 / "model").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space is freed
    output = run.submit_all()
    assert re.search(r"^stage2\s+submitted", output, re.M), output
    run.wait_done()
    assert_same_artifacts(run.dir, clean.artifacts)


def test_judge_endpoint_down_then_back(tmp_path, images, clean):
    """The endpoint goes away after a few judgements (connections refused): the judge job retries, then fails
    naming what it could not get, keeping every judgement it got. Once the endpoint is back, `submit all` sends only
    the rest."""
    endpoint = OpenAIStub(host=cluster_address()).start()
    port = int(endpoint.url.rsplit(":", 1)[1].split("/")[0])
    endpoint.script.latency_s = 0.5
    run = Run(tmp_path, endpoint.url, images, seed_from=clean.dir,
              stages_from=("features", "stage1", "stage2", "generate"))
    run.submit_all()
    wait_for(lambda: len(endpoint.answered_keys()) >= 4, timeout=180, what="a few judgements")
    endpoint.stop()
    row = wait_for(lambda: (r := run.rows()["judge"]).state == "failed" and r, timeout=180, what="the judge to fail")
    assert "JudgeIncompleteError" in row.reason, row.reason
    assert not (run.dir / "judge" / "landing" / "_SUCCESS").exists()
    cached = len(list((run.dir / "judge" / "landing" / "cache").glob("*.json")))
    assert 4 <= cached < 12

    back = OpenAIStub(port=port, host=cluster_address()).start()
    try:
        output = run.submit_all()
        assert re.search(r"^judge\s+submitted", output, re.M), output
        run.wait_done()
    finally:
        back.stop()
    first, second = endpoint.answered_keys(), back.answered_keys()
    assert len(second) == 12 - cached  # only what was missing was sent again
    assert len(set(first) | set(second)) == 12
    assert_same_artifacts(run.dir, clean.artifacts)


def test_two_submits_at_once_one_wins(tmp_path, stub, images, clean):
    run = Run(tmp_path, stub.url, images, seed_from=clean.dir, stages_from=("features", "stage1"))
    command = [CLI, "submit", "all", "-p", str(run.pipeline_file)]
    env = {**os.environ, "COLUMNS": "250", "OPENAI_API_KEY": KEY}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "another llava-hpc command is submitting into this run directory" in loser and "(llava-hpc submit all)" in loser
    for stage in STAGE_ORDER[2:]:
        assert len(run.submissions(stage)) == 1, stage  # nothing was submitted twice
    run.wait_done()
    assert_same_artifacts(run.dir, clean.artifacts)
