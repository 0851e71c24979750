"""`sclc-node score` on a 512x512x512 CT against the same tumour in a 128x128x512 crop: time and peak RSS.

    python benchmarks/bench_large_ct.py [--repeats 1] [--json]

The CT is synthetic (0.7x0.7x1 mm, lung-like noise, a textured 6 cm
ellipsoidal tumour off centre) with a DICOM SEG of the tumour; the crop is
the same voxels, 128x128 in-plane around the tumour, all 512 slices.  Each
run is a fresh `sclc-node score` process (the whole user-facing path: read
the series and the SEG, ring, features, model, SR); peak RSS is that
process's, from GNU time (``/usr/bin/time -f %M``).  The generated studies are cached
under ``$SCLC_BENCH_CACHE`` (default ``~/.cache/sclc-risk-node-bench``).

Targets (issue 9): peak RSS <= 1.5 GB, time <= 1.5x the crop's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

SIZE = (512, 512, 512)
SPACING_MM = (0.7, 0.7, 1.0)
TUMOUR_SEMI_AXES_MM = (30.0, 26.0, 28.0)  # ~6 cm across
CROP_XY = 128
GNU_TIME = "/usr/bin/time"
CLINICAL = {
    "t_stage": "T3",
    "n_stage": "N2",
    "m_stage": "M1c",
    "ecog": 1,
    "anc": 5.1,
    "wbc": 7.4,
    "ldh": 310,
    "ldh_uln": 250,
}


def cache_dir() -> Path:
    root = Path(os.environ.get("SCLC_BENCH_CACHE") or Path.home() / ".cache" / "sclc-risk-node-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def synthetic_volume(seed: int = 11) -> tuple[sitk.Image, sitk.Image, tuple[int, int]]:
    """int16 CT and uint8 mask, built slice by slice (a float64 512^3 would be 1 GiB per temporary)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = SIZE
    centre_index = np.array([nx * 0.58, ny * 0.43, nz * 0.5])  # off centre, well inside
    ct = np.empty((nz, ny, nx), dtype=np.int16)
    mask = np.zeros((nz, ny, nx), dtype=np.uint8)
    for k in range(nz):
        ct[k] = np.clip(-850 + rng.normal(0.0, 40.0, (ny, nx)), -1024, 3071).astype(np.int16)
    # Textured tumour: smoothed noise in its bounding box only.
    half = np.ceil(np.array(TUMOUR_SEMI_AXES_MM) / np.array(SPACING_MM)).astype(int) + 2
    lo = (centre_index - half).astype(int)
    hi = (centre_index + half).astype(int)
    zz, yy, xx = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in (2, 1, 0)), indexing="ij")
    inside = (
        sum(
            ((g - centre_index[a]) * SPACING_MM[a] / TUMOUR_SEMI_AXES_MM[a]) ** 2
            for g, a in ((xx, 0), (yy, 1), (zz, 2))
        )
        <= 1.0
    )
    noise = sitk.GetImageFromArray(rng.normal(0.0, 1.0, inside.shape))
    noise.SetSpacing(SPACING_MM)
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 1.5))
    texture /= texture.std() or 1.0
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    ct[box] = np.where(inside, np.rint(40 + 60 * texture).astype(np.int16), ct[box])
    mask[box] = inside
    image = sitk.GetImageFromArray(ct)
    del ct
    image.SetSpacing(SPACING_MM)
    image.SetOrigin((-180.0, -179.2, -256.0))
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(image)
    return image, mask_image, (int(centre_index[0]), int(centre_index[1]))


def write_study(image: sitk.Image, mask: sitk.Image, folder: Path) -> None:
    from sclc_risk_node.dicom_io.synthetic import SyntheticPatient, build_tumour_seg, write_ct_series

    patient = SyntheticPatient(patient_id="BENCH-0001", patient_name="Bench^Large", accession_number="BENCH0001")
    datasets = write_ct_series(image, folder / "ct", patient)
    build_tumour_seg(datasets, mask).save_as(folder / "seg.dcm", enforce_file_format=True)
    record = dict(CLINICAL, accession_number=patient.accession_number)
    (folder / "clinical.json").write_text(json.dumps(record), encoding="utf-8")


def studies() -> dict[str, Path]:
    root = cache_dir()
    folders = {"512x512x512": root / "large-512", "128x128x512 crop": root / "crop-128"}
    if all((f / "clinical.json").exists() for f in folders.values()):
        return folders
    image, mask, (cx, cy) = synthetic_volume()
    lower = [cx - CROP_XY // 2, cy - CROP_XY // 2, 0]
    size = [CROP_XY, CROP_XY, SIZE[2]]
    for name, (ct, seg) in {
        "512x512x512": (image, mask),
        "128x128x512 crop": (sitk.RegionOfInterest(image, size, lower), sitk.RegionOfInterest(mask, size, lower)),
    }.items():
        write_study(ct, seg, folders[name])
    return folders


def score_once(
    folder: Path, *, ct_dir: Path | None = None, seg_path: Path | None = None, clinical_path: Path | None = None
) -> dict:
    """One `sclc-node score` process: wall seconds, its peak RSS, and the stage split it reports."""
    ct_dir = ct_dir or folder / "ct"
    seg_path = seg_path or folder / "seg.dcm"
    clinical_path = clinical_path or folder / "clinical.json"
    with tempfile.TemporaryDirectory(prefix="bench-score-") as temp:
        result_path = Path(temp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "sclc_risk_node.node.cli",
            "score",
            "--ct",
            str(ct_dir),
            "--seg",
            str(seg_path),
            "--clinical",
            str(clinical_path),
            "--out",
            str(Path(temp) / "sr.dcm"),
            "--json",
            str(result_path),
        ]
        # GNU time's %M is the peak RSS of the command after exec; os.wait4's ru_maxrss would also
        # count the forked copy of this (large) process before the exec.
        rss_path = Path(temp) / "maxrss-kb"
        started = time.perf_counter()
        proc = subprocess.run(
            [GNU_TIME, "-f", "%M", "-o", str(rss_path), *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"sclc-node score failed on {ct_dir}:\n{proc.stderr.decode()[-3000:]}")
        result = json.loads(result_path.read_text())
        peak_kb = int(rss_path.read_text().split()[-1])
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "stages_s": result.get("stage_seconds")}


def run(repeats: int = 1) -> dict:
    folders = studies()
    runs = {name: [score_once(folder) for _ in range(repeats)] for name, folder in folders.items()}
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "stages_s": results[len(results) // 2]["stages_s"],
        }
    large, crop = summary["512x512x512"], summary["128x128x512 crop"]
    return {
        "case": f"synthetic {SIZE} CT at {SPACING_MM} mm, tumour semi-axes {TUMOUR_SEMI_AXES_MM} mm; "
        f"median of {repeats} `sclc-node score` processes",
        "runs": summary,
        "time_ratio_large_over_crop": large["seconds"] / crop["seconds"],
        "targets": {"peak_rss_mb_max": 1536, "time_ratio_max": 1.5},
        "met": {"peak_rss": large["peak_rss_mb"] <= 1536, "time_ratio": large["seconds"] / crop["seconds"] <= 1.5},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
