"""Prometheus metrics of one gateway process (its own registry: no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lattice_requests_total",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lattice_request_duration_seconds",
            "Time to the end of the response (streams: to the last byte).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        #: requests being served (plain integer on the request path; read when scraped)
        self.in_flight = 0
        Gauge(
            "lattice_requests_in_flight", "Requests being served.", registry=self.registry
        ).set_function(lambda: self.in_flight)
        self.upstream_errors = Counter(
            "lattice_upstream_errors_total",
            "Failed calls to upstreams by offering and error code.",
            ["offering", "code"],
            registry=self.registry,
        )
        self.dispatches = Counter(
            "lattice_dispatches_total",
            "Dispatches by task class and outcome.",
            ["task", "status"],
            registry=self.registry,
        )

        # labelled children, looked up once: ``labels()`` costs more than the increment
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._dispatch_children: dict[tuple[str, str], Any] = {}

    def count_dispatch(self, task: str, status: str) -> None:
        """Count one dispatch of ``task`` ending ``status`` (completed, cancelled, failed)."""
        key = (task, status)
        child = self._dispatch_children.get(key)
        if child is None:
            child = self._dispatch_children[key] = self.dispatches.labels(task, status)
        child.inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one finished request on ``route`` (a bounded label) and its duration."""
        key = (route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, str(status)), self.latency.labels(route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
