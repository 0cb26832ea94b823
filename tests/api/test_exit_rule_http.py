"""The exit rule over HTTP, on both int8 kernels: ties at the threshold leave, the next
float above does not, 1.0 is always full depth and 0.0 always the first exit, for
requests of one input (a row alone) and of many (the layer loop)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.network.quantize import int8_kernel
from tests.api.helpers import predict
from tests.tiny import random_texts

L = 4
TEXTS = random_texts(8, seed=41, min_words=3, max_words=25)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def kernel_client(
    request: pytest.FixtureRequest, make_app: Callable[..., FastAPI]
) -> Iterator[TestClient]:
    if request.param == "onnxruntime" and int8_kernel() != "onnxruntime":
        pytest.skip("onnxruntime is not installed")
    with TestClient(make_app(int8_kernel=request.param), raise_server_exceptions=False) as c:
        yield c


def test_a_threshold_equal_to_the_exit_1_confidence_leaves_there_and_the_next_float_does_not(
    kernel_client: TestClient,
) -> None:
    first = predict(kernel_client, TEXTS, max_layers=1)
    assert [p["exit_layer"] for p in first] == [1] * len(TEXTS)
    for text, p in zip(TEXTS, first, strict=True):
        c = p["score"]  # the exit-1 confidence, exact: JSON carries every bit of a float
        assert 0.5 <= c < 1.0
        [tie] = predict(kernel_client, text, threshold=c)
        assert (tie["exit_layer"], tie["score"], tie["label"]) == (1, c, p["label"])
        [above] = predict(kernel_client, text, threshold=math.nextafter(c, 2.0))
        assert above["exit_layer"] > 1
    # The same in one request of many inputs: the layer loop, not a row alone.
    ties = predict(kernel_client, TEXTS[:4], threshold=max(p["score"] for p in first[:4]))
    most = max(range(4), key=lambda i: first[i]["score"])
    assert ties[most]["exit_layer"] == 1


@pytest.mark.parametrize(("threshold", "exit_layer"), [(1.0, L), (0.0, 1)])
def test_threshold_one_is_full_depth_and_zero_the_first_exit(
    kernel_client: TestClient, threshold: float, exit_layer: int
) -> None:
    for inputs in ([t] for t in TEXTS):  # one at a time, then all together
        assert [p["exit_layer"] for p in predict(kernel_client, inputs, threshold=threshold)] == [
            exit_layer
        ]
    together = predict(kernel_client, TEXTS, threshold=threshold)
    assert [p["exit_layer"] for p in together] == [exit_layer] * len(TEXTS)
