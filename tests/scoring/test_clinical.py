"""Clinical record parsing, validation, LIPI from labs and AJCC stage groups."""

from __future__ import annotations

import json

import pytest

from sclc_risk_node.scoring.clinical import (
    ClinicalRecord,
    LabValues,
    Lipi,
    clinical_record_from_mapping,
    lipi_from_labs,
    parse_clinical_csv,
    parse_clinical_json,
    parse_clinical_json_many,
)
from sclc_risk_node.scoring.errors import ClinicalRecordError, InputError

BASE = {
    "patient_id": "PAT-0001",
    "t_stage": "T3",
    "n_stage": "N2",
    "m_stage": "M1c",
    "ecog": 1,
    "lipi": "intermediate",
}


def record(**changes):
    values = {**BASE, **changes}
    return clinical_record_from_mapping({key: value for key, value in values.items() if value is not ...})


def problems_of(mapping) -> tuple[str, ...]:
    with pytest.raises(ClinicalRecordError) as caught:
        clinical_record_from_mapping(mapping)
    return caught.value.problems


# --- valid records and normalisation -----------------------------------------


def test_minimal_json_record_parses():
    parsed = parse_clinical_json(json.dumps(BASE))
    assert (parsed.t_stage, parsed.n_stage, parsed.m_stage, parsed.ecog) == ("T3", "N2", "M1c", 1)
    assert parsed.lipi is Lipi.INTERMEDIATE and parsed.lipi_source == "given"
    assert parsed.patient_id == "PAT-0001" and parsed.accession_number is None
    assert parsed.labs is None and parsed.t_substage is None


@pytest.mark.parametrize(
    ("given", "stage", "substage"),
    [
        ("T2", "T2", None),
        ("t2", "T2", None),
        ("2", "T2", None),
        (2, "T2", None),
        (" T4 ", "T4", None),
        ("T1a", "T1", "T1a"),
        ("t1MI", "T1", "T1mi"),
        ("2b", "T2", "T2b"),
        ("T1c", "T1", "T1c"),
    ],
)
def test_t_stage_spellings_normalise_to_main_stage(given, stage, substage):
    parsed = record(t_stage=given)
    assert (parsed.t_stage, parsed.t_substage) == (stage, substage)


@pytest.mark.parametrize(("given", "expected"), [("n0", "N0"), ("3", "N3"), (1, "N1")])
def test_n_stage_spellings(given, expected):
    assert record(n_stage=given).n_stage == expected


@pytest.mark.parametrize(("given", "expected"), [("m0", "M0"), ("M1", "M1"), ("m1A", "M1a"), ("1b", "M1b"), (0, "M0")])
def test_m_stage_spellings(given, expected):
    assert record(m_stage=given).m_stage == expected


@pytest.mark.parametrize(("given", "expected"), [(0, 0), ("4", 4), (2.0, 2), (" 3 ", 3)])
def test_ecog_accepts_integral_values(given, expected):
    assert record(ecog=given).ecog == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("good", Lipi.GOOD),
        ("Intermediate", Lipi.INTERMEDIATE),
        ("POOR", Lipi.POOR),
        (0, Lipi.GOOD),
        ("1", Lipi.INTERMEDIATE),
        (2, Lipi.POOR),
    ],
)
def test_lipi_labels_and_numbers(given, expected):
    assert record(lipi=given).lipi is expected


def test_keys_are_case_insensitive_and_blank_values_are_missing():
    parsed = clinical_record_from_mapping(
        {
            "Patient_ID": "P",
            " T_Stage ": "T1",
            "N_STAGE": "N0",
            "M_stage": "M0",
            "ECOG": "0",
            "LIPI": "good",
            "accession_number": "",
            "age": None,
        }
    )
    assert parsed.t_stage == "T1" and parsed.accession_number is None and parsed.age is None


def test_optional_fields():
    parsed = record(age="63.5", sex="female", brain_metastases="yes", liver_metastases=False)
    assert (parsed.age, parsed.sex, parsed.brain_metastases, parsed.liver_metastases) == (63.5, "F", True, False)
    assert parsed.level("brain_metastases") == "yes" and parsed.level("liver_metastases") == "no"
    assert record().level("sex") is None and record().number("age") is None


