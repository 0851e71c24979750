"""`/healthz` and `/metrics` over HTTP, on loopback by default (`[http]` in the config).

* ``GET /healthz``: 200 and ``{"status": "ok", "checks": {...}}`` when the
  health callable reports healthy; 503 and ``"status": "unhealthy"`` (or
  ``"error"`` if the callable raised) otherwise.  For load balancers and
  ``curl -f`` in monitoring scripts; systemd's watchdog is separate.
* ``GET /metrics``: Prometheus text format (OpenMetrics if the scraper asks
  for it) from the node's own `CollectorRegistry`, never the global one, so
  tests and several nodes in one process don't share counters.
* Anything else: 404.

Counts of states (studies per state, outbox depth) are read from the spool
database through callables on every scrape, so they cannot drift from what
`sclc-node status` shows.  Event counters (instances received, scoring times,
deliveries) count what happened in this process since it started, which is
what Prometheus `rate()` expects.

Nothing here carries patient data: labels are fixed vocabularies, study
states and configured destination names.
"""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from sclc_risk_node.node.config import ConfigError, HttpConfig
from sclc_risk_node.node.logs import get_logger

#: `sop_class` label of `sclc_instances_received_total`.
SOP_CLASSES = ("ct", "seg", "rtstruct", "other")
#: `outcome` label of `sclc_instances_received_total`: written to the spool,
#: already there (same SOP Instance UID, acknowledged again), or refused.
RECEIVE_OUTCOMES = ("stored", "duplicate", "rejected")
#: Scoring a chest CT takes seconds to minutes (pyradiomics dominates).
SCORING_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: `stage` label of `sclc_scoring_stage_seconds`, in the order a run goes through them.
SCORING_STAGES = ("read", "ring", "extract", "model", "sr")
#: A stage takes from milliseconds (model) to a minute (reading a huge series).
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: `applicability` label of `sclc_scored_studies_total`: `scoring.types.DomainStatus` values.
APPLICABILITY_STATUSES = ("in_domain", "out_of_domain", "unknown")


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


