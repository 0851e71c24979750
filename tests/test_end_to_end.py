"""The node end to end with real parts: Orthanc as the PACS, DCMTK as the modality, `sclc-node serve` as a process.

Main path: storescu pushes CT + SEG into Orthanc; Orthanc routes the study to
the node (POST /modalities/NODE/store); the clinical record goes into the
inbox; the node scores the study and sends the SR to Orthanc; the test reads
the SR back through Orthanc's REST API.  Then: PACS down, kill -9 while
receiving and while scoring, and refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from sclc_risk_node.dicom_io.sr_writer import read_risk_sr
from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study
from tests.node.dicom_tools import echoscu, storescu
from tests.node.peers import free_port, peers, requires_orthanc, requires_storescp  # noqa: F401 (fixture)

pytestmark = [pytest.mark.external, requires_orthanc, requires_storescp]

NODE_AE = "SCLC_NODE"
ORTHANC_AE = "ORTHANC"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


class NodeProcess:
    """`sclc-node serve --config FILE` in a subprocess, stopped by PID."""

    def __init__(
        self,
        root: Path,
        *,
        orthanc_dicom_port: int,
        dicom_port: int | None = None,
        lease_s: float = 60,
        workers: int = 1,
    ):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.state = root / "state"
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.inbox = self.state / "inbox"
        self.config_path = root / "node.toml"
        self.log_path = root / "node.log"
        self.config_path.write_text(
            f"""
[scp]
ae_title = "{NODE_AE}"
bind_address = "127.0.0.1"
port = {self.dicom_port}
max_pdu_bytes = 0
[[scp.allowed_callers]]
ae_title = "{ORTHANC_AE}"
host = "127.0.0.1"
[[scp.allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"
[[scp.allowed_callers]]
ae_title = "ECHOSCU"
host = "127.0.0.1"
[spool]
directory = "{self.state}/spool"
database = "{self.state}/node.sqlite3"
min_free_bytes = 0
[completion]
grace_s = 1
study_expiry_s = 600
[clinical]
inbox_directory = "{self.inbox}"
poll_interval_s = 0.5
[scoring]
workers = {workers}
lease_s = {lease_s}
[[destinations]]
name = "orthanc"
ae_title = "{ORTHANC_AE}"
host = "127.0.0.1"
port = {orthanc_dicom_port}
[outbox]
initial_backoff_s = 1
max_backoff_s = 2
[http]
bind_address = "127.0.0.1"
port = {self.http_port}
[logging]
level = "INFO"
"""
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sclc_risk_node.node.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(self._healthy, 60, f"node on HTTP port {self.http_port}", self)
        return self

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def status(self) -> dict:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sclc_risk_node.node.cli",
                "status",
                "--json",
                "--all",
                "--config",
                str(self.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def state_now(self, study_uid: str) -> str | None:
        """The study's state straight from the database: fast enough to catch the short `scoring` window."""
        database = self.state / "node.sqlite3"
        if not database.exists():
            return None
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute("SELECT state FROM studies WHERE study_instance_uid = ?", (study_uid,)).fetchone()
        return row[0] if row else None

    def study(self, study_uid: str) -> dict | None:
        return next((s for s in self.status()["studies"] if s["study_instance_uid"] == study_uid), None)

    def drop_clinical_record(self, record: dict, name: str = "record.json") -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        partial = self.inbox / f".{name}.partial"
        partial.write_text(json.dumps(record))
        past = time.time() - 5
        os.utime(partial, (past, past))
        partial.rename(self.inbox / name)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def worker_pids(parent_pid: int) -> list[int]:
    """The node's child processes (its scoring workers, and spawn's resource tracker)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(parent_pid):
            children.append(int(status.parent.name))
    return children


def wait_for(condition, timeout_s: float, what: str, node: NodeProcess | None = None, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n" + (node.log_tail() if node else ""))


@pytest.fixture
def demo(tmp_path):
    return write_demo_study(tmp_path / "demo")


@pytest.fixture
def pacs_and_node(tmp_path, peers):
    node_dicom_port = free_port()
    orthanc = peers.orthanc(
        tmp_path / "orthanc", ae_title=ORTHANC_AE, modalities={"NODE": (NODE_AE, "127.0.0.1", node_dicom_port)}
    )
    node = NodeProcess(tmp_path / "node", orthanc_dicom_port=orthanc.dicom_port, dicom_port=node_dicom_port)
    yield orthanc, node
    node.stop()


def push_to_pacs_and_route(orthanc, demo) -> str:
    """storescu -> Orthanc, then Orthanc -> node; returns Orthanc's study id."""
    sent = storescu("127.0.0.1", orthanc.dicom_port, [demo.ct_dir, demo.seg_path], called_ae=ORTHANC_AE)
    assert sent.ok, sent.output
    [study_id] = orthanc.post(
        "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": DEMO_CLINICAL["study_instance_uid"]}}
    )
    orthanc.post("/modalities/NODE/store", {"Resources": [study_id], "Synchronous": True})
    return study_id


