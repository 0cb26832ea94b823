"""Why the benchmarks keep their own HTTP/1.1 client: its CPU per request against httpx's.

Both drive the real server closed-loop on 16 keep-alive connections for 10 s, twice,
alternating; the client's process CPU per request is what it takes from the server on a
machine where they share the cores.

Usage:
  .venv/bin/python bench/client_cost.py models/rt-sentiment-minilm [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.http_bench import Connection, build_request
from devtools.server_process import exitserve_env, exitserve_server

BODY = json.dumps({"inputs": "a gripping, beautifully acted film that never lets go"}).encode()
CONNECTIONS, SECONDS = 16, 10.0


async def closed_loop(send: Callable[[int], Awaitable[None]]) -> tuple[int, float, float]:
    """(requests, seconds, client CPU seconds) of CONNECTIONS loops calling `send(i)`."""
    done, stop = 0, time.perf_counter() + SECONDS

    async def loop(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await send(i)
            done += 1

    cpu, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(CONNECTIONS)))
    return done, time.perf_counter() - t0, time.process_time() - cpu


async def own_client(port: int) -> tuple[int, float, float]:
    request = build_request("127.0.0.1", "/predict", BODY)
    conns = [Connection("127.0.0.1", port) for _ in range(CONNECTIONS)]

    async def send(i: int) -> None:
        if (await conns[i].roundtrip(request)).status != 200:
            raise RuntimeError("request failed")

    try:
        return await closed_loop(send)
    finally:
        for c in conns:
            c.close()


async def httpx_client(port: int) -> tuple[int, float, float]:
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:

        async def send(i: int) -> None:
            (await client.post("/predict", content=BODY, headers=headers)).raise_for_status()

        return await closed_loop(send)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args()
    settings = {"model_dir": a.model_dir.resolve(), "log_level": "warning", "latency_target_ms": 0}
    rows: dict[str, list[dict[str, float]]] = {}
    with exitserve_server(lambda port: exitserve_env(port, settings), 300) as (_, port):
        for _ in range(2):
            for name, client in (("own", own_client), ("httpx", httpx_client)):
                n, secs, cpu = asyncio.run(client(port))
                row = {"requests": n, "req_per_s": round(n / secs, 1)}
                row["client_cpu_ms_per_request"] = round(1000 * cpu / n, 3)
                rows.setdefault(name, []).append(row)
                print(name, row, flush=True)
    date = datetime.now(timezone.utc).date().isoformat()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"client-cost-{date}-{socket.gethostname()}.json"
    path.write_text(json.dumps({"connections": CONNECTIONS, "seconds": SECONDS, **rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
