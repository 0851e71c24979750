"""Every object the node writes for one scored study: SR, KOS, PDF, SC.

``OBJECT_KINDS`` names them as the configuration does (``objects = [...]``
per destination).  ``build_result_objects`` builds the ones asked for from
one key slice and one rendering, so they all agree; each has its own
deterministic UIDs (``derive_object_uids``).  The kind "sr" is two
documents: the risk SR ("sr") and the key-slice ROI SR ("sr-roi") that
OHIF draws (see ``build_key_slice_roi_sr``); ``object_kind`` maps a name
to its kind.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable

from pydicom.dataset import Dataset

from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSegment
from sclc_risk_node.dicom_io.key_objects import build_key_object_selection
from sclc_risk_node.dicom_io.key_slice import find_key_slice
from sclc_risk_node.dicom_io.sr_writer import build_key_slice_roi_sr, build_risk_sr, document_header
from sclc_risk_node.dicom_io.summary import (
    build_encapsulated_pdf,
    build_secondary_capture,
    patient_line,
    render_summary,
)
from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.types import RingDefinition, RiskResult

#: sr: TID 1500 Comprehensive 3D SR; kos: Key Object Selection; pdf: Encapsulated PDF; sc: Secondary Capture.
OBJECT_KINDS = ("sr", "kos", "pdf", "sc")


def object_kind(name: str) -> str:
    """The configurable kind of a built object: "sr-roi" is an "sr"."""
    return name.split("-", 1)[0]


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The kinds in canonical order; ``ValueError`` naming any unknown one."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(OBJECT_KINDS))
    if unknown:
        raise ValueError(f"unknown object kind(s) {', '.join(unknown)}; known: {', '.join(OBJECT_KINDS)}")
    return tuple(kind for kind in OBJECT_KINDS if kind in kinds)


def build_result_objects(
    ct: CtSeries,
    segment: TumourSegment,
    clinical: ClinicalRecord,
    result: RiskResult,
    *,
    kinds: Iterable[str] = OBJECT_KINDS,
    report_out_of_domain: bool = False,
    ring: RingDefinition = RingDefinition(),
    content_datetime: _dt.datetime | None = None,
    include_risk_sr: bool = True,
) -> dict[str, Dataset]:
    """name -> dataset: "sr" and "sr-roi" for the kind "sr", then "kos", "pdf", "sc" as asked for.

    ``include_risk_sr`` False leaves out the risk SR itself (the worker has
    it already from `node.scoring_job.score_files`).
    """
    kinds = check_kinds(kinds)
    objects: dict[str, Dataset] = {}
    key_slice = find_key_slice(ct, segment.mask)
    if "sr" in kinds:
        if include_risk_sr:
            objects["sr"] = build_risk_sr(
                ct,
                segment,
                clinical,
                result,
                report_out_of_domain=report_out_of_domain,
                content_datetime=content_datetime,
            )
        objects["sr-roi"] = build_key_slice_roi_sr(
            ct,
            segment,
            result,
            key_slice,
            report_out_of_domain=report_out_of_domain,
            content_datetime=content_datetime,
        )
    if "kos" in kinds:
        objects["kos"] = build_key_object_selection(
            ct, segment, result, key_slice, report_out_of_domain=report_out_of_domain
        )
    if "pdf" in kinds or "sc" in kinds:
        rendered = render_summary(
            ct,
            segment,
            result,
            key_slice,
            report_out_of_domain=report_out_of_domain,
            ring=ring,
            patient_line=patient_line(document_header(ct)),
        )
        if "pdf" in kinds:
            objects["pdf"] = build_encapsulated_pdf(
                ct, segment, result, key_slice, rendered, content_datetime=content_datetime
            )
        if "sc" in kinds:
            objects["sc"] = build_secondary_capture(
                ct, segment, result, key_slice, rendered, content_datetime=content_datetime
            )
    return objects
