"""`sclc-node stats cox|km|logrank` through research.stats_cli's parser and handlers.

The parser is built exactly as node/cli.py does (``add_stats_parser(sub)``), the
data is written to a CSV in tmp_path and the JSON the handler writes is checked
against published R output (sources in tests/scoring/test_stats.py):
summary(coxph(Surv(time, status) ~ age + sex, lung)) from the survival package's
tests/Examples/survival-Ex.Rout.save; survfit(~ ph.ecog) from the same file;
survdiff(~ sex) from the Packt "Machine Learning with R Cookbook" log-rank recipe.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from sclc_risk_node.research.stats_cli import add_stats_parser
from sclc_risk_node.scoring.errors import InputError


def lung_frame() -> pd.DataFrame:
    spec = importlib.util.find_spec("lifelines")  # the NCCTG lung data ships in the lifelines wheel
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lifelines (test extra) is not installed: no lung.csv")
    return pd.read_csv(Path(list(spec.submodule_search_locations)[0]) / "datasets" / "lung.csv")


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="sclc-node")
    add_stats_parser(root.add_subparsers(dest="command", required=True))
    return root


@pytest.fixture
def lung_csv(tmp_path) -> Path:
    path = tmp_path / "lung.csv"
    lung_frame().to_csv(path, index=False)
    return path


def run(parser, *argv) -> int:
    args = parser.parse_args([str(a) for a in argv])
    return args.handler(args)


def test_cox_writes_r_matching_json_and_a_table(parser, lung_csv, tmp_path, capsys):
    out = tmp_path / "out" / "cox.json"
    code = run(
        parser,
        "stats",
        "cox",
        lung_csv,
        "--time",
        "time",
        "--event",
        "status",
        "--covariates",
        "age,sex",
        "--json",
        out,
    )
    assert code == 0
    payload = json.loads(out.read_text())
    assert (payload["n"], payload["events"]) == (228, 165)
    assert list(payload["coefficients"]) == ["age", "sex"]
    age, sex = payload["coefficients"]["age"], payload["coefficients"]["sex"]
    assert set(sex) >= {"coef", "hr", "ci_low", "ci_high", "p"}
    assert age["coef"] == pytest.approx(0.017045, abs=5e-7)
    assert sex["coef"] == pytest.approx(-0.513219, abs=5e-7)
    assert sex["hr"] == pytest.approx(0.598566, abs=5e-7)
    assert (sex["ci_low"], sex["ci_high"]) == (pytest.approx(0.4311, abs=5e-5), pytest.approx(0.8311, abs=5e-5))
    assert sex["p"] == pytest.approx(0.00218, abs=5e-6)
    assert payload["concordance"] == pytest.approx(0.603, abs=5e-4)
    stdout = capsys.readouterr().out
    assert "n=228, events=165" in stdout and "-0.513219" in stdout and "0.603" in stdout


def test_km_groups_with_null_for_unreached_limits(parser, lung_csv, tmp_path, capsys):
    out = tmp_path / "km.json"
    assert (
        run(parser, "stats", "km", lung_csv, "--time", "time", "--event", "status", "--group", "ph.ecog", "--json", out)
        == 0
    )
    groups = json.loads(out.read_text())["groups"]
    assert groups["0"] == {"n": 63, "events": 37, "median": 394, "ci_low": 348, "ci_high": 574}
    assert groups["3"] == {"n": 1, "events": 1, "median": 118, "ci_low": None, "ci_high": None}
    assert "null" in out.read_text()
    assert "observation deleted due to missingness" in capsys.readouterr().out


def test_km_without_group_is_all(parser, lung_csv, tmp_path):
    out = tmp_path / "km_all.json"
    assert run(parser, "stats", "km", lung_csv, "--time", "time", "--event", "status", "--json", out) == 0
    assert json.loads(out.read_text())["groups"] == {
        "all": {"n": 228, "events": 165, "median": 310, "ci_low": 285, "ci_high": 363}
    }


def test_logrank_json(parser, lung_csv, tmp_path, capsys):
    out = tmp_path / "lr.json"
    assert (
        run(
            parser, "stats", "logrank", lung_csv, "--time", "time", "--event", "status", "--group", "sex", "--json", out
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert payload["df"] == 1
    assert payload["chi2"] == pytest.approx(10.3267, abs=5e-5)
    assert payload["p"] == pytest.approx(0.00131116, abs=5e-9)
    assert "Chisq= 10.3 on 1 degrees of freedom" in capsys.readouterr().out


def test_json_is_optional(parser, lung_csv, tmp_path, capsys):
    assert run(parser, "stats", "km", lung_csv, "--time", "time", "--event", "status", "--group", "sex") == 0
    assert "270" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [lung_csv]


def test_yes_no_event_text_in_csv(parser, tmp_path):
    lung = lung_frame()
    path = tmp_path / "yes_no.csv"
    lung.assign(status=lung["status"].map({0: "no", 1: "yes"})).to_csv(path, index=False)
    out = tmp_path / "lr.json"
    run(parser, "stats", "logrank", path, "--time", "time", "--event", "status", "--group", "sex", "--json", out)
    assert json.loads(out.read_text())["chi2"] == pytest.approx(10.3267, abs=5e-5)


# ------------------------------------------------------------------ bad input


def test_unknown_column_is_named(parser, lung_csv):
    with pytest.raises(InputError, match=r"column 'ecog' not found"):
        run(parser, "stats", "cox", lung_csv, "--time", "time", "--event", "status", "--covariates", "age,ecog")
    with pytest.raises(InputError, match=r"column 'arm' not found"):
        run(parser, "stats", "logrank", lung_csv, "--time", "time", "--event", "status", "--group", "arm")


def test_non_binary_event_names_column_and_value(parser, tmp_path):
    path = tmp_path / "r_coded.csv"
    lung = lung_frame()
    lung.assign(status=lung["status"] + 1).to_csv(path, index=False)  # R's 1/2 coding
    with pytest.raises(InputError) as excinfo:
        run(parser, "stats", "km", path, "--time", "time", "--event", "status")
    message = str(excinfo.value)
    assert "event column 'status'" in message and "value 2" in message and "\n" not in message

    path.write_text("time,status\n5,1\n7,dead\n9,0\n")
    with pytest.raises(InputError, match=r"event column 'status': value 'dead' is not an event indicator"):
        run(parser, "stats", "km", path, "--time", "time", "--event", "status")


def test_unreadable_csv(parser, tmp_path):
    with pytest.raises(InputError, match=r"does not exist"):
        run(parser, "stats", "km", tmp_path / "missing.csv", "--time", "t", "--event", "e")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match=r"is empty"):
        run(parser, "stats", "km", empty, "--time", "t", "--event", "e")


def test_required_options(parser, lung_csv):
    with pytest.raises(SystemExit):
        parser.parse_args(["stats", "logrank", str(lung_csv), "--time", "time", "--event", "status"])
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["stats", "cox", str(lung_csv), "--time", "time", "--event", "status", "--covariates", "age,"]
        )
