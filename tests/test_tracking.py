"""TensorBoard event files mirror metrics.jsonl; a resumed attempt's purge shows each step once."""

import pytest

from llava_hpc.train.tracking import EVENTS_DIR, TensorBoardMirror, read_scalars


def test_a_resume_purges_what_the_killed_attempt_logged_past_its_checkpoint(tmp_path):
    first = TensorBoardMirror(tmp_path, resumed_from=0)
    for step in range(1, 7):  # killed after step 6; the last checkpoint was step 4
        first.write({"step": step, "loss": float(step), "lr": 1e-3, "grad_norm": None, "time": 1000.0 + step})
    first.close()
    second = TensorBoardMirror(tmp_path, resumed_from=4)
    for step in range(5, 9):
        second.write({"step": step, "loss": 100.0 + step, "lr": 1e-3, "grad_norm": 0.5, "time": 2000.0 + step})
    second.close()

    assert len(list((tmp_path / EVENTS_DIR).iterdir())) == 2  # one event file per attempt
    scalars = read_scalars(tmp_path)
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    assert [step for step, _ in scalars["grad_norm"]] == [5, 6, 7, 8]  # a missing value is not logged as 0
    assert scalars["lr"][0][1] == pytest.approx(1e-3)
