"""`llava-hpc doctor`: each check on fake Slurm outputs and small files, then the whole command on the local cluster
(Slurm, account and partition checks, and `--probe`: a job on both nodes that writes into the run directory and joins
a gloo all-reduce)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, SLURM_ACCOUNT, invoke, small_pipeline_dict, write_pipeline
from openai_stub import OpenAIStub

from llava_hpc import doctor
from llava_hpc.config import Stage1Stage, load_pipeline, parse_pipeline
from llava_hpc.doctor import CommandResult

KEY_ENV = "LLAVA_TEST_DOCTOR_KEY"
KEY = "sk-doctor-SECRET-51f0c2"
LOCAL_PROFILE = str(REPO / "slurm" / "profiles" / "local.toml")


def pipeline_of(tmp_path: Path, run_dir: str | Path | None = None, **sections):
    data = small_pipeline_dict(run_dir or tmp_path / "run", **sections)
    return parse_pipeline(data, tmp_path / "pipeline.toml", check_files=False)


def slurm_pipeline(tmp_path: Path, **sections):
    """The local cluster's layout: profile local.toml (spgpu for GPU stages, standard for report), stage 2 on 2 nodes."""
    data = small_pipeline_dict(tmp_path / "run", executor="slurm", **sections)
    data["profile"] = LOCAL_PROFILE
    data["slurm"].pop("partition")  # the profile's: spgpu
    data["stages"]["stage2"].setdefault("slurm", {}).update(nodes=2)
    return data


def load(tmp_path: Path, data: dict):
    path = write_pipeline(tmp_path / "pipeline.toml", data)
    return load_pipeline(path, check_files=False)


def rows(results, name: str) -> list:
    return [r for r in results if r.name == name]


def row(results, name: str):
    found = rows(results, name)
    assert len(found) == 1, f"{name}: {found} in {[r.name for r in results]}"
    return found[0]


SINFO = "standard*|up|2|gpu:2\nspgpu|up|2|gpu:2\nurgent|up|2|gpu:2\n"
SACCTMGR = "root||normal\nllava-lab||llava-lab,normal\n"


def fake_slurm(monkeypatch, sinfo: str = SINFO, sacctmgr: str = SACCTMGR) -> list:
    calls = []

    def run(argv, timeout=doctor.COMMAND_TIMEOUT_S, env=None):
        calls.append(argv)
        if argv[0] == "sinfo":
            return CommandResult(0, sinfo)
        if argv[0] == "sacctmgr":
            return CommandResult(0, sacctmgr)
        return CommandResult(None, problem=f"{argv[0]} not faked")

    for module in (doctor.slurm, doctor.storage, doctor.probe):  # every module that looks run_command up
        monkeypatch.setattr(module, "run_command", run)
    return calls


