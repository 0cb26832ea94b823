"""Which int8 path to serve on CPU: the candidates side by side, in one run.

Candidates, all on the same fine-tuned weights:
  fp32                         the reference (torch, our executor)
  int8 per-tensor (torch.ao)   fbgemm dynamic int8, activations scaled over the whole batch:
                               what exitserve served before (deprecated in torch 2.13)
  int8 per-token (oneDNN)      the eager kernel: `app.network.invariant.Int8Linear`
  int8 per-token (_int_mm)     the same numerics on torch's portable int8 matmul
  int8 per-token (ONNX Runtime layers)
                               the same scheme, each layer as ONNX Runtime graphs
                               (`app.network.ort_layers`): what exitserve serves now
  ONNX Runtime int8            the same network exported at full depth and quantized by
                               ONNX Runtime (dynamic, per tensor), padded batches: the peer
For each: sentences/s at full depth with batches of 1, 8 and 32 (interleaved repetitions,
median), calibrated early exit for the torch candidates, final-exit accuracy and agreement
with fp32 on the whole test split, and batch invariance: every test sentence answered alone
and inside a random batch of 32 (label and exit-layer changes, largest score difference).

Usage:
  .venv/bin/python -m bench.quantization models/rt-sentiment-minilm [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.benchmark import timed_pass, write_results
from app.network import artifact
from app.network.backends import Backend, make_backend
from app.network.invariant import onednn_preferred
from app.network.multi_exit import MultiExitNetwork
from app.network.quantize import quantize_int8
from app.training.evaluate import all_exit_probs, batch_invariance, split_data

BATCHES = (1, 8, 32)


def per_tensor_int8(net: MultiExitNetwork) -> None:
    """The previous serving path: torch.ao dynamic int8, 8-bit activations per tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        net.encoder.encoder = quantize_dynamic(
            net.encoder.encoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )


def build(model_dir: Path, kind: str) -> Backend:
    if kind == "int8 per-token (ONNX Runtime layers)":
        return make_backend(artifact.load(model_dir).network, "cpu", "int8", "onnxruntime")
    backend = make_backend(artifact.load(model_dir).network, "cpu", "none")  # fused QKV, eval
    if kind == "int8 per-tensor (torch.ao)":
        per_tensor_int8(backend.model)
    elif kind == "int8 per-token (oneDNN)":
        quantize_int8(backend.model, "onednn")
    elif kind == "int8 per-token (_int_mm)":
        quantize_int8(backend.model, "int_mm")
    return backend


def ort_runner(model_dir: Path, threads: int) -> Callable[[list[list[int]]], Any]:
    from bench.peers.onnx_export import ensure_export
    from bench.peers.ort_session import open_session, run_padded

    meta = ensure_export(model_dir)
    session = open_session(meta["int8_path"], threads)
    pad = artifact.read_spec(model_dir).config.encoder.pad_token_id
    return lambda rows: run_padded(session, rows, pad)


