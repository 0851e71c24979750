"""Crop first vs whole volume: scoring cost as the scan grows around the same tumour, in process.

    python benchmarks/bench_crop_scaling.py [--sizes 128 256 512] [--slices 96] [--repeats 1]

The same synthetic tumour (textured ellipsoid, 12x10x14 mm semi-axes, at
0.7x0.7x1 mm) sits in CTs of growing in-plane size.  "crop first" is the
node's path (``scoring.pipeline.model_features``: crop, ring, the model's
features); "whole volume" is the ring and ``extract_model_features`` on the
uncropped volume, i.e. the path before issue 9.  Time and peak RSS above the
start of each run are printed as JSON, with each size's time relative to the
smallest (crop first should stay flat, the whole volume grow with the scan).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_features import measure  # noqa: E402
from sclc_risk_node.models import shipped_model_path  # noqa: E402
from sclc_risk_node.scoring.features import extract_model_features, installed_pyradiomics_version  # noqa: E402
from sclc_risk_node.scoring.pipeline import model_features  # noqa: E402
from sclc_risk_node.scoring.ring import peritumoral_ring  # noqa: E402
from tests.scoring.phantoms import ellipsoid_mask, textured_ct  # noqa: E402

SPACING_MM = (0.7, 0.7, 1.0)
SEMI_AXES_MM = (12.0, 10.0, 14.0)


def demo_model_specs_and_settings():
    from sclc_risk_node.scoring.model import FrozenModel

    model = FrozenModel.from_json(shipped_model_path("demo-integrated-cox-2.0.0.json").read_text())
    return model.feature_specs, model.extraction


def run(sizes=(128, 256, 512), slices: int = 96, repeats: int = 1) -> dict:
    specs, settings = demo_model_specs_and_settings()
    rows = []
    for size in sizes:
        tumour = ellipsoid_mask((size, size, slices), SPACING_MM, SEMI_AXES_MM)
        image = textured_ct(tumour, seed=4)

        def crop_first(image=image, tumour=tumour):
            return model_features(image, tumour, specs, settings).values

        def whole(image=image, tumour=tumour):
            ring = peritumoral_ring(tumour, settings.ring)
            return extract_model_features(image, {"tumour": tumour, "ring": ring}, specs, settings).values

        results = {}
        timings = {"crop_first": [], "whole_volume": []}
        for _ in range(repeats):
            for name, fn in (("crop_first", crop_first), ("whole_volume", whole)):
                seconds, megabytes, results[name] = measure(fn)
                timings[name].append((seconds, megabytes))
        worst = max(abs(results["crop_first"][k] - v) / max(abs(v), 1e-9) for k, v in results["whole_volume"].items())
        rows.append(
            {
                "ct": f"{size}x{size}x{slices}",
                **{
                    name: {
                        "seconds": statistics.median(s for s, _ in values),
                        "peak_rss_above_start_mb": statistics.median(m for _, m in values),
                    }
                    for name, values in timings.items()
                },
                "max_relative_difference": worst,
            }
        )
        del image, tumour
    smallest = rows[0]
    for row in rows:
        for name in ("crop_first", "whole_volume"):
            row[name]["time_vs_smallest"] = row[name]["seconds"] / smallest[name]["seconds"]
    return {
        "tumour": f"ellipsoid semi-axes {SEMI_AXES_MM} mm at {SPACING_MM} mm; demonstration model's "
        f"{len(specs)} features; pyradiomics {installed_pyradiomics_version()}",
        "repeats": repeats,
        "sizes": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.sizes, args.slices, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
