"""Peer (d), the strong one: ONNX Runtime int8, full depth, with dynamic batching.

An asyncio server (FastAPI on uvicorn) that gathers concurrent requests' texts into
batches of up to `--max-batch-size`, pads each batch to its longest text and runs
`InferenceSession.run` off the event loop. It batches as Triton's dynamic batcher does
by default (`max_queue_delay_microseconds: 0`): a free worker takes whatever is queued
at once and never waits for more, so a lone request pays no batching delay and requests
arriving while a batch runs form the next one. `--max-delay-ms` adds a wait for a batch
to fill. `--instances` workers (Triton's instance count) share the session, each run on
`--threads` intra-op threads (default: the process's CPUs shared out among the
instances); `bench/harness.py` measures the settings and serves with the best. All graph
optimizations are on, and idle threads sleep instead of spinning (`--spin` restores
ONNX Runtime's default). Texts are tokenized with the model's tokenizer, truncated to
its `max_seq_len` as exitserve does.

The int8 graph comes from `bench/peers/onnx_export.py`; without `--onnx` the server
exports it (or reuses the export) under bench/.cache/onnx/<model>/ first.

  GET  /readyz   200 once the session is loaded and warmed up, 503 before
  POST /predict  {"inputs": "text" | ["text", ...], "parameters": {...}} (ignored)
                 -> {"predictions": [{"label", "score", "exit_layer"}]}; 422 on bad input
  GET  /stats    batches run so far and their sizes

Usage:
  .venv/bin/python bench/peers/onnx_server.py --model-dir models/rt-sentiment-minilm
      [--onnx bench/.cache/onnx/rt-sentiment-minilm/model.int8.onnx]
      [--max-batch-size 32] [--max-delay-ms 0] [--instances 1] [--threads N] [--spin]
      [--host 127.0.0.1] [--port 8000] [--log-level warning]
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from app.config import usable_cpus  # noqa: E402
from app.network import artifact  # noqa: E402
from app.network.tokenizer import TextTokenizer  # noqa: E402
from bench.peers.common import (  # noqa: E402
    Prediction,
    PredictRequest,
    PredictResponse,
    add_readyz,
    arg_parser,
)
from bench.peers.ort_session import open_session, run_padded  # noqa: E402


class Batcher:
    """Gathers single rows from concurrent requests into batches for `instances` worker
    threads (`run` once per instance)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        pad_id: int,
        max_batch_size: int,
        max_delay_s: float,
        instances: int = 1,
    ) -> None:
        self.session, self.pad_id = session, pad_id
        self.max_batch_size, self.max_delay_s = max_batch_size, max_delay_s
        self.queue: asyncio.Queue[tuple[list[int], asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(instances, thread_name_prefix="onnx")
        self.instances = instances
        self.batch_sizes: Counter[int] = Counter()  # rows per batch -> batches run

    async def submit(self, rows: list[list[int]]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]
        for row, fut in zip(rows, futures, strict=True):
            self.queue.put_nowait((row, fut))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_delay_s
            while len(batch) < self.max_batch_size:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    break
            rows = [row for row, _ in batch]
            self.batch_sizes[len(rows)] += 1
            try:
                probs = await loop.run_in_executor(
                    self.worker, run_padded, self.session, rows, self.pad_id
                )
            except Exception as e:  # fail this batch's requests, keep serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), p in zip(batch, probs, strict=True):
                if not fut.done():  # a request whose client went away is cancelled
                    fut.set_result(p)


def create_app(
    model_dir: Path,
    onnx_path: Path | None,
    threads: int,
    max_batch_size: int,
    max_delay_ms: float,
    spin: bool = False,
    instances: int = 1,
) -> FastAPI:
    spec = artifact.read_spec(model_dir)
    labels, num_layers = spec.labels, spec.config.num_layers
    pad_id = spec.config.encoder.pad_token_id

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        path = onnx_path
        if path is None:
            from bench.peers.onnx_export import ensure_export

            path = Path(ensure_export(model_dir)["int8_path"])
        tokenizer = TextTokenizer(artifact.tokenizer_path(model_dir, spec), spec.config.max_seq_len)
        session = open_session(path, threads, spin)
        # Warm up at the largest shape, so the first requests do not pay for allocations.
        longest = tokenizer.encode(["warm up " * spec.config.max_seq_len])[0]
        run_padded(session, [longest] * max_batch_size, pad_id)
        batcher = Batcher(session, pad_id, max_batch_size, max_delay_ms / 1000, instances)
        tasks = [asyncio.create_task(batcher.run()) for _ in range(instances)]
        app.state.tokenizer, app.state.batcher = tokenizer, batcher
        app.state.ready = True
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            batcher.worker.shutdown(wait=True)

    app = FastAPI(title="onnx runtime peer", lifespan=lifespan)
    add_readyz(app)

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> PredictResponse:
        tokenizer: TextTokenizer = request.app.state.tokenizer
        batcher: Batcher = request.app.state.batcher
        probs = await batcher.submit(tokenizer.encode(body.texts()))
        return PredictResponse(
            predictions=[
                Prediction(
                    label=labels[int(p.argmax())], score=float(p.max()), exit_layer=num_layers
                )
                for p in probs
            ]
        )

    @app.get("/stats")
    def stats(request: Request) -> dict[str, Any]:
        """How the batcher has batched: rows per batch -> number of batches."""
        sizes: Counter[int] = request.app.state.batcher.batch_sizes
        return {
            "instances": request.app.state.batcher.instances,
            "batches": sum(sizes.values()),
            "inputs": sum(k * v for k, v in sizes.items()),
            "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        }

    return app


def main(argv: list[str] | None = None) -> int:
    p = arg_parser("onnx_server.py", __doc__)
    p.add_argument("--onnx", type=Path, default=None, help="int8 ONNX file (default: export)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--max-delay-ms", type=float, default=0.0, help="wait for a batch to fill (0: never)"
    )
    p.add_argument("--instances", type=int, default=1, help="worker threads sharing the session")
    p.add_argument("--threads", type=int, help="intra-op threads per run (default: CPUs/instances)")
    p.add_argument("--spin", action="store_true", help="let idle pool threads busy-wait")
    a = p.parse_args(argv)
    if a.max_batch_size < 1 or a.max_delay_ms < 0 or a.instances < 1:
        p.error("--max-batch-size and --instances must be >= 1, --max-delay-ms >= 0")
    threads = a.threads or max(1, usable_cpus() // a.instances)
    app = create_app(
        a.model_dir, a.onnx, threads, a.max_batch_size, a.max_delay_ms, a.spin, a.instances
    )
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
