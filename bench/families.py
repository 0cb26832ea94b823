"""Proof for "serve the classifiers people have": DistilBERT, RoBERTa, XLM-R and ELECTRA
classifiers and a multi-label BERT, made with Hugging Face transformers
(bench/make_families.py), each given exits by `exitserve add-exits` and served.

Per model, on the whole test split: transformers' own answers (bench/hf_reference.py,
run with a virtualenv that has transformers) against the served model at full depth in
fp32 (labels, or label sets at 0.5, and probabilities), int8 at full depth against
fp32, the calibrated exits against full depth with their mean depth; then a real server
of it, asked over HTTP and through the Triton client for raw_scores, top_k,
truncate: false and truncation_direction: left. Writes
bench/results/families-<date>-<tag>.{json,md}.

  /tmp/refvenv/bin/python bench/make_families.py --out build/families
  python -m bench.families build/families --reference-python /tmp/refvenv/bin/python \\
      --out bench/results --tag amd-epyc-vnni
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.engine.executor import Row, run_batch
from app.engine.runtime import load_runtime
from app.network import artifact, exit_rule
from app.training.evaluate import split_data
from devtools.server_process import exitserve_env, exitserve_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (directory under the root, data file there)
    "distilbert": ("distilbert", "sentiment.csv"),
    "roberta": ("roberta", "sentiment.csv"),
    "xlm-roberta": ("xlmr", "sentiment.csv"),
    "electra": ("electra", "sentiment.csv"),
    "multilabel-bert": ("multilabel", "multilabel.csv"),
}
NEAR_TIE = 0.01  # a label change where transformers' top two are this close is a near-tie


def scores(logits: np.ndarray, multi: bool) -> np.ndarray:
    if multi:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(python: str, model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model_dir": str(model_dir), "texts": texts,
                                   "max_length": max_length}))  # fmt: skip
        subprocess.run([python, str(ROOT / "bench/hf_reference.py"), str(job), str(out)],
                       check=True)  # fmt: skip
        return np.array(json.loads(out.read_text())["logits"], np.float64)


def served(model: Path, quantization: str, texts: list[str], calibrated: bool) -> dict[str, Any]:
    """The engine's answers (the serving executor, batches of 32) at full depth or at the
    model's calibrated exits."""
    rt = load_runtime(model, "cpu", quantization)
    L = rt.num_layers
    thresholds = list(rt.thresholds) if calibrated else [1.0] * (L - 1) + [0.0]
    ids = rt.tokenize(texts)
    preds = []
    started = time.perf_counter()
    for s in range(0, len(ids), 32):
        preds += run_batch(rt.backend, [Row(r, thresholds, L) for r in ids[s : s + 32]]).predictions
    took = time.perf_counter() - started
    probs = np.array([p.probs for p in preds])
    return {
        "probs": probs,
        "answers": exit_rule.answers(probs, rt.multi_label),
        "exits": np.array([p.exit_layer for p in preds]),
        "kernel": rt.kernel,
        "seconds": took,
    }


def compare(name: str, root: Path, build: Path, python: str, limit: int) -> dict[str, Any]:
    sub, data = MODELS[name]
    classifier, model = root / sub, build / name
    if not (model / "model.json").is_file():
        subprocess.run([sys.executable, "-m", "app.cli", "add-exits", str(classifier), "--data",
                        str(root / data), "--out", str(model), "--limit", str(limit)],
                       check=True, cwd=ROOT)  # fmt: skip
    spec = artifact.read_spec(model)
    multi = spec.config.multi_label
    texts, y = split_data(spec, "test")
    ref_p = scores(reference(python, classifier, texts, spec.config.max_seq_len), multi)
    ref_a = exit_rule.answers(ref_p, multi)
    fp32 = served(model, "none", texts, calibrated=False)
    int8 = served(model, "int8", texts, calibrated=False)
    int8a16 = served(model, "int8a16", texts, calibrated=False)
    cal = served(model, "auto", texts, calibrated=True)
    changed = np.flatnonzero(fp32["answers"] != ref_a)
    top2 = np.sort(ref_p, -1)[:, -2:]
    margin = np.abs(ref_p - 0.5).min(-1) if multi else top2[:, 1] - top2[:, 0]
    L = spec.config.num_layers
    return {
        "model": name,
        "architecture": spec.config.encoder.architecture,
        "multi_label": multi,
        "labels": spec.labels,
        "n": len(texts),
        "fp32_full_depth": {
            "answers_changed_vs_transformers": len(changed),
            "changed_near_ties": int((margin[changed] < NEAR_TIE).sum()),
            "max_abs_prob_diff": float(np.abs(fp32["probs"] - ref_p).max()),
            "accuracy": float((fp32["answers"] == y).mean()),
            "transformers_accuracy": float((ref_a == y).mean()),
        },
        "int8_full_depth": {
            "agreement_with_fp32": float((int8["answers"] == fp32["answers"]).mean()),
            "kernel": int8["kernel"],
            "smoothing_alpha": spec.serving.get("int8", {}).get("smoothing", {}).get("alpha"),
            "speed_vs_fp32": fp32["seconds"] / int8["seconds"],
        },
        "int8a16_full_depth": {
            "agreement_with_fp32": float((int8a16["answers"] == fp32["answers"]).mean()),
            "kernel": int8a16["kernel"],
            "speed_vs_fp32": fp32["seconds"] / int8a16["seconds"],
        },
        "calibrated": {
            "served_as": spec.serving.get("cpu", "int8"),
            "agreement_with_full_depth": float((cal["answers"] == fp32["answers"]).mean()),
            "mean_depth": float(cal["exits"].mean()),
            "full_depth": L,
            "accuracy": float((cal["answers"] == y).mean()),
            "thresholds": spec.thresholds,
        },
        "http": options_over_http(model, name, spec.labels, multi),
    }


