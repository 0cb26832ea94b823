"""HTTP load benchmark: the real server, calibrated early exit against full depth.

Starts the real server (`python -m app.cli serve`) on a free loopback port and drives
it with the benchmarks' own keep-alive client (`bench/client.py`, and why it is kept).
Closed loop: each of C workers owns one connection and sends its next request the
moment the last one is answered, one test-split text per request, cycling, each worker
at its own offset.

Two configurations, on the same server, interleaved in alternating order over
`--rounds` windows at each concurrency level:
  calibrated   no `threshold` parameter: the model's calibrated per-exit thresholds
  full_depth   `"threshold": 1.0`: every input runs every layer
Then, with the server stopped, the engine alone (no HTTP) is timed in this process at
concurrency 1 on the same texts for the same duration, to show what HTTP adds.

Reported per (configuration, concurrency): requests, failures (any non-200 answer or
broken connection; counted, never raised), throughput (successful requests/s),
p50/p95/p99 latency, mean exit layer, accuracy, and server CPU ms per request (from
/proc/<pid>/stat); and the ratios calibrated / full_depth. Raw JSON and a markdown
table are written to OUT/http-<model>-<date>-<host>.{json,md}; the table is printed.

Usage:
  .venv/bin/python bench/http_bench.py MODEL_DIR [--duration 20] [--concurrency 1 8]
      [--rounds 3] [--warmup 2] [--threads N] [--max-batch-size 32]
      [--max-queue-delay-ms 2] [--batching static|continuous] [--device cpu]
      [--quantization auto] [--out bench/results]

`--duration` is the measured seconds per (configuration, concurrency) row, split evenly
over the `--rounds` windows; every window first runs `--warmup` seconds of load that is
not recorded. Example, the default model, about 3 minutes with the defaults:
  .venv/bin/python bench/http_bench.py models/rt-sentiment-minilm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.client import (
    HOST,
    Connection,
    build_request,
    percentile,
    process_cpu_seconds,
    run_async,
)
from devtools.server_process import exitserve_env, exitserve_server, http_get

CONFIGS: dict[str, dict[str, Any]] = {"calibrated": {}, "full_depth": {"threshold": 1.0}}
T = TypeVar("T")
O = TypeVar("O")


# -- pure pieces: HTTP parsing, statistics, aggregation, ratios, report -----------------
class Sample(NamedTuple):
    """One request answered inside a measured window."""

    latency_s: float
    status: int  # 0: the connection broke or the answer could not be parsed
    exit_layer: int | None
    correct: bool | None
    text_index: int  # which test text


@dataclass
class Window:
    """One measured window of one configuration at one concurrency."""

    config: str
    concurrency: int
    round: int
    seconds: float
    server_cpu_s: float  # the server process, or this process for the in-process engine
    client_cpu_s: float  # this process (the load generator)
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = sum(1 for s in self.samples if s.status == 200)
        return {
            "config": self.config,
            "concurrency": self.concurrency,
            "round": self.round,
            "seconds": round(self.seconds, 4),
            "requests": len(self.samples),
            "failures": len(self.samples) - ok,
            "throughput_rps": round(ok / self.seconds, 2) if self.seconds > 0 else 0.0,
            "server_cpu_s": round(self.server_cpu_s, 3),
            "client_cpu_s": round(self.client_cpu_s, 3),
        }


def aggregate(windows: Sequence[Window]) -> dict[str, Any]:
    """Pool the windows of one (configuration, concurrency): totals over total time,
    percentiles over every successful request's latency."""
    samples = [s for w in windows for s in w.samples]
    ok = [s for s in samples if s.status == 200]
    seconds = sum(w.seconds for w in windows)
    n = len(samples)
    lat_ms = [1000 * s.latency_s for s in ok]
    exits = [s.exit_layer for s in ok if s.exit_layer is not None]
    judged = [s.correct for s in ok if s.correct is not None]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1

    def per_request(total: float) -> float | None:
        return round(1000 * total / n, 3) if n else None

    return {
        "requests": n,
        "failures": n - len(ok),
        "statuses": statuses,
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
        "throughput_rps_per_window": [
            round(sum(1 for s in w.samples if s.status == 200) / w.seconds, 2)
            for w in windows
            if w.seconds > 0
        ],
        "p50_ms": round(percentile(lat_ms, 50), 3) if lat_ms else None,
        "p95_ms": round(percentile(lat_ms, 95), 3) if lat_ms else None,
        "p99_ms": round(percentile(lat_ms, 99), 3) if lat_ms else None,
        "mean_ms": round(sum(lat_ms) / len(lat_ms), 3) if lat_ms else None,
        "mean_exit_layer": round(sum(exits) / len(exits), 4) if exits else None,
        "accuracy": round(sum(judged) / len(judged), 4) if judged else None,
        "server_cpu_ms_per_request": per_request(sum(w.server_cpu_s for w in windows)),
        "client_cpu_ms_per_request": per_request(sum(w.client_cpu_s for w in windows)),
    }


