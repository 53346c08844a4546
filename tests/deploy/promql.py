"""What darkroom exports (from services/metrics.py itself) and what a PromQL expression asks for.

Used to check that dashboards, the KEDA query and scrape configs only name series that exist, with labels
those series carry, so renaming a metric in code cannot leave a silently empty panel or a scaler stuck at 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.metrics import MetricWrapperBase

from services import metrics

#: Labels Prometheus adds to every scraped series (target labels), in compose and under prometheus-operator.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint", "node"})

_SELECTOR = re.compile(r"\b(darkroom_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Selector:
    """One ``metric{matchers}`` in an expression."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()  # (label, operator, value)

    def labels(self) -> set[str]:
        return {label for label, _, _ in self.matchers}


@dataclass
class Series:
    """A sample name darkroom exposes and the labels it carries."""

    name: str
    labels: frozenset[str]
    family: str = field(default="")


def exported_series() -> dict[str, Series]:
    """Every sample name the metric objects in services/metrics.py expose, with their label names."""
    series: dict[str, Series] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        family = value._name  # the family name, without the _total a counter's samples get
        labels = frozenset(value._labelnames)
        kind = value._type
        if kind == "counter":
            names = {f"{family}_total": labels}  # no _created: services.metrics.export turns them off
        elif kind == "histogram":
            names = {
                f"{family}_bucket": labels | {"le"},
                f"{family}_sum": labels,
                f"{family}_count": labels,
            }
        elif kind == "summary":
            names = {f"{family}": labels | {"quantile"}, f"{family}_sum": labels, f"{family}_count": labels}
        else:
            names = {family: labels}
        for name, sample_labels in names.items():
            series[name] = Series(name, sample_labels, family)
    return series


def selectors(expression: str) -> list[Selector]:
    """The darkroom_* selectors of a PromQL expression, with their label matchers."""
    found = []
    for match in _SELECTOR.finditer(expression):
        body = match.group(2) or "{}"
        matchers = tuple(_MATCHER.findall(body[1:-1]))
        leftover = _MATCHER.sub("", body[1:-1]).replace(",", "").strip()
        if leftover:
            raise ValueError(f"cannot parse label matchers {body!r} in {expression!r}")
        found.append(Selector(match.group(1), matchers))
    return found


def grouping_labels(expression: str) -> set[str]:
    """Label names used in ``by (...)`` / ``without (...)`` clauses."""
    labels: set[str] = set()
    for match in _GROUPING.finditer(expression):
        labels.update(part.strip() for part in match.group(1).split(",") if part.strip())
    return labels


def problems(expression: str, exported: dict[str, Series] | None = None) -> list[str]:
    """Why ``expression`` would not match darkroom's series as written; empty when it does."""
    exported = exported if exported is not None else exported_series()
    found = selectors(expression)
    if not found:
        return [f"no darkroom_* metric in {expression!r}"]
    issues = []
    allowed_by: set[str] = set(TARGET_LABELS)
    for selector in found:
        series = exported.get(selector.name)
        if series is None:
            issues.append(f"{selector.name} is not exported by services/metrics.py")
            continue
        allowed = series.labels | TARGET_LABELS
        allowed_by |= allowed
        unknown = selector.labels() - allowed
        if unknown:
            issues.append(f"{selector.name} has no label(s) {sorted(unknown)}")
    unknown_by = grouping_labels(expression) - allowed_by
    if unknown_by:
        issues.append(f"grouping by label(s) {sorted(unknown_by)} that no selected series has")
    return issues