def options_over_http(model: Path, name: str, labels: list[str], multi: bool) -> dict[str, Any]:
    """raw_scores, top_k, truncate: false and truncation_direction: left on a real server,
    over REST and through tritonclient; each check's outcome."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    long_text = "a gripping , beautifully acted film . " * 40
    tail = "dull , lifeless and far too long ."
    checks: dict[str, Any] = {}

    def env(port: int) -> dict[str, str]:
        return exitserve_env(port, {"model_dir": model, "threads": 1})

    with (
        exitserve_server(env, 300) as (_, port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c,
    ):

        def predict(inputs: Any, **parameters: Any) -> list[dict[str, Any]]:
            r = c.post("/predict", json={"inputs": inputs, "parameters": parameters})
            r.raise_for_status()
            return list(r.json()["predictions"])

        text = "an engaging and moving story , well acted"
        (p,) = predict(text, all_scores=True, threshold=1.0)
        (raw,) = predict(text, all_scores=True, raw_scores=True, threshold=1.0)
        z = np.array([raw["scores"][n] for n in labels])
        checks["raw_scores_match_probs"] = bool(
            np.allclose(scores(z, multi), [p["scores"][n] for n in labels], atol=1e-6)
        )
        (top,) = predict(text, top_k=1)
        checks["top_k_1_is_best"] = list(top["scores"]) == [max(p["scores"], key=p["scores"].get)]
        r = c.post("/predict", json={"inputs": [long_text], "parameters": {"truncate": False}})
        checks["truncate_false_status"] = r.status_code
        checks["truncate_false_error"] = r.json().get("error")
        left = predict(long_text + tail, truncation_direction="left", all_scores=True,
                       threshold=1.0)[0]  # fmt: skip
        alone = predict(long_text[-1000:] + tail, truncation_direction="left", all_scores=True,
                        threshold=1.0)[0]  # fmt: skip
        checks["left_truncation_keeps_the_end"] = left["scores"] == alone["scores"]
        if multi:
            checks["multi_label_labels"] = predict(text, threshold=1.0)[0]["labels"]
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        inp = triton.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([text.encode()], dtype=object))
        res = client.infer(name_of(model), [inp], outputs=[
            triton.InferRequestedOutput("scores", class_count=1)])  # fmt: skip
        checks["triton_classification"] = [
            v.decode() if isinstance(v, bytes) else str(v) for v in res.as_numpy("scores").ravel()
        ]
        res = client.infer(name_of(model), [inp], parameters={"raw_scores": True, "threshold": 1.0},
                           outputs=[triton.InferRequestedOutput("scores")])  # fmt: skip
        checks["triton_raw_scores_match"] = bool(
            np.allclose(res.as_numpy("scores")[0], z, atol=1e-5)
        )
        inp.set_data_from_numpy(np.array([long_text.encode()], dtype=object))
        try:
            client.infer(name_of(model), [inp], parameters={"truncate": False})
            checks["triton_truncate_false"] = "answered"
        except InferenceServerException as e:
            checks["triton_truncate_false"] = str(e)[:200]
    return checks


def name_of(model: Path) -> str:
    return artifact.read_spec(model).name


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| model | n | fp32 changed (near-ties) | max prob diff | int8 agree (speed) |"
           " int8a16 agree (speed) | calibrated agree | mean depth |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f, i, c = r["fp32_full_depth"], r["int8_full_depth"], r["calibrated"]
        a = r.get("int8a16_full_depth")
        a16 = f"{a['agreement_with_fp32']:.2%} ({a['speed_vs_fp32']:.2f}x)" if a else "-"
        speed = f" ({i['speed_vs_fp32']:.2f}x)" if "speed_vs_fp32" in i else ""
        if i.get("smoothing_alpha") is not None:
            speed += f", smoothing alpha {i['smoothing_alpha']}"
        out.append(f"| {r['model']} | {r['n']} | {f['answers_changed_vs_transformers']}"
                   f" ({f['changed_near_ties']}) | {f['max_abs_prob_diff']:.1e} |"
                   f" {i['agreement_with_fp32']:.2%}{speed} | {a16} |"
                   f" {c['agreement_with_full_depth']:.2%} |"
                   f" {c['mean_depth']:.2f} / {c['full_depth']} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="bench/make_families.py's output directory")
    ap.add_argument("--reference-python", required=True, help="a python with transformers")
    ap.add_argument("--build", type=Path, default=ROOT / "build/families")
    ap.add_argument("--limit", type=int, default=4000, help="add-exits training texts")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--tag", default="local")
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        rows.append(compare(name, a.root, a.build, a.reference_python, a.limit))
        print(json.dumps(rows[-1]), flush=True)
    stem = a.out / f"families-{datetime.date.today()}-{a.tag}"
    Path(f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
