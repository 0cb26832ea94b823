"""Just enough PromQL reading to check which series an expression selects.

Not a parser: it finds vector selectors (`name{label="value", ...}`), bare metric names
and grouping labels (`by (...)`, `on (...)`), which is all the wiring checks need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}  # fmt: skip
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NAME = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class Query:
    selectors: list[Selector]
    grouping: set[str]

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def parse(expr: str) -> Query:
    selectors: list[Selector] = []

    def take(m: re.Match[str]) -> str:
        body, matchers = m.group(2), []
        pos = 0
        while pos < len(body.strip()):
            mm = _MATCHER.match(body, pos)
            if mm is None:
                raise ValueError(f"cannot read label matchers {body!r} in {expr!r}")
            matchers.append((mm.group(1), mm.group(2), mm.group(3)))
            pos = mm.end()
        name = m.group(1)
        if name is None or name in KEYWORDS:  # `{__name__=...}` or `by {` never occur here
            raise ValueError(f"selector without a metric name in {expr!r}")
        selectors.append(Selector(name, matchers))
        return " "

    rest = _SELECTOR.sub(take, expr)
    rest = _RANGE.sub(" ", rest)
    grouping: set[str] = set()
    for g in _GROUPING.finditer(rest):
        grouping |= {x.strip() for x in g.group(2).split(",") if x.strip()}
    rest = _GROUPING.sub(" ", rest)
    for m in _NAME.finditer(rest):
        if m.group(1).lower() not in KEYWORDS:
            selectors.append(Selector(m.group(1)))
    return Query(selectors, grouping)


def problems(
    expr: str, series: dict[str, list[dict[str, str]]], target_labels: set[str]
) -> list[str]:
    """What in `expr` selects nothing the app exports; empty when all of it is wired.

    `series` maps exported sample names to their label sets; `target_labels` are the
    labels Prometheus adds (job, instance, ...), which the app itself never exports.
    """
    query = parse(expr)
    out: list[str] = []
    known_labels = set(target_labels)
    for sel in query.selectors:
        if sel.metric == "up":  # Prometheus's own per-target series
            continue
        if sel.metric not in series:
            out.append(f"{sel.metric} is not exported")
            continue
        label_sets = series[sel.metric]
        known_labels |= {k for labels in label_sets for k in labels}
        for label, op, value in sel.matchers:
            if label in target_labels:
                continue
            if not any(label in labels for labels in label_sets):
                out.append(f"{sel.metric} has no label {label!r}")
            elif op in ("=", "=~") and not any(
                re.fullmatch(value if op == "=~" else re.escape(value), labels.get(label, ""))
                for labels in label_sets
            ):
                out.append(f"{sel.metric}{{{label}{op}{value!r}}} matches no exported series")
    out += [f"grouping label {g!r} is on no selected series" for g in query.grouping - known_labels]
    return out
