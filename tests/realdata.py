"""Real lung CT test cases from the pyradiomics-bhklab sdist, fetched with pip and cached.

The sdist's ``data/`` folder holds ``lung1_image.nrrd``/``lung1_label.nrrd``
(512x512x48, 0.57x0.57x5 mm, 837 tumour voxels) and ``lung2_*``.  Nothing
large is committed: the first test run downloads the sdist (about 40 MB)
into the cache folder (``$SCLC_TEST_CACHE`` or ``~/.cache/sclc-risk-node-tests``)
and later runs reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import SimpleITK as sitk

SDIST = "pyradiomics-bhklab==3.1.4"
SDIST_FILENAME = "pyradiomics_bhklab-3.1.4.tar.gz"


def cache_dir() -> Path:
    root = Path(os.environ.get("SCLC_TEST_CACHE") or Path.home() / ".cache" / "sclc-risk-node-tests")
    root.mkdir(parents=True, exist_ok=True)
    return root


def pyradiomics_case(case: str) -> tuple[Path, Path]:
    """Paths of ``<case>_image.nrrd`` and ``<case>_label.nrrd``, downloading the sdist on first use."""
    data_dir = cache_dir() / "pyradiomics-data"
    image_path, label_path = data_dir / f"{case}_image.nrrd", data_dir / f"{case}_label.nrrd"
    if image_path.exists() and label_path.exists():
        return image_path, label_path
    sdist = cache_dir() / SDIST_FILENAME
    if not sdist.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":none:",
                "-q",
                "-d",
                str(cache_dir()),
                SDIST,
            ],
            check=True,
        )
    data_dir.mkdir(exist_ok=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and member.name.split("/")[-2:-1] == ["data"] and name.startswith(f"{case}_"):
                member.name = name
                archive.extract(member, data_dir, filter="data")
    if not (image_path.exists() and label_path.exists()):
        raise FileNotFoundError(f"{case} not found in {sdist}")
    return image_path, label_path


def pyradiomics_case_as_dicom(case: str) -> tuple[Path, Path, Path, Path]:
    """The case converted to a DICOM CT series folder and a SEG (cached).

    Returns (ct_dir, seg_path, image_nrrd, label_nrrd).
    """
    from sclc_risk_node.dicom_io.synthetic import SyntheticPatient, build_tumour_seg, write_ct_series

    image_path, label_path = pyradiomics_case(case)
    out = cache_dir() / f"{case}-dicom-v1"
    ct_dir, seg_path = out / "ct", out / "seg.dcm"
    if not seg_path.exists():
        image = sitk.ReadImage(str(image_path))
        label = sitk.ReadImage(str(label_path))
        patient = SyntheticPatient(patient_id=f"PYRAD-{case}", accession_number=f"ACC{case}")
        tmp_ct = out / "ct.partial"
        shutil.rmtree(tmp_ct, ignore_errors=True)
        datasets = write_ct_series(image, tmp_ct, patient, series_description=f"pyradiomics {case}")
        seg = build_tumour_seg(datasets, label)
        tmp_ct.rename(ct_dir)
        seg.save_as(out / "seg.partial", enforce_file_format=True)
        (out / "seg.partial").rename(seg_path)
    return ct_dir, seg_path, image_path, label_path
