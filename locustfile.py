"""Locust load test of exitserve: real test-split texts, every answer checked.

Each user posts `/predict` requests drawn from the test split of the served model:
short and long single texts with the calibrated thresholds, batches of 2-8, and some
with a per-request `threshold` (1.0: full depth; 0.5; 0.0: first exit), `max_layers`
or `all_scores`. Every answer is checked (status 200, one prediction per input, a label
of the model, `exit_layer` within 1..N and within `max_layers`, full depth at threshold
1.0, first exit at 0.0) and a wrong one counts as a failure in Locust's statistics.
About one request in twenty is a `/readyz` or `/info` check instead.

The texts come from the model directory named by EXITSERVE_MODEL_DIR (default
models/rt-sentiment-minilm), read through its model.json: it must be the model the
server serves (the model name, labels and depth are checked against every answer).

Usage, from the repository root (`make loadtest` does the second, starting a server):
  # web UI on http://localhost:8089, against a server already running (make serve):
  .venv/bin/locust -f locustfile.py --host http://127.0.0.1:8000
  # headless, with CSV and HTML reports:
  .venv/bin/locust -f locustfile.py --headless -u 16 -r 4 -t 60s \
      --host http://127.0.0.1:8000 --csv bench/results/locust \
      --html bench/results/locust.html --exit-code-on-error 1
  # another model (serve the same one):
  EXITSERVE_MODEL_DIR=models/bbc-topic-minilm .venv/bin/locust -f locustfile.py ...
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import gevent
from locust import FastHttpUser, between, task

from bench.loadmix import Planned, check_info, check_predict, load_corpus, plan

ROOT = Path(__file__).resolve().parent
MODEL_DIR = Path(os.environ.get("EXITSERVE_MODEL_DIR") or ROOT / "models" / "rt-sentiment-minilm")
# Loaded once per Locust process, before any user starts; a bad model dir stops it here.
CORPUS = load_corpus(MODEL_DIR)
# gevent's loop caches the time; after seconds of blocking imports here, Locust's
# --run-time timer, armed from that stale time, would fire at once.
gevent.get_hub().loop.update_now()


class PredictUser(FastHttpUser):
    # A short pause between requests: closed-loop clients, not a saturating flood.
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random()

    def _predict(self, req: Planned) -> None:
        with self.client.post(
            "/predict", json=req.body, name=req.name, catch_response=True
        ) as resp:
            problem = check_predict(req, resp.status_code, resp.content, CORPUS)
            if problem:
                resp.failure(problem)
            else:
                resp.success()

    @task(6)
    def single_short(self) -> None:
        self._predict(plan(CORPUS, self.rng, "/predict 1 short", long=False))

    @task(3)
    def single_long(self) -> None:
        self._predict(plan(CORPUS, self.rng, "/predict 1 long", long=True))

    @task(4)
    def batch(self) -> None:
        size = self.rng.randint(2, 8)
        self._predict(plan(CORPUS, self.rng, "/predict batch 2-8", size=size))

    @task(2)
    def full_depth(self) -> None:
        size = self.rng.choice((1, 1, 4))
        self._predict(plan(CORPUS, self.rng, "/predict threshold=1.0", size=size, threshold=1.0))

    @task(2)
    def threshold_half(self) -> None:
        size = self.rng.choice((1, 1, 4))
        self._predict(plan(CORPUS, self.rng, "/predict threshold=0.5", size=size, threshold=0.5))

    @task(1)
    def first_exit(self) -> None:
        self._predict(plan(CORPUS, self.rng, "/predict threshold=0.0", threshold=0.0))

    @task(2)
    def capped(self) -> None:
        cap = self.rng.randint(1, CORPUS.num_layers)
        size = self.rng.choice((1, 3))
        # Half of them also at threshold 1.0, which must then answer exactly at the cap.
        threshold = self.rng.choice((None, 1.0))
        self._predict(
            plan(
                CORPUS,
                self.rng,
                "/predict max_layers",
                size=size,
                max_layers=cap,
                threshold=threshold,
            )
        )

    @task(1)
    def all_scores(self) -> None:
        self._predict(plan(CORPUS, self.rng, "/predict all_scores", size=2, all_scores=True))

    @task(1)
    def probes(self) -> None:
        # Weight 1 of 22: about one request in twenty is not inference.
        if self.rng.random() < 0.5:
            with self.client.get("/readyz", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"status {resp.status_code}")
            return
        with self.client.get("/info", catch_response=True) as resp:
            problem = check_info(resp.status_code, resp.content, CORPUS)
            if problem:
                resp.failure(problem)
