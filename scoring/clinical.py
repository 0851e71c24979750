"""The clinical record: T, N, M stage, ECOG performance status and LIPI.

(Parsing from JSON/CSV text, validation and LIPI from labs: to be completed.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Lipi(enum.IntEnum):
    """Lung Immune Prognostic Index: number of factors (dNLR > 3, LDH > ULN)."""

    GOOD = 0
    INTERMEDIATE = 1
    POOR = 2


@dataclass(frozen=True, slots=True)
class LabValues:
    """Blood counts and LDH used to compute LIPI.

    ``anc`` and ``wbc`` in the same unit (e.g. 10^9/L); ``ldh`` and ``ldh_uln`` in the same unit (U/L).
    """

    anc: float
    wbc: float
    ldh: float
    ldh_uln: float


@dataclass(frozen=True, slots=True)
class ClinicalRecord:
    """One patient's clinical inputs, validated.

    ``t_stage`` is one of T1..T4, ``n_stage`` N0..N3, ``m_stage`` M0, M1, M1a, M1b, M1c;
    ``ecog`` 0..4.  ``lipi_source`` is ``"given"``, ``"labs"`` or ``"given+labs"`` (both, agreeing).
    At least one of the identifiers is set, so the node can match the record to a study.
    """

    t_stage: str
    n_stage: str
    m_stage: str
    ecog: int
    lipi: Lipi
    lipi_source: str
    patient_id: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    labs: LabValues | None = None
