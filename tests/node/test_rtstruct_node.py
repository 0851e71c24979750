"""An RTSTRUCT in place of a SEG in the node: its references in the spool, completion, and input choice."""

from __future__ import annotations

import pydicom
import pytest

from sclc_risk_node.node.completion import assess_images, evaluate
from sclc_risk_node.node.config import CompletionConfig
from sclc_risk_node.node.demo_study import write_demo_study
from sclc_risk_node.node.records import InstanceHeader
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyEvent
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.node.worker import choose_inputs
from tests.rtstruct_builder import build_rtstruct, contours_from_mask, save

COMPLETION = CompletionConfig(grace_s=1.0, study_expiry_s=3600.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    study = write_demo_study(folder)
    ct = sorted((pydicom.dcmread(p) for p in study.ct_dir.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    seg = pydicom.dcmread(study.seg_path)
    from sclc_risk_node.dicom_io.ct_series import read_ct_series
    from sclc_risk_node.dicom_io.seg import read_tumour_segment

    mask = read_tumour_segment(study.seg_path, read_ct_series(study.ct_dir)).mask
    rtstruct = save(build_rtstruct(ct, contours_from_mask(mask)), folder / "rtstruct.dcm")
    return study, ct, seg, rtstruct


def store(spool, path, now):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    StudyMachine(spool).store_instance(path.read_bytes(), InstanceHeader.from_dataset(ds), now=now)


def test_rtstruct_header_lists_the_ct_instances_it_was_drawn_on(demo):
    study, ct, _, rtstruct = demo
    header = InstanceHeader.from_dataset(pydicom.dcmread(rtstruct))
    assert header.is_rtstruct and header.is_tumour_source and not header.is_segmentation
    assert header.modality == "RTSTRUCT"
    assert header.frame_of_reference_uid == ct[0].FrameOfReferenceUID
    assert header.referenced_series_instance_uids == (ct[0].SeriesInstanceUID,)
    assert set(header.referenced_sop_instance_uids) == {ds.SOPInstanceUID for ds in ct}


def test_completion_waits_for_every_ct_instance_the_rtstruct_references(demo, tmp_path):
    study, ct, _, rtstruct = demo
    with Spool.open(tmp_path / "spool", min_free_bytes=0) as spool:
        ct_paths = sorted(study.ct_dir.iterdir())
        for path in ct_paths[:-2]:
            store(spool, path, 1000.0)
        store(spool, rtstruct, 1000.0)
        uid = ct[0].StudyInstanceUID
        rt_uid = pydicom.dcmread(rtstruct).SOPInstanceUID
        satisfied, gaps = assess_images(spool.study_snapshot(uid))
        assert gaps == [f"RTSTRUCT {rt_uid} references {len(ct)} CT instances, 2 missing"]
        for path in ct_paths[-2:]:
            store(spool, path, 1001.0)
        decision = evaluate(spool.study_snapshot(uid), 1010.0, COMPLETION)
        assert decision.event is StudyEvent.IMAGES_COMPLETE
        assert decision.reason == f"RTSTRUCT {rt_uid}: all {len(ct)} referenced CT instances present"
        chosen, series_uid, folder = choose_inputs(spool.study_instances(uid))
        assert chosen.sop_instance_uid == rt_uid and series_uid == ct[0].SeriesInstanceUID
        assert folder == next(i.path.parent for i in spool.study_instances(uid) if i.modality == "CT")


def test_the_receiver_takes_an_rtstruct_and_refuses_a_truncated_one(demo):
    from sclc_risk_node.node.errors import NodeError
    from sclc_risk_node.node.scp import STORAGE_CLASSES, read_received_dataset

    _, _, _, rtstruct = demo
    encoded = rtstruct.read_bytes()
    assert read_received_dataset(encoded).Modality == "RTSTRUCT"
    assert STORAGE_CLASSES["1.2.840.10008.5.1.4.1.1.481.3"].modality == "RTSTRUCT"
    header_only = pydicom.dcmread(rtstruct)
    del header_only.ROIContourSequence
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    header_only.save_as(buffer, enforce_file_format=True)
    with pytest.raises(NodeError, match="RT Structure Set without ROIContourSequence items"):
        read_received_dataset(buffer.getvalue())
