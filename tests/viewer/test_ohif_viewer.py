"""A radiologist's view of the result: OHIF v3 in headless Chromium, fed by Orthanc's DICOMweb.

The study goes into Orthanc with DCMTK storescu (as from a modality / the
node's outbox); OHIF's built app, served on loopback, opens it by Study
Instance UID; the test double-clicks the SR in the study browser and reads
what cornerstone3D drew into the viewport's SVG annotation layer.  Each test
saves a screenshot under test-artifacts/viewer/.
"""

from __future__ import annotations

import re
import time
from unittest.mock import ANY as ANY_NUMBER

import pytest

from tests.viewer.conftest import Viewer
from tests.viewer.roi_sr import build_roi_sr, outline_pixels, key_slice_index

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


def open_sr(page, series_description: str) -> None:
    """Double-click the SR's entry in OHIF's study browser (this loads it into the viewport)."""
    entry = page.get_by_text(series_description, exact=False).first
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
    build_roi_sr(scored).save_as(roi_sr_path, enforce_file_format=True)
    viewer.store([workdir / "ct", workdir / "seg.dcm", roi_sr_path])

    page = viewer.open_study(scored.ct.study_instance_uid)
    open_sr(page, "TEST planar ROI")
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
    # OHIF jumps to the referenced image: its overlay reads "I: <InstanceNumber> (<position>/<total>)".
    key_header = scored.ct.headers[key_slice_index(scored.segment.mask)]
    instance_overlay = re.findall(r"I:\s*(\d+) \((\d+)/(\d+)\)", page.inner_text("body"))
    assert instance_overlay == [(str(key_header.InstanceNumber), ANY_NUMBER, str(len(scored.ct.headers)))]
    assert viewer.page_errors == []
