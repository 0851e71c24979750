"""FHIR R4 lookup on a real spool against a recorded-response FHIR server on loopback.

FHIR search -> clinical record -> scored SR; waiting reasons in `sclc-node status`;
auth, paging, timeouts; FHIR Bundles dropped into the clinical inbox.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time

import pydicom
import pytest

from sclc_risk_node.node.clinical_inbox import ClinicalInbox
from sclc_risk_node.node.config import CompletionConfig, FhirConfig
from sclc_risk_node.node.demo_study import DEMO_PATIENT, write_demo_study
from sclc_risk_node.node.fhir_client import FhirClient, FhirServerError
from sclc_risk_node.node.fhir_lookup import WAITING_REASONS_FILENAME, FhirLookup, WaitingReasons
from sclc_risk_node.node.records import InstanceHeader
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.node.worker import ScoringDispatcher, run_scoring_task
from sclc_risk_node.scoring.clinical import clinical_record_from_mapping
from tests.fhir_fixtures import MRN_SYSTEM, bundle, complete_set, observation, patient, quantity

PATIENT_ID = DEMO_PATIENT.patient_id
COMPLETION = CompletionConfig(grace_s=1.0, study_expiry_s=3600.0)


#: "Today" for the EHR: the synthetic CT's fixed StudyDate (checked in the fixture).
TODAY = dt.date(2026, 1, 1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    study = write_demo_study(tmp_path_factory.mktemp("demo"))
    first = pydicom.dcmread(sorted(study.ct_dir.iterdir())[0], stop_before_pixels=True)
    assert first.StudyDate == TODAY.strftime("%Y%m%d")
    return study


def store_study(spool: Spool, demo, *, now: float) -> str:
    for path in sorted(demo.ct_dir.iterdir()) + [demo.seg_path]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        StudyMachine(spool).store_instance(path.read_bytes(), InstanceHeader.from_dataset(ds), now=now)
    return DEMO_PATIENT.study_instance_uid


@pytest.fixture
def spool(tmp_path):
    with Spool.open(tmp_path / "spool", min_free_bytes=0) as spool:
        yield spool


def fhir_config(server, **overrides) -> FhirConfig:
    values = dict(
        enabled=True,
        base_url=server.base_url,
        patient_identifier_system=MRN_SYSTEM,
        timeout_s=5.0,
        retry_interval_s=60.0,
    )
    values.update(overrides)
    return FhirConfig(**values)


def waiting_study(spool, demo) -> str:
    uid = store_study(spool, demo, now=1000.0)
    StudyMachine(spool).advance_all(now=1010.0, settings=COMPLETION)
    assert spool.get_study(uid).state is StudyState.WAITING_FOR_CLINICAL
    return uid


def ehr(*extra, drop=()):
    return (
        [patient("p1", PATIENT_ID), patient("p2", "OTHER-PATIENT")]
        + [r for r in complete_set(TODAY) if r["id"] not in drop]
        + list(extra)
    )


def test_fhir_search_gives_the_record_and_the_study_is_scored(spool, demo, tmp_path):
    from tests.node.fhir_server import RecordedFhirServer

    uid = waiting_study(spool, demo)
    with RecordedFhirServer(
        ehr(observation("other-ecog", "89247-1", TODAY, subject="Patient/p2", valueInteger=4))
    ) as server:
        [outcome] = FhirLookup(spool, fhir_config(server)).run_once(now=1020.0)
        requests = list(server.requests)
    assert outcome.found and outcome.reason is None
    # The searches the node makes, as the docs describe them.
    assert [r["path"] for r in requests] == ["/fhir/Patient", "/fhir/Observation"]
    assert requests[0]["params"]["identifier"] == [f"{MRN_SYSTEM}|{PATIENT_ID}"]
    observation_query = requests[1]["params"]
    assert observation_query["subject"] == ["Patient/p1"]
    assert observation_query["code"][0].split(",") == [
        f"http://loinc.org|{code}" for code in ("89247-1", "21905-5", "21906-3", "21907-1", "2532-0", "6690-2", "751-8")
    ]
    assert sorted(observation_query["date"]) == [
        f"ge{TODAY - dt.timedelta(days=91)}",
        f"le{TODAY + dt.timedelta(days=1)}",
    ]

    row = spool.clinical_record_for(uid)
    record = clinical_record_from_mapping(json.loads(row.record_json))
    assert (record.t_stage, record.n_stage, record.m_stage, record.ecog, record.lipi.label) == (
        "T3",
        "N2",
        "M1c",
        1,
        "intermediate",
    )
    assert {p.resource for p in record.provenance} == {
        f"Observation/{i}" for i in ("ecog", "t", "n", "m", "ldh", "wbc", "anc")
    }
    assert record.patient_id == PATIENT_ID and record.study_instance_uid == uid

    machine = StudyMachine(spool)
    machine.advance_all(now=1030.0, settings=COMPLETION)
    assert spool.get_study(uid).state is StudyState.READY
    dispatcher = ScoringDispatcher(
        spool, machine, workers=1, lease_s=60, model_path=_model_path(), destinations=[], segment_label=None
    )
    outcome = run_scoring_task(dispatcher._task_for(uid))
    assert outcome.error is None, outcome.error
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(outcome.sr_bytes))
    assert sr.StudyInstanceUID == uid and sr.Modality == "SR"
    result = json.loads(outcome.result_json)
    assert result["risk_group"] in ("high", "low")


def _model_path():
    from sclc_risk_node.node.scoring_job import default_model_path

    return default_model_path()


def test_missing_and_bad_values_keep_the_study_waiting_with_the_reason_in_status(spool, demo, tmp_path):
    from tests.node.fhir_server import RecordedFhirServer

    uid = waiting_study(spool, demo)
    resources = ehr(drop=("anc", "wbc"))
    resources.append(observation("wbc", "6690-2", TODAY, valueQuantity=quantity(7.4, "g/dL")))
    with RecordedFhirServer(resources) as server:
        lookup = FhirLookup(spool, fhir_config(server))
        [outcome] = lookup.run_once(now=1020.0)
        assert not outcome.found
        assert "missing: ANC (LOINC 751-8)" in outcome.reason
        assert "WBC (LOINC 6690-2) Observation/wbc: wrong unit 'g/dL'" in outcome.reason
        assert spool.clinical_record_for(uid) is None
        # Not asked again before retry_interval_s...
        assert lookup.run_once(now=1030.0) == []
        # ...and once the EHR has the values, the next try finds them.
        server.resources = ehr()
        [outcome] = lookup.run_once(now=1020.0 + 61)
        assert outcome.found
    assert WaitingReasons(spool.directory).read() == {}


def test_status_shows_the_fhir_waiting_reason(tmp_path, demo):
    from tests.node.fhir_server import RecordedFhirServer

    config_path = tmp_path / "node.toml"
    config_path.write_text(f"""
