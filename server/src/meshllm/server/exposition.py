"""The ``/metrics`` HTTP endpoint: Prometheus text or OpenMetrics, as the scraper asks, with
every metric under its own name.

prometheus-client's own endpoint answers an OpenMetrics request with "underscores" escaping
that also rewrites the ``:`` of a sample's name (prometheus/client_python#1177), so a real
Prometheus stored ``vllm:num_requests_waiting`` as ``vllm_num_requests_waiting`` and the Gateway
API Inference Extension could not find it. ``:`` is legal in a metric name in both formats, and
every name we expose is a legacy (pre-UTF-8) name, which no escaping scheme changes: we render
OpenMetrics with prometheus-client's writer told to leave names as they are."""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, gzip_accepted
from prometheus_client.openmetrics import exposition as openmetrics

OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PATH = "/metrics"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def wants_openmetrics(accept: str) -> bool:
    """Whether an ``Accept`` header offers OpenMetrics (Prometheus offers it first, with the text
    format as a fallback); anything else gets the text format, which every scraper reads."""
    return any(
        part.split(";", 1)[0].strip() == "application/openmetrics-text"
        for part in accept.split(",")
    )


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The registry rendered for an ``Accept`` header: (body, content type)."""
    if wants_openmetrics(accept):
        body: bytes = openmetrics.generate_latest(  # type: ignore[no-untyped-call]
            registry, escaping=openmetrics.ALLOWUTF8
        )
        return body, OPENMETRICS_CONTENT_TYPE
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def metrics_app(
    registry: CollectorRegistry,
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app that serves ``registry`` at ``/metrics`` (GET or HEAD) and 404 elsewhere."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return _plain(start_response, "404 Not Found", b"Not Found: metrics are at /metrics\n")
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", b"Method Not Allowed\n")
        body, content_type = exposition(registry, environ.get("HTTP_ACCEPT", ""))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [b"" if method == "HEAD" else body]

    return app


def _plain(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    if status.startswith("405"):
        headers.append(("Allow", "GET, HEAD"))
    start_response(status, headers)
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process at exit


class _IPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one line per scrape is noise, and the path is the client's."""


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` over HTTP on a daemon thread; returns the server and its port."""
    server_class = _IPv6Server if ":" in host else _ThreadingServer
    server = make_server(
        host,
        port,
        metrics_app(registry),
        server_class=server_class,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, int(server.server_port)
