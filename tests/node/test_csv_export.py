"""CSV exports never carry a spreadsheet formula (issue 10, item 8)."""

from __future__ import annotations

import csv
import io

import pytest

from sclc_risk_node.node.csv_export import csv_text, neutralise_formula


@pytest.mark.parametrize(
    "value, written",
    [
        ('=HYPERLINK("http://x","click")', '\'=HYPERLINK("http://x","click")'),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1", "'\t=1"),
        ("-1.25", "-1.25"),  # a plain number stays a number
        ("+3", "+3"),
        ("T3", "T3"),
        (-4.5, -4.5),
        (7, 7),
        ("", ""),
    ],
)
def test_formula_prefixes_are_neutralised_and_numbers_kept(value, written):
    assert neutralise_formula(value) == written


def test_csv_text_neutralises_every_cell_and_header():
    text = csv_text([{"id": "=1+1", "pfs_months": "-3.5", "note": "@x"}], ["id", "pfs_months", "note"])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["id", "pfs_months", "note"], ["'=1+1", "-3.5", "'@x"]]


def test_the_simulated_cohort_csv_goes_through_the_neutraliser():
    from sclc_risk_node.research.simulate import _cohort_csv

    text = _cohort_csv([{"id": "=cmd()", "split": "train", "pfs_months": "-0.0"}])
    assert text.splitlines() == ["id,split,pfs_months", "'=cmd(),train,-0.0"]
