"""Figures from scraped Prometheus samples: counter rates, histogram quantiles, gauges.

Rates and quantiles compare two scrapes of one service, as Prometheus' ``rate()`` and
``histogram_quantile()`` do: per series, a counter that went down was reset (the service
restarted) and counts from zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from helixflow.monitoring.probes import Samples

__all__ = ["Snapshot", "delta", "deltas", "gauge", "quantile", "total"]

Match = Mapping[str, str | tuple[str, ...]]  # label -> the value, or any of the values
SeriesKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Snapshot:
    """One scrape of one service at a monotonic time."""

    t: float
    samples: Samples


def _matches(labels: Mapping[str, str], match: Match) -> bool:
    for key, want in match.items():
        value = labels.get(key, "")
        if value not in (want if isinstance(want, tuple) else (want,)):
            return False
    return True


def _series(samples: Samples, name: str, match: Match) -> dict[SeriesKey, float]:
    return {tuple(sorted(labels.items())): value for labels, value in samples.get(name, ())
            if _matches(labels, match)}  # fmt: skip


def total(samples: Samples, name: str, **match: str | tuple[str, ...]) -> float:
    """The sum of the matching series."""
    return sum(_series(samples, name, match).values())


def gauge(samples: Samples, name: str, how: str = "sum",
          **match: str | tuple[str, ...]) -> float | None:  # fmt: skip
    """The matching series combined by `how` (sum | max | mean), None when there are none."""
    values = list(_series(samples, name, match).values())
    if not values:
        return None
    if how == "max":
        return max(values)
    if how == "mean":
        return sum(values) / len(values)
    return sum(values)


def deltas(old: Samples, new: Samples, name: str,
           match: Match) -> Iterable[tuple[dict[str, str], float]]:  # fmt: skip
    before = _series(old, name, match)
    for key, value in _series(new, name, match).items():
        previous = before.get(key, 0.0)
        yield dict(key), value - previous if value >= previous else value  # reset: from zero


def delta(old: Samples, new: Samples, name: str, **match: str | tuple[str, ...]) -> float:
    """How much the matching counters grew between two scrapes."""
    return sum(d for _, d in deltas(old, new, name, match))


def quantile(q: float, old: Samples, new: Samples, histogram: str,
             **match: str | tuple[str, ...]) -> float | None:  # fmt: skip
    """The q-quantile of a histogram's observations between two scrapes (linear within a
    bucket, as Prometheus interpolates), or None when nothing was observed."""
    buckets: dict[float, float] = {}
    for labels, d in deltas(old, new, f"{histogram}_bucket", match):
        bound = float(labels.get("le", "+Inf"))
        buckets[bound] = buckets.get(bound, 0.0) + d
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in bounds:
        cumulative = buckets[bound]
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # above the highest finite bound: that bound is all we know
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return lower + (bound - lower) * share
        lower, below = bound, cumulative
    return lower
