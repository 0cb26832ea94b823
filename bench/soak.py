"""Overload flood and steady soak: the real server on loopback, bounded in time.

Starts the real server (`python -m app.cli serve`) on a free loopback port and, first,
asks it every text alone (one request at a time, full depth, all scores): those are
the reference answers. Then one of two runs:

  flood (default)  Measures capacity (closed loop, `--capacity-connections` keep-alive
                   clients, full depth, `--capacity-seconds`; or `--capacity RPS`),
                   then offers `--overload` times that rate, open loop, for
                   `--duration` s over up to `--connections` connections (by default
                   twice the server's queue, so that the queue can overflow). Each
                   request is due at a fixed time; one that finds every connection busy
                   and one already waiting is counted as not sent (the client, not the
                   server, was the limit: compare the sent rate with capacity).
  steady (--steady) Offers `--steady-fraction` of capacity for `--duration` s (600 by
                   default) and samples the server's RSS every `--rss-every` s.

Every request is one text at full depth (`threshold: 1.0`), the costliest work and one
exit per answer. An accepted (200) answer is *correct* when its label is the
reference's; a different label is *borderline* when the reference's top two
probabilities were within `--flip-gap` (default 0.5 for int8, whose activations are
scaled per batch so that an input's rounding depends on its neighbours; 0.1 otherwise),
else *wrong*. Flipped answers are listed in the JSON.

Reported: requests offered and sent, statuses (200, 429, 5xx, broken connections),
correct/borderline/wrong answers, p50/p99 latency of accepted requests (from sending;
also p99 from the due time, which adds any wait for a free connection), the server's
RSS before and after (steady: the series, and growth from the end of `--rss-warmup`),
readiness after the run and the server's exit status after SIGTERM. Bars, recorded
with the results and setting this script's exit status (0 only if all hold): no 5xx
and no broken connection, no wrong answer, the server ready afterwards and exiting 0
on SIGTERM; flood: some 429s (the flood really overloaded it); steady: RSS growth
under 5%. Results go to OUT/soak-<mode>-<model>-<date>-<tag or host>.{json,md}.

Usage:
  .venv/bin/python -m bench.soak MODEL_DIR [--duration 30] [--overload 10]
      [--capacity RPS] [--capacity-seconds 10] [--capacity-connections 64]
      [--connections 512] [--texts FILE] [--max-texts 512] [--threads N]
      [--max-queue-size 256] [--device cpu] [--quantization auto] [--out bench/results]
  .venv/bin/python -m bench.soak MODEL_DIR --steady [--duration 600]
      [--steady-fraction 0.5] [--rss-every 10] [--rss-warmup 60]

`--texts FILE` holds one text per line; without it, the model's test split is used.
The recorded runs (about 1 and 11 minutes on the default model):
  .venv/bin/python -m bench.soak models/rt-sentiment-minilm
  .venv/bin/python -m bench.soak models/rt-sentiment-minilm --steady
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from bench.client import (
    HOST,
    Connection,
    Reply,
    build_request,
    closed_loop,
    open_loop,
    percentile,
    run_async,
)
from bench.http_bench import add_server_arguments, options_from
from devtools.server_process import exitserve_env, exitserve_server, http_get

ROOT = Path(__file__).resolve().parents[1]
FULL_DEPTH = {"threshold": 1.0}
MAX_GROWTH = 0.05  # steady: RSS may grow less than this
# How close the reference's top two probabilities may be for a flipped label to count as
# rounding, not error. int8 scales activations per tensor over the whole batch, so an
# input's rounding depends on its neighbours: a 3-second flood of the default model
# flipped a reference with a gap of 0.43 once in about 400 answers (fp32: no flip). At
# 0.5 only answers the model gives with >= 75% confidence (2 labels) must hold, which
# still catches answers delivered to the wrong request. Run with `--quantization none`
# for the exact check.
FLIP_GAP = {"int8": 0.5}


# -- pure pieces: references, judging, summaries, memory, bars, report ------------------
class Reference(NamedTuple):
    label: str
    gap: float  # top probability minus the runner-up's


class Outcome(NamedTuple):
    text_index: int
    status: int  # 0: broken connection or unreadable answer
    latency_s: float  # from sending to the answer: what the server took
    delay_s: float  # from the time it was due to sending: waiting for a free connection
    label: str | None  # the answer's label (200 only)


def reference_of(body: bytes) -> Reference:
    """The reference answer from a /predict response with `all_scores`."""
    pred = json.loads(body)["predictions"][0]
    probs = sorted(pred["scores"].values(), reverse=True)
    gap = probs[0] - (probs[1] if len(probs) > 1 else 0.0)
    return Reference(pred["label"], gap)


def label_of(body: bytes) -> str:
    return str(json.loads(body)["predictions"][0]["label"])


def judge(label: str, ref: Reference, flip_gap: float) -> str:
    if label == ref.label:
        return "correct"
    return "borderline" if ref.gap < flip_gap else "wrong"


def read_rss_bytes(status_text: str) -> int:
    """VmRSS from the text of /proc/<pid>/status."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmRSS line (is the process alive?)")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        return read_rss_bytes(f.read())


