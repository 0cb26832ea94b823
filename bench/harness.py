"""Benchmark exitserve against full depth and against two peer servers: tables and plots.

Starts every server itself on loopback, all at once (an idle server costs no CPU), and
drives them in turn with the closed loop of `bench/http_bench.py`:
C workers, each sending its next request the moment the last is answered, one
test-split text per request. Configurations:
  calibrated   (a) exitserve, the model's calibrated exit thresholds
  full_depth   (b) exitserve, `"threshold": 1.0` on the same server: every layer
  naive_fp32   (c) the same weights served as a typical user would: FastAPI, fp32
               PyTorch, one request at a time (bench/peers/naive_server.py)
  onnx_int8    (d) ONNX Runtime int8, full depth, dynamic batching that never waits
               for a batch to fill, as Triton's default (bench/peers/onnx_server.py, model
               exported by bench/peers/onnx_export.py), in its best measured setting:
               before the run, each (instances, intra-op threads) candidate serves 1 and
               16 clients for a few seconds, and the best geometric-mean throughput wins
At each concurrency level every configuration runs `--rounds` windows, in an order that
rotates each round, so drift on a shared machine hits all of them alike.

Per (configuration, concurrency): throughput, p50/p95/p99 latency, mean exit layer,
server CPU ms per request, accuracy of the served answers against the labels, and the
useful GFLOP/s: the encoder FLOPs each answer really needed (its real tokens, through
the layers it ran) per second, also as a fraction of the machine's peak fp32
matrix-multiply GFLOP/s, measured in the same run. The issue's bars are checked and
reported as met or missed, with the numbers whatever they are.

Writes OUT/<date>-<host>.json (raw, every window), OUT/<date>-<host>.md (tables),
OUT/<date>-<host>-latency.png (latency against throughput) and
OUT/<date>-<host>-exits.png (exit-layer histogram of the calibrated answers).

Usage:
  .venv/bin/python bench/harness.py MODEL_DIR [--duration 15] [--concurrency 1 4 16 64]
      [--rounds 1] [--warmup 2] [--systems exitserve naive onnx] [--out bench/results]
`--duration` is the measured seconds per (configuration, concurrency), split over the
rounds. `make bench` runs it on the default model (about 9 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import http_bench as hb  # noqa: E402
from bench.client import HOST, build_request, run_async  # noqa: E402
from devtools.server_process import free_port, running_command  # noqa: E402

SYSTEMS = ("exitserve", "naive", "onnx")
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # config -> (system, request parameters)
    "calibrated": ("exitserve", {}),
    "full_depth": ("exitserve", {"threshold": 1.0}),
    "naive_fp32": ("naive", {}),
    "onnx_int8": ("onnx", {}),
}
# The issue's bars: (name, numerator, denominator, concurrency, kind, bound)
BAR_LEVEL = 16


# -- pure pieces: FLOPs, useful throughput, bars, report ------------------------------
def encoder_flops(tokens: int, layers: int, hidden: int, intermediate: int) -> float:
    """Multiply-adds x 2 of `layers` BERT layers over one unpadded sequence of `tokens`:
    the QKV, output and two feed-forward projections, and attention's two (T x T) products."""
    n, H, inter = tokens, hidden, intermediate
    projections = 2 * n * (3 * H * H + H * H + 2 * H * inter)
    attention = 2 * 2 * n * n * H
    return float(layers * (projections + attention))


def useful_gflops(
    samples: Sequence[hb.Sample],
    tokens: Sequence[int],
    seconds: float,
    hidden: int,
    intermediate: int,
    num_layers: int,
) -> float:
    """GFLOP/s of the encoder work the answered requests needed (real tokens only, the
    layers each one ran; full-depth servers report no exit layer and ran them all)."""
    total = 0.0
    for s in samples:
        if s.status != 200:
            continue
        layers = s.exit_layer if s.exit_layer is not None else num_layers
        total += encoder_flops(tokens[s.text_index], layers, hidden, intermediate)
    return total / seconds / 1e9 if seconds > 0 else 0.0


def exit_histogram(samples: Sequence[hb.Sample], num_layers: int) -> dict[int, int]:
    counts = Counter(s.exit_layer for s in samples if s.status == 200 and s.exit_layer)
    return {layer: counts.get(layer, 0) for layer in range(1, num_layers + 1)}


