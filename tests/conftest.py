"""Shared fixtures: one tiny random multi-exit model per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from app.network import artifact
from tests.tiny import make_tiny_model

# No example database: a failure found once must be pinned in the test as an explicit
# `@example`, not replayed from a directory one checkout happens to hold.
settings.register_profile("exitserve", database=None)
settings.load_profile("exitserve")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine the thread
    hand-offs cost several times the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fp32 artifact; treat it as read-only (copy it to modify it)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path) -> artifact.LoadedModel:
    """The tiny model loaded once; tests must not mutate its network."""
    return artifact.load(tiny_model_dir)
