"""Time and size of the objects the node writes per study, beside the risk SR: ROI SR, KOS, PDF, SC.

    python benchmarks/bench_result_objects.py [--repeats 3]

Input: the bundled demo study (synthetic chest CT phantom, its SEG, the
shipped demonstration model), scored once; then each object is built
``--repeats`` times and the median build time and the encoded size printed.
"PDF + SC" share one matplotlib rendering (the page is drawn once).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sclc_risk_node.dicom_io.key_objects import build_key_object_selection  # noqa: E402
from sclc_risk_node.dicom_io.key_slice import find_key_slice  # noqa: E402
from sclc_risk_node.dicom_io.sr_writer import build_key_slice_roi_sr, build_risk_sr, document_header  # noqa: E402
from sclc_risk_node.dicom_io.summary import (  # noqa: E402
    build_encapsulated_pdf,
    build_secondary_capture,
    patient_line,
    render_summary,
)
from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study  # noqa: E402
from sclc_risk_node.node.scoring_job import default_model_path, load_model_file, score_files  # noqa: E402
from sclc_risk_node.scoring.clinical import clinical_record_from_mapping  # noqa: E402


def _encoded_bytes(dataset) -> int:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        demo = write_demo_study(Path(folder))
        model = load_model_file(default_model_path())
        clinical = clinical_record_from_mapping(json.loads(json.dumps(DEMO_CLINICAL)))
        scored = score_files(demo.ct_dir, demo.seg_path, [clinical], model)
        ct, segment, result = scored.ct, scored.segment, scored.result
        key = find_key_slice(ct, segment.mask)
        rendered = render_summary(
            ct, segment, result, key, ring=model.extraction.ring, patient_line=patient_line(document_header(ct))
        )
        steps = {
            "risk SR": lambda: build_risk_sr(ct, segment, clinical, result),
            "key slice": lambda: find_key_slice(ct, segment.mask),
            "ROI SR": lambda: build_key_slice_roi_sr(ct, segment, result, key),
            "KOS": lambda: build_key_object_selection(ct, segment, result, key),
            "page (render once)": lambda: render_summary(ct, segment, result, key, ring=model.extraction.ring),
            "Encapsulated PDF": lambda: build_encapsulated_pdf(ct, segment, result, key, rendered),
            "Secondary Capture": lambda: build_secondary_capture(ct, segment, result, key, rendered),
        }
        print(f"demo study: {len(ct.headers)} CT slices {ct.image.GetSize()}, key slice {key.index + 1}")
        print(f"{'object':<20} {'median s':>9} {'bytes':>10}")
        for name, build in steps.items():
            times, built = [], None
            for _ in range(args.repeats):
                started = time.perf_counter()
                built = build()
                times.append(time.perf_counter() - started)
            size = _encoded_bytes(built) if hasattr(built, "save_as") else None
            print(f"{name:<20} {statistics.median(times):>9.3f} {size if size is not None else '':>10}")


if __name__ == "__main__":
    main()