def test_any_one_identifier_is_enough():
    parsed = record(patient_id=None, study_instance_uid="1.2.826.0.1.3680043.8.498.1")
    assert parsed.study_instance_uid == "1.2.826.0.1.3680043.8.498.1" and parsed.patient_id is None


# --- every problem reported together ------------------------------------------


def test_every_invalid_field_is_reported_in_one_error():
    problems = problems_of(
        {
            "patient_id": "PAT-0001",
            "t_stage": "T5",
            "n_stage": "N4",
            "m_stage": "M2",
            "ecog": 7,
            "lipi": "bad",
            "age": -3,
            "sex": "x",
            "brain_metastases": "maybe",
        }
    )
    assert problems == (
        "t_stage: 'T5' is not an AJCC 8th-edition T stage"
        " (allowed: T1, T2, T3, T4, or a descriptor T1mi, T1a, T1b, T1c, T2a, T2b)",
        "n_stage: 'N4' is not an AJCC 8th-edition N stage (allowed: N0, N1, N2, N3)",
        "m_stage: 'M2' is not an AJCC 8th-edition M stage (allowed: M0, M1, M1a, M1b, M1c)",
        "ecog: 7 is out of range (allowed: integer 0-4)",
        "lipi: 'bad' is not a LIPI class (allowed: good, intermediate, poor or 0-2)",
        "age: -3 is out of range (allowed: years 0-130)",
        "sex: 'x' is not allowed (allowed: F, M, O, female, male, other)",
        "brain_metastases: 'maybe' is not a yes/no value (allowed: true/false, yes/no, 1/0)",
    )


def test_error_message_joins_all_problems_and_is_an_input_error():
    with pytest.raises(
        InputError, match=r"^invalid clinical record: ecog: 7 is out of range \(allowed: integer 0-4\)$"
    ):
        record(ecog=7)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (1.5, "ecog: 1.5 is not an integer (allowed: integer 0-4)"),
        ("abc", "ecog: 'abc' is not a number (allowed: integer 0-4)"),
        (True, "ecog: true is not a number (allowed: integer 0-4)"),
        (-1, "ecog: -1 is out of range (allowed: integer 0-4)"),
        ("5", "ecog: '5' is out of range (allowed: integer 0-4)"),
    ],
)
def test_bad_ecog(value, problem):
    assert problems_of({**BASE, "ecog": value}) == (problem,)


@pytest.mark.parametrize("value", ["T0", "Tis", "TX", "T2c", "T3a", "2.5", 2.0])
def test_t_stages_outside_t1_t4_are_refused(value):
    (problem,) = problems_of({**BASE, "t_stage": value})
    assert problem.startswith("t_stage: ") and "allowed: T1, T2, T3, T4" in problem


def test_missing_required_fields_are_all_named():
    assert problems_of({"lipi": 1}) == (
        "identifier: missing (allowed: at least one of patient_id, accession_number, study_instance_uid)",
        "t_stage: missing (allowed: T1, T2, T3, T4)",
        "n_stage: missing (allowed: N0, N1, N2, N3)",
        "m_stage: missing (allowed: M0, M1, M1a, M1b, M1c)",
        "ecog: missing (allowed: integer 0-4)",
    )


def test_missing_lipi_and_labs():
    problems = problems_of({key: value for key, value in BASE.items() if key != "lipi"})
    assert problems == (
        "lipi: missing (allowed: good, intermediate, poor or 0-2, or all four labs anc, wbc, ldh, ldh_uln to compute it)",
    )


def test_unknown_keys_are_named():
    problems = problems_of({**BASE, "ecgo": 1, "stage": "IV"})
    assert [problem.split(" (allowed")[0] for problem in problems] == ["ecgo: unknown field", "stage: unknown field"]
    assert "allowed: patient_id, accession_number" in problems[0]


def test_duplicate_key_after_normalisation():
    assert problems_of({**BASE, "ECOG": 2}) == ("ecog: given more than once (allowed: each field once)",)


