"""End to end with real Orthanc: a study outside a narrow-domain (schema v2) model.

storescu sends the demo CT + SEG to `sclc-node serve`, whose model is the
demonstration model with an applicability domain that leaves out one of the
study's features.  The study must be scored, flagged out of domain (status,
metrics, log) with its risk group and PFS withheld, and its SR delivered to
Orthanc.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pydicom
import pytest

from sclc_risk_node.dicom_io.sr_writer import read_risk_sr
from sclc_risk_node.models import shipped_model_path
from sclc_risk_node.node.clinical_files import load_clinical_file
from sclc_risk_node.node.demo_study import DEMO_CLINICAL
from sclc_risk_node.node.scoring_job import load_model_file, score_files
from tests.domain_models import DEMO_MODEL_FILENAME as V1_MODEL_FILENAME
from tests.domain_models import demo_model_v2_json
from tests.node.dicom_tools import storescu
from tests.node.peers import free_port, peers, requires_orthanc, requires_storescp  # noqa: F401 (fixture)
from tests.test_end_to_end import (
    NODE_AE,
    ORTHANC_AE,
    SR_SOP_CLASS,
    NodeProcess,
    demo,  # noqa: F401 (fixture)
    risk_sr_in_pacs,
    sr_instances_in_pacs,
    wait_for,
)

pytestmark = [pytest.mark.external, requires_orthanc, requires_storescp]

LAHGLE = "ring.wavelet-HHL_glszm_LargeAreaHighGrayLevelEmphasis"


def test_out_of_domain_study_is_flagged_withheld_and_its_sr_reaches_orthanc(tmp_path, peers, demo):
    base = score_files(
        demo.ct_dir,
        demo.seg_path,
        load_clinical_file(demo.clinical_path),
        load_model_file(shipped_model_path(V1_MODEL_FILENAME)),
    )
    model_path = tmp_path / "narrow-model.json"
    model_path.write_text(
        demo_model_v2_json(
            base.result.features.values, base.result.radiomics_score, base.result.risk_score, outside=[LAHGLE]
        )
    )
    node_dicom_port = free_port()
    orthanc = peers.orthanc(
        tmp_path / "orthanc", ae_title=ORTHANC_AE, modalities={"NODE": (NODE_AE, "127.0.0.1", node_dicom_port)}
    )
    node = NodeProcess(tmp_path / "node", orthanc_dicom_port=orthanc.dicom_port, dicom_port=node_dicom_port)
    config = node.config_path.read_text()
    node.config_path.write_text(config.replace("[scoring]\n", f'[scoring]\nmodel_file = "{model_path}"\n', 1))
    try:
        node.start()
        study_uid = DEMO_CLINICAL["study_instance_uid"]
        sent = storescu("127.0.0.1", node.dicom_port, [demo.ct_dir, demo.seg_path], called_ae=NODE_AE)
        assert sent.ok, sent.output
        node.drop_clinical_record(DEMO_CLINICAL)
        study = wait_for(
            lambda: (s := node.study(study_uid)) and s["state"] == "delivered" and s, 180, "delivery", node
        )
        assert study["applicability"] == "out_of_domain" and study["withheld"] is True

        assert len(sr_instances_in_pacs(orthanc)) == 2  # the risk SR and the key-slice ROI SR
        [sr_id] = risk_sr_in_pacs(orthanc)
        sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(sr_id)))
        assert sr.SOPClassUID == SR_SOP_CLASS and sr.StudyInstanceUID == study_uid
        content = read_risk_sr(sr)
        assert content.estimates_withheld is True and content.risk_group is None and not content.pfs_probability
        assert "outside the model's applicability domain" in content.summary

        table = subprocess.run(
            [sys.executable, "-m", "sclc_risk_node.node.cli", "status", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "applicability: OUTSIDE THE MODEL'S APPLICABILITY DOMAIN (risk group and PFS withheld)" in table.stdout

        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'sclc_scored_studies_total{applicability="out_of_domain",withheld="true"} 1.0' in metrics
        assert 'sclc_scored_studies_total{applicability="in_domain",withheld="false"} 0.0' in metrics

        events = [
            json.loads(line)
            for line in node.log_path.read_text().splitlines()
            if line.startswith("{") and "study_scored" in line
        ]
        [scored] = events
        assert scored["applicability"] == "out_of_domain" and scored["risk_group"] is None
        log = node.log_path.read_text()
        for phi in ("DEMO-0001", "Demo^Phantom", "19600101"):
            assert phi not in log, f"{phi} leaked into the log"
    finally:
        node.stop()
