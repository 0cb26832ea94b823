"""Which int8 path to serve on CPU: speed and fidelity of each candidate, in one run.

Candidates, all on the same fine-tuned weights and the same serving preparation:
  fp32                        reference
  torch.ao dynamic, 7-bit act fbgemm's default (`reduce_range=True`)
  torch.ao dynamic, 8-bit act what exitserve serves on AVX-512 VNNI CPUs
  torchao int8 dyn-act/weight torchao's Int8DynamicActivationInt8WeightConfig (eager),
                              when torchao is importable (`pip install --no-deps torchao`)
Full depth, batch 1 and batch 32, interleaved repetitions; accuracy and agreement with
fp32 on the whole test split.

Usage:
  .venv/bin/python bench/quantization.py models/rt-sentiment-minilm [--reps 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from app.benchmark import timed_pass, write_results
from app.config import usable_cpus
from app.network import artifact
from app.network.quantize import prepare, quantize_int8
from app.training.evaluate import all_exit_probs, split_data


def build(model_dir: Path, kind: str) -> Any:
    net = artifact.load(model_dir).network
    if kind == "fp32":
        return prepare(net, "cpu", "none")
    if kind.startswith("torch.ao"):
        net = prepare(net, "cpu", "none")  # fused QKV, eval
        quantize_int8(net, reduce_range="7-bit" in kind)
        return net
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    net = prepare(net, "cpu", "none")
    quantize_(net.encoder.encoder, Int8DynamicActivationInt8WeightConfig())
    return net


def speed(net: Any, ids: list[list[int]], batch: int) -> float:
    """Sentences per second at full depth."""
    return len(ids) / timed_pass(net, ids, [1.0] * net.num_layers, batch)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args()
    torch.set_num_threads(usable_cpus())
    kinds = ["fp32", "torch.ao 7-bit act", "torch.ao 8-bit act"]
    try:
        import torchao  # noqa: F401

        kinds.append("torchao int8 dyn")
    except ImportError:
        pass
    loaded = artifact.load(a.model_dir)
    texts, y = split_data(loaded.spec, "test")
    ids = loaded.tokenizer.encode(texts)
    nets = {k: build(a.model_dir, k) for k in kinds}
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": loaded.spec.name,
        "candidates": {},
    }
    with torch.inference_mode():
        ref = all_exit_probs(nets["fp32"], ids)[-1].argmax(-1)
        raw: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b32": []} for k in kinds}
        for net in nets.values():
            speed(net, ids[:32], 32)
        for _ in range(a.reps):
            for k, net in nets.items():
                raw[k]["b1"].append(speed(net, ids[:128], 1))
                raw[k]["b32"].append(speed(net, ids[:512], 32))
        for k, net in nets.items():
            pred = all_exit_probs(net, ids)[-1].argmax(-1)
            result["candidates"][k] = {
                "sentences_per_s_b1": round(statistics.median(raw[k]["b1"]), 1),
                "sentences_per_s_b32": round(statistics.median(raw[k]["b32"]), 1),
                "raw": raw[k],
                "final_accuracy": round(float((pred == y).mean()), 4),
                "agreement_with_fp32": round(float((pred == ref).mean()), 4),
            }
    fp = result["candidates"]["fp32"]
    lines = [
        f"# int8 candidates: {result['model']} ({result['date']}, {result['threads']} threads)",
        "",
        "| candidate | sent/s b1 | vs fp32 | sent/s b32 | vs fp32 | accuracy | agreement w/ fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, c in result["candidates"].items():
        b1, b32 = c["sentences_per_s_b1"], c["sentences_per_s_b32"]
        lines.append(
            f"| {k} | {b1} | {b1 / fp['sentences_per_s_b1']:.2f}x"
            f" | {b32} | {b32 / fp['sentences_per_s_b32']:.2f}x"
            f" | {100 * c['final_accuracy']:.2f}% | {100 * c['agreement_with_fp32']:.1f}% |"
        )
    stem = f"quantization-{result['model']}-{result['date'][:10]}-{result['host']}"
    write_results(a.out, stem, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
