"""Data sets: deduplication, conflicts, deterministic splits, file readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.training.data import Example, read, read_file, split

LABELS = ("negative", "positive")


def examples(n: int) -> list[Example]:
    return [Example(f"sentence number {i}", LABELS[i % 2]) for i in range(n)]


def texts(xs: list[Example]) -> set[str]:
    return {e.text for e in xs}


def test_split_is_deterministic_for_a_seed() -> None:
    a, b = split(examples(100), seed=5), split(examples(100), seed=5)
    assert (a.train, a.calibration, a.test) == (b.train, b.calibration, b.test)


def test_split_differs_for_another_seed() -> None:
    a, b = split(examples(100), seed=5), split(examples(100), seed=6)
    assert texts(a.test) != texts(b.test)


def test_split_does_not_depend_on_input_order() -> None:
    data = examples(100)
    a, b = split(data, seed=1), split(list(reversed(data)), seed=1)
    assert (a.train, a.calibration, a.test) == (b.train, b.calibration, b.test)


def test_splits_are_disjoint_and_cover_every_example() -> None:
    s = split(examples(100), seed=0)
    train, cal, test = texts(s.train), texts(s.calibration), texts(s.test)
    assert not (train & cal) and not (train & test) and not (cal & test)
    assert train | cal | test == texts(examples(100))


def test_split_sizes_are_80_10_10() -> None:
    s = split(examples(100), seed=0)
    assert (len(s.train), len(s.calibration), len(s.test)) == (80, 10, 10)
    assert s.summary()["sizes"] == {"train": 80, "calibration": 10, "test": 10}


def test_duplicates_after_normalisation_are_dropped_and_counted() -> None:
    data = [
        *examples(30),
        Example("  Sentence   NUMBER 0 ", "negative"),
        Example("sentence number 1\n", "positive"),
        Example("SENTENCE number 2", "negative"),
    ]
    s = split(data, seed=0)
    all_texts = [e.text for e in s.train + s.calibration + s.test]
    assert len(all_texts) == 30
    assert len({t.casefold() for t in all_texts}) == 30
    assert s.dropped_duplicates == 3
    assert s.dropped_conflicts == 0


def test_kept_text_is_whitespace_normalised() -> None:
    s = split([Example("  a\t good \n film ", "positive"), *examples(20)], seed=0)
    assert "a good film" in texts(s.train + s.calibration + s.test)


def test_texts_with_conflicting_labels_are_dropped() -> None:
    data = [
        *examples(30),
        Example("Mixed feelings", "positive"),
        Example("mixed  feelings", "negative"),
    ]
    s = split(data, seed=0)
    all_texts = {t.casefold() for t in texts(s.train + s.calibration + s.test)}
    assert "mixed feelings" not in all_texts
    assert len(all_texts) == 30
    assert s.dropped_conflicts == 1


def test_empty_texts_are_skipped() -> None:
    data = [*examples(30), Example("", "positive"), Example("   \n", "negative")]
    s = split(data, seed=0)
    assert len(s.train) + len(s.calibration) + len(s.test) == 30
    assert "" not in texts(s.train + s.calibration + s.test)


def test_empty_texts_are_not_counted_as_duplicates() -> None:
    s = split([*examples(30), Example("", "positive"), Example("   ", "negative")], seed=0)
    assert s.dropped_duplicates == 0


def test_labels_are_sorted_when_not_given() -> None:
    data = [Example(f"text {i}", ("b", "c", "a")[i % 3]) for i in range(30)]
    assert split(data, seed=0).labels == ("a", "b", "c")


def test_given_labels_are_kept_in_their_order() -> None:
    assert split(examples(30), seed=0, labels=("positive", "negative")).labels == (
        "positive",
        "negative",
    )


def test_unknown_labels_are_rejected() -> None:
    data = [*examples(30), Example("so so", "neutral")]
    with pytest.raises(
        ValueError, match=r"labels \['neutral'\] are not in \['negative', 'positive'\]"
    ):
        split(data, seed=0, labels=LABELS)


def test_too_few_examples_to_split_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"too few examples to split: 4 unique"):
        split(examples(4), seed=0)


def test_unknown_split_name_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'dev'"):
        split(examples(30), seed=0).get("dev")


def test_read_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",positive\nbad,negative\n', encoding="utf-8")
    assert read_file(path) == [Example("good, really", "positive"), Example("bad", "negative")]


def test_read_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": "good", "label": "positive", "id": 1})
        + "\n\n"
        + json.dumps({"text": "bad", "label": 0})
        + "\n",
        encoding="utf-8",
    )
    assert read_file(path) == [Example("good", "positive"), Example("bad", "0")]


def test_read_dispatches_to_files(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,positive\n", encoding="utf-8")
    assert read(str(path)) == [Example("fine", "positive")]


def test_read_of_unknown_source_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no data set"):
        read(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize(
    ("name", "content"),
    [("d.csv", "sentence,label\ngood,positive\n"), ("d.jsonl", '{"text": "good"}\n')],
)
def test_missing_columns_are_rejected(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name}: every row needs 'text' and 'label'"):
        read_file(path)


@pytest.mark.parametrize("name", ["d.tsv", "d.json", "d.txt"])
def test_other_suffixes_are_rejected(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("text,label\ngood,positive\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"unsupported data file '{name}'"):
        read_file(path)


def test_labels_may_be_optional_and_unlabelled_rows_stay_out_of_the_label_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.jsonl"
    rows = ['{"text": "good"}', '{"text": "bad", "label": 0}', '{"text": "fine", "label": null}']
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"every row needs 'text' and 'label'; row 1 lacks one"):
        read_file(path)
    examples = read_file(path, require_labels=False)
    assert [(e.text, e.label) for e in examples] == [("good", ""), ("bad", "0"), ("fine", "")]
    texts = [f"text number {i}" for i in range(30)]
    mixed = [Example(t, "" if i % 3 else "a") for i, t in enumerate(texts)]
    assert split(mixed, labels=("a", "b")).labels == ("a", "b")
    assert split(mixed).labels == ("a",)
    (tmp_path / "e.csv").write_text("sentence\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"every row needs 'text'; row 1 lacks one"):
        read_file(tmp_path / "e.csv", require_labels=False)
