"""The models a server serves: one engine each (its own queue, batching, operating point
and load controller), looked up by name, loaded and unloaded here.

The configured list is fixed at start-up (names from each model.json; a duplicate stops
start-up naming both directories); the first is the default. States follow Triton's
repository extension: READY, LOADING, UNLOADING, UNAVAILABLE. Unloading drains: the
model refuses new work at once and answers everything it admitted before it stops.
With more than one model configured, every model's steps share the cores (`shares`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings, named_models
from app.engine.adapt import controller_for
from app.engine.audit import Audit
from app.engine.errors import NotRunning, UnknownModel
from app.engine.runtime import load_runtime, time_batches, worker_plan
from app.engine.scheduler import Engine
from app.engine.shares import CoreShares, Shared
from app.metrics import Metrics
from app.network import artifact

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass
class Entry:
    name: str
    model_dir: Path
    version: str
    num_layers: int
    engine: Engine | None = None
    state: str = UNAVAILABLE
    reason: str = ""


def configured(model_dirs: Sequence[Path]) -> list[Entry]:
    """An entry per model directory, named by its model.json (read, not loaded)."""
    entries = []
    for _, _, d in named_models(model_dirs):
        try:
            spec = artifact.read_spec(d)
        except (OSError, ValueError) as e:
            raise ValueError(f"model directory {str(d)!r} does not load: {e}") from e
        entries.append(Entry(spec.name, d, spec.version, spec.config.num_layers))
    return entries


class ModelRegistry:
    def __init__(
        self,
        entries: Sequence[Entry],
        build: Callable[[Entry], Engine],
        forget: Callable[[Entry], None] | None = None,
        shares: CoreShares | None = None,
    ) -> None:
        """`build` loads and starts an entry's engine; `forget`, after an unload, drops
        what was kept about it (its metrics)."""
        if not entries:
            raise ValueError("no model to serve")
        self._entries = {e.name: e for e in entries}
        self.names = list(self._entries)  # fixed at start-up; the middleware asks per request
        self.default = entries[0].name
        self._build, self._forget = build, forget
        self.shares = shares
        self._lock = threading.Lock()  # one load or unload at a time

    def entry(self, name: str) -> Entry:
        e = self._entries.get(name)
        if e is None:
            raise UnknownModel(name, self.names)
        return e

    def engine(self, name: str | None = None) -> Engine:
        """The engine serving `name` (None: the default model)."""
        e = self.entry(self.default if name is None else name)
        if e.engine is None:
            raise NotRunning(f"model {e.name!r} is not loaded")
        return e.engine

    def find(self, name: str | None = None) -> Engine | None:
        """The engine serving `name`, or None (unknown, not loaded): never raises."""
        e = self._entries.get(self.default if name is None else name)
        return None if e is None else e.engine

    def engines(self) -> list[Engine]:
        return [e.engine for e in self._entries.values() if e.engine is not None]

    def load(self, name: str) -> None:
        """Load and start `name` (already loaded: nothing to do). Blocks for the load."""
        e = self.entry(name)
        with self._lock:
            if e.engine is not None:
                return
            e.state, e.reason = LOADING, ""
            try:
                e.engine = self._build(e)
            except Exception as err:
                # The reason is shown to clients (the repository index): no paths in it.
                log.error("cannot load %s from %s: %s", name, e.model_dir, err)
                e.state, e.reason = UNAVAILABLE, "load failed; see the server log"
                raise
            e.state = READY

    def unload(self, name: str, timeout_s: float) -> bool:
        """Stop `name` after answering what it admitted (at most `timeout_s`); whether
        it drained. The other models keep serving."""
        e = self.entry(name)
        with self._lock:
            engine = e.engine
            if engine is None:
                return True
            e.state = UNLOADING
            engine.begin_drain()
            drained = engine.stop(timeout_s)
            e.engine, e.state, e.reason = None, UNAVAILABLE, "unloaded"
            if self._forget is not None:
                self._forget(e)
            log.info("unloaded %s (%s)", name, "drained" if drained else "drain timed out")
            return drained

    def index(self) -> list[dict[str, str]]:
        """Every configured model and its state (Triton's repository index)."""
        return [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in self._entries.values()
        ]

    # -- the server as a whole: what probes and the drain on SIGTERM ask ----------------
    @property
    def failed(self) -> bool:
        return any(e.failed for e in self.engines())

    @property
    def ready(self) -> bool:
        engines = self.engines()
        return bool(engines) and all(e.ready for e in engines)

    def state(self) -> str:
        """ "ready", or why not: the first loaded model's reason, or "no model loaded"."""
        for engine in self.engines():
            if not engine.ready:
                return engine.state()
        return "ready" if self.engines() else "no model loaded"

    @property
    def idle(self) -> bool:
        return all(e.idle for e in self.engines())

    def queued(self) -> int:
        return sum(e.queued() for e in self.engines())

    def begin_drain(self) -> None:
        for engine in self.engines():
            engine.begin_drain()

    def stop(self, timeout_s: float) -> bool:
        """Stop every engine (each drains first); whether all drained in time."""
        return all([engine.stop(timeout_s) for engine in self.engines()])


def start_engine(
    s: Settings, e: Entry, metrics: Metrics, shares: CoreShares | None = None
) -> Engine:
    """Load the model of `e`, size its workers and controller, and start its engine."""
    workers, threads = worker_plan(s.device, s.threads, s.workers, s.batching == "continuous")
    # A row alone while the other workers idle may take their threads too.
    runtime = load_runtime(
        e.model_dir,
        s.device,
        s.quantization,
        threads,
        s.int8_kernel,
        threads * workers,
        s.dispatch,
        s.max_batch_size,
    )
    if runtime.name != e.name:
        raise ValueError(f"{e.model_dir} now holds {runtime.name!r}, not {e.name!r}")
    if shares is not None:
        runtime.backend = Shared(runtime.backend, shares, e.name)
    controller = controller_for(
        runtime.ladder,
        runtime.name,
        s.latency_target_ms / 1000,
        s.max_accuracy_drop,
        workers,
        s.max_batch_size,
    )
    if controller.enabled:
        timed = time_batches(runtime, s.max_batch_size)
        controller.costs.anchor([(controller.work(n, layers), t) for n, layers, t in timed])
    audit = None
    if s.audit:
        promise = runtime.calibration.get("max_disagreement")
        audit = Audit(
            runtime.thresholds,
            float(promise) if isinstance(promise, int | float) else None,
            rate=s.audit_rate,
            window=s.audit_window,
            min_audited=min(200, s.audit_window),
            every=max(1, min(50, s.audit_window // 10)),
        )
    observer = metrics.for_model(runtime.name, runtime.num_layers)
    observer.describe(runtime.version, runtime.device, runtime.dtype)
    engine = Engine(
        runtime,
        max_batch_size=s.max_batch_size,
        max_queue_delay_s=s.max_queue_delay_ms / 1000,
        max_queue_size=s.max_queue_size,
        observer=observer,
        continuous=s.batching == "continuous",
        workers=workers,
        stuck_after_s=s.stuck_after_s,
        controller=controller,
        audit=audit,
    )
    engine.start()
    observer.watch_readiness(lambda: engine.ready)
    observer.watch_adaptation(engine.adaptation)
    if audit is not None:
        observer.watch_audit(lambda: (audit.lower, audit.bound), audit.promise)
    return engine


def registry_for(s: Settings) -> tuple[ModelRegistry, Metrics]:
    """The registry of the configured models, none loaded yet, and the metrics they
    report to (the exit histogram sized for the deepest of them)."""
    entries = configured(s.model_dirs)
    unknown = sorted(set(s.weights) - {e.name for e in entries})
    if unknown:
        raise ValueError(f"EXITSERVE_MODEL_WEIGHTS names no configured model: {unknown}")
    metrics = Metrics(max(e.num_layers for e in entries))
    shares = CoreShares(s.threads, s.weights) if len(entries) > 1 else None

    def build(e: Entry) -> Engine:
        return start_engine(s, e, metrics, shares)

    registry = ModelRegistry(entries, build, lambda e: metrics.forget(e.name), shares)
    return registry, metrics
