"""The embedded default end to end, as the README's first command runs it: the tiny LLaVA learns the
synthetic world (held-out exact match from chance to >= 90 %), and a shuffled-image control does not."""

import json
import tomllib

import pytest
import tomli_w
import torch
from conftest import REPO, invoke

pytestmark = pytest.mark.slow


def run_demo(tmp_path, **synthetic) -> dict:
    data = tomllib.loads((REPO / "pipelines" / "demo.toml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["synthetic"].update(synthetic)
    pipeline = tmp_path / "demo.toml"
    pipeline.write_text(tomli_w.dumps(data))
    result = invoke("run", "-p", str(pipeline))
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "report" / "synthetic" / "summary.json").read_text())


def test_demo_learns_the_synthetic_world(tmp_path):
    summary = run_demo(tmp_path)
    assert summary["n"] == 200 and summary["chance"] == pytest.approx(1 / 3)
    assert summary["exact_match"] >= 0.9, summary
    for category in ("colour", "position"):
        assert summary["by_category"][category]["exact_match"] >= 0.85, summary
    for stage in ("features", "stage1", "stage2", "generate", "report"):
        assert (tmp_path / "run" / stage).exists()
    assert (tmp_path / "run" / "stage2" / "loss.png").stat().st_size > 1000


def test_shuffled_images_control_stays_near_chance(tmp_path):
    """Same training, but every conversation paired with another sample's image: what the model then knows
    about the held-out images can only come from the images, so it must stay near chance."""
    summary = run_demo(tmp_path, shuffle_images=True)
    by_category = summary["by_category"]
    assert by_category["colour"]["exact_match"] <= 0.35, summary  # chance 1/6
    assert by_category["position"]["exact_match"] <= 0.65, summary  # chance 1/2


def test_smollm2_demo_small_runs_end_to_end_and_the_frozen_llm_learns_to_answer(tmp_path):
    """`pipelines/demo-smollm2.toml` at a small setting (the full figure is in docs/demo.md): the real SmolLM2 weights,
    tokenizer and chat template; stage 1 trains the projector alone, and that alone turns SmolLM2's free-text replies
    ("The shape is a ...") into one-word answers from the world's vocabulary, with a falling loss; stage 2 then
    fine-tunes SmolLM2 itself."""
    from safetensors.torch import load_file

    from llava_hpc.model.builders import build_language_model, build_tokenizer
    from llava_hpc.model.specs import LLMSpec
    from llava_hpc.synthetic import COLOUR_NAMES, POSITIONS

    data = tomllib.loads((REPO / "pipelines" / "demo-smollm2.toml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["synthetic"].update(n_instruct=400, n_bench=40)
    data["stages"]["stage1"].update(max_steps=50, save_every_steps=50)  # one epoch of the 400 questions
    data["stages"]["stage2"].update(max_steps=2)
    pipeline = tmp_path / "demo-smollm2.toml"
    pipeline.write_text(tomli_w.dumps(data))
    result = invoke("run", "-p", str(pipeline))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"

    config = json.loads((run / "stage2" / "model" / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)  # SmolLM2-135M, not the tiny LLM
    losses = [row["loss"] for row in map(json.loads, (run / "stage1" / "metrics.jsonl").open()) if "loss" in row]
    assert losses[-1] < 0.5 * losses[0], losses
    # Stage 2 fine-tuned the LLM (2 steps): its weights moved from SmolLM2's.
    spec = LLMSpec(name="smollm2")
    base = build_language_model(spec, len(build_tokenizer(spec))).state_dict()
    tuned = load_file(run / "stage2" / "model" / "model.safetensors")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned[name], base["model.layers.0.self_attn.q_proj.weight"])

    answers = [json.loads(line)["text"] for line in (run / "generate" / "synthetic" / "answers.jsonl").open()]
    vocabulary = {*COLOUR_NAMES, *POSITIONS}
    one_word = [a for a in answers if a.strip().rstrip(".").lower() in vocabulary]
    assert len(answers) == 40 and len(one_word) >= 36, answers
