"""Every coded concept the node writes into its DICOM SR, in one place.

Standard concepts come from DCM (PS3.16), SNOMED CT (SCT), LOINC (LN) and
UCUM.  Where no standard concept exists (the risk scores of this model, the
PFS probabilities at a fixed horizon, ECOG, LIPI, TNM values as recorded by
the clinic) we use our own private coding scheme ``99SCLCRN``, declared in
the SR's CodingSchemeIdentificationSequence by ``private_coding_scheme()``.
Every code value is at most 16 characters (SH CodeValue, never LongCodeValue:
highdicom's parser and several viewers read CodeValue only).  Radiomics
features and model terms, whose names run to 70 characters, get a code value
derived from a hash of the name (``named_concept``); the CodeMeaning is the
name itself, and a name longer than the 64 characters of a CodeMeaning is
also written in full as a TEXT "Full name" child of its NUM.

Units (UCUM):

* scores, cut-offs and term contributions: ``1`` (dimensionless linear
  predictors of a Cox model and their summands);
* PFS: ``%`` (percent progression-free at the horizon), rounded to 0.1 %;
* radiomics feature values: ``1``; ``FeatureVector`` carries no units, so
  the value is recorded as pyradiomics reports it (4 significant digits).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from types import MappingProxyType

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from sclc_risk_node.scoring.clinical import Lipi

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
#: The tumour's cross-section on the key slice (TID 1410), in mm2.
AREA = Code("42798000", "SCT", "Area")

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
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")

# --- private concepts: model outputs -----------------------------------------

RISK_GROUP = _private("RISKGROUP", "Progression risk group")
RADIOMICS_SCORE = _private("RADSCORE", "Radiomics score")
RADIOMICS_CUTOFF = _private("RADCUTOFF", "Radiomics score cut-off")
RISK_SCORE = _private("RISKSCORE", "Integrated risk score")
RISK_CUTOFF = _private("RISKCUTOFF", "Integrated risk score cut-off")

#: (risk group, demonstration) -> the key-slice ROI SR's risk-score NUM.  OHIF v3 labels an outline
#: with "concept name: value unit" of each NUM and never shows CODE items or the Tracking Identifier,
#: so the group, and DEMO for a demonstration model, must be in the NUM's concept name.
RISK_SCORE_WITH_GROUP: Mapping[tuple[str, bool], Code] = MappingProxyType(
    {
        ("high", False): _private("RSHIGH", "High progression risk, integrated risk score"),
        ("low", False): _private("RSLOW", "Low progression risk, integrated risk score"),
        ("high", True): _private("RSHIGHDEMO", "High progression risk (DEMO model), risk score"),
        ("low", True): _private("RSLOWDEMO", "Low progression risk (DEMO model), risk score"),
    }
)
#: The key-slice ROI SR's NUM when the estimates are withheld: how many features lie outside the
#: model's applicability domain, named so that OHIF's label says why there is no risk group.
OUT_OF_DOMAIN_FEATURE_COUNT = _private("OODCOUNT", "Outside applicability domain: features out of range")

#: Months -> "Progression-free survival at N months" (percent of patients like this one).
PFS_PROBABILITY: Mapping[int, Code] = MappingProxyType(
    {months: _private(f"PFSP{months}M", f"Progression-free survival at {months} months") for months in (6, 12)}
)

DEMONSTRATION_MODEL = _private("DEMOMODEL", "Demonstration model")
INTENDED_USE = _private("INTENDEDUSE", "Intended use")
#: DCM 121111 "Summary" (CID 7001 report heading), here the plain-language result at the top.
SUMMARY = Code("121111", "DCM", "Summary")

#: The applicability-domain verdict (``scoring.types.DomainStatus`` values).
APPLICABILITY = _private("APPLICABILITY", "Model applicability domain")
APPLICABILITY_VALUES: Mapping[str, Code] = MappingProxyType(
    {
        "in_domain": _private("IN-DOMAIN", "Within the model's applicability domain"),
        "out_of_domain": _private("OUT-OF-DOMAIN", "Outside the model's applicability domain"),
        "unknown": _private("DOMAIN-UNKNOWN", "Applicability domain unknown"),
    }
)
APPLICABILITY_DETAIL = _private("APPLICDETAIL", "Applicability assessment")
#: Yes when the risk group, scores and PFS were withheld (study outside the domain).
RESULTS_WITHHELD = _private("WITHHELD", "Risk estimates withheld")
#: Present (Yes) only when the CT was lossy-compressed (LossyImageCompression "01").
LOSSY_INPUT = _private("LOSSYCT", "Lossy-compressed CT input")
#: TEXT child of a NUM whose name does not fit a 64-character CodeMeaning.
FULL_NAME = _private("FULLNAME", "Full name")

# --- private concepts: clinical inputs ---------------------------------------

T_STAGE = _private("TSTAGE", "Clinical T stage")
N_STAGE = _private("NSTAGE", "Clinical N stage")
M_STAGE = _private("MSTAGE", "Clinical M stage")
ECOG_PERFORMANCE_STATUS = _private("ECOGPS", "ECOG performance status")
LIPI = _private("LIPI", "Lung Immune Prognostic Index")
LIPI_SOURCE = _private("LIPISRC", "LIPI source")

T_STAGE_VALUES: Mapping[str, Code] = MappingProxyType({t: _private(t, t) for t in ("T1", "T2", "T3", "T4")})
N_STAGE_VALUES: Mapping[str, Code] = MappingProxyType({n: _private(n, n) for n in ("N0", "N1", "N2", "N3")})
M_STAGE_VALUES: Mapping[str, Code] = MappingProxyType({m: _private(m, m) for m in ("M0", "M1", "M1a", "M1b", "M1c")})
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

# --- private concepts: radiomics features and model terms ---------------------

_FEATURE_PREFIX = "RF"
_RADIOMICS_TERM_PREFIX = "RC"
_INTEGRATED_TERM_PREFIX = "IC"
_CODE_MEANING_MAX_CHARS = 64  # LO
_HASH_HEX_CHARS = 14  # prefix (2) + 14 = the 16 characters of an SH CodeValue
_INTEGRATED_TERM_MEANING = "Risk contribution: "
_RADIOMICS_TERM_MEANING = "Radiomics contribution: "


def shortened_meaning(text: str) -> str:
    """``text`` as a CodeMeaning (LO, ≤64 characters): shortened in the middle when longer."""
    if len(text) <= _CODE_MEANING_MAX_CHARS:
        return text
    keep = (_CODE_MEANING_MAX_CHARS - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"


def _named_concept(prefix: str, name: str, meaning: str) -> Code:
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:_HASH_HEX_CHARS].upper()
    return _private(prefix + digest, shortened_meaning(meaning))


def radiomics_feature_concept(feature_name: str) -> Code:
    """The concept of one radiomics feature value, e.g. ``ring.wavelet-LLH_glcm_Correlation``.

    Code value ``RF`` + 14 hex digits of the name's sha256 (fits SH); meaning
    the name, shortened in the middle when it exceeds 64 characters.
    """
    return _named_concept(_FEATURE_PREFIX, feature_name, feature_name)


def term_contribution_concept(term_name: str, *, integrated: bool) -> Code:
    """The concept of one term's contribution (coefficient × value) to a linear predictor.

    ``integrated`` False: a term of the radiomics score (a feature);
    True: a term of the integrated risk score (radiomics score or a clinical covariate).
    """
    if integrated:
        return _named_concept(_INTEGRATED_TERM_PREFIX, term_name, _INTEGRATED_TERM_MEANING + term_name)
    return _named_concept(_RADIOMICS_TERM_PREFIX, term_name, _RADIOMICS_TERM_MEANING + term_name)


def named_concept_kind(concept: Code | hd.sr.CodedConcept) -> str | None:
    """``"feature"``, ``"radiomics_term"`` or ``"integrated_term"`` for a hashed concept, else None."""
    if concept.scheme_designator != PRIVATE_SCHEME or len(concept.value) != 2 + _HASH_HEX_CHARS:
        return None
    if not re.fullmatch(r"[0-9A-F]+", concept.value[2:]):
        return None
    return {
        _FEATURE_PREFIX: "feature",
        _RADIOMICS_TERM_PREFIX: "radiomics_term",
        _INTEGRATED_TERM_PREFIX: "integrated_term",
    }.get(concept.value[:2])


def name_from_meaning(meaning: str, kind: str) -> str:
    """The feature or term name a hashed concept's (unshortened) CodeMeaning states."""
    for prefix in (_INTEGRATED_TERM_MEANING, _RADIOMICS_TERM_MEANING):
        if kind != "feature" and meaning.startswith(prefix):
            return meaning[len(prefix) :]
    return meaning


_PFS_CODE_VALUE = re.compile(r"PFSP(\d+)M")


def pfs_horizon_months(concept: Code | hd.sr.CodedConcept) -> int | None:
    """The horizon (months) of a PFS probability concept, or None for any other concept."""
    if concept.scheme_designator != PRIVATE_SCHEME:
        return None
    match = _PFS_CODE_VALUE.fullmatch(concept.value)
    return int(match.group(1)) if match else None