def correctness_by_text(windows: Sequence[Window]) -> dict[int, bool]:
    return {
        s.text_index: s.correct
        for w in windows
        for s in w.samples
        if s.status == 200 and s.correct is not None
    }


def paired_accuracy_difference(a: dict[int, bool], b: dict[int, bool]) -> tuple[float | None, int]:
    """Accuracy of `a` minus `b` over the texts both answered, and how many those are."""
    common = a.keys() & b.keys()
    if not common:
        return None, 0
    return sum(int(a[i]) - int(b[i]) for i in common) / len(common), len(common)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def pooled_accuracy(rows: dict[tuple[str, int], dict[str, Any]], config: str) -> float | None:
    """Accuracy of one configuration over all its concurrency levels, weighted by the
    successful requests of each."""
    judged = [
        (r["accuracy"], r["requests"] - r["failures"])
        for (k, _), r in rows.items()
        if k == config and r.get("accuracy") is not None
    ]
    n = sum(w for _, w in judged)
    return sum(a * w for a, w in judged) / n if n else None


def compute_ratios(
    rows: dict[tuple[str, int], dict[str, Any]],
    in_process: dict[str, Any] | None,
    paired: tuple[float | None, int] = (None, 0),
) -> dict[str, Any]:
    """calibrated / full_depth throughput at each concurrency, the p50 ratio at the
    lowest concurrency, the accuracy difference, and HTTP c1 / in-process."""
    levels = sorted({c for _, c in rows})
    out: dict[str, Any] = {}
    for c in levels:
        cal, full = rows.get(("calibrated", c)), rows.get(("full_depth", c))
        if cal and full:
            out[f"throughput_calibrated_over_full_depth@c{c}"] = _ratio(
                cal["throughput_rps"], full["throughput_rps"]
            )
    if levels:
        c = levels[0]
        cal, full = rows.get(("calibrated", c)), rows.get(("full_depth", c))
        if cal and full:
            out[f"p50_calibrated_over_full_depth@c{c}"] = _ratio(cal["p50_ms"], full["p50_ms"])

    acc_cal, acc_full = pooled_accuracy(rows, "calibrated"), pooled_accuracy(rows, "full_depth")
    out["accuracy_calibrated_minus_full_depth"] = (
        round(acc_cal - acc_full, 4) if acc_cal is not None and acc_full is not None else None
    )
    diff, n = paired
    out["accuracy_calibrated_minus_full_depth_paired"] = (
        round(diff, 4) if diff is not None else None
    )
    out["accuracy_paired_texts"] = n
    http1 = rows.get(("calibrated", 1))
    if http1 and in_process:
        out["throughput_http_c1_calibrated_over_in_process"] = _ratio(
            http1["throughput_rps"], in_process["throughput_rps"]
        )
        if http1["p50_ms"] is not None and in_process["p50_ms"] is not None:
            out["p50_http_c1_calibrated_minus_in_process_ms"] = round(
                http1["p50_ms"] - in_process["p50_ms"], 3
            )
    return out


