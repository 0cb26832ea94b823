"""Run the Locust load test (`locustfile.py`) headless against a server it starts.

Starts the real server (`python -m app.cli serve`, as bench/http_bench.py does) on a
free loopback port, waits for `/readyz`, runs

  locust -f locustfile.py --headless -u USERS -r RATE -t DURATION --host URL
         --csv OUT/locust-<date>-<host> --html OUT/locust-<date>-<host>.html
         --exit-code-on-error 1

stops the server with SIGTERM (it drains, then exits 0), prints one line of totals
from Locust's CSV, and exits non-zero if any request failed, none was made, Locust
failed, or the server did not stop cleanly. Locust writes OUT/locust-<date>-<host>
{_stats.csv, _stats_history.csv, _failures.csv, _exceptions.csv} and the .html report.

Usage:
  .venv/bin/python bench/loadtest.py [MODEL_DIR] [--users 16] [--spawn-rate 4]
      [--duration 60] [--threads N] [--device cpu] [--out bench/results] [--tag NAME]
      [-- MORE LOCUST ARGUMENTS]
  make loadtest                                   # the defaults, sized for 2 cores
  make loadtest LOADTEST_ARGS="--users 4 --duration 15"
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `app` importable
    sys.path.insert(0, str(ROOT))

from bench.http_bench import Options, add_server_arguments, running_server  # noqa: E402

LOCUSTFILE = ROOT / "locustfile.py"
STOP_TIMEOUT_S = 10  # lets users finish the request in flight when the time is up


def locust_command(
    host_url: str, users: int, spawn_rate: float, duration_s: int, prefix: Path, extra: list[str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        f"{spawn_rate:g}",
        "-t",
        f"{duration_s}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--host",
        host_url,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--exit-code-on-error",
        "1",
        *extra,
    ]


@dataclass(frozen=True)
class Totals:
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def line(self) -> str:
        return (
            f"{self.requests} requests, {self.failures} failures, {self.rps:.1f} req/s, "
            f"p50 {self.p50_ms:g} ms, p95 {self.p95_ms:g} ms, p99 {self.p99_ms:g} ms"
        )


def read_totals(stats_csv: Path) -> Totals:
    """The "Aggregated" row of Locust's `<prefix>_stats.csv`. Locust rewrites the file
    every second and not at exit, so the last second's requests may be missing from it;
    its exit code (--exit-code-on-error) still counts them."""

    def number(row: dict[str, str], key: str) -> float:
        value = row.get(key, "")
        return float(value) if value not in ("", "N/A") else float("nan")

    with stats_csv.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                return Totals(
                    requests=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    rps=number(row, "Requests/s"),
                    p50_ms=number(row, "50%"),
                    p95_ms=number(row, "95%"),
                    p99_ms=number(row, "99%"),
                )
    raise ValueError(f"no Aggregated row in {stats_csv}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="loadtest.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", type=Path, nargs="?", default=Path("models/rt-sentiment-minilm"))
    p.add_argument("--users", type=int, default=16, help="concurrent Locust users")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("--duration", type=int, default=60, help="seconds of load, spawning included")
    p.add_argument("--threads", type=int, default=0, help="server torch threads; 0: usable CPUs")
    add_server_arguments(p)
    p.add_argument("--tag", default=None, help="names the result files; default: the host name")
    a = p.parse_args(argv)
    if a.users < 1 or a.spawn_rate <= 0 or a.duration < 1:
        p.error("need --users >= 1, --spawn-rate > 0 and --duration >= 1")

    from app.config import usable_cpus

    model_dir = a.model_dir.resolve()
    threads = a.threads or usable_cpus()
    o = Options(
        model_dir=model_dir,
        device=a.device,
        quantization=a.quantization,
        startup_timeout=a.startup_timeout,
        # The server's queue must hold every input in flight: up to 8 per user.
        concurrency=[8 * a.users],
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    a.out.mkdir(parents=True, exist_ok=True)
    prefix = a.out / f"locust-{date}-{a.tag or socket.gethostname()}"
    env = {**os.environ, "EXITSERVE_MODEL_DIR": str(model_dir)}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"starting server: {model_dir} ({threads} threads)")
    with running_server(o, threads) as (proc, port):
        log(f"server ready on port {port}; locust: {a.users} users for {a.duration} s")
        cmd = locust_command(
            f"http://127.0.0.1:{port}", a.users, a.spawn_rate, a.duration, prefix, extra
        )
        locust_rc = subprocess.run(
            cmd, cwd=ROOT, env=env, timeout=a.duration + STOP_TIMEOUT_S + 120
        ).returncode
    server_rc = proc.returncode
    log(f"server stopped (exit {server_rc})")

    stats = Path(f"{prefix}_stats.csv")
    totals = read_totals(stats) if stats.is_file() else None
    print(f"locust: {totals.line() if totals else 'no statistics written'}")
    print(f"reports: {stats} and {prefix}.html")
    problems = []
    if locust_rc != 0:
        problems.append(f"locust exited {locust_rc}")
    if totals is None or totals.requests == 0:
        problems.append("no requests made")
    elif totals.failures:
        problems.append(f"{totals.failures} requests failed (see {prefix}_failures.csv)")
    if server_rc != 0:
        problems.append(f"the server exited {server_rc} on SIGTERM")
    for problem in problems:
        log(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
