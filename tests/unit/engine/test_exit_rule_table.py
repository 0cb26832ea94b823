"""One table of exit-rule cases, run against every implementation of the rule.

The rule: a row leaves exit i when its confidence there is at least the threshold and
the threshold is below 1, or when exit i is its depth cap; the last exit always answers.
It lives in `app.network.exit_rule` in three forms: per row in Python (the layer loop,
`decide`), as ONNX ops (the one-call graph of a row alone, `ort_layers.OrtRow`) and
vectorised in numpy (calibration, `exit_layers`). Each case builds its thresholds from
the confidences that very implementation computes for the row, so a tie is exact as a
float: a threshold equal to the confidence leaves there, the next float above does not.

The one-call graph is checked on its own output (how many exits it ran), not only
through the executor: the executor decides again on what the graph returns and falls
back to the layer loop, so a graph that leaves one exit late would never change an answer,
only waste the layers after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.executor import Row, run_batch
from app.network import artifact, exit_rule, ort_session
from app.network.backends import Backend, Padded, make_backend
from app.network.exit_rule import exit_layers
from app.network.quantize import int8_kernel, prepare_model
from app.training.evaluate import all_exit_probs
from tests.tiny import random_texts

L = 4
TEXTS = random_texts(6, seed=23, min_words=2, max_words=30)
Thresholds = list[float]


def up(c: float) -> float:
    """The next float32 above `c`: thresholds reach the graph as float32, so the next
    double above would round back onto the confidence there."""
    return float(np.nextafter(np.float32(c), np.float32(2.0)))


def down(c: float) -> float:
    return float(np.nextafter(np.float32(c), np.float32(-1.0)))


@dataclass(frozen=True)
class Case:
    name: str
    rule: Callable[[list[float]], tuple[Thresholds, int]]  # confidences -> thresholds, cap
    exit: int  # the exit the row must leave at (1-based)
    capped: bool = False  # uses a depth cap (calibration's numpy has none)


def _rest(n: int) -> Thresholds:
    return [1.0] * n


CASES = [
    Case("tie at exit 1 leaves", lambda c: ([c[0], *_rest(L - 1)], L), 1),
    Case("next float above at exit 1 stays", lambda c: ([up(c[0]), *_rest(L - 1)], L), L),
    Case("next float below at exit 1 leaves", lambda c: ([down(c[0]), *_rest(L - 1)], L), 1),
    Case("above at 1, tie at 2", lambda c: ([up(c[0]), c[1], *_rest(L - 2)], L), 2),
    Case(
        "above everywhere, tie at the last intermediate exit",
        lambda c: ([*(up(x) for x in c[: L - 2]), c[L - 2], 1.0], L),
        L - 1,
    ),
    Case("threshold 1 everywhere reaches the last exit", lambda c: (_rest(L), L), L),
    Case("threshold 0 everywhere leaves at exit 1", lambda c: ([0.0] * L, L), 1),
    *(
        Case(f"cap {k} with threshold 1 answers at the cap", lambda c, k=k: (_rest(L), k), k, True)
        for k in range(1, L + 1)
    ),
    Case("a cap before a tie answers at the cap", lambda c: ([1.0, c[1], 1.0, 1.0], 1), 1, True),
    Case("a tie before the cap leaves at the tie", lambda c: ([c[0], *_rest(L - 1)], 3), 1, True),
]


class Implementation:
    """One place the rule is applied: its own confidences per exit for a row, and the
    exit it lets that row leave at under given thresholds and cap."""

    capped = True

    def confidences(self, ids: list[int]) -> list[float]:
        raise NotImplementedError

    def exit(self, ids: list[int], thresholds: Thresholds, cap: int) -> int:
        raise NotImplementedError


class LayerLoop(Implementation):
    """`exit_rule.decide` in the layer loop: two copies of the row in one batch (a batch
    of one would take the one-call path); both must leave at the same exit."""

    def __init__(self, net: Backend) -> None:
        self.net = net

    def confidences(self, ids: list[int]) -> list[float]:
        probs = all_exit_probs(self.net, [ids])[:, 0]
        return exit_rule.confidences(probs, self.net.confidence).tolist()

    def exit(self, ids: list[int], thresholds: Thresholds, cap: int) -> int:
        res = run_batch(self.net, [Row(ids, thresholds, cap), Row(ids, thresholds, cap)])
        a, b = (p.exit_layer for p in res.predictions)
        assert a == b
        return a


class Alone(LayerLoop):
    """A row alone through the executor (the one-call graph where the kernel has one,
    with `decide` applied again on its logits; else the layer loop)."""

    def exit(self, ids: list[int], thresholds: Thresholds, cap: int) -> int:
        return run_batch(self.net, [Row(ids, thresholds, cap)]).predictions[0].exit_layer


class OneCallGraph(Implementation):
    """`OrtRow`'s own rule: the exits it ran, read off its output; confidences from
    ONNX Runtime's ops, the kernels inside the graph."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.confidence = _ort_confidence(backend.confidence, len(backend.labels))

    def _run(self, ids: list[int], thresholds: Thresholds, cap: int) -> torch.Tensor:
        logits = self.backend.run_alone(ids, thresholds, cap)
        assert logits is not None
        return logits  # (e, C)

    def confidences(self, ids: list[int]) -> list[float]:
        # Capped at exit k with nothing else in use, the graph runs only exit k's head.
        logits = [self._run(ids, _rest(L), k)[k - 1] for k in range(1, L + 1)]
        return [float(self.confidence(lg.numpy()[None])) for lg in logits]

    def exit(self, ids: list[int], thresholds: Thresholds, cap: int) -> int:
        return int(self._run(ids, thresholds, cap).shape[0])


