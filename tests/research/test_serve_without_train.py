"""The service runs without the [train] extra: pandas, dask, tqdm, scikit-survival... cannot be imported.

Every process here (and every process it starts: scoring workers, the research dispatcher) runs with a
`sitecustomize` on PYTHONPATH whose import hook raises ModuleNotFoundError for the extra's modules, as if
they were not installed.  Then `sclc-node demo` scores the demo study, and `sclc-node serve` answers a
C-ECHO, receives a study routed by Orthanc, scores it and delivers the SR; a research command says which
extra to install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from sclc_risk_node.dicom_io.sr_writer import read_risk_sr
from sclc_risk_node.node.cli import TRAIN_EXTRA_MODULES
from sclc_risk_node.node.demo_study import DEMO_CLINICAL
from tests.node.dicom_tools import echoscu
from tests.node.peers import free_port, peers, requires_orthanc, requires_storescp  # noqa: F401 (fixture)
from tests.test_end_to_end import (
    NODE_AE,
    ORTHANC_AE,
    SR_SOP_CLASS,
    NodeProcess,
    demo,
    push_to_pacs_and_route,
    risk_sr_in_pacs,
    wait_for,
)

BLOCKER = """\
import importlib.abc
import sys

BLOCKED = frozenset({blocked!r})


class _WithoutTrainExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (test: no [train] extra)", name=fullname)
        return None


sys.meta_path.insert(0, _WithoutTrainExtra())
"""


@pytest.fixture
def without_train_extra(tmp_path, monkeypatch) -> dict[str, str]:
    """PYTHONPATH (inherited by every subprocess) with the blocking sitecustomize first."""
    folder = tmp_path / "without-train-extra"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(TRAIN_EXTRA_MODULES)))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return {"PYTHONPATH": str(folder)}


def sclc_node(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sclc_risk_node.node.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def test_the_blocker_hides_every_module_of_the_extra(without_train_extra):
    for name in TRAIN_EXTRA_MODULES:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, (name, proc.stderr)


def test_the_extra_lists_exactly_the_blocked_modules():
    """pyproject's [train] distributions and the modules the dispatcher (and this test) check are the same set."""
    import tomllib

    extra = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["train"]
    distributions = {requirement.split(">")[0].split("[")[0].split("=")[0] for requirement in extra}
    assert distributions == {"scikit-survival", "scikit-learn", "pandas", "tqdm", "dask", "lifelines"}
    # dask[distributed] brings `distributed`; scikit-survival imports as sksurv, scikit-learn as sklearn.
    assert set(TRAIN_EXTRA_MODULES) == {"sksurv", "sklearn", "pandas", "tqdm", "dask", "distributed", "lifelines"}


def test_the_test_command_installs_the_extra():
    """README's test command is scripts/test.sh, which installs [test]; [test] brings [train]."""
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "sclc-risk-node[train]" in extras["test"]
    assert "pip install -q -e '.[test]'" in (repo / "scripts" / "test.sh").read_text()
    assert "bash scripts/test.sh" in (repo / "README.md").read_text()


def test_demo_scores_the_demo_study_without_the_extra(without_train_extra, tmp_path):
    proc = sclc_node("demo", "--workdir", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert "Progression risk:" in proc.stdout
    assert "ModuleNotFoundError" not in proc.stderr


def test_a_research_command_names_the_extra_to_install(without_train_extra, tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("time,event\n1,1\n2,0\n")
    for argv in (("stats", "km", csv, "--time", "time", "--event", "event"), ("train", "--help")):
        proc = sclc_node(*argv)
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'sclc-risk-node[train]'" in proc.stderr
        assert "pandas" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.external
@requires_orthanc
@requires_storescp
def test_serve_echoes_receives_scores_and_delivers_without_the_extra(without_train_extra, tmp_path, peers, demo):
    node_dicom_port = free_port()
    orthanc = peers.orthanc(
        tmp_path / "orthanc", ae_title=ORTHANC_AE, modalities={"NODE": (NODE_AE, "127.0.0.1", node_dicom_port)}
    )
    node = NodeProcess(tmp_path / "node", orthanc_dicom_port=orthanc.dicom_port, dicom_port=node_dicom_port)
    try:
        node.start()
        echo = echoscu("127.0.0.1", node.dicom_port, called_ae=NODE_AE)
        assert echo.ok, echo.output
        push_to_pacs_and_route(orthanc, demo)
        study_uid = DEMO_CLINICAL["study_instance_uid"]
        wait_for(lambda: node.study(study_uid), 30, "the node to index the study", node)
        node.drop_clinical_record(DEMO_CLINICAL)
        [sr_id] = wait_for(lambda: risk_sr_in_pacs(orthanc), 180, "the SR in Orthanc", node)
        sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(sr_id)))
        assert sr.SOPClassUID == SR_SOP_CLASS and sr.StudyInstanceUID == study_uid
        assert read_risk_sr(sr).model.demonstration is True
        wait_for(
            lambda: (s := node.study(study_uid)) and s["state"] == "delivered", 30, "the study to be delivered", node
        )
        assert "ModuleNotFoundError" not in node.log_path.read_text()
    finally:
        node.stop()
