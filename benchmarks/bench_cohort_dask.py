"""Cohort feature extraction on a Dask cluster: 1 worker vs 2 workers, same cohort, same process.

    python benchmarks/bench_cohort_dask.py [--patients 8] [--repeats 1]

A simulated cohort (``research.simulate``, 64x64x32 CTs) is extracted
with ``extract_cohort_features`` (full pyradiomics, original + wavelet,
first-order/shape/GLSZM) on a local ``distributed.LocalCluster`` of 1 and of
2 single-threaded worker processes, each run with an empty cache.  Prints
JSON: seconds per run and the speed-up (target >= 1.8x; a 2-core machine
that is busy with other work cannot reach it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sclc_risk_node.research.cohort import load_cohort  # noqa: E402
from sclc_risk_node.research.extraction import extract_cohort_features  # noqa: E402
from sclc_risk_node.research.simulate import simulate_cohort  # noqa: E402
from sclc_risk_node.scoring.features import installed_pyradiomics_version  # noqa: E402
from sclc_risk_node.scoring.types import ExtractionSettings  # noqa: E402

SETTINGS = ExtractionSettings(
    pyradiomics_version=installed_pyradiomics_version(),
    settings={"binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline", "label": 1},
    image_types={"Original": {}, "Wavelet": {}},
)
CLASSES = ("firstorder", "shape", "glszm")


def cohort_csv(folder: Path, patients: int) -> Path:
    simulate_cohort(folder, scale=0.05, image_size=(64, 64, 32), progress=False)
    with open(folder / "cohort.csv", newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get("ct")]
    rows = rows[:patients]
    path = folder / "bench-cohort.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def timed_run(csv_path: Path, workers: int, cache: Path) -> float:
    import distributed

    with distributed.LocalCluster(
        n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=40
    ) as cluster:
        # Wait until the workers are up: their start-up is not extraction time.
        with distributed.Client(cluster.scheduler_address) as client:
            client.wait_for_workers(workers)
            client.run(lambda: __import__("radiomics") and None)  # import pyradiomics in every worker
        started = time.perf_counter()
        result = extract_cohort_features(
            load_cohort(csv_path),
            SETTINGS,
            feature_classes=CLASSES,
            cache_dir=cache,
            scheduler=cluster.scheduler_address,
            progress=False,
        )
        seconds = time.perf_counter() - started
    if result.failures:
        raise SystemExit(f"extraction failed: {result.failures}")
    return seconds


def run(patients: int = 8, repeats: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as temp:
        root = Path(temp)
        csv_path = cohort_csv(root / "sim", patients)
        n = sum(1 for _ in open(csv_path)) - 1
        times = {1: [], 2: []}
        for r in range(repeats):
            for workers in (1, 2):
                times[workers].append(timed_run(csv_path, workers, root / f"cache-{workers}-{r}"))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {
        "cohort": f"{n} simulated patients, 64x64x32 CT; full extraction ({', '.join(CLASSES)}; original + wavelet)",
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "seconds": {"1 worker": one, "2 workers": two},
        "runs": {f"{w} worker(s)": t for w, t in times.items()},
        "speedup": one / two,
        "target_speedup": 1.8,
        "met": one / two >= 1.8,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.patients, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
