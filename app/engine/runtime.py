"""Load a model for serving: resolve device and precision, quantize, size threads, warm up."""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine import dispatch as dispatching
from app.engine.adapt import Ladder
from app.engine.executor import Row, run_batch
from app.network import artifact
from app.network.backends import Backend, make_backend
from app.network.quantize import INT8_MODES, batch_invariant, resolve, scheme
from app.network.tokenizer import TRUNCATE, TextTokenizer, TooLong, Truncation

log = logging.getLogger(__name__)


@dataclass
class ModelRuntime:
    """A network ready to serve, with everything the engine and /info need to know."""

    name: str
    version: str
    labels: list[str]
    thresholds: list[float]  # calibrated, per exit
    max_seq_len: int
    device: str
    dtype: str
    threads: int
    backend: Backend
    tokenizer: TextTokenizer
    batch_invariant: bool = False  # a row's answer is bit-identical alone and in any batch
    scheme: str = ""  # how the weights and activations are represented
    calibration: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    # Per-batch dispatch (app.engine.dispatch): the mode, and for auto the costs
    # measured at start-up and the calibrated share of rows alive before each layer.
    dispatch: str = "layers"
    costs: dispatching.Costs | None = None
    alive: list[float] | None = None

    def plan(self, rows: int) -> str:
        """ "layers" or "whole" for a batch of `rows` rows."""
        return dispatching.plan(self.dispatch, rows, self.alive, self.costs)

    @property
    def num_layers(self) -> int:
        return self.backend.num_layers

    @property
    def multi_label(self) -> bool:
        """A sigmoid per label: an answer is the set of labels that are on."""
        return self.backend.multi_label

    @property
    def confidence(self) -> str:
        """How an exit's confidence is measured (`exit_rule.MEASURES`)."""
        return self.backend.confidence

    @property
    def architecture(self) -> str:
        """The encoder family the model was read from (bert, distilbert, roberta, ...)."""
        return self.backend.model.cfg.encoder.architecture

    @property
    def kernel(self) -> str:
        """What runs the layers: \"onnxruntime\" graphs or \"torch\" ops."""
        return self.backend.name

    @property
    def ladder(self) -> Ladder:
        """The operating points calibration measured: one point for a model calibrated
        before ladders existed, or whose thresholds were changed after calibration (the
        ladder's figures were measured from other thresholds)."""
        try:
            return Ladder.from_calibration(self.thresholds, self.calibration)
        except (ValueError, KeyError, TypeError) as e:
            log.warning(
                "%s: operating ladder not used (%s); run `exitserve calibrate`", self.name, e
            )
            # The calibrated point alone, with its figures.
            figures = {k: v for k, v in self.calibration.items() if k != "ladder"}
            return Ladder.from_calibration(self.thresholds, figures)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids, each text cut at the end to the model's limit."""
        return self.tokenizer.encode([self._bounded(t, TRUNCATE) for t in texts])

    def tokenize_as_asked(
        self, texts: list[str], truncations: list[Truncation]
    ) -> list[list[int] | TooLong]:
        """Token ids as each request asked (`Truncation`); a `TooLong` for a text over
        the limit whose request forbade cutting it."""
        if all(t == TRUNCATE for t in truncations):  # the common case, one call
            return list(self.tokenize(texts))
        bounded = [self._bounded(t, how) for t, how in zip(texts, truncations, strict=True)]
        return self.tokenizer.encode_as_asked(bounded, truncations)

    def _bounded(self, text: str, how: Truncation) -> str:
        # A token spans at most ~100 characters (WordPiece's longest word), so cutting the
        # text at the side that is cut anyway loses nothing the tokenizer would keep and
        # bounds its work; a text that may not be cut is counted whole.
        # Re-encoding replaces lone surrogates, which the tokenizer would refuse for the
        # whole batch; the API rejects them, this keeps other callers' batches safe.
        limit = self.max_seq_len * 101
        if how.allowed:
            text = text[:limit] if how.side == "right" else text[-limit:]
        return text.encode("utf-8", "replace").decode("utf-8")