#: Per study the node sends two SRs (risk SR, key-slice ROI SR), a KOS, a PDF and an SC (default objects).
SR_DOCUMENTS_PER_STUDY = 2
NODE_OBJECTS_PER_STUDY = 5


def sr_instances_in_pacs(orthanc) -> list[str]:
    return list(orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}))


def node_instances_in_pacs(orthanc) -> dict[str, list[str]]:
    """Modality -> Orthanc instance ids of everything the node sent (SR, KO, DOC, OT)."""
    return {
        modality: list(orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": modality}}))
        for modality in ("SR", "KO", "DOC", "OT")
    }


def risk_sr_in_pacs(orthanc) -> list[str]:
    """The risk SR(s): instance 1 of the SR series (the key-slice ROI SR is instance 2)."""
    return [i for i in sr_instances_in_pacs(orthanc) if orthanc.simplified_tags(i).get("InstanceNumber") == "1"]


def reference_result(demo, tmp_path) -> dict:
    out = tmp_path / "reference.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sclc_risk_node.node.cli",
            "score",
            "--ct",
            str(demo.ct_dir),
            "--seg",
            str(demo.seg_path),
            "--clinical",
            str(demo.clinical_path),
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
    return json.loads(out.read_text())


def test_study_routed_by_pacs_comes_back_as_an_sr(pacs_and_node, demo, tmp_path):
    orthanc, node = pacs_and_node
    node.start()
    push_to_pacs_and_route(orthanc, demo)
    study_uid = DEMO_CLINICAL["study_instance_uid"]
    wait_for(lambda: node.study(study_uid), 30, "the node to index the study", node)
    node.drop_clinical_record(DEMO_CLINICAL)

    [sr_id] = wait_for(lambda: risk_sr_in_pacs(orthanc), 120, "the SR in Orthanc", node)
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(sr_id)))
    assert sr.SOPClassUID == SR_SOP_CLASS
    assert sr.StudyInstanceUID == study_uid
    content = read_risk_sr(sr)
    expected = reference_result(demo, tmp_path)
    assert content.risk_group.value == expected["risk_group"]
    # The SR states scores to 3 decimals and PFS to 0.1 % (dicom_io.sr_writer rounding).
    assert content.risk_score == round(expected["risk_score"], 3)
    assert content.radiomics_score == round(expected["radiomics_score"], 3)
    assert {k: v for k, v in content.pfs_probability.items()} == pytest.approx(
        {int(k): round(v, 3) for k, v in expected["pfs_probability"].items()}, abs=1e-9
    )
    assert content.model.demonstration is True
    assert str(sr.SOPInstanceUID) == expected["sr_sop_instance_uid"]

    study = wait_for(
        lambda: (s := node.study(study_uid)) and s["state"] == "delivered" and s, 30, "the study to be delivered", node
    )
    assert [d["state"] for d in study["deliveries"]] == ["delivered"] * NODE_OBJECTS_PER_STUDY
    sent = node_instances_in_pacs(orthanc)
    assert {modality: len(ids) for modality, ids in sent.items()} == {"SR": 2, "KO": 1, "DOC": 1, "OT": 1}
    assert orthanc.get_bytes(f"/instances/{sent['DOC'][0]}/pdf").startswith(b"%PDF-")
    assert orthanc.get_bytes(f"/instances/{sent['OT'][0]}/preview").startswith(b"\x89PNG")
    assert "PatientName" not in node.log_path.read_text()
    for phi in ("DEMO-0001", "Demo^Phantom", "19600101"):
        assert phi not in node.log_path.read_text(), f"{phi} leaked into the log"


def test_pacs_down_sr_waits_then_is_delivered_once(pacs_and_node, demo):
    orthanc, node = pacs_and_node
    node.start()
    push_to_pacs_and_route(orthanc, demo)
    study_uid = DEMO_CLINICAL["study_instance_uid"]
    wait_for(lambda: node.study(study_uid), 30, "the node to index the study", node)
    orthanc.stop()
    node.drop_clinical_record(DEMO_CLINICAL)

    def delivery_failed_at_least_twice():
        study = node.study(study_uid)
        return study and study["deliveries"] and study["deliveries"][0]["attempts"] >= 2 and study

    study = wait_for(delivery_failed_at_least_twice, 120, "failed delivery attempts", node)
    assert study["state"] == "scored"
    assert study["deliveries"][0]["state"] != "delivered"
    assert "orthanc" in study["deliveries"][0]["last_error"]

    orthanc.start()
    wait_for(lambda: (s := node.study(study_uid)) and s["state"] == "delivered", 60, "delivery after restart", node)
    time.sleep(3)  # any duplicate send would land by now
    assert len(sr_instances_in_pacs(orthanc)) == SR_DOCUMENTS_PER_STUDY
    assert {d["state"] for d in node.study(study_uid)["deliveries"]} == {"delivered"}


