"""`sclc-node score` with the inputs hospitals hold: a FHIR R4 Bundle for the clinical record, an RTSTRUCT for the tumour."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from sclc_risk_node.node.demo_study import DEMO_PATIENT
from tests.fhir_fixtures import bundle, complete_set, observation, patient, quantity
from tests.node.test_cli_score import run_cli

#: The synthetic CT's fixed StudyDate.
STUDY_DATE = dt.date(2026, 1, 1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from sclc_risk_node.node.demo_study import write_demo_study

    return write_demo_study(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def scored_with_json_record(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("json")
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--seg",
        demo.seg_path,
        "--clinical",
        demo.clinical_path,
        "--out",
        out / "sr.dcm",
        "--json",
        out / "result.json",
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "result.json").read_text())


def test_a_fhir_bundle_scores_like_the_same_values_as_json(demo, scored_with_json_record, tmp_path):
    # The EHR holds exactly the demo record's values (T3 N2 M1c, ECOG 1, labs), in FHIR form.
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle([patient("p1", DEMO_PATIENT.patient_id), *complete_set(STUDY_DATE)])))
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--seg",
        demo.seg_path,
        "--clinical",
        path,
        "--out",
        tmp_path / "sr.dcm",
        "--json",
        tmp_path / "result.json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["risk_score"] == scored_with_json_record["risk_score"]
    assert result["risk_group"] == scored_with_json_record["risk_group"]


def test_a_fhir_bundle_with_a_wrong_unit_is_refused_naming_it(demo, tmp_path):
    resources = [r for r in complete_set(STUDY_DATE) if r["id"] != "wbc"]
    resources.append(observation("wbc", "6690-2", STUDY_DATE, valueQuantity=quantity(7.4, "mmol/L")))
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle([patient("p1", DEMO_PATIENT.patient_id), *resources])))
    proc = run_cli(
        "score", "--ct", demo.ct_dir, "--seg", demo.seg_path, "--clinical", path, "--out", tmp_path / "sr.dcm"
    )
    assert proc.returncode == 2
    assert "WBC (LOINC 6690-2) Observation/wbc: wrong unit 'mmol/L'" in proc.stderr
    assert DEMO_PATIENT.patient_id not in proc.stderr
    assert not (tmp_path / "sr.dcm").exists()


def test_an_rtstruct_of_the_same_tumour_scores_like_the_seg(demo, scored_with_json_record, tmp_path):
    import pydicom

    from sclc_risk_node.dicom_io.ct_series import read_ct_series
    from sclc_risk_node.dicom_io.seg import read_tumour_segment
    from tests.rtstruct_builder import build_rtstruct, contours_from_mask, save

    ct = sorted((pydicom.dcmread(p) for p in demo.ct_dir.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    mask = read_tumour_segment(demo.seg_path, read_ct_series(demo.ct_dir)).mask
    rtstruct = save(
        build_rtstruct(
            ct, contours_from_mask(mask), roi_name="GTV", extra_rois=[("GTVn", "GTV", contours_from_mask(mask))]
        ),
        tmp_path / "rs.dcm",
    )
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--rtstruct",
        rtstruct,
        "--clinical",
        demo.clinical_path,
        "--out",
        tmp_path / "sr.dcm",
        "--json",
        tmp_path / "result.json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    rtstruct_uid = pydicom.dcmread(rtstruct).SOPInstanceUID
    assert result["tumour_source"] == {
        "kind": "RTSTRUCT",
        "sop_instance_uid": rtstruct_uid,
        "label": "GTV",
        "number": 1,
    }
    assert result["seg_sop_instance_uid"] is None
    # Contours traced from the SEG's mask rasterise back to the same voxels, so every number agrees.
    assert result["features"] == scored_with_json_record["features"]
    assert result["risk_score"] == scored_with_json_record["risk_score"]
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    cited = {
        ref.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert rtstruct_uid in cited
    assert str(sr.SOPInstanceUID) == result["sr_sop_instance_uid"]
    assert f"Tumour: RTSTRUCT {rtstruct_uid}, ROI 1 'GTV'" in proc.stdout


def test_score_refuses_both_seg_and_rtstruct_and_names_a_bad_roi_choice(demo, tmp_path):
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--seg",
        demo.seg_path,
        "--rtstruct",
        demo.seg_path,
        "--clinical",
        demo.clinical_path,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--rtstruct",
        demo.seg_path,
        "--roi-name",
        "GTV",
        "--clinical",
        demo.clinical_path,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2
    assert "seg.dcm is not an RT Structure Set (Segmentation Storage, modality SEG)" in proc.stderr
