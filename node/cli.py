"""The `sclc-node` command.  Wiring only: every step lives in a module of its own."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sclc_risk_node.node.clinical_files import load_clinical_file
from sclc_risk_node.node.exit_status import EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_OK, EXIT_TRY_AGAIN
from sclc_risk_node.node.logs import configure_logging, get_logger

#: The research commands (sclc_risk_node.research, installed with the [train] extra).  `sclc-node --help`
#: lists them; research/cli.py parses and runs them, imported only when one of them is invoked, so the
#: service never imports the research side or its dependencies.  The help texts are research/cli.py's own
#: (tests/research/test_cli_dispatch.py).
RESEARCH_COMMANDS = {
    "train": "fit, freeze and evaluate an integrated model on your cohort (writes MODEL.json and a report)",
    "simulate-cohort": "write a SIMULATED cohort (phantom CTs, SEGs, cohort.csv) to try `train` on",
    "stats": "survival statistics on a CSV file (Cox model, Kaplan-Meier, log-rank), matching R's survival package",
}
#: The top-level modules of the [train] extra's distributions (pyproject.toml).
TRAIN_EXTRA_MODULES = ("pandas", "sksurv", "sklearn", "lifelines", "tqdm", "dask", "distributed")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sclc-risk-node")
    except PackageNotFoundError:
        return "0+unknown"


#: The banner of an out-of-domain result (summary, status); the SR uses the same words.
OUT_OF_DOMAIN_BANNER = "OUTSIDE THE MODEL'S APPLICABILITY DOMAIN"


def format_applicability(scored) -> list[str]:
    """The summary's applicability lines: a banner and every offending quantity when out of domain."""
    from sclc_risk_node.scoring.types import DomainStatus

    applicability = scored.result.applicability
    if applicability.status is DomainStatus.UNKNOWN:
        return ["Applicability:    domain unknown (the model file records no applicability domain: schema v1)"]
    if applicability.status is DomainStatus.IN_DOMAIN:
        return ["Applicability:    inside the model's applicability domain"]
    lines = [f"*** {OUT_OF_DOMAIN_BANNER} ***"]
    if scored.withheld:
        lines.append("Risk group and PFS withheld (--report-out-of-domain / scoring.report_out_of_domain reports them)")
    else:
        lines.append("Risk group and PFS reported with this flag (--report-out-of-domain): do not rely on them")
    lines.append(f"Outside the domain ({len(applicability.violations)}): value, accepted range, z")
    for v in applicability.violations:
        lines.append(f"  {v.name:<52} {v.value:>11.4g}  accepted {v.low:.4g} .. {v.high:.4g}  z {v.z:+.1f}")
    lines.append(f"Rule: {applicability.rule}")
    return lines


def format_summary(scored) -> str:
    result = scored.result
    model = result.model
    withheld = scored.withheld
    lines = []
    if model.demonstration:
        lines.append("*** DEMONSTRATION MODEL — NOT FOR CLINICAL USE ***")
    group = "WITHHELD" if withheld else result.risk_group.value.upper()
    radiomics_group = "withheld" if withheld else result.radiomics_group.value
    lines += [
        f"Model:            {model.name} {model.version} (sha256 {model.sha256[:12]}…)",
        *format_applicability(scored),
        f"Progression risk: {group} (risk score {result.risk_score:.4f}, cut-off {result.risk_cutoff:.4f})",
        f"Radiomics score:  {result.radiomics_score:.4f} (cut-off {result.radiomics_cutoff:.4f}, {radiomics_group})",
    ]
    for months, probability in sorted(result.pfs_probability.items()):
        lines.append(f"PFS at {months:>2} months: " + ("withheld" if withheld else f"{probability:.1%}"))
    lines.append("Integrated model terms:")
    for term in result.integrated_terms:
        lines.append(f"  {term.name:<40} {term.value:>10.4f} × {term.coefficient:>8.4f} = {term.contribution:>8.4f}")
    lines.append(f"Features: {len(result.features.values)} ({scored.scoring_seconds:.1f} s)")
    source = scored.segment
    lines.append(
        f"Tumour: {source.kind} {source.sop_instance_uid}, "
        f"{'ROI' if source.kind == 'RTSTRUCT' else 'segment'} {source.segment_number} '{source.segment_label}'"
    )
    lines.append(f"SR: SOP Instance UID {scored.sr.SOPInstanceUID}")
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    from sclc_risk_node.node.scoring_job import default_model_path, load_model_file, score_files

    model = load_model_file(args.model or default_model_path())
    clinical_records = _clinical_records_for_ct(args.clinical, args.ct)
    scored = score_files(
        args.ct,
        args.seg or args.rtstruct,
        clinical_records,
        model,
        series_instance_uid=args.series_uid,
        segment_label=args.segment_label,
        allow_lossy_ct=args.allow_lossy_ct,
        rtstruct_roi_pattern=args.roi_pattern,
        rtstruct_roi_name=args.roi_name,
        tumour_kind="RTSTRUCT" if args.rtstruct else "SEG",
        report_out_of_domain=args.report_out_of_domain,
    )
    _write_outputs(scored, args.out, args.json)
    print(format_summary(scored))
    return EXIT_OK


