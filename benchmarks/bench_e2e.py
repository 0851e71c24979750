"""End-to-end latency: last instance acknowledged by the node -> SR stored in Orthanc (the PACS).

    python benchmarks/bench_e2e.py [--case lung2] [--repeats 5]

`sclc-node serve` runs as a process (the end-to-end tests' configuration:
``completion.grace_s = 1``, one scoring worker, Orthanc as the destination);
its clinical record is in the inbox beforehand, then DCMTK's ``storescu``
sends the CT series and the SEG of pyradiomics' real ``lung2`` case
(61 slices) to the node.  The clock starts when storescu returns (the last
C-STORE acknowledged) and stops when Orthanc's REST API lists the SR.  Each
repeat uses a fresh node (fresh spool; the workers warmed up before the
send) and deletes the SR from Orthanc afterwards (its UID is deterministic).
Prints JSON: the median and every run, and the node's stage split.
Target (issue 9): median <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402

from tests.node.dicom_tools import storescu  # noqa: E402
from tests.node.peers import start_orthanc  # noqa: E402
from tests.realdata import pyradiomics_case_as_dicom  # noqa: E402
from tests.test_end_to_end import NODE_AE, ORTHANC_AE, NodeProcess, wait_for, worker_pids  # noqa: E402

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
WARM_UP_S = 20.0  # imports + model load in the worker, on a busy machine


def sr_ids(orthanc, study_uid: str) -> list[str]:
    return list(
        orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR", "StudyInstanceUID": study_uid}})
    )


def result_ids(orthanc, study_uid: str) -> list[str]:
    """Every object the node sent for the study (risk SR, ROI SR, KOS, PDF, SC)."""
    return list(orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}))


def delete_study(orthanc, study_uid: str) -> None:
    """A fresh start for the next repeat: the results are deterministic (same UIDs), and one left
    behind from the previous repeat would be found at once."""
    for study_id in orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}):
        request = urllib.request.Request(f"{orthanc.rest_url}/studies/{study_id}", method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()


def run(case: str = "lung2", repeats: int = 5) -> dict:
    ct_dir, seg_path, _, _ = pyradiomics_case_as_dicom(case)
    header = pydicom.dcmread(next(p for p in sorted(ct_dir.iterdir()) if p.suffix == ".dcm"), stop_before_pixels=True)
    study_uid = str(header.StudyInstanceUID)
    record = dict(CLINICAL, study_instance_uid=study_uid, accession_number=str(header.get("AccessionNumber", "")))
    latencies, stages, all_objects, objects_delivered = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as temp:
        root = Path(temp)
        orthanc = start_orthanc(root / "orthanc", ae_title=ORTHANC_AE)
        try:
            for repeat in range(repeats):
                node = NodeProcess(root / f"node-{repeat}", orthanc_dicom_port=orthanc.dicom_port).start()
                try:
                    wait_for(lambda: worker_pids(node.process.pid), 60, "the scoring worker", node)  # noqa: B023 - waited on at once
                    time.sleep(WARM_UP_S)
                    node.drop_clinical_record(record)
                    sent = storescu("127.0.0.1", node.dicom_port, [ct_dir, seg_path], called_ae=NODE_AE)
                    acknowledged = time.perf_counter()
                    if not sent.ok:
                        raise SystemExit(f"storescu failed:\n{sent.output[-2000:]}")
                    wait_for(lambda: sr_ids(orthanc, study_uid), 300, "the SR in Orthanc", node, interval_s=0.05)
                    latencies.append(time.perf_counter() - acknowledged)
                    wait_for(
                        lambda node=node: (s := node.study(study_uid)) and s["state"] == "delivered",
                        300,
                        "every delivery",
                        node,
                    )
                    all_objects.append(time.perf_counter() - acknowledged)
                    objects_delivered.append(len(result_ids(orthanc, study_uid)))
                    stages.append(node.study(study_uid).get("stage_seconds"))
                    delete_study(orthanc, study_uid)
                finally:
                    node.stop()
        finally:
            orthanc.stop()
    median = statistics.median(latencies)
    return {
        "case": f"pyradiomics {case} as DICOM ({sum(1 for _ in ct_dir.iterdir())} CT files + SEG), "
        "storescu -> node -> Orthanc, grace_s = 1",
        "repeats": repeats,
        "median_s": median,
        "runs_s": latencies,
        "all_objects_delivered_median_s": statistics.median(all_objects),
        "all_objects_runs_s": all_objects,
        "objects_delivered": objects_delivered,
        "stage_seconds": stages,
        "target_s": 5.0,
        "met": median <= 5.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="lung2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.case, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
