"""Base tensors stored as the rows that moved: a fine-tuned vocabulary keeps most of the
base's rows, so the artifact holds only the others, and refuses rows that do not fit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.network import artifact
from app.network.artifact import ArtifactError
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork
from tests.checkpoints import write_checkpoint

WORDS = "encoder.embeddings.word_embeddings.weight"
POSITIONS = "encoder.embeddings.position_embeddings.weight"
QUERY = "encoder.encoder.layer.0.attention.self.query.weight"
UNTOUCHED = "encoder.encoder.layer.1.attention.self.query.weight"


def saved(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, MultiExitNetwork]:
    """An artifact over a tiny checkpoint whose network moved three vocabulary rows, the
    first five positions and a whole layer weight, and kept the rest of the base."""
    base = artifact.directory_base(write_checkpoint(tmp_path / "base"), tmp_path / "model")
    cfg = MultiExitConfig(
        encoder=artifact.load_base_encoder_config(base), labels=("a", "b"), max_seq_len=16
    )
    torch.manual_seed(0)
    net = MultiExitNetwork(cfg).eval()
    net.load_state_dict(artifact.load_base_state(base), strict=False)
    with torch.no_grad():
        state = net.state_dict()
        state[WORDS][[3, 7, 11]] += 0.01 * torch.randn(3, state[WORDS].shape[1])
        state[POSITIONS][:5] -= 0.02
        state[QUERY] += 0.001
    spec = artifact.ModelSpec(name="model", version="1", config=cfg, thresholds=[1.0, 0.0],
                              base=base)  # fmt: skip
    artifact.save(tmp_path / "model", spec, net, dtype=dtype)
    return tmp_path / "model", net


def test_moved_rows_alone_are_stored_and_load_back_bit_for_bit(tmp_path: Path) -> None:
    model_dir, net = saved(tmp_path)
    stored = load_file(str(model_dir / "weights.safetensors"))
    assert stored[f"rows/{WORDS}"].tolist() == [3, 7, 11]
    assert stored[f"rowdelta/{WORDS}"].shape == (3, 32)
    assert stored[f"rows/{POSITIONS}"].tolist() == [0, 1, 2, 3, 4]
    assert f"delta/{QUERY}" in stored and f"rows/{QUERY}" not in stored  # every row moved
    assert not [k for k in stored if k.endswith(UNTOUCHED) or k.endswith(f"{WORDS}.bias")]
    loaded = artifact.load(model_dir).network.state_dict()
    for name, t in net.state_dict().items():
        assert torch.equal(loaded[name], t), name


def test_fp16_rows_are_close_and_unmoved_rows_are_the_base(tmp_path: Path) -> None:
    model_dir, net = saved(tmp_path, torch.float16)
    loaded = artifact.load(model_dir).network.state_dict()[WORDS]
    want = net.state_dict()[WORDS]
    others = [i for i in range(want.shape[0]) if i not in (3, 7, 11)]
    assert torch.equal(loaded[others], want[others])
    torch.testing.assert_close(loaded, want, rtol=0, atol=1e-5)  # fp16 deltas of ~0.01


def rewrite(model_dir: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the stored tensors and re-sign them, so that only the change is refused."""
    weights = model_dir / "weights.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    spec = json.loads((model_dir / "model.json").read_text())
    spec["files"]["weights.safetensors"] = artifact.sha256_file(weights)
    (model_dir / "model.json").write_text(json.dumps(spec))


def put(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({key: value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(f"rowdelta/{WORDS}"), rf"rowdelta/{WORDS} is missing"),
        (lambda t: t.pop(f"rows/{WORDS}"), rf"rows/{WORDS} is missing"),
        (put(f"rows/{WORDS}", torch.tensor([3, 7, 10_000])), r"within 0\.\.\d+"),
        (put(f"rows/{WORDS}", torch.tensor([3, 3, 11])), r"must ascend, without repeats"),
        (put(f"rows/{WORDS}", torch.tensor([11, 7, 3])), r"must ascend"),
        (put(f"rows/{WORDS}", torch.tensor([-1, 7, 11])), r"within 0\.\."),
        (put(f"rows/{WORDS}", torch.tensor([3.0, 7.0, 11.0])), r"one int64 index per row"),
        (put(f"rowdelta/{WORDS}", torch.zeros(3, 31)), r"has shape \(3, 31\), expected \(3, 32\)"),
        (put(f"rowdelta/{WORDS}", torch.zeros(2, 32)), r"has shape \(2, 32\), expected \(3, 32\)"),
        (put(f"delta/{WORDS}", torch.zeros(242, 32)), rf"{WORDS} is stored both whole and as rows"),
        (
            put(f"delta/{QUERY}", torch.zeros(32, 31)),
            r"has shape \(32, 31\), the base's is \(32, 32\)",
        ),
        (
            lambda t: t.update(
                {
                    "rows/encoder.extra.weight": torch.tensor([0]),
                    "rowdelta/encoder.extra.weight": torch.zeros(1, 32),
                }
            ),
            r"rows/encoder\.extra\.weight has no base tensor",
        ),
    ],
)
def test_rows_that_do_not_fit_are_refused_naming_them(
    tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    model_dir, _ = saved(tmp_path)
    rewrite(model_dir, change)
    with pytest.raises(ArtifactError, match=rf"weights\.safetensors: .*{message}"):
        artifact.load(model_dir)
