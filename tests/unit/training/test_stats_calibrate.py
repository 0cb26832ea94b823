"""Exit statistics, the Clopper-Pearson bound, and threshold calibration."""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.engine.adapt import Ladder
from app.network import artifact
from app.training.calibrate import LADDER_STEPS, calibrate, greedy_thresholds, operating_ladder
from app.training.evaluate import all_exit_probs, evaluate
from app.training.stats import adaptive_outcome, binomial_upper_bound, exit_layers
from tests.tiny import make_tiny_model, random_texts


# -- binomial_upper_bound -------------------------------------------------------------
def binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_bound_for_zero_events_has_closed_form() -> None:
    assert binomial_upper_bound(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-3)


@pytest.mark.parametrize(("k", "n"), [(1, 20), (5, 100), (30, 60)])
def test_bound_is_where_the_binomial_cdf_equals_alpha(k: int, n: int) -> None:
    assert binomial_cdf(k, n, binomial_upper_bound(k, n, 0.05)) == pytest.approx(0.05, rel=1e-3)


def test_bound_is_at_least_the_observed_rate_and_grows_with_k() -> None:
    bounds = [binomial_upper_bound(k, 50, 0.05) for k in range(51)]
    assert all(b >= k / 50 for k, b in enumerate(bounds))
    assert all(a < b for a, b in itertools.pairwise(bounds[:-1]))
    assert bounds[-1] == 1.0


def test_bound_tightens_with_more_trials_and_larger_alpha() -> None:
    assert binomial_upper_bound(2, 1000) < binomial_upper_bound(2, 100)
    assert binomial_upper_bound(2, 100, 0.2) < binomial_upper_bound(2, 100, 0.05)


def test_bound_rejects_no_trials() -> None:
    with pytest.raises(ValueError, match=r"n must be positive, got 0"):
        binomial_upper_bound(0, 0)


# -- exit_layers / adaptive_outcome ---------------------------------------------------
CONF = np.array(
    [  # (L=3, N=4)
        [0.95, 0.60, 1.00, 0.50],
        [0.50, 0.90, 0.70, 0.50],
        [0.10, 0.20, 0.30, 0.40],
    ]
)


def test_exit_layers_takes_the_first_exit_that_passes() -> None:
    assert exit_layers(CONF, np.array([0.9, 0.8, 0.0])).tolist() == [0, 1, 0, 2]


def test_exit_layers_threshold_one_never_exits_there() -> None:
    # Row 2 has confidence exactly 1.0 at exit 0, still not allowed to leave.
    assert exit_layers(CONF, np.array([1.0, 0.8, 0.0])).tolist() == [2, 1, 2, 2]


def test_exit_layers_last_exit_always_answers() -> None:
    assert exit_layers(CONF, np.ones(3)).tolist() == [2, 2, 2, 2]
    assert exit_layers(CONF, np.array([1.0, 1.0, 0.99])).tolist() == [2, 2, 2, 2]


def test_exit_layers_threshold_zero_exits_at_once() -> None:
    assert exit_layers(CONF, np.zeros(3)).tolist() == [0, 0, 0, 0]


def test_adaptive_outcome_counts_accuracy_at_the_chosen_exit() -> None:
    correct = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
    acc, depth = adaptive_outcome(CONF, correct, np.array([0.9, 0.8, 0.0]))
    # exits [0, 1, 0, 2] -> correct [1, 1, 0, 1]
    assert acc == pytest.approx(0.75)
    assert depth == pytest.approx((1 + 2 + 1 + 3) / 4)


