"""The exit rule's confidence measures: what each says of a row, the same float32 bits
in its three forms (per row, numpy, ONNX ops) for many labels, and a multi-label model
made before `label_set_probability` served with the measure it was calibrated on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.network import artifact, exit_rule, ort_session
from app.network.quantize import int8_kernel
from tests.tiny import make_tiny_model

MULTI = ("label_set_probability", "min_label_margin")


def test_the_label_set_probability_counts_every_unsettled_label() -> None:
    one_unsure = np.array([0.99, 0.99, 0.7], np.float32)
    three_unsure = np.array([0.7, 0.7, 0.7], np.float32)
    # The least settled label alone cannot tell the two rows apart; the set's
    # probability can: three labels at 0.7 are right together about a third of the time.
    margin = [
        exit_rule.confidence(p.tolist(), "min_label_margin") for p in (one_unsure, three_unsure)
    ]
    assert margin[0] == margin[1] == pytest.approx(0.7)
    product = [
        exit_rule.confidence(p.tolist(), "label_set_probability")
        for p in (one_unsure, three_unsure)
    ]
    assert product[0] == pytest.approx(0.99 * 0.99 * 0.7, rel=1e-6)
    assert product[1] == pytest.approx(0.343, rel=1e-6)
    # Labels off count as settled as labels on: max(p, 1 - p).
    assert exit_rule.confidence([0.01, 0.99], "label_set_probability") == pytest.approx(
        0.99**2, rel=1e-6
    )


def _graph(measure: str, labels: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []

    def op(kind: str, *inputs: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, list(inputs), [f"t{len(nodes)}"], **attrs))
        return f"t{len(nodes) - 1}"

    y = exit_rule.onnx_confidence(op, "x", "one", measure, labels)
    graph = helper.make_graph(
        nodes,
        "confidence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, labels])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ort_session.OPSET)])
    model.ir_version = 10
    return ort_session.open_session(model.SerializeToString(), 1)


@pytest.mark.skipif(int8_kernel() != "onnxruntime", reason="onnxruntime is not installed")
@pytest.mark.parametrize("measure", MULTI)
@pytest.mark.parametrize("labels", [1, 3, 11])
def test_the_three_forms_give_the_same_bits(measure: str, labels: int) -> None:
    rng = np.random.default_rng(labels)
    logits = (rng.standard_normal((400, labels)) * 4).astype(np.float32)
    session = _graph(measure, labels)
    # The graph takes logits: its probabilities are ONNX Runtime's sigmoid, so the
    # other forms get the same ones, computed by the same op.
    sig = _sigmoid_session(labels)
    for lg in logits:
        p = sig.run(None, {"x": lg[None]})[0][0]  # (C,) float32
        graph = float(session.run(None, {"x": lg[None]})[0])
        row = exit_rule.confidence([float(v) for v in p], measure)
        vectorised = float(exit_rule.confidences(p[None], measure)[0])
        assert graph == row == vectorised, (measure, p)


def _sigmoid_session(labels: int) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["p"])],
        "sigmoid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, labels])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, labels])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ort_session.OPSET)])
    model.ir_version = 10
    return ort_session.open_session(model.SerializeToString(), 1)


def test_a_multi_label_model_keeps_the_measure_it_was_calibrated_on(tmp_path: Path) -> None:
    made = make_tiny_model(tmp_path / "made", labels=("a", "b", "c"))
    spec = json.loads((made / "model.json").read_text())
    assert spec["exits"]["confidence"] == "max_softmax"
    for measure, expect in (
        ("min_label_margin", "min_label_margin"),
        ("", "label_set_probability"),
    ):
        d = tmp_path / (measure or "default")
        shutil.copytree(made, d)
        spec["head"]["output"] = "sigmoid"
        spec["exits"]["confidence"] = measure
        (d / "model.json").write_text(json.dumps(spec))
        loaded = artifact.load(d)
        assert loaded.spec.confidence == loaded.network.cfg.confidence == expect
        assert json.loads(json.dumps(loaded.spec.to_dict()))["exits"]["confidence"] == expect
    spec["exits"]["confidence"] = "max_softmax"  # a softmax measure on a sigmoid output
    (d / "model.json").write_text(json.dumps(spec))
    with pytest.raises(artifact.ArtifactError, match="does not fit a sigmoid output"):
        artifact.load(d)
