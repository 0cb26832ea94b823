"""Every Prometheus metric of the service, its labels and buckets, in one place.

Each app gets its own registry, so tests can build many apps in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# The `_created` timestamp series double the output and no dashboard reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENDPOINTS = ("predict", "v2_infer", "other")  # label values, kept few on purpose
# expected_wait: refused at admission, the load controller expecting it to miss its budget.
REJECT_REASONS = ("overloaded", "expected_wait", "too_large", "draining", "deadline")


# The load controller's state, read at every scrape: point, expected_accuracy,
# expected_wait_s, degraded_s (see app.engine.adapt.LoadController.state).
AdaptationState = Callable[[], dict[str, float] | None]


class _DegradedSeconds(Collector):
    """A counter whose value the controller keeps: seconds spent below point 0."""

    def __init__(self) -> None:
        self.read: AdaptationState = lambda: None

    def collect(self) -> Iterator[Metric]:
        state = self.read()
        family = CounterMetricFamily(
            "exitserve_degraded_seconds",
            "Seconds served below the calibrated operating point",
        )
        family.add_metric([], 0.0 if state is None else state["degraded_s"])
        yield family


class Metrics:
    def __init__(self, num_layers: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.num_layers = num_layers
        self.requests = Counter(
            "exitserve_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "exitserve_request_duration_seconds",
            "End-to-end request time",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "exitserve_queue_duration_seconds",
            "Admission to first layer, per input",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "exitserve_inference_duration_seconds",
            "First layer to answer, per input",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exit_layer = Histogram(
            "exitserve_exit_layer",
            "Layer at which inputs left the network",
            buckets=tuple(range(1, num_layers + 1)),
            registry=r,
        )
        self.exits = Counter(
            "exitserve_exits", "Inputs answered at each exit", ["exit_layer"], registry=r
        )
        self.layers_executed = Counter(
            "exitserve_layers_executed", "Encoder layers run, summed over inputs", registry=r
        )
        self.layers_skipped = Counter(
            "exitserve_layers_skipped",
            "Encoder layers saved by early exit, summed over inputs",
            registry=r,
        )
        self.batch_size = Histogram(
            "exitserve_batch_size", "Rows per layer step", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_size = Gauge("exitserve_queue_size", "Inputs waiting for a batch", registry=r)
        self.inflight = Gauge(
            "exitserve_inflight_inputs", "Inputs in the running batch", registry=r
        )
        self.rejected = Counter(
            "exitserve_rejected",
            "Requests refused before inference (deadline: dropped from the queue, 504)",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge(
            "exitserve_ready",
            "1 while the engine takes new work; 0 while loading, draining, stuck or failed",
            registry=r,
        )
        self.model_info = Gauge(
            "exitserve_model_info",
            "The loaded model",
            ["model", "version", "device", "dtype"],
            registry=r,
        )
        self.operating_point = Gauge(
            "exitserve_operating_point",
            "Operating point of the load controller: 0 = calibrated thresholds, 1, 2, ..."
            " down the ladder (less depth, less accuracy)",
            registry=r,
        )
        self.expected_accuracy = Gauge(
            "exitserve_expected_accuracy",
            "Calibration-split accuracy of the current operating point",
            registry=r,
        )
        self.expected_wait = Gauge(
            "exitserve_expected_wait_seconds",
            "Expected latency of a new input at the current operating point",
            registry=r,
        )
        self._degraded = _DegradedSeconds()
        r.register(self._degraded)
        for k in range(1, num_layers + 1):  # every exit shows up, even before traffic
            self.exits.labels(exit_layer=str(k))
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        """Read readiness at every scrape: it turns on drains and stuck batches, which no
        event of the engine's reports."""
        self.ready.set_function(lambda: float(ready()))

    def watch_adaptation(self, state: AdaptationState) -> None:
        """Read the load controller at every scrape (its point also moves with no
        request: on the way back up, after the load is gone)."""

        def read(key: str, default: float) -> Callable[[], float]:
            def value() -> float:
                s = state()
                return default if s is None else s[key]

            return value

        self.operating_point.set_function(read("point", 0.0))
        self.expected_accuracy.set_function(read("expected_accuracy", float("nan")))
        self.expected_wait.set_function(read("expected_wait_s", 0.0))
        self._degraded.read = state

    # -- the engine's observer interface --------------------------------------------------
    def answered(
        self, exit_layer: int, num_layers: int, queue_s: float, inference_s: float
    ) -> None:
        self.queue_duration.observe(queue_s)
        self.inference_duration.observe(inference_s)
        self.exit_layer.observe(exit_layer)
        self.exits.labels(exit_layer=str(exit_layer)).inc()
        self.layers_executed.inc(exit_layer)
        self.layers_skipped.inc(num_layers - exit_layer)

    def layer_steps(self, rows_per_layer: Sequence[int]) -> None:
        for rows in rows_per_layer:
            self.batch_size.observe(rows)

    def load(self, queued: int, inflight: int) -> None:
        self.queue_size.set(queued)
        self.inflight.set(inflight)
