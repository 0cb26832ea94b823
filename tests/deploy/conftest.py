"""What the deploy files are checked against: the app's real routes, settings and metrics.

`exported` scrapes `/metrics` of a live tiny-model app after one request on each
inference route, so labelled series exist; the deploy files' PromQL must name only these.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from tests.api.conftest import build_settings

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"

# Series: sample name -> the label sets it was exported with.
Series = dict[str, list[dict[str, str]]]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def tool(name: str) -> str:
    """A command-line tool the deploy checks need; missing means the setup is broken."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `make install` (dev extras) or the machine provides it")
    return found


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def live(tiny_model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(build_settings(tiny_model_dir))) as client:
        yield client


@pytest.fixture(scope="session")
def exported(live: TestClient) -> Series:
    name = live.get("/info").json()["model"]
    assert live.post("/predict", json={"inputs": ["a good film"]}).status_code == 200
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["dull"]}]}
    assert live.post(f"/v2/models/{name}/infer", json=v2).status_code == 200
    series: Series = {}
    for family in text_string_to_metric_families(live.get("/metrics").text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


@pytest.fixture(scope="session")
def get_routes(live: TestClient) -> set[str]:
    """Paths the app answers with GET (probes and scrapes use GET), from its OpenAPI."""
    paths: dict[str, dict[str, Any]] = live.app.openapi()["paths"]  # type: ignore[attr-defined]
    return {path for path, methods in paths.items() if "get" in methods}
