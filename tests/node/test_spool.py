"""The durable spool on real SQLite and real files under tmp_path.

The builders at the top (`ct_instance`, `seg_instance`, `StudyBuilder`) make
real Part-10 files with pydicom; `test_study_machine.py` imports them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from sclc_risk_node.node.durable_files import TEMP_SUFFIX, place_file_atomically
from sclc_risk_node.node.errors import InvalidTransition, NotPart10, SpoolBusy, SpoolFull, UnsafeUid
from sclc_risk_node.node.records import SEGMENTATION_STORAGE, InstanceHeader, StoreOutcome
from sclc_risk_node.node.retention import remove_study_files, studies_due_for_cleanup
from sclc_risk_node.node.spool import Spool, free_bytes
from sclc_risk_node.node.states import OutboxState, StudyEvent, StudyState
from sclc_risk_node.node.study_machine import StudyMachine

REPO_ROOT = Path(__file__).resolve().parents[2]
#: 2026-01-01T00:00:00Z; every test drives the clock from here.
T0 = 1_767_225_600.0
UID_ROOT = "1.2.826.0.1.3680043.10.999"

# --- builders ------------------------------------------------------------------------


def part10_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _base_dataset(sop_class_uid: str, study_uid: str, series_uid: str, sop_uid: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    return ds


def ct_instance(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    accession: str | None = "ACC-1",
    patient_id: str = "PAT-1",
    frame_of_reference_uid: str = f"{UID_ROOT}.900",
    payload_bytes: int = 512,
) -> tuple[bytes, InstanceHeader]:
    """A small CT instance (a pixel-less header plus ``payload_bytes`` of private data)."""
    ds = _base_dataset(CTImageStorage, study_uid, series_uid, sop_uid, "CT")
    ds.PatientID = patient_id
    if accession is not None:
        ds.AccessionNumber = accession
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.add_new(0x00091010, "LO", "sclc-test")  # private creator
    ds.add_new(0x00091011, "OB", os.urandom(payload_bytes))
    data = part10_bytes(ds)
    return data, InstanceHeader.from_dataset(pydicom.dcmread(io.BytesIO(data)))


def seg_instance(
    study_uid: str,
    sop_uid: str,
    *,
    referenced_sop_uids: tuple[str, ...] = (),
    referenced_series_uid: str | None = None,
    frame_of_reference_uid: str | None = f"{UID_ROOT}.900",
    accession: str | None = "ACC-1",
    patient_id: str = "PAT-1",
) -> tuple[bytes, InstanceHeader]:
    ds = _base_dataset(SEGMENTATION_STORAGE, study_uid, f"{sop_uid}.1", sop_uid, "SEG")
    ds.PatientID = patient_id
    if accession is not None:
        ds.AccessionNumber = accession
    if frame_of_reference_uid:
        ds.FrameOfReferenceUID = frame_of_reference_uid
    if referenced_series_uid:
        item = Dataset()
        item.SeriesInstanceUID = referenced_series_uid
        if referenced_sop_uids:
            refs = []
            for uid in referenced_sop_uids:
                ref = Dataset()
                ref.ReferencedSOPClassUID = CTImageStorage
                ref.ReferencedSOPInstanceUID = uid
                refs.append(ref)
            item.ReferencedInstanceSequence = refs
        ds.ReferencedSeriesSequence = [item]
    data = part10_bytes(ds)
    return data, InstanceHeader.from_dataset(pydicom.dcmread(io.BytesIO(data)))


@dataclass
class StudyBuilder:
    """A study of ``ct_count`` CT instances and one SEG referencing all of them."""

    number: int
    ct_count: int = 3
    accession: str | None = None
    patient_id: str = "PAT-1"
    study_uid: str = field(init=False)
    series_uid: str = field(init=False)
    ct_uids: tuple[str, ...] = field(init=False)
    seg_uid: str = field(init=False)

    def __post_init__(self) -> None:
        self.study_uid = f"{UID_ROOT}.{self.number}"
        self.series_uid = f"{self.study_uid}.1"
        self.ct_uids = tuple(f"{self.series_uid}.{k}" for k in range(1, self.ct_count + 1))
        self.seg_uid = f"{self.study_uid}.2.1"
        if self.accession is None:
            self.accession = f"ACC-{self.number}"

    def ct(self, k: int) -> tuple[bytes, InstanceHeader]:
        return ct_instance(
            self.study_uid, self.series_uid, self.ct_uids[k], accession=self.accession, patient_id=self.patient_id
        )

    def seg(self) -> tuple[bytes, InstanceHeader]:
        return seg_instance(
            self.study_uid,
            self.seg_uid,
            referenced_sop_uids=self.ct_uids,
            referenced_series_uid=self.series_uid,
            accession=self.accession,
            patient_id=self.patient_id,
        )

    def store_all(self, spool: Spool, *, now: float) -> None:
        for k in range(self.ct_count):
            StudyMachine(spool).store_instance(*self.ct(k), now=now)
        StudyMachine(spool).store_instance(*self.seg(), now=now)

    def clinical(self, spool: Spool, *, now: float, **overrides) -> None:
        keys = dict(accession_number=self.accession, patient_id=self.patient_id, study_instance_uid=self.study_uid)
        keys.update(overrides)
        StudyMachine(spool).add_clinical_record(json.dumps({"ecog": 1, "t_stage": "T2"}), now=now, **keys)


def open_spool(path: Path, **kwargs) -> Spool:
    kwargs.setdefault("min_free_bytes", 0)
    return Spool.open(path, **kwargs)


@pytest.fixture
def spool(tmp_path):
    with open_spool(tmp_path / "spool") as opened:
        yield opened


def spooled_files(spool: Spool) -> set[str]:
    return {
        p.relative_to(spool.directory).as_posix() for p in (spool.directory / "instances").rglob("*") if p.is_file()
    }


# --- opening ------------------------------------------------------------------------


def test_open_uses_wal_full_sync_and_schema_version(spool):
    connection = spool._connection()
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 2


def test_reopening_keeps_data(tmp_path):
    study = StudyBuilder(1)
    with open_spool(tmp_path / "s") as first:
        study.store_all(first, now=T0)
    with open_spool(tmp_path / "s") as second:
        assert second.get_study(study.study_uid).instance_count == 4


def test_transaction_rolls_back_on_error(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    with pytest.raises(RuntimeError):
        with spool.transaction() as tx:
            tx.execute("mark_instances_purged", study_uid=study.study_uid, now=T0)
            raise RuntimeError("boom")
    assert spool.get_study(study.study_uid).instance_count == 4


# --- storing ------------------------------------------------------------------------


def test_store_writes_the_received_bytes_at_the_uid_path_and_indexes_them(spool):
    data, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
    assert StudyMachine(spool).store_instance(data, header, now=T0) is StoreOutcome.STORED

    path = (
        spool.directory
        / "instances"
        / header.study_instance_uid
        / header.series_instance_uid
        / f"{header.sop_instance_uid}.dcm"
    )
    assert path.read_bytes() == data
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    [record] = spool.study_instances(header.study_instance_uid)
    assert record.path == path and record.sha256 == hashlib.sha256(data).hexdigest() and record.size_bytes == len(data)
    study = spool.get_study(header.study_instance_uid)
    assert study.state is StudyState.RECEIVING and study.created_at == study.last_instance_at == T0
    assert not list(spool.directory.rglob("*" + TEMP_SUFFIX))
    [event] = spool.study_events(header.study_instance_uid)
    assert (event.from_state, event.to_state, event.event) == (None, StudyState.RECEIVING, StudyEvent.INSTANCE_STORED)


def test_same_sop_same_bytes_is_a_duplicate_no_op(spool):
    data, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
    StudyMachine(spool).store_instance(data, header, now=T0)
    assert StudyMachine(spool).store_instance(data, header, now=T0 + 50) is StoreOutcome.DUPLICATE
    study = spool.get_study(header.study_instance_uid)
    assert study.instance_count == 1 and study.last_instance_at == T0  # a re-send does not restart the grace


def test_same_sop_different_bytes_keeps_the_first(spool):
    first, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
    second, _ = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
    assert first != second
    StudyMachine(spool).store_instance(first, header, now=T0)
    assert StudyMachine(spool).store_instance(second, header, now=T0 + 1) is StoreOutcome.DUPLICATE_KEPT_FIRST
    [record] = spool.study_instances(header.study_instance_uid)
    assert record.path.read_bytes() == first


def test_same_sop_under_another_study_keeps_the_first_and_leaves_no_file(spool):
    first, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.7")
    other, other_header = ct_instance(f"{UID_ROOT}.2", f"{UID_ROOT}.2.1", f"{UID_ROOT}.7")
    StudyMachine(spool).store_instance(first, header, now=T0)
    assert StudyMachine(spool).store_instance(other, other_header, now=T0) is StoreOutcome.DUPLICATE_KEPT_FIRST
    assert spool.get_study(f"{UID_ROOT}.2") is None
    assert spooled_files(spool) == {spool.instance_relative_path(header)}


@pytest.mark.parametrize(
    "bad_uid",
    ["../../etc/passwd", "1.2/3", "", "1.2.3.", ".1.2", "1..2", "1.2.3\x00/x", "1.2.a", "1" + ".1" * 40, " 1.2 3"],
)
def test_unsafe_uids_are_refused_before_any_path_is_built(bad_uid):
    with pytest.raises(UnsafeUid):
        InstanceHeader(
            study_instance_uid=f"{UID_ROOT}.1",
            series_instance_uid=bad_uid,
            sop_instance_uid=f"{UID_ROOT}.1.1",
            sop_class_uid=CTImageStorage,
            modality="CT",
        )


def test_uid_of_64_characters_is_accepted_and_65_is_not():
    uid64 = "1." + "2" * 62
    assert len(uid64) == 64
    header = InstanceHeader(uid64, uid64, uid64, CTImageStorage, "CT")
    assert header.sop_instance_uid == uid64
    with pytest.raises(UnsafeUid):
        InstanceHeader(uid64 + "3", uid64, uid64, CTImageStorage, "CT")


def test_bytes_without_part10_preamble_are_refused(spool):
    data, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
    with pytest.raises(NotPart10):
        StudyMachine(spool).store_instance(data[132:], header, now=T0)
    assert spool.get_study(header.study_instance_uid) is None


def test_spool_full_refuses_before_writing(tmp_path):
    assert free_bytes(tmp_path) > 0
    with open_spool(tmp_path / "s", min_free_bytes=free_bytes(tmp_path) * 1000) as full:
        data, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
        with pytest.raises(SpoolFull) as caught:
            StudyMachine(full).store_instance(data, header, now=T0)
        assert caught.value.retryable
        assert spooled_files(full) == set() and full.get_study(header.study_instance_uid) is None


def test_a_new_instance_reopens_a_waiting_study(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    StudyMachine(spool).apply(study.study_uid, StudyEvent.IMAGES_COMPLETE, now=T0 + 10)
    data, header = ct_instance(
        study.study_uid, f"{study.study_uid}.9", f"{study.study_uid}.9.1", accession=study.accession
    )
    StudyMachine(spool).store_instance(data, header, now=T0 + 20)
    record = spool.get_study(study.study_uid)
    assert record.state is StudyState.RECEIVING and record.last_instance_at == T0 + 20
    assert spool.study_events(study.study_uid)[-1].event is StudyEvent.INSTANCE_STORED


def test_an_instance_after_scoring_started_is_stored_without_a_transition(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    study.clinical(spool, now=T0)
    machine = StudyMachine(spool)
    machine.apply(study.study_uid, StudyEvent.IMAGES_COMPLETE, now=T0 + 10)
    machine.claim(study.study_uid, worker_id="w1", now=T0 + 11, lease_s=60)
    data, header = ct_instance(study.study_uid, study.series_uid, f"{study.series_uid}.99", accession=study.accession)
    assert StudyMachine(spool).store_instance(data, header, now=T0 + 12) is StoreOutcome.STORED
    assert spool.get_study(study.study_uid).state is StudyState.SCORING


def test_a_locked_database_is_reported_as_retryable_and_the_file_is_recovered_later(tmp_path):
    directory = tmp_path / "spool"
    with open_spool(directory) as holder, open_spool(directory, busy_timeout_s=0.1) as receiver:
        data, header = ct_instance(f"{UID_ROOT}.1", f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.1.1")
        with holder.transaction():  # another process holding the write lock too long
            with pytest.raises(SpoolBusy) as caught:
                StudyMachine(receiver).store_instance(data, header, now=T0)
        assert caught.value.retryable and receiver.get_study(header.study_instance_uid) is None
        # Not acknowledged, so the PACS sends it again; or the next start indexes the file.
        assert StudyMachine(receiver).recover(now=T0 + 1).reindexed_sop_instance_uids == (header.sop_instance_uid,)


# --- headers ------------------------------------------------------------------------


def test_header_from_a_real_highdicom_seg_lists_the_ct_it_was_drawn_on(tmp_path):
    import numpy as np

    from sclc_risk_node.dicom_io.synthetic import (
        SyntheticPatient,
        build_tumour_seg,
        ct_datasets_from_image,
        synthetic_chest_phantom,
    )

    image, mask = synthetic_chest_phantom(size=(16, 16, 4), spacing_mm=(2.0, 2.0, 3.0), tumour_radii_mm=(8.0, 8.0, 6.0))
    cts = ct_datasets_from_image(image, SyntheticPatient())
    seg = build_tumour_seg(cts, mask)
    assert int(np.count_nonzero(seg.pixel_array)) > 0
    header = InstanceHeader.from_dataset(pydicom.dcmread(io.BytesIO(part10_bytes(seg))))
    assert header.is_segmentation and header.modality == "SEG"
    assert set(header.referenced_sop_instance_uids) == {str(ds.SOPInstanceUID) for ds in cts}
    assert header.referenced_series_instance_uids == (str(cts[0].SeriesInstanceUID),)
    assert header.frame_of_reference_uid == str(cts[0].FrameOfReferenceUID)
    assert header.accession_number == "SYNACC0001"
    assert "SYNTH-0001" not in repr(header)  # patient ID never shows in logs or tracebacks


# --- crash recovery -----------------------------------------------------------------


def test_recover_indexes_a_file_renamed_but_never_committed(spool):
    """The crash point between rename and commit: a complete file, no row."""
    study = StudyBuilder(1)
    StudyMachine(spool).store_instance(*study.ct(0), now=T0)
    data, header = study.ct(1)
    place_file_atomically(spool.path_of(spool.instance_relative_path(header)), data, root=spool.directory)
    assert {r.sop_instance_uid for r in spool.study_instances(study.study_uid)} == {study.ct_uids[0]}

    report = StudyMachine(spool).recover(now=T0 + 5)

    assert report.reindexed_sop_instance_uids == (study.ct_uids[1],)
    assert {r.sop_instance_uid for r in spool.study_instances(study.study_uid)} == set(study.ct_uids[:2])
    assert StudyMachine(spool).store_instance(data, header, now=T0 + 6) is StoreOutcome.DUPLICATE


def test_recover_indexes_an_orphan_of_an_unknown_study_and_creates_it(spool):
    study = StudyBuilder(2)
    data, header = study.seg()
    place_file_atomically(spool.path_of(spool.instance_relative_path(header)), data, root=spool.directory)
    StudyMachine(spool).recover(now=T0)
    record = spool.get_study(study.study_uid)
    assert record.state is StudyState.RECEIVING and record.instance_count == 1
    [seg] = spool.study_instances(study.study_uid)
    assert seg.referenced_sop_instance_uids == study.ct_uids


def test_recover_removes_temp_files_and_quarantines_unreadable_files(spool):
    study = StudyBuilder(1)
    StudyMachine(spool).store_instance(*study.ct(0), now=T0)
    series_dir = spool.directory / "instances" / study.study_uid / study.series_uid
    (series_dir / f".{study.ct_uids[1]}.dcm.abc{TEMP_SUFFIX}").write_bytes(b"half a file")
    (series_dir / f"{study.ct_uids[2]}.dcm").write_bytes(b"not dicom at all")

    report = StudyMachine(spool).recover(now=T0)

    assert report.temp_files_removed == 1 and len(report.quarantined) == 1
    assert report.quarantined[0].read_bytes() == b"not dicom at all"
    assert spooled_files(spool) == {spool.instance_relative_path(study.ct(0)[1])}
    assert report.missing_files == ()


def test_recover_reports_indexed_files_that_disappeared(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    [first, *_] = spool.study_instances(study.study_uid)
    first.path.unlink()
    assert StudyMachine(spool).recover(now=T0).missing_files == (first.sop_instance_uid,)


_STORE_LOOP = textwrap.dedent(
    """
    import io, os, sys
    from pathlib import Path
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from sclc_risk_node.node.logs import configure_logging
    from sclc_risk_node.node.records import InstanceHeader
    from sclc_risk_node.node.spool import Spool
    from sclc_risk_node.node.study_machine import StudyMachine

    configure_logging("WARNING", stream=sys.stderr)

    spool = Spool.open(Path(sys.argv[1]), min_free_bytes=0)
    prefix, study = sys.argv[2], sys.argv[3]
    for k in range(1, 100000):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"{prefix}.{k}"
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, study + ".1", "CT"
        ds.add_new(0x00091010, "LO", "sclc-test")
        ds.add_new(0x00091011, "OB", os.urandom(64 * 1024))
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        StudyMachine(spool).store_instance(buffer.getvalue(), InstanceHeader.from_dataset(ds), now=1.0e9 + k)
        print("ACK", ds.SOPInstanceUID, flush=True)  # printed only once store_instance returned
    """
)


def test_every_acknowledged_instance_survives_sigkill(tmp_path):
    directory = tmp_path / "spool"
    acknowledged: list[str] = []
    rng = random.Random(20260101)
    for round_number in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _STORE_LOOP, str(directory), f"{UID_ROOT}.5.{round_number}", f"{UID_ROOT}.5"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        kill_after = rng.randint(5, 40)
        lines = []
        while len(lines) < kill_after:
            line = child.stdout.readline()
            assert line, "the storing child exited early"
            lines.append(line)
        child.send_signal(signal.SIGKILL)
        lines += child.stdout.read().splitlines()
        acknowledged += [line.split()[1] for line in lines if line.startswith("ACK ")]
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL

        with open_spool(directory) as spool:
            report = StudyMachine(spool).recover(now=2.0e9)
            assert report.quarantined == () and report.missing_files == ()
            indexed = {r.sop_instance_uid: r for r in spool.study_instances(f"{UID_ROOT}.5")}
            assert set(acknowledged) <= set(indexed)
            for uid in acknowledged:
                assert hashlib.sha256(indexed[uid].path.read_bytes()).hexdigest() == indexed[uid].sha256
            # Nothing half-written anywhere, and every file on disk is indexed.
            assert not list(directory.rglob("*" + TEMP_SUFFIX))
            assert spooled_files(spool) == {r.path.relative_to(directory).as_posix() for r in indexed.values()}


# --- clinical records ----------------------------------------------------------------


def test_clinical_record_before_the_images_attaches_when_the_study_arrives(spool):
    study = StudyBuilder(1)
    study.clinical(spool, now=T0)
    study.store_all(spool, now=T0 + 1)
    record = spool.clinical_record_for(study.study_uid)
    assert record is not None and json.loads(record.record_json)["ecog"] == 1


def test_clinical_record_after_the_images_moves_a_waiting_study_to_ready(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    StudyMachine(spool).apply(study.study_uid, StudyEvent.IMAGES_COMPLETE, now=T0 + 10)
    study.clinical(spool, now=T0 + 20)
    assert spool.get_study(study.study_uid).state is StudyState.READY
    assert spool.study_events(study.study_uid)[-1].event is StudyEvent.CLINICAL_ATTACHED


def test_clinical_match_falls_back_to_patient_and_study_uid_when_accession_is_absent(spool):
    study = StudyBuilder(1)
    study.accession = None
    ct_data, ct_header = ct_instance(study.study_uid, study.series_uid, study.ct_uids[0], accession=None)
    StudyMachine(spool).store_instance(ct_data, ct_header, now=T0)
    study.clinical(spool, now=T0, accession_number="SOMETHING-ELSE", patient_id="PAT-2")
    assert spool.clinical_record_for(study.study_uid) is None  # wrong patient
    study.clinical(spool, now=T0, accession_number="SOMETHING-ELSE")
    assert spool.clinical_record_for(study.study_uid) is not None


def test_clinical_record_attaches_when_a_later_instance_brings_the_accession_number(spool):
    study = StudyBuilder(1)
    first, header = ct_instance(study.study_uid, study.series_uid, study.ct_uids[0], accession=None)
    StudyMachine(spool).store_instance(first, header, now=T0)
    study.clinical(spool, now=T0, patient_id=None, study_instance_uid=None)  # keyed by accession only
    assert spool.clinical_record_for(study.study_uid) is None
    StudyMachine(spool).store_instance(*study.ct(1), now=T0 + 1)
    assert spool.clinical_record_for(study.study_uid) is not None
    assert StudyMachine(spool).attach_clinical_records(now=T0 + 2) == []  # the sweep finds nothing left to do


def test_clinical_records_with_a_different_accession_do_not_match(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    study.clinical(spool, now=T0, accession_number="ACC-OTHER")  # same patient and study UID, but accession differs
    assert spool.clinical_record_for(study.study_uid) is None


def test_the_newest_clinical_record_wins_until_scoring(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    StudyMachine(spool).add_clinical_record(
        '{"ecog": 1}', accession_number=study.accession, patient_id=None, study_instance_uid=None, now=T0
    )
    StudyMachine(spool).add_clinical_record(
        '{"ecog": 2}', accession_number=study.accession, patient_id=None, study_instance_uid=None, now=T0
    )
    assert json.loads(spool.clinical_record_for(study.study_uid).record_json) == {"ecog": 2}


def test_clinical_record_needs_match_keys_and_a_json_object(spool):
    with pytest.raises(ValueError, match="accession number"):
        StudyMachine(spool).add_clinical_record(
            "{}", accession_number=None, patient_id="P", study_instance_uid=None, now=T0
        )
    with pytest.raises(ValueError, match="JSON object"):
        StudyMachine(spool).add_clinical_record(
            "[1]", accession_number="A", patient_id=None, study_instance_uid=None, now=T0
        )


# --- outbox --------------------------------------------------------------------------


def scored_study(
    spool: Spool, number: int, destinations=("pacs-a", "pacs-b"), *, now: float = T0
) -> tuple[StudyBuilder, str]:
    study = StudyBuilder(number)
    study.store_all(spool, now=now)
    study.clinical(spool, now=now)
    machine = StudyMachine(spool)
    machine.apply(study.study_uid, StudyEvent.IMAGES_COMPLETE, now=now + 10)
    machine.claim(study.study_uid, worker_id="w1", now=now + 11, lease_s=600)
    sr_uid = f"{study.study_uid}.3.1"
    sr_bytes, _ = ct_instance(study.study_uid, f"{study.study_uid}.3", sr_uid)
    machine.record_scored(
        study.study_uid,
        worker_id="w1",
        sr_sop_instance_uid=sr_uid,
        sr_bytes=sr_bytes,
        destinations=destinations,
        now=now + 20,
    )
    return study, sr_uid


def test_scored_study_has_one_pending_delivery_per_destination(spool):
    study, sr_uid = scored_study(spool, 1)
    items = spool.study_deliveries(study.study_uid)
    assert [(i.destination, i.state, i.attempts) for i in items] == [
        ("pacs-a", OutboxState.PENDING, 0),
        ("pacs-b", OutboxState.PENDING, 0),
    ]
    assert items[0].sr_path.is_file() and items[0].sr_path.name == f"{sr_uid}.dcm"
    assert spool.outbox_depth() == 2


def test_enqueuing_the_same_sr_again_creates_nothing_new(spool):
    study, sr_uid = scored_study(spool, 1)
    first_bytes = spool.study_deliveries(study.study_uid)[0].sr_path.read_bytes()
    other_bytes, _ = ct_instance(study.study_uid, f"{study.study_uid}.3", sr_uid)
    items = spool.enqueue_sr(study.study_uid, sr_uid, other_bytes, ["pacs-a", "pacs-b"], now=T0 + 30)
    assert len(items) == 2
    assert items[0].sr_path.read_bytes() == first_bytes  # the first SR stays: one UID, one object
    with spool.transaction(write=False) as tx:
        assert len(tx.all("study_sr_files", study_uid=study.study_uid)) == 1


def test_study_is_delivered_only_when_every_destination_accepted(spool):
    study, _ = scored_study(spool, 1)
    first, second = spool.due_deliveries(now=T0 + 30)
    spool.start_delivery(first.item_id, now=T0 + 30, hold_s=60)
    assert StudyMachine(spool).mark_delivered(first.item_id, now=T0 + 31) is None
    assert spool.get_study(study.study_uid).state is StudyState.SCORED
    transition = StudyMachine(spool).mark_delivered(second.item_id, now=T0 + 32)
    assert transition.to_state is StudyState.DELIVERED
    assert spool.get_study(study.study_uid).state is StudyState.DELIVERED and spool.outbox_depth() == 0


def test_a_delivery_taken_by_one_sender_is_not_due_for_another_until_its_hold_ends(spool):
    scored_study(spool, 1, destinations=("pacs-a",))
    [item] = spool.due_deliveries(now=T0 + 30)
    spool.start_delivery(item.item_id, now=T0 + 30, hold_s=60)
    assert spool.due_deliveries(now=T0 + 31) == []
    with pytest.raises(InvalidTransition):
        spool.start_delivery(item.item_id, now=T0 + 31, hold_s=60)
    # the sender was killed mid-send: once the hold ends it is due again (same SR UID, sent at least once)
    assert [i.item_id for i in spool.due_deliveries(now=T0 + 90)] == [item.item_id]


def test_failed_attempts_back_off_then_give_up_and_fail_the_study(spool):
    study, _ = scored_study(spool, 1, destinations=("pacs-a",))
    [item] = spool.due_deliveries(now=T0 + 30)
    after = StudyMachine(spool).mark_attempt_failed(
        item.item_id, now=T0 + 30, error="association rejected", backoff_s=60, max_attempts=2
    )
    assert (after.state, after.attempts, after.next_attempt_at) == (OutboxState.PENDING, 1, T0 + 90)
    assert spool.due_deliveries(now=T0 + 89) == []
    StudyMachine(spool).mark_attempt_failed(
        item.item_id, now=T0 + 90, error="association rejected", backoff_s=120, max_attempts=2
    )
    record = spool.get_study(study.study_uid)
    assert record.state is StudyState.FAILED
    assert record.failure_reason == "SR delivery to pacs-a gave up after 2 attempts: association rejected"
    assert spool.due_deliveries(now=T0 + 10_000) == []


def test_max_attempts_zero_retries_forever(spool):
    study, _ = scored_study(spool, 1, destinations=("pacs-a",))
    [item] = spool.due_deliveries(now=T0 + 30)
    for attempt in range(10):
        StudyMachine(spool).mark_attempt_failed(
            item.item_id, now=T0 + 30 + attempt, error="down", backoff_s=1, max_attempts=0
        )
    assert spool.study_deliveries(study.study_uid)[0].attempts == 10
    assert spool.get_study(study.study_uid).state is StudyState.SCORED


# --- reading ---------------------------------------------------------------------------


def test_counts_by_state_lists_every_state(spool):
    StudyBuilder(1).store_all(spool, now=T0)
    scored_study(spool, 2)
    counts = spool.counts_by_state()
    assert set(counts) == set(StudyState)
    assert counts[StudyState.RECEIVING] == 1 and counts[StudyState.SCORED] == 1 and sum(counts.values()) == 2


def test_list_studies_filters_by_state_and_shows_reasons(spool):
    StudyBuilder(1).store_all(spool, now=T0)
    expired = StudyBuilder(2)
    expired.store_all(spool, now=T0 + 1)
    StudyMachine(spool).apply(expired.study_uid, StudyEvent.EXPIRED, now=T0 + 5, reason="no clinical record")
    [only] = spool.list_studies(states={StudyState.EXPIRED})
    assert only.study_instance_uid == expired.study_uid and only.failure_reason == "no clinical record"
    assert only.age_s(T0 + 11) == 10
    assert [s.study_instance_uid for s in spool.list_studies()] == [expired.study_uid, StudyBuilder(1).study_uid]


# --- retention -------------------------------------------------------------------------


def test_retention_removes_files_but_keeps_rows_state_and_history(spool):
    delivered, _ = scored_study(spool, 1, destinations=("pacs-a",))
    [item] = spool.due_deliveries(now=T0 + 30)
    StudyMachine(spool).mark_delivered(item.item_id, now=T0 + 30)
    StudyBuilder(2).store_all(spool, now=T0)  # still receiving: never due

    assert studies_due_for_cleanup(spool, now=T0 + 100, retention_s=100) == []
    [due] = studies_due_for_cleanup(spool, now=T0 + 130, retention_s=100)
    assert due.study_instance_uid == delivered.study_uid

    history = spool.study_events(delivered.study_uid)
    assert remove_study_files(spool, delivered.study_uid, now=T0 + 130) == 5  # 3 CT + SEG + SR
    record = spool.get_study(delivered.study_uid)
    assert record.state is StudyState.DELIVERED and record.purged_at == T0 + 130 and record.instance_count == 0
    assert spool.study_events(delivered.study_uid) == history
    assert not (spool.directory / "instances" / delivered.study_uid).exists()
    assert not (spool.directory / "sr" / delivered.study_uid).exists()
    assert (spool.directory / "instances").is_dir() and (spool.directory / "sr").is_dir()
    assert len(spool.study_instances(delivered.study_uid, include_purged=True)) == 4
    assert studies_due_for_cleanup(spool, now=T0 + 1000, retention_s=100) == []
    with pytest.raises(InvalidTransition, match="already purged"):
        remove_study_files(spool, delivered.study_uid, now=T0 + 131)
    with pytest.raises(InvalidTransition, match="not finished"):
        remove_study_files(spool, StudyBuilder(2).study_uid, now=T0 + 131)


def test_an_expired_purged_study_sent_again_is_stored_again(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    StudyMachine(spool).apply(study.study_uid, StudyEvent.EXPIRED, now=T0 + 10, reason="no clinical record")
    remove_study_files(spool, study.study_uid, now=T0 + 20)

    data, header = study.ct(0)
    assert StudyMachine(spool).store_instance(data, header, now=T0 + 30) is StoreOutcome.STORED
    record = spool.get_study(study.study_uid)
    assert record.state is StudyState.RECEIVING and record.purged_at is None and record.instance_count == 1
    assert spool.path_of(spool.instance_relative_path(header)).read_bytes() == data


def test_recover_finishes_a_purge_interrupted_after_its_commit(spool):
    study = StudyBuilder(1)
    study.store_all(spool, now=T0)
    StudyMachine(spool).apply(study.study_uid, StudyEvent.EXPIRED, now=T0 + 10, reason="no clinical record")
    files_before = spooled_files(spool)
    with spool.transaction() as tx:  # the purge's transaction, then "crash" before deleting files
        tx.execute("mark_study_purged", study_uid=study.study_uid, states='["expired"]', now=T0 + 20)
        tx.execute("mark_instances_purged", study_uid=study.study_uid, now=T0 + 20)
    assert spooled_files(spool) == files_before
    assert StudyMachine(spool).recover(now=T0 + 30).purges_finished == 4
    assert spooled_files(spool) == set()


# --- logging -------------------------------------------------------------------------


def test_no_log_line_carries_the_patient_id(spool):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        study, _ = scored_study(spool, 1)
        data, header = study.ct(0)
        StudyMachine(spool).store_instance(data, header, now=T0 + 40)
        StudyMachine(spool).recover(now=T0 + 50)
    assert logs and any(entry["event"] == "study_transition" for entry in logs)
    assert "PAT-1" not in repr(logs)
