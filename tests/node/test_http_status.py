"""node.http_status: a real server on an ephemeral loopback port, read with urllib."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sclc_risk_node.node.config import ConfigError, HttpConfig
from sclc_risk_node.node.http_status import HealthReport, start_http_server
from sclc_risk_node.node.metrics import NodeMetrics

LOOPBACK_ANY_PORT = HttpConfig(enabled=True, bind_address="127.0.0.1", port=0)


class Spool:
    """Stands in for the database queries: live counts that change between scrapes."""

    def __init__(self) -> None:
        self.studies = {"receiving": 2, "scoring": 1}
        self.outbox = 3
        self.broken = False

    def studies_by_state(self) -> dict[str, int]:
        if self.broken:
            raise RuntimeError("database is locked")
        return dict(self.studies)

    def outbox_depth(self) -> int:
        return self.outbox


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def spool():
    return Spool()


@pytest.fixture
def metrics(spool):
    return NodeMetrics(
        studies_by_state=spool.studies_by_state,
        outbox_depth=spool.outbox_depth,
        study_states=("receiving", "scoring", "failed"),
        destinations=("pacs-main",),
    )


@pytest.fixture
def health_state():
    return {"report": HealthReport(healthy=True, checks={"scp": "listening", "spool": "ok"})}


@pytest.fixture
def server(metrics, health_state):
    def health() -> HealthReport:
        report = health_state["report"]
        if isinstance(report, Exception):
            raise report
        return report

    handle = start_http_server(LOOPBACK_ANY_PORT, metrics, health)
    yield handle
    handle.stop()


def test_metrics_counts_events_and_reads_live_counts(server, metrics, spool):
    for _ in range(3):
        metrics.instance_received("ct", "stored")
    metrics.instance_received("seg", "stored")
    metrics.instance_received("ct", "duplicate")
    metrics.instance_received("other", "rejected")
    metrics.scoring_finished(12.5)
    metrics.scoring_finished(0.5)
    metrics.sr_delivered("pacs-main")
    metrics.sr_delivery_failed("pacs-main")
    metrics.sr_delivery_failed("pacs-main")

    status, content_type, text = get(server.url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    values = samples(text)
    received = "sclc_instances_received_total"
    assert values[(received, (("outcome", "stored"), ("sop_class", "ct")))] == 3
    assert values[(received, (("outcome", "stored"), ("sop_class", "seg")))] == 1
    assert values[(received, (("outcome", "duplicate"), ("sop_class", "ct")))] == 1
    assert values[(received, (("outcome", "rejected"), ("sop_class", "other")))] == 1
    assert values[(received, (("outcome", "rejected"), ("sop_class", "seg")))] == 0  # exported before it happens
    assert values[("sclc_scoring_seconds_count", ())] == 2
    assert values[("sclc_scoring_seconds_sum", ())] == 13.0
    assert values[("sclc_scoring_seconds_bucket", (("le", "1.0"),))] == 1
    assert values[("sclc_scoring_seconds_bucket", (("le", "20.0"),))] == 2
    assert values[("sclc_srs_delivered_total", (("destination", "pacs-main"),))] == 1
    assert values[("sclc_sr_delivery_failures_total", (("destination", "pacs-main"),))] == 2
    assert values[("sclc_studies", (("state", "receiving"),))] == 2
    assert values[("sclc_studies", (("state", "failed"),))] == 0
    assert values[("sclc_outbox_depth", ())] == 3
    assert values[("sclc_metrics_source_up", (("source", "studies"),))] == 1
    assert ("process_resident_memory_bytes", ()) in values
    assert "# TYPE sclc_studies gauge" in text and "# TYPE sclc_instances_received_total counter" in text

    # Live counts come from the source on every scrape, not from a copy.
    spool.studies["receiving"] = 0
    spool.studies["delivered"] = 5
    spool.outbox = 0
    values = samples(get(server.url + "/metrics?x=1")[2])
    assert values[("sclc_studies", (("state", "receiving"),))] == 0
    assert values[("sclc_studies", (("state", "delivered"),))] == 5
    assert values[("sclc_outbox_depth", ())] == 0


def test_scoring_stages_are_histograms_by_stage(server, metrics):
    metrics.scoring_finished(3.0, stages={"read": 0.8, "ring": 0.3, "extract": 1.7, "model": 0.004, "sr": 0.2})
    metrics.scoring_finished(9.0, stages={"read": 4.0, "ring": 0.3, "extract": 4.5, "model": 0.004, "sr": 0.2})

    text = get(server.url + "/metrics")[2]
    values = samples(text)
    stage = "sclc_scoring_stage_seconds"
    assert "# TYPE sclc_scoring_stage_seconds histogram" in text
    assert values[(stage + "_count", (("stage", "read"),))] == 2
    assert values[(stage + "_sum", (("stage", "read"),))] == pytest.approx(4.8)
    assert values[(stage + "_bucket", (("le", "1.0"), ("stage", "read")))] == 1
    assert values[(stage + "_bucket", (("le", "5.0"), ("stage", "extract")))] == 2
    assert values[(stage + "_bucket", (("le", "0.01"), ("stage", "model")))] == 2
    assert values[("sclc_scoring_seconds_count", ())] == 2
    with pytest.raises(ValueError, match="stage 'upload'"):
        metrics.scoring_finished(1.0, stages={"upload": 1.0})


def test_a_failing_source_drops_only_its_metric(server, spool):
    spool.broken = True
    status, _, text = get(server.url + "/metrics")
    assert status == 200
    values = samples(text)
    assert values[("sclc_metrics_source_up", (("source", "studies"),))] == 0
    assert values[("sclc_metrics_source_up", (("source", "outbox"),))] == 1
    assert not any(name == "sclc_studies" for name, _ in values)
    assert values[("sclc_outbox_depth", ())] == 3


def test_openmetrics_on_request(server):
    status, content_type, text = get(server.url + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_healthz_follows_the_health_callable(server, health_state):
    status, content_type, body = get(server.url + "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"status": "ok", "checks": {"scp": "listening", "spool": "ok"}}

    health_state["report"] = HealthReport(healthy=False, checks={"spool": "disk below min_free_bytes"})
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert json.loads(body) == {"status": "unhealthy", "checks": {"spool": "disk below min_free_bytes"}}

    health_state["report"] = OSError("disk gone")
    status, _, body = get(server.url + "/healthz")
    assert status == 503 and json.loads(body) == {"status": "error", "error": "OSError"}


@pytest.mark.parametrize("path", ["/", "/health", "/metrics/extra", "/healthz/"])
def test_unknown_paths_are_404(server, path):
    assert get(server.url + path)[0] == 404


def test_registries_are_per_instance(spool):
    first = NodeMetrics(studies_by_state=spool.studies_by_state, outbox_depth=spool.outbox_depth, process_metrics=False)
    second = NodeMetrics(
        studies_by_state=spool.studies_by_state, outbox_depth=spool.outbox_depth, process_metrics=False
    )
    first.instance_received("ct", "stored")
    labels = {"sop_class": "ct", "outcome": "stored"}
    assert first.registry.get_sample_value("sclc_instances_received_total", labels) == 1
    assert second.registry.get_sample_value("sclc_instances_received_total", labels) == 0


def test_unknown_label_values_are_refused(metrics):
    with pytest.raises(ValueError, match="sop_class 'mr'"):
        metrics.instance_received("mr", "stored")
    with pytest.raises(ValueError, match="outcome 'lost'"):
        metrics.instance_received("ct", "lost")


def test_disabled_server_is_not_started(metrics):
    assert (
        start_http_server(
            HttpConfig(enabled=False, bind_address="127.0.0.1", port=0), metrics, lambda: HealthReport(True)
        )
        is None
    )


def test_busy_port_names_the_key(server, metrics):
    busy = HttpConfig(enabled=True, bind_address="127.0.0.1", port=server.port)
    with pytest.raises(ConfigError, match=rf"config error: http\.port: 127\.0\.0\.1:{server.port} is already in use"):
        start_http_server(busy, metrics, lambda: HealthReport(True))


def test_stop_releases_the_port(metrics):
    handle = start_http_server(LOOPBACK_ANY_PORT, metrics, lambda: HealthReport(True))
    port = handle.port
    assert get(handle.url + "/healthz")[0] == 200
    handle.stop()
    handle.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_ipv6_loopback(metrics):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with start_http_server(
        HttpConfig(enabled=True, bind_address="::1", port=0), metrics, lambda: HealthReport(True)
    ) as handle:
        assert handle.url.startswith("http://[::1]:")
        assert get(handle.url + "/healthz")[0] == 200
