"""End to end with the inputs hospitals hold: the tumour as an RTSTRUCT, the clinical record from FHIR R4.

storescu pushes the demo CT and an RTSTRUCT of its tumour into Orthanc;
Orthanc routes the study to `sclc-node serve`; the node finds no record in
the inbox and asks a FHIR server (recorded responses on loopback,
tests/node/fhir_server.py) for the patient's Observations.  First the EHR lacks
the ECOG score: the study waits and `sclc-node status` names LOINC 89247-1.
Once it is charted, the next lookup gives the record, the study is scored and
the SR, citing the RTSTRUCT, lands in Orthanc.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pydicom
import pytest

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.node.demo_study import DEMO_CLINICAL, DEMO_PATIENT
from tests.fhir_fixtures import MRN_SYSTEM, bundle, complete_set, patient
from tests.node.dicom_tools import storescu
from tests.node.fhir_server import RecordedFhirServer
from tests.node.peers import requires_orthanc, requires_storescp
from tests.rtstruct_builder import build_rtstruct, contours_from_mask, save
from tests.test_end_to_end import (  # noqa: F401 (fixtures)
    ORTHANC_AE,
    demo,
    pacs_and_node,
    peers,
    risk_sr_in_pacs,
    wait_for,
)

pytestmark = [pytest.mark.external, requires_orthanc, requires_storescp]

#: The synthetic CT's fixed StudyDate.
STUDY_DATE = dt.date(2026, 1, 1)
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def demo_rtstruct(demo, folder):
    ct = sorted((pydicom.dcmread(p) for p in demo.ct_dir.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    mask = read_tumour_segment(demo.seg_path, read_ct_series(demo.ct_dir)).mask
    return save(build_rtstruct(ct, contours_from_mask(mask), roi_name="GTVp"), folder / "rtstruct.dcm")


def test_rtstruct_study_with_fhir_record_comes_back_as_an_sr(pacs_and_node, demo, tmp_path):
    orthanc, node = pacs_and_node
    study_uid = DEMO_CLINICAL["study_instance_uid"]
    rtstruct = demo_rtstruct(demo, tmp_path)
    without_ecog = [patient("p1", DEMO_PATIENT.patient_id)] + [r for r in complete_set(STUDY_DATE) if r["id"] != "ecog"]
    with RecordedFhirServer(without_ecog) as fhir:
        with open(node.config_path, "a", encoding="utf-8") as config:
            config.write(f"""
[fhir]
enabled = true
base_url = "{fhir.base_url}"
patient_identifier_system = "{MRN_SYSTEM}"
timeout_s = 5
retry_interval_s = 1
""")
        node.start()
        sent = storescu("127.0.0.1", orthanc.dicom_port, [demo.ct_dir, rtstruct], called_ae=ORTHANC_AE)
        assert sent.ok, sent.output
        [orthanc_study] = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        orthanc.post("/modalities/NODE/store", {"Resources": [orthanc_study], "Synchronous": True})

        def waiting_with_reason():
            study = node.study(study_uid)
            return (
                study
                and study["state"] == "waiting_for_clinical"
                and any("LOINC 89247-1" in w for w in study["waiting_for"])
                and study
            )

        study = wait_for(waiting_with_reason, 60, "the FHIR waiting reason in status", node)
        assert study["instances"] == len(list(demo.ct_dir.iterdir())) + 1  # the CT and the RTSTRUCT
        [reason] = study["waiting_for"]
        assert reason.startswith("no clinical record (FHIR: missing: ECOG performance status (LOINC 89247-1)")

        fhir.resources = [patient("p1", DEMO_PATIENT.patient_id), *complete_set(STUDY_DATE)]  # ECOG now charted
        [sr_id] = wait_for(lambda: risk_sr_in_pacs(orthanc), 180, "the risk SR in Orthanc", node)
        assert any(r["path"] == "/fhir/Observation" for r in fhir.requests)

    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(sr_id)))
    rtstruct_uid = pydicom.dcmread(rtstruct).SOPInstanceUID
    assert sr.StudyInstanceUID == study_uid
    evidence = {
        ref.ReferencedSOPInstanceUID: ref.ReferencedSOPClassUID
        for study_ref in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_ref.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence.get(rtstruct_uid) == RT_STRUCTURE_SET_STORAGE, "the risk SR must cite the RTSTRUCT as evidence"

    # The node's result equals `sclc-node score` on the same files, and (same mask) the SEG-based one.
    out = tmp_path / "reference.json"
    bundle_path = tmp_path / "bundle.json"
    bundle_path.write_text(json.dumps(bundle([patient("p1", DEMO_PATIENT.patient_id), *complete_set(STUDY_DATE)])))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sclc_risk_node.node.cli",
            "score",
            "--ct",
            str(demo.ct_dir),
            "--rtstruct",
            str(rtstruct),
            "--clinical",
            str(bundle_path),
            "--out",
            str(tmp_path / "reference-sr.dcm"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    expected = json.loads(out.read_text())
    assert expected["tumour_source"] == {
        "kind": "RTSTRUCT",
        "sop_instance_uid": rtstruct_uid,
        "label": "GTVp",
        "number": 1,
    }
    assert expected["sr_sop_instance_uid"] == str(sr.SOPInstanceUID)
    study = wait_for(lambda: (s := node.study(study_uid)) and s["state"] == "delivered" and s, 60, "delivery", node)
    log = node.log_path.read_text()
    for phi in (DEMO_PATIENT.patient_id, DEMO_PATIENT.patient_name):
        assert phi not in log, f"{phi} leaked into the log"
