"""Fixtures for the real-browser tests: Orthanc + DICOMweb, OHIF's built app, headless Chromium.

    def test_x(viewer):                        # Orthanc (DICOMweb) + OHIF server + a Chromium page
        viewer.store(paths)                    # DCMTK storescu into Orthanc's DICOM port
        page = viewer.open_study(study_uid)    # /viewer?StudyInstanceUIDs=...

Set-up comes from `scripts/test.sh`: Debian ``orthanc-dicomweb`` and
``chromium``, pip ``playwright`` (driving Debian's Chromium through
``executable_path``: Playwright cannot download browsers here) and the
``@ohif/app`` npm package unpacked into the cache (see `ohif.py`).  A missing
piece skips the test with the reason, except under CI (``CI`` set), where it
fails: CI runs scripts/test.sh, so a missing piece there is a broken set-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from sclc_risk_node.dicom_io.result_objects import build_result_objects
from sclc_risk_node.node.clinical_files import load_clinical_file
from sclc_risk_node.node.demo_study import DEMO_PATIENT, write_demo_study
from sclc_risk_node.node.scoring_job import ScoredStudy, default_model_path, load_model_file, score_files
from tests.node.dicom_tools import STORESCU, ToolResult, storescu
from tests.node.peers import LOOPBACK, ORTHANC, Orthanc, peers  # noqa: F401 (fixture)
from tests.viewer.ohif import OhifServer, chromium_executable, ohif_dist_dir, ohif_version

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Screenshots land here (git-ignored); CI may collect the folder.
ARTIFACTS = Path(os.environ.get("SCLC_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "viewer"
#: Chromium without a GPU: WebGL through SwiftShader, so cornerstone3D renders as on a workstation.
CHROMIUM_ARGS = (
    "--no-sandbox",  # runs as root in CI
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--disable-dev-shm-usage",
)
VIEWPORT = {"width": 1600, "height": 1000}
PAGE_TIMEOUT_MS = 90_000


def missing(reason: str) -> None:
    """Skip for a developer without the set-up; fail in CI, whose set-up must provide it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI runs scripts/test.sh, which should have installed it)")
    pytest.skip(f"{reason}; run scripts/test.sh")


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    dist = ohif_dist_dir()
    if not (dist / "index.html").is_file():
        missing(f"OHIF {ohif_version()} build not found in {dist}")
    return dist


@pytest.fixture(scope="session")
def chromium():
    """One headless Debian Chromium for the session, driven by Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python package playwright not installed")
    executable = chromium_executable()
    if executable is None:
        missing("Debian package chromium not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def demo_scored(tmp_path_factory) -> tuple[Path, ScoredStudy]:
    """The bundled demo study (`sclc-node demo`), scored by the node's own code with the shipped model."""
    workdir = tmp_path_factory.mktemp("demo")
    study = write_demo_study(workdir)
    scored = score_files(
        study.ct_dir, study.seg_path, load_clinical_file(study.clinical_path), load_model_file(default_model_path())
    )
    return workdir, scored


@dataclass(frozen=True)
class NodeObject:
    dataset: Dataset
    path: Path


@pytest.fixture(scope="session")
def node_objects(demo_scored) -> dict[str, NodeObject]:
    """Every object the node sends for the demo study ("sr", "sr-roi", "kos", "pdf", "sc"), as files.

    Built as the worker builds them: the risk SR from `score_files`, the rest
    from `dicom_io.result_objects.build_result_objects` with every kind.
    """
    workdir, scored = demo_scored
    (clinical,) = load_clinical_file(workdir / "clinical.json")
    datasets = {
        "sr": scored.sr,
        **build_result_objects(scored.ct, scored.segment, clinical, scored.result, include_risk_sr=False),
    }
    objects = {}
    for name, dataset in datasets.items():
        path = workdir / f"node-{name}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        objects[name] = NodeObject(dataset, path)
    return objects


@dataclass
class Viewer:
    """Orthanc with DICOMweb, OHIF in front of it, and a fresh browser context."""

    orthanc: Orthanc
    ohif: OhifServer
    browser: object
    artifacts: Path
    test_name: str = "viewer"
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    _contexts: list = field(default_factory=list)

    def store(self, paths: Sequence[Path]) -> ToolResult:
        """Send files/folders to Orthanc with DCMTK storescu, as a modality would; raise if any store failed."""
        result = storescu(LOOPBACK, self.orthanc.dicom_port, paths, called_ae=self.orthanc.ae_title)
        if not result.ok:
            raise AssertionError(f"storescu to Orthanc failed ({result.returncode}):\n{result.output}")
        return result

    def new_page(self):
        context = self.browser.new_context(viewport=VIEWPORT)
        self._contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        return page

    def open_study(self, study_instance_uid: str):
        """Open /viewer for one study and wait until the hanging protocol shows an image.

        The viewport's image counter ("I:40 (1/40)", or "1/1") appears once the
        first image is drawn; a double-click on a series before that would be undone.
        """
        page = self.new_page()
        page.goto(self.ohif.viewer_url(study_instance_uid))
        page.wait_for_function(
            r"""() => /\d+\/\d+/.test(document.querySelector("[data-cy='viewport-overlay-bottom-right']")?.innerText ?? "")"""
        )
        return page

    def screenshot(self, page, name: str) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        """Keep a screenshot of each page's last state (what a failed test saw), then close."""
        for number, context in enumerate(self._contexts):
            for page in context.pages:
                try:
                    self.screenshot(page, f"{self.test_name}-last-{number}")
                except Exception:  # noqa: BLE001 - a crashed page must not hide the test's own error
                    pass
            context.close()


@pytest.fixture
def dicomweb_orthanc(peers, tmp_path) -> Orthanc:  # noqa: F811 (peers is a fixture)
    if not DICOMWEB_PLUGIN.is_file():
        missing(f"Orthanc DICOMweb plugin not installed ({DICOMWEB_PLUGIN}, Debian orthanc-dicomweb)")
    if not ORTHANC.is_file():
        missing(f"Orthanc not installed ({ORTHANC})")
    if not STORESCU.is_file():
        missing(f"DCMTK storescu not installed ({STORESCU})")
    return peers.orthanc(
        tmp_path / "orthanc",
        extra_config={
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
        },
    )


@pytest.fixture
def viewer(dicomweb_orthanc, ohif_dist, chromium, tmp_path, request) -> Iterator[Viewer]:
    ohif = OhifServer(ohif_dist, dicomweb_orthanc.http_port, tmp_path / "ohif-http.log").start()
    handle = Viewer(dicomweb_orthanc, ohif, chromium, ARTIFACTS, test_name=request.node.name)
    try:
        yield handle
    finally:
        handle.close()
        ohif.stop()


__all__ = ["DEMO_PATIENT", "NodeObject", "Viewer"]
