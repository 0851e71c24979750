"""structlog configuration: one JSON object per line on stdout (for journald).

Patient identity never reaches a log line.  Callers are expected to log UIDs
and states only, and the `drop_phi` processor is the safety net: it replaces
any value logged under a PHI-shaped key and any value equal to a PHI value
registered for the current process (see `register_phi_values`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

#: Keys whose values are identifying.  Compared case-insensitively, ignoring "_".
PHI_KEYS = frozenset(
    key.replace("_", "").lower()
    for key in (
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "birth_date",
        "other_patient_ids",
        "patient_address",
    )
)
REDACTED = "[redacted]"

_registered_phi: set[str] = set()


def register_phi_values(values: Iterable[str | None]) -> None:
    """Remember identifying strings (e.g. a record's patient_id) so they are redacted wherever they appear."""
    _registered_phi.update(str(v) for v in values if v and len(str(v)) >= 3)


def drop_phi(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key in list(event_dict):
        if key.replace("_", "").lower() in PHI_KEYS:
            event_dict[key] = REDACTED
            continue
        value = event_dict[key]
        if isinstance(value, str) and _registered_phi:
            for phi in _registered_phi:
                if phi in value:
                    value = value.replace(phi, REDACTED)
            event_dict[key] = value
    return event_dict


class _CurrentStream:
    """Writes to whatever ``sys.stdout``/``sys.stderr`` is at the time of writing.

    Loggers outlive redirections (pytest's capture, a daemon's re-opened
    stdout); binding the stream object at configuration time would leave
    them writing to a closed file.
    """

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        stream: TextIO = getattr(sys, self.name)
        return stream.write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def configure_logging(level: str = "INFO", stream=None) -> None:
    """JSON lines with ISO timestamps; stdlib logging (pynetdicom, apscheduler) routed through the same renderer.

    ``stream`` defaults to the process's current stdout (journald under systemd).
    """
    if stream is None or stream is sys.stdout:
        stream = _CurrentStream("stdout")
    elif stream is sys.stderr:
        stream = _CurrentStream("stderr")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pyradiomics and pynetdicom are chatty at INFO; their warnings still show.
    for noisy in ("radiomics", "pynetdicom", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(**context: Any) -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger("sclc-node").bind(**context)
    return logger
