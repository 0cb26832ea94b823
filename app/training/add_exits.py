"""Add exits to a fine-tuned BERT classifier without changing its final answers.

DeeBERT's recipe: the fine-tuned encoder and its own classifier stay frozen, and only
the intermediate exit heads are trained, by distillation from that classifier (so
unlabelled text is enough). The classifier itself is the last exit (a `cls` head: its
pooler, then its linear layer), so at full depth the model answers as it did before.

Because nothing under the heads is trained, each training text runs through the encoder
once, as it will be served, and every layer's mean-pooled state is kept; the heads then
train on those vectors in seconds.

It is served in fp32 by default (model.json `serving`, what `quantization: auto`
follows): only the classifier's own numerics keep every full-depth answer. int8 was not
trained for, and even where it changed no answer on the calibration split it changed
some on the test split (1 in 40 on a tiny model); how many int8 and int8a16 (16-bit
activations) change on the calibration split is recorded, for a user who chooses one
for its speed. int8 is stored with the channel smoothing (`app.network.smoothing`,
measured on training text) that changed fewest of those answers, none included.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.network import artifact, checkpoint, exit_rule, smoothing
from app.network.backends import make_backend
from app.network.backends.base import probabilities
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork, pad_batch
from app.network.quantize import INT8_MODES
from app.network.tokenizer import TextTokenizer
from app.training.data import load_splits
from app.training.evaluate import all_exit_probs

log = logging.getLogger(__name__)


@dataclass
class AddExitsConfig:
    classifier: Path
    data: str
    out: Path
    name: str
    version: str = "1"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 2.0
    max_seq_len: int = 128
    limit: int | None = None  # distil on at most this many training texts
    copy_base: bool = False  # copy the classifier's files into OUT/base (self-contained)
    # int8's channel smoothing: the strengths tried (none is always tried; empty: none),
    # and how many training texts its activation maxima are measured on.
    smoothing_alphas: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    smoothing_texts: int = 512

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _base(tc: AddExitsConfig) -> artifact.BaseWeights:
    if not tc.copy_base:
        return artifact.directory_base(tc.classifier, tc.out)
    src = checkpoint.open_checkpoint(tc.classifier).directory
    dst = tc.out / "base"
    dst.mkdir(parents=True, exist_ok=True)
    for name in checkpoint.FILES:
        shutil.copyfile(src / name, dst / name)
    return artifact.directory_base(dst, tc.out)


def build(tc: AddExitsConfig) -> tuple[MultiExitNetwork, artifact.BaseWeights]:
    """The multi-exit network: the classifier's encoder and classifier (last exit), with
    fresh heads after every other layer."""
    ckpt = checkpoint.open_checkpoint(tc.classifier)
    if ckpt.labels is None:
        raise checkpoint.CheckpointError(
            f"{ckpt.path(checkpoint.WEIGHTS_FILE)}: no classifier.weight, so no classifier"
            f" to keep; to fine-tune this encoder use `exitserve train --base {tc.classifier}`"
        )
    cfg = MultiExitConfig(
        encoder=ckpt.config,
        labels=ckpt.labels,
        max_seq_len=min(tc.max_seq_len, ckpt.config.max_position_embeddings),
        final_pooling="cls",
        final_activation=ckpt.head_activation,
        output="sigmoid" if ckpt.multi_label else "softmax",
    )
    base = _base(tc)
    net = MultiExitNetwork(cfg)
    missing, unexpected = net.load_state_dict(artifact.load_base_state(base, cfg), strict=False)
    new = {f"heads.{i}." for i in range(cfg.num_layers - 1)}
    if unexpected or any(not k.startswith(tuple(new)) for k in missing):
        raise checkpoint.CheckpointError(
            f"{tc.classifier}: weights do not fit: missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}"
        )
    net.requires_grad_(False)
    for head in net.heads[:-1]:
        head.requires_grad_(True)
    return net.eval(), base


def full_depth_answers(net: MultiExitNetwork, mode: str, ids: list[list[int]]) -> torch.Tensor:
    """The last exit's answers (N,) of `net` served in `mode` on the CPU (a copy)."""
    backend = make_backend(copy.deepcopy(net), "cpu", mode)
    return torch.as_tensor(exit_rule.answers(all_exit_probs(backend, ids)[-1], net.cfg.multi_label))


