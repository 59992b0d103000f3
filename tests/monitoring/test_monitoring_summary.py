"""Figures from scraped samples: counter deltas across resets, gauges, histogram quantiles
compared with the exact quantiles of the observations."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helixflow.monitoring import summary
from helixflow.monitoring.probes import Samples


def scrape(registry: CollectorRegistry) -> Samples:
    """What `Prober.scrape` makes of the registry's exposition."""
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_counter_delta_sums_series_and_survives_a_reset() -> None:
    registry = CollectorRegistry()
    requests = Counter("req", "", ["route", "status"], registry=registry)
    requests.labels("/a", "200").inc(5)
    requests.labels("/a", "500").inc(2)
    old = scrape(registry)
    requests.labels("/a", "200").inc(3)
    requests.labels("/b", "503").inc(1)  # a series that did not exist before counts in full
    new = scrape(registry)
    assert summary.delta(old, new, "req_total") == 4
    assert summary.delta(old, new, "req_total", status=("500", "503")) == 1
    assert summary.delta(old, new, "req_total", route="/a") == 3
    # The service restarted: its counter starts again from zero and counts what it has.
    restarted = CollectorRegistry()
    Counter("req", "", ["route", "status"], registry=restarted).labels("/a", "200").inc(2)
    assert summary.delta(new, scrape(restarted), "req_total", route="/a", status="200") == 2


def test_gauges_combine_as_asked() -> None:
    registry = CollectorRegistry()
    usage = Gauge("kv", "", ["model"], registry=registry)
    usage.labels("a").set(0.25)
    usage.labels("b").set(0.75)
    samples = scrape(registry)
    assert summary.gauge(samples, "kv") == 1.0
    assert summary.gauge(samples, "kv", "max") == 0.75
    assert summary.gauge(samples, "kv", "mean") == 0.5
    assert summary.gauge(samples, "kv", model="b") == 0.75
    assert summary.gauge(samples, "missing") is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_match_the_observations_within_a_bucket(seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    bounds = [i / 20 for i in range(1, 21)]  # 0.05 .. 1.0
    registry = CollectorRegistry()
    ttft = Histogram("ttft_seconds", "", ["model"], buckets=bounds, registry=registry)
    ttft.labels("m").observe(0.9)  # before the window: must not count
    old = scrape(registry)
    values = sorted(rng.uniform(0, 1) for _ in range(2000))
    for v in values:
        ttft.labels("m").observe(v)
    new = scrape(registry)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        got = summary.quantile(q, old, new, "ttft_seconds")
        assert got is not None and abs(got - exact) <= 0.05, (q, got, exact)


def test_quantile_edges() -> None:
    registry = CollectorRegistry()
    latency = Histogram("lat_seconds", "", buckets=[0.1, 1.0], registry=registry)
    old = scrape(registry)
    assert summary.quantile(0.5, old, scrape(registry), "lat_seconds") is None  # nothing new
    latency.observe(50.0)  # beyond the last finite bound: that bound is all that is known
    assert summary.quantile(0.5, old, scrape(registry), "lat_seconds") == 1.0
    assert summary.quantile(0.5, {}, {}, "lat_seconds") is None
