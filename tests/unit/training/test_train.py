"""Training helpers: the joint exit loss, length-bucketed batches, config checks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from app.network import artifact
from app.network.tokenizer import TextTokenizer
from app.training.data import load_splits
from app.training.train import TrainConfig, joint_loss, length_batches, train
from tests.checkpoints import BAD, GOOD, write_checkpoint


def test_joint_loss_weights_deeper_exits_more() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(3, 8, 2), torch.randint(0, 2, (8,))
    ce = [F.cross_entropy(logits[i], y) for i in range(3)]
    expected = (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6
    torch.testing.assert_close(joint_loss(logits, y, 0.0, 2.0), expected)


def test_joint_loss_distillation_is_zero_when_exits_agree() -> None:
    torch.manual_seed(0)
    one = torch.randn(1, 8, 2)
    logits, y = one.expand(3, 8, 2).clone(), torch.randint(0, 2, (8,))
    plain = joint_loss(logits, y, 0.0, 2.0)
    torch.testing.assert_close(joint_loss(logits, y, 0.5, 2.0), 0.5 * plain)


def test_joint_loss_distillation_does_not_train_the_teacher() -> None:
    logits = torch.randn(3, 4, 2, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    distilled = joint_loss(logits, y, 0.5, 2.0) - 0.5 * joint_loss(logits, y, 0.0, 2.0)
    (grad,) = torch.autograd.grad(distilled, logits)
    assert float(grad[-1].abs().max()) == 0.0
    assert float(grad[0].abs().max()) > 0.0


def test_length_batches_cover_every_row_once_in_similar_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 128) for _ in range(1000)]
    batches = length_batches(lengths, 32, random.Random(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(1 <= len(b) <= 32 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread / len(batches) < 10  # random batches of 32 would span ~110


def test_length_batches_are_reproducible_from_the_rng() -> None:
    lengths = list(range(100))
    assert length_batches(lengths, 8, random.Random(5)) == length_batches(
        lengths, 8, random.Random(5)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 2, "qat_epochs": 3}, r"qat_epochs must be in 0\.\.2, got 3"),
        ({"qat_epochs": -1}, r"qat_epochs must be in 0\.\.3, got -1"),
        ({"distill": 1.0}, r"distill must be in \[0, 1\), got 1.0"),
    ],
)
def test_train_config_rejects_nonsense(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="d.csv", out=Path("out"), name="m", **kwargs)


def test_trained_embeddings_move_only_the_rows_the_data_touched(tmp_path: Path) -> None:
    """Fine-tuned embeddings take no weight decay, so a word no training text holds keeps
    the base's row, and the artifact stores the others alone."""
    base = write_checkpoint(tmp_path / "base", max_positions=40)
    data = tmp_path / "data.csv"  # a handful of the vocabulary's words
    rng = random.Random(0)
    texts = [rng.choices(GOOD[:3] + BAD[:3], k=rng.randint(1, 6)) for _ in range(120)]
    data.write_text("text,label\n" + "".join(
        f"{' '.join(t)},{'positive' if sum(w in GOOD for w in t) * 2 > len(t) else 'negative'}\n"
        for t in texts
    ))  # fmt: skip
    tc = TrainConfig(data=str(data), out=tmp_path / "model", name="m", epochs=1, qat_epochs=0,
                     batch_size=16, lr=1e-3, base=base, train_embeddings=True)  # fmt: skip
    record = train(tc)
    assert record["frozen"] == []

    tok = TextTokenizer(base / "tokenizer.json", 40)
    encoded = tok.encode([e.text for e in load_splits(str(data), seed=0).train])
    seen = {i for row in encoded for i in row}
    stored = load_file(str(tmp_path / "model" / "weights.safetensors"))
    rows = stored["rows/encoder.embeddings.word_embeddings.weight"].tolist()
    assert set(rows) == seen  # every word the data holds, and none other
    assert stored["rows/encoder.embeddings.position_embeddings.weight"].tolist() == list(
        range(max(map(len, encoded)))
    )
    assert "delta/encoder.embeddings.LayerNorm.weight" in stored

    base_words = artifact.load_base_state(artifact.directory_base(base, tmp_path / "model"))[
        "encoder.embeddings.word_embeddings.weight"
    ]
    loaded = artifact.load(tmp_path / "model").network.state_dict()
    words = loaded["encoder.embeddings.word_embeddings.weight"]
    unseen = [i for i in range(len(base_words)) if i not in seen]
    assert unseen and torch.equal(words[unseen], base_words[unseen])
    assert not torch.equal(words[rows], base_words[rows])