def _clinical_records_for_ct(path: Path, ct_dir: Path) -> list:
    """The records in a JSON/CSV clinical file, or the one a FHIR Bundle/Observation file gives for this CT's study."""
    from sclc_risk_node.node.clinical_files import fhir_json

    data = fhir_json(path)
    if data is None:
        return load_clinical_file(path)
    from sclc_risk_node.node.fhir_lookup import ct_study_context, records_from_fhir_json

    # No config here: the identifier is matched by value, with the node's default look-back.
    return records_from_fhir_json(data, [ct_study_context(ct_dir)], lookback_days=90.0, identifier_system=None)


def _write_outputs(scored, sr_path: Path | None, json_path: Path | None) -> None:
    if sr_path:
        sr_path = Path(sr_path)
        sr_path.parent.mkdir(parents=True, exist_ok=True)
        scored.sr.save_as(sr_path, enforce_file_format=True)
    if json_path:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        from sclc_risk_node.node.scoring_job import result_as_json

        json_path.write_text(json.dumps(result_as_json(scored), indent=2) + "\n", encoding="utf-8")


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the bundled synthetic demo study to a folder and score it with the demonstration model."""
    from sclc_risk_node.node.demo_study import write_demo_study
    from sclc_risk_node.node.scoring_job import default_model_path, load_model_file, score_files

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sclc-node-demo-"))
    study = write_demo_study(workdir)
    model = load_model_file(default_model_path())
    scored = score_files(study.ct_dir, study.seg_path, load_clinical_file(study.clinical_path), model)
    _write_outputs(scored, workdir / "sr.dcm", workdir / "result.json")
    print(f"Demo study written to {workdir} (CT, SEG, clinical.json, sr.dcm, result.json)")
    print(format_summary(scored))
    return EXIT_OK


def cmd_model_verify(args: argparse.Namespace) -> int:
    from sclc_risk_node.node.scoring_job import default_model_path, load_model_file

    model = load_model_file(args.file or default_model_path())
    identity = model.identity
    print(f"OK: {identity.name} {identity.version} sha256 {identity.sha256}")
    print(f"demonstration: {identity.demonstration}")
    print(f"intended use: {identity.intended_use}")
    print(f"features: {len(model.feature_specs)}; pyradiomics {model.extraction.pyradiomics_version}")
    print(f"schema version: {model.schema_version}")
    for line in format_domain(model):
        print(line)
    return EXIT_OK


def format_domain(model) -> list[str]:
    """`model verify`'s description of the applicability domain, or "domain unknown" for schema v1."""
    domain = model.applicability_domain
    if domain is None:
        return ['applicability domain: domain unknown (schema v1 file: results are marked "domain unknown")']
    lines = [f"applicability domain: {domain.rule.describe()}; training n={domain.training_n}"]
    scales = {term.name: term.scale for term in model.radiomics_terms}
    for name, training in domain.features.items():
        low, high = domain.feature_interval(scales[name])
        transform = "" if scales[name].transform == "none" else f" [{scales[name].transform}]"
        lines.append(
            f"  {name}{transform}: training {training.minimum:.4g} .. {training.maximum:.4g},"
            f" accepted {low:.4g} .. {high:.4g}"
        )
    for name in ("radiomics_score", "risk_score"):
        training = getattr(domain, name)
        low, high = domain.score_interval(name)
        lines.append(
            f"  {name}: training {training.minimum:.4g} .. {training.maximum:.4g}, accepted {low:.4g} .. {high:.4g}"
        )
    return lines


