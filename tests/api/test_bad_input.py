"""Property tests: text edge cases through both inference routes.

Texts are drawn from an alphabet heavy in what breaks text pipelines: emoji (astral
code points, joiners, modifiers), right-to-left and directional marks, zero-width
characters, C0/C1 controls and NUL, unusual whitespace, combining marks, and lone
surrogates (which JSON carries as `"\\ud800"` escapes but UTF-8 cannot encode). The
rule every answer must follow: a text with something besides whitespace that is
valid Unicode gets 200 and a prediction; anything else gets a 4xx JSON error. Raw
bodies that are not UTF-8 are 4xx too. After each property the server is healthy.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.helpers import assert_error

EDGE_CHARS = (
    "😀👍🏽👨‍👩‍👧‍👦🇺🇳❤️"  # emoji, skin tone modifier, ZWJ family, flag, variation selector
    "\u200f\u200e\u202e\u202d\u2066\u2069\u061c"  # RTL/LTR marks, overrides, isolates
    "\u200b\u200c\u200d\u2060\ufeff"  # zero-width space/joiners, word joiner, BOM
    "\x00\x01\x07\x1b\x7f\x85\x9f"  # NUL, C0 and C1 controls
    " \t\n\r\x0b\x0c\u00a0\u1680\u2003\u2028\u2029\u3000"  # whitespace of many kinds
    "e\u0301\u0338\ufffd\U0010ffff"  # combining marks, replacement char, last code point
    "שלום مرحبا film good bad"  # right-to-left scripts and vocabulary words
)
SURROGATES = "\ud800\udbff\udc00\udfff"

texts = st.text(
    alphabet=st.one_of(st.sampled_from(EDGE_CHARS + SURROGATES), st.characters()),
    min_size=0,
    max_size=40,
)
JSON = {"content-type": "application/json"}
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def acceptable(text: str) -> bool:
    """What the API documents: not blank, and encodable as UTF-8 (no lone surrogate)."""
    if not text.strip():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def body_bytes(payload: Any) -> bytes:
    # ensure_ascii (the default) writes lone surrogates as \\uXXXX escapes, as a client would.
    return json.dumps(payload).encode("ascii")


def v2(inputs: list[str]) -> dict[str, Any]:
    return {
        "inputs": [{"name": "text", "shape": [len(inputs)], "datatype": "BYTES", "data": inputs}]
    }


def check(r: Any, good: bool, n: int) -> None:
    if good:
        assert r.status_code == 200, r.text
    else:
        assert 400 <= r.status_code < 500, r.text
        assert_error(r, r.status_code)
    if good and "predictions" in r.json():
        assert len(r.json()["predictions"]) == n
    elif good:
        assert all(o["shape"] == [n] for o in r.json()["outputs"])


def assert_healthy(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", json={"inputs": "a good film"}).status_code == 200


def test_text_edge_cases_on_predict(client: TestClient) -> None:
    @PROPERTY
    @given(batch=st.lists(texts, min_size=1, max_size=4))
    def prop(batch: list[str]) -> None:
        good = all(acceptable(t) for t in batch)
        check(client.post("/predict", content=body_bytes({"inputs": batch}), headers=JSON),
              good, len(batch))  # fmt: skip
        if len(batch) == 1:
            r = client.post("/predict", content=body_bytes({"inputs": batch[0]}), headers=JSON)
            check(r, good, 1)

    prop()
    assert_healthy(client)


def test_text_edge_cases_on_v2_infer(client: TestClient) -> None:
    @PROPERTY
    @given(batch=st.lists(texts, min_size=1, max_size=4))
    def prop(batch: list[str]) -> None:
        good = all(acceptable(t) for t in batch)
        r = client.post("/v2/models/tiny/infer", content=body_bytes(v2(batch)), headers=JSON)
        check(r, good, len(batch))

    prop()
    assert_healthy(client)


# Byte sequences UTF-8 forbids: stray continuation bytes, overlong forms, encoded
# surrogates, code points past U+10FFFF, truncated sequences, bytes never used.
INVALID_UTF8 = st.sampled_from(
    [
        b"\x80",
        b"\xbf",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\xfe",
        b"\xff",
        b"\xc3",
    ]
)


def test_bodies_that_are_not_utf8_are_4xx(client: TestClient) -> None:
    @PROPERTY
    @given(
        before=st.text(alphabet="abc ", max_size=5),
        bad=INVALID_UTF8,
        after=st.text(alphabet="abc ", max_size=5),
        route=st.sampled_from(["/predict", "/v2/models/tiny/infer"]),
    )
    def prop(before: str, bad: bytes, after: str, route: str) -> None:
        text = before.encode() + bad + after.encode()
        if route == "/predict":
            raw = b'{"inputs": ["' + text + b'"]}'
        else:
            raw = (
                b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["'
                + text
                + b'"]}]}'
            )
        r = client.post(route, content=raw, headers=JSON)
        assert 400 <= r.status_code < 500, r.text
        assert_error(r, r.status_code)

    prop()
    assert_healthy(client)


def test_invalid_utf8_in_a_binary_v2_tensor_is_4xx(client: TestClient) -> None:
    @PROPERTY
    @given(bad=INVALID_UTF8)
    def prop(bad: bytes) -> None:
        blob = len(bad).to_bytes(4, "little") + bad
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "text",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(blob)},
                    }
                ]
            }
        ).encode()
        r = client.post(
            "/v2/models/tiny/infer",
            content=head + blob,
            headers={**JSON, "inference-header-content-length": str(len(head))},
        )
        assert_error(r, 422, "validation")

    prop()
    assert_healthy(client)


def test_200_kb_texts_are_served(client: TestClient) -> None:
    for text in ("word " * 40_000, "😀" * 50_000, "\u200b" * 100_000 + "good", "x" * 200_000):
        assert len(text.encode("utf-8")) >= 200_000
        r = client.post("/predict", content=body_bytes({"inputs": text}), headers=JSON)
        check(r, True, 1)
        r = client.post("/v2/models/tiny/infer", content=body_bytes(v2([text])), headers=JSON)
        check(r, True, 1)
    assert_healthy(client)


def test_whitespace_only_texts_are_422(client: TestClient) -> None:
    @PROPERTY
    @given(blank=st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u1680\u2003\u2028\u2029\u3000"))
    def prop(blank: str) -> None:
        r = client.post("/predict", content=body_bytes({"inputs": ["fine", blank]}), headers=JSON)
        assert_error(r, 422, "validation")

    prop()
    assert_healthy(client)
