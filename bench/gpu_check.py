"""Prove the CUDA path: the default model served in fp16 and bf16 on a GPU.

One prepared script for a machine with an NVIDIA GPU (run it on the CPU too, with
`--device cpu`, to check it before spending GPU time). Two parts:

1. Engine, no HTTP. The network is prepared for serving on the device in fp32, fp16 and
   bf16 (`app.network.backends.make_backend`, the code path the server uses). For each
   precision and batch size the test split is answered at full depth and with the
   calibrated thresholds; per row: sentences/s (median of `--reps` interleaved
   passes), mean exit layer, the exit histogram, accuracy against the labels and the
   share of answers equal to the fp32 answers on the same device.
2. HTTP: `bench/http_bench.py` starts the real server with `EXITSERVE_DEVICE=cuda` and
   drives it at each `--concurrency` level, calibrated against threshold 1.0, and saves
   the server's own exit counters from `/metrics`.

Results: OUT/gpu-<model>-<date>-<device>.{json,md} and the matching http-* pair.

Usage:
  python bench/gpu_check.py MODEL_DIR [--device cuda] [--batch-sizes 1 8 32 128]
      [--reps 3] [--concurrency 1 8 32] [--duration 12] [--out bench/results]
"""

from __future__ import annotations

import argparse
import platform
import re
import socket
import statistics
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.benchmark import timed_pass, write_results  # noqa: E402
from app.network import artifact  # noqa: E402
from app.network.artifact import read_spec  # noqa: E402
from app.network.backends import make_backend  # noqa: E402
from app.training.evaluate import split_data  # noqa: E402

PRECISIONS = ("none", "fp16", "bf16")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def engine_sweep(
    model_dir: Path,
    device: str,
    batch_sizes: list[int],
    reps: int,
    log: Any,
    precisions: tuple[str, ...] = PRECISIONS,
) -> dict[str, Any]:
    loaded = artifact.load(model_dir)
    spec, tok = loaded.spec, loaded.tokenizer
    texts, y = split_data(spec, "test")
    ids = tok.encode(texts)
    L = spec.config.num_layers
    rules = {"full": [1.0] * L, "calibrated": list(spec.thresholds)}
    # The calibrated thresholds in one pass of the whole network per batch (the dispatch
    # path auto takes where a pass is cheaper): same answers, other cost.
    # full-whole: the whole network as one graph per shape bucket (on CUDA), full
    # depth: the reference a plain CUDA graph of the network sets.
    whole = {"calibrated-whole", "full-whole"}
    rules["calibrated-whole"] = rules["calibrated"]
    rules["full-whole"] = rules["full"]
    # fp32 ("none") always runs: it is the reference for agreement.
    nets = {
        q: make_backend(artifact.load(model_dir).network, device, q)
        for q in dict.fromkeys(("none", *precisions))
    }
    # Reference answers: fp32 on the same device, full depth and calibrated.
    reference = {
        name: timed_pass(nets["none"], ids, th, 32, name in whole)[2] for name, th in rules.items()
    }
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        # Batch 1 is slow per sentence; a prefix keeps every row's time comparable.
        subset = ids if b > 1 else ids[: min(len(ids), 256)]
        for net in nets.values():  # warm-up: kernels, allocator, cuBLAS handles
            timed_pass(net, subset[: 4 * b], rules["full"], b)
        speeds: dict[tuple[str, str], list[float]] = {}
        answers: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        for _ in range(reps):
            for q, net in nets.items():  # interleaved, so drift hits every row alike
                for name, th in rules.items():
                    secs, exits, labels = timed_pass(net, subset, th, b, name in whole)
                    speeds.setdefault((q, name), []).append(len(subset) / secs)
                    answers[(q, name)] = (exits, labels)
        for (q, name), sps in speeds.items():
            exits, labels = answers[(q, name)]
            n = len(labels)
            ref = reference[name][:n]
            row = {
                "precision": "fp32" if q == "none" else q,
                "rule": name,
                "batch": b,
                "sentences": n,
                "sentences_per_second": round(statistics.median(sps), 1),
                "raw": [round(s, 1) for s in sps],
                "mean_exit_layer": round(sum(exits) / n, 3),
                "exit_histogram": {str(k): v for k, v in sorted(Counter(exits).items())},
                "accuracy": round(
                    sum(int(p == t) for p, t in zip(labels, y[:n], strict=True)) / n, 4
                ),
                "agreement_with_fp32": round(sum(map(int.__eq__, labels, ref)) / n, 4),
            }
            rows.append(row)
            log(
                f"  {row['precision']:>4} {name:>10} b{b:<4} {row['sentences_per_second']:>9.1f}"
                f"/s depth {row['mean_exit_layer']:.2f} acc {row['accuracy']:.4f}"
                f" agree {row['agreement_with_fp32']:.4f}"
            )
    speed = {(r["precision"], r["rule"], r["batch"]): r["sentences_per_second"] for r in rows}
    ratios = {}
    for b in batch_sizes:
        names = ["fp32" if q == "none" else q for q in nets]
        for p in names:
            ratios[f"{p}_calibrated_vs_full@{b}"] = round(
                speed[(p, "calibrated", b)] / speed[(p, "full", b)], 2
            )
            ratios[f"{p}_calibrated_whole_vs_full@{b}"] = round(
                speed[(p, "calibrated-whole", b)] / speed[(p, "full", b)], 2
            )
            best = max(speed[(p, r, b)] for r in ("calibrated", "calibrated-whole"))
            ratios[f"{p}_calibrated_best_vs_full_graph@{b}"] = round(
                best / speed[(p, "full-whole", b)], 2
            )
        for p in names[1:]:
            ratios[f"{p}_vs_fp32_full@{b}"] = round(
                speed[(p, "full", b)] / speed[("fp32", "full", b)], 2
            )
    return {
        "model": spec.name,
        "texts": len(ids),
        "mean_tokens": round(sum(map(len, ids)) / len(ids), 1),
        "thresholds": spec.thresholds,
        "rows": rows,
        "ratios": ratios,
    }


