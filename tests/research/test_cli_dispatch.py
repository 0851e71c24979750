"""`sclc-node` hands the research commands to research/cli.py: same help, same parsing, same exit statuses."""

from __future__ import annotations

import argparse
import subprocess
import sys


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_sclc_node_lists_the_research_commands_with_research_clis_own_help():
    from sclc_risk_node.node.cli import RESEARCH_COMMANDS
    from sclc_risk_node.node.cli import build_parser as node_parser
    from sclc_risk_node.research.cli import build_parser as research_parser

    research = subcommands(research_parser())
    assert research == dict(RESEARCH_COMMANDS)
    node = subcommands(node_parser())
    assert {name: node[name] for name in RESEARCH_COMMANDS} == research


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def test_help_and_usage_errors_are_research_clis_own(tmp_path):
    for argv in (("train", "--help"), ("stats", "km", "--help"), ("simulate-cohort", "--help")):
        via_node, direct = run("sclc_risk_node.node.cli", *argv), run("sclc_risk_node.research.cli", *argv)
        assert (via_node.returncode, via_node.stdout) == (0, direct.stdout) and "usage: sclc-node" in direct.stdout
    missing = run("sclc_risk_node.node.cli", "train", "--cohort", "c.csv")
    assert missing.returncode == 2 and "the following arguments are required: --spec" in missing.stderr
    bad = run("sclc_risk_node.node.cli", "stats", "km", str(tmp_path / "none.csv"), "--time", "t", "--event", "e")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "does not exist" in bad.stderr


def test_the_service_does_not_load_the_research_side():
    """(tqdm is left out: pydicom.data imports it when it is there, and goes on without it,
    test_serve_without_train.py.)"""
    code = (
        "import sys\n"
        "from sclc_risk_node.node.cli import build_parser\n"
        "build_parser().parse_args(['status'])\n"
        "import sclc_risk_node.node.service, sclc_risk_node.node.demo_study\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('sclc_risk_node.research') or m.split('.')[0] in "
        "('pandas', 'sksurv', 'sklearn', 'lifelines', 'dask', 'distributed'))\n"
        "print(loaded)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