# -- greedy_thresholds ----------------------------------------------------------------
def synthetic(seed: int = 0, L: int = 4, N: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Per-exit confidences that are calibrated: a row is right with probability conf."""
    rng = np.random.default_rng(seed)
    ease = rng.random(N)  # (N,) how easy each row is
    depth = (np.arange(1, L + 1) / L)[:, None]  # (L, 1) deeper exits know more
    conf = np.clip(0.5 + 0.5 * ease[None] * depth + rng.normal(0, 0.03, (L, N)), 0.5, 1.0)
    correct = rng.random((L, N)) < conf
    return conf, correct


@pytest.mark.parametrize("max_drop", [0.0, 0.01, 0.03])
def test_greedy_thresholds_keep_accuracy_within_max_drop(max_drop: float) -> None:
    conf, correct = synthetic()
    th, path = greedy_thresholds(conf, correct, max_drop)
    acc, depth = adaptive_outcome(conf, correct, th)
    final = float(correct[-1].mean())
    assert acc >= final - max_drop
    assert path[-1] == {"accuracy": acc, "mean_layers": depth}
    assert th.shape == (4,) and th[-1] == 0.0
    assert ((th >= 0) & (th <= 1)).all()


@pytest.mark.parametrize("max_drop", [0.01, 0.03])
def test_greedy_thresholds_save_depth(max_drop: float) -> None:
    conf, correct = synthetic()
    th, path = greedy_thresholds(conf, correct, max_drop)
    _, depth = adaptive_outcome(conf, correct, th)
    assert depth < 4
    assert (th[:-1] < 1.0).any()
    assert path[0] == {"accuracy": float(correct[-1].mean()), "mean_layers": 4.0}
    layers = [p["mean_layers"] for p in path]
    assert all(a > b for a, b in itertools.pairwise(layers))


# -- calibrate and evaluate on a tiny model -------------------------------------------
@pytest.fixture(scope="module")
def labelled_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose training record points at a CSV it mostly agrees with."""
    root = tmp_path_factory.mktemp("calib")
    csv_path = root / "data.csv"
    model_dir = make_tiny_model(
        root / "tiny",
        thresholds=[1.0, 1.0, 1.0, 0.0],
        training={"data": {"source": str(csv_path)}, "config": {"seed": 0}},
    )
    loaded = artifact.load(model_dir)
    texts = random_texts(300, seed=21)
    final = all_exit_probs(loaded.network, loaded.tokenizer.encode(texts))[-1].argmax(-1)
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(len(texts)) < 0.1, 1 - final, final)  # 10% label noise
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, loaded.spec.labels[y]) for t, y in zip(texts, labels, strict=True))
    return model_dir


@pytest.fixture
def calibrated_dir(labelled_tiny: Path, tmp_path: Path) -> tuple[Path, dict]:
    model_dir = Path(shutil.copytree(labelled_tiny, tmp_path / "tiny"))
    return model_dir, calibrate(model_dir, max_drop=0.05, max_disagreement=1.0, quantization="none")


def test_calibrate_writes_thresholds_into_model_json(calibrated_dir: tuple[Path, dict]) -> None:
    model_dir, record = calibrated_dir
    spec = json.loads((model_dir / "model.json").read_text())
    th = spec["exits"]["thresholds"]
    assert len(th) == 4 and th[-1] == 0.0
    assert all(0.0 <= t <= 1.0 for t in th)
    assert any(t < 1.0 for t in th[:-1])
    assert spec["calibration"] == record
    assert record["adaptive_accuracy"] >= record["final_accuracy"] - 0.05
    assert record["mean_layers"] < 4
    assert record["quantization"] == "none"
    artifact.load(model_dir)  # still a valid artifact: model.json is not a hashed file


def test_served_model_keeps_the_calibration_guarantee(calibrated_dir: tuple[Path, dict]) -> None:
    """Evaluated with the executor on the calibration split, the stored thresholds give
    what calibration promised."""
    model_dir, record = calibrated_dir
    report = evaluate(model_dir, split="calibration", quantization="none")
    assert report["n"] == record["n"] == 30
    assert report["final_accuracy"] == record["final_accuracy"]
    assert report["adaptive_accuracy"] >= report["final_accuracy"] - 0.05
    assert report["adaptive_accuracy"] == pytest.approx(record["adaptive_accuracy"], abs=1e-4)
    assert report["mean_layers"] == pytest.approx(record["mean_layers"], abs=1e-3)


