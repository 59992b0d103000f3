"""Prometheus metrics of the inference pool (served over HTTP by ``helixflow pool``).

Per model: requests by outcome, request latency, time to first token, inter-token latency,
prompt and generation tokens (counted in the service), and, read from each engine's published
load at scrape time, requests running and waiting, KV-cache usage, prefix-cache hit rate and
preemptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from helixflow.pool.async_engine import EngineLoad

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    """Gauges read from every engine's latest ``EngineLoad`` when Prometheus scrapes."""

    def __init__(self, loads: Callable[[], Mapping[str, EngineLoad]]) -> None:
        self.loads = loads

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "running": GaugeMetricFamily("helixflow_pool_requests_running",
                                         "Requests being generated", labels=["model"]),
            "waiting": GaugeMetricFamily("helixflow_pool_requests_waiting",
                                         "Requests queued for the engine", labels=["model"]),
            "kv": GaugeMetricFamily("helixflow_pool_kv_cache_usage",
                                    "Fraction of KV-cache blocks in use", labels=["model"]),
            "hit": GaugeMetricFamily("helixflow_pool_prefix_cache_hit_rate",
                                     "Prompt tokens served from the prefix cache / looked up",
                                     labels=["model"]),
            "pre": CounterMetricFamily("helixflow_pool_preemptions",
                                       "Requests preempted for KV-cache room", labels=["model"]),
        }  # fmt: skip
        for model, load in self.loads().items():
            families["running"].add_metric([model], load.running)
            families["waiting"].add_metric([model], load.waiting)
            families["kv"].add_metric([model], load.kv_cache_usage)
            families["hit"].add_metric([model], load.prefix_cache_hit_rate)
            families["pre"].add_metric([model], load.num_preemptions)
        yield from families.values()


class PoolMetrics:
    """The pool's metrics in their own registry (``registry`` is what the HTTP server serves)."""

    def __init__(self, loads: Callable[[], Mapping[str, EngineLoad]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helixflow_pool_requests", "Finished requests by outcome",
                                ["model", "rpc", "outcome"], registry=r)  # fmt: skip
        self.latency = Histogram("helixflow_pool_request_seconds", "Request latency",
                                 ["model", "rpc"], buckets=_LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self.ttft = Histogram("helixflow_pool_time_to_first_token_seconds",
                              "Time from request to its first token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("helixflow_pool_inter_token_seconds",
                             "Time between a stream's consecutive token messages", ["model"],
                             buckets=_TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("helixflow_pool_prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=r)  # fmt: skip
        self.generation_tokens = Counter("helixflow_pool_generation_tokens",
                                         "Tokens generated", ["model"], registry=r)  # fmt: skip
        r.register(_EngineCollector(loads))
