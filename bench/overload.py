"""Adaptation to load, proven: static and adaptive servers at 0.5x to 5x their capacity.

One run, loopback, the real server (`python -m app.cli serve`) on the default model:

  1. capacity, on the static server (no latency target): first its saturation
     throughput, a closed loop of `--capacity-connections` clients for
     `--capacity-seconds`; then its capacity *within the target*: the highest of
     1.0, 0.9, ... 0.3 x saturation that an open loop of `--probe-seconds` serves with
     p99 within the target. The second is 1x: at saturation an open loop is critically
     loaded (its queue is a random walk, so its latency has no bound), and a service
     with a latency target is at capacity where it stops meeting it.
  2. for each configuration, a fresh server, then for each load (x capacity) an open
     loop of one-text requests with the calibrated exits (no `threshold`: the requests
     the controller may move), `--seconds` long, each request due at its own time:
       static     EXITSERVE_LATENCY_TARGET_MS=0: no target, the queue bound only
                  (the service before adaptation);
       admission  the target, MAX_ACCURACY_DROP=0: refuses what it cannot serve in time,
                  never leaves the calibrated point;
       adaptive   the target and `--drop`: moves down the ladder, then refuses;
       default    the shipped defaults (LATENCY_TARGET_MS, MAX_ACCURACY_DROP unset):
                  what a user who sets nothing gets.
     /metrics is sampled every 0.25 s for the operating point; after each load, the
     seconds until the point is back at 0 are measured.

Texts are the model's labelled test split, so every answer is also scored: served
accuracy is the share of accepted answers whose label is the true one. Reported per
configuration and load: offered and sent rates, statuses, accepted p50/p99 (from
sending), goodput (answers within the target, per second), refusals and whether each
carried Retry-After, 5xx, served accuracy, the share of samples at point 0, the
recovery time; the bars of issue 11 are checked and recorded. Results go to
OUT/overload-<model>-<date>-<tag or host>.{json,md,png}.

Usage:
  .venv/bin/python -m bench.overload models/rt-sentiment-minilm [--target-ms 200]
      [--drop 0.02] [--loads 0.5 1 2 5] [--seconds 15] [--capacity RPS] [--threads 2]
      [--connections 512] [--out bench/results] [--tag NAME]
      [--configs static admission adaptive default]
The recorded run (about 7 minutes on 2 cores): `make overload`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from bench.client import Reply, build_request, closed_loop, open_loop, percentile
from bench.http_bench import add_server_arguments, options_from
from bench.soak import _fmt
from devtools.server_process import exitserve_env, exitserve_server, http_get

CONFIGS = ("static", "admission", "adaptive", "default")


class Sample(NamedTuple):
    text: int  # which text
    status: int  # 0: the connection broke
    latency_s: float  # from sending
    point: int | None  # x-operating-point
    retry_after: bool
    label: str | None
    server_s: float | None = None  # x-total-time: what the server measured
    queue_s: float | None = None  # x-queue-time: admission to the first layer


@dataclass
class Options:
    model_dir: Path
    target_ms: float = 200.0
    drop: float = 0.02
    loads: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
    configs: tuple[str, ...] = CONFIGS
    seconds: float = 15.0
    capacity: float | None = None
    capacity_seconds: float = 10.0
    capacity_connections: int = 64
    probe_seconds: float = 5.0
    connections: int = 512
    threads: int = 2
    max_texts: int = 1024
    device: str = "cpu"
    quantization: str = "auto"
    startup_timeout: float = 300.0
    recovery_timeout: float = 30.0
    out: Path = Path("bench/results")
    tag: str = ""
    settings: dict[str, dict[str, object]] = field(default_factory=dict)


def settings_of(o: Options, config: str) -> dict[str, object]:
    base: dict[str, object] = {
        "model_dir": o.model_dir,
        "threads": o.threads,
        "device": o.device,
        "quantization": o.quantization,
        "max_queue_size": max(256, o.connections),
        "drain_timeout_s": 5,
        "log_level": "warning",
    }
    if config == "static":
        return {**base, "latency_target_ms": 0}
    if config == "default":
        return base
    drop = 0.0 if config == "admission" else o.drop
    return {**base, "latency_target_ms": o.target_ms, "max_accuracy_drop": drop}


def metric(text: str, name: str) -> float | None:
    """A metric's value in a Prometheus text page, summed over its series (one per
    model); None when it has none."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] == name
    ]
    return sum(values) if values else None