def test_metastasis_flags_must_fit_m_stage():
    assert problems_of({**BASE, "m_stage": "M1a", "liver_metastases": True}) == (
        "liver_metastases: true contradicts m_stage M1a (allowed: false, or m_stage M1, M1b or M1c,"
        " since extrathoracic organ metastases are M1b/M1c)",
    )
    assert record(m_stage="M0", brain_metastases=False).brain_metastases is False


# --- PHI stays out of messages ------------------------------------------------


def test_identifier_values_never_appear_in_errors_or_repr():
    secret_id, secret_acc = "DOE^JANE-1234567", "ACC-SECRET-12345678"
    with pytest.raises(ClinicalRecordError) as caught:
        clinical_record_from_mapping(
            {
                **BASE,
                "patient_id": secret_id,
                "accession_number": secret_acc,
                "study_instance_uid": "1.2.abc",
                "ecog": 9,
            }
        )
    message = str(caught.value)
    assert secret_id not in message and "ACC-SECRET" not in message and "1.2.abc" not in message
    assert "accession_number: (value withheld) has 19 characters (allowed: at most 16)" in caught.value.problems
    assert "study_instance_uid: (value withheld) is not a DICOM UID (allowed: digits separated by dots)" in message
    assert secret_id not in repr(record(patient_id=secret_id))


def test_identifier_in_a_shifted_column_is_withheld():
    problems = problems_of(
        {**BASE, "patient_id": "DOE^JANE", "accession_number": "A77", "t_stage": "DOE^JANE", "n_stage": "A77"}
    )
    assert problems == (
        "t_stage: '(withheld)' is not an AJCC 8th-edition T stage"
        " (allowed: T1, T2, T3, T4, or a descriptor T1mi, T1a, T1b, T1c, T2a, T2b)",
        "n_stage: '(withheld)' is not an AJCC 8th-edition N stage (allowed: N0, N1, N2, N3)",
    )


def test_long_values_are_shortened_in_messages():
    assert problems_of({**BASE, "ecog": 10**400}) == (
        f"ecog: {'1' + '0' * 22}… is not a number (allowed: integer 0-4)",
    )


def test_numeric_identifier_is_refused_without_its_value():
    assert problems_of({**BASE, "patient_id": 1234567}) == (
        "patient_id: (value withheld) is a number (allowed: a string, so leading zeros survive)",
    )


# --- LIPI from labs -----------------------------------------------------------


def labs_record(anc, wbc, ldh, ldh_uln, lipi=...):
    return record(lipi=lipi, anc=anc, wbc=wbc, ldh=ldh, ldh_uln=ldh_uln)


@pytest.mark.parametrize(
    ("anc", "wbc", "ldh", "uln", "expected"),
    [
        # dNLR = 4 / (8 - 4) = 1; LDH below ULN -> 0 factors
        (4.0, 8.0, 180, 250, Lipi.GOOD),
        # dNLR exactly 3 is not > 3; LDH equal to ULN is not > ULN
        (3.0, 4.0, 250, 250, Lipi.GOOD),
        # the same boundary written with decimals that are inexact in binary: 0.3 / (0.4 - 0.3) == 3
        (0.3, 0.4, 245.1, 245.1, Lipi.GOOD),
        # dNLR = 6.3 / (8.4 - 6.3) = 3.0 exactly in decimal
        (6.3, 8.4, 100, 250, Lipi.GOOD),
        # dNLR = 7 / (9 - 7) = 3.5 > 3 only -> intermediate
        (7.0, 9.0, 200, 250, Lipi.INTERMEDIATE),
        # LDH 250.01 > 250 only -> intermediate
        (4.0, 8.0, 250.01, 250, Lipi.INTERMEDIATE),
        # dNLR just above 3: 3.01 / (4 - 3.01) = 3.04
        (3.01, 4.0, 100, 250, Lipi.INTERMEDIATE),
        # both -> poor
        (9.0, 10.0, 400, 250, Lipi.POOR),
    ],
)
def test_lipi_from_labs(anc, wbc, ldh, uln, expected):
    assert lipi_from_labs(LabValues(anc, wbc, ldh, uln)) is expected
    parsed = labs_record(anc, wbc, ldh, uln)
    assert parsed.lipi is expected and parsed.lipi_source == "labs"
    assert parsed.labs == LabValues(anc, wbc, ldh, uln)


