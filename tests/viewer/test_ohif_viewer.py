"""A radiologist's view of the result: OHIF v3 in headless Chromium, fed by Orthanc's DICOMweb.

The study goes into Orthanc with DCMTK storescu (as from a modality / the
node's outbox); OHIF's built app, served on loopback, opens it by Study
Instance UID; the test double-clicks the SR in the study browser and reads
what cornerstone3D drew into the viewport's SVG annotation layer.  Each test
saves a screenshot under test-artifacts/viewer/.
"""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from tests.viewer.conftest import Viewer
from tests.viewer.roi_sr import build_roi_sr, key_slice_index, outline_pixels

pytestmark = [pytest.mark.viewer, pytest.mark.external]

#: Reads the SR overlay cornerstone3D drew: text lines of the linked text boxes and the outlines' point counts.
SVG_OVERLAY_JS = """() => {
  const layers = [...document.querySelectorAll('svg.svg-layer')];
  const texts = layers.flatMap(svg => [...svg.querySelectorAll('text tspan')].map(t => t.textContent));
  const outlines = layers.flatMap(svg => [...svg.querySelectorAll('polyline')]
      .map(p => ((p.getAttribute('points') || '').match(/-?[0-9.]+(e-?[0-9]+)?/g) || []).length / 2));
  return {texts, outlines};
}"""
OVERLAY_TIMEOUT_S = 60.0
FINDING_SITE = ("SCT", "363698007")
#: OHIF's DICOMSRDisplayTool draws at most this many label lines per measurement.
OHIF_MAX_LABEL_LINES = 5


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def planar_roi_groups(sr: Dataset) -> list[Dataset]:
    """Measurement Groups with a SCOORD/SCOORD3D at their top level (TID 1410): the only ones OHIF v3 draws."""
    groups = []
    for container in sr.ContentSequence:
        if _concept(container) != ("DCM", "126010"):  # Imaging Measurements
            continue
        for group in container.ContentSequence:
            if _concept(group) == ("DCM", "125007") and any(
                item.ValueType in ("SCOORD", "SCOORD3D") for item in group.ContentSequence
            ):
                groups.append(group)
    return groups


