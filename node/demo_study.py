"""The bundled demonstration study: a synthetic chest CT phantom, its tumour SEG and a clinical record.

Generated on demand (nothing binary is shipped), deterministic for a given seed.
The phantom is the simulated training cohort's kind (`scoring.training.chest_phantom`:
a cropped chest CT with anatomy around a 14 mm-radius, 11.5 ml tumour), so the
demonstration model scores it inside its applicability domain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sclc_risk_node.dicom_io.synthetic import (
    SyntheticPatient,
    build_tumour_seg,
    synthetic_chest_phantom,
    write_ct_series,
)
from sclc_risk_node.scoring.training.chest_phantom import chest_ct_phantom

DEMO_PATIENT = SyntheticPatient(
    patient_id="DEMO-0001",
    patient_name="Demo^Phantom",
    accession_number="DEMOACC0001",
    study_instance_uid="2.25.190210731848390187129387118409836041234",
)

DEMO_CLINICAL = {
    "accession_number": DEMO_PATIENT.accession_number,
    "study_instance_uid": DEMO_PATIENT.study_instance_uid,
    "t_stage": "T3",
    "n_stage": "N2",
    "m_stage": "M1c",
    "ecog": 1,
    "anc": 5.1,
    "wbc": 7.4,
    "ldh": 310,
    "ldh_uln": 250,
}


@dataclass(frozen=True)
class DemoStudy:
    ct_dir: Path
    seg_path: Path
    clinical_path: Path


def write_demo_study(workdir: Path, *, seed: int = 7, phantom: str = "chest-ct") -> DemoStudy:
    """Write the study into ``workdir``.  ``phantom="box"`` writes the former small lung-box phantom
    (``dicom_io.synthetic.synthetic_chest_phantom``), on which the 2.0.0 model was fitted."""
    workdir = Path(workdir)
    ct_dir = workdir / "ct"
    if phantom == "box":
        image, mask = synthetic_chest_phantom(seed=seed)
    elif phantom == "chest-ct":
        image, mask, _ = chest_ct_phantom(radius_mm=14.0, texture_hu=40.0, halo_hu=100.0, seed=seed)
    else:
        raise ValueError(f"phantom: {phantom!r} is not allowed (allowed: chest-ct, box)")
    ct_datasets = write_ct_series(image, ct_dir, DEMO_PATIENT)
    seg_path = workdir / "seg.dcm"
    build_tumour_seg(ct_datasets, mask).save_as(seg_path, enforce_file_format=True)
    clinical_path = workdir / "clinical.json"
    clinical_path.write_text(json.dumps(DEMO_CLINICAL, indent=2) + "\n", encoding="utf-8")
    return DemoStudy(ct_dir, seg_path, clinical_path)
