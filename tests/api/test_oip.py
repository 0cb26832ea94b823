"""Open Inference Protocol (KServe v2): the routes over httpx, then Triton's own client
against a real uvicorn process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import Poster, Reply, assert_error, predict
from tests.server import server_process
from tests.tiny import random_texts

MODEL = "tiny"  # the model directory's name is the model's name
TEXTS = random_texts(6, seed=21)
REPO = Path(__file__).resolve().parents[2]
JSON = {"content-type": "application/json"}


def infer_body(texts: Any, shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    shape = [len(texts)] if shape is None else shape
    return {
        "inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": texts}],
        **extra,
    }


def columns(r: Reply) -> dict[str, list[Any]]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL
    assert body["model_version"] == "1"
    out = {}
    for o in body["outputs"]:
        assert o["shape"] == [len(o["data"])]
        out[o["name"]] = o["data"]
    return out


def assert_same_as_predict(
    client: Poster, texts: list[str], cols: dict[str, list[Any]], **params: Any
) -> None:
    expected = predict(client, texts, **params)
    assert cols["label"] == [p["label"] for p in expected]
    assert cols["exit_layer"] == [p["exit_layer"] for p in expected]
    assert cols["score"] == pytest.approx([p["score"] for p in expected], abs=1e-4)


def test_server_metadata(client: TestClient) -> None:
    body = client.get("/v2").json()
    assert body["name"] == "exitserve"
    assert isinstance(body["version"], str)
    assert "binary_tensor_data" in body["extensions"]


def test_health(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200


def test_model_metadata(client: TestClient) -> None:
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "label": "BYTES",
        "score": "FP32",
        "exit_layer": "INT32",
        "scores": "FP32",
    }
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["scores"] == [-1, 2]
    assert meta["parameters"] == {
        "labels": ["negative", "positive"],
        "num_layers": 4,
        "architecture": "bert",
        "multi_label": False,
    }


@pytest.mark.parametrize(
    "path", ["/v2/models/unknown", "/v2/models/unknown/ready", "/v2/models/unknown/versions/1"]
)
def test_unknown_model_is_404(client: TestClient, path: str) -> None:
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize("route", ["", "/ready", "/infer"])
def test_unknown_version_is_404(client: TestClient, route: str) -> None:
    path = f"/v2/models/{MODEL}/versions/999{route}"
    r = client.post(path, json=infer_body(["a"])) if route == "/infer" else client.get(path)
    assert_error(r, 404, "not_found")


def test_known_version_is_served(client: TestClient) -> None:
    assert client.get(f"/v2/models/{MODEL}/versions/1").json()["name"] == MODEL
    r = client.post(f"/v2/models/{MODEL}/versions/1/infer", json=infer_body(TEXTS))
    assert_same_as_predict(client, TEXTS, columns(r))


def test_infer_deeply_nested_json_is_422(client: TestClient) -> None:
    r = client.post(f"/v2/models/{MODEL}/infer", content=b"[" * 100_000, headers=JSON)
    assert_error(r, 422)


def test_infer_deeply_nested_json_leaks_nothing(client: TestClient) -> None:
    r = client.post(f"/v2/models/{MODEL}/infer", content=b"[" * 100_000, headers=JSON)
    assert_error(r, r.status_code)


def test_infer_lone_surrogate_is_422(client: TestClient) -> None:
    body = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}'
    assert_error(client.post(f"/v2/models/{MODEL}/infer", content=body, headers=JSON), 422)


def test_infer_unknown_model_is_404(client: TestClient) -> None:
    assert_error(client.post("/v2/models/unknown/infer", json=infer_body(["a"])), 404)


def test_infer_equals_predict(client: TestClient) -> None:
    cols = columns(client.post(f"/v2/models/{MODEL}/infer", json=infer_body(TEXTS, id="r-1")))
    assert list(cols) == ["label", "score", "exit_layer"]
    assert_same_as_predict(client, TEXTS, cols)


def test_infer_echoes_id(client: TestClient) -> None:
    r = client.post(f"/v2/models/{MODEL}/infer", json=infer_body(TEXTS[:1], id="r-42"))
    assert r.json()["id"] == "r-42"


def test_infer_shape_n_by_1(client: TestClient) -> None:
    nested = [[t] for t in TEXTS]
    for data in (nested, TEXTS):  # row-major data may come nested or flat
        body = infer_body(data, shape=[len(TEXTS), 1])
        assert_same_as_predict(
            client, TEXTS, columns(client.post(f"/v2/models/{MODEL}/infer", json=body))
        )


@pytest.mark.parametrize(
    "params",
    [
        {"threshold": 1.0},
        {"threshold": 0.0},
        {"max_layers": 2},
        {"threshold": 1.0, "max_layers": 3},
    ],
)
def test_infer_parameters(client: TestClient, params: dict[str, Any]) -> None:
    body = infer_body(TEXTS, parameters=params)
    cols = columns(client.post(f"/v2/models/{MODEL}/infer", json=body))
    assert_same_as_predict(client, TEXTS, cols, **params)
    if params.get("threshold") == 1.0:
        assert set(cols["exit_layer"]) == {params.get("max_layers", 4)}
    if params.get("threshold") == 0.0:
        assert set(cols["exit_layer"]) == {1}
    if "max_layers" in params:
        assert max(cols["exit_layer"]) <= params["max_layers"]


def test_infer_requested_outputs(client: TestClient) -> None:
    body = infer_body(TEXTS, outputs=[{"name": "exit_layer"}, {"name": "score"}])
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    outs = r.json()["outputs"]
    assert [(o["name"], o["datatype"]) for o in outs] == [
        ("exit_layer", "INT32"),
        ("score", "FP32"),
    ]
    assert all(isinstance(x, int) for x in outs[0]["data"])


def test_infer_binary_input_extension(client: TestClient) -> None:
    blob = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in TEXTS)
    header = infer_body(TEXTS)
    tensor = header["inputs"][0]
    del tensor["data"]
    tensor["parameters"] = {"binary_data_size": len(blob)}
    head = httpx.Request("POST", "/", json=header).content
    r = client.post(
        f"/v2/models/{MODEL}/infer",
        content=head + blob,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        },
    )
    assert_same_as_predict(client, TEXTS, columns(r))


def _binary(head: dict[str, Any], blob: bytes, header_len: int | None = None) -> dict[str, Any]:
    content = httpx.Request("POST", "/", json=head).content
    n = len(content) if header_len is None else header_len
    return {
        "content": content + blob,
        "headers": {"inference-header-content-length": str(n)},
    }


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"json": infer_body(TEXTS[:2], shape=[3])}, 422),
        ({"json": infer_body(TEXTS[:2], shape=[2, 2])}, 422),
        ({"json": infer_body(TEXTS[:2], shape=[-2, -1])}, 422),
        ({"json": infer_body([])}, 422),
        ({"json": infer_body(["fine", "  "])}, 422),
        ({"json": infer_body([1, 2])}, 422),
        ({"json": infer_body(["a"], outputs=[{"name": "logits"}])}, 422),
        ({"json": infer_body(["a"], parameters={"threshold": 1.5})}, 422),
        ({"json": infer_body(["a"], parameters={"max_layers": 5})}, 422),
        ({"json": infer_body(["a"], parameters={"max_layers": 0})}, 422),
        (
            {
                "json": {
                    "inputs": [{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]
                }
            },
            422,
        ),
        (
            {
                "json": {
                    "inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]
                }
            },
            422,
        ),
        ({"json": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}}, 422),
        ({"json": {"inputs": []}}, 422),
        ({"json": {"inputs": infer_body(["a"])["inputs"] * 2}}, 422),
        ({"json": {"outputs": []}}, 422),
        ({"json": ["a"]}, 422),
        ({"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 422),
        (
            {"content": b'{"inputs": "caf\xe9"}', "headers": {"content-type": "application/json"}},
            422,
        ),
        (
            {
                "content": b'{"inputs":[],"parameters":{"threshold":NaN}}',
                "headers": {"content-type": "application/json"},
            },
            422,
        ),
        (
            _binary(
                {
                    "inputs": [
                        {
                            "name": "text",
                            "shape": [1],
                            "datatype": "BYTES",
                            "parameters": {"binary_data_size": 9},
                        }
                    ]
                },
                b"\x05\x00\x00\x00abc",
            ),
            422,
        ),
        (
            _binary(
                {
                    "inputs": [
                        {
                            "name": "text",
                            "shape": [1],
                            "datatype": "BYTES",
                            "parameters": {"binary_data_size": 5},
                        }
                    ]
                },
                b"\x01\x00\x00\x00\xff",
            ),
            422,
        ),
        (_binary({"inputs": []}, b"", header_len=10_000), 422),
    ],
    ids=[
        "shape-too-big",
        "shape-2x2",
        "negative-shape",
        "no-texts",
        "blank-text",
        "numbers",
        "unknown-output",
        "threshold-1.5",
        "max-layers-5",
        "max-layers-0",
        "wrong-input-name",
        "wrong-datatype",
        "no-data",
        "no-inputs",
        "two-inputs",
        "missing-inputs",
        "not-an-object",
        "invalid-json",
        "invalid-utf8",
        "threshold-nan",
        "binary-truncated",
        "binary-not-utf8",
        "header-length-out-of-range",
    ],
)
def test_infer_rejects_bad_requests(
    client: TestClient, kwargs: dict[str, Any], status: int
) -> None:
    assert_error(client.post(f"/v2/models/{MODEL}/infer", **kwargs), status)


def test_infer_too_many_inputs_is_413(serve: Callable[..., TestClient]) -> None:
    client = serve(max_inputs_per_request=2)
    r = client.post(f"/v2/models/{MODEL}/infer", json=infer_body(["a", "b", "c"]))
    assert_error(r, 413, "too_large")


# -- the real client against a real server ----------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`uvicorn app.main:app` in its own process on a free loopback port; yields host:port."""
    settings = {
        "model_dir": str(tiny_model_dir),
        "device": "cpu",
        "quantization": "none",
        "threads": "1",
        "max_queue_delay_ms": "1",
    }
    log_path = tmp_path_factory.mktemp("server") / "uvicorn.log"
    with server_process(settings, log_path, entry="uvicorn", timeout=60) as (url, _):
        yield url.removeprefix("http://")


