from pathlib import Path

import pytest
from conftest import REPO, small_pipeline_dict, write_pipeline

from llava_hpc.config import (
    PipelineError,
    find_pipeline,
    load_pipeline,
    parse_time_minutes,
    with_resource_overrides,
)


def test_demo_pipeline_loads_with_paths_resolved_against_its_folder():
    pipeline = load_pipeline(REPO / "pipelines" / "demo.toml")
    assert pipeline.executor == "local"
    assert pipeline.run_dir == (REPO / "runs" / "demo").resolve()
    assert pipeline.feature_datasets() == ["pretrain", "instruct"]


def test_smollm2_demo_trains_the_projector_in_a_chat_turn_on_the_questions():
    pipeline = load_pipeline(REPO / "pipelines" / "demo-smollm2.toml")
    assert pipeline.model.llm == "smollm2" and pipeline.model.standardize_features
    stage1 = pipeline.stages.stage1
    assert (stage1.dataset, stage1.template) == ("instruct", "chat_template")
    assert pipeline.feature_datasets() == ["instruct"]  # no captions: nothing else is computed


def _fake_llava_data(root: Path) -> None:
    for rel in (
        "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
        "LLaVA-Instruct-150K/llava_instruct_150k.json",
        "llava-bench/qa90_questions.jsonl",
        "llava-bench/qa90_gpt4_answer.jsonl",
        "llava-bench/caps_boxes_coco2014_val_80.jsonl",
        "llava-bench/rule.json",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("[]")
    for folder in ("LLaVA-Pretrain/images", "coco/train2017", "coco/val2014"):
        (root / folder).mkdir(parents=True, exist_ok=True)


def test_seed_recipe_matches_the_study(tmp_path, monkeypatch):
    _fake_llava_data(tmp_path)
    monkeypatch.setenv("LLAVA_DATA", str(tmp_path))
    monkeypatch.setenv("LLAVA_RUNS", str(tmp_path / "runs"))
    pipeline = load_pipeline(REPO / "pipelines" / "llava-llama3.2-1b.toml")
    s1, s2 = pipeline.stages.stage1, pipeline.stages.stage2
    assert (s1.batch_size, s1.grad_accum, s1.lr, s1.warmup_ratio) == (16, 8, 2e-3, 0.03)
    assert pipeline.datasets[s1.dataset].max_samples == 175_000
    assert (s2.batch_size, s2.grad_accum) == (4, 8)
    assert pipeline.datasets[s2.dataset].max_samples == 150_000
    assert pipeline.model.vision_tower == "openai/clip-vit-large-patch14"
    assert pipeline.model.llm == "meta-llama/Llama-3.2-1B-Instruct"
    assert pipeline.resources("stage1").partition == "spgpu"
    assert pipeline.resources("stage1").gpus == 1


def test_recipe_names_an_unset_environment_variable(monkeypatch):
    monkeypatch.delenv("LLAVA_DATA", raising=False)
    monkeypatch.setenv("LLAVA_RUNS", "/tmp")
    with pytest.raises(PipelineError, match="LLAVA_DATA is not set"):
        load_pipeline(REPO / "pipelines" / "llava-llama3.2-1b.toml")


def test_unknown_key_names_file_key_and_the_keys_that_exist(tmp_path):
    data = small_pipeline_dict(tmp_path / "run")
    data["stages"]["stage1"]["learning_rate"] = 1e-3
    path = write_pipeline(tmp_path / "bad.toml", data)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert str(path) in message
    assert "stages.stage1.learning_rate: unknown key" in message
    assert "lr" in message and "grad_accum" in message  # what was expected


@pytest.mark.parametrize("table, key, hint", [("tiny_vision", "layer", "did you mean 'layers'?"),
                                              ("tiny_llm", "intermediate", "did you mean 'intermediate_size'?"),
                                              ("tiny_llm", "vocabulary", "expected one of: heads, hidden_size")])
def test_unknown_key_in_a_tiny_model_table_is_named_with_its_line(tmp_path, table, key, hint):
    """[model.tiny_vision] and [model.tiny_llm] are the model's own dataclasses (model/specs.py), validated as
    strictly as any other table; the tiny tokenizer's vocabulary comes from the data, never from the file."""
    data = small_pipeline_dict(tmp_path / "run")
    data["model"][table] = {key: 3}
    path = write_pipeline(tmp_path / "bad.toml", data)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert f"model.{table}.{key}: unknown key; {hint}" in message
    assert f"line {path.read_text().splitlines().index(f'{key} = 3') + 1}:" in message


def test_tiny_model_tables_are_the_model_specs_with_the_demo_defaults(small_pipeline):
    from llava_hpc.model.specs import TinyLLMSpec, TinyVisionSpec

    model = load_pipeline(small_pipeline).model
    assert model.tiny_vision == TinyVisionSpec() and model.tiny_llm == TinyLLMSpec()
    assert model.tiny_llm.intermediate_size == 256  # what every pipeline has trained with (the demo's results)


def test_wrong_type_names_key_and_value(tmp_path):
    data = small_pipeline_dict(tmp_path / "run")
    data["stages"]["features"]["batch_size"] = "big"
    with pytest.raises(PipelineError, match=r"stages\.features\.batch_size: .*integer.*'big'"):
        load_pipeline(write_pipeline(tmp_path / "p.toml", data))


def test_missing_dataset_file_is_named(tmp_path):
    data = small_pipeline_dict(tmp_path / "run")
    data["datasets"]["real"] = {"kind": "llava-json", "path": "nowhere.json", "images": "."}
    with pytest.raises(PipelineError, match=r"datasets\.real\.path: no such file or folder: .*nowhere\.json"):
        load_pipeline(write_pipeline(tmp_path / "p.toml", data))


def test_malformed_toml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nrun_dir = \n')
    with pytest.raises(PipelineError, match=r"broken\.toml: not valid TOML: .*line 2"):
        load_pipeline(path)


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(PipelineError, match="pipeline file not found"):
        load_pipeline(tmp_path / "absent.toml")


def test_dataset_reference_must_exist(tmp_path):
    data = small_pipeline_dict(tmp_path / "run")
    data["stages"]["stage1"]["dataset"] = "cc3m"
    with pytest.raises(PipelineError, match="stages.stage1.dataset = 'cc3m' is not a dataset"):
        load_pipeline(write_pipeline(tmp_path / "p.toml", data))


@pytest.mark.parametrize("value", ["x; rm -rf ~", "a\nsrun evil", "$(whoami)", "debug gpu"])
def test_partition_cannot_inject_shell(tmp_path, value):
    data = small_pipeline_dict(tmp_path / "run", slurm={"partition": value})
    with pytest.raises(PipelineError, match="slurm.partition"):
        load_pipeline(write_pipeline(tmp_path / "p.toml", data))


def test_api_key_in_pipeline_is_refused(tmp_path):
    data = small_pipeline_dict(tmp_path / "run", judge={"api_key": "sk-secret"})
    with pytest.raises(PipelineError, match="do not put an API key in the pipeline file"):
        load_pipeline(write_pipeline(tmp_path / "p.toml", data))


@pytest.mark.parametrize(
    "text, minutes",
    [(90, 90), ("90", 90), ("4:00:00", 240), ("1-12:00:00", 2160), ("0:30", 1), ("2-0", 2880), ("00:10:30", 11)],
)
def test_slurm_time_formats(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["soon", "-5", "1:2:3:4", 0])
def test_bad_times_are_refused(text):
    with pytest.raises(ValueError):
        parse_time_minutes(text)


def test_stage_resources_inherit_and_override(tmp_path):
    data = small_pipeline_dict(tmp_path / "run", slurm={"partition": "debug", "account": "lab", "time": "1:00:00"})
    data["stages"]["stage1"]["slurm"] = {"partition": "spgpu", "gpus": 1, "setup": ["module load cuda/12.1"]}
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", data))
    stage1 = pipeline.resources("stage1")
    assert (stage1.partition, stage1.account, stage1.gpus, stage1.time) == ("spgpu", "lab", 1, 60)
    assert stage1.setup == ["module load cuda/12.1"]
    assert pipeline.resources("features").partition == "debug"


def test_cli_overrides_apply_only_to_the_given_stages(small_pipeline):
    pipeline = load_pipeline(small_pipeline)
    changed = with_resource_overrides(pipeline, ["stage1"], partition="spgpu", time="2:00:00", gpus=2)
    assert changed.resources("stage1").partition == "spgpu"
    assert changed.resources("stage1").time == 120
    assert changed.resources("stage1").gpus == 2
    assert changed.resources("features").partition == "standard"
    with pytest.raises(PipelineError, match="command-line option"):
        with_resource_overrides(pipeline, ["stage1"], partition="a b")


def test_resolved_pipeline_round_trips_through_toml(small_pipeline, tmp_path):
    pipeline = load_pipeline(small_pipeline)
    copy = tmp_path / "copy" / "pipeline.toml"
    copy.parent.mkdir()
    copy.write_text(pipeline.to_toml())
    assert load_pipeline(copy) == pipeline


def test_find_pipeline_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLAVA_HPC_PIPELINE", raising=False)
    with pytest.raises(PipelineError, match="no pipeline given"):
        find_pipeline(None)
    (tmp_path / "pipeline.toml").write_text("")
    assert find_pipeline(None) == Path("pipeline.toml")
    monkeypatch.setenv("LLAVA_HPC_PIPELINE", "/x/env.toml")
    assert find_pipeline(None) == Path("/x/env.toml")
    assert find_pipeline("given.toml") == Path("given.toml")


def test_cluster_profile_is_merged_under_the_pipeline(tmp_path):
    data = small_pipeline_dict(tmp_path / "run", slurm={"cpus": 3})
    data["profile"] = str(REPO / "slurm" / "profiles" / "greatlakes.toml")
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.toml", data))
    assert pipeline.resources("stage1").partition == "standard"  # the pipeline's own [slurm] wins
    assert pipeline.resources("stage1").cpus == 3
    assert pipeline.resources("stage1").setup == ["module load python/3.11.5 cuda/12.1.1"]  # from the profile
    assert pipeline.resources("judge").partition == "standard" and pipeline.resources("judge").gpus == 0
    assert pipeline.cluster.internet_partitions == []  # a profile also says what the site's nodes reach


def test_profile_may_hold_only_resources(tmp_path):
    (tmp_path / "bad-profile.toml").write_text('[model]\nllm = "x"\n')
    data = small_pipeline_dict(tmp_path / "run")
    data["profile"] = "bad-profile.toml"
    with pytest.raises(PipelineError, match="a profile may only set"):
        load_pipeline(write_pipeline(tmp_path / "p.toml", data))