async def point_of(port: int) -> float | None:
    _, body = await asyncio.to_thread(http_get, port, "/metrics")
    return metric(body.decode(), "exitserve_operating_point")


async def sample_points(port: int, stop: asyncio.Event, every: float = 0.25) -> list[float]:
    """The operating point from /metrics, every `every` s until `stop`."""
    points: list[float] = []
    while not stop.is_set():
        value = await point_of(port)
        if value is not None:
            points.append(value)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    return points


async def recovery_seconds(port: int, timeout: float) -> float | None:
    """Seconds from now until the operating point is 0 again (None: not within timeout)."""
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < timeout:
        if await point_of(port) == 0:
            return elapsed
        await asyncio.sleep(0.1)
    return None


def ms(headers: dict[str, str], name: str) -> float | None:
    return float(headers[name]) / 1000 if name in headers else None


def sample_of(reply: Reply) -> Sample:
    r = reply.response
    if r is None:
        return Sample(reply.index, 0, reply.latency_s, None, False, None)
    point = r.headers.get("x-operating-point")
    return Sample(
        reply.index,
        r.status,
        reply.latency_s,
        None if point is None else int(point),
        "retry-after" in r.headers,
        json.loads(r.body)["predictions"][0]["label"] if r.status == 200 else None,
        ms(r.headers, "x-total-time"),
        ms(r.headers, "x-queue-time"),
    )


async def offer(
    port: int, requests: Sequence[bytes], rate: float, seconds: float, connections: int
) -> tuple[list[Sample], int]:
    """Open loop at `rate` requests/s (`client.open_loop`, sending again once on a new
    connection where an idle one was closed): (samples, offered)."""
    replies, offered, _ = await open_loop(port, requests, rate, seconds, connections, retry=True)
    return [sample_of(r) for r in replies], offered


def summarize(
    samples: Sequence[Sample],
    offered: int,
    seconds: float,
    truth: Sequence[str],
    target_s: float,
    points: Sequence[float],
) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status in (429, 503)]
    lat_ms = [1000 * s.latency_s for s in ok]
    server_ms = [1000 * s.server_s for s in ok if s.server_s is not None]
    queue_ms = [1000 * s.queue_s for s in ok if s.queue_s is not None]
    served_points = [s.point for s in ok if s.point is not None]
    return {
        "offered_rps": round(offered / seconds, 1),
        "sent_rps": round(len(samples) / seconds, 1),
        "answered": len(ok),
        "refused": len(refused),
        "refused_without_retry_after": sum(not s.retry_after for s in refused),
        "server_errors": sum(s.status >= 500 and s.status != 503 for s in samples),
        "broken": sum(s.status == 0 for s in samples),
        "other_status": sum(s.status not in (0, 200, 429, 503) and s.status < 500 for s in samples),
        "p50_ms": round(percentile(lat_ms, 50), 1) if lat_ms else None,
        "p99_ms": round(percentile(lat_ms, 99), 1) if lat_ms else None,
        "server_p50_ms": round(percentile(server_ms, 50), 1) if server_ms else None,
        "server_p99_ms": round(percentile(server_ms, 99), 1) if server_ms else None,
        "queue_p50_ms": round(percentile(queue_ms, 50), 1) if queue_ms else None,
        "queue_p99_ms": round(percentile(queue_ms, 99), 1) if queue_ms else None,
        "throughput_rps": round(len(ok) / seconds, 1),
        "goodput_rps": round(sum(s.latency_s <= target_s for s in ok) / seconds, 1),
        "served_accuracy": round(sum(s.label == truth[s.text] for s in ok) / len(ok), 4)
        if ok
        else None,
        "mean_point_served": round(sum(served_points) / len(served_points), 3)
        if served_points
        else None,
        "share_at_point_0": round(sum(p == 0 for p in points) / len(points), 3) if points else None,
        "max_point": max(points, default=0),
        "points": list(points),
    }


async def within_target(o: Options, port: int, requests: list[bytes], saturation: float) -> float:
    """The highest fraction of `saturation` served with p99 within the target (open loop)."""
    fractions = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    for f in fractions:
        samples, _ = await offer(port, requests, f * saturation, o.probe_seconds, o.connections)
        lat = [s.latency_s for s in samples if s.status == 200]
        p99 = percentile(lat, 99) if lat else float("inf")
        print(json.dumps({"probe": f, "p99_ms": round(1000 * p99, 1)}), flush=True)
        await asyncio.sleep(1.0)
        if p99 <= o.target_ms / 1000:
            return f * saturation
    return fractions[-1] * saturation


