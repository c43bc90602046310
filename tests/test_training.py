"""The training loop in-process: schedule, data order, resume after a kill equals an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import small_pipeline_dict, write_pipeline
from safetensors.torch import load_file

from llava_hpc.config import load_pipeline
from llava_hpc.orchestrate import Orchestrator
from llava_hpc.rundir import RunDir, read_jsonl
from llava_hpc.train.loop import TrainSettings, lr_factor, rotate_checkpoints, total_steps
from llava_hpc.train.tracking import read_scalars


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.001
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_total_steps():
    settings = TrainSettings(8, 2, 1e-3, 0.03, 0, 1, 1.0, None, 0, "fp32", False, 10, 2, 0)
    assert total_steps(100, settings, world_size=2) == 3  # floor(100 / 32)
    assert total_steps(10, settings, world_size=1) == 1  # never zero


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        directory = tmp_path / f"step-{step:08d}"
        directory.mkdir()
        if step != 4:
            (directory / "_COMPLETE").write_text("{}")
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003", "step-00000004"]


def train_pipeline(tmp_path, name, **stage2):
    data = small_pipeline_dict(
        tmp_path / name,
        stages={
            "features": {"batch_size": 32, "shard_size": 32, "array_tasks": 1},
            # Stage 1 reads its 2 shards one at a time (shard-local order); stage 2 its 2 shards mixed.
            "stage1": {"dataset": "pretrain", "batch_size": 16, "zero_stage": 0, "lr": 3e-3, "save_every_steps": 2,
                       "epochs": 2, "shuffle_window_shards": 1},
            "stage2": {"dataset": "instruct", "batch_size": 8, "grad_accum": 2, "zero_stage": 0, "lr": 3e-3,
                       "save_every_steps": 2, "epochs": 2, **stage2},
        },
    )
    return write_pipeline(tmp_path / f"{name}.toml", data)


def _run_cli(path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "llava_hpc.cli", *args, "-p", str(path), "--executor", "local"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    """Stage 1 and stage 2 in subprocesses; the interrupted run is killed (os._exit) after step 3 of each
    stage, between checkpoints (saved every 2 steps), then resubmitted: the final weights match bit for bit."""
    clean, broken = train_pipeline(tmp_path, "clean"), train_pipeline(tmp_path, "broken")
    for stage in ("features", "stage1", "stage2"):
        result = _run_cli(clean, "submit", stage)
        assert result.returncode == 0, result.stdout + result.stderr

    assert _run_cli(broken, "submit", "features").returncode == 0
    killed = _run_cli(broken, "submit", "stage1", env={"LLAVA_HPC_FAULT_EXIT_AFTER_STEP": "3"})
    assert killed.returncode != 0
    assert not (tmp_path / "broken" / "stage1" / "_SUCCESS").exists()
    assert (tmp_path / "broken" / "stage1" / "checkpoints" / "step-00000002" / "_COMPLETE").exists()
    _run_cli(broken, "submit", "stage1")  # resumes from step 2
    assert (tmp_path / "broken" / "stage1" / "_SUCCESS").exists()
    assert json.loads((tmp_path / "broken" / "stage1" / "summary.json").read_text())["resumed_from_step"] == 2
    clean_stage1 = json.loads((tmp_path / "clean" / "stage1" / "summary.json").read_text())
    assert clean_stage1["feature_shards"] == {"shards": 2, "window": 1, "decodes": 2}  # shard-local order, cached
    killed = _run_cli(broken, "submit", "stage2", env={"LLAVA_HPC_FAULT_EXIT_AFTER_STEP": "3"})
    assert killed.returncode != 0
    assert not (tmp_path / "broken" / "stage2" / "_SUCCESS").exists()
    _run_cli(broken, "submit", "stage2")
    assert json.loads((tmp_path / "broken" / "stage2" / "summary.json").read_text())["resumed_from_step"] == 2

    a = load_file(tmp_path / "clean" / "stage1" / "projector.safetensors")
    b = load_file(tmp_path / "broken" / "stage1" / "projector.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(tmp_path / "clean" / "stage2" / "model" / "model.safetensors")
    b = load_file(tmp_path / "broken" / "stage2" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics rows (the first step, every checkpoint, the last; log_every_steps is 10): the steps redone after the
    # kill replaced, not duplicated
    steps = [row["step"] for row in read_jsonl(tmp_path / "broken" / "stage2" / "metrics.jsonl")]
    total = json.loads((tmp_path / "broken" / "stage2" / "summary.json").read_text())["steps"]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == total
    assert set(range(2, total + 1, 2)) <= set(steps)
    # TensorBoard shows the same rows: the killed attempt's steps past its checkpoint purged, not shown twice
    rows = read_jsonl(tmp_path / "broken" / "stage2" / "metrics.jsonl")
    shown = read_scalars(tmp_path / "broken" / "stage2")["loss"]
    assert [step for step, _ in shown] == steps
    assert [value for _, value in shown] == pytest.approx([row["loss"] for row in rows], rel=1e-6)


def test_stage2_needs_stage1(tmp_path):
    path = train_pipeline(tmp_path, "run")
    pipeline = load_pipeline(path)
    outcomes = Orchestrator(pipeline, RunDir(pipeline.run_dir)).submit("stage2")
    assert outcomes[0].action == "failed" and "needs features, stage1" in outcomes[0].message


def test_resume_with_another_world_size_says_what_to_do(tmp_path):
    from llava_hpc.train.loop import ResumeError, _resume

    directory = tmp_path / "checkpoints" / "step-00000004"
    directory.mkdir(parents=True)
    (directory / "_COMPLETE").write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 3}))

    class Env:
        world_size, rank = 4, 0

    settings = TrainSettings(8, 2, 1e-3, 0.03, 0, 1, 1.0, None, 0, "fp32", False, 10, 2, 3)
    with pytest.raises(ResumeError, match="written by 2 process.*this job has 4.*--force"):
        _resume(None, tmp_path / "checkpoints", Env, settings)


def test_generate_waits_on_the_stage_whose_model_it_uses(tmp_path):
    from llava_hpc.stages import StageContext, needs, upstream

    path = train_pipeline(tmp_path, "run")
    ctx = StageContext(load_pipeline(path), RunDir(tmp_path / "run"))
    assert needs("generate", ctx) == ("stage2",)
    assert upstream("report", ["features", "stage1", "stage2"], ctx) == ["stage2"]
    ctx.pipeline.stages.generate.model = "stage1"
    assert needs("generate", ctx) == ("stage1",)
    assert upstream("report", ["features", "stage1", "stage2"], ctx) == ["stage1"]


def test_bf16_is_refused_on_gpus_without_it_never_emulated(monkeypatch):
    """A V100 (compute capability 7.0) would emulate bf16, slowly and silently: refused with what to set instead;
    'auto' takes fp16 (with loss scaling) there and bf16 from Ampere on."""
    from llava_hpc.train.loop import resolve_precision

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(ValueError, match=r"Tesla V100-SXM2-16GB \(compute capability 7.0\) has no native bf16.*'fp16'"):
        resolve_precision("bf16", gpu)
    assert resolve_precision("auto", gpu) == "fp16" and resolve_precision("fp16", gpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # A40
    assert resolve_precision("bf16", gpu) == "bf16" and resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_is_refused_on_cpus_that_would_emulate_it(monkeypatch):
    """An AVX2-only CPU emulates bf16 autocast: a frozen SmolLM2 step took 65 s against 1.7 s in fp32 (measured)."""
    from llava_hpc.train.loop import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    with pytest.raises(ValueError, match=r"this CPU \(AVX2\) has neither AVX-512 BF16 nor AMX.*'fp32'"):
        resolve_precision("bf16", cpu)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # a Sapphire Rapids Xeon
    assert resolve_precision("bf16", cpu) == "bf16"


def test_loss_plot_continues_stage1_into_stage2_and_marks_a_resume(tmp_path):
    from llava_hpc.train.loop import plot_loss

    stage1, stage2 = tmp_path / "stage1.jsonl", tmp_path / "stage2.jsonl"
    stage1.write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, "resumed_from": 0}) + "\n" for s in range(1, 11)))
    rows = [{"step": s, "loss": 1.0 / s, "resumed_from": 0 if s <= 4 else 4} for s in range(1, 9)]
    stage2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "loss.png"
    plot_loss([("stage1", stage1), ("stage2", stage2)], target, "test")
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 5000
    plot_loss([("stage1", tmp_path / "missing.jsonl")], tmp_path / "none.png", "nothing yet")
    assert not (tmp_path / "none.png").exists()  # no rows, no picture


def test_progress_rate_and_eta_come_from_the_current_attempt(tmp_path):
    """A requeue's downtime is not in the rate: rows name the checkpoint their attempt resumed from."""
    from types import SimpleNamespace

    from llava_hpc.stages.training import progress

    run = RunDir(tmp_path)
    metrics = run.stage_dir("stage2") / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    rows = [{"step": s, "total_steps": 100, "resumed_from": 0, "loss": 2.0, "time": 1000.0 + s} for s in (10, 20)]
    rows += [{"step": s, "total_steps": 100, "resumed_from": 20, "loss": 1.5, "time": 5000.0 + 2 * s} for s in (30, 40)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = progress(SimpleNamespace(run=run), "stage2")
    assert text == "step 40/100, 0.50 steps/s, ETA 0:02:00, loss 1.500", text


def test_the_stage_table_holds_every_training_setting():
    """The loop's TrainSettings are built from the [stages.stageN] table's fields of the same names."""
    import dataclasses

    from llava_hpc.config import TrainStage

    assert {f.name for f in dataclasses.fields(TrainSettings)} <= set(TrainStage.model_fields)


def test_projector_lr_puts_the_projector_in_a_group_of_its_own(tmp_path):
    """The reference's mm_projector_lr: the projector at its own peak lr, the LLM at `lr`, one schedule for both."""
    import dataclasses

    from llava_hpc.model.builders import build_llava
    from llava_hpc.model.specs import LlavaSpec
    from llava_hpc.train.loop import ResumeError, TorchEngine, param_groups

    model, _ = build_llava(LlavaSpec(), device="cpu", with_vision_tower=False)
    model.freeze_language_model(False)
    settings = TrainSettings(8, 1, 1e-4, 0.0, 0, 1, 1.0, None, 0, "fp32", False, 10, 2, 0)
    (everything,) = param_groups(model, settings)
    assert everything["lr"] == 1e-4
    assert len(everything["params"]) == sum(p.requires_grad for p in model.parameters())

    with_projector_lr = dataclasses.replace(settings, projector_lr=3e-3)
    llm, projector = param_groups(model, with_projector_lr)
    assert projector["lr"] == 3e-3 and llm["lr"] == 1e-4
    projector_ids = {id(p) for p in model.multi_modal_projector.parameters()}
    assert {id(p) for p in projector["params"]} == projector_ids
    assert not projector_ids & {id(p) for p in llm["params"]}

    engine = TorchEngine(model, with_projector_lr, total=10, warmup=0, precision="fp32", device=torch.device("cpu"))
    engine.optimizer.step()  # no gradients yet: a no-op, in the order the scheduler wants
    engine.scheduler.step()  # the cosine schedule scales both peaks by the same factor
    low, high = engine.scheduler.get_last_lr()
    assert high / low == pytest.approx(30.0)

    engine.save(tmp_path, {})  # resuming without projector_lr: one group against two, said plainly
    plain = TorchEngine(model, settings, total=10, warmup=0, precision="fp32", device=torch.device("cpu"))
    with pytest.raises(ResumeError, match=r"2 optimizer group\(s\), this run has 1: projector_lr was set or unset"):
        plain.load(tmp_path)

    model.freeze_language_model(True)  # stage 1: only the projector trains; one group at projector_lr
    (only,) = param_groups(model, with_projector_lr)
    assert only["lr"] == 3e-3 and {id(p) for p in only["params"]} == projector_ids


def test_standardised_features_are_measured_by_stage1_and_folded_into_the_export(tmp_path):
    from llava_hpc.data.features_io import feature_statistics
    from llava_hpc.model.export import load_exported
    from llava_hpc.model.llava import load_projector

    data = small_pipeline_dict(tmp_path / "run", model={"standardize_features": True})
    data["stages"]["stage1"]["max_steps"] = 3
    data["stages"]["stage2"]["max_steps"] = 2
    pipeline = load_pipeline(write_pipeline(tmp_path / "pipeline.toml", data))
    orchestrator = Orchestrator(pipeline, RunDir(pipeline.run_dir))
    for stage in ("features", "stage1", "stage2"):
        assert orchestrator.submit(stage)[0].action != "failed"
    run = tmp_path / "run"
    stage1 = load_projector(run / "stage1" / "projector.safetensors")
    mean, std, _ = feature_statistics(run / "features" / "pretrain")
    assert stage1.standardize_features
    assert torch.equal(stage1.feature_mean, torch.from_numpy(mean))
    assert torch.equal(stage1.feature_std, torch.from_numpy(std))
    assert float(std.min()) < 0.9 * float(std.max())  # the tiny tower's dimensions do differ in scale
    # transformers' projector has no such step: the export folds it into linear_1
    exported, _, _, _ = load_exported(run / "stage2" / "model")
    assert not exported.multi_modal_projector.standardize_features

    # A pipeline changed after stage 1 says which file and field disagree, instead of a state-dict mismatch.
    data["model"]["standardize_features"] = False
    changed = load_pipeline(write_pipeline(tmp_path / "pipeline.toml", data))
    from llava_hpc.stages import StageContext, Task, stage2

    task = Task("stage2", 0, "instruct")
    with pytest.raises(ValueError, match=r"projector\.safetensors: trained with model\.standardize_features = true"):
        stage2.run(StageContext(changed, RunDir(changed.run_dir)), task)


def test_stage1_in_the_chat_template_trains_on_the_records_prompt(tmp_path):
    """LLaVA v1's stage 1: the caption answers the record's prompt inside a chat turn (not `plain`'s image + caption);
    the encoded cache holds that prompt, the loss only the caption, and the pipeline still ends with a stage-2 model."""
    from llava_hpc.data.encoded import EncodeSettings
    from llava_hpc.data.features_io import FeatureStore
    from llava_hpc.data.templates import IGNORE_INDEX, ConversationTemplate
    from llava_hpc.model.builders import build_llava
    from llava_hpc.stages import StageContext
    from llava_hpc.stages.common import llava_spec
    from llava_hpc.stages.training import encoded_cache
    from llava_hpc.synthetic import PRETRAIN_PROMPTS, SyntheticWorld

    data = small_pipeline_dict(tmp_path / "run")
    data["stages"]["stage1"].update(max_steps=2, template="chat_template")
    data["stages"]["stage2"]["max_steps"] = 1
    pipeline = load_pipeline(write_pipeline(tmp_path / "pipeline.toml", data))
    run = RunDir(pipeline.run_dir)
    orchestrator = Orchestrator(pipeline, run)
    for stage in ("features", "stage1", "stage2"):
        assert orchestrator.submit(stage)[0].action != "failed"
    assert (tmp_path / "run" / "stage2" / "model" / "config.json").exists()

    _, tokenizer = build_llava(llava_spec(pipeline), with_vision_tower=False)
    template = ConversationTemplate("chat_template", tokenizer)
    store = FeatureStore(run.stage_dir("features") / "pretrain")
    settings = EncodeSettings(store.num_patches, pipeline.model.max_length, "truncate")
    cache = encoded_cache(StageContext(pipeline, run), "stage1", template, settings)
    assert cache.is_complete()  # the stage's cache is keyed by this template, so stage 1 used it
    samples = cache.open()
    record = SyntheticWorld.from_config(pipeline.synthetic).pretrain_records()[0]
    assert samples.id(0) == record["id"]
    input_ids, labels = samples.tokens(0)
    prompt = record["conversations"][0]["value"].replace("<image>", "").strip()
    assert prompt in PRETRAIN_PROMPTS
    text = tokenizer.decode(input_ids.tolist())
    assert prompt.lower().rstrip(".?") in text.lower()  # the tiny tokenizer lowercases
    answer = tokenizer.decode([int(t) for t in labels if t != IGNORE_INDEX])
    assert record["conversations"][1]["value"].lower().rstrip(".") in answer and "describe" not in answer