def ort_speed(run: Callable[[list[list[int]]], Any], ids: list[list[int]], batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        run(ids[s : s + batch])
    return len(ids) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and ORT threads (default 1)")
    p.add_argument("--no-ort", action="store_true", help="leave out the ONNX Runtime peer")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kinds = [
        "fp32",
        "int8 per-tensor (torch.ao)",
        "int8 per-token (oneDNN)",
        "int8 per-token (_int_mm)",
        "int8 per-token (ONNX Runtime layers)",
    ]
    skipped = {}
    if not onednn_preferred():
        # The server never runs it here (`Int8Linear` auto takes `_int_mm`), and where its
        # slow path is the reason, it would take hours (250 ms for one layer's product).
        kinds.remove("int8 per-token (oneDNN)")
        skipped["int8 per-token (oneDNN)"] = (
            "not exact or slower than _int_mm on this CPU (invariant.onednn_preferred)"
        )
    loaded = artifact.load(a.model_dir)
    texts, y = split_data(loaded.spec, "test")
    ids = loaded.tokenizer.encode(texts)
    L, calibrated = loaded.spec.config.num_layers, list(loaded.spec.thresholds)
    nets = {k: build(a.model_dir, k) for k in kinds}
    ort = None if a.no_ort else ort_runner(a.model_dir, a.threads)
    sets = {b: ids[:128] if b == 1 else ids[:512] for b in BATCHES}
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "threads": a.threads,
        "torch": torch.__version__,
        "model": loaded.spec.name,
        "sentences": {str(b): len(v) for b, v in sets.items()},
        "candidates": {},
        "skipped": skipped,
    }
    raw: dict[str, dict[str, list[float]]] = {}
    with torch.inference_mode():
        for net in nets.values():
            timed_pass(net, ids[:64], calibrated, 32)  # warm caches and kernels
        for _ in range(a.reps):
            for b in BATCHES:
                for k, net in nets.items():
                    full = timed_pass(net, sets[b], [1.0] * L, b)[0]
                    raw.setdefault(k, {}).setdefault(f"full_b{b}", []).append(len(sets[b]) / full)
                    if k != "fp32":
                        t = timed_pass(net, sets[b], calibrated, b)[0]
                        raw[k].setdefault(f"calibrated_b{b}", []).append(len(sets[b]) / t)
                if ort is not None:
                    speed = ort_speed(ort, sets[b], b)
                    raw.setdefault("ONNX Runtime int8", {}).setdefault(f"full_b{b}", []).append(
                        speed
                    )
        ref = all_exit_probs(nets["fp32"], ids)[-1].argmax(-1)
        for k, net in nets.items():
            pred = all_exit_probs(net, ids)[-1].argmax(-1)
            result["candidates"][k] = {
                "final_accuracy": round(float((pred == y).mean()), 4),
                "agreement_with_fp32": round(float((pred == ref).mean()), 4),
                "batch_invariance": batch_invariance(net, ids, calibrated),
            }
    if ort is not None:
        pred = np.concatenate([ort(ids[s : s + 32]) for s in range(0, len(ids), 32)]).argmax(-1)
        alone = np.concatenate([ort([r]) for r in ids]).argmax(-1)
        result["candidates"]["ONNX Runtime int8"] = {
            "final_accuracy": round(float((pred == y).mean()), 4),
            "agreement_with_fp32": round(float((pred == ref).mean()), 4),
            "batch_invariance": {"batch_size": 32, "label_changes": int((pred != alone).sum())},
        }
    for k, r in raw.items():
        c = result["candidates"][k]
        c["sentences_per_s"] = {m: round(statistics.median(v), 1) for m, v in r.items()}
        c["raw"] = r
    lines = report(result)
    stem = f"quantization-{result['model']}-{result['date'][:10]}-{result['host']}"
    write_results(a.out, stem, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


def report(result: dict[str, Any]) -> list[str]:
    cands = result["candidates"]
    peer = cands.get("ONNX Runtime int8", {}).get("sentences_per_s")
    lines = [
        f"# int8 candidates: {result['model']} ({result['date']}, {result['threads']} thread(s))",
        "",
        "Sentences/s, full depth (and calibrated early exit); ratio to ONNX Runtime int8 at"
        " full depth, same batch size.",
        "",
        "| candidate | b1 | b8 | b32 | accuracy | agreement w/ fp32 | batch changes (label/exit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, c in cands.items():
        s = c["sentences_per_s"]
        cells = []
        for b in BATCHES:
            cell = f"{s[f'full_b{b}']:.0f}"
            if peer:
                cell += f" ({s[f'full_b{b}'] / peer[f'full_b{b}']:.2f}x)"
            if f"calibrated_b{b}" in s:
                cal = s[f"calibrated_b{b}"]
                cell += f"; exits {cal:.0f}" + (
                    f" ({cal / peer[f'full_b{b}']:.2f}x)" if peer else ""
                )
            cells.append(cell)
        inv = c["batch_invariance"]
        changes = f"{inv['label_changes']}/{inv.get('exit_changes', '-')}"
        lines.append(
            f"| {k} | {' | '.join(cells)} | {100 * c['final_accuracy']:.2f}%"
            f" | {100 * c['agreement_with_fp32']:.1f}% | {changes} |"
        )
    lines += [f"\n{k}: skipped, {why}" for k, why in result.get("skipped", {}).items()]
    return lines


if __name__ == "__main__":
    main()
