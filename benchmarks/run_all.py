"""Run every benchmark and print one JSON document: figures, ratios against a reference in the same run, targets.

    python benchmarks/run_all.py [--only NAME ...] [--quick] [--out FILE]

Each benchmark runs in its own process (so peak RSS and imports do not leak
from one to the next) and prints JSON; this script adds the machine (CPU
count and model, memory, load average before and after each benchmark,
since other work on the machine skews every figure) and writes the whole
document to stdout and to ``--out``.  ``--quick`` uses fewer repeats.

Benchmarks (issue 9 targets in brackets):
  scp          ingest, node vs DCMTK storescp                         [>= 0.8x]
  features     model-only vs full extraction, lung2, same values      [>= 5x]
  large_ct     512^3 `sclc-node score`: peak RSS, time vs 128x128 crop [<= 1.5 GB, <= 1.5x]
  lung2_score  `sclc-node score` on real lung2                        [<= 3 s]
  crop_scaling crop first vs whole volume as the scan grows
  e2e          last instance -> SR in Orthanc, median of 5            [<= 5 s]
  dask         cohort extraction, 1 vs 2 Dask workers                 [>= 1.8x]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BENCHMARKS = {
    "scp": (["bench_scp.py"], ["--repeats", "1"]),
    "features": (["bench_features.py", "--case", "lung2"], ["--repeats", "1"]),
    "large_ct": (["bench_large_ct.py"], []),
    "lung2_score": (["bench_lung_score.py", "--case", "lung2", "--repeats", "3"], ["--repeats", "1"]),
    "crop_scaling": (["bench_crop_scaling.py"], ["--sizes", "128", "512", "--slices", "64"]),
    "e2e": (["bench_e2e.py", "--repeats", "5"], ["--repeats", "2"]),
    "dask": (["bench_cohort_dask.py"], ["--patients", "4"]),
}


def machine() -> dict:
    cpu_model = ""
    try:
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    memory_kb = 0
    try:
        memory_kb = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(memory_kb / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def run_one(name: str, quick: bool) -> dict:
    args, quick_args = BENCHMARKS[name]
    command = [sys.executable, str(HERE / args[0]), *args[1:], *(quick_args if quick else [])]
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    entry = {
        "command": " ".join(["python", f"benchmarks/{args[0]}", *command[2:]]),
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if proc.returncode != 0:
        entry["error"] = (proc.stderr or proc.stdout)[-3000:]
        return entry
    try:
        entry["result"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        entry["error"] = f"not JSON: {proc.stdout[-2000:]}"
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    document = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "benchmarks": {},
    }
    for name in args.only or list(BENCHMARKS):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        document["benchmarks"][name] = run_one(name, args.quick)
        if args.out:
            args.out.write_text(json.dumps(document, indent=2) + "\n")
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if any("error" in entry for entry in document["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