def test_kill9_while_receiving_then_resend_gives_one_sr(pacs_and_node, demo):
    orthanc, node = pacs_and_node
    node.start()
    study_uid = DEMO_CLINICAL["study_instance_uid"]
    sender = subprocess.Popen(
        [
            "/usr/bin/storescu",
            "-R",
            "+sd",
            "+r",
            "-aet",
            "STORESCU",
            "-aec",
            NODE_AE,
            "127.0.0.1",
            str(node.dicom_port),
            str(demo.ct_dir),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    spool_files = lambda: [p for p in (node.state / "spool").rglob("*.dcm")]  # noqa: E731
    wait_for(lambda: len(spool_files()) >= 3, 30, "the first instances in the spool", node, interval_s=0.01)
    node.kill9()
    sender.wait(30)

    node.start()  # recovery indexes whatever was acknowledged or renamed before the kill
    sent = storescu("127.0.0.1", node.dicom_port, [demo.ct_dir, demo.seg_path], called_ae=NODE_AE)
    assert sent.ok, sent.output
    node.drop_clinical_record(DEMO_CLINICAL)
    wait_for(lambda: (s := node.study(study_uid)) and s["state"] == "delivered", 120, "delivery", node)
    assert node.study(study_uid)["instances"] == len(list(demo.ct_dir.iterdir())) + 1
    time.sleep(2)
    assert len(sr_instances_in_pacs(orthanc)) == SR_DOCUMENTS_PER_STUDY


def test_kill9_while_scoring_gives_exactly_one_sr(tmp_path, peers, demo):
    node_dicom_port = free_port()
    orthanc = peers.orthanc(
        tmp_path / "orthanc", ae_title=ORTHANC_AE, modalities={"NODE": (NODE_AE, "127.0.0.1", node_dicom_port)}
    )
    node = NodeProcess(tmp_path / "node", orthanc_dicom_port=orthanc.dicom_port, dicom_port=node_dicom_port, lease_s=3)
    try:
        node.start()
        study_uid = DEMO_CLINICAL["study_instance_uid"]
        sent = storescu("127.0.0.1", node.dicom_port, [demo.ct_dir, demo.seg_path], called_ae=NODE_AE)
        assert sent.ok, sent.output
        node.drop_clinical_record(DEMO_CLINICAL)
        wait_for(lambda: node.state_now(study_uid) == "scoring", 60, "scoring to start", node, interval_s=0.01)
        workers = wait_for(
            lambda: worker_pids(node.process.pid), 30, "the scoring worker process", node, interval_s=0.01
        )
        node.kill9()
        assert node.study(study_uid)["state"] == "scoring"
        wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
            30,
            "the orphaned scoring workers to exit",
            node,
        )

        node.start()
        wait_for(
            lambda: (s := node.study(study_uid)) and s["state"] == "delivered", 120, "delivery after restart", node
        )
        time.sleep(2)
        srs = sr_instances_in_pacs(orthanc)
        assert len(srs) == SR_DOCUMENTS_PER_STUDY
        assert sum(len(ids) for ids in node_instances_in_pacs(orthanc).values()) == NODE_OBJECTS_PER_STUDY
        events = [line for line in node.log_path.read_text().splitlines() if "previous_instance_work_released" in line]
        assert events, "the restarted node should have released the killed instance's claim at start-up"
    finally:
        node.stop()


def test_unknown_calling_ae_is_rejected(pacs_and_node):
    _, node = pacs_and_node
    node.start()
    assert echoscu("127.0.0.1", node.dicom_port, called_ae=NODE_AE, calling_ae="ECHOSCU").ok
    rejected = echoscu("127.0.0.1", node.dicom_port, called_ae=NODE_AE, calling_ae="INTRUDER")
    assert not rejected.ok
    assert rejected.association_rejected, rejected.output


def test_corrupt_instance_gets_an_error_and_the_study_still_completes(pacs_and_node, demo, tmp_path):
    orthanc, node = pacs_and_node
    node.start()
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    # A well-formed file (storescu sends it) whose pixel data holds half the pixels its header promises.
    victim = pydicom.dcmread(sorted(demo.ct_dir.iterdir())[0])
    victim.SOPInstanceUID = victim.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    victim.PixelData = victim.PixelData[: len(victim.PixelData) // 2]
    victim.save_as(corrupt_dir / "corrupt.dcm")
    bad = storescu("127.0.0.1", node.dicom_port, [corrupt_dir], called_ae=NODE_AE)
    assert "Received Store Response (Error: CannotUnderstand)" in bad.output, bad.output

    good = storescu("127.0.0.1", node.dicom_port, [demo.ct_dir, demo.seg_path], called_ae=NODE_AE)
    assert good.ok, good.output
    node.drop_clinical_record(DEMO_CLINICAL)
    study_uid = DEMO_CLINICAL["study_instance_uid"]
    wait_for(lambda: (s := node.study(study_uid)) and s["state"] == "delivered", 120, "delivery", node)
    assert len(sr_instances_in_pacs(orthanc)) == SR_DOCUMENTS_PER_STUDY
