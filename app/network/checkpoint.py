"""Encoder classifiers in the standard directory layout, read without pickle.

A directory as every hub export has it:
  config.json        the architecture (`model_type`, sizes, `id2label`, `problem_type`)
  model.safetensors  the weights, either a bare encoder or a sequence classifier (the
                     encoder under the family's prefix, plus its classification head)
  tokenizer.json     the fast tokenizer (the `tokenizers` package's format)

Four families share one post-LayerNorm encoder and differ only in names and in three
details, so each is read into the BERT layout the network runs (a `Family` below):
  bert         `bert.` prefix; head: pooler (dense, tanh) then `classifier`
  distilbert   `distilbert.` prefix, its own layer names (`q_lin`, `ffn.lin1`, ...), no
               token types (a zero row is added: adding it changes no bit); head:
               `pre_classifier`, ReLU, `classifier`
  roberta,     `roberta.` prefix; positions start after the padding index (HF counts them
  xlm-roberta  from pad_token_id + 1), so the position table is read from that row on and
               position 0 of the network is the checkpoint's row pad_token_id + 1; head:
               `classifier.dense`, tanh, `classifier.out_proj`
  electra      a discriminator whose embeddings are as wide as its hidden states (no
               `embeddings_project`), `electra.` prefix, BERT's names; head:
               `classifier.dense`, GELU, `classifier.out_proj`
Every head reads the first token's state, so each is an `ExitHead` with `cls` pooling
and the family's activation. What the encoder cannot reproduce exactly is refused with
the file and the field that says so: other position schemes (MPNet, DeBERTa), other
activations, pickle-only weights, a missing tokenizer.

A multi-label classifier (`problem_type: multi_label_classification`) is read as such:
its labels are scored with a sigmoid each, never a softmax.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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
BERT_SIZES = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
    ("intermediate_size", "intermediate_size"),
    ("max_position_embeddings", "max_position_embeddings"),
)
MULTI_LABEL = "multi_label_classification"


def _distilbert_name(name: str) -> str:
    """DistilBERT's parameter names as BERT's (`transformer.layer.3.ffn.lin1` ->
    `encoder.layer.3.intermediate.dense`)."""
    if name.startswith("transformer."):
        name = "encoder." + name.removeprefix("transformer.")
    for theirs, ours in (
        (".attention.q_lin.", ".attention.self.query."),
        (".attention.k_lin.", ".attention.self.key."),
        (".attention.v_lin.", ".attention.self.value."),
        (".attention.out_lin.", ".attention.output.dense."),
        (".sa_layer_norm.", ".attention.output.LayerNorm."),
        (".ffn.lin1.", ".intermediate.dense."),
        (".ffn.lin2.", ".output.dense."),
        (".output_layer_norm.", ".output.LayerNorm."),
    ):
        name = name.replace(theirs, ours)
    return name


@dataclass(frozen=True)
class Family:
    """How one architecture's checkpoint reads into the BERT layout."""

    model_type: str
    prefix: str  # a sequence classifier's encoder prefix
    sizes: tuple[tuple[str, str], ...]  # (config field, EncoderConfig field)
    activation_field: str
    head: tuple[str, str]  # the head's dense and output linears (weights' names, no suffix)
    head_activation: str  # "tanh" or "relu"
    rename: Callable[[str], str] = lambda name: name
    token_types: bool = True  # False: none in the checkpoint, a zero row is used
    positions_after_padding: bool = False  # RoBERTa's positions: pad_token_id + 1 + t
    fixed_layer_norm_eps: float | None = None

    def position_offset(self, pad_token_id: int) -> int:
        return pad_token_id + 1 if self.positions_after_padding else 0


_ROBERTA = {
    "prefix": "roberta.",
    "sizes": BERT_SIZES,
    "activation_field": "hidden_act",
    "head": ("classifier.dense", "classifier.out_proj"),
    "head_activation": "tanh",
    "positions_after_padding": True,
}
FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "bert", "bert.", BERT_SIZES, "hidden_act", ("bert.pooler.dense", "classifier"), "tanh"
        ),
        Family(
            "distilbert",
            "distilbert.",
            (
                ("vocab_size", "vocab_size"),
                ("dim", "hidden_size"),
                ("n_layers", "num_layers"),
                ("n_heads", "num_heads"),
                ("hidden_dim", "intermediate_size"),
                ("max_position_embeddings", "max_position_embeddings"),
            ),
            "activation",
            ("pre_classifier", "classifier"),
            "relu",
            rename=_distilbert_name,
            token_types=False,
            fixed_layer_norm_eps=1e-12,  # DistilBERT's LayerNorms are built with it
        ),
        Family("roberta", **_ROBERTA),  # type: ignore[arg-type]
        Family("xlm-roberta", **_ROBERTA),  # type: ignore[arg-type]
        Family(
            "electra",
            "electra.",
            BERT_SIZES,
            "hidden_act",
            ("classifier.dense", "classifier.out_proj"),
            "gelu",
        ),
    )
}
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


class CheckpointError(ValueError):
    """The directory is not a checkpoint this encoder can reproduce exactly."""


def family_of(cfg: dict[str, Any], where: str = CONFIG_FILE) -> Family:
    model_type = cfg.get("model_type", "bert")
    family = FAMILIES.get(model_type)
    if family is None:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; exitserve runs post-LayerNorm"
            f" encoders with absolute positions and GELU: {', '.join(FAMILIES)}"
        )
    return family