def _load_config(args: argparse.Namespace):
    from sclc_risk_node.node.config import load_config

    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from sclc_risk_node.node.service import NodeService

    config = _load_config(args)
    configure_logging(args.log_level or config.logging.level)
    NodeService(config).run_forever()
    return EXIT_OK


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from sclc_risk_node.node.service import open_spool_for_cli

    config = _load_config(args)
    with open_spool_for_cli(config) as spool:
        studies = spool.list_studies(limit=-1 if args.all else 200)
        now = time.time()
        rows: list[dict[str, Any]] = []  # the JSON of `status --json`
        for study in studies:
            deliveries = spool.study_deliveries(study.study_instance_uid)
            waiting_for = _waiting_for(spool, study, fhir_enabled=config.fhir.enabled)
            applicability, withheld = _applicability(spool, study)
            stage_seconds = _stage_seconds(spool, study)
            rows.append(
                {
                    "study_instance_uid": study.study_instance_uid,
                    "state": str(study.state),
                    "age_s": round(now - study.created_at, 1),
                    "in_state_s": round(now - study.state_changed_at, 1),
                    "instances": study.instance_count,
                    "clinical_record": study.clinical_record_id is not None,
                    "failure_reason": study.failure_reason,
                    "waiting_for": waiting_for,
                    "applicability": applicability,
                    "withheld": withheld,
                    "stage_seconds": stage_seconds,
                    "deliveries": [
                        {
                            "destination": d.destination,
                            "state": str(d.state),
                            "attempts": d.attempts,
                            "last_error": d.last_error,
                        }
                        for d in deliveries
                    ],
                }
            )
        counts = {str(k): v for k, v in spool.counts_by_state().items()}
    if args.json:
        print(json.dumps({"studies": rows, "counts": counts}, indent=2))
        return EXIT_OK
    if not rows:
        print("no studies")
    for row in rows:
        line = (
            f"{row['study_instance_uid']:<64} {row['state']:<21} age {_age(row['age_s']):>5} "
            f"(in state {_age(row['in_state_s'])}) instances {row['instances']}"
        )
        if row["failure_reason"]:
            line += f"\n    reason: {row['failure_reason']}"
        for missing in row["waiting_for"]:
            line += f"\n    waiting for: {missing}"
        if row["applicability"]:
            line += f"\n    applicability: {_applicability_text(row['applicability'], row['withheld'])}"
        if row["stage_seconds"]:
            line += "\n    scoring: " + ", ".join(f"{stage} {s:.2f} s" for stage, s in row["stage_seconds"].items())
        for d in row["deliveries"]:
            if d["state"] == "delivered":
                line += f"\n    -> {d['destination']}: delivered"
                continue
            line += f"\n    -> {d['destination']}: {d['state']} after {d['attempts']} attempt(s)"
            if d["last_error"]:
                line += f" ({d['last_error']})"
        print(line)
    print("totals: " + ", ".join(f"{state} {n}" for state, n in counts.items() if n) if any(counts.values()) else "")
    return EXIT_OK


def _applicability(spool, study) -> tuple[str | None, bool]:
    """The last scoring's applicability status and whether it withheld the result (None before scoring)."""
    from sclc_risk_node.node.states import StudyEvent, StudyState
    from sclc_risk_node.node.study_machine import applicability_from_reason

    if study.state not in (StudyState.SCORED, StudyState.DELIVERED, StudyState.FAILED):
        return None, False
    scored = [t for t in spool.study_events(study.study_instance_uid) if t.event is StudyEvent.SCORED]
    return applicability_from_reason(scored[-1].reason) if scored else (None, False)