def _fmt(v: Any, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def markdown(r: dict[str, Any]) -> str:
    s, o = r["server"], r["options"]
    lines = [
        f"# HTTP benchmark: {r['model']} ({r['date']}, {r['host']})",
        "",
        f"Real server (`exitserve serve`, {s['device']}/{s['dtype']},"
        f" {s.get('workers') or 1} worker(s) of {s['threads']} thread(s),"
        f" max batch {s['max_batch_size']}, max queue delay {s['max_queue_delay_ms']:g} ms,"
        f" {o.get('batching', 'static')} batching)"
        f" on {r['usable_cpus']} usable CPUs shared with the load generator. Closed-loop"
        f" keep-alive clients, one text per request, {r['texts']} test-split texts cycled."
        f" {o['duration']:g} s measured per row in {o['rounds']} interleaved windows, each"
        f" after {o['warmup']:g} s of unrecorded warm-up. Latency percentiles over every"
        " successful request; CPU is the server process's (in-process: this process's).",
        "",
        "| configuration | concurrency | requests | failures | req/s | p50 ms | p95 ms |"
        " p99 ms | mean exit | accuracy | server CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = list(r["results"])
    if r.get("in_process"):
        table.append({**r["in_process"], "config": "in-process engine (no HTTP)"})
    for row in table:
        acc = None if row["accuracy"] is None else 100 * row["accuracy"]
        lines.append(
            f"| {row['config']} | {row['concurrency']} | {row['requests']} |"
            f" {row['failures']} | {_fmt(row['throughput_rps'])} | {_fmt(row['p50_ms'], '.2f')}"
            f" | {_fmt(row['p95_ms'], '.2f')} | {_fmt(row['p99_ms'], '.2f')} |"
            f" {_fmt(row['mean_exit_layer'], '.2f')} / {r['num_layers']} |"
            f" {_fmt(acc, '.1f', '%')} | {_fmt(row['server_cpu_ms_per_request'], '.2f')} |"
        )
    labels = {
        "throughput_calibrated_over_full_depth": "throughput, calibrated / full_depth",
        "p50_calibrated_over_full_depth": "p50 latency, calibrated / full_depth",
        "throughput_http_c1_calibrated_over_in_process": (
            "throughput, HTTP concurrency 1 calibrated / in-process engine"
        ),
    }
    lines += ["", "| ratio | value |", "|---|---|"]
    ratios = r["ratios"]
    for key, value in ratios.items():
        name, _, at = key.partition("@c")
        if name in labels:
            where = f", concurrency {at}" if at else ""
            lines.append(f"| {labels[name]}{where} | {_fmt(value, '.2f', 'x')} |")
    diff = ratios.get("accuracy_calibrated_minus_full_depth")
    paired = ratios.get("accuracy_calibrated_minus_full_depth_paired")
    diff_pts = None if diff is None else 100 * diff
    paired_pts = None if paired is None else 100 * paired
    n_paired = ratios.get("accuracy_paired_texts", 0)
    lines.append(
        f"| accuracy, calibrated − full_depth | {_fmt(diff_pts, '+.2f', ' points')}"
        f" (same texts, n={n_paired}: {_fmt(paired_pts, '+.2f', ' points')}) |"
    )
    gap = ratios.get("p50_http_c1_calibrated_minus_in_process_ms")
    if gap is not None:
        lines.append(f"| p50 latency, HTTP concurrency 1 − in-process | {gap:+.2f} ms |")
    return "\n".join(lines) + "\n"


# -- the load generator ----------------------------------------------------------------
class _State:
    __slots__ = ("samples", "stopped", "t0")

    def __init__(self) -> None:
        self.t0: float | None = None  # None during warm-up: nothing is recorded
        self.stopped = False
        self.samples: list[Sample] = []


def _judge(body: bytes, label: str) -> tuple[int | None, bool | None]:
    pred = json.loads(body)["predictions"][0]
    return int(pred["exit_layer"]), pred["label"] == label


async def _http_worker(
    conn: Connection,
    requests: Sequence[bytes],
    labels: Sequence[str],
    cursors: list[int],
    i: int,
    state: _State,
) -> None:
    n = len(requests)
    while not state.stopped:
        k = cursors[i] % n
        cursors[i] = k + 1
        started = time.perf_counter()
        try:
            resp = await conn.send(requests[k])
        except asyncio.CancelledError:
            conn.close()  # an answer may still be on its way: never reuse this connection
            raise
        latency = time.perf_counter() - started
        if state.t0 is None or state.stopped:
            continue
        status, exit_layer, correct = 0 if resp is None else resp.status, None, None
        if status == 200 and resp is not None:
            try:
                exit_layer, correct = _judge(resp.body, labels[k])
            except (ValueError, KeyError, IndexError, TypeError):
                status = 0
        state.samples.append(Sample(latency, status, exit_layer, correct, k))
        if status == 0:
            await asyncio.sleep(0.01)  # do not spin on a dead server


async def _in_process_worker(
    engine: Any, texts: Sequence[str], labels: Sequence[str], cursors: list[int], state: _State
) -> None:
    n = len(texts)
    while not state.stopped:
        k = cursors[0] % n
        cursors[0] = k + 1
        started = time.perf_counter()
        try:
            answer = (await engine.submit([texts[k]]))[0]
            status = 200
        except Exception:
            answer, status = None, 0
        latency = time.perf_counter() - started
        if state.t0 is None or state.stopped:
            continue
        if answer is None:
            state.samples.append(Sample(latency, status, None, None, k))
        else:
            state.samples.append(
                Sample(latency, status, answer.exit_layer, answer.label == labels[k], k)
            )


async def run_window(
    workers: Sequence[Coroutine[Any, Any, None]],
    state: _State,
    warmup: float,
    seconds: float,
    cpu_pid: int,
    drain_timeout: float = 60.0,
) -> tuple[float, float, float]:
    """Run the workers (which share `state`): `warmup` s unrecorded, then `seconds` s
    recorded. Returns (measured seconds, CPU s of `cpu_pid`, CPU s of this process)."""
    tasks = [asyncio.ensure_future(w) for w in workers]
    try:
        await asyncio.sleep(warmup)
        cpu0, own0 = process_cpu_seconds(cpu_pid), time.process_time()
        state.t0 = t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        state.stopped = True
        t1 = time.perf_counter()
        cpu1, own1 = process_cpu_seconds(cpu_pid), time.process_time()
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for t in pending:
            t.cancel()
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return t1 - t0, cpu1 - cpu0, own1 - own0


def _event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


async def http_load(
    targets: dict[str, tuple[int, int]],
    request_sets: dict[str, list[bytes]],
    labels: Sequence[str],
    concurrency: Sequence[int],
    rounds: int,
    warmup: float,
    window_seconds: float,
    log: Any = None,
) -> list[Window]:
    """Every configuration at every concurrency, interleaved: at each level, `rounds`
    rounds, the configuration that goes first rotating so that drift hits all alike.
    `targets` maps each configuration to the (port, pid) of the server it runs on."""
    windows: list[Window] = []
    n = len(labels)
    names = list(request_sets)
    for ci, c in enumerate(concurrency):
        # Each configuration walks the texts from the same offsets, one per worker.
        cursors = {name: [i * n // c for i in range(c)] for name in names}
        for r in range(rounds):
            k = (r + ci) % len(names)
            for name in names[k:] + names[:k]:
                port, pid = targets[name]
                conns = [Connection(HOST, port) for _ in range(c)]
                state = _State()
                workers = [
                    _http_worker(conns[i], request_sets[name], labels, cursors[name], i, state)
                    for i in range(c)
                ]
                try:
                    secs, server_cpu, own_cpu = await run_window(
                        workers, state, warmup, window_seconds, pid
                    )
                finally:
                    for conn in conns:
                        conn.close()
                w = Window(name, c, r, secs, server_cpu, own_cpu, state.samples)
                windows.append(w)
                if log:
                    log(json.dumps(w.summary()))
    return windows


# -- the server ------------------------------------------------------------------------
# Counters the server keeps about exits (after a run they must match what was served),
# and where its time went: queued, or in inference.
EXIT_METRICS = (
    "exitserve_exits_total",
    "exitserve_layers_executed_total",
    "exitserve_layers_skipped_total",
    "exitserve_audit_answers_total",
    "exitserve_batch_size_count",
    "exitserve_batch_size_sum",
    "exitserve_queue_duration_seconds_count",
    "exitserve_queue_duration_seconds_sum",
    "exitserve_inference_duration_seconds_count",
    "exitserve_inference_duration_seconds_sum",
)


def exit_metric_lines(exposition: str) -> list[str]:
    """The exit-related samples of a Prometheus text exposition, in its order."""
    return [
        line
        for line in exposition.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] in EXIT_METRICS
    ]


@dataclass
class Options:
    model_dir: Path
    out: Path = Path("bench/results")
    duration: float = 20.0
    concurrency: list[int] = field(default_factory=lambda: [1, 8])
    rounds: int = 3
    warmup: float = 2.0
    threads: int | None = None  # None: the CPUs this process may use
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    batching: str = "static"
    workers: int | None = None  # None: the server's default
    device: str = "cpu"
    quantization: str = "auto"
    startup_timeout: float = 300.0
    in_process: bool = True
    quiet: bool = False
    tag: str | None = None  # names the result files; default: the host name


def server_env(o: Options, port: int, threads: int) -> dict[str, str]:
    settings: dict[str, object] = {
        "model_dir": o.model_dir,
        "threads": threads,
        "device": o.device,
        "quantization": o.quantization,
        "max_batch_size": o.max_batch_size,
        "max_queue_delay_ms": o.max_queue_delay_ms,
        "batching": o.batching,
        "max_queue_size": max(256, *o.concurrency),
        "drain_timeout_s": 5,
        "log_level": "warning",  # the run's output stays the benchmark's
    }
    if o.workers is not None:
        settings["workers"] = o.workers
    return exitserve_env(port, settings)


def running_server(
    o: Options, threads: int
) -> AbstractContextManager[tuple[subprocess.Popen[bytes], int]]:
    """The server with this benchmark's settings."""
    return exitserve_server(lambda port: server_env(o, port, threads), o.startup_timeout)


# -- the whole run ---------------------------------------------------------------------
def in_process_run(o: Options, threads: int, texts: Sequence[str], labels: Sequence[str]) -> Window:
    """The engine in this process, one text at a time, calibrated thresholds, no HTTP."""
    from app.engine.runtime import load_runtime, worker_plan
    from app.engine.scheduler import Engine

    continuous = o.batching == "continuous"
    workers, per_worker = worker_plan(o.device, threads, o.workers, continuous)
    rt = load_runtime(o.model_dir, o.device, o.quantization, per_worker)
    engine = Engine(
        rt,
        max_batch_size=o.max_batch_size,
        max_queue_delay_s=o.max_queue_delay_ms / 1000,
        max_queue_size=max(256, *o.concurrency),
        continuous=continuous,
        workers=workers,
    )
    engine.start()
    try:
        state = _State()
        secs, cpu, own = run_async(
            run_window(
                [_in_process_worker(engine, texts, labels, [0], state)],
                state,
                o.warmup,
                o.duration,
                os.getpid(),
            )
        )
    finally:
        engine.stop(5.0)
    return Window("in_process", 1, 0, secs, cpu, own, state.samples)


def run(o: Options) -> tuple[dict[str, Any], Path]:
    from app.benchmark import write_results
    from app.config import usable_cpus
    from app.network.artifact import read_spec
    from app.training.evaluate import split_data

    log = (lambda m: None) if o.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if o.rounds < 1 or o.duration <= 0 or not o.concurrency or min(o.concurrency) < 1:
        raise ValueError("need rounds >= 1, duration > 0 and concurrency levels >= 1")
    model_dir = o.model_dir.resolve()
    o = replace(o, model_dir=model_dir)
    threads = o.threads or usable_cpus()
    spec = read_spec(model_dir)
    texts, y = split_data(spec, "test")
    labels = [spec.labels[int(i)] for i in y]
    if not texts:
        raise ValueError("the test split is empty")
    request_sets = {
        name: [
            build_request(
                HOST,
                "/predict",
                json.dumps({"inputs": t, "parameters": params}, ensure_ascii=False).encode(),
            )
            for t in texts
        ]
        for name, params in CONFIGS.items()
    }
    window_seconds = o.duration / o.rounds
    log(f"starting server: {model_dir} ({threads} threads)")
    with running_server(o, threads) as (proc, port):
        server_info = json.loads(http_get(port, "/info")[1])
        log(f"server ready on port {port}, pid {proc.pid}")
        windows = run_async(
            http_load(
                dict.fromkeys(CONFIGS, (port, proc.pid)),
                request_sets,
                labels,
                o.concurrency,
                o.rounds,
                o.warmup,
                window_seconds,
                log,
            )
        )
        server_metrics = exit_metric_lines(http_get(port, "/metrics")[1].decode())
    log("server stopped")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for c in o.concurrency:
        for name in CONFIGS:
            ws = [w for w in windows if w.config == name and w.concurrency == c]
            rows[(name, c)] = {"config": name, "concurrency": c, **aggregate(ws)}
    in_process = None
    if o.in_process:
        log("in-process engine, concurrency 1")
        w = in_process_run(o, threads, texts, labels)
        in_process = {"config": "in_process", "concurrency": 1, **aggregate([w])}
        windows.append(w)
    paired = paired_accuracy_difference(
        correctness_by_text([w for w in windows if w.config == "calibrated"]),
        correctness_by_text([w for w in windows if w.config == "full_depth"]),
    )
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    result: dict[str, Any] = {
        "kind": "http",
        "model": server_info.get("model", spec.name),
        "model_dir": str(model_dir),
        "num_layers": server_info.get("num_layers", spec.config.num_layers),
        "exit_thresholds": server_info.get("exit_thresholds"),
        "date": date,
        "host": host,
        "cpu": platform.processor() or platform.machine(),
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
        "event_loop": _event_loop_name(),
        "server": {
            k: server_info.get(k)
            for k in (
                "device",
                "dtype",
                "threads",
                "workers",
                "max_batch_size",
                "max_queue_delay_ms",
                "max_queue_size",
            )
        },
        "options": {
            "batching": o.batching,
            "duration": o.duration,
            "rounds": o.rounds,
            "warmup": o.warmup,
            "window_seconds": window_seconds,
            "concurrency": list(o.concurrency),
            "configs": CONFIGS,
        },
        "texts": len(texts),
        "mean_text_chars": round(sum(map(len, texts)) / len(texts), 1),
        "results": list(rows.values()),
        "in_process": in_process,
        "ratios": compute_ratios(rows, in_process, paired),
        "windows": [w.summary() for w in windows],
        "server_metrics": server_metrics,
    }
    stem = f"http-{result['model']}-{date[:10]}-{o.tag or host}"
    return result, write_results(o.out, stem, result, markdown(result))


def options_from(cls: type[O], a: argparse.Namespace, **overrides: Any) -> O:
    """A script's options dataclass from its parsed arguments: every field the arguments
    name, then `overrides` for those that need converting; the rest keep their defaults."""
    given = {f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}  # type: ignore[arg-type]
    return cls(**{**given, **overrides})


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The options every load script shares: how to start the server, where results go."""
    p.add_argument("--device", default="cpu", help="server device: cpu | cuda | auto")
    p.add_argument("--quantization", default="auto", help="auto | int8 | fp16 | bf16 | none")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="s to wait for /readyz")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="http_bench.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--duration", type=float, default=20.0, help="measured s per row")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="levels")
    p.add_argument("--rounds", type=int, default=3, help="interleaved windows per row")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded s before each window")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads, server and in-process; 0: usable CPUs",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="server setting")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="server setting")
    p.add_argument("--batching", default="static", choices=("static", "continuous"))
    p.add_argument("--workers", type=int, help="server setting (default: the server's)")
    add_server_arguments(p)
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process run")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    o = options_from(Options, a, threads=a.threads or None, in_process=not a.no_in_process)
    result, path = run(o)
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
