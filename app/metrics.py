"""Every Prometheus metric of the service, its labels and buckets, in one place.

Every series about a model carries a `model` label, with one model or several; request
counts carry the model the request named (empty for routes of no model).

Each app gets its own registry, so tests can build many apps in one process.
"""

from __future__ import annotations

import contextlib
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
    """A counter whose value each model's controller keeps: seconds spent below point 0."""

    def __init__(self) -> None:
        self.read: dict[str, AdaptationState] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "exitserve_degraded_seconds",
            "Seconds served below the calibrated operating point",
            labels=["model"],
        )
        for model, read in list(self.read.items()):
            state = read()
            family.add_metric([model], 0.0 if state is None else state["degraded_s"])
        yield family


class Metrics:
    """The service's metrics; every series a model produces carries its `model` label
    (`for_model` hands an engine its view)."""

    def __init__(self, max_layers: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.max_layers = max_layers
        self.requests = Counter(
            "exitserve_requests", "HTTP requests", ["endpoint", "status", "model"], registry=r
        )
        self.request_duration = Histogram(
            "exitserve_request_duration_seconds",
            "End-to-end request time",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "exitserve_queue_duration_seconds",
            "Admission to first layer, per input",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "exitserve_inference_duration_seconds",
            "First layer to answer, per input",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exit_layer = Histogram(
            "exitserve_exit_layer",
            "Layer at which inputs left the network",
            ["model"],
            buckets=tuple(range(1, max_layers + 1)),
            registry=r,
        )
        self.exits = Counter(
            "exitserve_exits", "Inputs answered at each exit", ["model", "exit_layer"], registry=r
        )
        self.layers_executed = Counter(
            "exitserve_layers_executed",
            "Encoder layers run, summed over inputs",
            ["model"],
            registry=r,
        )
        self.layers_skipped = Counter(
            "exitserve_layers_skipped",
            "Encoder layers saved by early exit, summed over inputs",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "exitserve_batch_size",
            "Rows per layer step",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_size = Gauge(
            "exitserve_queue_size", "Inputs waiting for a batch", ["model"], registry=r
        )
        self.inflight = Gauge(
            "exitserve_inflight_inputs", "Inputs in the running batch", ["model"], registry=r
        )
        self.rejected = Counter(
            "exitserve_rejected",
            "Requests refused before inference (deadline: dropped from the queue, 504)",
            ["reason", "model"],
            registry=r,
        )
        self.ready = Gauge(
            "exitserve_ready",
            "1 while the engine takes new work; 0 while loading, draining, stuck or failed",
            ["model"],
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
            ["model"],
            registry=r,
        )
        self.expected_accuracy = Gauge(
            "exitserve_expected_accuracy",
            "Calibration-split accuracy of the current operating point",
            ["model"],
            registry=r,
        )
        self.expected_wait = Gauge(
            "exitserve_expected_wait_seconds",
            "Expected latency of a new input at the current operating point",
            ["model"],
            registry=r,
        )
        self.audit_answers = Counter(
            "exitserve_audit_answers",
            "Answers at the model's own exits run again through every exit (the audit)",
            ["model"],
            registry=r,
        )
        self.audit_disagreements = Counter(
            "exitserve_audit_disagreements",
            "Audited answers whose label was not the last exit's",
            ["model"],
            registry=r,
        )
        self.audit_bound = Gauge(
            "exitserve_audit_disagreement_bound",
            "95% upper bound on disagreement with the last exit, over the audit's window,"
            " at the thresholds in use (NaN until the window has an answer)",
            ["model"],
            registry=r,
        )
        self.audit_lower_bound = Gauge(
            "exitserve_audit_disagreement_lower_bound",
            "95% lower bound on the same: above the promise, the promise is broken",
            ["model"],
            registry=r,
        )
        self.audit_promise = Gauge(
            "exitserve_audit_promise",
            "The disagreement calibration promised (max_disagreement; NaN: none)",
            ["model"],
            registry=r,
        )
        self.threshold_moves = Counter(
            "exitserve_threshold_moves",
            "Moves of the exits' strictness by the audit",
            ["model", "direction"],
            registry=r,
        )
        self._degraded = _DegradedSeconds()
        r.register(self._degraded)
        self._views: dict[str, ModelMetrics] = {}

    def for_model(self, name: str, num_layers: int) -> ModelMetrics:
        """The series of one model, created now so that they show before any traffic."""
        if num_layers > self.max_layers:
            raise ValueError(
                f"model {name!r} has {num_layers} layers; the exit histogram was sized for"
                f" {self.max_layers}"
            )
        view = ModelMetrics(self, name, num_layers)
        self._views[name] = view
        return view

    def forget(self, name: str) -> None:
        """Remove every series of an unloaded model (its counters restart if it returns)."""
        view = self._views.pop(name, None)
        if view is not None:
            view.remove()
        self._degraded.read.pop(name, None)

    def reject(self, reason: str, model: str = "") -> None:
        self.rejected.labels(reason=reason, model=model).inc()


class ModelMetrics:
    """One model's series: the engine's observer (`EngineObserver`), its readiness and
    its load controller's state."""

    def __init__(self, metrics: Metrics, name: str, num_layers: int) -> None:
        self.metrics, self.name = metrics, name
        m, n = metrics, name
        self._queue_duration = m.queue_duration.labels(n)
        self._inference_duration = m.inference_duration.labels(n)
        self._exit_layer = m.exit_layer.labels(n)
        self._exits = {k: m.exits.labels(n, str(k)) for k in range(1, num_layers + 1)}
        self._executed = m.layers_executed.labels(n)
        self._skipped = m.layers_skipped.labels(n)
        self._batch_size = m.batch_size.labels(n)
        self._queue_size = m.queue_size.labels(n)
        self._inflight = m.inflight.labels(n)
        for reason in REJECT_REASONS:
            m.rejected.labels(reason, n)
        self._audited = m.audit_answers.labels(n)
        self._disagreed = m.audit_disagreements.labels(n)
        self._moves = {d: m.threshold_moves.labels(n, d) for d in ("tighten", "relax")}
        self._info: tuple[str, ...] | None = None

    def describe(self, version: str, device: str, dtype: str) -> None:
        self._info = (self.name, version, device, dtype)
        self.metrics.model_info.labels(*self._info).set(1)

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        """Read readiness at every scrape: it turns on drains and stuck batches, which no
        event of the engine's reports."""
        self.metrics.ready.labels(self.name).set_function(lambda: float(ready()))

    def watch_adaptation(self, state: AdaptationState) -> None:
        """Read the load controller at every scrape (its point also moves with no
        request: on the way back up, after the load is gone)."""

        def read(key: str, default: float) -> Callable[[], float]:
            def value() -> float:
                s = state()
                return default if s is None else s[key]

            return value

        m, n = self.metrics, self.name
        m.operating_point.labels(n).set_function(read("point", 0.0))
        m.expected_accuracy.labels(n).set_function(read("expected_accuracy", float("nan")))
        m.expected_wait.labels(n).set_function(read("expected_wait_s", 0.0))
        m._degraded.read[n] = state

    def watch_audit(
        self, bounds: Callable[[], tuple[float | None, float | None]], promise: float | None
    ) -> None:
        """Read the audit's live bounds (lower, upper) at every scrape."""

        def value(i: int) -> Callable[[], float]:
            def read() -> float:
                b = bounds()[i]
                return float("nan") if b is None else b

            return read

        m, n = self.metrics, self.name
        m.audit_lower_bound.labels(n).set_function(value(0))
        m.audit_bound.labels(n).set_function(value(1))
        m.audit_promise.labels(n).set(float("nan") if promise is None else promise)

    def remove(self) -> None:
        m, n = self.metrics, self.name
        for family in (
            m.queue_duration, m.inference_duration, m.exit_layer, m.layers_executed,
            m.layers_skipped, m.batch_size, m.queue_size, m.inflight, m.ready,
            m.operating_point, m.expected_accuracy, m.expected_wait, m.audit_answers,
            m.audit_disagreements, m.audit_bound, m.audit_lower_bound, m.audit_promise,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                family.remove(n)
        for direction in self._moves:
            m.threshold_moves.remove(n, direction)
        for k in self._exits:
            m.exits.remove(n, str(k))
        for reason in REJECT_REASONS:
            m.rejected.remove(reason, n)
        if self._info is not None:
            m.model_info.remove(*self._info)

    # -- the engine's observer interface --------------------------------------------------
    def answered(
        self, exit_layer: int, num_layers: int, queue_s: float, inference_s: float
    ) -> None:
        self._queue_duration.observe(queue_s)
        self._inference_duration.observe(inference_s)
        self._exit_layer.observe(exit_layer)
        self._exits[exit_layer].inc()
        self._executed.inc(exit_layer)
        self._skipped.inc(num_layers - exit_layer)

    def layer_steps(self, rows_per_layer: Sequence[int]) -> None:
        for rows in rows_per_layer:
            self._batch_size.observe(rows)

    def load(self, queued: int, inflight: int) -> None:
        self._queue_size.set(queued)
        self._inflight.set(inflight)

    def audited(self, answers: int, disagreed: int, layers: int) -> None:
        """The audit's work is compute spent: counted in the layers executed."""
        self._audited.inc(answers)
        self._disagreed.inc(disagreed)
        self._executed.inc(layers)

    def threshold_moved(self, direction: str) -> None:
        self._moves[direction].inc()
