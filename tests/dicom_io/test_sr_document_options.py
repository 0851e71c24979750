"""The two SR builders share one set of document options; factoring them out changed no byte.

The fingerprints below were taken from the builders before the shared options (issue 11) and
cover every data element of both SRs, with the study's random UIDs numbered in order of first
appearance.  A deliberate change to the SR content changes them: re-take them then (run this
file, read the new value from the failure) and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest

from sclc_risk_node.dicom_io.key_slice import find_key_slice
from sclc_risk_node.dicom_io.sr_writer import build_key_slice_roi_sr, build_risk_sr
from tests.dicom_io.test_sr_writer import WHEN, make_clinical, make_result, study  # noqa: F401

_UID = re.compile(r'"(\d+(?:\.\d+){2,})"')
# Set by highdicom to the time of building: InstanceCreationDate/Time, ContributionDateTime.
_CLOCK_TAGS = {"00080012", "00080013", "0018A002"}

OPTIONS: dict[str, Any] = dict(
    series_number=77,
    manufacturer="Test Manufacturer",
    software_version="9.9.9",
    institution_name="Test Hospital",
    institutional_department_name="Radiology",
    content_datetime=WHEN,
)


def _without_clock(element: Any) -> Any:
    if isinstance(element, dict):
        return {key: _without_clock(value) for key, value in element.items() if key not in _CLOCK_TAGS}
    if isinstance(element, list):
        return [_without_clock(value) for value in element]
    return element


def fingerprint(dataset: Any) -> str:
    text = json.dumps(_without_clock(dataset.to_json_dict()), sort_keys=True, default=str)
    numbering: dict[str, str] = {}
    text = _UID.sub(lambda m: f'"uid-{numbering.setdefault(m.group(1), str(len(numbering)))}"', text)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"content_datetime": WHEN, "software_version": "9.9.9"},
            (
                "66220510db0c8cc6cb8ff149e8d09af6ec00b0a6dbb948d7bbc260cf1ece33ed",
                "1cf73b1f215047ebd1988fbf7aa38afcfb23866616d49e6577e0f98c1e0ffedc",
            ),
        ),
        (
            OPTIONS,
            (
                "6a65bf6e250cd9eb067e7cd7e6fc4f8dd8e4227b55d5b4c66853cbbb52dcb743",
                "8b15d07ebfeb877f9e3b5f805728f2f143e79da1672e1d26ea0f5fc6e641d635",
            ),
        ),
    ],
    ids=["defaults", "every-option-set"],
)
def test_both_srs_are_byte_for_byte_what_the_separate_keyword_lists_built(study, options, expected):  # noqa: F811
    ct, segment = study
    result = make_result()
    risk = build_risk_sr(ct, segment, make_clinical(), result, **options)
    roi = build_key_slice_roi_sr(ct, segment, result, find_key_slice(ct, segment.mask), **options)

    assert (fingerprint(risk), fingerprint(roi)) == expected