def test_labs_from_csv_strings_use_the_written_decimals():
    parsed = labs_record("0.3", "0.4", "300", "250")
    assert parsed.lipi is Lipi.INTERMEDIATE


def test_given_lipi_agreeing_with_labs():
    parsed = labs_record(7.0, 9.0, 200, 250, lipi="intermediate")
    assert parsed.lipi is Lipi.INTERMEDIATE and parsed.lipi_source == "given+labs"


def test_lipi_conflict_names_both_values():
    with pytest.raises(ClinicalRecordError) as caught:
        labs_record(7.0, 9.0, 300, 250, lipi="good")
    assert caught.value.problems == (
        "lipi: given 'good' (0) but labs give 'poor' (2): dNLR 3.5 > 3, LDH 300 > ULN 250"
        " (allowed: a LIPI that agrees with the labs, or only one of them)",
    )


def test_lab_problems_are_reported_together():
    problems = problems_of({**BASE, "lipi": None, "anc": "abc", "wbc": -2, "ldh": 0, "ldh_uln": 250})
    assert problems == (
        "anc: 'abc' is not a number (allowed: positive number)",
        "wbc: -2 is not positive (allowed: positive number)",
        "ldh: 0 is not positive (allowed: positive number)",
    )


def test_anc_must_be_below_wbc():
    assert problems_of({**BASE, "anc": 8, "wbc": 8, "ldh": 100, "ldh_uln": 250}) == (
        "anc: 8 is not less than wbc 8 (allowed: anc < wbc, both in the same unit)",
    )


def test_partial_labs_are_refused_even_with_lipi_given():
    assert problems_of({**BASE, "anc": 4, "wbc": 8}) == (
        "labs: anc, wbc given but ldh, ldh_uln missing (allowed: all four of anc, wbc, ldh, ldh_uln or none)",
    )


# --- AJCC 8th edition stage groups --------------------------------------------


@pytest.mark.parametrize(
    ("t", "n", "m", "group", "overall"),
    [
        ("T1", "N0", "M0", "IA1-IA3", "I-II"),
        ("T1a", "N0", "M0", "IA1", "I-II"),
        ("T1mi", "N0", "M0", "IA1", "I-II"),
        ("T1b", "N0", "M0", "IA2", "I-II"),
        ("T1c", "N0", "M0", "IA3", "I-II"),
        ("T2", "N0", "M0", "IB-IIA", "I-II"),
        ("T2a", "N0", "M0", "IB", "I-II"),
        ("T2b", "N0", "M0", "IIA", "I-II"),
        ("T3", "N0", "M0", "IIB", "I-II"),
        ("T4", "N0", "M0", "IIIA", "III"),
        ("T1", "N1", "M0", "IIB", "I-II"),
        ("T2b", "N1", "M0", "IIB", "I-II"),
        ("T3", "N1", "M0", "IIIA", "III"),
        ("T4", "N1", "M0", "IIIA", "III"),
        ("T1c", "N2", "M0", "IIIA", "III"),
        ("T2", "N2", "M0", "IIIA", "III"),
        ("T3", "N2", "M0", "IIIB", "III"),
        ("T4", "N2", "M0", "IIIB", "III"),
        ("T1", "N3", "M0", "IIIB", "III"),
        ("T2", "N3", "M0", "IIIB", "III"),
        ("T3", "N3", "M0", "IIIC", "III"),
        ("T4", "N3", "M0", "IIIC", "III"),
        ("T1", "N0", "M1a", "IVA", "IV"),
        ("T4", "N3", "M1b", "IVA", "IV"),
        ("T2", "N1", "M1c", "IVB", "IV"),
        ("T1a", "N0", "M1", "IVA-IVB", "IV"),
    ],
)
def test_stage_groups(t, n, m, group, overall):
    parsed = record(t_stage=t, n_stage=n, m_stage=m)
    assert (parsed.stage_group, parsed.overall_stage) == (group, overall)
    assert parsed.level("overall_stage") == overall


