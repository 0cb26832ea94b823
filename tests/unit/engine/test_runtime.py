"""app/engine/runtime.py: how workers and threads are planned."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.runtime import load_runtime, worker_plan


@pytest.mark.parametrize(
    ("device", "threads", "workers", "continuous", "plan"),
    [
        ("cpu", 2, None, False, (2, 1)),  # one single-thread worker per thread
        ("cpu", 8, None, False, (8, 1)),
        ("cpu", 2, 1, False, (1, 2)),  # asked for: one worker with both threads
        ("cpu", 8, 2, False, (2, 4)),
        ("cpu", 3, 2, False, (2, 1)),  # the remainder is not used
        ("cpu", 4, None, True, (1, 4)),  # continuous batching runs one worker
        ("cuda", 16, None, False, (1, 16)),  # a GPU: one worker
    ],
)
def test_worker_plan(
    device: str, threads: int, workers: int | None, continuous: bool, plan: tuple[int, int]
) -> None:
    assert worker_plan(device, threads, workers, continuous) == plan


def test_auto_device_plans_for_the_cpu_when_no_gpu_is_visible() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert worker_plan("auto", 4, None) == (4, 1)


def test_a_ladder_that_does_not_start_at_the_served_thresholds_is_not_used(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = load_runtime(tiny_model_dir, "cpu", "none", 1)
    L = rt.num_layers
    point = {"thresholds": [0.9] * (L - 1) + [0.0], "accuracy": 0.8, "mean_layers": 2.0}
    lower = {"thresholds": [0.5] * (L - 1) + [0.0], "accuracy": 0.7, "mean_layers": 1.0}
    rt.calibration = {"ladder": {"fixed_cost": 0.3, "points": [point, lower]}}
    rt.thresholds = list(point["thresholds"])  # type: ignore[arg-type]
    assert len(rt.ladder) == 2 and rt.ladder.fixed_cost == 0.3
    # Thresholds edited by hand after calibration: the ladder's figures no longer hold.
    rt.thresholds = [0.8] * (L - 1) + [0.0]
    with caplog.at_level("WARNING"):
        ladder = rt.ladder
    assert len(ladder) == 1 and list(ladder.points[0].thresholds) == rt.thresholds
    assert "operating ladder not used" in caplog.text
