"""Hugging Face transformers' own answers for a classifier directory: the reference that
bench/families.py holds the served model against. Dev-only: run with a virtualenv that
has `transformers` (exitserve never imports it), one text at a time in fp32, eval mode:

  /tmp/refvenv/bin/python bench/hf_reference.py IN.json OUT.json

IN.json: {"model_dir": ..., "texts": [...], "max_length": 128}
OUT.json: {"logits": [[...], ...], "problem_type": ..., "transformers_version": ...}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers as hf


def main(src: str, dst: str) -> None:
    job = json.loads(Path(src).read_text())
    d = Path(job["model_dir"])
    torch.set_num_threads(1)
    model = hf.AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = hf.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    logits = []
    with torch.inference_mode():
        for text in job["texts"]:
            enc = tok(text, truncation=True, max_length=job["max_length"], return_tensors="pt")
            enc.pop("token_type_ids", None)  # single-segment inputs: type 0 where used
            logits.append(model(**enc).logits[0].tolist())
    Path(dst).write_text(json.dumps({
        "logits": logits,
        "problem_type": model.config.problem_type,
        "transformers_version": hf.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
