"""Write a model directory that needs no base package: every weight stored in full.

The committed models store fp16 deltas from the MiniLM weights of an installed package.
A machine without that package (the GPU machine `bench/gpu_check.py` runs on) gets a
self-contained copy instead: full weights in fp16 (what a GPU serves anyway; about
46 MB) and the tokenizer, checked by sha256 like any artifact.

Usage:
  .venv/bin/python bench/standalone_model.py models/rt-sentiment-minilm OUT_DIR
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.network import artifact  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    loaded = artifact.load(src)
    spec = dataclasses.replace(loaded.spec, base=None)
    tokenizer = artifact.tokenizer_path(src, loaded.spec)
    artifact.save(dst, spec, loaded.network, tokenizer_file=tokenizer, dtype=torch.float16)
    artifact.load(dst)  # verifies what was written
    print(f"wrote {dst} ({sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
