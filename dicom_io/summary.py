"""A one-page summary every viewer shows: rendered once, stored as Encapsulated PDF and as Secondary Capture.

Viewers that show neither SR nor ROI (Orthanc's explorer and ``/pdf``, most
PACS image viewers, printing) still show an image or a PDF.  The page holds:
the DEMO / not-for-clinical-use banner, the plain-language summary, the risk
group, PFS at 6 and 12 months (%), the applicability verdict, the key slice
with the tumour (red) and the peritumoral ring (yellow) outlined, each
model term's contribution, and the model's identity.  ``render_summary``
draws it once with matplotlib (no pyplot state) and returns both the PDF
bytes and the RGB pixels, so both objects say exactly the same.

DICOM: ``build_encapsulated_pdf`` writes the Encapsulated PDF IOD (PS3.3
A.45.1: Patient, General Study, Encapsulated Document Series, General
Equipment, SC Equipment, Encapsulated Document, SOP Common) on highdicom's
``SOPClass`` base; ``build_secondary_capture`` uses ``hd.sc.SCImage``.
Both are BurnedInAnnotation YES (the page shows the patient's name and ID,
so a printout cannot be mistaken for another patient's).  UIDs are derived
like the SR's (``derive_object_uids("pdf" / "sc", ...)``).
"""

from __future__ import annotations

import datetime as _dt
import io
import math
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import matplotlib
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSegment
from sclc_risk_node.dicom_io.key_objects import key_image_header
from sclc_risk_node.dicom_io.key_slice import KeySlice, mask_outlines_px
from sclc_risk_node.dicom_io.sr_writer import (
    DEMONSTRATION_NOTICE,
    SOFTWARE_NAME,
    SPECIFIC_CHARACTER_SET,
    applicability_text,
    derive_object_uids,
    intended_use_text,
    percent,
    risk_label,
    rounded_score,
    series_description,
    software_version_or_installed,
    summary_text,
    withholds_estimates,
)
from sclc_risk_node.scoring.ring import describe_ring, peritumoral_ring
from sclc_risk_node.scoring.types import RingDefinition, RiskResult

#: A4 portrait, inches.
PAGE_SIZE_IN = (8.27, 11.69)
#: The secondary capture's resolution: 100 dpi gives 827 x 1169 pixels, readable on any screen.
SC_DPI = 100
PDF_SERIES_NUMBER = 9003
SC_SERIES_NUMBER = 9004
#: Lung window (HU): the tumour and its lung border are both visible.
WINDOW_CENTRE_HU = -500.0
WINDOW_WIDTH_HU = 1500.0
#: The key-slice panel shows the tumour with this much context around it.
CONTEXT_MM = 35.0

_RED = "#d62728"
_YELLOW = "#ffd700"


@dataclass(frozen=True)
class RenderedSummary:
    """The same page twice: ``pdf`` (one page, deterministic bytes) and ``rgb`` (rows × columns × 3, uint8)."""

    pdf: bytes
    rgb: np.ndarray
    title: str


def summary_title(result: RiskResult) -> str:
    """DocumentTitle / SeriesDescription-sized (≤64 characters)."""
    return "SCLC progression risk summary" + (" (DEMO)" if result.model.demonstration else "")


def _slice_array(image: sitk.Image, index: int) -> NDArray[Any]:
    # A copy, not a view: a view does not keep ``image`` alive, and callers pass temporaries
    # (the ring); reading a view of a freed image crashed the scoring worker (SIGSEGV in numpy).
    view: NDArray[Any] = sitk.GetArrayViewFromImage(image)
    return np.array(view[index], copy=True)


def _crop_box(mask_slice: np.ndarray, spacing_xy_mm: tuple[float, float]) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask_slice)
    pad_r = int(math.ceil(CONTEXT_MM / spacing_xy_mm[1]))
    pad_c = int(math.ceil(CONTEXT_MM / spacing_xy_mm[0]))
    r0, r1 = max(rows.min() - pad_r, 0), min(rows.max() + pad_r + 1, mask_slice.shape[0])
    c0, c1 = max(cols.min() - pad_c, 0), min(cols.max() + pad_c + 1, mask_slice.shape[1])
    return slice(r0, r1), slice(c0, c1)


