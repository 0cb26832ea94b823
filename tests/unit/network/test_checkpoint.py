"""Local BERT checkpoints in the standard layout: what loads, what is refused and why,
and that a loaded classifier computes what `BertForSequenceClassification` computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.network import artifact
from app.network.checkpoint import CheckpointError, open_checkpoint
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork, pad_batch
from app.network.tokenizer import TextTokenizer
from tests.checkpoints import FAMILIES, reference_probs, write_checkpoint
from tests.tiny import random_texts


def edit_config(d: Path, **fields: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_a_bare_encoder_opens_with_its_sizes(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_checkpoint(tmp_path / "enc", num_layers=3, hidden=48, heads=6))
    assert ckpt.prefix == "" and ckpt.labels is None and not ckpt.has_classifier
    assert (ckpt.config.num_layers, ckpt.config.hidden_size, ckpt.config.num_heads) == (3, 48, 6)
    state = ckpt.encoder_state()
    assert "encoder.embeddings.word_embeddings.weight" in state
    assert "encoder.encoder.layer.2.output.LayerNorm.bias" in state
    assert not [k for k in state if k.endswith("position_ids") or "pooler" in k]


def test_a_classifier_opens_with_labels_in_id2label_order(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "cls", labels=("sports", "business", "tech"))
    ckpt = open_checkpoint(d)
    assert ckpt.prefix == "bert."
    assert ckpt.labels == ("sports", "business", "tech")
    assert set(ckpt.classifier_state()) == {
        "pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias",
    }  # fmt: skip
    edit_config(d, id2label=None)
    assert open_checkpoint(d).labels == ("LABEL_0", "LABEL_1", "LABEL_2")


def test_multi_exit_network_at_full_depth_is_the_original_classifier(tmp_path: Path) -> None:
    """The generic path: encoder and classifier from the directory, the classifier as a
    `cls` last exit, in fp32, against the reference written from the BERT equations."""
    d = write_checkpoint(tmp_path / "cls", num_layers=3, labels=("negative", "positive"))
    ckpt = open_checkpoint(d)
    assert ckpt.labels is not None
    base = artifact.directory_base(d, tmp_path / "model")
    cfg = MultiExitConfig(ckpt.config, ckpt.labels, max_seq_len=32, final_pooling="cls")
    net = MultiExitNetwork(cfg).eval()
    missing, unexpected = net.load_state_dict(artifact.load_base_state(base, cfg), strict=False)
    assert not unexpected and all(k.startswith(("heads.0.", "heads.1.")) for k in missing)
    texts = random_texts(40, seed=3)
    tok = TextTokenizer(d / "tokenizer.json", 32)
    ids, mask = pad_batch(tok.encode(texts))
    with torch.inference_mode():
        got = torch.softmax(net(ids, mask).logits[-1], -1)
    want = reference_probs(d, texts)
    # fp32, different summation order (batched, padded): about 1e-7 apart.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert 0.2 < float(want.argmax(-1).float().mean()) < 0.8  # the answers vary


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("multi_label", [False, True])
def test_every_family_at_full_depth_is_its_own_classifier(
    tmp_path: Path, family: str, multi_label: bool
) -> None:
    """DistilBERT's names and ReLU head, RoBERTa's and XLM-R's positions after the padding
    index and `out_proj` head, and a multi-label head's sigmoids: the multi-exit network's
    last exit computes what the family's own classifier computes, in fp32."""
    labels = ("toxic", "insult", "threat") if multi_label else ("negative", "positive")
    d = write_checkpoint(
        tmp_path / family, num_layers=3, labels=labels, family=family, multi_label=multi_label
    )
    ckpt = open_checkpoint(d)
    assert (ckpt.config.architecture, ckpt.multi_label, ckpt.labels) == (
        family,
        multi_label,
        labels,
    )
    cfg = MultiExitConfig(
        ckpt.config,
        labels,
        max_seq_len=32,
        final_pooling="cls",
        final_activation=ckpt.head_activation,
        output="sigmoid" if multi_label else "softmax",
    )
    net = MultiExitNetwork(cfg).eval()
    base = artifact.directory_base(d, tmp_path / "model")
    missing, unexpected = net.load_state_dict(artifact.load_base_state(base, cfg), strict=False)
    assert not unexpected and all(k.startswith(("heads.0.", "heads.1.")) for k in missing)
    texts = random_texts(40, seed=3)
    ids, mask = pad_batch(TextTokenizer(d / "tokenizer.json", 32).encode(texts))
    with torch.inference_mode():
        logits = net(ids, mask).logits[-1]
    got = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
    want = reference_probs(d, texts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    on = want >= 0.5
    assert 0.1 < float(on.float().mean()) < 0.9  # the answers vary


def test_roberta_positions_start_after_the_padding_index(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "r", family="roberta", max_positions=40)
    raw = load_file(str(d / "model.safetensors"))["embeddings.position_embeddings.weight"]
    ckpt = open_checkpoint(d)
    positions = ckpt.encoder_state()["encoder.embeddings.position_embeddings.weight"]
    assert raw.shape[0] == 41 and ckpt.config.max_position_embeddings == 40
    assert torch.equal(positions, raw[1:])  # pad_token_id 0: HF's position 1 is our 0


def test_a_multi_label_classifier_is_never_read_as_a_softmax(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "m", labels=("a", "b", "c"), multi_label=True)
    assert open_checkpoint(d).multi_label
    edit_config(d, problem_type="regression")
    with pytest.raises(CheckpointError, match=r"problem_type 'regression' is not served"):
        open_checkpoint(d)


def test_old_gamma_beta_layer_norm_names_load(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "enc")
    tensors = load_file(str(d / "model.safetensors"))
    old = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for k, v in tensors.items():
        for new_name, old_name in old.items():
            k = k.replace(new_name, old_name)
        renamed[k] = v
    save_file(renamed, str(d / "model.safetensors"))
    state = open_checkpoint(d).encoder_state()
    assert torch.equal(
        state["encoder.embeddings.LayerNorm.weight"], tensors["embeddings.LayerNorm.weight"]
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "funnel"}, r"config\.json: model_type 'funnel' is not supported"),
        ({"embedding_size": 16}, r"embedding_size 16 differs from hidden_size 32"),
        ({"model_type": "mpnet"}, r"model_type 'mpnet' is not supported"),
        ({"model_type": "deberta-v2"}, r"model_type 'deberta-v2' is not supported"),
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type 'relative_key'"),
        ({"hidden_act": "relu"}, r"hidden_act 'relu' is not supported"),
        ({"is_decoder": True}, r"is_decoder"),
        ({"num_hidden_layers": None}, r"config\.json: missing field 'num_hidden_layers'"),
        ({"hidden_size": 30}, r"hidden_size 30 is not divisible by num_heads 4"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(
    tmp_path: Path, fields: dict, message: str
) -> None:
    d = write_checkpoint(tmp_path / "c")
    edit_config(d, **fields)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(d)


def test_pickle_only_weights_are_refused_and_never_read(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "c")
    (d / "model.safetensors").unlink()
    # Not a real pickle: were it ever unpickled, this would fail differently.
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-pickle")
    with pytest.raises(CheckpointError, match=r"weights only in pytorch_model\.bin, a pickle"):
        open_checkpoint(d)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("tokenizer.json", r"no tokenizer\.json; save the fast tokenizer"),
        ("config.json", r"no config\.json"),
        ("model.safetensors", r"no model\.safetensors"),
    ],
)
def test_missing_files_are_named(tmp_path: Path, remove: str, message: str) -> None:
    d = write_checkpoint(tmp_path / "c")
    (d / remove).unlink()
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(d)


