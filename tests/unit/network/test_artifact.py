"""Artifacts: save/load round trips and every refusal, each naming the offending file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from app.network import artifact
from app.network.artifact import ArtifactError
from app.network.multi_exit import pad_batch
from tests.tiny import make_tiny_model, random_texts


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifact that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))


def edit_spec(model_dir: Path, change: Any) -> None:
    path = model_dir / "model.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def all_logits(loaded: artifact.LoadedModel, texts: list[str]) -> torch.Tensor:
    ids, mask = pad_batch(loaded.tokenizer.encode(texts))
    with torch.inference_mode():
        return loaded.network(ids, mask).logits  # (L, B, C)


# -- round trips ----------------------------------------------------------------------
def test_fp32_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    texts = random_texts(16, seed=3)
    first = artifact.load(make_tiny_model(tmp_path / "a", seed=7))
    second_dir = tmp_path / "b"
    artifact.save(
        second_dir,
        first.spec,
        first.network,
        tokenizer_file=tmp_path / "a" / "tokenizer.json",
        dtype=torch.float32,
    )
    second = artifact.load(second_dir)
    torch.testing.assert_close(all_logits(second, texts), all_logits(first, texts), rtol=0, atol=0)
    assert second.spec.thresholds == first.spec.thresholds == [0.7, 0.8, 0.9, 0.0]
    assert second.spec.labels == ["negative", "positive"]


def test_fp16_round_trip_is_close(tmp_path: Path) -> None:
    texts = random_texts(16, seed=4)
    fp32 = artifact.load(make_tiny_model(tmp_path / "fp32", seed=7))
    fp16 = artifact.load(make_tiny_model(tmp_path / "fp16", seed=7, dtype=torch.float16))
    assert fp16.network.dtype == torch.float32  # loaded back in fp32
    torch.testing.assert_close(all_logits(fp16, texts), all_logits(fp32, texts), rtol=0, atol=1e-2)


def test_spec_round_trips_through_model_json(tiny_model_dir: Path) -> None:
    spec = artifact.read_spec(tiny_model_dir)
    again = artifact.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert set(spec.files) == {"weights.safetensors", "tokenizer.json"}
    assert spec.files["weights.safetensors"] == artifact.sha256_file(
        tiny_model_dir / "weights.safetensors"
    )


def test_saved_weights_are_world_readable(tiny_model_dir: Path) -> None:
    assert (tiny_model_dir / "weights.safetensors").stat().st_mode & 0o044 == 0o044


def test_loaded_network_is_in_eval_mode(tiny_loaded: artifact.LoadedModel) -> None:
    assert not tiny_loaded.network.training


def test_tokenizer_truncates_to_max_seq_len(tiny_loaded: artifact.LoadedModel) -> None:
    long_text = " ".join(["good"] * 100)
    short, long = tiny_loaded.tokenizer.encode(["good film", long_text])
    assert tiny_loaded.tokenizer.max_length == 32
    assert len(long) == 32
    cls, sep = short[0], short[-1]
    assert len(short) == 4
    assert long[0] == cls and long[-1] == sep  # truncation keeps [CLS] ... [SEP]


# -- refusals -------------------------------------------------------------------------
def test_sha256_mismatch_is_refused(model_dir: Path) -> None:
    weights = model_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"sha256 mismatch .*weights\.safetensors"):
        artifact.load(model_dir)


def test_tampered_tokenizer_is_refused(model_dir: Path) -> None:
    tok = model_dir / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"good"', '"evil"'))
    with pytest.raises(ArtifactError, match=r"sha256 mismatch .*tokenizer\.json"):
        artifact.load(model_dir)


def test_missing_weights_file_is_refused(model_dir: Path) -> None:
    (model_dir / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"missing model file weights\.safetensors"):
        artifact.load(model_dir)


def test_weights_not_listed_in_spec_is_refused(model_dir: Path) -> None:
    edit_spec(model_dir, lambda s: s["files"].pop("weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"lists no weights\.safetensors"):
        artifact.load(model_dir)


def test_missing_model_json_is_refused(model_dir: Path) -> None:
    (model_dir / "model.json").unlink()
    with pytest.raises(ArtifactError, match=r"no model\.json"):
        artifact.load(model_dir)


def test_unknown_format_version_is_refused(model_dir: Path) -> None:
    edit_spec(model_dir, lambda s: s.update(format_version=2))
    with pytest.raises(ArtifactError, match=r"model\.json has format_version 2"):
        artifact.load(model_dir)


@pytest.mark.parametrize("name", ["model.pt", "x.pkl", "extra.BIN"])
def test_pickle_file_in_directory_is_refused(model_dir: Path, name: str) -> None:
    (model_dir / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ArtifactError, match=rf"refusing {name}: pickle"):
        artifact.load(model_dir)


@pytest.mark.parametrize(
    "name", ["../weights.safetensors", "/etc/passwd", "sub/tokenizer.json", ".."]
)
def test_files_entry_leaving_the_directory_is_refused(model_dir: Path, name: str) -> None:
    # A real file with the right digest sits outside: only the name check can refuse it.
    outside = shutil.copy(
        model_dir / "weights.safetensors", model_dir.parent / "weights.safetensors"
    )
    edit_spec(model_dir, lambda s: s["files"].update({name: artifact.sha256_file(Path(outside))}))
    with pytest.raises(ArtifactError, match=rf"names file '{name}', which is not a plain file"):
        artifact.load(model_dir)


def test_model_json_that_is_not_json_is_refused(model_dir: Path) -> None:
    (model_dir / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"model\.json is not valid JSON"):
        artifact.load(model_dir)


@pytest.mark.parametrize("field", ["labels", "encoder", "exits", "name", "max_seq_len"])
def test_model_json_missing_field_is_refused(model_dir: Path, field: str) -> None:
    edit_spec(model_dir, lambda s: s.pop(field))
    with pytest.raises(ArtifactError, match=rf"model\.json is malformed: .*'{field}'"):
        artifact.load(model_dir)


def test_model_json_with_unknown_encoder_field_is_refused(model_dir: Path) -> None:
    edit_spec(model_dir, lambda s: s["encoder"].update(hidden_act="relu"))
    with pytest.raises(ArtifactError, match=r"model\.json is (malformed|invalid)"):
        artifact.load(model_dir)


def test_wrong_number_of_thresholds_is_refused(model_dir: Path) -> None:
    edit_spec(model_dir, lambda s: s["exits"].update(thresholds=[0.5, 0.5, 0.0]))
    with pytest.raises(ArtifactError, match=r"expected 4 exit thresholds, got 3"):
        artifact.load(model_dir)


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_threshold_outside_unit_interval_is_refused(model_dir: Path, bad: float) -> None:
    edit_spec(model_dir, lambda s: s["exits"].update(thresholds=[0.5, bad, 0.9, 0.0]))
    with pytest.raises(ArtifactError, match=rf"exit thresholds must be in \[0, 1\], got .*{bad}"):
        artifact.load(model_dir)


@pytest.mark.parametrize(
    "thresholds", [[0.5, 0.5, 0.0], [0.5, 1.5, 0.9, 0.0]], ids=["count", "range"]
)
def test_threshold_refusal_names_model_json(model_dir: Path, thresholds: list[float]) -> None:
    edit_spec(model_dir, lambda s: s["exits"].update(thresholds=thresholds))
    with pytest.raises(ArtifactError, match=r"model\.json"):
        artifact.load(model_dir)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(labels=["only"]),  # MultiExitConfig ValueError
        lambda s: s.update(max_seq_len=1000),  # MultiExitConfig ValueError
        lambda s: s["exits"].update(thresholds=["high", 0.5, 0.5, 0.0]),  # float() ValueError
    ],
    ids=["one-label", "max-seq-len", "threshold-not-a-number"],
)
def test_invalid_values_in_model_json_raise_artifact_error(model_dir: Path, change: Any) -> None:
    edit_spec(model_dir, change)
    with pytest.raises(ArtifactError, match=r"model\.json"):
        artifact.load(model_dir)


def test_model_json_that_is_not_an_object_is_refused(model_dir: Path) -> None:
    (model_dir / "model.json").write_text("[1, 2, 3]\n")
    with pytest.raises(ArtifactError, match=r"model\.json"):
        artifact.load(model_dir)
