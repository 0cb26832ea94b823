"""The online audit on a shifted stream: does the service see the drift, and repair it?

The real server on the default model, audit on (`--rate`), one text per request, in
order, `--clients` at a time:
  1. plain: `--plain` test-split sentences: the exits must stay at the calibrated ones;
  2. shifted: `--shifted` contrastive texts built from test-split sentences of opposite
     labels ("<one>, but <other>", both orders): the service's own figure (the window's
     disagreement had the calibrated thresholds served) against the true one (each text
     sent again with the calibrated threshold and with `threshold: 1.0`), and the served
     answers after the first tightening against full depth.
Results: OUT/audit-<model>-<date>-<tag or host>.{json,md}.

Usage:
  .venv/bin/python -m bench.audit [MODEL_DIR] [--rate 0.1] [--plain 1000] [--shifted 2000]
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from devtools.server_process import ROOT, exitserve_env, exitserve_server

MODEL = ROOT / "models" / "rt-sentiment-minilm"


def shifted_texts(texts: list[str], labels: list[int], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    by = {
        c: [t.rstrip(" .!") for t, y in zip(texts, labels, strict=True) if y == c]
        for c in set(labels)
    }
    a, b = sorted(by)
    out = []
    for i in range(n):
        first, second = (a, b) if i % 2 else (b, a)
        out.append(f"{rng.choice(by[first])}, but {rng.choice(by[second])}.")
    return out


def ask(url: str, texts: list[str], clients: int, **params: Any) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(clients) as pool:

        def one(t: str) -> dict[str, Any]:
            r = c.post("/predict", json={"inputs": t, "parameters": params})
            r.raise_for_status()
            out: dict[str, Any] = r.json()["predictions"][0]
            return out

        return list(pool.map(one, texts))


def audit_state(url: str) -> dict[str, Any]:
    state: dict[str, Any] = httpx.get(f"{url}/info", timeout=10).json()["audit"]
    return state


def run(a: argparse.Namespace) -> dict[str, Any]:
    from app.network.artifact import read_spec
    from app.training.evaluate import split_data

    spec = read_spec(a.model_dir)
    texts, y = split_data(spec, "test")
    plain = (texts * (a.plain // len(texts) + 1))[: a.plain]
    shifted = shifted_texts(texts, [int(v) for v in y], a.shifted)
    calibrated = spec.thresholds[0]
    settings = {"model_dir": a.model_dir, "audit_rate": a.rate, "log_level": "warning"}
    out: dict[str, Any] = {"model": spec.name, "rate": a.rate, "calibrated_threshold": calibrated}
    with exitserve_server(lambda port: exitserve_env(port, settings), 300) as (_, port):
        url = f"http://127.0.0.1:{port}"
        ask(url, plain, a.clients)
        out["after_plain"] = audit_state(url)
        served, moved_at = [], None
        for i in range(0, len(shifted), 50):  # in slices, to see when the exits move
            served += ask(url, shifted[i : i + 50], a.clients)
            state = audit_state(url)
            if moved_at is None and state["level"] > 0:
                moved_at = i + 50
        out["after_shifted"] = audit_state(url)
        full = ask(url, shifted, a.clients, threshold=1.0)  # explicit: never audited
        at_calibrated = ask(url, shifted, a.clients, threshold=calibrated)
    differ = [s["label"] != f["label"] for s, f in zip(served, full, strict=True)]
    differ0 = [c["label"] != f["label"] for c, f in zip(at_calibrated, full, strict=True)]
    st = out["after_shifted"]
    reported = st["window_disagreeing_calibrated"] / max(1, st["window_audited"])
    cut = len(served) if moved_at is None else moved_at
    before, after = differ[:cut], differ[cut:]

    def share(xs: Sequence[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    out.update(
        moved_after_texts=moved_at,
        true_disagreement_calibrated=share(differ0),
        reported_disagreement_calibrated=round(reported, 4),
        served_disagreement_before_move=share(before),
        served_disagreement_after_move=share(after),
        mean_exit_after_move=share([s["exit_layer"] for s in served[cut:]]),
    )
    out["bars"] = {
        "plain: stays at the calibrated thresholds": out["after_plain"]["level"] == 0
        and out["after_plain"]["moves"]["tighten"] == 0,
        "shifted: reported within 2 points of the true disagreement": abs(
            out["reported_disagreement_calibrated"] - out["true_disagreement_calibrated"]
        )
        <= 0.02,
        "shifted: after the correction, at most 4% disagree with full depth": after != []
        and out["served_disagreement_after_move"] <= 0.04,
    }
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Online audit on a shifted stream: {r['model']} ({r['date']}, {r['host']})",
        "",
        f"Audit rate {r['rate']:g} while busy (5x idle). Plain stream: level"
        f" {r['after_plain']['level']} after it, bound {r['after_plain']['bound']}.",
        "",
        "| shifted stream | figure |",
        "|---|---|",
        f"| true disagreement, calibrated thresholds | {r['true_disagreement_calibrated']:.2%} |",
        f"| the service's figure (audit window) | {r['reported_disagreement_calibrated']:.2%} |",
        f"| first tightening after | {r['moved_after_texts']} texts |",
        f"| served disagreement before / after it | {r['served_disagreement_before_move']} /"
        f" {r['served_disagreement_after_move']} |",
        f"| level, thresholds at the end | {r['after_shifted']['level']},"
        f" {r['after_shifted']['thresholds']} |",
        f"| mean exit after the move | {r['mean_exit_after_move']} |",
        "",
        "| bar | held |",
        "|---|---|",
    ]  # fmt: skip
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in r["bars"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from app.benchmark import write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, nargs="?", default=MODEL)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--plain", type=int, default=1000)
    p.add_argument("--shifted", type=int, default=2000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    r = run(a)
    r.update(date=datetime.now(timezone.utc).date().isoformat(), host=a.tag or socket.gethostname())
    md = markdown(r)
    print(md)
    write_results(a.out, f"audit-{r['model']}-{r['date']}-{r['host']}", r, md)
    return 0 if all(r["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