def tree_pss_bytes(pid: int) -> int:
    """The memory a process and all its descendants hold: the sum of their proportional
    set sizes, which counts a page shared by several of them once (their VmRSS would
    count it in each). For one process it is its VmRSS less what it shares with others."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
            total += next(int(x.split()[1]) for x in f if x.startswith("Pss:")) * 1024
        todo += children(p)
    return total


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
            out += [int(c) for c in f.read().split()]
    return out


def outcome_of(reply: Reply) -> Outcome:
    """A reply judged: an accepted answer whose label cannot be read counts as broken."""
    status, label = reply.status, None
    if status == 200 and reply.response is not None:
        try:
            label = label_of(reply.response.body)
        except (ValueError, KeyError, IndexError, TypeError):
            status = 0
    return Outcome(reply.index, status, reply.latency_s, reply.delay_s, label)


def summarize(
    outcomes: Sequence[Outcome],
    refs: Sequence[Reference],
    seconds: float,
    offered: int,
    flip_gap: float,
) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    accepted = [o for o in outcomes if o.status == 200]
    verdicts = {"correct": 0, "borderline": 0, "wrong": 0}
    flips: dict[tuple[int, str], int] = {}  # (text, label given) -> times, for a diagnosis
    for o in accepted:
        assert o.label is not None
        verdict = judge(o.label, refs[o.text_index], flip_gap)
        verdicts[verdict] += 1
        if verdict != "correct":
            flips[(o.text_index, o.label)] = flips.get((o.text_index, o.label), 0) + 1
    lat_ms = [1000 * o.latency_s for o in accepted]
    due_ms = [1000 * (o.latency_s + o.delay_s) for o in accepted]

    def pct(q: float, values: list[float] = lat_ms) -> float | None:
        return round(percentile(values, q), 2) if values else None

    return {
        "seconds": round(seconds, 3),
        "offered": offered,
        "sent": len(outcomes),
        "not_sent": offered - len(outcomes),  # every connection busy when it was due
        "offered_rps": round(offered / seconds, 1) if seconds > 0 else 0.0,
        "accepted": len(accepted),
        "accepted_rps": round(len(accepted) / seconds, 1) if seconds > 0 else 0.0,
        "statuses": dict(sorted(statuses.items())),
        "rejected_429": statuses.get("429", 0),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "broken": statuses.get("0", 0),
        "answers": verdicts,
        "flipped": [
            {
                "text": k,
                "reference": refs[k].label,
                "gap": round(refs[k].gap, 4),
                "answered": label,
                "times": n,
            }
            for (k, label), n in sorted(flips.items())
        ][:50],
        "sent_rps": round(len(outcomes) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(max(lat_ms), 2) if lat_ms else None,
        # Open-loop view: from the due time, so a client short of connections shows.
        "p99_from_due_ms": pct(99, due_ms),
    }


def memory_growth(samples: Sequence[tuple[float, int]], warmup_s: float) -> dict[str, Any]:
    """RSS growth over a run: from the first sample at or after `warmup_s` to the last."""
    if not samples:
        raise ValueError("no RSS samples")
    after = [s for s in samples if s[0] >= warmup_s] or [samples[-1]]
    base, last = after[0][1], samples[-1][1]
    return {
        "baseline_at_s": round(after[0][0], 1),
        "baseline_mb": round(base / 2**20, 1),
        "final_mb": round(last / 2**20, 1),
        "max_mb": round(max(r for _, r in samples) / 2**20, 1),
        "growth": round((last - base) / base, 4),
    }


def bars(result: dict[str, Any]) -> dict[str, bool]:
    run = result["run"]
    out = {
        "no_5xx_or_broken_connection": run["server_errors_5xx"] == 0 and run["broken"] == 0,
        "every_accepted_answer_correct": run["answers"]["wrong"] == 0 and run["accepted"] > 0,
        "ready_after_the_run": result["ready_after"],
        "exit_0_on_sigterm": result["server_exit_code"] == 0,
    }
    if result["mode"] == "flood":
        out["overloaded_429s_seen"] = run["rejected_429"] > 0
    else:
        out["rss_growth_under_5_percent"] = result["memory"]["growth"] < MAX_GROWTH
    return out


def _fmt(v: Any, spec: str = "", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def markdown(r: dict[str, Any]) -> str:
    run, s, o = r["run"], r["server"], r["options"]
    mode = r["mode"]
    lines = [
        f"# Soak ({mode}): {r['model']} ({r['date']}, {r['host']})",
        "",
        f"Real server (`exitserve serve`, {s.get('device')}/{s.get('dtype')},"
        f" {s.get('threads')} threads, max batch {s.get('max_batch_size')}, queue"
        f" {s.get('max_queue_size')} inputs) on {r['usable_cpus']} usable CPUs shared with"
        f" the load generator; loopback. One text per request at full depth; {r['texts']}"
        f" texts cycled. Capacity {r['capacity_rps']:.1f} req/s"
        f" ({'given' if r['capacity_given'] else 'measured, closed loop'}); offered"
        f" {run['offered_rps']:.1f} req/s open loop for {run['seconds']:.1f} s over up to"
        f" {o['connections']} connections; sent {run['sent_rps']:.1f} req/s"
        f" ({run['sent_rps'] / r['capacity_rps']:.1f}x capacity). Latency from sending.",
        "",
        "| | value |",
        "|---|---|",
        f"| offered / sent / not sent (all connections busy) | {run['offered']} /"
        f" {run['sent']} / {run['not_sent']} |",
        f"| accepted (200), req/s | {run['accepted']} ({run['accepted_rps']:.1f}/s) |",
        f"| 429 | {run['rejected_429']} |",
        f"| 5xx / broken connections | {run['server_errors_5xx']} / {run['broken']} |",
        f"| statuses | {', '.join(f'{k}: {v}' for k, v in run['statuses'].items())} |",
        f"| accepted answers correct / borderline / wrong (flip gap {r['flip_gap']:g}) |"
        f" {run['answers']['correct']} / {run['answers']['borderline']} /"
        f" {run['answers']['wrong']} |",
        f"| latency of accepted, p50 / p99 / max | {_fmt(run['p50_ms'], '.1f')} /"
        f" {_fmt(run['p99_ms'], '.1f')} / {_fmt(run['max_ms'], '.1f')} ms |",
        f"| p99 of accepted from the due time | {_fmt(run['p99_from_due_ms'], '.1f')} ms |",
        f"| server RSS before / after | {r['rss_before_mb']:.1f} / {r['rss_after_mb']:.1f} MB |",
    ]
    if mode == "steady":
        m = r["memory"]
        lines.append(
            f"| RSS from {m['baseline_at_s']:g} s to the end (max) | {m['baseline_mb']:.1f} →"
            f" {m['final_mb']:.1f} MB ({m['max_mb']:.1f}): {100 * m['growth']:+.2f}% |"
        )
    lines.append(f"| ready after the run; exit status on SIGTERM | {r['ready_after']};"
                 f" {r['server_exit_code']} |")  # fmt: skip
    lines += ["", "| bar | held |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {'yes' if ok else 'NO'} |" for name, ok in
              r["bars"].items()]  # fmt: skip
    return "\n".join(lines) + "\n"


# -- the load ------------------------------------------------------------------------
async def ask_alone(port: int, texts: Sequence[str]) -> list[Reference]:
    """Each text alone, one request at a time: the reference answers."""
    conn = Connection(HOST, port)
    refs = []
    try:
        for t in texts:
            body = json.dumps({"inputs": [t], "parameters": {**FULL_DEPTH, "all_scores": True}})
            r = await conn.send(build_request(HOST, "/predict", body.encode()))
            if r is None or r.status != 200:
                raise RuntimeError(f"reference request answered {r}")
            refs.append(reference_of(r.body))
    finally:
        conn.close()
    return refs


async def open_loop_sampling_rss(
    port: int,
    requests: Sequence[bytes],
    rate: float,
    seconds: float,
    connections: int,
    pid: int,
    rss_every: float,
) -> tuple[list[Outcome], int, float, list[tuple[float, int]]]:
    """`client.open_loop`, judged, with the server's RSS sampled every `rss_every` s
    (0: none): (outcomes, offered, seconds, RSS samples)."""
    samples: list[tuple[float, int]] = []
    start = time.perf_counter()

    async def sample() -> None:
        while True:
            samples.append((time.perf_counter() - start, rss_bytes(pid)))
            await asyncio.sleep(rss_every)

    sampler = asyncio.ensure_future(sample()) if rss_every > 0 else None
    try:
        replies, offered, took = await open_loop(port, requests, rate, seconds, connections)
    finally:
        if sampler is not None:
            sampler.cancel()
    if sampler is not None:
        samples.append((took, rss_bytes(pid)))
    return [outcome_of(r) for r in replies], offered, took, samples


# -- the server ------------------------------------------------------------------------
@dataclass
class Options:
    model_dir: Path
    steady: bool = False
    duration: float | None = None  # None: 30 (flood) or 600 (steady)
    overload: float = 10.0
    steady_fraction: float = 0.5
    capacity: float | None = None  # None: measure it
    capacity_seconds: float = 10.0
    capacity_connections: int = 64
    connections: int | None = None  # None: 2 x max_queue_size (flood) or 32 (steady)
    texts: Path | None = None
    max_texts: int = 512
    flip_gap: float | None = None  # None: by the served dtype (see FLIP_GAP)
    rss_every: float = 10.0
    rss_warmup: float = 60.0
    threads: int | None = None
    max_batch_size: int = 32
    max_queue_size: int = 256
    device: str = "cpu"
    quantization: str = "auto"
    startup_timeout: float = 300.0
    out: Path = Path("bench/results")
    tag: str | None = None
    quiet: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "steady" if self.steady else "flood"


def server_env(o: Options, port: int, threads: int) -> dict[str, str]:
    settings = {
        "model_dir": o.model_dir,
        "threads": threads,
        "device": o.device,
        "quantization": o.quantization,
        "max_batch_size": o.max_batch_size,
        "max_queue_size": o.max_queue_size,
        "max_inputs_per_request": min(64, o.max_queue_size),
        "drain_timeout_s": 10,
        "log_level": "warning",  # the run's output stays the script's
    }
    env = exitserve_env(port, settings)
    env.update(o.extra_env)
    return env


def load_texts(o: Options) -> list[str]:
    if o.texts is not None:
        texts = [t for t in o.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        from app.network.artifact import read_spec
        from app.training.evaluate import split_data

        texts = split_data(read_spec(o.model_dir), "test")[0]
    if not texts:
        raise ValueError("no texts to send")
    return texts[: o.max_texts]


def run(o: Options) -> tuple[dict[str, Any], Path]:
    from app.benchmark import write_results
    from app.config import usable_cpus

    log = (lambda m: None) if o.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    duration = o.duration if o.duration is not None else (600.0 if o.steady else 30.0)
    # A flood needs more requests in flight than the queue holds, or nothing is refused.
    connections = o.connections or (32 if o.steady else 2 * o.max_queue_size)
    if duration <= 0 or connections < 1 or o.overload <= 0 or not 0 < o.steady_fraction <= 1:
        raise ValueError("need duration > 0, connections >= 1, overload > 0, 0 < fraction <= 1")
    o = replace(o, model_dir=o.model_dir.resolve())
    threads = o.threads or usable_cpus()
    texts = load_texts(o)
    requests = [
        build_request(
            HOST,
            "/predict",
            json.dumps({"inputs": [t], "parameters": FULL_DEPTH}, ensure_ascii=False).encode(),
        )
        for t in texts
    ]
    log(f"starting server: {o.model_dir} ({threads} threads)")
    server = exitserve_server(lambda p: server_env(o, p, threads), o.startup_timeout)
    with server as (proc, port):
        info = json.loads(http_get(port, "/info")[1])
        log(f"references: {len(texts)} texts, one at a time")
        refs = run_async(ask_alone(port, texts))
        capacity = o.capacity
        if capacity is None:
            log(
                f"capacity: closed loop, {o.capacity_connections} clients, {o.capacity_seconds:g} s"
            )
            capacity = run_async(
                closed_loop(port, requests, o.capacity_connections, o.capacity_seconds)
            )
        rate = capacity * (o.steady_fraction if o.steady else o.overload)
        rss_before = rss_bytes(proc.pid)
        log(
            f"{o.mode}: capacity {capacity:.1f} req/s, offering {rate:.1f} req/s for {duration:g} s"
        )
        every = o.rss_every if o.steady else 0.0
        outcomes, offered, took, samples = run_async(
            open_loop_sampling_rss(port, requests, rate, duration, connections, proc.pid, every)
        )
        rss_after = rss_bytes(proc.pid)
        ready_after = http_get(port, "/readyz")[0] == 200
    log(f"server stopped ({proc.returncode})")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    flip_gap = o.flip_gap if o.flip_gap is not None else FLIP_GAP.get(info.get("dtype"), 0.1)
    summary = summarize(outcomes, refs, took, offered, flip_gap)
    result: dict[str, Any] = {
        "kind": "soak",
        "mode": o.mode,
        "model": info.get("model"),
        "model_dir": str(o.model_dir),
        "date": date,
        "host": host,
        "cpu": platform.processor() or platform.machine(),
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
        "server": {
            k: info.get(k)
            for k in ("device", "dtype", "threads", "max_batch_size", "max_queue_size")
        },
        "options": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
            "duration": duration,
            "connections": connections,
        },
        "texts": len(texts),
        "capacity_rps": round(capacity, 2),
        "capacity_given": o.capacity is not None,
        "offered_rate_rps": round(rate, 2),
        "flip_gap": flip_gap,
        "run": summary,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "ready_after": ready_after,
        "server_exit_code": proc.returncode,
    }
    if o.steady:
        result["memory"] = memory_growth(samples, min(o.rss_warmup, duration / 2))
        result["rss_samples"] = [[round(t, 1), round(b / 2**20, 2)] for t, b in samples]
    result["bars"] = bars(result)
    result["passed"] = all(result["bars"].values())
    stem = f"soak-{o.mode}-{result['model']}-{date[:10]}-{o.tag or host}"
    return result, write_results(o.out, stem, result, markdown(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="soak.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--steady", action="store_true", help="steady soak instead of the flood")
    p.add_argument("--duration", type=float, help="s of load; default 30 (flood), 600 (steady)")
    p.add_argument("--overload", type=float, default=10.0, help="flood: times capacity")
    p.add_argument("--steady-fraction", type=float, default=0.5, help="steady: of capacity")
    p.add_argument("--capacity", type=float, help="req/s; default: measure it")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--capacity-connections", type=int, default=64, help="enough to fill batches")
    p.add_argument(
        "--connections", type=int, help="most in flight; default 2 x queue size, 32 steady"
    )
    p.add_argument("--texts", type=Path, help="one text per line; default: the test split")
    p.add_argument("--max-texts", type=int, default=512)
    p.add_argument(
        "--flip-gap", type=float, help="near-tie: top-2 gap below; default 0.5 int8, else 0.1"
    )
    p.add_argument("--rss-every", type=float, default=10.0, help="steady: s between samples")
    p.add_argument("--rss-warmup", type=float, default=60.0, help="steady: growth from here")
    p.add_argument("--threads", type=int, default=0, help="server torch threads; 0: usable CPUs")
    p.add_argument("--max-batch-size", type=int, default=32, help="server setting")
    p.add_argument("--max-queue-size", type=int, default=256, help="server setting")
    add_server_arguments(p)
    p.add_argument("--tag", help="names the result files; default: the host name")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    result, path = run(options_from(Options, a, threads=a.threads or None))
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
