"""app/engine/runtime.py: how workers and threads are planned."""

from __future__ import annotations

import pytest

from app.engine.runtime import worker_plan


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
