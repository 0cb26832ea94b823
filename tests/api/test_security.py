"""Security hygiene: errors echo no internals and no huge inputs, model files cannot leave
their directory, and nothing is ever unpickled."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.conftest import build_settings
from tests.api.helpers import assert_error

ROOT = Path(__file__).parents[2]
HUGE = "x" * 100_000
ERROR_BODY_LIMIT = 1_000  # bytes: an error says what is wrong, it does not quote the input


def infer(**request: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]
    }
    body.update(request)
    return body


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/predict", {"inputs": "a", HUGE: 1}, id="unknown-field-name"),
        pytest.param("/predict", {"inputs": "a", "parameters": {HUGE: 1}}, id="unknown-param"),
        pytest.param("/predict", {"inputs": "a", "parameters": {"threshold": HUGE}}, id="value"),
        pytest.param("/predict", {"inputs": [HUGE, 7]}, id="list-item"),
        pytest.param("/predict", {"inputs": {HUGE: HUGE}}, id="object"),
        pytest.param("/v2/models/tiny/infer", infer(outputs=[{"name": HUGE}]), id="v2-output"),
        pytest.param(
            "/v2/models/tiny/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": HUGE, "data": ["a"]}]},
            id="v2-datatype",
        ),
        pytest.param(
            "/v2/models/tiny/infer",
            {"inputs": [{"name": "text", "shape": [1] * 5_000, "datatype": "BYTES"}]},
            id="v2-shape",
        ),
        pytest.param("/v2/models/tiny/infer", infer(parameters={"timeout_ms": HUGE}), id="v2-p"),
        pytest.param("/v2/models/tiny/infer", {"inputs": HUGE}, id="v2-inputs"),
    ],
)
def test_a_validation_error_does_not_echo_a_huge_input(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    r = client.post(path, json=body)
    assert_error(r, 422, "validation")
    assert len(r.content) < ERROR_BODY_LIMIT, r.text[:300]


def test_an_unknown_model_name_is_not_echoed_in_full(client: TestClient) -> None:
    r = client.post(f"/v2/models/{'m' * 5_000}/infer", json=infer())
    assert_error(r, 404, "not_found")
    assert len(r.content) < ERROR_BODY_LIMIT


def start_up_error(model_dir: Path) -> str:
    """The error that stops the app from starting on `model_dir`."""
    with pytest.raises(Exception) as info, TestClient(create_app(build_settings(model_dir))):
        pass
    return str(info.value)


def copy_model(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize("name", ["../weights.safetensors", "/etc/passwd", "sub/x", ".."])
def test_model_files_cannot_leave_the_model_directory(
    tiny_model_dir: Path, tmp_path: Path, name: str
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "m")
    spec = json.loads((model / "model.json").read_text())
    spec["files"][name] = "0" * 64
    (model / "model.json").write_text(json.dumps(spec))
    assert "not a plain file name" in start_up_error(model)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pkl", ".ckpt"])
def test_a_pickle_file_in_the_model_directory_refuses_start_up(
    tiny_model_dir: Path, tmp_path: Path, suffix: str
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / f"weights{suffix}").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    assert "pickle" in start_up_error(model)


# What would unpickle: the pickle module and its kin, and torch.load (pickle underneath).
UNPICKLING = re.compile(
    r"^\s*(?:import|from)\s+(?:c?pickle|dill|joblib|cloudpickle|shelve)\b"
    r"|\btorch\.load\s*\(|\bpickle\.loads?\s*\(|\bnp\.load\s*\(.*allow_pickle\s*=\s*True",
    re.MULTILINE,
)


def test_no_code_path_can_unpickle() -> None:
    sources = sorted((ROOT / "app").rglob("*.py"))
    assert sources
    offenders = [str(p.relative_to(ROOT)) for p in sources if UNPICKLING.search(p.read_text())]
    assert offenders == []
