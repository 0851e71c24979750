"""The node's Prometheus metrics, in a registry of their own (prometheus-client).

The SCP counts received instances, the worker scoring times and verdicts, the
outbox deliveries; `node.http_status` only serves the registry at ``/metrics``.

Counts of states (studies per state, outbox depth) are read from the spool
database through callables on every scrape, so they cannot drift from what
`sclc-node status` shows.  Event counters (instances received, scoring times,
deliveries) count what happened in this process since it started, which is
what Prometheus `rate()` expects.

Nothing here carries patient data: labels are fixed vocabularies, study
states and configured destination names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric

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
    # configuration from before `configure_logging` ran.  The live counts are
    # read during an HTTP scrape, so their failures log under the HTTP stage.
    return get_logger(stage="http")


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