def encoder_config(cfg: dict[str, Any], where: str = CONFIG_FILE) -> EncoderConfig:
    """The encoder described by a `config.json` dict; refuses what it cannot reproduce."""
    family = family_of(cfg, where)
    positions = cfg.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise CheckpointError(
            f"{where}: position_embedding_type {positions!r} is not supported, only 'absolute'"
        )
    act = cfg.get(family.activation_field, "gelu")
    if act != "gelu":
        raise CheckpointError(
            f"{where}: {family.activation_field} {act!r} is not supported, only 'gelu'"
        )
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise CheckpointError(f"{where}: is_decoder/add_cross_attention: only encoders are served")
    missing = [name for name, _ in family.sizes if name not in cfg]
    if missing:
        raise CheckpointError(f"{where}: missing field {missing[0]!r}")
    if cfg.get("embedding_size", cfg.get("hidden_size")) != cfg.get("hidden_size"):
        raise CheckpointError(
            f"{where}: embedding_size {cfg['embedding_size']} differs from hidden_size"
            f" {cfg['hidden_size']}: the projection between them (ELECTRA-small's"
            " embeddings_project) is not supported"
        )
    try:
        sizes = {ours: int(cfg[theirs]) for theirs, ours in family.sizes}
        pad = int(cfg.get("pad_token_id") or 0)
        offset = family.position_offset(pad)
        if sizes["max_position_embeddings"] - offset < 2:
            raise ValueError(f"max_position_embeddings leaves under 2 positions after {offset}")
        return EncoderConfig(
            **sizes | {"max_position_embeddings": sizes["max_position_embeddings"] - offset},
            type_vocab_size=int(cfg.get("type_vocab_size", 2)) if family.token_types else 1,
            layer_norm_eps=family.fixed_layer_norm_eps or float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=pad,
            architecture=family.model_type,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint directory: its encoder, and its classifier if it has one."""

    directory: Path
    config: EncoderConfig
    prefix: str  # the family's prefix for a sequence classifier's weights, "" for a bare encoder
    labels: tuple[str, ...] | None  # from id2label, when the weights hold a classifier
    family: Family = FAMILIES["bert"]
    multi_label: bool = False  # problem_type multi_label_classification: a sigmoid per label

    @property
    def has_classifier(self) -> bool:
        return self.labels is not None

    @property
    def head_activation(self) -> str:
        return self.family.head_activation

    def path(self, name: str) -> Path:
        return self.directory / name

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """Embeddings and layers under the multi-exit network's names (`encoder.*`), fp32."""
        out = {}
        with safe_open(str(self.path(WEIGHTS_FILE)), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _modern(self.family.rename(key.removeprefix(self.prefix)))
                if name.startswith(("embeddings.", "encoder.")) and not name.endswith("_ids"):
                    out[f"encoder.{name}"] = f.get_tensor(key).float()
        positions = "encoder.embeddings.position_embeddings.weight"
        offset = self.family.position_offset(self.config.pad_token_id)
        if positions in out and offset:
            out[positions] = out[positions][offset:].contiguous()
        if not self.family.token_types:
            out["encoder.embeddings.token_type_embeddings.weight"] = torch.zeros(
                1, self.config.hidden_size
            )
        return out

    def classifier_state(self) -> dict[str, torch.Tensor]:
        """The classification head as a `cls` exit head's tensors, named as BERT's:
        `pooler.dense.*` (its first linear) and `classifier.*` (its output), fp32."""
        if not self.has_classifier:
            raise CheckpointError(f"{self.path(WEIGHTS_FILE)}: holds no classifier")
        dense, out = self.family.head
        keys = [f"{dense}.weight", f"{dense}.bias", f"{out}.weight", f"{out}.bias"]
        tensors = self.read(keys)
        return dict(zip((*POOLER_KEYS, "classifier.weight", "classifier.bias"),
                        (tensors[k] for k in keys), strict=True))  # fmt: skip

    def pooler_state(self) -> dict[str, torch.Tensor]:
        """BERT's `pooler.dense.*`, fp32 (a bare encoder checkpoint often has one too)."""
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
    family = family_of(raw, where)
    try:
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{d / WEIGHTS_FILE}: not a safetensors file ({e})") from e
    prefix = next(
        (p for p in (family.prefix, "") if p + "embeddings.word_embeddings.weight" in keys), None
    )
    if prefix is None:
        raise CheckpointError(
            f"{d / WEIGHTS_FILE}: no 'embeddings.word_embeddings.weight' (nor under"
            f" {family.prefix!r}); not {family.model_type} weights"
        )
    labels = None
    dense, out = family.head
    if all(f"{out}.{p}" in keys for p in ("weight", "bias")):
        if not all(f"{dense}.{p}" in keys for p in ("weight", "bias")):
            raise CheckpointError(f"{d / WEIGHTS_FILE}: a classifier without {dense}")
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
            num_labels = f.get_slice(f"{out}.weight").get_shape()[0]
        labels = _labels(raw, num_labels, where)
    problem = raw.get("problem_type")
    if problem not in (None, "single_label_classification", MULTI_LABEL):
        raise CheckpointError(
            f"{where}: problem_type {problem!r} is not served; exitserve serves"
            f" single_label_classification and {MULTI_LABEL}"
        )
    if labels is not None and len(labels) < 2 and problem != MULTI_LABEL:
        raise CheckpointError(f"{where}: a classifier of one label is a regression head")
    return Checkpoint(d, cfg, prefix, labels, family, problem == MULTI_LABEL)


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
        **{theirs: getattr(config, ours) for theirs, ours in BERT_SIZES},
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    (d / TOKENIZER_FILE).write_bytes(Path(tokenizer_file).read_bytes())
    return d