@pytest.fixture(scope="module")
def triton(server: str) -> Iterator[Any]:
    httpclient = pytest.importorskip("tritonclient.http")
    c = httpclient.InferenceServerClient(server)
    yield c
    c.close()


def _as_str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@pytest.mark.slow
def test_triton_client_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("unknown")
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("text", "BYTES")]
    assert {o["name"] for o in meta["outputs"]} == {"label", "score", "exit_layer", "scores"}
    assert triton.get_server_metadata()["name"] == "exitserve"


@pytest.mark.slow
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_triton_client_infer(triton: Any, server: str, binary_in: bool, binary_out: bool) -> None:
    from tritonclient.http import InferInput, InferRequestedOutput

    texts = [*TEXTS, "naïve café — ünïcode"]
    inp = InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary_in)
    outputs = [
        InferRequestedOutput(n, binary_data=binary_out) for n in ("label", "score", "exit_layer")
    ]
    result = triton.infer(MODEL, [inp], outputs=outputs, request_id="t-1")
    labels = [_as_str(x) for x in result.as_numpy("label")]
    scores = result.as_numpy("score").astype(float).tolist()
    exits = result.as_numpy("exit_layer").astype(int).tolist()
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        expected = predict(c, texts)
    assert labels == [p["label"] for p in expected]
    assert exits == [p["exit_layer"] for p in expected]
    assert scores == pytest.approx([p["score"] for p in expected], abs=1e-4)
    assert result.get_response()["id"] == "t-1"


