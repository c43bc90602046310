"""The embedded default end to end, as the README's first command runs it: the tiny LLaVA learns the
synthetic world (held-out exact match from chance to >= 90 %), and a shuffled-image control does not."""

import json
import tomllib

import pytest
import tomli_w
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
