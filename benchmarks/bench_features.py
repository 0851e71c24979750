"""Time and memory of computing only a model's features vs a full pyradiomics run, same settings, same process.

    python benchmarks/bench_features.py [--repeats 3] [--sigmas 2.0]
        [--case lung2 | --synthetic | --image CT.nrrd --mask LABEL.nrrd]

Default input: pyradiomics' real ``lung2`` case (``tests/realdata.py``);
``--synthetic`` takes a synthetic 512x512x48 CT at 0.7x0.7x5 mm with a
30x24x36 mm textured ellipsoid, ``--image/--mask`` any case.  Both regions
are used: the tumour and its 2 mm ring, made beforehand for both runs.
"model" is the node's extraction (``scoring.pipeline``: crop first, then
``extract_model_features`` for the features below); "full" is
``extract_all_features`` (all classes, every image type) on both regions of
the whole volume.  Runs alternate model/full, ``--repeats``
times; the medians are printed as JSON with their ratio, and the model's
values are checked against the full run's (1e-6 relative).

Memory is the peak resident set size above the level just before each run,
sampled from /proc/self/statm every 2 ms (SimpleITK's C++ buffers are not
seen by tracemalloc, so RSS it is).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SimpleITK as sitk  # noqa: E402

from sclc_risk_node.scoring.crop import plan_crop  # noqa: E402
from sclc_risk_node.scoring.features import extract_all_features, extract_model_features, installed_pyradiomics_version  # noqa: E402
from sclc_risk_node.scoring.ring import peritumoral_ring  # noqa: E402
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, RingDefinition  # noqa: E402
from tests.scoring.phantoms import ellipsoid_mask, textured_ct  # noqa: E402

MODEL_FEATURES = (
    "tumour.original_shape_Sphericity",
    "tumour.original_firstorder_Mean",
    "tumour.wavelet-LLH_glcm_Correlation",
    "tumour.wavelet-HLL_glszm_ZoneEntropy",
    "ring.original_firstorder_Mean",
    "ring.original_glrlm_RunEntropy",
    "ring.wavelet-LHL_gldm_DependenceEntropy",
    "ring.wavelet-HHH_ngtdm_Busyness",
    "ring.log-sigma-2-0-mm-3D_glszm_ZoneEntropy",
)

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


class PeakResident:
    """Peak RSS above the level at entry, sampled in a background thread."""

    def __enter__(self):
        gc.collect()
        self.baseline = resident_bytes()
        self.peak = self.baseline
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.above_baseline_mb = (self.peak - self.baseline) / 2**20


def measure(run):
    with PeakResident() as memory:
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
    return seconds, memory.above_baseline_mb, result


def load_case(case: str | None, image_path: str | None = None, mask_path: str | None = None):
    if case:
        from tests.realdata import pyradiomics_case

        image_path, mask_path = (str(p) for p in pyradiomics_case(case))
    if image_path:
        image = sitk.ReadImage(image_path)
        tumour = sitk.Cast(sitk.ReadImage(mask_path) == 1, sitk.sitkUInt8)
        return image, tumour, case or Path(image_path).name
    tumour = ellipsoid_mask((512, 512, 48), (0.7, 0.7, 5.0), (15.0, 12.0, 18.0))
    return textured_ct(tumour, seed=1), tumour, "synthetic 512x512x48 @ 0.7x0.7x5 mm"


def run(case: str | None = "lung2", *, repeats: int = 3, sigmas=(2.0,), image_path=None, mask_path=None) -> dict:
    settings = ExtractionSettings(
        pyradiomics_version=installed_pyradiomics_version(),
        settings={
            "binWidth": 25,
            "resampledPixelSpacing": [1.0, 1.0, 1.0],
            "interpolator": "sitkBSpline",
            "label": 1,
        },
        image_types={"Original": {}, "Wavelet": {}, "LoG": {"sigma": list(sigmas)}},
        ring=RingDefinition(2.0, 2.0),
    )
    log_types = {f"log-sigma-{str(sigma).replace('.', '-')}-mm-3D" for sigma in sigmas}
    specs = [FeatureSpec.from_name(name) for name in MODEL_FEATURES]
    specs = [spec for spec in specs if not spec.image_type.startswith("log-") or spec.image_type in log_types]

    image, tumour, label = load_case(case, image_path, mask_path)
    ring_seconds, ring_mb, ring = measure(lambda: peritumoral_ring(tumour, settings.ring))
    regions = {"tumour": tumour, "ring": ring}
    voxels = {name: int(sitk.GetArrayViewFromImage(mask).sum()) for name, mask in regions.items()}

    def model():
        # The node's extraction step (scoring.pipeline.model_features without the ring, which both
        # runs are given): crop first, then only the model's features.
        plan = plan_crop(tumour, settings)
        cropped = {name: plan.box.apply(mask) for name, mask in regions.items()}
        return extract_model_features(image, cropped, specs, settings, crop=plan.box).values

    def full():
        return {name: extract_all_features(image, mask, settings) for name, mask in regions.items()}

    model()  # warm-up: imports, pywt filter banks, first-touch allocations
    runs = {"model": [], "full": []}
    results = {}
    for _ in range(repeats):
        for name, fn in (("model", model), ("full", full)):
            seconds, megabytes, results[name] = measure(fn)
            runs[name].append((seconds, megabytes))
    mismatches = []
    for spec in specs:
        ours, theirs = results["model"][spec.name], results["full"][spec.region][spec.pyradiomics_key]
        if not (math.isfinite(theirs) and abs(ours - theirs) <= 1e-6 * max(abs(theirs), 1e-9)):
            mismatches.append({"feature": spec.name, "model": ours, "full": theirs})
    medians = {
        name: {
            "seconds": statistics.median(s for s, _ in values),
            "peak_rss_above_start_mb": statistics.median(m for _, m in values),
        }
        for name, values in runs.items()
    }
    medians["model"]["features"] = len(specs)
    medians["full"]["features"] = sum(len(values) for values in results["full"].values())
    speedup = medians["full"]["seconds"] / medians["model"]["seconds"]
    return {
        "case": label,
        "tumour_voxels": voxels["tumour"],
        "ring_voxels": voxels["ring"],
        "pyradiomics": installed_pyradiomics_version(),
        "image_types": dict(settings.image_types),
        "repeats": repeats,
        "ring_made_beforehand_s": round(ring_seconds, 3),
        "model": medians["model"],
        "full": medians["full"],
        "speedup_full_over_model": speedup,
        "same_values": not mismatches,
        "mismatches": mismatches,
        "target_speedup": 5.0,
        "met": speedup >= 5.0 and not mismatches,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.0], help="LoG sigmas enabled (mm)")
    parser.add_argument("--case", default="lung2", help="pyradiomics case (lung1, lung2)")
    parser.add_argument("--synthetic", action="store_true", help="the synthetic 512x512x48 case instead")
    parser.add_argument("--image", help="CT as any SimpleITK-readable file")
    parser.add_argument("--mask", help="tumour label map (label 1) on the CT's grid")
    args = parser.parse_args()
    if bool(args.image) != bool(args.mask):
        parser.error("--image and --mask go together")
    case = None if (args.synthetic or args.image) else args.case
    print(
        json.dumps(
            run(case, repeats=args.repeats, sigmas=args.sigmas, image_path=args.image, mask_path=args.mask), indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