def choose_smoothing(
    net: MultiExitNetwork,
    sample: list[list[int]],
    ids: list[list[int]],
    original: torch.Tensor,
    alphas: tuple[float, ...],
) -> dict[str, Any]:
    """Set `net.int8_smoothing` to the channel smoothing (`app.network.smoothing`) whose
    int8 full-depth answers among `ids` change fewest of `original`, none included (which
    wins a tie, then the smaller alpha); activation maxima measured on `sample`.
    Returns the record: each alpha's changed answers and the one chosen."""
    net.int8_smoothing = {}
    changed = {"none": int((full_depth_answers(net, "int8", ids) != original).sum())}
    best: tuple[int, float | None, dict[str, torch.Tensor]] = (changed["none"], None, {})
    maxima = smoothing.channel_maxima(net, sample) if alphas else {}
    for alpha in alphas:
        net.int8_smoothing = smoothing.factors(net, maxima, alpha)
        n = int((full_depth_answers(net, "int8", ids) != original).sum())
        changed[str(alpha)] = n
        if n < best[0]:
            best = (n, alpha, net.int8_smoothing)
    net.int8_smoothing = best[2]
    return {
        "alpha": best[1],
        "texts_measured": len(sample),
        "full_depth_answers_changed_by_alpha": changed,
    }


def serving(
    net: MultiExitNetwork,
    ids: list[list[int]],
    sample: list[list[int]],
    alphas: tuple[float, ...],
) -> dict[str, Any]:
    """fp32 on the CPU, with the full-depth answers each int8 mode would change among `ids`
    (`quantization: int8` or `int8a16` serves the model so when asked); int8 with the
    channel smoothing that changes fewest, which it sets on `net`."""
    original = full_depth_answers(net, "none", ids)
    out: dict[str, Any] = {
        "cpu": "none",
        "why": "fp32 keeps the classifier's own full-depth answers; int8 changes some",
    }
    chosen = choose_smoothing(net, sample, ids, original, alphas)
    counts = chosen["full_depth_answers_changed_by_alpha"]
    for mode in INT8_MODES:
        if mode == "int8":  # measured while the smoothing was chosen
            changed = counts["none" if chosen["alpha"] is None else str(chosen["alpha"])]
        else:
            changed = int((full_depth_answers(net, mode, ids) != original).sum())
        out[mode] = {
            "split": "calibration",
            "n": len(ids),
            "full_depth_answers_changed": changed,
            **({"smoothing": chosen} if mode == "int8" else {}),
        }
    return out


