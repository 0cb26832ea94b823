"""BERT-family checkpoints in the standard directory layout, read without pickle.

A directory as every hub export has it:
  config.json        the architecture (`model_type: bert`, sizes, `id2label`)
  model.safetensors  the weights, either a bare encoder (`embeddings.*`, `encoder.*`,
                     `pooler.*`) or a sequence classifier (`bert.` before those names,
                     plus `classifier.weight` and `classifier.bias`)
  tokenizer.json     the fast tokenizer (the `tokenizers` package's format)
What the plain-PyTorch encoder cannot reproduce exactly is refused with the file and
the field that says so: other position schemes (RoBERTa, MPNet, DeBERTa), other
activations, pickle-only weights, a missing tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.network.encoder import EncoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
PICKLE_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
# The config fields the encoder is built from: (HF name, EncoderConfig name).
SIZE_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
    ("intermediate_size", "intermediate_size"),
    ("max_position_embeddings", "max_position_embeddings"),
)
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


class CheckpointError(ValueError):
    """The directory is not a BERT checkpoint this encoder can reproduce exactly."""


def encoder_config(cfg: dict[str, Any], where: str = CONFIG_FILE) -> EncoderConfig:
    """The encoder described by a `config.json` dict; refuses what it cannot reproduce."""
    model_type = cfg.get("model_type", "bert")
    if model_type != "bert":
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; exitserve runs the BERT"
            " architecture (absolute positions, post-LayerNorm, GELU): BERT, MiniLM,"
            " BGE/E5-style BERT checkpoints"
        )
    positions = cfg.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise CheckpointError(
            f"{where}: position_embedding_type {positions!r} is not supported, only 'absolute'"
        )
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported, only 'gelu'")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise CheckpointError(f"{where}: is_decoder/add_cross_attention: only encoders are served")
    missing = [name for name, _ in SIZE_FIELDS if name not in cfg]
    if missing:
        raise CheckpointError(f"{where}: missing field {missing[0]!r}")
    try:
        return EncoderConfig(
            **{ours: int(cfg[theirs]) for theirs, ours in SIZE_FIELDS},
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint directory: its encoder, and its classifier if it has one."""

    directory: Path
    config: EncoderConfig
    prefix: str  # "bert." for a sequence classifier's weights, "" for a bare encoder
    labels: tuple[str, ...] | None  # from id2label, when the weights hold a classifier

    @property
    def has_classifier(self) -> bool:
        return self.labels is not None

    def path(self, name: str) -> Path:
        return self.directory / name

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """Embeddings and layers under the multi-exit network's names (`encoder.*`), fp32."""
        out = {}
        with safe_open(str(self.path(WEIGHTS_FILE)), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _modern(key.removeprefix(self.prefix))
                if name.startswith(("embeddings.", "encoder.")) and not name.endswith("_ids"):
                    out[f"encoder.{name}"] = f.get_tensor(key).float()
        return out

    def classifier_state(self) -> dict[str, torch.Tensor]:
        """The pooler and classifier: `pooler.dense.*` and `classifier.*`, fp32."""
        if not self.has_classifier:
            raise CheckpointError(f"{self.path(WEIGHTS_FILE)}: holds no classifier")
        return self.pooler_state() | self.read(CLASSIFIER_KEYS)

    def pooler_state(self) -> dict[str, torch.Tensor]:
        """`pooler.dense.*`, fp32 (a bare encoder checkpoint often has one too)."""
        return self.read([self.prefix + k for k in POOLER_KEYS], strip=self.prefix)

    def read(self, keys: Sequence[str], strip: str = "") -> dict[str, torch.Tensor]:
        """The named tensors in fp32, under their names less `strip`."""
        with safe_open(str(self.path(WEIGHTS_FILE)), framework="pt") as f:
            present = set(f.keys())
            absent = [k for k in keys if k not in present]
            if absent:
                raise CheckpointError(f"{self.path(WEIGHTS_FILE)}: no tensor {absent[0]!r}")
            return {k.removeprefix(strip): f.get_tensor(k).float() for k in keys}


def _modern(name: str) -> str:
    """Old TensorFlow-converted checkpoints name LayerNorm parameters gamma and beta."""
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )


def open_checkpoint(directory: Path | str) -> Checkpoint:
    """Check a checkpoint directory's files, config and weight names; read no tensors."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such directory")
    if not d.joinpath(CONFIG_FILE).is_file():
        raise CheckpointError(f"{d}: no {CONFIG_FILE}")
    if not d.joinpath(WEIGHTS_FILE).is_file():
        pickled = [n for n in PICKLE_WEIGHTS if d.joinpath(n).exists()]
        if pickled:
            raise CheckpointError(
                f"{d}: weights only in {pickled[0]}, a pickle-based format exitserve never"
                f" loads; save them as {WEIGHTS_FILE} (transformers: save_pretrained with"
                " safe_serialization=True)"
            )
        if d.joinpath(WEIGHTS_FILE + ".index.json").exists():
            raise CheckpointError(
                f"{d}: sharded weights are not supported; save one {WEIGHTS_FILE}"
            )
        raise CheckpointError(f"{d}: no {WEIGHTS_FILE}")
    if not d.joinpath(TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{d}: no {TOKENIZER_FILE}; save the fast tokenizer with the model"
            " (transformers: AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
        )
    where = str(d / CONFIG_FILE)
    try:
        raw = json.loads(d.joinpath(CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: must hold a JSON object")
    cfg = encoder_config(raw, where)
    try:
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{d / WEIGHTS_FILE}: not a safetensors file ({e})") from e
    prefix = next(
        (p for p in ("bert.", "") if p + "embeddings.word_embeddings.weight" in keys), None
    )
    if prefix is None:
        raise CheckpointError(
            f"{d / WEIGHTS_FILE}: no 'embeddings.word_embeddings.weight' (nor under 'bert.');"
            " not BERT weights"
        )
    labels = None
    if all(k in keys for k in CLASSIFIER_KEYS):
        if not all(prefix + k in keys for k in POOLER_KEYS):
            raise CheckpointError(f"{d / WEIGHTS_FILE}: a classifier without {prefix}pooler.dense")
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            num_labels = f.get_slice("classifier.weight").get_shape()[0]
        labels = _labels(raw, num_labels, where)
    return Checkpoint(d, cfg, prefix, labels)


def _labels(raw: dict[str, Any], num_labels: int, where: str) -> tuple[str, ...]:
    """Class names by index from `id2label`; LABEL_i where the config names none."""
    id2label = raw.get("id2label") or {}
    try:
        names = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError) as e:
        raise CheckpointError(f"{where}: id2label must map indices to names") from e
    if names and sorted(names) != list(range(num_labels)):
        raise CheckpointError(
            f"{where}: id2label has indices {sorted(names)}, the classifier has {num_labels} rows"
        )
    labels = tuple(names.get(i, f"LABEL_{i}") for i in range(num_labels))
    if len(set(labels)) != len(labels):
        raise CheckpointError(f"{where}: id2label names a label twice: {list(labels)}")
    return labels


def save_classifier(
    directory: Path | str,
    config: EncoderConfig,
    encoder_state: dict[str, torch.Tensor],
    classifier_state: dict[str, torch.Tensor],
    labels: tuple[str, ...],
    tokenizer_file: Path,
) -> Path:
    """Write a sequence classifier in the standard layout (`BertForSequenceClassification`
    names and config), as a hub export would have it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {
        "bert." + k.removeprefix("encoder."): v.detach().float().contiguous()
        for k, v in encoder_state.items()
    }
    for k, v in classifier_state.items():
        name = k if k.startswith("classifier.") else "bert." + k
        tensors[name] = v.detach().float().contiguous()
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        **{theirs: getattr(config, ours) for theirs, ours in SIZE_FIELDS},
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    (d / TOKENIZER_FILE).write_bytes(Path(tokenizer_file).read_bytes())
    return d
