"""Peer (c): the model served the way a typical user would, with no serving tricks.

FastAPI and uvicorn, fp32 PyTorch, the full network (the last exit's answer), and one
request at a time: `/predict` is a plain `def` endpoint (FastAPI runs it in a thread
pool) whose forward pass holds a lock. No batching across requests, no quantization.
torch uses as many threads as the process has CPUs. A request's own list of texts
runs as one padded batch.

  GET  /readyz   200 once the model is loaded and warmed up, 503 before
  POST /predict  {"inputs": "text" | ["text", ...], "parameters": {...}} (ignored)
                 -> {"predictions": [{"label", "score", "exit_layer"}]}; 422 on bad input

Usage:
  .venv/bin/python bench/peers/naive_server.py --model-dir models/rt-sentiment-minilm
      [--host 127.0.0.1] [--port 8000] [--log-level warning]
"""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from app.config import usable_cpus  # noqa: E402
from app.network import artifact  # noqa: E402
from app.network.multi_exit import pad_batch  # noqa: E402
from bench.peers.common import (  # noqa: E402
    Prediction,
    PredictRequest,
    PredictResponse,
    add_readyz,
    arg_parser,
)


class NaiveModel:
    def __init__(self, loaded: artifact.LoadedModel) -> None:
        self.loaded = loaded
        self.lock = threading.Lock()

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> list[Prediction]:
        net, tok = self.loaded.network, self.loaded.tokenizer
        ids, mask = pad_batch(tok.encode(texts), net.cfg.encoder.pad_token_id)  # (B, T)
        bias = net.attention_bias(mask)
        x = net.embed(ids)  # (B, T, H)
        for i in range(net.num_layers):
            x = net.layer(i, x, bias)
        probs = torch.softmax(net.exit_logits(net.num_layers - 1, x, mask), -1)  # (B, C)
        score, index = probs.max(-1)
        labels = self.loaded.spec.labels
        return [
            Prediction(label=labels[int(i)], score=float(s), exit_layer=net.num_layers)
            for s, i in zip(score, index, strict=True)
        ]


def create_app(model_dir: Path, threads: int) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(threads)
        model = NaiveModel(artifact.load(model_dir))
        model.predict(["warm up"])
        app.state.model = model
        app.state.ready = True
        yield

    app = FastAPI(title="naive peer", lifespan=lifespan)
    add_readyz(app)

    @app.post("/predict")
    def predict(body: PredictRequest, request: Request) -> PredictResponse:
        model: NaiveModel = request.app.state.model
        with model.lock:  # one request at a time
            return PredictResponse(predictions=model.predict(body.texts()))

    return app


def main(argv: list[str] | None = None) -> int:
    a = arg_parser("naive_server.py", __doc__).parse_args(argv)
    app = create_app(a.model_dir, usable_cpus())
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
