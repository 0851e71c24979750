"""The cohort CSV: what it accepts, and every kind of problem it reports (all at once)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sclc_risk_node.research.cohort import CohortError, load_cohort, parse_cohort_csv
from sclc_risk_node.scoring.clinical import Lipi
from sclc_risk_node.scoring.errors import InputError

HEADER = "id,split,pfs_months,pfs_event,os_months,os_event,t_stage,n_stage,m_stage,ecog,lipi,anc,wbc,ldh,ldh_uln,age,sex,brain_metastases,liver_metastases,ct,seg"


def make_inputs(folder: Path, name: str) -> None:
    """A CT folder, a file with the DICOM preamble for the SEG, and NRRD-named files (only their kind is checked)."""
    (folder / name / "ct").mkdir(parents=True)
    (folder / name / "seg.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (folder / name / "ct.nrrd").write_bytes(b"NRRD0004\n")
    (folder / name / "labels.nii.gz").write_bytes(b"\0")


def write_csv(folder: Path, text: str, name: str = "cohort.csv") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def problems_of(path: Path) -> tuple[str, ...]:
    with pytest.raises(CohortError) as caught:
        load_cohort(path)
    assert isinstance(caught.value, InputError)
    return caught.value.problems


def test_a_valid_cohort_is_read_with_every_kind_of_row(tmp_path):
    for name in ("p1", "p2", "p3"):
        make_inputs(tmp_path, name)
    absolute_ct = tmp_path / "p3" / "ct.nrrd"
    path = write_csv(
        tmp_path,
        f"""
        {HEADER},tumour.original_firstorder_Mean,ring.wavelet-LLH_glcm_Correlation
        A-1,train,7.5,1,12.0,0,T4,N3,M1c,1,poor,,,,,63,male,yes,no,p1/ct,p1/seg.dcm,,
        A-2,Train,3.25,true,,,t2,n1,M1a,0,,7.0,9.0,260,250,,,,,p2/ct,p2/labels.nii.gz,,
        A-3,validation_1,12,0,13,1,T3,N2,M0,2,good,,,,,,F,,,{absolute_ct},p3/labels.nii.gz,,
        A-4,validation_2,1.5,FALSE,,,T1a,N0,M1b,0,intermediate,,,,,,,,,,,12.5,nan
        A-5,control,5.9,1,8.0,1,T4,N2,M1b,1,1,,,,,,,no,true,p1/ct,p1/seg.dcm,,
    """,
    )
    cohort = load_cohort(path)

    assert cohort.ids == ("A-1", "A-2", "A-3", "A-4", "A-5")
    assert cohort.splits == ("train", "validation_1", "validation_2", "control")
    assert cohort.validation_splits == ("validation_1", "validation_2")
    assert [p.id for p in cohort.in_split("train")] == ["A-1", "A-2"]
    assert cohort.feature_columns == ("tumour.original_firstorder_Mean", "ring.wavelet-LLH_glcm_Correlation")

    first, second, third, fourth, fifth = cohort.patients
    assert (first.pfs_months, first.pfs_event, first.os_months, first.os_event) == (7.5, True, 12.0, False)
    assert first.row == 2 and fifth.row == 6
    assert first.clinical.patient_id == "A-1"  # the id stands in for the missing identifier
    assert first.clinical.lipi is Lipi.POOR and first.clinical.sex == "M" and first.clinical.brain_metastases is True
    assert first.images.ct == (tmp_path / "p1" / "ct").resolve() and first.images.ct_is_dicom
    assert first.images.seg_is_dicom and first.features is None
    assert second.split == "train" and second.pfs_event is True and second.os_months is None
    assert second.clinical.lipi is Lipi.POOR and second.clinical.lipi_source == "labs"
    assert not second.images.seg_is_dicom
    assert third.images.ct == absolute_ct.resolve() and not third.images.ct_is_dicom
    assert third.clinical.m_stage == "M0" and third.clinical.ecog == 2
    assert fourth.images is None and fourth.pfs_event is False
    assert fourth.features["tumour.original_firstorder_Mean"] == 12.5
    assert fourth.features["ring.wavelet-LLH_glcm_Correlation"] != fourth.features["ring.wavelet-LLH_glcm_Correlation"]
    assert fifth.clinical.liver_metastases is True

    frame = cohort.outcomes_frame()
    assert list(frame.index) == list(cohort.ids)
    assert frame.loc["A-1", "overall_stage"] == "IV" and frame.loc["A-3", "overall_stage"] == "III"
    assert frame.loc["A-1", "lipi"] == 2 and bool(frame.loc["A-5", "pfs_event"]) is True
    assert "A-1" not in repr(first)


def test_a_given_identifier_is_kept_and_the_id_is_not_forced_on_it(tmp_path):
    make_inputs(tmp_path, "p1")
    path = write_csv(
        tmp_path,
        """
        id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,accession_number,ct,seg
        R1,train,4,1,T4,N3,M1c,1,good,ACC77,p1/ct,p1/seg.dcm
    """,
    )
    record = load_cohort(path).patients[0].clinical
    assert record.accession_number == "ACC77" and record.patient_id is None


def test_every_bad_value_is_reported_at_once_with_row_column_value_and_what_is_allowed(tmp_path):
    make_inputs(tmp_path, "p1")
    (tmp_path / "p1" / "notes.txt").write_text("not an image")
    (tmp_path / "p1" / "plain.dcm").write_bytes(b"no preamble")
    path = write_csv(
        tmp_path,
        f"""
        {HEADER},tumour.original_firstorder_Mean
        ,train,5,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,
        SECRET-ID-9,train,5,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,
        SECRET-ID-9,test,-2,2,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,
        B4,validation-1,abc,,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,
        B5,train,inf,yes,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,
        B6,train,9,1,6,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,
        B7,train,9,1,,,T9,N3,M0,7,,,,,,,,yes,,p1/ct,p1/seg.dcm,
        B8,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/missing,p1/seg.dcm,
        B9,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/notes.txt,p1/ct,
        B10,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/plain.dcm,
        B11,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct.nrrd,p1/seg.dcm,
        B12,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,p1/seg.dcm,3.5
        B13,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,,,
        B14,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,,,many
        B15,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,p1/ct,,
        B16,train,9
        B17,train,9,1,,,T4,N3,M1c,1,good,,,,,,,,,,,inf
    """,
    )
    problems = problems_of(path)
    expected = [
        "row 2: id: missing (allowed: a non-empty text, unique in the file)",
        "row 4: id: (value withheld) is the id of row 3 too (allowed: each id once)",
        "row 4: split: 'test' is not a split name (allowed: train, validation, validation_<name>",
        "row 4: pfs_months: '-2' is not allowed (allowed: a number of months > 0)",
        "row 4: pfs_event: '2' is not an event indicator (allowed: 1, 0, true, false)",
        "row 5: split: 'validation-1' is not a split name",
        "row 5: pfs_months: 'abc' is not a number (allowed: a number of months > 0)",
        "row 5: pfs_event: missing (allowed: 1, 0, true, false)",
        "row 6: pfs_months: 'inf' is not allowed (allowed: a number of months > 0)",
        "row 6: pfs_event: 'yes' is not an event indicator",
        "row 7: os_event: missing (allowed: 1, 0, true, false)",
        "row 7: os_months: '6' is shorter than pfs_months '9' (allowed: os_months >= pfs_months",
        "row 8: t_stage: 'T9' is not an AJCC 8th-edition T stage",
        "row 8: ecog: '7' is out of range (allowed: integer 0-4)",
        "row 8: lipi: missing",
        "row 8: brain_metastases",
        "row 9: ct: 'p1/missing' does not exist (allowed: a folder of DICOM CT files, or an image file",
        "row 10: ct: 'p1/notes.txt' is neither a folder nor an image file",
        "row 10: seg: 'p1/ct' is a folder (allowed: a DICOM SEG file, or a label image",
        "row 11: seg: 'p1/plain.dcm' is not a DICOM file (no DICM preamble)",
        "row 12: seg: 'p1/seg.dcm' is a DICOM SEG but ct 'p1/ct.nrrd' is an image file",
        "row 13: ct, seg and feature columns: both images and precomputed features given",
        "row 14: ct, seg: missing (allowed: ct and seg paths, or a number in every feature column)",
        "row 15: tumour.original_firstorder_Mean: 'many' is not a number (allowed: a finite number, or nan)",
        "row 16: seg: missing (allowed: a DICOM SEG file, or a label image",
        "row 17: has 3 cells but the header has 22 columns",
        "row 18: tumour.original_firstorder_Mean: 'inf' is not a number",
    ]
    for fragment in expected:
        assert any(fragment in problem for problem in problems), f"{fragment!r} not in {problems}"
    assert all(problem.startswith("row ") for problem in problems)
    assert not any(problem.startswith("row 2: identifier") for problem in problems)  # said once, as the id
    assert not any("SECRET-ID-9" in problem for problem in problems)


def test_a_row_with_some_feature_columns_empty_is_refused(tmp_path):
    path = write_csv(
        tmp_path,
        """
        id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,tumour.original_firstorder_Mean,ring.original_firstorder_Mean
        F1,train,4,1,T4,N3,M1c,1,good,1.5,
    """,
    )
    (problem,) = problems_of(path)
    assert problem.startswith("row 2: feature columns: 1 of 2 empty (ring.original_firstorder_Mean)")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg,ecgo",
            "header: 'ecgo': unknown column (allowed: id, split, pfs_months",
        ),
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg,SPLIT",
            "header: column 'split' appears twice",
        ),
        (
            "id,split,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg",
            "header: column pfs_months is missing (required: id, split, pfs_months",
        ),
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,ct,seg",
            "header: neither lipi nor all of anc, wbc, ldh, ldh_uln",
        ),
        ("id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct", "header: column ct without column seg"),
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi",
            "header: no image columns (ct, seg) and no feature columns",
        ),
        (
            "id,split,pfs_months,pfs_event,os_months,t_stage,n_stage,m_stage,ecog,lipi,ct,seg",
            "header: os_months and os_event come together",
        ),
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,lung.original_firstorder_Mean",
            "header: 'lung.original_firstorder_Mean': not a feature name",
        ),
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,tumour.Mean",
            "header: 'tumour.Mean': not a feature name",
        ),
        ("id;split;pfs_months;pfs_event", "header: looks semicolon-separated"),
        ("id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,,ct,seg", "header: column 10 has no name"),
    ],
)
def test_header_problems_are_named(tmp_path, header, fragment):
    path = write_csv(tmp_path, header + "\nX,train,1,1,T4,N3,M1c,1,good\n")
    problems = problems_of(path)
    assert any(fragment in problem for problem in problems), problems


def test_a_cohort_needs_a_train_split(tmp_path):
    make_inputs(tmp_path, "p1")
    path = write_csv(
        tmp_path,
        """
        id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg
        V1,validation,4,1,T4,N3,M1c,1,good,p1/ct,p1/seg.dcm
        C1,control,4,1,T4,N3,M1c,1,good,p1/ct,p1/seg.dcm
    """,
    )
    assert problems_of(path) == (
        "split: no row is in the train split (present: control, validation; allowed: at least one train row)",
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "csv: empty"),
        ("\n\n", "csv: empty"),
        (
            "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg\n",
            "csv: a header but no patient rows",
        ),
        ('id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg\n"X"y,train\n', "csv: not valid CSV"),
    ],
)
def test_files_that_are_not_a_cohort_are_refused(tmp_path, text, fragment):
    path = tmp_path / "cohort.csv"
    path.write_text(text, encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.startswith(fragment)


def test_a_missing_or_binary_file_is_refused(tmp_path):
    (problem,) = problems_of(tmp_path / "nowhere.csv")
    assert "does not exist" in problem
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00id")
    (problem,) = problems_of(binary)
    assert "is not UTF-8 text" in problem


def test_the_message_lists_every_problem_in_one_line(tmp_path):
    make_inputs(tmp_path, "p1")
    path = write_csv(
        tmp_path,
        """
        id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg
        M1,train,0,1,T4,N3,M1c,1,good,p1/ct,p1/seg.dcm
        M2,train,4,x,T4,N3,M1c,1,good,p1/ct,p1/seg.dcm
    """,
    )
    with pytest.raises(CohortError) as caught:
        load_cohort(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("invalid cohort CSV: row 2: pfs_months: '0' is not allowed")
    assert "; row 3: pfs_event: 'x' is not an event indicator" in message


def test_parse_cohort_csv_takes_paths_relative_to_the_given_folder(tmp_path):
    make_inputs(tmp_path, "p1")
    cohort = parse_cohort_csv(
        "id,split,pfs_months,pfs_event,t_stage,n_stage,m_stage,ecog,lipi,ct,seg\n"
        "P,train,4,1,T4,N3,M1c,1,good,p1/ct,p1/seg.dcm\n",
        base_dir=tmp_path,
    )
    assert cohort.patients[0].images.seg == (tmp_path / "p1" / "seg.dcm").resolve()


def test_the_seg_check_is_pydicoms_is_dicom(tmp_path):
    """The cohort's "is this a DICOM file" is pydicom.misc.is_dicom (no hand-written preamble check)."""
    import os

    from pydicom import examples
    from pydicom.misc import is_dicom

    from sclc_risk_node.research.cohort import _is_dicom_file

    files = {
        "real.dcm": None,
        "preamble.dcm": b"\0" * 128 + b"DICM",
        "short.dcm": b"\0" * 128 + b"DIC",
        "plain.dcm": b"not a DICOM file\n" * 20,
        "empty.dcm": b"",
    }
    for name, data in files.items():
        if data is None:
            examples.ct.save_as(tmp_path / name, enforce_file_format=True)
        else:
            (tmp_path / name).write_bytes(data)
        assert _is_dicom_file(tmp_path / name) == is_dicom(tmp_path / name), name
    assert [name for name in files if _is_dicom_file(tmp_path / name)] == ["real.dcm", "preamble.dcm"]
    if os.geteuid() != 0:  # root reads a mode-000 file
        (tmp_path / "preamble.dcm").chmod(0)
        assert _is_dicom_file(tmp_path / "preamble.dcm") is False
