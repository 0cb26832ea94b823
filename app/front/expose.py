"""One Prometheus exposition from the model processes' own.

Each model process labels its series with its model, so they seldom meet; the few that
carry no model (requests to other routes, bodies refused before a model was known) and
appear in several processes are counters and histograms, and are summed, which is what
one process would have counted. Each family keeps one HELP and TYPE.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def merged(expositions: Iterable[str]) -> bytes:
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            kept = families.setdefault(family.name, _empty(family))
            samples = values.setdefault(kept.name, {})
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                seen = samples.get(key)
                if seen is None or kept.type == "gauge":
                    samples[key] = s  # a gauge is one process's: the last word stands
                else:
                    samples[key] = s._replace(value=seen.value + s.value)
    for name, family in families.items():
        family.samples = list(values[name].values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def _empty(family: Metric) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