[spool]
directory = "{tmp_path}/spool"
database = "{tmp_path}/spool/node.sqlite3"
[clinical]
inbox_directory = "{tmp_path}/inbox"
[fhir]
enabled = true
base_url = "http://127.0.0.1:9/fhir"
""")
    with Spool.open(tmp_path / "spool", database=tmp_path / "spool" / "node.sqlite3", min_free_bytes=0) as spool:
        uid = waiting_study(spool, demo)
        with RecordedFhirServer(ehr(drop=("ecog",))) as server:
            FhirLookup(spool, fhir_config(server)).run_once(now=1020.0)
    proc = subprocess.run(
        [sys.executable, "-m", "sclc_risk_node.node.cli", "status", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "waiting for: no clinical record (FHIR: missing: ECOG performance status (LOINC 89247-1): no usable "
        "Observation between" in proc.stdout
    )
    assert uid in proc.stdout
    reasons_text = (tmp_path / "spool" / WAITING_REASONS_FILENAME).read_text()
    assert PATIENT_ID not in reasons_text and PATIENT_ID not in proc.stdout + proc.stderr


def test_server_problems_are_waiting_reasons_without_phi(spool, demo, tmp_path, capsys):
    from tests.node.fhir_server import RecordedFhirServer

    uid = waiting_study(spool, demo)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with RecordedFhirServer(ehr(), authorization="Bearer right-token") as server:
        [outcome] = FhirLookup(spool, fhir_config(server, auth="bearer", token_file=token_file)).run_once(now=1020.0)
        assert server.requests[0]["authorization"] == "Bearer s3cret-token"
    assert outcome.reason == "FHIR: FHIR Patient search: HTTP 401 Unauthorized"
    with RecordedFhirServer([patient("p1", PATIENT_ID), patient("p9", PATIENT_ID)]) as server:
        [outcome] = FhirLookup(spool, fhir_config(server)).run_once(now=1020.0)
    assert outcome.reason == "FHIR: FHIR Patient search by the study's PatientID found 2 patients (needed: exactly one)"
    with RecordedFhirServer(ehr(), delay_s=1.0) as server:
        [outcome] = FhirLookup(spool, fhir_config(server, timeout_s=0.2)).run_once(now=1020.0)
    assert (
        outcome.reason.startswith("FHIR: FHIR Patient search: server unreachable (") and "timed out" in outcome.reason
    )
    assert spool.get_study(uid).state is StudyState.WAITING_FOR_CLINICAL
    assert PATIENT_ID not in capsys.readouterr().out + outcome.reason


def test_basic_auth_and_paging(tmp_path):
    import sclc_risk_node.node.fhir_client as fhir_client
    from tests.node.fhir_server import RecordedFhirServer

    password_file = tmp_path / "password"
    password_file.write_text("pw")
    many = [observation(f"e{i}", "89247-1", TODAY - dt.timedelta(days=i), valueInteger=1) for i in range(7)]
    with RecordedFhirServer([patient("p1", PATIENT_ID), *many], authorization="Basic dXNlcjpwdw==") as server:
        client = FhirClient(fhir_config(server, auth="basic", username="user", password_file=password_file))
        old = fhir_client.PAGE_SIZE
        fhir_client.PAGE_SIZE = 3
        try:
            found = client.patient_resources(
                PATIENT_ID, since=TODAY - dt.timedelta(days=90), until=TODAY, identifier_system=MRN_SYSTEM
            )
        finally:
            fhir_client.PAGE_SIZE = old
        assert len(server.requests) == 1 + 3  # Patient, then three pages of Observations
    assert found.patient_refs == {"Patient/p1"}
    assert sorted(r["id"] for r in found.resources if r["resourceType"] == "Observation") == sorted(
        f"e{i}" for i in range(7)
    )


def test_unreachable_server_is_a_clear_error(tmp_path):
    config = FhirConfig(enabled=True, base_url="http://127.0.0.1:9/fhir", timeout_s=1.0)
    with pytest.raises(FhirServerError, match=r"^FHIR Patient search: server unreachable \("):
        FhirClient(config).patient_resources(PATIENT_ID, since=TODAY, until=TODAY, identifier_system=None)


def _age(path, seconds=5):
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_bundle_dropped_in_the_inbox_waits_for_its_study_then_gives_the_record(spool, demo, tmp_path):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool, fhir=FhirConfig(patient_identifier_system=MRN_SYSTEM))
    path = inbox_dir / "export.json"
    path.write_text(json.dumps(bundle(ehr())))
    _age(path)
    assert inbox.scan(now=time.time()) == []  # no study of this patient yet: the file waits
    assert path.exists()
    uid = waiting_study(spool, demo)
    [report] = inbox.scan(now=time.time())
    assert report.accepted and report.matched_studies == (uid,)
    assert (inbox_dir / "accepted" / "export.json").exists()
    record = clinical_record_from_mapping(json.loads(spool.clinical_record_for(uid).record_json))
    assert record.ecog == 1 and record.provenance


def test_a_bundle_with_another_patients_observation_is_rejected(spool, demo, tmp_path):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool, fhir=FhirConfig(patient_identifier_system=MRN_SYSTEM))
    waiting_study(spool, demo)
    path = inbox_dir / "export.json"
    path.write_text(
        json.dumps(
            bundle(ehr(observation("x", "751-8", TODAY, subject="Patient/p2", valueQuantity=quantity(3.0, "10*9/L"))))
        )
    )
    _age(path)
    [report] = inbox.scan(now=time.time())
    assert not report.accepted
    assert report.problems == (
        "ANC (LOINC 751-8) Observation/x is for another patient than the study's (its subject does not match)",
    )
    error_text = (inbox_dir / "rejected" / "export.json.error.txt").read_text()
    # The note names the item and the problem, never the file's content (the resource id, the patient).
    assert "ANC (LOINC 751-8): an Observation is for another patient than the study's" in error_text
    assert "Observation/x" not in error_text and PATIENT_ID not in error_text


def test_fhir_config_names_each_problem(tmp_path):
    from sclc_risk_node.node.config import ConfigError, load_config

    path = tmp_path / "node.toml"
    path.write_text('[fhir]\nenabled = true\nbase_url = "ehr.example.org"\nauth = "bearer"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == (
        "fhir.base_url: 'ehr.example.org' is not an http:// or https:// URL (required when enabled)",
        'fhir.token_file: required when auth = "bearer"',
    )
    path.write_text('[fhir]\nauth = "kerberos"\n')
    with pytest.raises(ConfigError, match="fhir.auth: 'kerberos' is not one of none, basic, bearer"):
        load_config(path)


def test_clinical_import_of_a_fhir_bundle(spool, demo, tmp_path):
    from sclc_risk_node.node.clinical_inbox import import_clinical_file
    from sclc_risk_node.scoring.errors import ClinicalRecordError

    path = tmp_path / "export.json"
    path.write_text(json.dumps(bundle(ehr())))
    config = FhirConfig(patient_identifier_system=MRN_SYSTEM)
    with pytest.raises(ClinicalRecordError, match="no study of its patient without a clinical record is in the spool"):
        import_clinical_file(spool, path, now=1000.0, fhir=config)
    uid = waiting_study(spool, demo)
    report = import_clinical_file(spool, path, now=1020.0, fhir=config)
    assert (report.records, report.matched_studies) == (1, (uid,))
    assert clinical_record_from_mapping(json.loads(spool.clinical_record_for(uid).record_json)).m_stage == "M1c"