def ohif_label_lines(group: Dataset) -> list[str]:
    """The text lines OHIF 3.13 draws beside a TID 1410 group (its rule, see docs/viewing-results.md)."""
    lines = []
    for item in group.ContentSequence:
        if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
            value = float(measured.NumericValue)
            # OHIF formats `NumericValue ? Number(NumericValue).toFixed(2) : ''`: an exact 0 shows as nothing.
            shown = f"{value:.2f}" if value != 0 else ""
            lines.append(f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {shown} {unit}")
    sites = [item for item in group.ContentSequence if _concept(item) == FINDING_SITE]
    if sites:
        lines.append(f"363698007: {sites[0].ConceptCodeSequence[0].CodeMeaning}")
    return lines[:OHIF_MAX_LABEL_LINES]


def shown_images(page) -> list[tuple[int, int]]:
    """(Instance Number, images in the series) of each viewport, from OHIF's "I: 20 (21/40)" overlay."""
    return [
        (int(instance), int(total))
        for instance, _position, total in re.findall(r"I:\s*(\d+) \((\d+)/(\d+)\)", page.inner_text("body"))
    ]


def referenced_image_uid(group: Dataset) -> str:
    """The SOP Instance UID the group's SCOORD is drawn on (its SELECTED FROM image)."""
    scoord = next(item for item in group.ContentSequence if item.ValueType == "SCOORD")
    return str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def open_series(page, series_number: int) -> None:
    """Double-click one series in OHIF's study browser (an SR loads into the viewport).

    Found by its Series Number (the entry's ``data-series``): descriptions
    repeat (the node gives all its objects the same one).
    """
    entry = page.locator(f"[data-cy='studyBrowser-panel'] [data-series='{series_number}']")
    entry.wait_for(state="visible")
    entry.dblclick()


def wait_for_overlay(page, must_contain: str, timeout_s: float = OVERLAY_TIMEOUT_S) -> dict:
    """Poll the SVG layer until a text line containing ``must_contain`` and an outline are drawn."""
    deadline = time.monotonic() + timeout_s
    overlay = {"texts": [], "outlines": []}
    while time.monotonic() < deadline:
        overlay = page.evaluate(SVG_OVERLAY_JS)
        if overlay["outlines"] and any(must_contain in line for line in overlay["texts"]):
            return overlay
        time.sleep(0.5)
    raise AssertionError(f"OHIF drew no outline labelled {must_contain!r} within {timeout_s:g} s; drew {overlay}")


def test_ohif_draws_a_tid1410_planar_roi_with_its_labels(viewer: Viewer, demo_scored):
    """The harness's own TID 1410 group (the form the node's SR adopts): outline and NUM labels appear."""
    workdir, scored = demo_scored
    roi_sr_path = workdir / "roi-sr.dcm"
    roi_sr = build_roi_sr(scored)
    roi_sr.save_as(roi_sr_path, enforce_file_format=True)
    viewer.store([workdir / "ct", workdir / "seg.dcm", roi_sr_path])

    page = viewer.open_study(scored.ct.study_instance_uid)
    open_series(page, roi_sr.SeriesNumber)
    overlay = wait_for_overlay(page, "Progression risk: HIGH")
    viewer.screenshot(page, "tid1410-planar-roi")

    expected_points = len(outline_pixels(scored.segment.mask, key_slice_index(scored.segment.mask)))
    assert overlay["outlines"] == [expected_points]
    pfs_percent = {months: round(100 * p, 1) for months, p in scored.result.pfs_probability.items()}
    assert overlay["texts"] == [
        "Progression risk: HIGH: 1.00 1",
        f"PFS 6 mo: {pfs_percent[6]:.2f} %",
        f"PFS 12 mo: {pfs_percent[12]:.2f} %",
        f"Integrated risk score: {round(scored.result.risk_score, 2):.2f} 1",
        "363698007: Lung",
    ]
    # The rule the node-SR test relies on predicts exactly what OHIF drew.
    assert ohif_label_lines(planar_roi_groups(roi_sr)[0]) == overlay["texts"]
    # OHIF jumps to the referenced image: its overlay reads "I: <InstanceNumber> (<position>/<total>)".
    key_header = scored.ct.headers[key_slice_index(scored.segment.mask)]
    assert shown_images(page) == [(int(key_header.InstanceNumber), len(scored.ct.headers))]
    # Never shown by OHIF for an SR it did not write itself (docs/viewing-results.md).
    assert "Tumour, key slice" not in page.inner_text("body")
    assert viewer.page_errors == []


def test_one_group_without_a_scoord_makes_ohif_draw_nothing(viewer: Viewer, demo_scored):
    """OHIF 3.13 limitation the node's SR must respect (docs/viewing-results.md).

    The same planar group, preceded by a TID 1411 group that references the SEG
    (no SCOORD), is not drawn: OHIF reads ``measurement.coords[0]`` of every
    group while loading the SR and stops at the SCOORD-less one.  If a new
    OHIF version draws it, this fails: update the docs and the node's SR.
    """
    workdir, scored = demo_scored
    mixed_sr, planar_sr = build_roi_sr(scored, with_volumetric_group=True), build_roi_sr(scored)
    mixed_sr_path, planar_sr_path = workdir / "mixed-sr.dcm", workdir / "planar-sr.dcm"
    mixed_sr.save_as(mixed_sr_path, enforce_file_format=True)
    planar_sr.save_as(planar_sr_path, enforce_file_format=True)
    viewer.store([workdir / "ct", workdir / "seg.dcm", mixed_sr_path, planar_sr_path])

    page = viewer.open_study(scored.ct.study_instance_uid)
    open_series(page, mixed_sr.SeriesNumber)
    with pytest.raises(AssertionError, match="OHIF drew no outline"):
        wait_for_overlay(page, "Progression risk: HIGH", timeout_s=15.0)
    viewer.screenshot(page, "mixed-groups-nothing-drawn")
    # The same page draws the same planar group from an SR without the volumetric group.
    open_series(page, planar_sr.SeriesNumber)
    assert wait_for_overlay(page, "Progression risk: HIGH")["outlines"]


def _open_node_roi_sr(viewer: Viewer, demo_scored, node_objects):
    workdir, scored = demo_scored
    viewer.store([workdir / "ct", workdir / "seg.dcm", *(o.path for o in node_objects.values())])
    roi_sr = node_objects["sr-roi"].dataset
    # The ROI SR shares the risk SR's series; OHIF shows an SR series' last instance, which it is.
    assert roi_sr.SeriesInstanceUID == node_objects["sr"].dataset.SeriesInstanceUID
    assert int(roi_sr.InstanceNumber) > int(node_objects["sr"].dataset.InstanceNumber)
    page = viewer.open_study(scored.ct.study_instance_uid)
    open_series(page, roi_sr.SeriesNumber)
    (group,) = planar_roi_groups(roi_sr)
    overlay = wait_for_overlay(page, ohif_label_lines(group)[0])
    return page, group, overlay


def test_the_nodes_key_slice_roi_in_ohif(viewer: Viewer, demo_scored, node_objects):
    """The node's output for the demo study, sent to the PACS, opened by a radiologist in OHIF."""
    _workdir, scored = demo_scored
    page, group, overlay = _open_node_roi_sr(viewer, demo_scored, node_objects)
    viewer.screenshot(page, "node-key-slice-roi")

    assert overlay["outlines"] == [
        len(next(i for i in group.ContentSequence if i.ValueType == "SCOORD").GraphicData) // 2
    ]
    assert overlay["texts"] == ohif_label_lines(group)
    assert f"{round(100 * scored.result.pfs_probability[6], 1):.2f} %" in overlay["texts"][0]
    key_header = next(h for h in scored.ct.headers if h.SOPInstanceUID == referenced_image_uid(group))
    assert shown_images(page) == [(int(key_header.InstanceNumber), len(scored.ct.headers))]
    assert viewer.page_errors == []


def test_the_nodes_risk_group_is_a_label_in_ohif(viewer: Viewer, demo_scored, node_objects):
    """The risk group ("High"/"Low") and DEMO must be in the lines OHIF draws beside the outline."""
    _workdir, scored = demo_scored
    page, _group, overlay = _open_node_roi_sr(viewer, demo_scored, node_objects)
    risk_word = str(getattr(scored.result.risk_group, "value", scored.result.risk_group)).lower()
    assert any(re.search(rf"\b{risk_word} progression risk\b", line, re.IGNORECASE) for line in overlay["texts"]), (
        f"OHIF shows no '{risk_word}' risk label beside the outline; it drew {overlay['texts']}"
    )
    assert any("(DEMO model)" in line for line in overlay["texts"]), overlay["texts"]


def test_the_nodes_summary_pdf_and_sc_open_in_ohif(viewer: Viewer, demo_scored, node_objects):
    """The one-page summary (PDF and SC, which state the risk group) is readable in OHIF too."""
    workdir, scored = demo_scored
    viewer.store([workdir / "ct", workdir / "seg.dcm", node_objects["pdf"].path, node_objects["sc"].path])
    page = viewer.open_study(scored.ct.study_instance_uid)

    pdf = node_objects["pdf"].dataset
    open_series(page, pdf.SeriesNumber)
    # OHIF hands the encapsulated document to the browser's PDF viewer as a blob <object>.
    pdf_object = page.locator("[data-cy='viewport-pane'] object[type='application/pdf']")
    pdf_object.wait_for(state="attached")
    shown_bytes = page.evaluate(
        """async (url) => Array.from(new Uint8Array(await (await fetch(url)).arrayBuffer()))""",
        pdf_object.get_attribute("data"),
    )
    assert bytes(shown_bytes).rstrip(b"\0") == bytes(pdf.EncapsulatedDocument).rstrip(b"\0")
    assert bytes(shown_bytes).startswith(b"%PDF-")
    # Chromium's PDF viewer draws out of process, with no DOM event to wait for; the pause is for the screenshot only.
    page.wait_for_timeout(3000)
    viewer.screenshot(page, "node-summary-pdf")

    sc = node_objects["sc"].dataset
    open_series(page, sc.SeriesNumber)
    page.wait_for_function(
        """(description) => document.querySelector("[data-cy='viewport-overlay-top-left']")?.innerText.includes(description)""",
        arg=str(sc.SeriesDescription),
    )
    assert page.locator("[data-cy='viewport-overlay-bottom-right']").inner_text().strip() == "1/1"
    viewer.screenshot(page, "node-summary-sc")
    # The image is drawn, not just listed: the summary's red DEMO banner / risk heading show in the viewport.
    viewport = Image.open(io.BytesIO(page.locator("[data-cy='viewport-pane']").first.screenshot())).convert("RGB")
    pixels = np.asarray(viewport).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 180) & (pixels[:, 1] < 90) & (pixels[:, 2] < 90)
    assert red.mean() > 0.01, f"only {red.mean():.2%} red pixels in the viewport"
    assert viewer.page_errors == []
