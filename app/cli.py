"""The `exitserve` command: train, calibrate, evaluate, bench and serve models.

Usage:
  exitserve train --data rotten-tomatoes --out models/rt-sentiment-minilm
  exitserve calibrate models/rt-sentiment-minilm --max-drop 0.01
  exitserve evaluate models/rt-sentiment-minilm --split test --json
  exitserve add-exits DIR --data rotten-tomatoes --out models/NAME
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

# What calibrate and add-exits print of a calibration or evaluation.
SUMMARY = ("final_accuracy", "adaptive_accuracy", "agreement_with_final", "mean_layers")


def _train(a: argparse.Namespace) -> int:
    from app.training.train import TrainConfig, train

    out = Path(a.out)
    record = train(
        TrainConfig(
            data=a.data,
            out=out,
            name=a.name or out.name,
            seed=a.seed,
            epochs=a.epochs,
            qat_epochs=a.qat_epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            max_seq_len=a.max_seq_len,
            distill=a.distill,
            limit=a.limit,
            base=Path(a.base) if a.base else None,
            train_embeddings=a.train_embeddings,
        )
    )
    print(json.dumps({"out": str(out), "seconds": record["seconds"], "history": record["history"]}))
    return 0


def _add_exits(a: argparse.Namespace) -> int:
    from app.network import artifact
    from app.training.add_exits import AddExitsConfig, add_exits
    from app.training.calibrate import calibrate
    from app.training.evaluate import evaluate

    out = Path(a.out)
    record = add_exits(
        AddExitsConfig(
            classifier=Path(a.classifier),
            data=a.data,
            out=out,
            name=a.name or out.name,
            seed=a.seed,
            epochs=a.epochs,
            max_seq_len=a.max_seq_len,
            limit=a.limit,
            copy_base=a.copy_base,
        )
    )
    spec = artifact.read_spec(out)
    print(
        json.dumps(
            {
                "out": str(out),
                "base": record["base"],
                "labels": spec.labels,
                "layers": spec.config.num_layers,
                "serving": spec.serving,
                "heads": record["history"][-1],
                "seconds": record["seconds"],
            }
        )
    )
    cal = calibrate(
        out, max_drop=a.max_drop, max_disagreement=a.max_disagreement, exit_layers=a.exit_layers
    )
    print(json.dumps({"calibration": {k: cal[k] for k in SUMMARY}}))
    result = evaluate(out, "test")
    _write_evaluation(out, result)
    print(json.dumps({"test": {k: result[k] for k in (*SUMMARY, "n", "unlabelled")}}))
    return 0


def _calibrate(a: argparse.Namespace) -> int:
    from app.training.calibrate import calibrate

    record = calibrate(
        Path(a.model_dir),
        max_drop=a.max_drop,
        max_disagreement=a.max_disagreement,
        method=a.method,
        device=a.device,
        quantization=a.quantization,
        exit_layers=a.exit_layers,
    )
    print(json.dumps({k: record[k] for k in SUMMARY}))
    return 0


# An evaluation's parts too long for model.json and the printed line: report.json has them.
REPORT_ONLY = ("global_threshold_curve", "rows")


def _write_evaluation(model_dir: Path, result: dict[str, Any]) -> None:
    """Store an evaluation's figures in model.json and write report.json/png beside it."""
    from app.network import artifact
    from app.training.report import write_report

    spec = artifact.read_spec(model_dir)
    spec.evaluation = {k: v for k, v in result.items() if k not in REPORT_ONLY}
    artifact.write_spec(model_dir, spec)
    write_report(model_dir, result, spec.calibration)


def _evaluate(a: argparse.Namespace) -> int:
    from app.training.evaluate import evaluate

    model_dir = Path(a.model_dir)
    result = evaluate(model_dir, a.split, a.device, a.quantization, a.batch_size)
    if a.write:
        _write_evaluation(model_dir, result)
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k not in REPORT_ONLY}))
    else:
        for k in ("final_accuracy", "adaptive_accuracy", "mean_layers", "fp32_agreement"):
            print(f"{k:>22}: {result[k]}")
    return 0


def _bench(a: argparse.Namespace) -> int:
    from app.benchmark import run

    result = run(Path(a.model_dir), Path(a.out), a.reps, a.n1, a.n, a.batches, a.threads)
    print(
        json.dumps(
            {
                "ratios": result["ratios"],
                "sentences_per_second": result["sentences_per_second_median"],
            }
        )
    )
    return 0