def markdown(r: dict[str, Any], http: dict[str, Any] | None) -> str:
    lines = [
        f"# GPU check: {r['model']} on {r['device_name']} ({r['date']}, {r['host']},"
        f" torch {r['torch']})",
    ]
    e = r["engine"]
    if e is not None:
        b1 = min((row["sentences"] for row in e["rows"]), default=0)
        lines += [
            "",
            f"Engine, no HTTP: test split ({e['texts']} sentences, mean {e['mean_tokens']}"
            f" tokens; the first {b1} at batch 1), median of the interleaved passes."
            " Agreement: answers equal to fp32's on the same device under the same rule.",
            "",
            "| precision | rule | batch | sentences/s | mean exit | accuracy | agrees with fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in e["rows"]:
            lines.append(
                f"| {row['precision']} | {row['rule']} | {row['batch']} |"
                f" {row['sentences_per_second']:.1f} | {row['mean_exit_layer']:.2f} |"
                f" {100 * row['accuracy']:.2f}% | {100 * row['agreement_with_fp32']:.2f}% |"
            )
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in e["ratios"].items()]
    if http is not None:
        lines += ["", f"HTTP (real server, {http['server']}): see `{http['file']}`.", ""]
        lines += ["| config | clients | req/s | p50 ms | p99 ms | mean exit | accuracy |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for row in http["results"]:
            lines.append(
                f"| {row['config']} | {row['concurrency']} | {row['throughput_rps']:.1f} |"
                f" {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_exit_layer']:.2f} |"
                f" {100 * row['accuracy']:.2f}% |"
            )
        lines += ["", "Server's exit counters from /metrics after the run:", ""]
        lines += ["```", *http["metrics"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script out")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], help="besides fp32")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=12.0, help="HTTP s per row")
    p.add_argument("--http-precision", default="auto", help="server EXITSERVE_QUANTIZATION")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--no-engine", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    if a.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device visible")
        return 2
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    tag = re.sub(r"[^a-z0-9]+", "-", device_name(a.device).lower()).strip("-") or host
    log(f"torch {torch.__version__} on {device_name(a.device)}")
    result: dict[str, Any] = {
        "kind": "gpu",
        "date": date,
        "host": host,
        "device": a.device,
        "device_name": device_name(a.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": read_spec(a.model_dir).name,
        "engine": None
        if a.no_engine
        else engine_sweep(a.model_dir, a.device, a.batch_sizes, a.reps, log, tuple(a.precisions)),
    }
    http = None
    if not a.no_http:
        sys.path.insert(0, str(ROOT / "bench"))
        import http_bench

        opts = http_bench.Options(
            model_dir=a.model_dir,
            duration=a.duration,
            concurrency=a.concurrency,
            rounds=2,
            warmup=1.0,
            device=a.device,
            quantization=a.http_precision,
            max_batch_size=max(32, *a.concurrency),
            in_process=False,
            out=a.out,
            tag=tag,
        )
        res, path = http_bench.run(opts)
        http = {
            "file": path.name,
            "server": f"{res['server']['device']}, {res['server']['dtype']}",
            "results": res["results"],
            "ratios": res["ratios"],
            "metrics": res.get("server_metrics", []),
        }
        result["http"] = http
    md = markdown(result, http)
    write_results(a.out, f"gpu-{result['model']}-{date[:10]}-{tag}", result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
