"""`node.worker.run_scoring_task` (what a worker process runs) on real files: lossy-compressed CT (issue 10, item 3)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from sclc_risk_node.node.config import load_config
from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study
from sclc_risk_node.node.scoring_job import default_model_path
from sclc_risk_node.node.worker import ScoringTask, run_scoring_task

DCMCJPEG = Path("/usr/bin/dcmcjpeg")

pytestmark = [pytest.mark.external, pytest.mark.skipif(not DCMCJPEG.exists(), reason="DCMTK dcmcjpeg missing")]


@pytest.fixture(scope="module")
def jpeg_demo(tmp_path_factory):
    """The demo study with its CT compressed to JPEG baseline quality 60 by DCMTK (SOP Instance UIDs kept)."""
    demo = write_demo_study(tmp_path_factory.mktemp("demo"))
    for path in sorted(demo.ct_dir.iterdir()):
        subprocess.run([str(DCMCJPEG), "+eb", "+q", "60", "+un", str(path), str(path)], check=True, capture_output=True)
    return demo


def task(demo, *, allow_lossy_ct: bool) -> ScoringTask:
    return ScoringTask(
        study_instance_uid=DEMO_CLINICAL["study_instance_uid"],
        ct_series_dir=demo.ct_dir,
        ct_series_instance_uid=str(
            pydicom.dcmread(next(demo.ct_dir.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        ),
        seg_path=demo.seg_path,
        clinical_json=json.dumps(DEMO_CLINICAL),
        model_path=default_model_path(),
        segment_label=None,
        allow_lossy_ct=allow_lossy_ct,
    )


def test_lossy_ct_fails_scoring_with_a_reason_naming_the_compression(jpeg_demo):
    outcome = run_scoring_task(task(jpeg_demo, allow_lossy_ct=False))
    assert outcome.sr_bytes is None
    assert "lossy-compressed CT is refused" in outcome.error
    assert 'Lossy Image Compression (0028,2110) is "01"' in outcome.error
    assert "scoring.allow_lossy_ct = true" in outcome.error


def test_lossy_ct_allowed_by_config_is_scored_and_flagged_in_the_json(jpeg_demo, tmp_path):
    config_path = tmp_path / "node.toml"
    config_path.write_text("[scoring]\nallow_lossy_ct = true\n")
    assert load_config(config_path).scoring.allow_lossy_ct is True
    assert load_config().scoring.allow_lossy_ct is False  # the default refuses

    outcome = run_scoring_task(task(jpeg_demo, allow_lossy_ct=load_config(config_path).scoring.allow_lossy_ct))
    assert outcome.error is None, outcome.error
    assert json.loads(outcome.result_json)["lossy_compression"] is True