@pytest.mark.slow
def test_triton_client_parameters(triton: Any) -> None:
    from tritonclient.http import InferInput, InferRequestedOutput

    inp = InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array(TEXTS, dtype=object))
    full = triton.infer(MODEL, [inp], parameters={"threshold": 1.0})
    assert full.as_numpy("exit_layer").tolist() == [4] * len(TEXTS)
    first = triton.infer(MODEL, [inp], parameters={"threshold": 0.0})
    assert first.as_numpy("exit_layer").tolist() == [1] * len(TEXTS)
    capped = triton.infer(MODEL, [inp], parameters={"threshold": 1.0, "max_layers": 2})
    assert capped.as_numpy("exit_layer").tolist() == [2] * len(TEXTS)
    only = triton.infer(MODEL, [inp], outputs=[InferRequestedOutput("score")])
    assert only.as_numpy("label") is None
    assert only.as_numpy("score").shape == (len(TEXTS),)


@pytest.mark.slow
def test_triton_client_sees_errors(triton: Any) -> None:
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    inp = InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array(["a"], dtype=object))
    with pytest.raises(InferenceServerException):
        triton.infer("unknown", [inp])
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, [inp], parameters={"max_layers": 99})


@pytest.mark.slow
def test_triton_client_options(triton: Any) -> None:
    """Triton's classification extension (`class_count`), raw scores, and truncation, as
    the real client sends them."""
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    inp = InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array(TEXTS, dtype=object))
    ranked = triton.infer(MODEL, [inp], outputs=[
        InferRequestedOutput("scores", class_count=2), InferRequestedOutput("label")])  # fmt: skip
    top = ranked.as_numpy("scores")
    assert top.shape == (len(TEXTS), 2)
    for row, label in zip(top, ranked.as_numpy("label"), strict=True):
        (s1, _, l1), (s2, _, l2) = (_as_str(x).split(":") for x in row)
        assert (
            l1 == _as_str(label) and float(s1) >= float(s2) and {l1, l2} == {"negative", "positive"}
        )
    raw = triton.infer(MODEL, [inp], parameters={"raw_scores": True, "threshold": 1.0},
                       outputs=[InferRequestedOutput("scores")])  # fmt: skip
    probs = triton.infer(MODEL, [inp], parameters={"threshold": 1.0},
                         outputs=[InferRequestedOutput("scores")])  # fmt: skip
    z = raw.as_numpy("scores").astype(np.float64)
    softmax = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(softmax, probs.as_numpy("scores"), atol=1e-5)
    long = InferInput("text", [1], "BYTES")
    long.set_data_from_numpy(np.array([" ".join(["word"] * 300)], dtype=object))
    with pytest.raises(InferenceServerException, match=r"tokens; the model's limit is"):
        triton.infer(MODEL, [long], parameters={"truncate": False})
    assert triton.infer(MODEL, [long]).as_numpy("label").shape == (1,)  # cut by default
