"""`sclc-node ibsi`: the IBSI 1 phantoms through the project's extraction, against the consensus values.

Wiring only: configurations, the pyradiomics -> IBSI name map, the IBSI image
processing and the comparison live in :mod:`scoring.ibsi`.  This module finds
and reads the phantoms, reads the reference values shipped with the node
(``node/ibsi_reference_values.csv``), and prints one table per phantom and
configuration, or JSON.

    sclc-node ibsi [--data-dir DIR] [--configurations digital,A,B,C,D,E]
                   [--method ibsi|stock|both] [--without ADJUSTMENT ...] [--mismatches-only] [--json [OUT]]

The phantoms (the CT phantom is CC BY-NC) are not part of the project: they are read from
``--data-dir``, else ``$SCLC_IBSI_DATA``, else ``shared/data/ibsi`` beside the
repository (``<repo>/../shared/data/ibsi``).  The command is a report: it exits
0 whatever the agreement, and 2 when a phantom file is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:  # the imports themselves stay lazy: pyradiomics is slow to import
    import SimpleITK as sitk

    from sclc_risk_node.scoring.ibsi import ConfigurationReport, ReferenceValue

EXIT_OK = 0
DATA_DIR_ENV = "SCLC_IBSI_DATA"
REFERENCE_FILE = "ibsi_reference_values.csv"


class FeatureRowJson(TypedDict):
    """One feature of a report in ``--json`` output; ``value`` is null when not computed."""

    pyradiomics: str
    ibsi_tag: str
    ibsi_name: str
    value: float | None
    reference: float
    tolerance: float
    outcome: str


class ReportJson(TypedDict):
    """One configuration and method in ``--json`` output."""

    configuration: str
    data_set: str
    description: str
    method: str
    pyradiomics_settings: dict[str, object]
    counts: dict[str, int]
    features: list[FeatureRowJson]


class IbsiJson(TypedDict):
    """The whole ``--json`` document."""

    pyradiomics_version: str
    data_dir: str
    reference: str
    match_rule: str
    ibsi_adjustments_off: list[str]
    reports: list[ReportJson]


def default_data_dir() -> Path:
    """``$SCLC_IBSI_DATA``, else ``shared/data/ibsi`` beside the repository root.

    A git worktree may sit deeper (``work/wt/NAME``) than the clone the shared
    folder was put beside, so the nearest ancestor holding
    ``shared/data/ibsi`` wins; if none does, the path beside the repository is
    returned and the missing file is reported there.
    """
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    repository = Path(__file__).resolve().parents[1]
    for ancestor in repository.parents:
        candidate = ancestor / "shared" / "data" / "ibsi"
        if candidate.is_dir():
            return candidate
    return repository.parent / "shared" / "data" / "ibsi"


def load_references() -> dict[tuple[str, str], ReferenceValue]:
    from sclc_risk_node.scoring.ibsi import parse_reference_csv

    text = resources.files("sclc_risk_node.node").joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
    return parse_reference_csv(text)


def read_phantom(data_dir: Path, data_set: str) -> tuple[sitk.Image, sitk.Image]:
    """(image, mask) of one phantom folder (``image.nii.gz``, ``mask.nii.gz``)."""
    import SimpleITK as sitk

    from sclc_risk_node.scoring.errors import InputError

    folder = Path(data_dir) / data_set
    images: list[sitk.Image] = []
    for name in ("image.nii.gz", "mask.nii.gz"):
        path = folder / name
        if not path.is_file():
            raise InputError(
                f"IBSI phantom file {path} is missing; give the folder holding digital_phantom/ and ct_phantom/ "
                f"with --data-dir or ${DATA_DIR_ENV}"
            )
        try:
            images.append(sitk.ReadImage(str(path)))
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
            raise InputError(f"IBSI phantom file {path} cannot be read: {first_line}") from None
    return images[0], images[1]


def run(
    data_dir: Path, configuration_names: Sequence[str], methods: Sequence[str], without: Sequence[str] = ()
) -> list[ConfigurationReport]:
    """Reports for every configuration and method, each phantom read once.

    ``without`` names IBSI adjustments to switch off in the ``ibsi`` method (to measure what each one does).
    """
    from sclc_risk_node.scoring import ibsi

    adjustments = ibsi.ALL_ADJUSTMENTS
    for name in without:
        adjustments = adjustments.without(name)
    references = load_references()
    phantoms: dict[str, tuple[sitk.Image, sitk.Image]] = {}
    reports: list[ConfigurationReport] = []
    for name in configuration_names:
        configuration = ibsi.CONFIGURATIONS[name]
        if configuration.data_set not in phantoms:
            phantoms[configuration.data_set] = read_phantom(data_dir, configuration.data_set)
        image, mask = phantoms[configuration.data_set]
        for method in methods:
            values = ibsi.extract(image, mask, configuration, ibsi.Method(method), adjustments)
            reports.append(ibsi.compare(values, references, configuration, ibsi.Method(method)))
    return reports


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_report(report: ConfigurationReport, mismatches_only: bool = False) -> str:
    from sclc_risk_node.scoring.ibsi import Outcome

    configuration = report.configuration
    title = "digital phantom" if configuration.name == "digital" else f"CT phantom, configuration {configuration.name}"
    lines = [
        f"== {title} ({report.method.value}) — {configuration.description}",
        f"{'pyradiomics feature':<44} {'IBSI tag':<26} {'ours':>11} {'reference':>11} {'tolerance':>10}  outcome",
    ]
    for row in report.comparisons:
        if mismatches_only and row.outcome is Outcome.MATCHED:
            continue
        lines.append(
            f"{row.pyradiomics:<44} {row.ibsi_tag:<26} {_number(row.value):>11} {_number(row.reference):>11} "
            f"{_number(row.tolerance):>10}  {row.outcome.value}"
        )
    lines.append(_summary_line(report))
    return "\n".join(lines)


def _summary_line(report: ConfigurationReport) -> str:
    from sclc_risk_node.scoring.ibsi import Outcome

    total = len(report.comparisons)
    counts = ", ".join(f"{report.count(outcome)} {outcome.value}" for outcome in Outcome)
    matched = report.count(Outcome.MATCHED)
    return f"{report.configuration.name:<8} {report.method.value:<6} {matched}/{total} matched ({counts})"


def report_as_json(reports: Sequence[ConfigurationReport], data_dir: Path, without: Sequence[str] = ()) -> IbsiJson:
    from sclc_risk_node.scoring.features import installed_pyradiomics_version
    from sclc_risk_node.scoring.ibsi import Outcome

    def plain(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else value

    return {
        "pyradiomics_version": installed_pyradiomics_version(),
        "data_dir": str(data_dir),
        "reference": "IBSI reference manual (Zwanenburg et al., Radiology 2020; arXiv:1612.07003)",
        "match_rule": "value rounded to 3 significant digits within the tolerance of the reference",
        "ibsi_adjustments_off": list(without),
        "reports": [
            {
                "configuration": report.configuration.name,
                "data_set": report.configuration.data_set,
                "description": report.configuration.description,
                "method": report.method.value,
                "pyradiomics_settings": report.configuration.pyradiomics_settings(),
                "counts": {outcome.value: report.count(outcome) for outcome in Outcome},
                "features": [
                    {
                        "pyradiomics": row.pyradiomics,
                        "ibsi_tag": row.ibsi_tag,
                        "ibsi_name": row.ibsi_name,
                        "value": plain(row.value),
                        "reference": row.reference,
                        "tolerance": row.tolerance,
                        "outcome": row.outcome.value,
                    }
                    for row in report.comparisons
                ],
            }
            for report in reports
        ],
    }


def _configuration_list(text: str) -> list[str]:
    from sclc_risk_node.scoring.ibsi import CONFIGURATIONS

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGURATIONS)}"
        )
    return names


def cmd_ibsi(args: argparse.Namespace) -> int:
    # pyradiomics warns, for every GLCM, that sum average is twice the joint average; the report is the output.
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    methods = ["stock", "ibsi"] if args.method == "both" else [args.method]
    without = list(dict.fromkeys(args.without))
    reports = run(data_dir, args.configurations, methods, without)
    if args.json is not None:
        payload = json.dumps(report_as_json(reports, data_dir, without), indent=2, allow_nan=False) + "\n"
        if args.json == "-":
            print(payload, end="")
            return EXIT_OK
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(payload, encoding="utf-8")
    for report in reports:
        print(format_report(report, args.mismatches_only))
        print()
    if without and "ibsi" in methods:
        print(f"IBSI adjustments switched off: {', '.join(without)}")
    print("Summary (matched / features with a reference value):")
    for report in reports:
        print("  " + _summary_line(report))
    return EXIT_OK


def add_ibsi_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``ibsi`` on the ``sclc-node`` sub-parser set."""
    from sclc_risk_node.scoring.ibsi import CONFIGURATIONS, IbsiAdjustments

    parser = subparsers.add_parser(
        "ibsi",
        help="check the feature extraction against the IBSI 1 phantoms' consensus values",
        description=(
            "Run the IBSI 1 digital phantom and the IBSI 1 CT phantom (configurations A-E) through the node's "
            "pyradiomics extraction and print, per feature, our value, the consensus reference, its tolerance "
            "and whether it matched. 'stock' is the node's extraction with the configuration as pyradiomics "
            "settings; 'ibsi' adds the IBSI image processing pyradiomics lacks (see docs/ibsi.md)."
        ),
        epilog=(
            f"Phantoms are read from --data-dir, else ${DATA_DIR_ENV}, else shared/data/ibsi beside the repository. "
            "Exit status 0 whatever the agreement (it is a report), 2 when a phantom file is missing."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="folder with digital_phantom/ and ct_phantom/ (image.nii.gz, mask.nii.gz)",
    )
    parser.add_argument(
        "--configurations",
        type=_configuration_list,
        default=list(CONFIGURATIONS),
        metavar="LIST",
        help=f"comma-separated, from {','.join(CONFIGURATIONS)} (default: all)",
    )
    parser.add_argument(
        "--method",
        choices=("ibsi", "stock", "both"),
        default="ibsi",
        help="ibsi: with IBSI image processing (default); stock: pyradiomics settings only; both",
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="ADJUSTMENT",
        choices=list(IbsiAdjustments.__dataclass_fields__),
        help="switch off one IBSI adjustment in the ibsi method (repeatable): "
        + ", ".join(IbsiAdjustments.__dataclass_fields__),
    )
    parser.add_argument(
        "--mismatches-only",
        action="store_true",
        help="list only features that did not match (the summary still counts all)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT",
        help="write the report as JSON to OUT (without OUT: print JSON instead of the tables)",
    )
    parser.set_defaults(handler=cmd_ibsi)
    return parser
