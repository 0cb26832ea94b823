"""`exitserve add-exits` on tiny random classifiers in the standard layout: the last exit
is the original classifier, only the new heads are stored, unlabelled text is enough."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.cli import main
from app.engine.executor import Row, run_batch
from app.engine.runtime import load_runtime
from app.network import artifact
from app.network.backends import RunningBatch
from app.network.quantize import resolve
from app.training.evaluate import all_exit_probs, split_data
from tests.checkpoints import reference_probs, write_checkpoint, write_data

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """A 3-layer classifier, given exits through the CLI; (classifier, model, printed)."""
    root = tmp_path_factory.mktemp("add-exits")
    cls = write_checkpoint(root / "classifier", num_layers=3, labels=LABELS)
    data = write_data(root / "data.csv", n=400)
    out = root / "model"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["add-exits", str(cls), "--data", str(data), "--out", str(out)]) == 0
    return cls, out, [json.loads(line) for line in buf.getvalue().splitlines()]


def test_cli_prints_what_it_built_calibrated_and_measured(made: tuple) -> None:
    _, out, printed = made
    built, calibration, test = printed
    assert built["out"] == str(out) and built["base"] == "../classifier"
    assert built["labels"] == list(LABELS) and built["layers"] == 3
    assert built["serving"]["cpu"] == "none"
    assert built["serving"]["int8"]["n"] == 40
    assert len(built["heads"]["train_agreement_with_classifier"]) == 2
    assert set(calibration["calibration"]) >= {"final_accuracy", "mean_layers"}
    assert test["test"]["n"] == 40 and test["test"]["unlabelled"] == 0
    for name in ("model.json", "weights.safetensors", "report.json", "report.png"):
        assert (out / name).is_file(), name


def test_only_the_new_heads_are_stored_and_the_classifier_is_referenced(made: tuple) -> None:
    cls, out, _ = made
    with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    # The new heads, and int8's channel smoothing where one was chosen.
    assert keys and all(k.startswith(("full/heads.0.", "full/heads.1.", "smooth/")) for k in keys)
    spec = artifact.read_spec(out)
    assert spec.config.final_pooling == "cls"
    assert spec.base is not None and spec.base.path == "../classifier"
    assert spec.base.files["model.safetensors"] == artifact.sha256_file(cls / "model.safetensors")
    assert artifact.tokenizer_path(out, spec) == (cls / "tokenizer.json").resolve()


def test_full_depth_answers_are_the_original_classifiers(made: tuple) -> None:
    """Every test text, at full depth, as served (the measured numerics) and in fp32:
    the same label as the original and the same probabilities."""
    cls, out, _ = made
    spec = artifact.read_spec(out)
    texts, _ = split_data(spec, "test")
    original = reference_probs(cls, texts)
    for quantization in ("auto", "none"):
        rt = load_runtime(out, "cpu", quantization)
        assert rt.dtype == "fp32"
        L = rt.num_layers
        rows = [Row(r, [1.0] * (L - 1) + [0.0], L) for r in rt.tokenize(texts)]
        preds = run_batch(rt.backend, rows).predictions
        assert [p.label_index for p in preds] == original.argmax(-1).tolist(), quantization
        assert all(p.exit_layer == L for p in preds)
        got = torch.tensor([p.probs for p in preds])
        torch.testing.assert_close(got, original, atol=1e-5, rtol=0)


def test_int8_is_stored_with_the_smoothing_that_changed_fewest_answers(made: tuple) -> None:
    """The record's counts are what the stored model does: int8 served from the artifact
    changes the recorded number of calibration answers, and the smoothing stored is the
    one that changed fewest."""
    _, out, _ = made
    loaded = artifact.load(out)
    int8 = loaded.spec.serving["int8"]
    record = int8["smoothing"]
    counts = record["full_depth_answers_changed_by_alpha"]
    assert list(counts) == ["none", "0.4", "0.5", "0.6", "0.7", "0.8"]
    chosen = "none" if record["alpha"] is None else str(record["alpha"])
    assert counts[chosen] == min(counts.values()) == int8["full_depth_answers_changed"]
    assert bool(loaded.network.int8_smoothing) == (record["alpha"] is not None)
    texts, _ = split_data(loaded.spec, "calibration")
    ids = loaded.tokenizer.encode(texts)
    answers = {
        mode: all_exit_probs(load_runtime(out, "cpu", mode).backend, ids)[-1].argmax(-1)
        for mode in ("none", "int8")
    }
    assert int((answers["none"] != answers["int8"]).sum()) == int8["full_depth_answers_changed"]


def test_the_exits_learned_the_classifiers_answers(made: tuple) -> None:
    """On test texts the heads never saw, each new exit mostly gives the classifier's
    answer (chance is about one half)."""
    _, out, _ = made
    loaded = artifact.load(out)
    texts, _ = split_data(loaded.spec, "test")
    probs = all_exit_probs(loaded.network, loaded.tokenizer.encode(texts))  # (L, N, C)
    pred = probs.argmax(-1)
    agreement = (pred[:-1] == pred[-1][None]).mean(1)
    # Measured 0.78 and 0.82 on these 40 texts; an untrained head agrees about half the time.
    assert agreement.min() >= 0.7, agreement


def test_unlabelled_text_is_enough(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cls = write_checkpoint(tmp_path / "classifier", num_layers=2, labels=LABELS, seed=4)
    data = write_data(tmp_path / "texts.csv", n=300, labelled=False)
    out = tmp_path / "model"
    assert main(["add-exits", str(cls), "--data", str(data), "--out", str(out),
                 "--epochs", "5", "--copy-base"]) == 0  # fmt: skip
    test = json.loads(capsys.readouterr().out.splitlines()[-1])["test"]
    assert test["unlabelled"] == test["n"] == 30
    # Judged against the last exit: the final exit agrees with itself.
    assert test["final_accuracy"] == 1.0
    spec = artifact.read_spec(out)
    assert spec.calibration["unlabelled"] == spec.calibration["n"]
    # --copy-base: self-contained, the classifier's files inside the model directory.
    assert spec.base is not None and spec.base.path == "base"
    assert sorted(p.name for p in (out / "base").iterdir()) == sorted(spec.base.files)
    artifact.load(out)


def test_a_bare_encoder_or_foreign_labels_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc = write_checkpoint(tmp_path / "encoder", num_layers=2)
    data = write_data(tmp_path / "data.csv", n=100)
    assert main(["add-exits", str(enc), "--data", str(data), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no classifier.weight" in err and "exitserve train --base" in err
    assert "Traceback" not in err
    other = write_checkpoint(tmp_path / "topics", num_layers=2, labels=("sport", "tech"))
    assert main(["add-exits", str(other), "--data", str(data), "--out", str(tmp_path / "n")]) == 2
    assert "labels ['negative', 'positive'] are not in ['sport', 'tech']" in capsys.readouterr().err


def test_auto_quantization_follows_the_models_measured_choice() -> None:
    assert resolve("cpu", "auto", {"cpu": "none"}) == ("cpu", "none")
    assert resolve("cpu", "auto", {}) == ("cpu", "int8")
    assert resolve("cpu", "int8", {"cpu": "none"}) == ("cpu", "int8")  # an explicit choice wins


def test_a_model_whose_classifier_moved_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cls = write_checkpoint(tmp_path / "classifier", num_layers=2, labels=LABELS, seed=5)
    data = write_data(tmp_path / "data.csv", n=200)
    out = tmp_path / "model"
    assert main(["add-exits", str(cls), "--data", str(data), "--out", str(out),
                 "--epochs", "2"]) == 0  # fmt: skip
    cls.rename(tmp_path / "elsewhere")
    with pytest.raises(artifact.ArtifactError, match=r"base checkpoint directory .*classifier"):
        artifact.load(out)


def test_exits_can_be_limited_to_chosen_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--exit-layers 2`: of a 4-layer classifier's exits only 2 and the last answer; the
    heads after layers 1 and 3 never even run when served with the calibrated thresholds."""
    cls = write_checkpoint(tmp_path / "classifier", num_layers=4, labels=LABELS, seed=6)
    data = write_data(tmp_path / "data.csv", n=600)
    out = tmp_path / "model"
    loose = ["--max-disagreement", "0.3", "--max-drop", "0.2"]
    assert main(["add-exits", str(cls), "--data", str(data), "--out", str(out),
                 "--exit-layers", "2", *loose]) == 0  # fmt: skip
    spec = artifact.read_spec(out)
    assert spec.thresholds[0] == spec.thresholds[2] == 1.0 and spec.thresholds[1] < 1.0
    assert spec.calibration["exit_layers"] == [2, 4]
    assert all(p["thresholds"][0] == p["thresholds"][2] == 1.0
               for p in spec.calibration["ladder"]["points"])  # fmt: skip
    histogram = spec.evaluation["exit_histogram"]
    assert histogram[0] == histogram[2] == 0 and histogram[1] > 0
    rt = load_runtime(out, "cpu")
    ran = [0] * 4
    step = rt.backend.step

    def counted(i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        ran[i] += exit
        return step(i, batch, exit)

    rt.backend.step = counted  # type: ignore[method-assign]
    texts, _ = split_data(spec, "test")
    rows = [Row(r, rt.thresholds, 4) for r in rt.tokenize(texts)]
    run_batch(rt.backend, rows)
    assert ran[0] == ran[2] == 0 and ran[1] == 1