def render_summary(
    ct: CtSeries,
    segment: TumourSegment,
    result: RiskResult,
    key_slice: KeySlice,
    *,
    report_out_of_domain: bool = False,
    ring: RingDefinition = RingDefinition(),
    patient_line: str = "",
) -> RenderedSummary:
    """Draw the summary page once; see the module docstring for its content.

    ``ring`` is the model's ring definition (the yellow outline);
    ``patient_line`` identifies the patient and study on the page.
    """
    withheld = withholds_estimates(result, report_out_of_domain)
    model = result.model
    title = summary_title(result)
    with matplotlib.rc_context({"text.parse_math": False, "font.family": "DejaVu Sans", "svg.hashsalt": "0"}):
        fig = Figure(figsize=PAGE_SIZE_IN, dpi=SC_DPI)
        canvas = FigureCanvasAgg(fig)  # becomes fig.canvas; kept typed as the Agg canvas for buffer_rgba
        fig.patch.set_facecolor("white")
        if model.demonstration:
            fig.patches.append(
                matplotlib.patches.Rectangle((0, 0.945), 1, 0.055, transform=fig.transFigure, color=_RED, zorder=0)
            )
            fig.text(
                0.5,
                0.9725,
                DEMONSTRATION_NOTICE.upper(),
                ha="center",
                va="center",
                color="white",
                fontsize=17,
                weight="bold",
            )
        fig.text(0.05, 0.925, title, fontsize=15, weight="bold", va="top")
        if patient_line:
            fig.text(0.05, 0.898, patient_line, fontsize=9.5, va="top", color="#333333")

        headline = risk_label(result, report_out_of_domain=report_out_of_domain)
        headline_colour = "#555555" if withheld else (_RED if result.risk_group.value == "high" else "#2ca02c")
        fig.text(
            0.05,
            0.865,
            headline.upper() if not withheld else "NO RISK ESTIMATE",
            fontsize=22,
            weight="bold",
            color=headline_colour,
            va="top",
        )
        lines = []
        if withheld:
            lines.append("Risk group and PFS withheld: outside the model's applicability domain.")
        else:
            pfs = "   ".join(f"PFS {m} months: {percent(p):.1f} %" for m, p in sorted(result.pfs_probability.items()))
            lines.append(pfs)
            lines.append(
                f"Integrated risk score {rounded_score(result.risk_score):.3f} "
                f"(cut-off {rounded_score(result.risk_cutoff):.3f}); "
                f"radiomics score {rounded_score(result.radiomics_score):.3f} "
                f"(cut-off {rounded_score(result.radiomics_cutoff):.3f})"
            )
        lines.append(applicability_text(result.applicability))
        if ct.lossy_compression:
            lines.append("Input flag: the CT was lossy-compressed.")
        _wrapped(fig, 0.05, 0.815, lines, width=95, fontsize=10.5)

        # Key slice, cropped around the tumour; the plain-language summary beside it.
        ax = fig.add_axes((0.05, 0.40, 0.42, 0.32))
        ct_slice = _slice_array(ct.image, key_slice.index).astype(np.float32)
        mask_slice = _slice_array(segment.mask, key_slice.index)
        spacing = ct.image.GetSpacing()
        rows, cols = _crop_box(mask_slice, spacing[:2])
        low = WINDOW_CENTRE_HU - WINDOW_WIDTH_HU / 2
        ax.imshow(
            ct_slice[rows, cols],
            cmap="gray",
            vmin=low,
            vmax=low + WINDOW_WIDTH_HU,
            extent=(cols.start, cols.stop, rows.stop, rows.start),
            interpolation="nearest",
            aspect=spacing[1] / spacing[0],
        )
        ring_slice = _slice_array(peritumoral_ring(segment.mask, ring), key_slice.index)
        for outline in mask_outlines_px(ring_slice):
            ax.plot(outline[:, 0], outline[:, 1], color=_YELLOW, linewidth=1.0)
        for outline in key_slice.outlines_px:
            ax.plot(outline[:, 0], outline[:, 1], color=_RED, linewidth=1.4)
        ax.set_xlim(cols.start, cols.stop)
        ax.set_ylim(rows.stop, rows.start)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            f"Key slice {key_slice.index + 1}/{len(ct.headers)}: largest tumour cross-section "
            f"({key_slice.area_mm2:.0f} mm²)",
            fontsize=8.5,
        )
        _wrapped(
            fig,
            0.05,
            0.39,
            [f"red: tumour ({segment.segment_label}); yellow: peritumoral ring, {describe_ring(ring)}"],
            width=70,
            fontsize=7.5,
        )
        summary = summary_text(
            result, report_out_of_domain=report_out_of_domain, lossy_compression=ct.lossy_compression
        )
        _wrapped(fig, 0.52, 0.72, [summary], width=50, fontsize=10)

        # Each term's contribution, labels on the left with room for full feature names.
        fig.text(
            0.05, 0.335, "Contribution of each model term (coefficient × value)", fontsize=9.5, weight="bold", va="top"
        )
        if withheld:
            fig.text(
                0.05, 0.30, "Withheld: the study is outside the model's applicability domain.", fontsize=9, va="top"
            )
        else:
            terms = [(f"risk score: {t.name}", t.contribution) for t in result.integrated_terms]
            terms += [(f"radiomics score: {_short(t.name)}", t.contribution) for t in result.radiomics_terms]
            height = min(0.2, 0.03 * len(terms) + 0.02)
            ax2 = fig.add_axes((0.55, 0.31 - height, 0.38, height))
            values = [v for _, v in terms][::-1]
            ax2.barh(range(len(values)), values, color=[_RED if v > 0 else "#1f77b4" for v in values])
            ax2.set_yticks(range(len(values)), [f"{n}  {v:+.3f}" for n, v in terms][::-1], fontsize=7)
            ax2.axvline(0, color="black", linewidth=0.6)
            ax2.tick_params(axis="x", labelsize=7)
        identity = [
            f"Model: {model.name} {model.version} (sha256 {model.sha256[:16]}…)"
            + (", demonstration model" if model.demonstration else ""),
            f"Intended use: {intended_use_text(model)}" if intended_use_text(model) else "",
            f"Produced by {SOFTWARE_NAME}; a machine result for a radiologist to read, not a report.",
        ]
        _wrapped(fig, 0.05, 0.075, [line for line in identity if line], width=115, fontsize=7.5, color="#333333")

        pdf = io.BytesIO()
        # No creation date: the same inputs give the same bytes (idempotent storage and delivery).
        fig.savefig(
            pdf,
            format="pdf",
            metadata={
                "CreationDate": None,
                "ModDate": None,
                "Producer": SOFTWARE_NAME,
                "Creator": SOFTWARE_NAME,
                "Title": title,
            },
        )
        fig.canvas.draw()
        # matplotlib's Agg backend carries no annotations.
        rgb = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()  # type: ignore[no-untyped-call]
    return RenderedSummary(pdf=pdf.getvalue(), rgb=rgb, title=title)