def test_weights_that_are_not_bert_are_refused(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "c")
    save_file({"roberta.embeddings.word_embeddings.weight": torch.zeros(4, 4)},
              str(d / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"no 'embeddings\.word_embeddings\.weight'"):
        open_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"not a safetensors file"):
        open_checkpoint(d)


def test_id2label_must_fit_the_classifier(tmp_path: Path) -> None:
    d = write_checkpoint(tmp_path / "c", labels=("a", "b"))
    edit_config(d, id2label={"0": "a", "1": "b", "2": "c"})
    with pytest.raises(
        CheckpointError, match=r"id2label has indices \[0, 1, 2\], the classifier has 2"
    ):
        open_checkpoint(d)
    edit_config(d, id2label={"0": "a", "1": "a"})
    with pytest.raises(CheckpointError, match=r"names a label twice"):
        open_checkpoint(d)


def test_a_base_by_path_resolves_from_the_model_directory_and_checks_sha256(
    tmp_path: Path,
) -> None:
    d = write_checkpoint(tmp_path / "ckpts" / "enc")
    base = artifact.directory_base(d, tmp_path / "models" / "m")
    assert base.path == "../../ckpts/enc"
    assert set(base.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert base.directory() == d.resolve()
    base.verify()
    round_trip = artifact.BaseWeights(**base.to_dict())
    assert round_trip.files == base.files and round_trip.root is None
    with (d / "tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(artifact.ArtifactError, match=r"sha256 mismatch for base file .*tokenizer"):
        base.verify()
    with pytest.raises(artifact.ArtifactError, match=r"either a package module or a path"):
        artifact.BaseWeights({}, package="p", module="m", path="x")
