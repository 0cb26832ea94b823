"""Per-batch dispatch: the cost arithmetic, the choice it makes from given costs, and the
whole-network path, which must give the layer loop's answers exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.engine import dispatch
from app.engine.dispatch import Costs, expected_layers, plan, survival
from app.engine.executor import Row, run_batch
from app.engine.runtime import calibrated_survival, load_runtime, measure_dispatch
from app.main import create_app
from app.network import artifact
from app.network.backends import Padded, make_backend
from app.network.quantize import prepare_model
from tests.api.conftest import build_settings
from tests.tiny import random_texts

# A GPU's shape of costs (ms): a pass is launch-bound up to 32 rows, then compute-bound;
# a layer step costs a sixth of a pass plus a fixed host read.
SIZES = (1, 8, 32, 128, 512)
GPU = Costs(SIZES, whole=(0.4, 0.5, 0.6, 1.6, 6.0), layer=(0.17, 0.19, 0.2, 0.37, 1.1))


def test_costs_interpolate_between_sizes_and_scale_past_the_largest() -> None:
    assert GPU.at(GPU.whole, 1) == 0.4 and GPU.at(GPU.whole, 0.5) == 0.4
    assert GPU.at(GPU.whole, 20) == pytest.approx(0.55)
    assert GPU.at(GPU.whole, 1024) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="increase"):
        Costs((8, 1), (1.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="one whole and one layer"):
        Costs((1, 8), (1.0,), (1.0, 1.0))


def test_survival_follows_the_exit_histogram() -> None:
    assert survival([50, 30, 0, 20]) == pytest.approx([1.0, 0.5, 0.2, 0.2])
    assert survival([0, 0, 10]) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        survival([0, 0])


def test_auto_takes_the_cheaper_path_for_the_batch() -> None:
    alive = survival([40, 20, 15, 10, 10, 5])  # mean depth about 2.5 of 6
    # Small batches: six host reads cost more than the rows that left would save.
    assert plan("auto", 1, alive, GPU) == "whole"
    assert plan("auto", 32, alive, GPU) == "whole"
    # Large ones: compute-bound, the layer loop's thinning pays.
    assert expected_layers(512, alive, GPU) < GPU.at(GPU.whole, 512)
    assert plan("auto", 512, alive, GPU) == "layers"
    # With every row to full depth there is nothing to save: one pass.
    assert plan("auto", 512, survival([0] * 5 + [1]), GPU) == "whole"
    # Unknown costs or histogram: the layer loop; explicit modes are kept.
    assert plan("auto", 8, None, GPU) == plan("auto", 8, alive, None) == "layers"
    assert plan("whole", 512, alive, GPU) == "whole" and plan("layers", 1, alive, GPU) == "layers"


def test_measure_times_each_path_at_each_size() -> None:
    ran: list[tuple[str, int]] = []
    ticks = iter(range(1000))
    costs = dispatch.measure(
        lambda b: ran.append(("whole", b)),
        lambda b: ran.append(("layer", b)),
        sizes=(1, 4),
        reps=3,
        clock=lambda: float(next(ticks)),
    )
    assert costs.sizes == (1, 4) and costs.whole == costs.layer == (1.0, 1.0)
    assert ran.count(("whole", 4)) == ran.count(("layer", 1)) == 4  # a warm run, then 3


@pytest.fixture(scope="module")
def rows(tiny_loaded: artifact.LoadedModel) -> list[Row]:
    """Rows with every kind of rule side by side: calibrated, a request's own threshold,
    full depth, a depth cap."""
    L = tiny_loaded.network.num_layers
    ids = tiny_loaded.tokenizer.encode(random_texts(24, seed=41, min_words=2, max_words=30))
    rules = [
        (list(tiny_loaded.spec.thresholds), L),
        ([0.6] * L, L),
        ([1.0] * L, L),
        (list(tiny_loaded.spec.thresholds), 2),
    ]
    return [Row(r, *rules[k % len(rules)]) for k, r in enumerate(ids)]


@pytest.mark.parametrize("kernel", ["onnxruntime", "torch", "fp32", "padded"])
def test_the_whole_pass_answers_as_the_layer_loop(
    tiny_model_dir: Path, rows: list[Row], kernel: str
) -> None:
    net = artifact.load(tiny_model_dir).network
    if kernel == "padded":  # the GPU's backend, here on the CPU
        backend = Padded(prepare_model(net, "cpu", "none"))
    elif kernel == "fp32":
        backend = make_backend(net, "cpu", "none")
    else:
        backend = make_backend(net, "cpu", "int8", kernel)
    looped = run_batch(backend, rows)
    answered: list[int] = []
    whole = run_batch(backend, rows, lambda j, _: answered.append(j), whole=True)
    if kernel == "padded":  # fp32 GEMMs over another number of rows: 1e-7 apart
        assert [(p.label_index, p.exit_layer) for p in whole.predictions] == [
            (p.label_index, p.exit_layer) for p in looped.predictions
        ]
        for a, b in zip(whole.predictions, looped.predictions, strict=True):
            assert a.probs == pytest.approx(b.probs, abs=1e-5)
    else:  # the CPU's int8 and packed fp32: a row's bits whatever its batch
        assert whole.predictions == looped.predictions
    assert sorted(answered) == list(range(len(rows)))
    L = backend.num_layers
    assert whole.rows_per_layer == [len(rows)] * L  # every row ran every layer
    assert sum(looped.rows_per_layer) < sum(whole.rows_per_layer)
    assert {p.exit_layer for p in whole.predictions} > {L}  # rows did leave early


def test_a_runtime_on_the_cpu_dispatches_layer_by_layer(tiny_model_dir: Path) -> None:
    rt = load_runtime(tiny_model_dir, "cpu", "int8", dispatch="auto")
    assert (rt.dispatch, rt.costs, rt.plan(512)) == ("layers", None, "layers")
    forced = load_runtime(tiny_model_dir, "cpu", "int8", dispatch="whole")
    assert forced.plan(1) == "whole"


def test_auto_measures_costs_where_it_is_asked_to(tiny_model_dir: Path) -> None:
    """The start-up measurement (the GPU's path), here on the CPU backend: real timings
    at the sizes up to the largest batch, and the survival from the evaluation's exit
    histogram; without a histogram, the layer loop."""
    rt = load_runtime(tiny_model_dir, "cpu", "int8")
    rt.dispatch = "auto"
    rt.costs = measure_dispatch(rt, largest=8)
    assert rt.costs.sizes == (1, 2, 4, 8)
    assert all(t > 0 for t in rt.costs.whole + rt.costs.layer)
    assert calibrated_survival(rt.evaluation) is None and rt.plan(8) == "layers"
    rt.alive = calibrated_survival({"exit_histogram": [6, 2, 1, 1]})
    assert rt.alive == pytest.approx([1.0, 0.4, 0.2, 0.1])
    costs, alive = rt.costs, rt.alive
    want = "whole" if costs.at(costs.whole, 8) < expected_layers(8, alive, costs) else "layers"
    assert rt.plan(8) == want


def test_whole_passes_and_continuous_batching_are_refused_together(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="dispatch=whole runs static batches"):
        build_settings(tiny_model_dir, dispatch="whole", batching="continuous")
    assert build_settings(tiny_model_dir, dispatch="auto", batching="continuous").dispatch == "auto"


def test_a_server_dispatching_whole_passes_answers_as_one_going_layer_by_layer(
    tiny_model_dir: Path,
) -> None:
    texts = random_texts(12, seed=43, min_words=2, max_words=30)
    answers, info = {}, {}
    for mode in ("layers", "whole"):
        settings = build_settings(tiny_model_dir, dispatch=mode)
        with TestClient(create_app(settings)) as c:
            r = c.post("/predict", json={"inputs": texts, "parameters": {"all_scores": True}})
            assert r.status_code == 200, r.text
            answers[mode] = r.json()["predictions"]
            info[mode] = c.get("/info").json()["dispatch"]
    assert answers["whole"] == answers["layers"]
    assert info == {"layers": {"mode": "layers"}, "whole": {"mode": "whole"}}
