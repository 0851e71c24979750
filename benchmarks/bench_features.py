"""Time and memory of computing only a model's features vs a full pyradiomics run, same settings, same process.

    python benchmarks/bench_features.py [--repeats 3] [--sigmas 2.0] [--image CT.nrrd --mask LABEL.nrrd]

Default input: a synthetic 512x512x48 CT at 0.7x0.7x5 mm with a 30x24x36 mm
textured ellipsoid (``tests.scoring.phantoms``); ``--image/--mask`` take a
real case instead (e.g. pyradiomics' ``lung1``).  Both regions are used: the
tumour and its 2 mm ring.  "model" is ``extract_model_features`` for the
features below; "full" is ``extract_all_features`` (all classes, every
image type) on both regions.  Runs alternate model/full, ``--repeats`` times;
the medians are printed with their ratio.

Memory is the peak resident set size above the level just before each run,
sampled from /proc/self/statm every 2 ms (SimpleITK's C++ buffers are not
seen by tracemalloc, so RSS it is).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SimpleITK as sitk  # noqa: E402

from scoring.features import extract_all_features, extract_model_features, installed_pyradiomics_version  # noqa: E402
from scoring.ring import peritumoral_ring  # noqa: E402
from scoring.types import ExtractionSettings, FeatureSpec, RingDefinition  # noqa: E402
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


def load_case(args):
    if args.image:
        image = sitk.ReadImage(args.image)
        tumour = sitk.Cast(sitk.ReadImage(args.mask) == 1, sitk.sitkUInt8)
        return image, tumour, Path(args.image).name
    tumour = ellipsoid_mask((512, 512, 48), (0.7, 0.7, 5.0), (15.0, 12.0, 18.0))
    return textured_ct(tumour, seed=1), tumour, "synthetic 512x512x48 @ 0.7x0.7x5 mm"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.0], help="LoG sigmas enabled (mm)")
    parser.add_argument("--image", help="CT as any SimpleITK-readable file")
    parser.add_argument("--mask", help="tumour label map (label 1) on the CT's grid")
    args = parser.parse_args()
    if bool(args.image) != bool(args.mask):
        parser.error("--image and --mask go together")

    settings = ExtractionSettings(
        pyradiomics_version=installed_pyradiomics_version(),
        settings={
            "binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline", "label": 1,
        },
        image_types={"Original": {}, "Wavelet": {}, "LoG": {"sigma": list(args.sigmas)}},
    )
    log_types = {f"log-sigma-{str(sigma).replace('.', '-')}-mm-3D" for sigma in args.sigmas}
    specs = [FeatureSpec.from_name(name) for name in MODEL_FEATURES]
    specs = [spec for spec in specs if not spec.image_type.startswith("log-") or spec.image_type in log_types]

    image, tumour, label = load_case(args)
    ring_seconds, ring_mb, ring = measure(lambda: peritumoral_ring(tumour, RingDefinition(2.0, 2.0)))
    regions = {"tumour": tumour, "ring": ring}
    voxels = {name: int(sitk.GetArrayViewFromImage(mask).sum()) for name, mask in regions.items()}

    def model():
        return extract_model_features(image, regions, specs, settings)

    def full():
        return {name: extract_all_features(image, mask, settings) for name, mask in regions.items()}

    model()  # warm-up: imports, pywt filter banks, first-touch allocations
    runs = {"model": [], "full": []}
    for _ in range(args.repeats):
        for name, run in (("model", model), ("full", full)):
            seconds, megabytes, result = measure(run)
            runs[name].append((seconds, megabytes))
    counts = {"model": len(specs), "full": sum(len(values) for values in result.values())}

    print(f"case: {label}; tumour {voxels['tumour']} voxels, ring {voxels['ring']} voxels")
    print(f"pyradiomics {installed_pyradiomics_version()}; settings {dict(settings.settings)}")
    print(f"image types {dict(settings.image_types)}; median of {args.repeats} runs, same process")
    print(f"ring (not part of either run): {ring_seconds:.2f} s, +{ring_mb:.0f} MB RSS")
    print(f"{'run':<6}{'features':>10}{'seconds':>10}{'peak RSS +MB':>14}")
    medians = {}
    for name in ("model", "full"):
        seconds = statistics.median(s for s, _ in runs[name])
        megabytes = statistics.median(m for _, m in runs[name])
        medians[name] = (seconds, megabytes)
        print(f"{name:<6}{counts[name]:>10}{seconds:>10.2f}{megabytes:>14.0f}")
    time_ratio = medians["model"][0] / medians["full"][0]
    memory_ratio = medians["model"][1] / medians["full"][1] if medians["full"][1] > 0 else float("nan")
    print(f"model/full: time {time_ratio:.3f} ({1 / time_ratio:.1f}x faster), peak RSS {memory_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