async def run_config(
    o: Options, config: str, capacity: float, requests: list[bytes], truth: list[str]
) -> list[dict[str, Any]]:
    env = settings_of(o, config)
    o.settings[config] = {k: str(v) for k, v in env.items()}
    rows = []
    with exitserve_server(lambda port: exitserve_env(port, env), o.startup_timeout) as (
        _proc,
        port,
    ):
        await closed_loop(port, requests, 8, 2.0)  # warm: batches of several sizes seen
        await asyncio.sleep(2.0)
        for load in o.loads:
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(sample_points(port, stop))
            samples, offered = await offer(
                port, requests, load * capacity, o.seconds, o.connections
            )
            stop.set()
            points = await sampler
            row = summarize(samples, offered, o.seconds, truth, o.target_ms / 1000, points)
            row["recovery_s"] = await recovery_seconds(port, o.recovery_timeout)
            row.update(config=config, load=load)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "points"}), flush=True)
            await asyncio.sleep(2.0)
    return rows


def bars(rows: list[dict[str, Any]], o: Options, calibrated_accuracy: float) -> dict[str, bool]:
    by = {(r["config"], r["load"]): r for r in rows}
    out: dict[str, bool] = {}
    a2, s2 = by.get(("adaptive", 2.0)), by.get(("static", 2.0))
    for load in (2.0, 5.0):  # the latency target held under overload (issue 26: 1.25x)
        a = by.get(("adaptive", load))
        if a:
            out[f"{load:g}x: adaptive accepted p99 <= 1.25 x target"] = (a["p99_ms"] or 1e9) <= (
                1.25 * o.target_ms
            )
    if a2 and s2:
        out["2x: adaptive goodput >= 1.5 x static"] = a2["goodput_rps"] >= 1.5 * s2["goodput_rps"]
        out["2x: served accuracy >= calibrated - drop - 0.5 point"] = (
            a2["served_accuracy"] or 0
        ) >= calibrated_accuracy - o.drop - 0.005
    adaptive = [r for r in rows if r["config"] in ("adaptive", "default")]
    out["adaptive, default: no 5xx, no broken connection"] = all(
        r["server_errors"] == 0 and r["broken"] == 0 for r in adaptive
    )
    out["adaptive, default: every refusal carries Retry-After"] = all(
        r["refused_without_retry_after"] == 0 for r in adaptive
    )
    for r in adaptive:
        if r["load"] <= 1.0:
            out[f"{r['config']} {r['load']:g}x: at point 0 >= 95% of the time"] = (
                r["share_at_point_0"] or 0
            ) >= 0.95
    out["adaptive, default: back at point 0 within 10 s after every load"] = all(
        r["recovery_s"] is not None and r["recovery_s"] <= 10 for r in adaptive
    )
    return out


