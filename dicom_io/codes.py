"""Every coded concept the node writes into its DICOM SR, in one place.

Standard concepts come from DCM (PS3.16), SNOMED CT (SCT), LOINC (LN) and
UCUM.  Where no standard concept exists (the risk scores of this model, the
PFS probabilities at a fixed horizon, ECOG, LIPI, TNM values as recorded by
the clinic) we use our own private coding scheme ``99SCLCRN``, declared in
the SR's CodingSchemeIdentificationSequence by ``private_coding_scheme()``.
Private code values are at most 16 characters (SH); radiomics feature
concepts, whose code value is the feature's full name, use LongCodeValue.

Units (UCUM):

* scores and cut-offs: ``1`` (dimensionless linear predictors of a Cox model);
* PFS probabilities: ``{probability}``, i.e. a fraction in [0, 1], exactly as
  the model computes it.  We chose this over ``%`` so the stored number is the
  model's number (no x100 rounding) and reads back float-equal;
* radiomics feature values: ``1``; ``FeatureVector`` carries no units, so
  the value is recorded as pyradiomics reports it.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from scoring.clinical import Lipi

PRIVATE_SCHEME = "99SCLCRN"


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """A new CodingSchemeIdentificationSequence item declaring ``PRIVATE_SCHEME``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="sclc-risk-node private concepts",
        version="1",
        responsible_organization="sclc-risk-node project",
    )


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# --- document-level concepts (standard) -------------------------------------

#: TID 1500 root; OHIF only loads SRs with this title.
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
LANGUAGE_ENGLISH = Code("en-US", "RFC5646", "English (United States)")
#: Procedure reported (TID 1500 row 4, DCID 100).  CID 100 has no chest CT code, and
#: PixelMed rejects one from outside it (LN 24627-2 "CT Chest"), so the generic CT
#: code is used; the anatomy is carried by the finding site (lung).
PROCEDURE_REPORTED_CT = Code("25045-6", "LN", "CT unspecified body region")
OBSERVER_TYPE_DEVICE = Code("121007", "DCM", "Device")

# --- measurement group (standard) --------------------------------------------

FINDING_NEOPLASM = Code("108369006", "SCT", "Neoplasm")
FINDING_SITE_LUNG = Code("39607008", "SCT", "Lung")

RISK_GROUP_VALUES: Mapping[str, Code] = MappingProxyType(
    {
        "high": Code("15508007", "SCT", "High risk"),
        "low": Code("75976002", "SCT", "Low risk"),
    }
)
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")

# --- units (UCUM) -------------------------------------------------------------

UNIT_ONE = Code("1", "UCUM", "no units")
UNIT_PROBABILITY = Code("{probability}", "UCUM", "probability")

# --- private concepts: model outputs -----------------------------------------

RISK_GROUP = _private("RISKGROUP", "Progression risk group")
RADIOMICS_SCORE = _private("RADSCORE", "Radiomics score")
RADIOMICS_CUTOFF = _private("RADCUTOFF", "Radiomics score cut-off")
RISK_SCORE = _private("RISKSCORE", "Integrated risk score")
RISK_CUTOFF = _private("RISKCUTOFF", "Integrated risk score cut-off")

#: Months -> "Probability of progression-free survival at N months".
PFS_PROBABILITY: Mapping[int, Code] = MappingProxyType(
    {
        months: _private(f"PFSP{months}M", f"Probability of progression-free survival at {months} months")
        for months in (6, 12)
    }
)

DEMONSTRATION_MODEL = _private("DEMOMODEL", "Demonstration model")
INTENDED_USE = _private("INTENDEDUSE", "Intended use")

# --- private concepts: clinical inputs ---------------------------------------

T_STAGE = _private("TSTAGE", "Clinical T stage")
N_STAGE = _private("NSTAGE", "Clinical N stage")
M_STAGE = _private("MSTAGE", "Clinical M stage")
ECOG_PERFORMANCE_STATUS = _private("ECOGPS", "ECOG performance status")
LIPI = _private("LIPI", "Lung Immune Prognostic Index")
LIPI_SOURCE = _private("LIPISRC", "LIPI source")

T_STAGE_VALUES: Mapping[str, Code] = MappingProxyType(
    {t: _private(t, t) for t in ("T1", "T2", "T3", "T4")}
)
N_STAGE_VALUES: Mapping[str, Code] = MappingProxyType(
    {n: _private(n, n) for n in ("N0", "N1", "N2", "N3")}
)
M_STAGE_VALUES: Mapping[str, Code] = MappingProxyType(
    {m: _private(m, m) for m in ("M0", "M1", "M1a", "M1b", "M1c")}
)
ECOG_VALUES: Mapping[int, Code] = MappingProxyType(
    {score: _private(f"ECOG{score}", f"ECOG {score}") for score in range(5)}
)
LIPI_VALUES: Mapping[Lipi, Code] = MappingProxyType(
    {
        Lipi.GOOD: _private("LIPI0", "LIPI good (0 factors)"),
        Lipi.INTERMEDIATE: _private("LIPI1", "LIPI intermediate (1 factor)"),
        Lipi.POOR: _private("LIPI2", "LIPI poor (2 factors)"),
    }
)
LIPI_SOURCE_VALUES: Mapping[str, Code] = MappingProxyType(
    {
        "given": _private("LIPISRC-GIVEN", "LIPI as given"),
        "labs": _private("LIPISRC-LABS", "LIPI computed from labs"),
        "given+labs": _private("LIPISRC-BOTH", "LIPI given and computed from labs, agreeing"),
    }
)

# --- private concepts: radiomics features ------------------------------------

_FEATURE_PREFIX = "RF:"
_CODE_MEANING_MAX_CHARS = 64  # LO


def radiomics_feature_concept(feature_name: str) -> Code:
    """The concept of one radiomics feature value, e.g. ``ring.wavelet-LLH_glcm_Correlation``.

    The code value is ``RF:`` + the full ``FeatureSpec.name`` (written as
    LongCodeValue when longer than 16 characters), so it identifies the
    feature exactly; the meaning is the same name, shortened in the middle
    when it exceeds the 64 characters a CodeMeaning (LO) may hold.
    """
    meaning = feature_name
    if len(meaning) > _CODE_MEANING_MAX_CHARS:
        keep = (_CODE_MEANING_MAX_CHARS - 3) // 2
        meaning = f"{feature_name[:keep]}...{feature_name[-keep:]}"
    return _private(_FEATURE_PREFIX + feature_name, meaning)


def radiomics_feature_name(concept: Code | hd.sr.CodedConcept) -> str | None:
    """The feature name a ``radiomics_feature_concept`` encodes, or None for any other concept."""
    if concept.scheme_designator != PRIVATE_SCHEME or not concept.value.startswith(_FEATURE_PREFIX):
        return None
    return concept.value[len(_FEATURE_PREFIX):]


_PFS_CODE_VALUE = re.compile(r"PFSP(\d+)M")


def pfs_horizon_months(concept: Code | hd.sr.CodedConcept) -> int | None:
    """The horizon (months) of a PFS probability concept, or None for any other concept."""
    if concept.scheme_designator != PRIVATE_SCHEME:
        return None
    match = _PFS_CODE_VALUE.fullmatch(concept.value)
    return int(match.group(1)) if match else None