def _short(name: str, max_chars: int = 48) -> str:
    return name if len(name) <= max_chars else name[: max_chars - 1] + "…"


def _wrapped(
    fig: Figure, x: float, y: float, paragraphs: list[str], *, width: int, fontsize: float, color: str = "black"
) -> None:
    import textwrap

    text = "\n".join(textwrap.fill(p, width=width) for p in paragraphs)
    fig.text(x, y, text, fontsize=fontsize, va="top", color=color, linespacing=1.35)


def patient_line(header: Dataset) -> str:
    """Who and what the page is about: name, ID, study date, accession (from the sanitised CT header)."""
    parts = [
        str(header.get("PatientName", "") or "").replace("^", " ").strip() or "(no name)",
        f"ID {header.get('PatientID', '') or '-'}",
    ]
    if header.get("StudyDate"):
        parts.append(f"study {header.StudyDate}")
    if header.get("AccessionNumber"):
        parts.append(f"accession {header.AccessionNumber}")
    return " · ".join(parts)


def _copied_patient_study(header: Dataset) -> dict[str, Any]:
    return dict(
        patient_id=header.get("PatientID") or None,
        patient_name=header.get("PatientName") or None,
        patient_birth_date=header.get("PatientBirthDate") or None,
        patient_sex=header.get("PatientSex") or None,
        accession_number=header.get("AccessionNumber") or None,
        study_id=header.get("StudyID") or None,
        study_date=header.get("StudyDate") or None,
        study_time=header.get("StudyTime") or None,
        referring_physician_name=header.get("ReferringPhysicianName") or None,
    )


