"""A test-only TID 1410 planar ROI SR on the key slice, to develop the OHIF harness against.

The node's own SR (``dicom_io.sr_writer``) is the real product; this module
exists so the browser harness can prove what OHIF v3 draws *before* the node
writes such a group, and to document what OHIF needs (docs/viewing-results.md):

* one Measurement Group (TID 1410) whose top level holds an IMAGE REGION
  SCOORD POLYLINE (closed) on one CT instance, a Tracking Identifier and a
  Tracking Unique Identifier;
* OHIF labels it from its NUM items, each shown as
  ``<concept CodeMeaning>: <value to 2 decimals> <unit CodeValue>``, then from
  the Finding Site (SCT 363698007); CODE and TEXT items are not shown, and
  only the first five labels are drawn.

So the risk group reaches the label only through a NUM's concept name; here
the first NUM is "Progression risk: HIGH" (unit ``1``, value 1 for high, 0
for low) — a stand-in until the node's SR writer decides how to carry it.
"""

from __future__ import annotations

import uuid

import contourpy
import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.sr.coding import Code

from sclc_risk_node.dicom_io import codes
from sclc_risk_node.node.scoring_job import ScoredStudy

# Test-only concepts, in the node's private scheme so the SR stays declared.
RISK_LABEL = {
    "high": Code("RISKHIGH", codes.PRIVATE_SCHEME, "Progression risk: HIGH"),
    "low": Code("RISKLOW", codes.PRIVATE_SCHEME, "Progression risk: LOW"),
}
PFS_PERCENT = {
    6: Code("PFS6PCT", codes.PRIVATE_SCHEME, "PFS 6 mo"),
    12: Code("PFS12PCT", codes.PRIVATE_SCHEME, "PFS 12 mo"),
}
UNIT_PERCENT = Code("%", "UCUM", "percent")
_NAMESPACE = uuid.UUID("2b8f7f2e-5d0c-4a5e-9a57-2f0e3a1c9b11")


def key_slice_index(mask: sitk.Image) -> int:
    """The slice (SimpleITK z index) with the most tumour voxels: the largest cross-section."""
    voxels_per_slice = sitk.GetArrayViewFromImage(mask).reshape(mask.GetSize()[2], -1).sum(axis=1)
    if not voxels_per_slice.any():
        raise ValueError("the tumour mask is empty")
    return int(np.argmax(voxels_per_slice))


def outline_pixels(mask: sitk.Image, slice_index: int) -> np.ndarray:
    """The longest closed outline of the tumour on one slice, as (column, row) image coordinates.

    DICOM SCOORD image coordinates put (0, 0) at the top-left corner of the
    top-left pixel, so a pixel centre is index + 0.5.
    """
    plane = sitk.GetArrayViewFromImage(mask)[slice_index].astype(float)
    # Pad so outlines touching the image border still close.
    lines = contourpy.contour_generator(z=np.pad(plane, 1)).lines(0.5)
    if not lines:
        raise ValueError(f"no tumour outline on slice {slice_index}")
    outline = max(lines, key=len) - 1.0 + 0.5
    if not np.allclose(outline[0], outline[-1]):
        outline = np.vstack([outline, outline[:1]])
    return outline.astype(np.float32)


def build_roi_sr(scored: ScoredStudy, *, with_volumetric_group: bool = False) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with one TID 1410 group: the key-slice outline labelled with the result.

    ``with_volumetric_group`` first adds a TID 1411 group that references the
    tumour SEG segment (as the node's SR does), which has no SCOORD.
    """
    ct, result = scored.ct, scored.result
    index = key_slice_index(scored.segment.mask)
    key_header = ct.headers[index]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline_pixels(scored.segment.mask, index),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key_header.SOPClassUID,
            referenced_sop_instance_uid=key_header.SOPInstanceUID,
        ),
    )
    risk = str(getattr(result.risk_group, "value", result.risk_group)).lower()
    measurements = [
        hd.sr.Measurement(name=RISK_LABEL[risk], value=1.0 if risk == "high" else 0.0, unit=codes.UNIT_ONE),
        *(
            hd.sr.Measurement(name=PFS_PERCENT[months], value=round(100.0 * p, 1), unit=UNIT_PERCENT)
            for months, p in sorted(result.pfs_probability.items())
            if months in PFS_PERCENT
        ),
        hd.sr.Measurement(name=codes.RISK_SCORE, value=round(result.risk_score, 2), unit=codes.UNIT_ONE),
    ]
    seed = f"{ct.series_instance_uid}/{scored.segment.segmentation.SOPInstanceUID}/roi-dev/{with_volumetric_group}"
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID.from_uuid(str(uuid.uuid5(_NAMESPACE, seed + "/tracking"))),
            identifier="Tumour, key slice",
        ),
        referenced_region=region,
        finding_type=codes.FINDING_NEOPLASM,
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE_LUNG)],
        measurements=measurements,
    )
    groups: list = [group]
    evidence = [key_header]
    seg = scored.segment.segmentation
    if with_volumetric_group:
        groups.insert(
            0,
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID.from_uuid(str(uuid.uuid5(_NAMESPACE, seed + "/tracking-volume"))),
                    identifier="Tumour, whole volume",
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=scored.segment.segment_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(ct.series_instance_uid),
                ),
                finding_type=codes.FINDING_NEOPLASM,
                measurements=[
                    hd.sr.Measurement(name=codes.RISK_SCORE, value=round(result.risk_score, 2), unit=codes.UNIT_ONE)
                ],
            ),
        )
        evidence.append(seg)
    observer = hd.sr.ObserverContext(
        observer_type=codes.OBSERVER_TYPE_DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID.from_uuid(str(uuid.uuid5(_NAMESPACE, "device"))), name="sclc-risk-node tests"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED_CT,
        imaging_measurements=groups,
        referenced_images=[key_header],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID.from_uuid(str(uuid.uuid5(_NAMESPACE, seed + "/series"))),
        series_number=9102 if with_volumetric_group else 9101,
        sop_instance_uid=hd.UID.from_uuid(str(uuid.uuid5(_NAMESPACE, seed + "/instance"))),
        instance_number=1,
        manufacturer="sclc-risk-node tests",
        series_description="TEST volumetric + planar ROI (harness)"
        if with_volumetric_group
        else "TEST planar ROI (harness)",
        is_complete=True,
        is_final=False,
        coding_schemes=[codes.private_coding_scheme()],
    )