def _stage_seconds(spool, study) -> dict[str, float]:
    """The last scoring's seconds per stage (read, ring, extract, model, sr); empty before scoring."""
    from sclc_risk_node.node.states import StudyEvent
    from sclc_risk_node.node.study_machine import stage_seconds_from_reason

    scored = [t for t in spool.study_events(study.study_instance_uid) if t.event is StudyEvent.SCORED]
    return stage_seconds_from_reason(scored[-1].reason) if scored else {}


def _applicability_text(status: str, withheld: bool) -> str:
    if status == "out_of_domain":
        return OUT_OF_DOMAIN_BANNER + (" (risk group and PFS withheld)" if withheld else " (reported with the flag)")
    if status == "in_domain":
        return "inside the model's applicability domain"
    return "domain unknown (schema v1 model)" if status == "unknown" else status


def _waiting_for(spool, study, *, fhir_enabled: bool = False) -> list[str]:
    """What an incomplete study still lacks, in the words the expiry reason would use."""
    from sclc_risk_node.node.completion import assess_images
    from sclc_risk_node.node.states import StudyState

    if study.state not in (StudyState.RECEIVING, StudyState.WAITING_FOR_CLINICAL):
        return []
    _, gaps = assess_images(spool.study_snapshot(study.study_instance_uid))
    if study.clinical_record_id is None:
        from sclc_risk_node.node.fhir_lookup import WaitingReasons

        # A reason left from before [fhir] was turned off would be stale.
        fhir_reason = WaitingReasons(spool.directory).reason(study.study_instance_uid) if fhir_enabled else None
        gaps.append(f"no clinical record ({fhir_reason})" if fhir_reason else "no clinical record")
    return gaps


def cmd_retry(args: argparse.Namespace) -> int:
    import time

    from sclc_risk_node.node.audit import local_user
    from sclc_risk_node.node.service import open_spool_for_cli
    from sclc_risk_node.node.study_machine import StudyMachine

    config = _load_config(args)
    with open_spool_for_cli(config) as spool:
        transition = StudyMachine(spool).retry(
            args.study,
            now=time.time(),
            reason="operator retry (sclc-node retry)",
            service_running=spool.service_running(),
            who=local_user(),
        )
    print(f"{args.study}: {transition.from_state} -> {transition.to_state} ({transition.event})")
    return EXIT_OK