def _document_attributes(
    result: RiskResult, software_version: str, institution_name: str | None, when: _dt.datetime
) -> dict[str, Any]:
    """The series, equipment and content attributes the PDF and the SC share (as the SRs)."""
    return dict(
        series_description=series_description(result.model),
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=software_version,
        institution_name=institution_name,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        specific_character_set=SPECIFIC_CHARACTER_SET,
    )


def build_encapsulated_pdf(
    ct: CtSeries,
    segment: TumourSegment,
    result: RiskResult,
    key_slice: KeySlice,
    rendered: RenderedSummary,
    *,
    manufacturer: str = SOFTWARE_NAME,
    software_version: str | None = None,
    institution_name: str | None = None,
    content_datetime: _dt.datetime | None = None,
) -> Dataset:
    """The Encapsulated PDF (1.2.840.10008.5.1.4.1.1.104.1) holding ``rendered.pdf``."""
    header = key_image_header(key_slice)
    series_uid, sop_uid = derive_object_uids(
        "pdf", ct.series_instance_uid, segment.sop_instance_uid, result.model.sha256
    )
    when = content_datetime or _dt.datetime.now()
    software_version = software_version_or_installed(software_version)
    document = hd.base.SOPClass(
        study_instance_uid=ct.study_instance_uid,
        series_instance_uid=series_uid,
        series_number=PDF_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=1,
        modality="DOC",
        manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **_document_attributes(result, software_version, institution_name, when),
        **_copied_patient_study(header),
    )
    # SC Equipment module: a workstation made this document.
    document.ConversionType = "WSD"
    # Encapsulated Document module (PS3.3 C.24.2).
    document.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    document.BurnedInAnnotation = "YES"
    document.RecognizableVisualFeatures = "NO"
    document.DocumentTitle = rendered.title
    document.ConceptNameCodeSequence = []
    document.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf = rendered.pdf
    document.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")  # OB: even length, NUL-padded
    document.EncapsulatedDocumentLength = len(pdf)
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    document.SourceInstanceSequence = [source]
    return document


def panel_orientation(header: Dataset) -> tuple[str, str]:
    """PatientOrientation of the key-slice panel: it is drawn in the CT image's own row/column directions.

    The dominant axis of each direction cosine (ImageOrientationPatient), as
    PS3.3 C.7.6.1.1.1 letters: L/R, P/A, H/F.  An axial CT gives ("L", "P").
    """
    cosines = [float(v) for v in header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        positive = vector[axis] > 0
        return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]

    return letter(cosines[:3]), letter(cosines[3:])


def build_secondary_capture(
    ct: CtSeries,
    segment: TumourSegment,
    result: RiskResult,
    key_slice: KeySlice,
    rendered: RenderedSummary,
    *,
    manufacturer: str = SOFTWARE_NAME,
    software_version: str | None = None,
    institution_name: str | None = None,
    content_datetime: _dt.datetime | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture image (RGB) of the same page."""
    header = key_image_header(key_slice)
    series_uid, sop_uid = derive_object_uids(
        "sc", ct.series_instance_uid, segment.sop_instance_uid, result.model.sha256
    )
    when = content_datetime or _dt.datetime.now()
    software_version = software_version_or_installed(software_version)
    copied = _copied_patient_study(header)
    image = hd.sc.SCImage(
        pixel_array=rendered.rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=ct.study_instance_uid,
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=panel_orientation(header),
        **_document_attributes(result, software_version, institution_name, when),
        **copied,
    )
    image.BurnedInAnnotation = "YES"
    # The key slice is of the chest, an unpaired part: General Series Laterality (2C) is then absent.
    image.BodyPartExamined = "CHEST"
    image.ImageComments = summary_title(result)
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    image.SourceImageSequence = [source]
    return image
