"""The plain-PyTorch encoder, loaded through the generic checkpoint path, reproduces the
Hugging Face BertModel on the real weights.

The reference comes from `tests/fixtures/make_encoder_reference.py`, run once with
`transformers` in a separate environment; exitserve itself never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.network import artifact
from app.network.encoder import Encoder
from app.network.tokenizer import TextTokenizer

FIXTURE = Path(__file__).parents[2] / "fixtures" / "minilm_reference.safetensors"


@pytest.fixture(scope="module")
def reference() -> dict:
    with safe_open(str(FIXTURE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors["sentences"] = json.loads(meta["sentences"])
    tensors["model_sha256"] = meta["model_sha256"]
    return tensors


@pytest.fixture(scope="module")
def base() -> artifact.BaseWeights:
    return artifact.minilm_base()


def test_fixture_was_made_from_the_installed_weights(
    reference: dict, base: artifact.BaseWeights
) -> None:
    assert base.files["model.safetensors"] == reference["model_sha256"]


def test_tokenizer_matches_reference_ids(reference: dict, base: artifact.BaseWeights) -> None:
    tok = TextTokenizer(base.path_of("tokenizer.json"), max_length=128)
    ids = tok.encode(reference["sentences"])
    mask = reference["attention_mask"]
    for b, row in enumerate(ids):
        n = int(mask[b].sum())
        assert row == reference["input_ids"][b, :n].tolist()


def test_hidden_states_match_reference(reference: dict, base: artifact.BaseWeights) -> None:
    enc = Encoder(artifact.load_base_encoder_config(base))
    state = {k.removeprefix("encoder."): v for k, v in artifact.load_base_state(base).items()}
    enc.load_state_dict(state)
    enc.eval()
    with torch.inference_mode():
        states = enc(reference["input_ids"], reference["attention_mask"])
    expected = reference["hidden_states"]  # (L + 1, B, T, H)
    assert len(states) == expected.shape[0] == 7
    real = reference["attention_mask"].bool()  # padded positions are not compared
    for layer, (got, want) in enumerate(zip(states, expected, strict=True)):
        diff = (got - want).abs()[real].max().item()
        assert diff < 1e-4, f"layer {layer}: max abs diff {diff:.2e}"


def test_the_minilm_directory_given_by_path_loads_the_same_tensors(
    base: artifact.BaseWeights, tmp_path: Path
) -> None:
    """`train --base DIR` on the package's own directory takes the generic path by path:
    the same config and bit-identical tensors as the package reference."""
    by_path = artifact.directory_base(base.directory(), tmp_path / "model")
    assert by_path.files == base.files
    assert artifact.load_base_encoder_config(by_path) == artifact.load_base_encoder_config(base)
    a, b = artifact.load_base_state(base), artifact.load_base_state(by_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