class NodeMetrics:
    """The node's Prometheus metrics, in a registry of their own.

    ``studies_by_state`` and ``outbox_depth`` are called on every scrape
    (from the HTTP thread) and should run one cheap query each.  States in
    ``study_states`` and names in ``destinations`` are exported with 0
    before anything happened, so alerts and graphs see the series from the
    start.
    """

    def __init__(
        self,
        *,
        studies_by_state: Callable[[], Mapping[str, int]],
        outbox_depth: Callable[[], int],
        study_states: Iterable[str] = (),
        destinations: Iterable[str] = (),
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        self._received = Counter(
            "sclc_instances_received",
            "DICOM instances received by the SCP, by SOP class (ct, seg, other) and outcome "
            "(stored, duplicate, rejected).",
            ["sop_class", "outcome"],
            registry=self.registry,
        )
        for sop_class in SOP_CLASSES:
            for outcome in RECEIVE_OUTCOMES:
                self._received.labels(sop_class, outcome)
        self._scoring = Histogram(
            "sclc_scoring_seconds",
            "Wall time of successful scoring runs (CT + SEG + clinical record to SR), in seconds.",
            buckets=SCORING_BUCKETS_S,
            registry=self.registry,
        )
        self._stage = Histogram(
            "sclc_scoring_stage_seconds",
            "Wall time of each stage of successful scoring runs, in seconds: read (CT series + SEG), "
            "ring (crop + peritumoral ring), extract (pyradiomics features), model (Cox model), "
            "sr (build and encode the result objects: risk SR, ROI SR, KOS, PDF, SC).",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        for stage in SCORING_STAGES:
            self._stage.labels(stage)
        self._scored = Counter(
            "sclc_scored_studies",
            "Studies scored, by applicability-domain verdict (in_domain, out_of_domain, unknown = the model "
            "records no domain) and whether the risk group and PFS were withheld (true, false).",
            ["applicability", "withheld"],
            registry=self.registry,
        )
        for status in APPLICABILITY_STATUSES:
            for withheld in ("true", "false"):
                self._scored.labels(status, withheld)
        self._delivered = Counter(
            "sclc_srs_delivered",
            "SRs accepted (C-STORE success) by a destination.",
            ["destination"],
            registry=self.registry,
        )
        self._delivery_failures = Counter(
            "sclc_sr_delivery_failures",
            "Failed SR delivery attempts (each retry counts); deliveries still pending or given up "
            "are in sclc_outbox_depth.",
            ["destination"],
            registry=self.registry,
        )
        for name in destinations:
            self._delivered.labels(name)
            self._delivery_failures.labels(name)
        self.registry.register(_LiveCounts(studies_by_state, outbox_depth, tuple(study_states)))
        if process_metrics:
            # process_cpu_seconds_total, process_resident_memory_bytes, open fds... from /proc/self.
            ProcessCollector(registry=self.registry)

    def instance_received(self, sop_class: str, outcome: str) -> None:
        if sop_class not in SOP_CLASSES:
            raise ValueError(f"sop_class {sop_class!r} is not one of {SOP_CLASSES}")
        if outcome not in RECEIVE_OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {RECEIVE_OUTCOMES}")
        self._received.labels(sop_class, outcome).inc()

    def scoring_finished(self, seconds: float, *, stages: Mapping[str, float] | None = None) -> None:
        """One successful scoring run: its total and, when known, each stage's seconds."""
        self._scoring.observe(seconds)
        for stage, stage_seconds in (stages or {}).items():
            if stage not in SCORING_STAGES:
                raise ValueError(f"stage {stage!r} is not one of {SCORING_STAGES}")
            self._stage.labels(stage).observe(stage_seconds)

    def study_scored(self, applicability: str, *, withheld: bool) -> None:
        """Count one scored study by its applicability status (`DomainStatus` value)."""
        if applicability not in APPLICABILITY_STATUSES:
            raise ValueError(f"applicability {applicability!r} is not one of {APPLICABILITY_STATUSES}")
        self._scored.labels(applicability, "true" if withheld else "false").inc()

    def sr_delivered(self, destination: str) -> None:
        self._delivered.labels(destination).inc()

    def sr_delivery_failed(self, destination: str) -> None:
        self._delivery_failures.labels(destination).inc()


class _LiveCounts:
    """Collector reading state counts from the database at scrape time.

    A failing source (e.g. the database is locked past its busy timeout)
    drops only its own metric and sets ``sclc_metrics_source_up{source}`` to 0;
    the rest of the scrape still succeeds.
    """

    def __init__(
        self,
        studies_by_state: Callable[[], Mapping[str, int]],
        outbox_depth: Callable[[], int],
        study_states: tuple[str, ...],
    ) -> None:
        self._studies_by_state = studies_by_state
        self._outbox_depth = outbox_depth
        self._study_states = study_states

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "sclc_metrics_source_up",
            "1 if the live count was read from the spool database on this scrape, 0 if reading it failed.",
            labels=["source"],
        )
        try:
            counts = dict.fromkeys(self._study_states, 0) | dict(self._studies_by_state())
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one source did
            _log().warning("metrics_source_failed", source="studies", error_type=type(exc).__name__, error=str(exc))
            up.add_metric(["studies"], 0)
        else:
            studies = GaugeMetricFamily("sclc_studies", "Studies in the spool, by state.", labels=["state"])
            for state, count in sorted(counts.items()):
                studies.add_metric([state], count)
            yield studies
            up.add_metric(["studies"], 1)
        try:
            depth = self._outbox_depth()
        except Exception as exc:  # noqa: BLE001
            _log().warning("metrics_source_failed", source="outbox", error_type=type(exc).__name__, error=str(exc))
            up.add_metric(["outbox"], 0)
        else:
            yield GaugeMetricFamily(
                "sclc_outbox_depth",
                "SR deliveries not yet accepted by their destination (pending + failed).",
                value=depth,
            )
            up.add_metric(["outbox"], 1)
        yield up


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
            body = {"status": "error", "error": type(exc).__name__}
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
        self.server_name, self.server_port = self.server_address[:2]


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
        return self._server.server_address[0]

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