def worker_plan(
    device: str, threads: int, workers: int | None, continuous: bool = False
) -> tuple[int, int]:
    """(engine workers, torch threads per worker) for a device setting and thread budget.

    Unset `workers`: one per thread on the CPU, where int8 layer steps of a few rows gain
    nothing from a second thread while a second batch in flight uses the core fully;
    one on a GPU (a second would only contend for the GIL and the device) and for
    continuous batching (one worker by design).
    """
    if workers is None:
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        workers = 1 if cuda or continuous else threads
    return workers, max(1, threads // workers)


def load_runtime(
    model_dir: Path,
    device: str = "auto",
    quantization: str = "auto",
    threads: int = 1,
    int8_kernel: str = "auto",
    wide_threads: int = 0,
    dispatch: str = "auto",
    max_batch_size: int = 32,
) -> ModelRuntime:
    """`threads` per engine worker; `wide_threads`: what a row alone may take while the
    other workers are idle (int8 on ONNX Runtime; 0: no more than `threads`);
    `dispatch`: layers, whole or auto (`app.engine.dispatch`; auto measures the costs
    here on a GPU up to `max_batch_size` rows, and is layers on the CPU)."""
    torch.set_num_threads(threads)
    loaded = artifact.load(model_dir)
    device, quantization = resolve(device, quantization, loaded.spec.serving)
    backend = make_backend(loaded.network, device, quantization, int8_kernel, wide_threads)
    spec = loaded.spec
    rt = ModelRuntime(
        name=spec.name,
        version=spec.version,
        labels=spec.labels,
        thresholds=list(spec.thresholds),
        max_seq_len=spec.config.max_seq_len,
        device=device,
        dtype=quantization if quantization != "none" else "fp32",
        threads=threads,
        backend=backend,
        tokenizer=loaded.tokenizer,
        calibration=spec.calibration,
        evaluation=spec.evaluation,
        batch_invariant=batch_invariant(device, quantization),
        scheme=scheme(quantization, bool(loaded.network.int8_smoothing)),
    )
    calibrated_as = spec.calibration.get("scheme")
    if spec.calibration and calibrated_as != rt.scheme and quantization in INT8_MODES:
        # Thresholds calibrated on another numeric scheme still work, but their measured
        # accuracy and depth were measured on something else than what is served now.
        log.warning(
            "%s was calibrated as %r, served as %r: run `exitserve calibrate %s` again",
            rt.name,
            calibrated_as or spec.calibration.get("quantization"),
            rt.scheme,
            model_dir,
        )
    warm_up(rt)
    rt.dispatch = "layers" if dispatch == "auto" and device == "cpu" else dispatch
    if rt.dispatch == "auto":
        rt.costs = measure_dispatch(rt, max_batch_size)
        rt.alive = calibrated_survival(spec.evaluation)
    release_freed_memory()
    log.info(
        "loaded %s v%s on %s (%s on %s, %d threads)",
        rt.name, rt.version, device, rt.dtype, rt.kernel, threads,
    )  # fmt: skip
    return rt


def calibrated_survival(evaluation: dict[str, Any]) -> list[float] | None:
    """The share of rows still running before each layer at the calibrated thresholds,
    from the evaluation's exit histogram (None where it has none)."""
    histogram = evaluation.get("exit_histogram")
    try:
        return dispatching.survival(histogram) if histogram else None
    except ValueError:
        return None


def measure_dispatch(rt: ModelRuntime, largest: int, length: int = 32) -> dispatching.Costs:
    """Time the whole network and one layer step on this device, rows of `length` tokens,
    at the batch sizes `dispatching.SIZES` up to the engine's `largest` batch."""
    backend = rt.backend
    L = backend.num_layers
    ids = [1] * min(length, rt.max_seq_len)

    def whole(b: int) -> None:
        with torch.inference_mode():
            backend.all_exits([ids] * b).float().cpu()

    def layer(b: int) -> None:
        with torch.inference_mode():
            batch = backend.step(L // 2, backend.begin([ids] * b), exit=True)
            assert batch.logits is not None
            batch.logits.float().cpu()  # the read each layer step of the loop makes

    sizes = [b for b in dispatching.SIZES if b <= largest] or [1]
    costs = dispatching.measure(whole, layer, sizes)
    log.info("%s dispatch costs measured at %s rows", rt.name, sizes)
    return costs


def warm_up(rt: ModelRuntime) -> None:
    """Run every layer at a few batch shapes so the first request pays no one-off costs."""
    L = rt.num_layers
    for batch, length in ((1, 8), (4, 32), (8, rt.max_seq_len)):
        ids = [[1] * min(length, rt.max_seq_len)] * batch
        run_batch(rt.backend, [Row(r, [1.0] * L, L) for r in ids])
    # Mixed lengths take the unpadded path (per-length attention groups).
    mixed = [[1] * max(2, rt.max_seq_len >> k) for k in range(4)]
    run_batch(rt.backend, [Row(r, [1.0] * L, L) for r in mixed])


def release_freed_memory() -> None:
    """Hand the memory that loading freed back to the system.

    Loading frees a lot in pieces: the base and delta tensors, and building the ONNX
    Runtime graphs (protobuf tensors, serialized models, the parsing of them). glibc's
    malloc keeps such pieces for reuse, so the process stayed ~40 MB larger than what it
    holds (measured, MiniLM); `malloc_trim` returns their pages. Where the C library has
    no `malloc_trim` (musl, macOS) there is nothing to call."""
    gc.collect()  # what is freed only by the collector, e.g. a graph builder in a cycle
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def time_batches(
    rt: ModelRuntime, batch_size: int, tokens: int = 24, reps: int = 3
) -> list[tuple[int, int, float]]:
    """(inputs, layers run, seconds) of a lone input and of a full batch at the calibrated
    thresholds, best of `reps`: what the load controller's cost model starts from."""
    row = [1] * min(tokens, rt.max_seq_len)
    out = []
    for n in sorted({1, batch_size}):
        rows = [Row(row, rt.thresholds, rt.num_layers)] * n
        best = float("inf")
        layers = 0
        for _ in range(reps):
            t0 = time.perf_counter()
            result = run_batch(rt.backend, rows)
            best = min(best, time.perf_counter() - t0)
            layers = sum(result.rows_per_layer)
        out.append((n, layers, best))
    return out
