"""`/healthz` and `/metrics` over HTTP, on loopback by default (`[http]` in the config).

* ``GET /healthz``: 200 and ``{"status": "ok", "checks": {...}}`` when the
  health callable reports healthy; 503 and ``"status": "unhealthy"`` (or
  ``"error"`` if the callable raised) otherwise.  For load balancers and
  ``curl -f`` in monitoring scripts; systemd's watchdog is separate.
* ``GET /metrics``: Prometheus text format (OpenMetrics if the scraper asks
  for it) from the node's own `CollectorRegistry`, never the global one, so
  tests and several nodes in one process don't share counters.
* Anything else: 404.

The metrics themselves live in `node.metrics` (the SCP, the worker and the
outbox count into them); this module only serves them.  Nothing here carries
patient data.
"""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from sclc_risk_node.node.config import ConfigError, HttpConfig
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.metrics import NodeMetrics


def _log():
    # Looked up per call: a logger bound at import would keep structlog's
    # configuration from before `configure_logging` ran.
    return get_logger(stage="http")


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What the service's health callable returns.

    ``checks`` maps a component to a short, PHI-free status text, e.g.
    ``{"scp": "listening", "spool": "ok", "workers": "1/1 alive"}``.
    """

    healthy: bool
    checks: Mapping[str, str] = field(default_factory=dict)


# --- the server ---------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _StatusServer
    server_version = "sclc-risk-node"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        try:
            if path == "/healthz":
                self._health()
            elif path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(HTTPStatus.OK, encoder(self.server.metrics.registry), content_type)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found; try /healthz or /metrics\n", "text/plain; charset=utf-8")
        except Exception as exc:  # noqa: BLE001 - answer 500, keep serving
            _log().exception("http_handler_failed", path=path, error_type=type(exc).__name__)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain; charset=utf-8")

    def _health(self) -> None:
        try:
            report = self.server.health()
        except Exception as exc:  # noqa: BLE001 - a failing check means unhealthy, not a crash
            _log().warning("health_check_failed", error_type=type(exc).__name__, error=str(exc))
            body: dict[str, object] = {"status": "error", "error": type(exc).__name__}
            status = HTTPStatus.SERVICE_UNAVAILABLE
        else:
            body = {"status": "ok" if report.healthy else "unhealthy", "checks": dict(report.checks)}
            status = HTTPStatus.OK if report.healthy else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(status, (json.dumps(body, sort_keys=True) + "\n").encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        _log().debug("http_request", client=self.client_address[0], request=format % args)


class _StatusServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: NodeMetrics, health: Callable[[], HealthReport]):
        self.metrics = metrics
        self.health = health
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the bind address with getfqdn(),
        # a DNS lookup that can stall start-up; the name is unused here.
        socketserver.TCPServer.server_bind(self)
        host, self.server_port = self.server_address[:2]
        self.server_name = str(host)


class _StatusServer6(_StatusServer):
    address_family = socket.AF_INET6


class HttpStatusServer:
    """A running status server; `port` is the bound port (useful with port 0)."""

    def __init__(self, server: _StatusServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http-status", daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the thread (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> HttpStatusServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_http_server(
    config: HttpConfig, metrics: NodeMetrics, health: Callable[[], HealthReport]
) -> HttpStatusServer | None:
    """Serve /healthz and /metrics in a daemon thread; None when ``config.enabled`` is false.

    A port that cannot be bound raises `ConfigError` naming the key to change.
    """
    if not config.enabled:
        return None
    server_class = _StatusServer6 if ":" in config.bind_address else _StatusServer
    try:
        server = server_class((config.bind_address, config.port), metrics, health)
    except OSError as exc:
        where = f"{config.bind_address}:{config.port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError([f"http.port: {where} is already in use"]) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError([f"http.bind_address: {config.bind_address} is not an address of this machine"]) from None
        raise ConfigError([f"http.port: cannot listen on {where}: {exc.strerror or exc}"]) from None
    handle = HttpStatusServer(server)
    _log().info("http_status_listening", address=handle.host, port=handle.port)
    return handle