def cmd_clinical_import(args: argparse.Namespace) -> int:
    import time

    from sclc_risk_node.node.clinical_inbox import import_clinical_file
    from sclc_risk_node.node.service import open_spool_for_cli

    config = _load_config(args)
    with open_spool_for_cli(config) as spool:
        report = import_clinical_file(spool, args.file, now=time.time(), fhir=config.fhir)
    print(
        f"imported {report.records} record(s) from {args.file.name}; "
        f"attached to {len(report.matched_studies)} study(ies) already received"
    )
    for uid in report.matched_studies:
        print(f"  {uid}")
    for note in report.notes:
        print(f"  {note}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail as JSON lines, oldest first."""
    from sclc_risk_node.node.service import open_spool_for_cli

    config = _load_config(args)
    with open_spool_for_cli(config) as spool:
        events = spool.audit_events(since=args.since, study_uid=args.study, limit=args.limit)
    for event in events:
        print(json.dumps(event.as_json(), sort_keys=True))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """Everything `serve` would refuse, checked without starting it or writing anything lasting."""
    from sclc_risk_node.node.config_check import check_for_serve

    config = _load_config(args)
    report = check_for_serve(config)
    print(f"configuration: {config.source or 'embedded defaults'}")
    for label, value in report.facts:
        print(f"  {label:<18} {value}")
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if report.problems:
        print(f"NOT OK: `sclc-node serve` would refuse to start ({len(report.problems)} problem(s))", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("OK: `sclc-node serve` would start with this configuration")
    return EXIT_OK


def cmd_config_defaults(args: argparse.Namespace) -> int:
    from sclc_risk_node.node.config import default_config_text

    sys.stdout.write(default_config_text())
    return EXIT_OK


def _missing_train_modules() -> list[str]:
    import importlib.util

    missing = []
    for name in TRAIN_EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # an import hook that refuses the module, or a broken parent package
            found = False
        if not found:
            missing.append(name)
    return missing


def cmd_research(args: argparse.Namespace) -> int:
    missing = _missing_train_modules()
    if missing:
        print(
            f"error: `sclc-node {args.command}` is a research command and needs the [train] extra "
            f"({', '.join(missing)} not installed): pip install 'sclc-risk-node[train]'",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    from sclc_risk_node.research.cli import main as research_main

    return research_main([args.command, *args.research_argv])


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="node configuration (TOML; default: the embedded defaults, see `sclc-node config defaults`)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sclc-node",
        description=(
            "sclc-risk-node: peritumoral-radiomics + clinical progression-risk scoring for ES-SCLC "
            "chest CT (after Zhao et al., J Immunother Cancer 2023). Runs whatever frozen model file "
            "it is given; the shipped model is a DEMONSTRATION model, not for clinical use."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level",
        default=None,
        help="log level of the JSON logs (default: WARNING for commands, the config's logging.level for serve)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = sub.add_parser(
        "score",
        help="score one study from files and write a TID 1500 SR",
        description="Score one study: CT series folder + tumour SEG or RTSTRUCT + clinical record "
        "(JSON, CSV or FHIR R4) -> DICOM SR (+ JSON).",
    )
    score.add_argument("--ct", type=Path, required=True, metavar="DIR", help="folder of the CT series' DICOM files")
    tumour = score.add_mutually_exclusive_group(required=True)
    tumour.add_argument("--seg", type=Path, metavar="FILE", help="DICOM SEG of the tumour")
    tumour.add_argument(
        "--rtstruct",
        type=Path,
        metavar="FILE",
        help="RT Structure Set with the tumour ROI, instead of a SEG (ROI chosen by --roi-name, "
        "else a GTV-like name, else RT ROI Interpreted Type GTV/TUMOR)",
    )
    score.add_argument(
        "--clinical",
        type=Path,
        required=True,
        metavar="FILE",
        help="clinical record, .json or .csv, or a FHIR R4 Bundle/Observation .json for the CT's patient "
        "(see docs/clinical-record.md)",
    )
    score.add_argument(
        "--model",
        type=Path,
        metavar="FILE",
        help="frozen model file (default: the shipped demonstration model)",
    )
    score.add_argument("--out", type=Path, required=True, metavar="SR.dcm", help="where to write the DICOM SR")
    score.add_argument("--json", type=Path, metavar="RESULT.json", help="also write the result as JSON")
    score.add_argument("--series-uid", metavar="UID", help="CT SeriesInstanceUID when the folder holds several series")
    score.add_argument(
        "--report-out-of-domain",
        action="store_true",
        help="report the risk group and PFS of a study outside the model's applicability domain, with the flag "
        "(default: withhold them; the node's config key is scoring.report_out_of_domain)",
    )
    score.add_argument(
        "--segment-label",
        metavar="LABEL",
        help="choose the SEG segment by label (default: the one whose property type is SCT Neoplasm)",
    )
    score.add_argument(
        "--allow-lossy-ct",
        action="store_true",
        help="score a lossy-compressed CT (JPEG baseline, lossy JPEG 2000, LossyImageCompression 01) instead of "
        "refusing it; the JSON result then has lossy_compression = true",
    )
    score.add_argument("--roi-name", metavar="NAME", help="with --rtstruct: the tumour ROI's name (case-insensitive)")
    score.add_argument(
        "--roi-pattern",
        metavar="REGEX",
        help="with --rtstruct: regular expression for the tumour ROI's name (default: GTV-like names)",
    )
    score.set_defaults(handler=cmd_score)

    demo = sub.add_parser(
        "demo",
        help="generate the bundled synthetic demo study and score it with the demonstration model",
    )
    demo.add_argument(
        "--workdir", type=Path, metavar="DIR", help="where to write the demo study (default: a new temp dir)"
    )
    demo.set_defaults(handler=cmd_demo)

    model = sub.add_parser("model", help="inspect frozen model files")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    verify = model_sub.add_parser(
        "verify", help="check a model file's schema and sha256 and print its identity and applicability domain"
    )
    verify.add_argument("file", type=Path, nargs="?", help="model file (default: the shipped demonstration model)")
    verify.set_defaults(handler=cmd_model_verify)

    serve = sub.add_parser("serve", help="run the node: DICOM receiver, scoring workers, outbox, HTTP status")
    _add_config_option(serve)
    serve.set_defaults(handler=cmd_serve)

    status = sub.add_parser("status", help="every study with its state, age and failure reason")
    _add_config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--all", action="store_true", help="all studies (default: the newest 200)")
    status.set_defaults(handler=cmd_status)

    retry = sub.add_parser(
        "retry",
        help="resend a study's SR (failed or delivered study) or start it over (failed scoring, expired, "
        "or left in scoring by a crash while no service runs)",
    )
    _add_config_option(retry)
    retry.add_argument("study", metavar="STUDY", help="StudyInstanceUID")
    retry.set_defaults(handler=cmd_retry)

    audit = sub.add_parser(
        "audit",
        help="print the append-only audit trail (instances received, SR sent, record imported, retry) as JSON lines",
    )
    _add_config_option(audit)
    audit.add_argument("--since", type=float, default=0.0, metavar="EPOCH_S", help="only events at or after this time")
    audit.add_argument("--study", metavar="UID", help="only events of this StudyInstanceUID")
    audit.add_argument("--limit", type=int, default=-1, metavar="N", help="at most N events (default: all)")
    audit.set_defaults(handler=cmd_audit)

    clinical = sub.add_parser("clinical", help="clinical records")
    clinical_sub = clinical.add_subparsers(dest="clinical_command", required=True, metavar="ACTION")
    clinical_import = clinical_sub.add_parser("import", help="validate and import a clinical JSON/CSV file")
    _add_config_option(clinical_import)
    clinical_import.add_argument("file", type=Path, metavar="FILE")
    clinical_import.set_defaults(handler=cmd_clinical_import)

    config = sub.add_parser("config", help="check or print the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_check = config_sub.add_parser(
        "check",
        help="validate a configuration file and check what `serve` would refuse (directories not writable, "
        "an address not of this machine, a port in use, a damaged model); prints the real paths",
    )
    _add_config_option(config_check)
    config_check.set_defaults(handler=cmd_config_check)
    config_defaults = config_sub.add_parser("defaults", help="print the embedded default configuration")
    config_defaults.set_defaults(handler=cmd_config_defaults)

    for command, help_text in RESEARCH_COMMANDS.items():
        # No options of its own (prefix_chars: none): every argument, --help included, goes to research/cli.py.
        research = sub.add_parser(command, help=help_text, add_help=False, prefix_chars="\0")
        research.add_argument("research_argv", nargs=argparse.REMAINDER)
        research.set_defaults(handler=cmd_research)
    from sclc_risk_node.node.ibsi_cli import add_ibsi_parser

    add_ibsi_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sclc_risk_node.scoring.errors import SclcNodeError

    parser = build_parser()
    args = parser.parse_args(argv)
    # Commands print results on stdout, so their logs go to stderr; `serve` logs to stdout for journald.
    configure_logging(args.log_level or "WARNING", stream=sys.stderr)
    log = get_logger(stage="cli", command=args.command)
    try:
        return args.handler(args)
    except SclcNodeError as exc:
        # Bad input, an unknown study, a transition that does not apply: one line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRY_AGAIN if exc.retryable else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one readable line, details in the log
        log.exception("internal_error")
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