def features(net: MultiExitNetwork, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every text through the network once: the mean-pooled state after each
    layer but the last (L-1, N, H), and the classifier's logits (N, C)."""
    L, H = net.num_layers, net.cfg.encoder.hidden_size
    pooled = torch.zeros(L - 1, len(ids), H)
    teacher = torch.zeros(len(ids), len(net.cfg.labels))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.inference_mode():
        for s in range(0, len(order), 32):
            idx = order[s : s + 32]
            x, mask = pad_batch([ids[i] for i in idx])
            bias = net.attention_bias(mask)
            h = net.embed(x)
            for i in range(L):
                h = net.layer(i, h, bias)
                if i < L - 1:
                    pooled[i, idx] = net.head(i).pool(h, mask).float()
            teacher[idx] = net.exit_logits(L - 1, h, mask).float()
    return pooled, teacher


def answers(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """`exit_rule.answers` on logits (N, C), scored as served: the label, or the
    on-labels as bits."""
    scores = probabilities(logits.detach(), multi_label).numpy()
    return torch.from_numpy(exit_rule.answers(scores, multi_label))


def distil(
    net: MultiExitNetwork, pooled: torch.Tensor, teacher: torch.Tensor, tc: AddExitsConfig
) -> list[dict[str, Any]]:
    """Train the intermediate heads towards the classifier's softened answers."""
    torch.manual_seed(tc.seed)
    heads = [net.head(i) for i in range(net.num_layers - 1)]
    opt = torch.optim.AdamW(
        [p for head in heads for p in head.parameters()], lr=tc.lr, weight_decay=0.01
    )
    T, multi = tc.temperature, net.cfg.multi_label
    # A softmax model's heads match its softened distribution (KL); a multi-label
    # model's, each label's softened sigmoid (binary cross-entropy per label).
    target = torch.sigmoid(teacher / T) if multi else F.softmax(teacher / T, -1)  # (N, C)
    agreed = answers(teacher, multi)

    def loss_of(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
        if multi:
            return F.binary_cross_entropy_with_logits(logits / T, target[idx])
        return F.kl_div(F.log_softmax(logits / T, -1), target[idx], reduction="batchmean")

    rng = random.Random(tc.seed)
    order = list(range(pooled.shape[1]))
    history: list[dict[str, Any]] = []
    for head in heads:
        head.train()
    for epoch in range(tc.epochs):
        rng.shuffle(order)
        total = 0.0
        for s in range(0, len(order), tc.batch_size):
            idx = order[s : s + tc.batch_size]
            loss = torch.stack(
                [loss_of(head.classify(pooled[i, idx]), idx) for i, head in enumerate(heads)]
            ).sum()
            opt.zero_grad(set_to_none=True)
            (loss * T * T).backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if epoch == tc.epochs - 1 or epoch % 10 == 0:
            loss_name = "bce" if multi else "kl"
            history.append({"epoch": epoch + 1, loss_name: round(total / len(order), 4)})
    for head in heads:
        head.eval()
    with torch.inference_mode():
        history[-1]["train_agreement_with_classifier"] = [
            round(float((answers(head.classify(pooled[i]), multi) == agreed).float().mean()), 4)
            for i, head in enumerate(heads)
        ]
    return history


def add_exits(tc: AddExitsConfig) -> dict[str, Any]:
    """Write an uncalibrated multi-exit model to `tc.out`; returns the training record."""
    started = time.perf_counter()
    tc.out.mkdir(parents=True, exist_ok=True)
    net, base = build(tc)
    cfg = net.cfg
    splits = load_splits(tc.data, seed=tc.seed, labels=cfg.labels, require_labels=False)
    tok = TextTokenizer(base.path_of(checkpoint.TOKENIZER_FILE), cfg.max_seq_len)
    train_set = splits.train[: tc.limit] if tc.limit else splits.train
    train_ids = tok.encode([e.text for e in train_set])
    pooled, teacher = features(net, train_ids)
    history = distil(net, pooled, teacher, tc)
    calibration_ids = tok.encode([e.text for e in splits.calibration])
    sample = train_ids[: tc.smoothing_texts]
    chosen = serving(net, calibration_ids, sample, tc.smoothing_alphas)
    log.info("int8 would change %s; int8a16 %s", chosen["int8"], chosen["int8a16"])
    record = {
        "method": "add-exits: the classifier's encoder and classifier frozen; heads after"
        " layers 1..L-1 distilled from the classifier on the training split",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(tc).items()},
        "data": splits.summary(),
        "base": base.where,
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
        "torch_version": torch.__version__,
        "frozen": ["encoder", f"heads.{cfg.num_layers - 1} (the classifier)"],
    }
    spec = artifact.ModelSpec(
        name=tc.name,
        version=tc.version,
        config=cfg,
        thresholds=[1.0] * (cfg.num_layers - 1) + [0.0],
        base=base,
        training=record,
        serving=chosen,
    )
    artifact.save(tc.out, spec, net)
    return record