def test_evaluate_reports_the_served_int8_model(calibrated_dir: tuple[Path, dict]) -> None:
    model_dir, _ = calibrated_dir
    report = evaluate(model_dir, split="test")
    assert report["quantization"] == "int8" and report["device"] == "cpu"
    assert report["num_layers"] == 4 and report["n"] == 30
    assert len(report["per_exit_accuracy"]) == 4
    assert sum(report["exit_histogram"]) == 30
    assert report["executor_consistency"] == 1.0
    assert 0.0 <= report["fp32_agreement"] <= 1.0
    assert report["accuracy_drop_upper_95"] >= 0.0


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """The one-sided upper bound, written apart from `stats`: the rate p at which k or
    fewer events in n trials have probability alpha (exact binomial sums, bisection)."""

    def at_most_k(p: float) -> float:
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at_most_k(mid) > alpha else (lo, mid)
    return hi


def test_evaluate_figures_follow_from_its_own_per_row_outcomes(
    calibrated_dir: tuple[Path, dict],
) -> None:
    model_dir, _ = calibrated_dir
    report = evaluate(model_dir, split="test")
    rows = {k: np.array(v) for k, v in report["rows"].items()}
    label, final, adaptive, exits = (
        rows["label"],
        rows["final"],
        rows["adaptive"],
        rows["exit_layer"],
    )
    n = report["n"]
    assert len(label) == len(final) == len(adaptive) == len(exits) == n
    drops = int(((adaptive != label) & (final == label)).sum())
    assert report["accuracy_drops"] == drops
    assert report["adaptive_accuracy"] == round(float((adaptive == label).mean()), 4)
    assert report["final_accuracy"] == round(float((final == label).mean()), 4)
    assert report["agreement_with_final"] == round(float((adaptive == final).mean()), 4)
    assert report["mean_layers"] == round(float(exits.mean()), 3)
    assert report["exit_histogram"] == [int((exits == k).sum()) for k in range(1, 5)]
    # The one-sided 95% bound, and not one at another level.
    bound = report["accuracy_drop_upper_95"]
    assert bound == round(clopper_pearson_upper(drops, n, 0.05), 4)
    for alpha in (0.025, 0.1):
        assert bound != round(clopper_pearson_upper(drops, n, alpha), 4)


@pytest.mark.parametrize(("k", "n"), [(0, 30), (0, 1000), (1, 30), (7, 200), (29, 30)])
def test_the_bound_is_the_clopper_pearson_upper_bound(k: int, n: int) -> None:
    assert binomial_upper_bound(k, n, 0.05) == pytest.approx(
        clopper_pearson_upper(k, n, 0.05), abs=1e-9
    )
    if k == 0:  # closed form
        assert binomial_upper_bound(k, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-9)


def test_calibrate_rejects_max_drop_out_of_range(labelled_tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"max_drop must be in \[0, 1\), got 1.0"):
        calibrate(labelled_tiny, max_drop=1.0)


def test_evaluate_without_a_data_record_is_rejected(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"records no training data source"):
        evaluate(tiny_model_dir, split="test", quantization="none")


def test_allowed_disagreements_follows_the_clopper_pearson_bound() -> None:
    from app.training.calibrate import allowed_disagreements

    k = allowed_disagreements(212, 0.03)
    assert binomial_upper_bound(k, 212, 0.05) <= 0.03 < binomial_upper_bound(k + 1, 212, 0.05)
    # Larger samples may show a rate closer to the bound.
    assert allowed_disagreements(1275, 0.03) / 1275 > k / 212
    # Too few inputs to certify even zero disagreements: nothing may leave early.
    assert allowed_disagreements(20, 0.03) == -1