# ---------------------------------------------------------------------------------------------- module and Slurm
def test_import_is_cheap():
    code = ("import sys, llava_hpc.doctor; print(sorted(m for m in ('torch', 'transformers', 'openai', 'submitit', "
            "'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_without_slurm_one_error_row_and_the_other_slurm_rows_skipped(tmp_path, monkeypatch):
    """A laptop: no sinfo on PATH (the real run_command). One clear error; account/partitions skipped; no crash."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    results = doctor.run_checks(load(tmp_path, slurm_pipeline(tmp_path)), probe=True)
    slurm = row(results, "slurm")
    assert slurm.status == "error" and "Slurm is not reachable" in slurm.detail and "sinfo not found" in slurm.detail
    assert row(results, "account").status == "skipped" and row(results, "partitions").status == "skipped"
    assert row(results, "probe job").status == "skipped"
    assert [r.name for r in results if r.status == "error"] == ["slurm"]


def test_account_and_partitions_from_fake_slurm(tmp_path, monkeypatch):
    calls = fake_slurm(monkeypatch)
    results = doctor.run_checks(load(tmp_path, slurm_pipeline(tmp_path)))
    assert row(results, "slurm").status == "ok"
    account = row(results, "account")
    assert account.status == "ok" and SLURM_ACCOUNT in account.detail
    assert row(results, "partition spgpu").status == "ok" and row(results, "partition standard").status == "ok"
    assert row(results, "gpus spgpu").status == "ok"
    assert "partition urgent" not in [r.name for r in results]  # no stage uses it
    assert ["sacctmgr", "-nP", "show", "assoc", f"user={doctor.current_user()}", "format=account,partition,qos"] in calls
    assert not doctor.has_errors(results)


def test_account_not_among_the_users(tmp_path, monkeypatch):
    fake_slurm(monkeypatch, sacctmgr="other-lab||normal\n")
    account = row(doctor.run_checks(load(tmp_path, slurm_pipeline(tmp_path))), "account")
    assert account.status == "error"
    assert "'llava-lab' is not one of yours (other-lab)" in account.detail and "other-lab" in account.fix


def test_account_valid_only_for_another_partition(tmp_path, monkeypatch):
    fake_slurm(monkeypatch, sacctmgr="llava-lab|standard|normal\n")
    account = row(doctor.run_checks(load(tmp_path, slurm_pipeline(tmp_path))), "account")
    assert account.status == "error" and "only for partition(s) standard, not spgpu" in account.detail


def test_qos_not_allowed(tmp_path, monkeypatch):
    fake_slurm(monkeypatch)
    data = slurm_pipeline(tmp_path)
    data["slurm"]["qos"] = "high"
    qos = row(doctor.run_checks(load(tmp_path, data)), "qos")
    assert qos.status == "error" and "QOS 'high'" in qos.detail and "llava-lab, normal" in qos.fix


def test_missing_account_is_a_warning_listing_the_users_accounts(tmp_path, monkeypatch):
    fake_slurm(monkeypatch)
    data = slurm_pipeline(tmp_path)
    data["slurm"].pop("account")
    path = write_pipeline(tmp_path / "pipeline.toml", data)
    (tmp_path / "profile.toml").write_text((REPO / "slurm" / "profiles" / "local.toml").read_text()
                                           .replace('account = "llava-lab"\n', ""))
    data["profile"] = str(tmp_path / "profile.toml")
    path = write_pipeline(path, data)
    account = row(doctor.run_checks(load_pipeline(path, check_files=False)), "account")
    assert account.status == "warning" and "no account set" in account.detail and "llava-lab, root" in account.detail


def test_partition_that_does_not_exist(tmp_path, monkeypatch):
    fake_slurm(monkeypatch)
    data = slurm_pipeline(tmp_path)
    data["stages"]["stage2"]["slurm"]["partition"] = "gpu-large"
    found = row(doctor.run_checks(load(tmp_path, data)), "partition gpu-large")
    assert found.status == "error" and "'gpu-large' (stage2) does not exist" in found.detail
    assert "standard, spgpu, urgent" in found.detail


def test_gpu_kind_is_checked_against_sinfo(tmp_path, monkeypatch):
    fake_slurm(monkeypatch, sinfo="standard*|up|4|(null)\nspgpu|up|4|gpu:v100:4(S:0-1)\n")
    data = slurm_pipeline(tmp_path, cluster={"gpu_types": {"spgpu": "a40"}})
    gpus = row(doctor.run_checks(load(tmp_path, data)), "gpus spgpu")
    assert gpus.status == "error" and "gpu:v100:4 (v100)" in gpus.detail and "'a40'" in gpus.detail
    assert "cluster.gpu_types.spgpu" in gpus.fix

    data = slurm_pipeline(tmp_path, cluster={"gpu_types": {"spgpu": "v100"}})
    assert row(doctor.run_checks(load(tmp_path, data)), "gpus spgpu").status == "ok"

    data["stages"]["stage2"]["precision"] = "bf16"  # V100s have no native bf16
    gpus = row(doctor.run_checks(load(tmp_path, data)), "gpus spgpu")
    assert gpus.status == "error" and "no native bf16" in gpus.detail and "stage2" in gpus.detail
    assert "fp16" in gpus.fix


def test_gpu_partition_without_gpus_or_too_few(tmp_path, monkeypatch):
    fake_slurm(monkeypatch, sinfo="standard*|up|2|(null)\nspgpu|up|2|(null)\n")
    gpus = row(doctor.run_checks(load(tmp_path, slurm_pipeline(tmp_path))), "gpus spgpu")
    assert gpus.status == "error" and "spgpu has no GPUs" in gpus.detail

    fake_slurm(monkeypatch, sinfo="standard*|up|2|(null)\nspgpu|up|2|gpu:a40:4\n")
    data = slurm_pipeline(tmp_path)
    data["slurm"]["gpus"] = 8
    gpus = row(doctor.run_checks(load(tmp_path, data)), "gpus spgpu")
    assert gpus.status == "error" and "ask for 8 GPUs per node" in gpus.detail and "at most 4" in gpus.detail

    data = slurm_pipeline(tmp_path)
    data["stages"]["stage2"]["slurm"]["nodes"] = 3
    spgpu = row(doctor.run_checks(load(tmp_path, data)), "partition spgpu")
    assert spgpu.status == "error" and "stage2 ask for 3 nodes; spgpu has 2" in spgpu.detail


LLAVA_BENCH = {"llava-bench": {"kind": "llava-bench-coco", "questions": "q.jsonl", "answers": "a.jsonl",
                               "context": "c.jsonl", "rules": "rule.json", "images": "images"}}


@pytest.mark.parametrize("variant", ["seed-like", "no bench", "stage 1 only", "batch judge", "judge as a job"])
def test_planned_stages_are_what_submit_all_would_queue(tmp_path, variant):
    from llava_hpc.orchestrate import Orchestrator
    from llava_hpc.rundir import RunDir

    data = small_pipeline_dict(tmp_path / "run", executor="slurm")
    if variant == "no bench":
        data["benches"] = {}
    elif variant == "stage 1 only":
        del data["stages"]["stage2"]
        data["stages"]["generate"] = {"model": "stage1"}
    elif variant == "batch judge":
        data.update(benches=LLAVA_BENCH, judge={"transport": "batch"})
    elif variant == "judge as a job":
        data.update(benches=LLAVA_BENCH, judge={"where": "job", "base_url": "http://judge.cluster:8000/v1"})
    pipeline = parse_pipeline(data, tmp_path / "pipeline.toml", check_files=False)
    outcomes = Orchestrator(pipeline, RunDir(pipeline.run_dir), "slurm").submit("all", dry_run=True)
    queued = [o.stage for o in outcomes if o.action == "dry-run"]
    assert doctor.planned_stages(pipeline) == queued
    assert ("judge" in queued) == (variant == "judge as a job")


def test_parse_gres():
    parsed = doctor.parse_gres("gpu:a40:4(S:0-1),mps:400,gpu:2")
    assert [(g.name, g.type, g.count) for g in parsed] == [("gpu", "a40", 4), ("mps", None, 400), ("gpu", None, 2)]
    assert doctor.parse_gres("(null)") == []


# ---------------------------------------------------------------------------------------------- run directory
def test_run_dir_on_tmpfs_is_a_warning(tmp_path):
    shm = Path("/dev/shm")
    if doctor.filesystem_type(shm) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    pipeline = pipeline_of(tmp_path, executor="slurm", run_dir=str(shm / "llava-doctor-test-run"))
    fs = row(doctor.check_run_dir(pipeline), "filesystem")
    assert fs.status == "warning" and "tmpfs" in fs.detail and "--probe" in fs.fix


def test_run_dir_filesystem_kinds(tmp_path, monkeypatch):
    pipeline = pipeline_of(tmp_path, executor="slurm", run_dir="/tmp/somewhere/run")
    fs = row(doctor.check_run_dir(pipeline), "filesystem")
    assert fs.status == "warning" and "under /tmp" in fs.detail
    monkeypatch.setattr(doctor.storage, "filesystem_type", lambda path, run=None: "lustre")
    pipeline = pipeline_of(tmp_path, executor="slurm", run_dir=str(tmp_path / "scratch" / "run"))
    assert row(doctor.check_run_dir(pipeline), "filesystem").status == "ok"


def test_run_dir_with_an_unset_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAVA_DOCTOR_UNSET", raising=False)
    warnings: list[str] = []
    data = small_pipeline_dict("$LLAVA_DOCTOR_UNSET/run")
    pipeline = parse_pipeline(data, tmp_path / "pipeline.toml", check_files=False, warnings=warnings)
    results = doctor.run_checks(pipeline, pipeline_warnings=warnings)
    assert row(results, "run dir").status == "error" and "$LLAVA_DOCTOR_UNSET" in row(results, "run dir").detail
    assert "LLAVA_DOCTOR_UNSET" in row(results, "pipeline").detail


def fake_statvfs(free: int):
    return lambda path: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096)


def test_disk_space_too_small_for_the_features(tmp_path, monkeypatch):
    pipeline = pipeline_of(tmp_path)  # 64 + 48 synthetic images x (64 patches x 64 hidden fp16)
    per_image = doctor.feature_bytes_per_image(pipeline)
    assert per_image == int(64 * 64 * 2 * 0.92)
    needed = (64 + 48) * per_image
    monkeypatch.setattr(doctor.storage.os, "statvfs", fake_statvfs(needed // 2))
    space = doctor.check_disk_space(pipeline)
    assert space.status == "error" and "pretrain 64 + instruct 48 images" in space.detail
    assert "max_samples" in space.fix
    monkeypatch.setattr(doctor.storage.os, "statvfs", fake_statvfs(int(needed * 1.1)))
    assert doctor.check_disk_space(pipeline).status == "warning"
    monkeypatch.setattr(doctor.storage.os, "statvfs", fake_statvfs(needed * 10))
    assert doctor.check_disk_space(pipeline).status == "ok"


def test_feature_size_of_clip_large():
    """docs/performance.md: ~471 KiB per image at 224 px (256 x 1024 fp16), ~1059 KiB at 336 px (576 x 1024)."""
    for tower, kib in (("openai/clip-vit-large-patch14", 471), ("openai/clip-vit-large-patch14-336", 1059)):
        pipeline = parse_pipeline({"name": "x", "run_dir": "/tmp/x", "model": {"vision_tower": tower}},
                                  "/tmp/p.toml", check_files=False)
        assert round(doctor.feature_bytes_per_image(pipeline) / 1024) == pytest.approx(kib, abs=1)


# ---------------------------------------------------------------------------------------------- models
def test_models_offline(tmp_path, monkeypatch):
    assert row(doctor.check_models(pipeline_of(tmp_path)), "models").status == "ok"  # tiny: nothing to fetch
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = tmp_path / "my-llm"
    llm.mkdir()
    (llm / "config.json").write_text("{}")  # weights' config, but no tokenizer
    pipeline = pipeline_of(tmp_path, model={"vision_tower": "tiny", "llm": str(llm)})
    models = row(doctor.check_models(pipeline), "models")
    assert models.status == "error" and "no tokenizer files" in models.detail and str(llm) in models.detail
    (llm / "tokenizer.json").write_text("{}")
    assert row(doctor.check_models(pipeline), "models").status == "ok"

    pipeline = pipeline_of(tmp_path, model={"vision_tower": "tiny", "llm": "someone/not-downloaded-llm"})
    models = row(doctor.check_models(pipeline), "models")
    assert models.status == "error" and "'someone/not-downloaded-llm' is not in the local" in models.detail
    assert models.fix.startswith("hf download someone/not-downloaded-llm")


# ---------------------------------------------------------------------------------------------- data
def good_record(i: int, image: str | None = None) -> dict:
    return {"id": f"r{i}", "image": image or f"img{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}


def llava_json_pipeline(tmp_path: Path, records: list, name: str = "train.json"):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("image"), str):
            (images / record["image"]).write_bytes(b"png")
    path = tmp_path / name
    path.write_text(json.dumps(records))
    datasets = {"real": {"kind": "llava-json", "path": str(path), "images": str(images)}}
    return pipeline_of(tmp_path, datasets=datasets, stages={"stage2": {"dataset": "real", "zero_stage": 0}}), path


def test_missing_data_file_is_named(tmp_path):
    pipeline = pipeline_of(tmp_path, datasets={"real": {"kind": "llava-json", "path": str(tmp_path / "nope.json"),
                                                        "images": str(tmp_path)}},
                           stages={"stage2": {"dataset": "real"}})
    data = row(doctor.check_data(pipeline), "data real")
    assert data.status == "error" and f"{tmp_path / 'nope.json'} does not exist" in data.detail
    assert "datasets.real.path" in data.fix


def test_malformed_record_named_by_file_position_and_field(tmp_path):
    records = [good_record(i) for i in range(20)]
    records[7]["conversations"][1]["from"] = "bot"
    pipeline, path = llava_json_pipeline(tmp_path, records)
    data = row(doctor.check_data(pipeline), "data real")
    assert data.status == "warning"
    assert "20 records; 20 sampled: 1 bad" in data.detail
    assert f"{path}: record #7 (id 'r7'), field conversations[1].from: unknown role 'bot'" in data.detail


def test_missing_image_and_unparseable_file(tmp_path):
    records = [good_record(i) for i in range(4)]
    pipeline, path = llava_json_pipeline(tmp_path, records)
    (tmp_path / "images" / "img2.png").unlink()
    data = row(doctor.check_data(pipeline), "data real")
    assert data.status == "warning" and "record #2 (id 'r2'), field image:" in data.detail and "img2.png" in data.detail

    path.write_text('[{"id": 1,}')
    data = row(doctor.check_data(pipeline), "data real")
    assert data.status == "error" and str(path) in data.detail and "line 1 column" in data.detail


def test_mostly_bad_records_and_stage1_pairs(tmp_path):
    records = [{"id": i, "image": "x.png"} for i in range(10)]  # no conversations at all
    pipeline, path = llava_json_pipeline(tmp_path, records)
    data = row(doctor.check_data(pipeline), "data real")
    assert data.status == "error" and "10 bad" in data.detail and "field conversations" in data.detail

    chat = good_record(0)
    chat["conversations"] += [{"from": "human", "value": "And?"}, {"from": "gpt", "value": "Nothing."}]
    pipeline, _ = llava_json_pipeline(tmp_path, [chat, good_record(1)], name="pairs.json")

    def trained_by_stage1(template: str):
        stage1 = Stage1Stage(**pipeline.stages.stage2.model_dump(), template=template)
        return pipeline.model_copy(update={"stages": pipeline.stages.model_copy(
            update={"stage1": stage1, "stage2": None})})

    data = row(doctor.check_data(trained_by_stage1("plain")), "data real")
    assert "record #0 (id 'r0'), field conversations: the plain template takes one human/gpt pair" in data.detail
    # In a chat template, stage 1 takes multi-turn records as stage 2 does.
    assert row(doctor.check_data(trained_by_stage1("chat_template")), "data real").status == "ok"


# ---------------------------------------------------------------------------------------------- judge
def judged_pipeline(tmp_path: Path, **judge):
    images = tmp_path / "bench-images"
    images.mkdir(exist_ok=True)
    settings = {"api_key_env": KEY_ENV, "api_key_file": str(tmp_path / "no-key-file"), **judge}
    return pipeline_of(tmp_path, executor="slurm",
                       benches={"pics": {"kind": "folder", "images": str(images), "question": "What is shown?"}},
                       judge=settings)


def test_missing_judge_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    results = doctor.check_judge(judged_pipeline(tmp_path))
    key = row(results, "judge key")
    assert key.status == "error" and f"${KEY_ENV} is not set" in key.detail and f"export {KEY_ENV}=" in key.fix
    assert row(results, "judge endpoint").status == "skipped"  # not --online

    monkeypatch.setenv(KEY_ENV, KEY)
    results = doctor.check_judge(judged_pipeline(tmp_path))
    assert row(results, "judge key").status == "ok"
    assert KEY not in json.dumps(doctor.as_dicts(results))
    assert row(doctor.check_judge(pipeline_of(tmp_path)), "judge").status == "skipped"  # synthetic bench only


def test_online_sends_one_tiny_request(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with OpenAIStub() as stub:
        stub.script.expected_key = KEY
        results = doctor.check_judge(judged_pipeline(tmp_path, base_url=stub.url), online=True)
        endpoint = row(results, "judge endpoint")
        assert endpoint.status == "ok" and "answered in" in endpoint.detail and " ms" in endpoint.detail
        sent = stub.chat_log()
        assert len(sent) == 1 and sent[0]["body"]["max_tokens"] == 1

        stub.script.expected_key = "sk-another-key"  # the server refuses our key: 401
        endpoint = row(doctor.check_judge(judged_pipeline(tmp_path, base_url=stub.url), online=True), "judge endpoint")
        assert endpoint.status == "error" and "401" in endpoint.detail and "wrong or revoked" in endpoint.fix
        assert KEY not in endpoint.detail
        assert len(stub.chat_log()) == 2  # one request per check, no retries


# ---------------------------------------------------------------------------------------------- probe
def test_probe_script_names_account_partition_gpus_and_nodes(tmp_path):
    pipeline = load(tmp_path, slurm_pipeline(tmp_path))
    script = doctor.probe_script(pipeline, "stage2", tmp_path / "probe", python="/venv/bin/python")
    for line in ("#SBATCH --account=llava-lab", "#SBATCH --partition=spgpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=3",
                 "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1"):
        assert line in script
    assert "srun --nodes=2 --ntasks-per-node=1" in script and "/venv/bin/python -c" in script
    data = slurm_pipeline(tmp_path)
    data["stages"]["stage2"]["slurm"].update(partition="standard", gpus=0)
    assert "--gpus-per-node" not in doctor.probe_script(load(tmp_path, data), "stage2", tmp_path)


def marker(rank: int, **values) -> dict:
    base = {"rank": rank, "world": 2, "host": f"node{rank + 1}", "cuda_visible_devices": "0", "cuda": True,
            "gpu": "Tesla V100-SXM2-16GB", "capability": [7, 0], "bf16": False, "allreduce": 3.0, "expected": 3.0,
            "error": None}
    return {**base, **values}


def test_probe_results(tmp_path):
    data = slurm_pipeline(tmp_path)
    data["stages"]["stage2"]["precision"] = "bf16"
    pipeline = load(tmp_path, data)
    results = doctor.probe_results(pipeline, "stage2", "42", "COMPLETED", "", False, 12, [marker(0), marker(1)], [])
    assert row(results, "probe job").status == "ok" and "node1, node2" in row(results, "probe job").detail
    assert row(results, "compute nodes").status == "ok" and row(results, "all-reduce").status == "ok"
    bf16 = row(results, "bf16")
    assert bf16.status == "error" and "V100" in bf16.detail and "sm 7.0" in bf16.detail and "fp16" in bf16.fix

    a100 = dict(gpu="NVIDIA A100", capability=[8, 0], bf16=True)
    results = doctor.probe_results(pipeline, "stage2", "42", "COMPLETED", "", False, 12,
                                   [marker(0, **a100), marker(1, **a100)], [])
    assert row(results, "bf16").status == "ok"

    results = doctor.probe_results(pipeline, "stage2", "42", "FAILED", "", False, 12,
                                   [marker(0, allreduce=None, error="RuntimeError: connect timed out")],
                                   ["srun: error: node2: task 1: Exited with exit code 1"])
    assert row(results, "probe job").status == "error" and "node2: task 1" in row(results, "probe job").detail
    assert row(results, "compute nodes").status == "error" and "1 of 2 node(s)" in row(results, "compute nodes").detail
    assert row(results, "all-reduce").status == "error" and "connect timed out" in row(results, "all-reduce").detail

    results = doctor.probe_results(pipeline, "stage2", "42", "PENDING", "Resources", True, 180, [], [])
    assert row(results, "probe job").status == "warning" and "Resources" in row(results, "probe job").detail


def test_probe_refused_or_left_pending(tmp_path, monkeypatch):
    """The probe's own flow on fake Slurm commands: sbatch refusing it, and a job that never starts (cancelled)."""
    monkeypatch.setenv("LLAVA_DOCTOR_TEST_TOKEN", "hidden")
    calls = []

    def refusing(argv, timeout=doctor.COMMAND_TIMEOUT_S, env=None):
        calls.append((argv, env))
        return CommandResult(1, "", "sbatch: error: Batch job submission failed: Invalid account or account/partition "
                                    "combination specified\n")

    pipeline = load(tmp_path, slurm_pipeline(tmp_path))
    probe = row(doctor.run_probe(pipeline, run=refusing), "probe job")
    assert probe.status == "error" and "Invalid account" in probe.detail and "probe.sbatch" in probe.fix
    (argv, env), = calls
    assert argv[:2] == ["sbatch", "--parsable"] and "LLAVA_DOCTOR_TEST_TOKEN" not in env  # no secrets to Slurm

    calls.clear()

    def pending(argv, timeout=doctor.COMMAND_TIMEOUT_S, env=None):
        calls.append(argv)
        outputs = {"sbatch": "4242\n", "squeue": "PENDING|Resources\n", "scancel": "", "sacct": "PENDING|0:0\n"}
        return CommandResult(0, outputs[argv[0]])

    results = doctor.run_probe(pipeline, timeout_s=0.2, poll_s=0.05, run=pending)
    assert row(results, "probe job").status == "warning" and "(Resources); cancelled" in row(results, "probe job").detail
    assert ["scancel", "4242"] in calls


def test_probe_task_alone(tmp_path):
    """One task, as srun starts it: no CUDA here (a warning, not a crash), the marker, a one-rank gloo all-reduce."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "CUDA_VISIBLE_DEVICES": ""}
    code = "import sys; from llava_hpc.doctor import probe_task; sys.exit(probe_task(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "node-0.json").read_text())
    assert result["cuda"] is False and result["allreduce"] == 1.0 and result["error"] is None
    pipeline = pipeline_of(tmp_path)
    bf16 = row(doctor.probe_results(pipeline, "stage2", "1", "COMPLETED", "", False, 1, [result], []), "bf16")
    assert bf16.status == "warning" and "no CUDA on the node" in bf16.detail


# ---------------------------------------------------------------------------------------------- the command
def test_cli_table_json_and_exit_code(tmp_path):
    path = write_pipeline(tmp_path / "pipeline.toml", small_pipeline_dict(tmp_path / "run"))  # debug executor
    ok = invoke("doctor", "-p", str(path))
    assert ok.exit_code == 0, ok.output
    for text in ("check", "status", "detail", "fix", "models", "data pretrain", "skipped"):
        assert text in ok.output

    data = small_pipeline_dict(tmp_path / "run")
    data["datasets"]["real"] = {"kind": "llava-json", "path": str(tmp_path / "missing.json"), "images": str(tmp_path)}
    data["stages"]["stage2"]["dataset"] = "real"
    path = write_pipeline(tmp_path / "pipeline.toml", data)
    bad = invoke("doctor", "-p", str(path), "--json")
    assert bad.exit_code == 1
    results = json.loads(bad.stdout)
    errors = [r for r in results if r["status"] == "error"]
    assert [r["name"] for r in errors] == ["data real"] and "missing.json does not exist" in errors[0]["detail"]
    assert {"name", "status", "detail", "fix"} == set(results[0])


# ---------------------------------------------------------------------------------------------- the local cluster
@pytest.fixture
def local_cluster():
    from test_local_cluster import require_local_slurm

    require_local_slurm()


@pytest.mark.slurm
def test_doctor_passes_on_the_local_cluster(tmp_path, local_cluster):
    path = write_pipeline(tmp_path / "pipeline.toml", slurm_pipeline(tmp_path))
    result = invoke("doctor", "-p", str(path), "--json")
    assert result.exit_code == 0, result.output
    results = {(r["name"], r["detail"]): r["status"] for r in json.loads(result.stdout)}
    by_name = {}
    for (name, detail), status in results.items():
        by_name.setdefault(name, []).append((status, detail))
    assert by_name["slurm"][0][0] == "ok"
    assert by_name["account"] == [("ok", by_name["account"][0][1])] and SLURM_ACCOUNT in by_name["account"][0][1]
    for name in ("partition spgpu", "partition standard", "gpus spgpu", "models", "data pretrain", "disk space"):
        assert by_name[name][0][0] == "ok", (name, by_name[name])


@pytest.mark.slurm
def test_doctor_names_a_wrong_account_partition_and_gpu_kind(tmp_path, local_cluster):
    data = slurm_pipeline(tmp_path, cluster={"gpu_types": {"spgpu": "a40"}})
    data["slurm"]["account"] = "no-such-lab"
    data["stages"]["stage1"]["slurm"] = {"partition": "gpu-large"}
    path = write_pipeline(tmp_path / "pipeline.toml", data)
    result = invoke("doctor", "-p", str(path), "--json")
    assert result.exit_code == 1
    errors = {r["name"]: r["detail"] for r in json.loads(result.stdout) if r["status"] == "error"}
    assert "'no-such-lab' is not one of yours" in errors["account"] and SLURM_ACCOUNT in errors["account"]
    assert "'gpu-large' (stage1) does not exist" in errors["partition gpu-large"]
    assert "spgpu reports gpu:2 (no type), but cluster.gpu_types says 'a40'" in errors["gpus spgpu"]


@pytest.mark.slurm
def test_probe_runs_on_two_nodes(tmp_path, local_cluster):
    data = slurm_pipeline(tmp_path)
    data["python"] = sys.executable
    path = write_pipeline(tmp_path / "pipeline.toml", data)
    result = invoke("doctor", "-p", str(path), "--probe", "--json")
    results = json.loads(result.stdout)
    named = {r["name"]: r for r in results}
    assert result.exit_code == 0, json.dumps(results, indent=1)
    assert named["probe job"]["status"] == "ok" and "node1, node2" in named["probe job"]["detail"]
    assert named["compute nodes"]["status"] == "ok" and "node1, node2 wrote into" in named["compute nodes"]["detail"]
    assert named["all-reduce"]["status"] == "ok" and "over 2 node(s)" in named["all-reduce"]["detail"]
    assert named["all-reduce"]["detail"].endswith(": 3.0")
    assert named["bf16"]["status"] == "warning" and "no CUDA on the node" in named["bf16"]["detail"]
    # the run directory is under /tmp (a guess says node-local), but the nodes wrote into it
    assert named["filesystem"]["status"] == "ok" and "the probe's compute nodes wrote into it" in \
        named["filesystem"]["detail"]
    assert not (tmp_path / "run" / "doctor").exists()  # a passing probe leaves nothing behind
