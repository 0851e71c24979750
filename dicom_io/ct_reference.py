"""Whether a SEG or an RTSTRUCT was drawn on the CT series it arrived with.

Both readers ask the same two questions before placing anything on the CT grid:
the frame of reference must be the CT's (when stated), and the series the object
references (when it lists any) must include the CT series.
"""

from __future__ import annotations

from collections.abc import Sequence

from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.inputs import CtSeries


def check_drawn_on_ct(
    ct: CtSeries,
    name: str,
    *,
    frame_of_reference_uid: str | None,
    referenced_series_uids: Sequence[str],
    frame_of_reference_owner: str | None = None,
) -> None:
    """Raise ``DicomInputError`` naming ``name`` when the object belongs to another frame or series.

    ``frame_of_reference_owner`` names what carries the frame of reference when
    it is not the whole object (an RTSTRUCT states one per ROI).
    """
    if frame_of_reference_uid and frame_of_reference_uid != ct.frame_of_reference_uid:
        if frame_of_reference_owner is None:
            raise DicomInputError(
                f"{name} has FrameOfReferenceUID {frame_of_reference_uid}, but CT series "
                f"{ct.series_instance_uid} has {ct.frame_of_reference_uid}"
            )
        raise DicomInputError(
            f"{name}: {frame_of_reference_owner} is in frame of reference {frame_of_reference_uid}, "
            f"but CT series {ct.series_instance_uid} is in {ct.frame_of_reference_uid}"
        )
    if referenced_series_uids and ct.series_instance_uid not in referenced_series_uids:
        raise DicomInputError(
            f"{name} references series {', '.join(referenced_series_uids)}, not CT series {ct.series_instance_uid}"
        )
