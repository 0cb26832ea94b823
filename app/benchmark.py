"""In-process speed benchmark of the engine's batched executor (no HTTP).

Compares, in one run with interleaved repetitions, on the model's test split:
  fp32 full depth, int8 full depth, int8 adaptive (calibrated thresholds),
at each batch size asked for (default 1, 8 and 32; batches in arrival order, mixed
lengths, as a dynamic batcher would form them). Reports sentences/s (median over
repetitions), the ratios the README quotes, mean depth and accuracy, and saves raw
numbers under bench/results/. `--threads 1` times what one serving worker has (the
server's default on the CPU: one single-thread worker per core).

Usage:
  exitserve bench models/rt-sentiment-minilm --out bench/results [--reps 5]
      [--batches 1 8 32] [--n1 256] [--n 512] [--threads N]
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from app.config import usable_cpus
from app.engine.executor import Row, run_batch
from app.network import artifact
from app.network.backends import make_backend
from app.training.evaluate import split_data


def write_results(out_dir: Path, stem: str, result: dict[str, Any], md: str) -> Path:
    """Save a benchmark's raw result as OUT/STEM.json and its report as OUT/STEM.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(md)
    return path


def timed_pass(
    net: Any, ids: list[list[int]], thresholds: list[float], batch: int, whole: bool = False
) -> tuple[float, list[int], list[int]]:
    """Seconds to answer all `ids` in batches of `batch` (`whole`: each batch in one pass
    of the whole network, `app.engine.dispatch`); exit layers and labels."""
    L = net.num_layers
    exits, labels = [], []
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        res = run_batch(net, [Row(r, thresholds, L) for r in ids[s : s + batch]], whole=whole)
        exits += [p.exit_layer for p in res.predictions]
        labels += [p.label_index for p in res.predictions]
    return time.perf_counter() - t0, exits, labels


def run(
    model_dir: Path,
    out_dir: Path,
    reps: int = 5,
    n1: int = 256,
    n: int = 512,
    batches: Sequence[int] = (1, 8, 32),
    threads: int | None = None,
) -> dict[str, Any]:
    """`n1` sentences are timed at batch 1 and `n` at every larger batch size."""
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    threads = threads or usable_cpus()
    torch.set_num_threads(threads)
    loaded = artifact.load(model_dir)
    spec, tok = loaded.spec, loaded.tokenizer
    # Both get the same serving preparation (fused QKV, eval mode); only precision differs.
    fp32 = make_backend(loaded.network, "cpu", "none")
    int8 = make_backend(artifact.load(model_dir).network, "cpu", "int8")
    texts, y = split_data(spec, "test")
    ids = tok.encode(texts)
    L = spec.config.num_layers
    full = [1.0] * L
    calibrated = list(spec.thresholds)
    configs = {
        "fp32_full": (fp32, full),
        "int8_full": (int8, full),
        "int8_adaptive": (int8, calibrated),
    }
    cases = [(b, ids[: n1 if b == 1 else n]) for b in sorted(set(batches))]
    # Warm up every configuration once (allocator, packed weights, thread pool).
    for net, th in configs.values():
        timed_pass(net, ids[:32], th, 32)
        timed_pass(net, ids[:4], th, 1)
    raw: dict[str, list[float]] = {f"{name}@{b}": [] for name in configs for b, _ in cases}
    depth: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for _ in range(reps):
        for b, subset in cases:
            for name, (net, th) in configs.items():  # interleaved: drift hits all alike
                secs, exits, labels = timed_pass(net, subset, th, b)
                key = f"{name}@{b}"
                raw[key].append(len(subset) / secs)
                depth[key] = sum(exits) / len(exits)
                accuracy[key] = sum(int(p == t) for p, t in zip(labels, y, strict=False)) / len(
                    labels
                )
    median = {k: statistics.median(v) for k, v in raw.items()}
    ratios = {}
    for b, _ in cases:
        ratios[f"int8_vs_fp32_full@{b}"] = median[f"int8_full@{b}"] / median[f"fp32_full@{b}"]
        ratios[f"adaptive_vs_full_int8@{b}"] = (
            median[f"int8_adaptive@{b}"] / median[f"int8_full@{b}"]
        )
        ratios[f"adaptive_int8_vs_fp32_full@{b}"] = (
            median[f"int8_adaptive@{b}"] / median[f"fp32_full@{b}"]
        )
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    result: dict[str, Any] = {
        "kind": "engine",
        "model": spec.name,
        "date": date,
        "host": host,
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "reps": reps,
        "sentences": {f"batch{b}": len(subset) for b, subset in cases},
        "mean_tokens": round(sum(len(r) for r in ids[:n]) / min(n, len(ids)), 1),
        "sentences_per_second_median": {k: round(v, 1) for k, v in median.items()},
        "sentences_per_second_raw": {k: [round(x, 1) for x in v] for k, v in raw.items()},
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "mean_layers": {k: round(v, 3) for k, v in depth.items()},
        "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
    }
    write_results(
        out_dir, f"engine-{spec.name}-{date[:10]}-{host}-{threads}t", result, markdown(result)
    )
    return result


def markdown(r: dict[str, Any]) -> str:
    med, depth, acc = r["sentences_per_second_median"], r["mean_layers"], r["accuracy"]
    lines = [
        f"# Engine benchmark: {r['model']} ({r['date']}, {r['host']},"
        f" {r['threads']} threads, torch {r['torch']})",
        "",
        "Test-split sentences timed: "
        + ", ".join(f"{k} at batch {b[5:]}" for b, k in r["sentences"].items())
        + f" (arrival order, mean {r['mean_tokens']} tokens); median of"
        f" {r['reps']} interleaved repetitions.",
        "",
        "| configuration | batch | sentences/s | mean layers | accuracy |",
        "|---|---|---|---|---|",
    ]
    for key in med:
        name, b = key.split("@")
        lines.append(
            f"| {name} | {b} | {med[key]:.1f} | {depth[key]:.2f} | {100 * acc[key]:.1f}% |"
        )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in r["ratios"].items()]
    return "\n".join(lines) + "\n"