def _serve(a: argparse.Namespace) -> int:
    from app.config import Settings
    from app.server import serve

    overrides = {
        k: v for k, v in (("model_dir", a.model_dir), ("host", a.host), ("port", a.port)) if v
    }
    settings = Settings(**overrides)
    if len(settings.model_dirs) > 1 and settings.isolation == "process":
        from app.front.router import Router  # the front end imports no torch
        from app.server import STARTUP_FAILED

        try:
            router = Router(settings)
        except ValueError as e:  # a duplicate name, a model.json that does not read
            logging.getLogger("exitserve").error("cannot serve %s: %s", settings.model_dir, e)
            return STARTUP_FAILED
        return serve(router, settings)
    from app.main import create_app

    return serve(create_app(settings), settings)


def _add_exit_layers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exit-layers",
        type=int,
        nargs="+",
        metavar="N",
        help="the only layers (1-based) whose exits may answer; the last always does",
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--quantization", default="auto", help="auto | int8 | fp16 | bf16 | none")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="exitserve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a multi-exit model and write an artifact")
    t.add_argument(
        "--data", required=True, help="rotten-tomatoes | bbc-news | PATH.csv | PATH.jsonl"
    )
    t.add_argument("--out", required=True, help="model directory to write, e.g. models/NAME")
    t.add_argument("--name", help="model name (default: the directory name)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--qat-epochs", type=int, default=1, help="last epochs trained int8-aware")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--max-seq-len", type=int, default=128)
    t.add_argument("--distill", type=float, default=0.0, help="weight of self-distillation")
    t.add_argument("--limit", type=int, help="train on at most this many examples")
    t.add_argument("--base", help="a BERT checkpoint directory to start from (default: MiniLM-L6)")
    t.add_argument(
        "--train-embeddings",
        action="store_true",
        help="fine-tune the embeddings too (stored as the rows that moved)",
    )
    t.set_defaults(func=_train)

    x = sub.add_parser(
        "add-exits",
        help="add exit heads to a fine-tuned BERT classifier; its answers at full depth stay",
    )
    x.add_argument("classifier", help="directory: config.json, model.safetensors, tokenizer.json")
    x.add_argument(
        "--data", required=True, help="texts to distil on: as for train; labels optional"
    )
    x.add_argument("--out", required=True, help="model directory to write")
    x.add_argument("--name", help="model name (default: the directory name)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--epochs", type=int, default=30, help="passes over the pooled states")
    x.add_argument("--max-seq-len", type=int, default=128)
    x.add_argument("--limit", type=int, help="distil on at most this many texts")
    x.add_argument(
        "--copy-base",
        action="store_true",
        help="copy the classifier's files into OUT/base (default: reference them by path)",
    )
    x.add_argument("--max-drop", type=float, default=0.01, help="as for calibrate")
    x.add_argument("--max-disagreement", type=float, default=0.03, help="as for calibrate")
    _add_exit_layers_arg(x)
    x.set_defaults(func=_add_exits)

    c = sub.add_parser("calibrate", help="choose per-exit thresholds on the calibration split")
    c.add_argument("model_dir")
    c.add_argument(
        "--max-drop", type=float, default=0.01, help="allowed accuracy drop (0.01 = 1 point)"
    )
    c.add_argument(
        "--max-disagreement",
        type=float,
        default=0.03,
        help="bound on the share of answers that differ from the last exit's",
    )
    c.add_argument("--method", default="global", choices=("global", "per-exit"))
    _add_exit_layers_arg(c)
    _add_runtime_args(c)
    c.set_defaults(func=_calibrate)

    e = sub.add_parser("evaluate", help="evaluate the model as served on a split")
    e.add_argument("model_dir")
    e.add_argument("--split", default="test", choices=("train", "calibration", "test"))
    e.add_argument("--json", action="store_true", help="print one JSON line")
    e.add_argument("--write", action="store_true", help="store figures and write report.json/png")
    e.add_argument("--batch-size", type=int, default=32)
    _add_runtime_args(e)
    e.set_defaults(func=_evaluate)

    b = sub.add_parser(
        "bench", help="in-process engine speed: fp32 vs int8, full depth vs adaptive"
    )
    b.add_argument("model_dir")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    b.add_argument("--n1", type=int, default=256, help="sentences timed at batch 1")
    b.add_argument("--n", type=int, default=512, help="sentences timed at each larger batch")
    b.add_argument("--threads", type=int, help="torch threads (default: usable CPUs)")
    b.set_defaults(func=_bench)

    v = sub.add_parser("serve", help="start the HTTP service (settings from EXITSERVE_* env)")
    v.add_argument("--model-dir", help="overrides EXITSERVE_MODEL_DIR")
    v.add_argument("--host", help="overrides EXITSERVE_HOST")
    v.add_argument("--port", type=int, help="overrides EXITSERVE_PORT")
    v.set_defaults(func=_serve)

    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(a.func(a))
    except (ValueError, FileNotFoundError) as e:
        # What a user got wrong (a directory, a file, a field, a setting): one line.
        print(f"exitserve {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
