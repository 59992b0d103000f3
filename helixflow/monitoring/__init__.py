"""``helixflow monitor``: the health and metrics of every HelixFlow service in one place.

It polls each service's health endpoint and Prometheus metrics once a second and serves:
aggregated health over gRPC (:8083, ``protos/monitoring.proto`` and grpc.health.v1) and over
HTTP (:8084, ``GET /health``), a live status page at ``/``, its own ``/metrics``, a Prometheus
scrape configuration (``/prometheus.yml``) and a Grafana dashboard (``/grafana.json``).

    targets.py    what is probed (flags, env, defaults)
    probes.py     one health probe and one metrics scrape
    summary.py    scraped samples -> the figures the page shows (rates, quantiles, gauges)
    monitor.py    the poll loop: per-service state, history, recent events
    dashboards.py the Prometheus scrape config and the Grafana dashboard
    page.py       the status page (one self-contained HTML document)
    http_app.py   the HTTP API (ASGI)
    service.py    gRPC + HTTP serving, signals
"""