def markdown(result: dict[str, Any]) -> str:
    o = result["options"]
    lines = [
        f"# Adaptation to load: {result['model']} ({result['date']}, {result['host']})",
        "",
        (
            f"Capacity within the target (static server, open loop, p99 <= target):"
            f" **{result['capacity_rps']:.0f} requests/s** (saturation, closed loop:"
            f" {result['saturation_rps']:.0f}/s)."
            if result["saturation_rps"]
            else f"Capacity given (`--capacity`): **{result['capacity_rps']:.0f} requests/s**."
        )
        + f" Target {o['target_ms']:g} ms; adaptive may drop {100 * o['drop']:g} points of"
        f" calibration accuracy (test accuracy at the calibrated point:"
        f" {100 * result['calibrated_test_accuracy']:.2f}%). {o['seconds']:g} s per load.",
        "",
        "| config | load | offered/s | answered/s | goodput/s | refused | p50 ms | p99 ms |"
        " served acc. | mean point | at point 0 | recovery s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    for r in result["rows"]:
        acc = None if r["served_accuracy"] is None else 100 * r["served_accuracy"]
        share = None if r["share_at_point_0"] is None else 100 * r["share_at_point_0"]
        lines.append(
            f"| {r['config']} | {r['load']:g}x | {r['offered_rps']:.0f} |"
            f" {r['throughput_rps']:.0f} | {r['goodput_rps']:.0f} | {r['refused']} |"
            f" {_fmt(r['p50_ms'], '.0f')} | {_fmt(r['p99_ms'], '.0f')} | {_fmt(acc, '.2f')}% |"
            f" {_fmt(r['mean_point_served'], '.2f')} | {_fmt(share, '.0f')}% |"
            f" {_fmt(r['recovery_s'], '.1f')} |"
        )
    lines += ["", "Bars:", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in result["bars"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    loads = result["options"]["loads"]
    for config in CONFIGS:
        rows = [r for r in result["rows"] if r["config"] == config]
        if not rows:
            continue
        ax[0].plot(loads, [r["goodput_rps"] for r in rows], "o-", label=config)
        if config in ("adaptive", "default"):
            t, x = 0.0, []
            for r in rows:
                x += [(t + 0.25 * i, p) for i, p in enumerate(r["points"])]
                t += 0.25 * len(r["points"]) + 2
                ax[1].axvline(t - 2, color="gray", lw=0.5)
            target = result["settings"].get(config, {}).get("latency_target_ms", "500 (default)")
            ax[1].step(
                [a for a, _ in x],
                [b for _, b in x],
                where="post",
                label=f"{config}: target {target} ms",
            )
    ax[0].set(
        xlabel="offered load (x capacity)",
        ylabel="answers within the target per second",
        title=f"goodput, target {result['options']['target_ms']:g} ms",
    )
    ax[0].legend()
    ax[1].set(
        xlabel="seconds (loads " + ", ".join(f"{x:g}x" for x in loads) + ")",
        ylabel="operating point",
        title="operating point over time",
    )
    ax[1].invert_yaxis()
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(o: Options) -> tuple[dict[str, Any], Path]:
    from app.network import artifact
    from app.training.evaluate import split_data

    spec = artifact.read_spec(o.model_dir)
    texts, y = split_data(spec, "test")
    texts, truth = texts[: o.max_texts], [spec.labels[i] for i in y[: o.max_texts]]
    requests = [
        build_request("127.0.0.1", "/predict", json.dumps({"inputs": t}).encode()) for t in texts
    ]
    capacity, saturation = o.capacity, None
    if capacity is None:
        env = settings_of(o, "static")
        with exitserve_server(lambda port: exitserve_env(port, env), o.startup_timeout) as (
            _,
            port,
        ):
            asyncio.run(closed_loop(port, requests, 8, 2.0))
            saturation = asyncio.run(
                closed_loop(port, requests, o.capacity_connections, o.capacity_seconds)
            )
            capacity = asyncio.run(within_target(o, port, requests, saturation))
        print(
            json.dumps(
                {"saturation_rps": round(saturation, 1), "capacity_rps": round(capacity, 1)}
            ),
            flush=True,
        )
    rows: list[dict[str, Any]] = []
    for config in o.configs:
        rows += asyncio.run(run_config(o, config, capacity, requests, truth))
    test_accuracy = float(spec.evaluation.get("adaptive_accuracy", 0.0))
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    host = o.tag or platform.node() or "host"
    result = {
        "model": spec.name,
        "date": date,
        "host": host,
        "capacity_rps": capacity,
        "saturation_rps": saturation,
        "calibrated_test_accuracy": test_accuracy,
        "calibrated_calibration_accuracy": spec.calibration.get("adaptive_accuracy"),
        "options": {
            "target_ms": o.target_ms,
            "drop": o.drop,
            "loads": list(o.loads),
            "seconds": o.seconds,
            "threads": o.threads,
            "connections": o.connections,
            "texts": len(texts),
        },
        "settings": o.settings,
        "rows": rows,
    }
    result["bars"] = bars(rows, o, test_accuracy)
    o.out.mkdir(parents=True, exist_ok=True)
    stem = o.out / f"overload-{spec.name}-{date}-{host}"
    # Not with_suffix: a tag may hold a dot ("admit-0.4").
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    plot(result, Path(f"{stem}.png"))
    return result, stem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--target-ms", type=float, default=200.0)
    p.add_argument("--drop", type=float, default=0.02, help="adaptive's MAX_ACCURACY_DROP")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--seconds", type=float, default=15.0, help="per load")
    p.add_argument("--capacity", type=float, default=None, help="requests/s; measured if unset")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="name for the results instead of the host")
    add_server_arguments(p)
    a = p.parse_args(argv)
    o = options_from(Options, a, loads=tuple(a.loads), configs=tuple(a.configs))
    result, stem = run(o)
    print(markdown(result))
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)
    return 0 if all(result["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