class Calibration(Implementation):
    """`exit_rule.exit_layers`, on the served int8 confidences (it knows no depth cap)."""

    capped = False

    def __init__(self, net: Backend) -> None:
        self.net = net

    def confidences(self, ids: list[int]) -> list[float]:
        return LayerLoop(self.net).confidences(ids)

    def exit(self, ids: list[int], thresholds: Thresholds, cap: int) -> int:
        conf = np.array(self.confidences(ids), np.float32)[:, None]  # (L, 1)
        return int(exit_layers(conf, np.array(thresholds))[0]) + 1


def _ort_confidence(measure: str, labels: int) -> Callable[[np.ndarray], np.ndarray]:
    """The graph's confidence (`exit_rule.onnx_confidence`) of logits (1, C), alone."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []

    def op(kind: str, *inputs: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, list(inputs), [f"t{len(nodes)}"], **attrs))
        return f"t{len(nodes) - 1}"

    y = exit_rule.onnx_confidence(op, "x", "one", measure, labels)
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    graph = helper.make_graph(
        nodes,
        "confidence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "C"])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ort_session.OPSET)])
    model.ir_version = 10
    session = ort_session.open_session(model.SerializeToString(), 1)
    return lambda x: session.run(None, {"x": x.astype(np.float32)})[0]


def _network(
    model_dir: Path, kernel: str, saturate: bool, measure: str, quantization: str = "int8"
) -> Backend:
    """The tiny model as served on the CPU in int8; `kernel` "padded": in fp32 on the
    padded backend, the GPU's, here on the CPU. `measure` other than max_softmax: read
    as a multi-label model (a sigmoid per label) with that confidence."""
    net = artifact.load(model_dir).network
    output = "softmax" if measure == "max_softmax" else "sigmoid"
    net.cfg = replace(net.cfg, output=output, confidence=measure)
    if saturate:
        # Logits thousands apart: every softmax rounds to exactly (1.0, 0.0).
        with torch.no_grad():
            for head in net.heads:
                head.classifier.weight.mul_(1e4)
    if kernel == "padded":
        return Padded(prepare_model(net, "cpu", "none"))
    return make_backend(net, "cpu", quantization, kernel)


def _implementations(model_dir: Path, saturate: bool, measure: str) -> dict[str, Implementation]:
    torch_net = _network(model_dir, "torch", saturate, measure)
    found: dict[str, Implementation] = {
        "layer loop, torch int8": LayerLoop(torch_net),
        "alone, torch int8": Alone(torch_net),
        "calibration numpy": Calibration(torch_net),
        # One row at a time: fp32 products move with the number of rows, so a tie is
        # exact only against the row's confidences alone.
        "alone, padded fp32": Alone(_network(model_dir, "padded", saturate, measure)),
    }
    if int8_kernel() == "onnxruntime":
        ort_net = _network(model_dir, "onnxruntime", saturate, measure)
        found["layer loop, onnxruntime int8"] = LayerLoop(ort_net)
        found["alone, onnxruntime int8"] = Alone(ort_net)
        found["one-call graph"] = OneCallGraph(ort_net)
        a16 = _network(model_dir, "onnxruntime", saturate, measure, "int8a16")
        found["layer loop, onnxruntime int8a16"] = LayerLoop(a16)
        found["one-call graph, int8a16"] = OneCallGraph(a16)
    return found


NAMES = [
    "layer loop, torch int8",
    "alone, torch int8",
    "calibration numpy",
    "alone, padded fp32",
    "layer loop, onnxruntime int8",
    "alone, onnxruntime int8",
    "one-call graph",
    "layer loop, onnxruntime int8a16",
    "one-call graph, int8a16",
]


@pytest.fixture(scope="module", params=exit_rule.MEASURES)
def measure(request: pytest.FixtureRequest) -> str:
    """Every case for a softmax model and for a multi-label one with each measure."""
    return str(request.param)


@pytest.fixture(scope="module")
def implementations(tiny_model_dir: Path, measure: str) -> dict[str, Implementation]:
    return _implementations(tiny_model_dir, saturate=False, measure=measure)


@pytest.fixture(scope="module")
def saturated(tiny_model_dir: Path, measure: str) -> dict[str, Implementation]:
    return _implementations(tiny_model_dir, saturate=True, measure=measure)


@pytest.fixture(scope="module")
def ids(tiny_loaded: artifact.LoadedModel) -> list[list[int]]:
    return tiny_loaded.tokenizer.encode(TEXTS)


def _get(found: dict[str, Implementation], name: str) -> Implementation:
    if name not in found:
        pytest.skip("onnxruntime is not installed")
    return found[name]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("name", NAMES)
def test_every_implementation_leaves_where_the_table_says(
    implementations: dict[str, Implementation], ids: list[list[int]], name: str, case: Case
) -> None:
    impl = _get(implementations, name)
    if case.capped and not impl.capped:
        pytest.skip("calibration has no depth cap")
    for row in ids:
        conf = impl.confidences(row)
        assert all(0.0 < c < 1.0 for c in conf), conf  # ties and the float above exist
        thresholds, cap = case.rule(conf)
        assert impl.exit(row, thresholds, cap) == case.exit, (conf, thresholds, cap)


@pytest.mark.parametrize("name", NAMES)
def test_threshold_one_never_leaves_early_even_at_confidence_one(
    saturated: dict[str, Implementation], ids: list[list[int]], name: str
) -> None:
    impl = _get(saturated, name)
    for row in ids:
        assert impl.confidences(row) == [1.0] * L  # the head saturates at every exit
        assert impl.exit(row, _rest(L), L) == L
        assert impl.exit(row, [0.0, *_rest(L - 1)], L) == 1
        assert impl.exit(row, [1.0, 1.0, 0.5, 1.0], L) == 3


def test_a_threshold_between_two_float32s_is_the_rule_in_the_graph_too(
    implementations: dict[str, Implementation], ids: list[list[int]]
) -> None:
    """A request's threshold is a double: just above a confidence, it keeps the row, in the
    graph too, whose thresholds are float32 (rounded up, never to nearest)."""
    impl = _get(implementations, "one-call graph")
    for row in ids:
        c = impl.confidences(row)[0]
        just_above = c + (up(c) - c) / 4  # rounds to nearest onto c itself
        assert np.float32(just_above) == np.float32(c) and just_above > c
        assert impl.exit(row, [just_above, *_rest(L - 1)], L) == L
        assert impl.exit(row, [c, *_rest(L - 1)], L) == 1


@pytest.mark.parametrize("kernel", ["torch", "onnxruntime"])
def test_each_row_keeps_its_own_rule_beside_neighbours_with_another(
    implementations: dict[str, Implementation],
    saturated: dict[str, Implementation],
    ids: list[list[int]],
    kernel: str,
) -> None:
    """In one batch, rows with the operating point's thresholds, a request's own
    threshold and a depth cap each leave where their own rule says, also where a
    neighbour makes the exit head run for a row whose threshold there is 1."""
    for found in (implementations, saturated):
        loop = _get(found, f"layer loop, {kernel} int8")
        assert isinstance(loop, LayerLoop)
        row = ids[0]
        c = loop.confidences(row)
        rules = [
            ([c[0], *_rest(L - 1)], L),  # a tie at exit 1
            (_rest(L), L),  # never early, even where the neighbours' heads run
            ([up(c[0]), c[1], *_rest(L - 2)], L),  # a miss at 1, a tie at 2
            (_rest(L), 3),  # a cap
            ([0.0] * L, L),
        ]
        want = [1, L, 2, 3, 1]
        if c[0] == 1.0:  # saturated: a tie is a threshold of 1, and no float lies above
            rules, want = [rules[1], rules[3], rules[4]], [L, 3, 1]
        res = run_batch(loop.net, [Row(row, th, cap) for th, cap in rules])
        assert [p.exit_layer for p in res.predictions] == want


def test_the_implementations_agree_on_the_confidences_they_decide_on(
    implementations: dict[str, Implementation], ids: list[list[int]]
) -> None:
    """The table means one rule only if every path sees the same numbers: the int8
    kernels' confidences agree (to the rounding of their float epilogues), and the
    layer loop's are exactly calibration's."""
    loop = implementations["layer loop, torch int8"]
    for row in ids:
        want = loop.confidences(row)
        assert implementations["calibration numpy"].confidences(row) == want
        for name in ("layer loop, onnxruntime int8", "one-call graph"):
            if name in implementations:
                assert implementations[name].confidences(row) == pytest.approx(want, abs=0.05)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_implementation_leaves_at_the_same_exit_under_random_rules(
    implementations: dict[str, Implementation], ids: list[list[int]], data: st.DataObject
) -> None:
    """Random thresholds per exit (0, 1, uniform, or the row's own confidence there, the
    float below or the float above it) and caps: every implementation leaves at the
    exit the rule gives on its own confidences, and the one-call graph runs exactly the
    exits up to that one (its output holds one row per exit it ran)."""
    row = ids[data.draw(st.integers(0, len(ids) - 1), label="row")]
    choice = [data.draw(st.sampled_from(["0", "1", "u", "tie", "up", "down"])) for _ in range(L)]
    cap = data.draw(st.integers(1, L), label="cap")
    uniform = [data.draw(st.floats(0.0, 1.0)) for _ in range(L)]

    def rule(conf: list[float]) -> Thresholds:
        pick = {"0": lambda i: 0.0, "1": lambda i: 1.0, "u": lambda i: uniform[i]}
        pick |= {"tie": lambda i: conf[i], "up": lambda i: up(conf[i])}
        pick["down"] = lambda i: down(conf[i])
        return [pick[c](i) for i, c in enumerate(choice)]

    def expected(conf: list[float], thresholds: Thresholds, capped: bool) -> int:
        for i in range(L):
            if (thresholds[i] < 1.0 and conf[i] >= thresholds[i]) or (capped and i + 1 == cap):
                return i + 1
        return L

    for impl in implementations.values():
        conf = impl.confidences(row)
        thresholds = rule(conf)
        want = expected(conf, thresholds, impl.capped)
        assert impl.exit(row, thresholds, cap if impl.capped else L) == want
