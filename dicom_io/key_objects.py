"""A Key Object Selection document (KOS) that flags the key slice of a scored study.

PACS worklists and viewers show a KOS as "key images": the CT image with the
largest tumour cross-section (``dicom_io.key_slice``), with the result as
its description.  Document title (113000, DCM, "Of Interest") from CID 7010;
the observer is the node (a device).  UIDs are derived like the SR's
(``derive_object_uids("kos", ...)``), so re-scoring replaces, not adds.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from sclc_risk_node.dicom_io.header_values import sanitised_header
from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSegment
from sclc_risk_node.dicom_io.key_slice import KeySlice
from sclc_risk_node.dicom_io.sr_writer import (
    _COPIED_TYPE2_KEYWORDS,
    SOFTWARE_NAME,
    derive_object_uids,
    device_observer,
    risk_label,
    series_description,
    software_version_or_installed,
    summary_text,
)
from sclc_risk_node.scoring.types import RiskResult

#: CID 7010 "Key Object Selection Document Title".
OF_INTEREST = Code("113000", "DCM", "Of Interest")
#: KOS SeriesNumber: beside the SR's 9001.
KOS_SERIES_NUMBER = 9002
#: Key Object Description is a TEXT (UT); viewers show its first line or so.
_DESCRIPTION_MAX_CHARS = 1024


def key_image_header(key_slice: KeySlice) -> Dataset:
    """The key image's header, sanitised, with the type 2 attributes highdicom copies present."""
    header = sanitised_header(key_slice.header)
    for keyword in _COPIED_TYPE2_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def build_key_object_selection(
    ct: CtSeries,
    segment: TumourSegment,
    result: RiskResult,
    key_slice: KeySlice,
    *,
    report_out_of_domain: bool = False,
    manufacturer: str = SOFTWARE_NAME,
    software_version: str | None = None,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS flagging ``key_slice``'s CT image, described by the result's summary."""
    software_version = software_version_or_installed(software_version)
    header = key_image_header(key_slice)
    series_uid, sop_uid = derive_object_uids(
        "kos", ct.series_instance_uid, segment.sop_instance_uid, result.model.sha256
    )
    label = risk_label(result, report_out_of_domain=report_out_of_domain)
    description = (
        f"Key slice {key_slice.index + 1} of {len(ct.headers)} (largest tumour cross-section, "
        f"{key_slice.area_mm2:.0f} mm2): {label}. "
        + summary_text(result, report_out_of_domain=report_out_of_domain, lossy_compression=ct.lossy_compression)
    )[:_DESCRIPTION_MAX_CHARS]
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=[header],
        observer_device_context=device_observer(manufacturer, software_version),
        description=description,
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=[header],
        content=content,
        series_instance_uid=series_uid,
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        series_description=series_description(result.model),
        specific_character_set="ISO_IR 192",
    )