# --- direct construction guard ------------------------------------------------


def test_direct_construction_is_checked():
    with pytest.raises(ClinicalRecordError, match="t_stage: 'T1a' is not allowed"):
        ClinicalRecord("T1a", "N0", "M0", 0, Lipi.GOOD, "given", patient_id="P")
    with pytest.raises(ClinicalRecordError, match="identifier: missing"):
        ClinicalRecord("T1", "N0", "M0", 0, Lipi.GOOD, "given")
    assert ClinicalRecord("T1", "N0", "M0", 0, 2, "given", patient_id="P").lipi is Lipi.POOR


# --- JSON ---------------------------------------------------------------------


def test_json_list_needs_the_many_parser():
    text = json.dumps([BASE, {**BASE, "patient_id": "PAT-0002", "lipi": 0}])
    with pytest.raises(ClinicalRecordError, match=r"a list of 2 records .*use parse_clinical_json_many"):
        parse_clinical_json(text)
    parsed = parse_clinical_json_many(text)
    assert [item.lipi for item in parsed] == [Lipi.INTERMEDIATE, Lipi.GOOD]
    assert len(parse_clinical_json_many(json.dumps(BASE))) == 1


def test_json_many_reports_problems_per_record():
    text = json.dumps([BASE, {**BASE, "ecog": 9}, "oops", {**BASE, "n_stage": "N7", "ecog": 1.5}])
    with pytest.raises(ClinicalRecordError) as caught:
        parse_clinical_json_many(text)
    assert caught.value.problems == (
        "record 2: ecog: 9 is out of range (allowed: integer 0-4)",
        "record 3: a str is not an object (allowed: a JSON object)",
        "record 4: n_stage: 'N7' is not an AJCC 8th-edition N stage (allowed: N0, N1, N2, N3)",
        "record 4: ecog: 1.5 is not an integer (allowed: integer 0-4)",
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{", "json: not valid JSON"),
        ('{"ecog": NaN}', "NaN is not a number"),
        ('{"ecog": 1, "ecog": 2}', "key 'ecog' appears twice"),
        ("[]", "an empty list"),
        ("3", "a int"),
    ],
)
def test_json_syntax_problems(text, fragment):
    with pytest.raises(ClinicalRecordError, match=fragment):
        parse_clinical_json_many(text)


# --- CSV ----------------------------------------------------------------------

CSV_TEXT = (
    "patient_id,accession_number,t_stage,n_stage,m_stage,ecog,lipi,anc,wbc,ldh,ldh_uln,age\r\n"
    "PAT-1,ACC1,T2a,N1,M1c,0,good,,,,,61\r\n"
    "PAT-2,,t4,n3,m1b,1,,7.0,9.0,260,250,\r\n"
    "\r\n"
    "PAT-3,ACC3,T3,N2,M1a,2,1,,,,,70\r\n"
)


def test_csv_with_several_rows():
    first, second, third = parse_clinical_csv("\ufeff" + CSV_TEXT)
    assert (first.t_stage, first.t_substage, first.lipi, first.age) == ("T2", "T2a", Lipi.GOOD, 61.0)
    assert (second.t_stage, second.n_stage, second.m_stage) == ("T4", "N3", "M1b")
    assert second.lipi is Lipi.POOR and second.lipi_source == "labs" and second.accession_number is None
    assert (third.ecog, third.lipi, third.overall_stage) == (2, Lipi.INTERMEDIATE, "IV")