def check_bars(rows: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's bars against the measured rows; a bar with missing data is 'no data'."""
    levels = sorted({c for _, c in rows})
    c_lo = levels[0] if levels else 1
    c_bar = BAR_LEVEL if BAR_LEVEL in levels else (levels[-1] if levels else BAR_LEVEL)

    def get(config: str, c: int, key: str) -> float | None:
        row = rows.get((config, c))
        return None if row is None else row.get(key)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def tput(a: str, b: str, c: int = c_bar) -> float | None:
        return ratio(get(a, c, "throughput_rps"), get(b, c, "throughput_rps"))

    def points(a: str, b: str) -> float | None:
        d = diff(hb.pooled_accuracy(rows, a), hb.pooled_accuracy(rows, b))
        return None if d is None else 100 * d

    p50 = ratio(get("calibrated", c_lo, "p50_ms"), get("full_depth", c_lo, "p50_ms"))
    bars = [
        ("(a)/(b) throughput", tput("calibrated", "full_depth"), ">=", 1.8, c_bar),
        ("(a)/(b) p50 latency", p50, "<=", 0.6, c_lo),
        ("(a)-(b) accuracy, points", points("calibrated", "full_depth"), "abs<=", 1.0, None),
        ("(a)/(c) throughput", tput("calibrated", "naive_fp32"), ">=", 4.0, c_bar),
        ("(a)/(d) throughput", tput("calibrated", "onnx_int8"), ">=", 1.3, c_bar),
        # Against the fair peer (no batching wait), also at low load, where batching
        # cannot help either server.
        *[
            (
                f"(a)/(d) throughput, {c} client{'s' if c > 1 else ''}",
                tput("calibrated", "onnx_int8", c),
                ">=",
                1.3,
                c,
            )
            for c in (1, 4)
            if c in levels and c != c_bar
        ],
        ("(a)-(d) accuracy, points", points("calibrated", "onnx_int8"), "abs<=", 1.0, None),
    ]
    out = []
    for name, value, op, bound, c in bars:
        if value is None:
            status = "no data"
        elif op == ">=":
            status = "met" if value >= bound else "missed"
        elif op == "<=":
            status = "met" if value <= bound else "missed"
        else:
            status = "met" if abs(value) <= bound else "missed"
        out.append(
            {
                "bar": name,
                "concurrency": c,
                "value": None if value is None else round(value, 3),
                "op": op,
                "bound": bound,
                "status": status,
            }
        )
    configs = sorted({k for k, _ in rows})
    failures = {k: sum(r["failures"] for (kk, _), r in rows.items() if kk == k) for k in configs}
    out.append(
        {
            "bar": "failed requests, every configuration",
            "concurrency": None,
            "value": sum(failures.values()),
            "op": "==",
            "bound": 0,
            "status": "met" if rows and not any(failures.values()) else "missed",
            "per_config": failures,
        }
    )
    return out


def markdown(r: dict[str, Any]) -> str:
    o = r["options"]
    lines = [
        f"# Benchmark: {r['model']} ({r['date']}, {r['host']}, {r['usable_cpus']} CPUs)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Closed loop over loopback, {len(r['texts_tokens'])} test-split texts;"
        f" {o['duration']:g} s measured per row ({o['rounds']} round(s), rotating order)"
        f" after {o['warmup']:g} s of warm-up. Peak fp32 matmul: {r['peak_gflops']:.1f}"
        " GFLOP/s (torch, all usable CPUs). Useful GFLOP/s counts the encoder FLOPs each"
        " answer needed: its real tokens through the layers it ran.",
        "",
        "| config | clients | req/s | p50 ms | p95 ms | p99 ms | mean exit | accuracy"
        " | CPU ms/req | useful GFLOP/s | of peak | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        lines.append(
            f"| {row['config']} | {row['concurrency']} | {row['throughput_rps']:.1f} |"
            f" {hb._fmt(row['p50_ms'], '.1f')} | {hb._fmt(row['p95_ms'], '.1f')} |"
            f" {hb._fmt(row['p99_ms'], '.1f')} | {hb._fmt(row['mean_exit_layer'], '.2f')} |"
            f" {hb._fmt(None if row['accuracy'] is None else 100 * row['accuracy'], '.2f', '%')} |"
            f" {hb._fmt(row['server_cpu_ms_per_request'], '.1f')} |"
            f" {row['useful_gflops']:.1f} | {100 * row['fraction_of_peak']:.1f}% |"
            f" {row['failures']} |"
        )
    peer = r.get("peer_d") or {}
    if peer:
        tried = "; ".join(
            f"{t['instances']}x{t['threads']}: {t['geomean_rps']:.1f}"
            for t in peer.get("candidates", [])
        )
        lines += [
            "",
            f"Peer (d): {peer['instances']} instance(s) x {peer['threads']} intra-op thread(s),"
            f" no batching wait (max delay {peer['max_delay_ms']} ms)."
            + (f" Measured before the run (instances x threads: geometric-mean req/s at"
               f" {PEER_D_TUNING_LEVELS} clients): {tried}." if tried else ""),
        ]  # fmt: skip
    lines += ["", "| bar | clients | measured | bound | status |", "|---|---|---|---|---|"]
    for b in r["bars"]:
        v = b["value"]
        lines.append(
            f"| {b['bar']} | {b['concurrency'] or '—'} |"
            f" {v if isinstance(v, int) else hb._fmt(v, '.2f')} |"
            f" {b['op']} {b['bound']} | {b['status']} |"
        )
    hist = r.get("exit_histogram") or {}
    if hist:
        total = sum(hist.values()) or 1
        lines += ["", "Exit layers of the calibrated answers (all levels pooled):", ""]
        lines += ["| exit | " + " | ".join(map(str, hist)) + " |", "|---" * (len(hist) + 1) + "|"]
        lines += [
            "| share | " + " | ".join(f"{100 * v / total:.1f}%" for v in hist.values()) + " |"
        ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], latency_png: Path, exits_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, config in enumerate(dict.fromkeys(row["config"] for row in r["results"])):
        rows = [row for row in r["results"] if row["config"] == config and row["p50_ms"]]
        x = [row["throughput_rps"] for row in rows]
        color = f"C{i}"
        ax.plot(x, [row["p50_ms"] for row in rows], "o-", color=color, label=f"{config} p50")
        ax.plot(x, [row["p99_ms"] for row in rows], "x--", color=color, label=f"{config} p99")
        for row in rows:
            ax.annotate(
                f"c{row['concurrency']}",
                (row["throughput_rps"], row["p50_ms"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{r['model']}: latency against throughput ({r['usable_cpus']} CPUs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(latency_png, dpi=110)
    plt.close(fig)

    hist = r.get("exit_histogram") or {}
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    total = sum(hist.values()) or 1
    ax.bar([str(k) for k in hist], [100 * v / total for v in hist.values()], color="C0")
    ax.set_xlabel("exit layer")
    ax.set_ylabel("share of answers (%)")
    ax.set_title(f"{r['model']}: calibrated exits")
    fig.tight_layout()
    fig.savefig(exits_png, dpi=110)
    plt.close(fig)


# -- machine peak ----------------------------------------------------------------------
def peak_matmul_gflops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Best fp32 matrix-multiply rate of torch on `threads` threads, GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# -- servers ---------------------------------------------------------------------------
def peer_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EXITSERVE_")}


def onnx_int8_model(model_dir: Path, cache: Path, log: Any) -> Path:
    """The int8 ONNX export of `model_dir`, made before any server starts (the exporter
    reuses its earlier export while the source weights and options are unchanged)."""
    out = cache / "onnx" / model_dir.name
    log(f"exporting {model_dir.name} to ONNX int8 under {out}")
    exporter = str(ROOT / "bench/peers/onnx_export.py")
    subprocess.run(
        [sys.executable, exporter, "--model-dir", str(model_dir), "--out", str(out)],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return out / "model.int8.onnx"


@dataclass
class Options:
    model_dir: Path
    out: Path = Path("bench/results")
    duration: float = 15.0
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    rounds: int = 1
    warmup: float = 2.0
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    threads: int | None = None
    startup_timeout: float = 300.0
    cache: Path = ROOT / "bench/.cache"
    quiet: bool = False
    tag: str | None = None
    # Peer (d)'s worker instances and intra-op threads; None: measured (`tune_peer_d`).
    peer_d: tuple[int, int] | None = None


PEER_D_TUNING_LEVELS = [1, 16]
PEER_D_TUNING_SECONDS = 4.0


def peer_d_candidates(cpus: int) -> list[tuple[int, int]]:
    """(instances, intra-op threads per run) that use the CPUs: one instance on all of
    them, one instance per CPU, and one single-thread instance."""
    return sorted({(1, cpus), (cpus, 1), (1, 1)}, key=lambda c: (-c[0] * c[1], c))


def onnx_argv(model_dir: Path, onnx: Path, port: int, instances: int, threads: int) -> list[str]:
    return [sys.executable, str(ROOT / "bench/peers/onnx_server.py"), "--model-dir",
            str(model_dir), "--onnx", str(onnx), "--host", "127.0.0.1", "--port", str(port),
            "--instances", str(instances), "--threads", str(threads)]  # fmt: skip


def tune_peer_d(
    o: Options, cpus: int, request_set: list[bytes], labels: Sequence[str], log: Any
) -> dict[str, Any]:
    """Serve a few seconds at 1 and 16 clients in each candidate setting; the best
    geometric-mean throughput wins (a user would pick it the same way)."""
    onnx = onnx_int8_model(o.model_dir, o.cache, log)
    short = replace(o, concurrency=PEER_D_TUNING_LEVELS, rounds=1,
                    duration=min(PEER_D_TUNING_SECONDS, o.duration),
                    warmup=min(1.0, o.warmup))  # fmt: skip
    trials = []
    for instances, threads in peer_d_candidates(cpus):
        port = free_port()
        argv = onnx_argv(o.model_dir, onnx, port, instances, threads)
        with running_command(argv, peer_env(), port, o.startup_timeout) as proc:
            windows = load({"onnx": (port, proc.pid)}, {"onnx_int8": request_set}, labels,
                           short, log)  # fmt: skip
        rps = {w.concurrency: w.summary()["throughput_rps"] for w in windows}
        score = statistics.geometric_mean(max(v, 1e-9) for v in rps.values())
        trials.append({"instances": instances, "threads": threads,
                       "throughput_rps": rps, "geomean_rps": round(score, 2)})  # fmt: skip
        log(f"peer (d) {instances} instance(s) x {threads} thread(s): {rps}")
    best = max(trials, key=lambda t: t["geomean_rps"])
    return {"candidates": trials, "chosen": {"instances": best["instances"],
                                             "threads": best["threads"]}}  # fmt: skip


@contextmanager
def servers(o: Options, threads: int, log: Any) -> Iterator[dict[str, tuple[int, int]]]:
    """Every chosen system running on its own loopback port: system -> (port, pid)."""
    with ExitStack() as stack:
        running: dict[str, tuple[int, int]] = {}
        for system in o.systems:
            port = free_port()
            if system == "exitserve":
                opts = hb.Options(model_dir=o.model_dir, concurrency=o.concurrency, threads=threads)
                argv = [sys.executable, "-m", "app.cli", "serve"]
                env = hb.server_env(opts, port, threads)
            elif system == "naive":
                argv = [sys.executable, str(ROOT / "bench/peers/naive_server.py")]
                argv += ["--model-dir", str(o.model_dir), "--host", "127.0.0.1"]
                argv += ["--port", str(port)]
                env = peer_env()
            elif system == "onnx":
                onnx = onnx_int8_model(o.model_dir, o.cache, log)
                instances, peer_threads = o.peer_d or (1, threads)
                argv = onnx_argv(o.model_dir, onnx, port, instances, peer_threads)
                env = peer_env()
            else:
                raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")
            log(f"starting {system} on port {port}")
            proc = stack.enter_context(running_command(argv, env, port, o.startup_timeout))
            running[system] = (port, proc.pid)
        yield running


def load(
    ports: dict[str, tuple[int, int]],
    request_sets: dict[str, list[bytes]],
    labels: Sequence[str],
    o: Options,
    log: Any,
) -> list[hb.Window]:
    """Every configuration in `request_sets` against the server of its system."""
    targets = {name: ports[CONFIGS[name][0]] for name in request_sets}
    window_s = o.duration / o.rounds
    return run_async(
        hb.http_load(targets, request_sets, labels, o.concurrency, o.rounds, o.warmup,
                     window_s, log)
    )  # fmt: skip


def run(o: Options, command: str = "") -> tuple[dict[str, Any], Path]:
    from app.benchmark import write_results
    from app.config import usable_cpus
    from app.network.artifact import load as load_model
    from app.training.evaluate import split_data

    log = (lambda m: None) if o.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if o.rounds < 1 or o.duration <= 0 or not o.concurrency or min(o.concurrency) < 1:
        raise ValueError("need rounds >= 1, duration > 0 and concurrency levels >= 1")
    o.model_dir = o.model_dir.resolve()
    threads = o.threads or usable_cpus()
    loaded = load_model(o.model_dir)
    spec = loaded.spec
    enc = spec.config.encoder
    texts, y = split_data(spec, "test")
    labels = [spec.labels[int(i)] for i in y]
    tokens = [len(t) for t in loaded.tokenizer.encode(texts)]
    del loaded
    log(f"measuring peak matmul on {threads} threads")
    peak = peak_matmul_gflops(threads)
    configs = [name for name, (system, _) in CONFIGS.items() if system in o.systems]
    request_sets = {
        name: [
            build_request(
                HOST,
                "/predict",
                json.dumps(
                    {"inputs": t, "parameters": CONFIGS[name][1]}, ensure_ascii=False
                ).encode(),
            )
            for t in texts
        ]
        for name in configs
    }
    peer_d: dict[str, Any] = {}
    if "onnx" in o.systems:
        if o.peer_d is None:
            peer_d = tune_peer_d(o, threads, request_sets["onnx_int8"], labels, log)
            o.peer_d = (peer_d["chosen"]["instances"], peer_d["chosen"]["threads"])
        peer_d["instances"], peer_d["threads"] = o.peer_d
        peer_d["max_delay_ms"] = 0
    with servers(o, threads, log) as ports:
        windows = load(ports, request_sets, labels, o, log)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for c in o.concurrency:
        for name in configs:
            ws = [w for w in windows if w.config == name and w.concurrency == c]
            row = {"config": name, "system": CONFIGS[name][0], "concurrency": c}
            row.update(hb.aggregate(ws))
            samples = [s for w in ws for s in w.samples]
            seconds = sum(w.seconds for w in ws)
            g = useful_gflops(
                samples, tokens, seconds, enc.hidden_size, enc.intermediate_size, enc.num_layers
            )
            row["useful_gflops"] = round(g, 2)
            row["fraction_of_peak"] = round(g / peak, 4) if peak > 0 else 0.0
            rows[(name, c)] = row
    calibrated = [s for w in windows if w.config == "calibrated" for s in w.samples]
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    result: dict[str, Any] = {
        "kind": "bench",
        "model": spec.name,
        "model_dir": str(o.model_dir),
        "num_layers": enc.num_layers,
        "date": date,
        "host": host,
        "command": command,
        "cpu": platform.processor() or platform.machine(),
        "usable_cpus": usable_cpus(),
        "threads": threads,
        "python": platform.python_version(),
        "peak_gflops": round(peak, 1),
        "options": {
            "duration": o.duration,
            "rounds": o.rounds,
            "warmup": o.warmup,
            "concurrency": list(o.concurrency),
            "systems": list(o.systems),
            "configs": {k: CONFIGS[k] for k in configs},
        },
        "peer_d": peer_d,
        "texts_tokens": tokens,
        "results": list(rows.values()),
        "bars": check_bars(rows),
        "exit_histogram": exit_histogram(calibrated, enc.num_layers) if calibrated else {},
        "windows": [w.summary() for w in windows],
    }
    stem = f"{date[:10]}-{o.tag or host}"
    path = write_results(o.out, stem, result, markdown(result))
    plot(result, o.out / f"{stem}-latency.png", o.out / f"{stem}-exits.png")
    return result, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness.py", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--duration", type=float, default=15.0, help="measured s per row")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=1, help="windows per row, order rotating")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded s before each window")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--threads", type=int, help="exitserve threads (default: usable CPUs)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", help="names the result files (default: the host name)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--peer-d",
        type=int,
        nargs=2,
        metavar=("INSTANCES", "THREADS"),
        help="peer (d)'s setting (default: the best measured before the run)",
    )
    a = p.parse_args(argv)
    o = hb.options_from(Options, a, peer_d=tuple(a.peer_d) if a.peer_d else None)
    command = " ".join(["bench/harness.py", *(sys.argv[1:] if argv is None else argv)])
    result, path = run(o, command)
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
