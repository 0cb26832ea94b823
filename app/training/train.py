"""Fine-tune the pretrained encoder with an exit head after every layer.

Joint loss over all exits, weighted by depth (deeper exits carry more weight so the
final exit keeps full-model accuracy), optional self-distillation of the early exits
from the last one (FastBERT), and optional int8 fake-quantization in the last epochs
so the served int8 model agrees with the fp32 one. The embeddings stay frozen unless
`train_embeddings`; trained, they take no weight decay, so the rows of words the data
never shows keep the base's values and the artifact stores only the rows that moved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.network import artifact
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork, pad_batch
from app.network.quantize import fake_int8
from app.network.tokenizer import TextTokenizer
from app.training.data import load_splits

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: Path
    name: str
    version: str = "1"
    seed: int = 0
    epochs: int = 3
    qat_epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    max_seq_len: int = 128
    distill: float = 0.0
    distill_temperature: float = 2.0
    limit: int | None = None  # use at most this many training examples (tests, trials)
    base: Path | None = None  # a BERT checkpoint directory; None: the MiniLM-L6 package
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.qat_epochs <= self.epochs:
            raise ValueError(f"qat_epochs must be in 0..{self.epochs}, got {self.qat_epochs}")
        if not 0.0 <= self.distill < 1.0:
            raise ValueError(f"distill must be in [0, 1), got {self.distill}")


def joint_loss(
    logits: torch.Tensor, y: torch.Tensor, distill: float, temperature: float
) -> torch.Tensor:
    """Depth-weighted cross-entropy over exits, plus distillation from the last exit.

    logits (L, B, C), y (B,).
    """
    L = logits.shape[0]
    ce = torch.stack([F.cross_entropy(logits[i], y) for i in range(L)])  # (L,)
    w = torch.arange(1, L + 1, dtype=ce.dtype, device=ce.device)
    loss = (w * ce).sum() / w.sum()
    if distill > 0 and L > 1:
        teacher = F.softmax(logits[-1].detach() / temperature, dim=-1)  # (B, C)
        kl = torch.stack(
            [
                F.kl_div(F.log_softmax(logits[i] / temperature, -1), teacher, reduction="batchmean")
                for i in range(L - 1)
            ]
        )
        loss = (1 - distill) * loss + distill * kl.mean() * temperature**2
    return loss


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length, so little compute goes to padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s : s + pool], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train(tc: TrainConfig) -> dict[str, Any]:
    """Train and write an uncalibrated artifact to `tc.out`; returns the training record."""
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    splits = load_splits(tc.data, seed=tc.seed)
    base = artifact.directory_base(tc.base, tc.out) if tc.base else artifact.minilm_base()
    encoder = artifact.load_base_encoder_config(base)
    if tc.max_seq_len > encoder.max_position_embeddings:
        log.info("max_seq_len %d capped at the encoder's %d positions", tc.max_seq_len,
                 encoder.max_position_embeddings)  # fmt: skip
    cfg = MultiExitConfig(
        encoder=encoder,
        labels=splits.labels,
        max_seq_len=min(tc.max_seq_len, encoder.max_position_embeddings),
    )
    net = MultiExitNetwork(cfg)
    missing, unexpected = net.load_state_dict(artifact.load_base_state(base), strict=False)
    if unexpected or any(not k.startswith("heads.") for k in missing):
        raise RuntimeError(f"base weights do not fit: missing {missing}, unexpected {unexpected}")
    embeddings = list(net.encoder.embeddings.parameters())
    if not tc.train_embeddings:
        for p in embeddings:
            p.requires_grad_(False)

    tok = TextTokenizer(base.path_of("tokenizer.json"), cfg.max_seq_len)
    train_set = splits.train[: tc.limit] if tc.limit else splits.train
    ids = tok.encode([e.text for e in train_set])
    label_index = {name: i for i, name in enumerate(cfg.labels)}
    y_all = torch.tensor([label_index[e.label] for e in train_set])

    layer_params = list(net.encoder.encoder.parameters())
    groups: list[dict[str, Any]] = [
        {"params": layer_params, "lr": tc.lr},
        {"params": list(net.heads.parameters()), "lr": tc.head_lr},
    ]
    if tc.train_embeddings:
        # No decay: a row no batch touches keeps zero moments, so it never moves.
        groups.append({"params": embeddings, "lr": tc.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(ids) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    warm = max(1, int(total * tc.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )

    net.train()
    started = time.perf_counter()
    seen = 0
    history = []
    for epoch in range(tc.epochs):
        qat = epoch >= tc.epochs - tc.qat_epochs
        batches = length_batches([len(r) for r in ids], tc.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{tc.epochs}{' int8-aware' if qat else ''}")
        running = 0.0
        with fake_int8(net) if qat else contextlib.nullcontext():
            for step, batch in enumerate(bar):
                input_ids, mask = pad_batch([ids[i] for i in batch])
                out = net(input_ids, mask)
                loss = joint_loss(out.logits, y_all[batch], tc.distill, tc.distill_temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
                seen += len(batch)
                running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
                rate = seen / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{running:.3f}", samples_per_s=f"{rate:.0f}")
        history.append({"epoch": epoch + 1, "int8_aware": qat, "loss": round(running, 4)})
    net.eval()
    elapsed = time.perf_counter() - started

    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(tc).items()},
        "data": splits.summary(),
        "base": base.package or base.where,
        "history": history,
        "seconds": round(elapsed, 1),
        "samples_per_second": round(seen / elapsed, 1),
        "torch_version": torch.__version__,
        "frozen": [] if tc.train_embeddings else ["encoder.embeddings"],
    }
    spec = artifact.ModelSpec(
        name=tc.name,
        version=tc.version,
        config=cfg,
        # Uncalibrated: every input runs to the last exit until `calibrate` sets these.
        thresholds=[1.0] * (cfg.num_layers - 1) + [0.0],
        base=base,
        training=record,
    )
    artifact.save(tc.out, spec, net)
    return record
