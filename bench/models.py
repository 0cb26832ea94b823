"""Two models in one server: a flood on one, light traffic to the other, and memory.

One run on loopback, the real server with `--flooded` (default: the sentiment model) and
`--light` (the topic model):
  1. the light model alone, `--light-rate` requests/s (open loop, one test-split text per
     request) for `--seconds`: its p99 on an idle server;
  2. the flooded model's capacity: a closed loop of 64 clients for `--capacity-seconds`;
  3. both at once: the flooded model offered `--overload` times that capacity, the light
     one `--light-rate`, for `--seconds`: every light request must be answered, its p99
     at most 3x the idle one;
  4. memory of that server after the run, and of a server of the flooded model alone
     after the same warm-up: two models at most 1.5x one, one at most 600 MB. Memory is
     the sum of the proportional set sizes of the server's processes (`tree_pss_bytes`):
     with a process per model (`--isolation process`, the default) a page the model
     processes share is counted once, as the kernel holds it; for one process it is
     its VmRSS less what it shares with other processes.
  5. unloading the light model (explicit model control) halfway through `--seconds` of
     traffic to both, the flooded model at half its capacity: every request of either
     must get an answer (none broken), the flooded model's all 200, the light model's
     200 or, once the unload has begun, 503.
Results: OUT/models-<date>-<tag or host>.{json,md}.

Usage:
  .venv/bin/python -m bench.models [--flooded DIR] [--light DIR] [--seconds 20]
      [--overload 3] [--light-rate 10] [--isolation process|thread]
      [--out bench/results] [--tag NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.client import HOST, Reply, build_request, closed_loop, open_loop, percentile, run_async
from bench.soak import tree_pss_bytes
from devtools.server_process import ROOT, exitserve_env, exitserve_server

MODELS = ROOT / "models"


def requests_for(model_dir: Path, name: str | None, limit: int = 256) -> list[bytes]:
    from app.network.artifact import read_spec
    from app.training.evaluate import split_data

    texts = split_data(read_spec(model_dir), "test")[0][:limit]
    extra = {} if name is None else {"model": name}
    return [
        build_request(HOST, "/predict", json.dumps({"inputs": t, **extra}).encode()) for t in texts
    ]


def summary(replies: list[Reply], offered: int, seconds: float) -> dict[str, Any]:
    ok = [1000 * r.latency_s for r in replies if r.status == 200]
    # What the server measured (x-total-time: route entered to answer), and of that the
    # engine's part (queue and inference): the rest of `ok` is the event loop and sockets.
    heads = [r.response.headers for r in replies if r.response is not None and r.status == 200]
    server = [float(h["x-total-time"]) for h in heads]
    engine = [float(h["x-queue-time"]) + float(h["x-inference-time"]) for h in heads]
    statuses: dict[str, int] = {}
    for r in replies:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "offered": offered,
        "sent": len(replies),
        "answered": len(ok),
        "statuses": statuses,
        "answered_rps": round(len(ok) / seconds, 1),
        "p50_ms": round(percentile(ok, 50), 2) if ok else None,
        "p99_ms": round(percentile(ok, 99), 2) if ok else None,
        "server_p99_ms": round(percentile(server, 99), 2) if server else None,
        "engine_p99_ms": round(percentile(engine, 99), 2) if engine else None,
    }


def light_loop(
    port: int, requests: list[bytes], rate: float, seconds: float
) -> tuple[list[Reply], int, float]:
    return run_async(open_loop(port, requests, rate, seconds, 16))


def settings(model_dirs: list[Path], isolation: str = "process") -> dict[str, object]:
    return {"model_dir": ",".join(str(d) for d in model_dirs), "log_level": "warning",
            "max_queue_size": 1024, "isolation": isolation,
            "model_control": "explicit"}  # fmt: skip


def post(port: int, path: str) -> int:
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=120) as r:
        return int(r.status)


async def unload_under_traffic(
    port: int, flood: list[bytes], light: list[bytes], name: str, rate: float, seconds: float
) -> dict[str, Any]:
    """Traffic to both models; halfway through, the light one is unloaded."""
    flooded = asyncio.create_task(open_loop(port, flood, rate, seconds, 64))
    lit = asyncio.create_task(open_loop(port, light, 10.0, seconds, 16))
    await asyncio.sleep(seconds / 2)
    status = await asyncio.to_thread(post, port, f"/v2/repository/models/{name}/unload")
    out: dict[str, Any] = {"unload_status": status}
    for key, task in (("flooded", flooded), ("light", lit)):
        replies, offered, took = await task
        out[key] = summary(replies, offered, took)
        out[key]["broken"] = sum(r.response is None for r in replies)
    return out


async def warm(port: int, sets: list[list[bytes]]) -> None:
    for requests in sets:
        await closed_loop(port, requests, 8, 2.0)


def run(a: argparse.Namespace) -> dict[str, Any]:
    from app.network.artifact import read_spec

    flooded_name, light_name = read_spec(a.flooded).name, read_spec(a.light).name
    flood = requests_for(a.flooded, None)  # the default model: no "model" in the body
    light = requests_for(a.light, light_name)
    result: dict[str, Any] = {"flooded": flooded_name, "light": light_name}
    env = settings([a.flooded, a.light], a.isolation)
    with exitserve_server(lambda port: exitserve_env(port, env), 300) as (proc, port):
        run_async(warm(port, [flood, light]))
        replies, offered, took = run_async(open_loop(port, light, a.light_rate, a.seconds, 16))
        result["light_idle"] = summary(replies, offered, took)
        capacity = run_async(closed_loop(port, flood, 64, a.capacity_seconds))
        result["flooded_capacity_rps"] = round(capacity, 1)

        # The light traffic comes from its own process, as another user's would: in the
        # flood's client its answers would wait behind thousands of the flood's.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(int).result()  # the process is up before the clock starts
            lighter = pool.submit(light_loop, port, light, a.light_rate, a.seconds)
            f_replies, f_offered, f_took = run_async(
                open_loop(port, flood, a.overload * capacity, a.seconds, 512)
            )
            l_replies, l_offered, l_took = lighter.result()
        result["flooded_under_flood"] = summary(f_replies, f_offered, f_took)
        result["light_under_flood"] = summary(l_replies, l_offered, l_took)
        result["rss_two_models_mb"] = round(tree_pss_bytes(proc.pid) / 2**20, 1)
        result["unload"] = run_async(
            unload_under_traffic(port, flood, light, light_name, capacity / 2, a.seconds)
        )
    env = settings([a.flooded])
    with exitserve_server(lambda port: exitserve_env(port, env), 300) as (proc, port):
        run_async(warm(port, [flood]))
        run_async(closed_loop(port, flood, 64, a.capacity_seconds))
        result["rss_one_model_mb"] = round(tree_pss_bytes(proc.pid) / 2**20, 1)
    idle, flooded = result["light_idle"], result["light_under_flood"]
    result["bars"] = {
        "light model: every request answered under the flood": flooded["answered"]
        == flooded["sent"]
        == flooded["offered"],
        "light model: p99 under the flood <= 3x idle": flooded["p99_ms"] is not None
        and flooded["p99_ms"] <= 3 * idle["p99_ms"],
        "RSS, two models <= 1.5x one": result["rss_two_models_mb"]
        <= 1.5 * result["rss_one_model_mb"],
        "RSS, one model <= 600 MB": result["rss_one_model_mb"] <= 600,
        "unload: every request answered, the other model's all 200": unloaded_well(
            result["unload"]
        ),
    }
    return result


def unloaded_well(u: dict[str, Any]) -> bool:
    flooded, light = u["flooded"], u["light"]
    return (
        u["unload_status"] == 200
        and flooded["broken"] == light["broken"] == 0
        and set(flooded["statuses"]) == {"200"}
        and set(light["statuses"]) <= {"200", "503"}
    )


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Two models in one server ({r['date']}, {r['host']})",
        "",
        f"{r['flooded']} flooded at {r['options']['overload']:g}x its capacity"
        f" ({r['flooded_capacity_rps']:.0f} requests/s, closed loop);"
        f" {r['light']} at {r['options']['light_rate']:g} requests/s;"
        f" isolation {r['options'].get('isolation', 'thread')}.",
        "",
        "| traffic | offered | answered | statuses | p50 ms | p99 ms | p99 in the server |"
        " p99 queue + inference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("light_idle", "light_under_flood", "flooded_under_flood"):
        s = r[key]
        lines.append(f"| {key.replace('_', ' ')} | {s['offered']} | {s['answered']} |"
                     f" {s['statuses']} | {s['p50_ms']} | {s['p99_ms']} |"
                     f" {s['server_p99_ms']} | {s['engine_p99_ms']} |")  # fmt: skip
    if "unload" in r:
        u = r["unload"]
        lines += ["", f"Unloading {r['light']} halfway through traffic to both (answer"
                  f" {u['unload_status']}): {r['flooded']} {u['flooded']['statuses']},"
                  f" {u['flooded']['broken']} broken; {r['light']} {u['light']['statuses']},"
                  f" {u['light']['broken']} broken."]  # fmt: skip
    lines += ["", f"Memory (PSS of the server's processes): one model {r['rss_one_model_mb']} MB,"
              f" two models {r['rss_two_models_mb']} MB.", "", "| bar | held |",
              "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in r["bars"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from app.benchmark import write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flooded", type=Path, default=MODELS / "rt-sentiment-minilm")
    p.add_argument("--light", type=Path, default=MODELS / "bbc-topic-minilm")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--capacity-seconds", type=float, default=8.0)
    p.add_argument("--overload", type=float, default=3.0)
    p.add_argument("--light-rate", type=float, default=10.0)
    p.add_argument("--isolation", choices=("process", "thread"), default="process")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    result = run(a)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.update(date=date, host=socket.gethostname(), options={
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})  # fmt: skip
    md = markdown(result)
    print(md)
    write_results(a.out, f"models-{date[:10]}-{a.tag or result['host']}", result, md)
    return 0 if all(result["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
