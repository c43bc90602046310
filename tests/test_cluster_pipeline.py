"""The seed recipe's stage layout on the local multi-node cluster (pipelines/demo-cluster.toml, tiny models): features
as an array over both nodes, stage 1, stage 2 with DeepSpeed ZeRO-2 on 2 nodes x 1 task, generate, report; equal,
bit for bit, to stage 2 on 1 node x 2 tasks. Then what a real cluster does to it: a node dies mid-training, a feature
shard rots under two ranks, and the judge's key must never reach Slurm."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from conftest import REPO, SLURM_ACCOUNT, cluster_address, wait_for

from llava_hpc.config import load_pipeline
from llava_hpc.orchestrate import Orchestrator
from llava_hpc.rundir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STATE = Path("/var/lib/llava-hpc-slurm")


def demo_cluster(directory: Path, stage2_slurm: dict | None = None, **stage2) -> Path:
    """pipelines/demo-cluster.toml with a smaller world (the layout is what is under test, not the learning)."""
    data = tomllib.loads((REPO / "pipelines" / "demo-cluster.toml").read_text())
    data["profile"] = str(REPO / "slurm" / "profiles" / "local.toml")
    data["run_dir"] = str(directory / "run")
    data["python"] = sys.executable
    data["synthetic"].update(n_pretrain=256, n_instruct=256, n_bench=40)
    data["stages"]["features"].update(shard_size=64)
    data["stages"]["stage2"].update(stage2)
    data["stages"]["stage2"]["slurm"].update(stage2_slurm or {})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class ClusterRun:
    def __init__(self, directory: Path, seed_from: Path | None = None, stages_from=(), stage2_slurm=None, **stage2):
        self.dir = directory / "run"
        if seed_from is not None:  # earlier stages from another run, as a user resubmitting one stage
            self.dir.mkdir(parents=True)
            for stage in stages_from:
                shutil.copytree(seed_from / stage, self.dir / stage)
        pipeline = load_pipeline(demo_cluster(directory, stage2_slurm, **stage2))
        self.orchestrator = Orchestrator(pipeline, RunDir(pipeline.run_dir))

    def submit(self, stage: str = "all", env: dict | None = None):
        saved = dict(os.environ)
        os.environ.update(env or {})  # sbatch exports the submitting environment (but secrets) to the job
        try:
            return self.orchestrator.submit(stage)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def rows(self) -> dict:
        return {row.stage: row for row in self.orchestrator.status()}

    def wait(self, stages: list[str], timeout: float = 900) -> dict:
        rows = self.orchestrator.wait_until_finished(stages, poll_s=2, timeout_s=timeout)
        return {row.stage: row for row in rows}

    def wait_done(self, stages: list[str], timeout: float = 900) -> None:
        for row in self.wait(stages, timeout).values():
            if row.state != "done":
                log = Path(row.log).read_text()[-3000:] if row.log else ""
                raise AssertionError(f"{row.stage} {row.state}: {row.reason}\n{log}")

    def cancel(self) -> None:
        ids = sorted({s.array_job_id for s in self.orchestrator.run.submissions() if s.executor == "slurm"})
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)

    def weights(self) -> str:
        return hashlib.sha256((self.dir / "stage2" / "model" / "model.safetensors").read_bytes()).hexdigest()

    def report(self) -> dict:
        return json.loads((self.dir / "report" / "synthetic" / "summary.json").read_text())

    def job(self, stage: str) -> str:
        return self.orchestrator.run.latest_submission(stage).array_job_id


def sacct(job: str, fields: str = "JobID,State,NodeList") -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", fields], capture_output=True,
                         text=True).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def node_fault(action: str, node: str) -> None:
    subprocess.run(["bash", str(REPO / "slurm" / "local" / "node.sh"), action, node], check=True,
                   capture_output=True, text=True, timeout=120)



@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> ClusterRun:
    """The whole chain as `llava-hpc submit all` queues it, stage 2 on 2 nodes x 1 task."""
    run = ClusterRun(tmp_path_factory.mktemp("two-nodes"))
    try:
        outcomes = run.submit()
        assert [o.action for o in outcomes] == ["submitted"] * 4 + ["not-applicable", "submitted"], outcomes
        run.wait_done(["features", "stage1", "stage2", "generate", "report"])
    finally:
        run.cancel()
    return run


def test_seed_layout_runs_end_to_end_across_nodes(two_nodes):
    features = sacct(two_nodes.job("features"))
    assert len(features) == 8 and {row[1] for row in features} == {"COMPLETED"}  # 4 tasks per dataset
    assert {row[2] for row in features} == {"node1", "node2"}, features  # the array spread over both nodes
    (stage2,) = sacct(two_nodes.job("stage2"), "JobID,State,NodeList,NNodes,AllocTRES")
    assert stage2[1:4] == ["COMPLETED", "node[1-2]", "2"] and "gres/gpu=2" in stage2[4], stage2
    summary = json.loads((two_nodes.dir / "stage2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 16  # 256 samples x 4 epochs / (16 x 2 x 2)
    losses = [json.loads(line)["loss"] for line in (two_nodes.dir / "stage2" / "metrics.jsonl").read_text().split("\n")
              if line]
    assert losses[-1] < losses[0]
    report = two_nodes.report()
    assert report["n"] == 40 and report["exact_match"] is not None
    for stage in ("judge", "report"):  # CPU work goes to the CPU partition, which takes no GPU request at all
        if two_nodes.orchestrator.run.latest_submission(stage) is not None:
            assert sacct(two_nodes.job(stage), "JobID,Partition,AllocTRES")[0][1] == "standard"
            assert "gres/gpu" not in sacct(two_nodes.job(stage), "JobID,Partition,AllocTRES")[0][2]


def test_two_nodes_equal_one_node_with_the_same_global_batch(tmp_path, two_nodes):
    one_node = ClusterRun(tmp_path, seed_from=two_nodes.dir, stages_from=("features", "stage1"),
                          stage2_slurm={"nodes": 1, "tasks_per_node": 2, "gpus": 2})
    try:
        outcomes = one_node.submit()
        assert [o.action for o in outcomes][:2] == ["skipped-done", "skipped-done"], outcomes
        one_node.wait_done(["stage2", "generate", "report"])
    finally:
        one_node.cancel()
    (stage2,) = sacct(one_node.job("stage2"), "JobID,State,NodeList,NNodes")
    assert stage2[3] == "1" and stage2[2] in ("node1", "node2")
    assert json.loads((one_node.dir / "stage2" / "summary.json").read_text())["world_size"] == 2
    assert one_node.weights() == two_nodes.weights()  # bit for bit
    assert one_node.report()["exact_match"] == two_nodes.report()["exact_match"]


def test_node_failure_mid_training_requeues_and_resumes_to_the_same_weights(tmp_path, two_nodes):
    """node2 dies (its slurmd and every process of it SIGKILLed) mid stage 2 on node[1-2]. Slurm marks it down, the job
    NODE_FAIL and requeued (it asked for --requeue; the cluster has JobRequeue=0); when the node returns the job
    resumes from its last checkpoint and ends with the clean run's weights."""
    run = ClusterRun(tmp_path, seed_from=two_nodes.dir, stages_from=("features", "stage1"), save_every_steps=4)
    timeline: dict[str, float] = {}
    try:
        run.submit("stage2", env={"LLAVA_HPC_FAULT_SLEEP_AFTER_STEP": "2"})
        job = run.job("stage2")
        checkpoints = run.dir / "stage2" / "checkpoints"
        wait_for(lambda: list(checkpoints.glob("step-*/_COMPLETE")), what="a first checkpoint")
        started = time.time()
        node_fault("crash", "node2")
        timeline["killed"] = 0.0

        def node2_down():
            state = subprocess.run(["sinfo", "-h", "-N", "-n", "node2", "-o", "%t"], capture_output=True,
                                   text=True).stdout.strip()
            return state.startswith("down") and state

        wait_for(node2_down, timeout=120, what="node2 to be marked down")
        timeline["node down"] = time.time() - started
        wait_for(lambda: [r[1] for r in sacct(job)][:1] == ["NODE_FAIL"], timeout=60, what="the attempt to end NODE_FAIL")
        wait_for(lambda: len(sacct(job)) >= 2, timeout=60, what="the job to be requeued")
        timeline["requeued"] = time.time() - started
        node_fault("start", "node2")
        timeline["node back"] = time.time() - started
        wait_for(lambda: sacct(job)[-1][1] == "RUNNING", timeout=120, what="the requeued job to run again")
        timeline["resumed"] = time.time() - started
        run.wait_done(["stage2"], timeout=600)
        timeline["done"] = time.time() - started
    finally:
        run.cancel()
        if subprocess.run(["bash", "-c", f"[ -e {STATE}/run/slurmd-node2.pid ]"]).returncode != 0:
            node_fault("start", "node2")  # never leave the shared cluster a node short
    print("node failure timeline (s after the kill):", json.dumps({k: round(v, 1) for k, v in timeline.items()}))
    states = [row[1] for row in sacct(job)]
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED", states
    summary = json.loads((run.dir / "stage2" / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 4 and summary["world_size"] == 2
    assert run.weights() == two_nodes.weights()


def test_corrupt_shard_fails_every_rank_with_one_message_and_no_hang(tmp_path, two_nodes):
    run = ClusterRun(tmp_path, seed_from=two_nodes.dir, stages_from=("features", "stage1"))
    shard = run.dir / "features" / "instruct" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    started = time.time()
    try:
        run.submit("stage2")
        row = run.wait(["stage2"], timeout=300)["stage2"]
    finally:
        run.cancel()
    elapsed = time.time() - started
    assert row.state == "failed", row
    assert elapsed < 240  # a rank left waiting in a collective would sit until the 30-minute timeout
    assert "part-00001.parquet" in row.reason and ("CorruptShardError" in row.reason or "RankDataError" in row.reason)
    job = run.job("stage2")
    logs = [(run.dir / "logs" / "stage2" / f"{job}_{rank}_log.err").read_text() for rank in (0, 1)]
    for log in logs:  # every rank stopped at the same step, naming the shard
        assert "part-00001.parquet" in log and ("CorruptShardError" in log or "RankDataError" in log), log[-2000:]
    assert not (run.dir / "features" / "instruct" / "_SUCCESS").exists()  # withdrawn: the resubmit recomputes it


def test_the_judge_key_never_reaches_slurm(tmp_path, monkeypatch):
    """A judge job to an endpoint inside the cluster, submitted from a shell holding the key: the job's stored
    environment (the controller's state) and `scontrol show job` have everything but the key; the job would read
    it from the private key file, which the submit insisted on."""
    from conftest import small_pipeline_dict, write_pipeline

    key = "sk-never-in-slurm-" + os.urandom(8).hex()
    key_file = tmp_path / "keys" / "OPENAI_API_KEY"
    data = small_pipeline_dict(tmp_path / "run", executor="slurm", python=sys.executable,
                               slurm={"partition": "standard", "account": SLURM_ACCOUNT, "cpus": 1, "mem_gb": 1,
                                      "time": 10, "additional": {"begin": "now+1hour"}},  # held: still stored
                               benches={"landing": {"kind": "folder", "images": str(tmp_path),
                                                    "question": "Is it safe to land here?"}},
                               judge={"base_url": f"http://{cluster_address()}:9/v1", "api_key_file": str(key_file)})
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", data))
    run = RunDir(pipeline.run_dir)
    (run.root / "generate" / "landing").mkdir(parents=True)
    run.mark_done(run.root / "generate" / "landing")
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("LLAVA_HPC_TEST_MARKER", "stored-with-the-job")
    from llava_hpc.orchestrate import PreflightError

    with pytest.raises(PreflightError, match="never passes it to sbatch") as refused:
        Orchestrator(pipeline, run).submit("judge")
    assert str(key_file) in str(refused.value) and not run.submissions()
    key_file.parent.mkdir()
    key_file.write_text(key)
    key_file.chmod(0o644)
    with pytest.raises(PreflightError, match="readable by others"):
        Orchestrator(pipeline, run).submit("judge")
    key_file.chmod(0o600)
    outcomes = Orchestrator(pipeline, run).submit("judge")
    assert outcomes[-1].action == "submitted", outcomes
    job = outcomes[-1].submission.array_job_id
    try:
        stored = wait_for(lambda: list((STATE / "ctld").glob(f"hash.*/job.{job}/environment")), timeout=10,
                          what="the controller to store the job")
        environment = stored[0].read_bytes()
        assert b"LLAVA_HPC_TEST_MARKER=stored-with-the-job" in environment  # what Slurm keeps of the environment
        assert key.encode() not in environment and b"OPENAI_API_KEY" not in environment
        shown = subprocess.run(["scontrol", "show", "job", "-dd", job], capture_output=True, text=True).stdout
        assert job in shown and key not in shown
        script = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True).stdout
        assert "#SBATCH --requeue" in script and key not in script
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert os.environ["OPENAI_API_KEY"] == key  # the submitting shell keeps it