def test_calibrate_on_too_few_inputs_keeps_full_depth(labelled_tiny: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(labelled_tiny, tmp_path / "tiny"))
    record = calibrate(model_dir, max_drop=0.05, max_disagreement=0.001, quantization="none")
    th = json.loads((model_dir / "model.json").read_text())["exits"]["thresholds"]
    assert th[:-1] == [1.0] * (len(th) - 1)
    assert record["mean_layers"] == len(th)


def synthetic_exits(seed: int, L: int, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """conf, correct, agree (L, N): confidence grows with depth, deeper exits are right
    more often and agree with the last one more often."""
    rng = np.random.default_rng(seed)
    conf = np.clip(rng.uniform(0.5, 1.0, (L, N)) + np.linspace(0, 0.2, L)[:, None], 0.5, 1.0)
    correct = rng.uniform(size=(L, N)) < np.linspace(0.75, 0.85, L)[:, None]
    agree = rng.uniform(size=(L, N)) < np.linspace(0.8, 1.0, L)[:, None]
    agree[-1] = True
    return conf, correct, agree


def test_the_operating_ladder_steps_down_in_depth_from_the_calibrated_point() -> None:
    L = 6
    conf, correct, agree = synthetic_exits(seed=0, L=L, N=2000)
    base = np.array([0.95] * (L - 1) + [0.0])
    ladder = operating_ladder(conf, correct, agree, base, fixed_cost=0.5)
    assert ladder[0]["thresholds"] == [0.95] * (L - 1) + [0.0]
    depths = [p["mean_layers"] for p in ladder]
    assert all(b < a for a, b in itertools.pairwise(depths))
    assert depths[-1] == 1.0  # the aggressive end: everything at the first exit
    assert len(ladder) == LADDER_STEPS + 1
    for p in ladder:
        th = np.array(p["thresholds"])
        assert np.all(th <= base + 1e-9) and th[-1] == 0.0
        acc, depth = adaptive_outcome(conf, correct, th)
        assert (p["accuracy"], p["mean_layers"]) == (round(acc, 4), round(depth, 3))
        assert p["relative_cost"] == round((0.5 + depth) / (0.5 + L), 3)
    # The serving side reads it back, point 0 being the model's thresholds.
    served = Ladder.from_calibration(
        ladder[0]["thresholds"], {"ladder": {"fixed_cost": 0.5, "points": ladder}}
    )
    assert len(served) == len(ladder) and served.cost(len(ladder) - 1) == 1.5


def test_closed_exits_stay_at_one_in_every_search_and_ladder_point() -> None:
    """`--exit-layers 2 4`: only exits 2, 4 and the last may answer; the others keep
    threshold 1.0, so their heads never run when served."""
    from app.training.calibrate import exit_mask, global_threshold

    L = 6
    conf, correct, agree = synthetic_exits(seed=1, L=L, N=1500)
    allowed = exit_mask([2, 4], L)
    assert allowed.tolist() == [False, True, False, True, False, True]
    closed = ~allowed
    g = global_threshold(conf, correct, 0.05, agree, 0.2, allowed=allowed)
    p, _ = greedy_thresholds(conf, correct, 0.05, agree, 0.2, allowed=allowed)
    for th in (g, p):
        assert np.all(th[closed] == 1.0) and np.any(th[allowed][:-1] < 1.0)
        assert set(np.unique(exit_layers(conf, th))) <= {1, 3, 5}
    base = np.where(allowed, 0.97, 1.0)
    base[-1] = 0.0
    ladder = operating_ladder(conf, correct, agree, base, fixed_cost=0.5, allowed=allowed)
    assert len(ladder) > 2
    for point in ladder:
        assert np.all(np.array(point["thresholds"])[closed] == 1.0)
    assert ladder[-1]["mean_layers"] == 2.0  # the cheapest point: everything at exit 2
    with pytest.raises(ValueError, match=r"exit layers must be in 1\.\.6, got \[7\]"):
        exit_mask([2, 7], L)