def test_csv_bad_rows_are_reported_with_row_numbers_and_reject_the_file():
    # Row numbers are text lines: header 1, PAT-1 2, PAT-2 3, blank 4, PAT-3 5, PAT-4 6, PAT-5 7.
    text = CSV_TEXT + "PAT-4,ACC4,T9,N0,M0,1.5,good,,,,,\r\nPAT-5,ACC5,T1\r\n"
    with pytest.raises(ClinicalRecordError) as caught:
        parse_clinical_csv(text)
    assert caught.value.problems == (
        "row 6: t_stage: 'T9' is not an AJCC 8th-edition T stage"
        " (allowed: T1, T2, T3, T4, or a descriptor T1mi, T1a, T1b, T1c, T2a, T2b)",
        "row 6: ecog: '1.5' is not an integer (allowed: integer 0-4)",
        "row 7: has 3 cells but the header has 12 columns",
    )
    assert "PAT-4" not in str(caught.value)


def test_csv_unknown_and_duplicate_columns():
    with pytest.raises(ClinicalRecordError) as caught:
        parse_clinical_csv("patient_id,T_stage,n_stage,m_stage,ecog,lipi,ecog,tstage\nP,T1,N0,M0,0,good,0,T1\n")
    assert caught.value.problems[0] == "header: column 'ecog' appears twice (allowed: each field once)"
    assert caught.value.problems[1].startswith("header: tstage: unknown field (allowed: patient_id,")


def test_csv_duplicate_study_is_refused():
    text = "study_instance_uid,t_stage,n_stage,m_stage,ecog,lipi\n1.2.3,T1,N0,M1,0,good\n1.2.3,T2,N0,M1,0,good\n"
    with pytest.raises(ClinicalRecordError) as caught:
        parse_clinical_csv(text)
    assert caught.value.problems == ("row 3: study_instance_uid: same as row 2 (allowed: each study once)",)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "csv: empty"),
        ("patient_id,t_stage\n", "a header but no record rows"),
        ("patient_id;t_stage;ecog\nP;T1;0\n", "looks semicolon-separated"),
        ('patient_id,t_stage\n"P,T1\n', "csv: not valid CSV"),
    ],
)
def test_csv_structure_problems(text, fragment):
    with pytest.raises(ClinicalRecordError, match=fragment):
        parse_clinical_csv(text)


# --- the documentation's examples ---------------------------------------------


def test_clinical_record_doc_examples_parse_as_described():
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "clinical-record.md").read_text(encoding="utf-8")
    (json_example,) = re.findall(r"```json\n(.*?)```", doc, re.S)
    (csv_example,) = re.findall(r"```csv\n(.*?)```", doc, re.S)
    parsed = parse_clinical_json(json_example)
    assert (parsed.t_stage, parsed.t_substage, parsed.stage_group, parsed.overall_stage) == ("T2", "T2b", "IVB", "IV")
    assert (parsed.lipi, parsed.lipi_source) == (Lipi.INTERMEDIATE, "labs")
    assert [(r.lipi, r.lipi_source) for r in parse_clinical_csv(csv_example)] == [
        (Lipi.GOOD, "given"),
        (Lipi.POOR, "labs"),
        (Lipi.INTERMEDIATE, "given"),
    ]


@pytest.mark.parametrize(
    "mapping",
    [
        {"accession_number": "A1", "t_stage": "T1a", "n_stage": "N2", "m_stage": "M1c", "ecog": 1, "lipi": "poor"},
        {
            "patient_id": "P1",
            "study_instance_uid": "1.2.3",
            "t_stage": "T4",
            "n_stage": "N0",
            "m_stage": "M0",
            "ecog": 0,
            "anc": 6.0,
            "wbc": 7.0,
            "ldh": 300,
            "ldh_uln": 250,
            "age": 61,
            "sex": "F",
            "brain_metastases": False,
            "liver_metastases": False,
        },
        {
            "accession_number": "A2",
            "t_stage": "T3",
            "n_stage": "N3",
            "m_stage": "M1b",
            "ecog": 2,
            "lipi": 1,
            "anc": 4.0,
            "wbc": 9.0,
            "ldh": 300,
            "ldh_uln": 250,
        },
    ],
)
def test_to_mapping_round_trips(mapping):
    record = clinical_record_from_mapping(mapping)
    again = clinical_record_from_mapping(record.to_mapping())
    assert again == record
    assert again.patient_id == record.patient_id and again.accession_number == record.accession_number
