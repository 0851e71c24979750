"""`sclc-node stats ...`: Cox model, Kaplan-Meier and log-rank test on a CSV file.

Wiring only: the statistics live in :mod:`scoring.training.stats` (which documents how
each number matches R's ``survival`` package); this module reads the CSV,
calls it, prints a readable table and writes the JSON.

    sclc-node stats cox CSV --time COL --event COL --covariates A,B,C [--ties efron|breslow] [--json OUT]
    sclc-node stats km CSV --time COL --event COL [--group COL] [--json OUT]
    sclc-node stats logrank CSV --time COL --event COL --group COL [--json OUT]

`research/cli.py` registers these with ``add_stats_parser(sub)``.
Bad input raises :class:`scoring.errors.InputError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

EXIT_OK = 0

_COMMON_EPILOG = (
    "Rows with a missing value in a column the analysis uses are dropped (as R's na.omit). "
    "Event columns take 0/1, true/false or yes/no; R's 1/2 coding must be recoded to 0/1."
)


def _read_csv(path: Path):
    import pandas as pd

    from sclc_risk_node.scoring.training.stats import SurvivalDataError

    path = Path(path)
    try:
        return pd.read_csv(path, encoding="utf-8-sig")
    except FileNotFoundError:
        raise SurvivalDataError(f"CSV file {path} does not exist") from None
    except IsADirectoryError:
        raise SurvivalDataError(f"CSV file {path} is a directory") from None
    except pd.errors.EmptyDataError:
        raise SurvivalDataError(f"CSV file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurvivalDataError(f"CSV file {path} cannot be read: {first_line}") from None


def _write_json(path: Path | None, payload: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(value: float | None, spec: str) -> str:
    return "NA" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def _dropped_line(n_dropped: int) -> list[str]:
    return (
        [f"  ({n_dropped} observation{'s' if n_dropped != 1 else ''} deleted due to missingness)"] if n_dropped else []
    )


def _covariate_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return names


# --------------------------------------------------------------------------- handlers


def cmd_stats_cox(args: argparse.Namespace) -> int:
    from sclc_risk_node.scoring.training.stats import cox_fit

    df = _read_csv(args.csv)
    result = cox_fit(df, args.time, args.event, args.covariates, ties=args.ties)
    payload = result.as_dict()
    _write_json(args.json, payload)

    width = max(8, *(len(name) for name in result.coefficients))
    lines = [
        f"Cox proportional hazards ({result.ties} ties): n={result.n}, events={result.events}",
        *_dropped_line(result.n_dropped),
        f"  {'':<{width}} {'coef':>10} {'HR':>9} {'95% CI':>19} {'se(coef)':>9} {'z':>7} {'p':>9}",
    ]
    for name, c in result.coefficients.items():
        ci = f"{c.ci_low:.4f}-{c.ci_high:.4f}"
        lines.append(
            f"  {name:<{width}} {c.coef:>10.6f} {c.hr:>9.4f} {ci:>19} {c.se:>9.6f} {c.z:>7.3f} {_fmt_p(c.p):>9}"
        )
    lines.append(f"  Concordance (Harrell's C): {result.concordance:.3f}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_stats_km(args: argparse.Namespace) -> int:
    from sclc_risk_node.scoring.training.stats import kaplan_meier

    df = _read_csv(args.csv)
    result = kaplan_meier(df, args.time, args.event, group=args.group)
    _write_json(args.json, result)

    width = max(8, *(len(label) for label in result["groups"]))
    lines = [
        'Kaplan-Meier survival (95% CI for the median: conf.type="log", as R\'s survfit)',
        *_dropped_line(result["n_dropped"]),
        f"  {args.group or 'group':<{width}} {'n':>6} {'events':>7} {'median':>9} {'0.95LCL':>9} {'0.95UCL':>9}",
    ]
    for label, g in result["groups"].items():
        lines.append(
            f"  {label:<{width}} {g['n']:>6} {g['events']:>7} {_fmt(g['median'], 'g'):>9} "
            f"{_fmt(g['ci_low'], 'g'):>9} {_fmt(g['ci_high'], 'g'):>9}"
        )
    print("\n".join(lines))
    return EXIT_OK


def cmd_stats_logrank(args: argparse.Namespace) -> int:
    from sclc_risk_node.scoring.training.stats import logrank

    df = _read_csv(args.csv)
    result = logrank(df, args.time, args.event, args.group)
    _write_json(args.json, result)

    width = max(8, *(len(label) for label in result["groups"]))
    lines = [
        f"Log-rank test of {args.group} (as R's survdiff, rho=0)",
        *_dropped_line(result["n_dropped"]),
        f"  {args.group:<{width}} {'N':>6} {'Observed':>9} {'Expected':>9}",
    ]
    for label, g in result["groups"].items():
        lines.append(f"  {label:<{width}} {g['n']:>6} {g['observed']:>9} {g['expected']:>9.2f}")
    lines.append(f"  Chisq= {result['chi2']:.1f} on {result['df']} degrees of freedom, p= {_fmt_p(result['p'])}")
    print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", type=Path, metavar="CSV", help="data file with a header row")
    parser.add_argument("--time", required=True, metavar="COL", help="follow-up time column (numbers >= 0)")
    parser.add_argument("--event", required=True, metavar="COL", help="event column: 1 = event, 0 = censored")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the result as JSON")


def add_stats_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``stats`` (with ``cox``, ``km``, ``logrank``) on an argparse sub-parser set."""
    stats = subparsers.add_parser(
        "stats",
        help="survival statistics on a CSV file (Cox model, Kaplan-Meier, log-rank), matching R's survival package",
        description="Survival statistics on a CSV file, computed as R's survival package does.",
        epilog=_COMMON_EPILOG,
    )
    stats_sub = stats.add_subparsers(dest="stats_command", required=True, metavar="ANALYSIS")

    cox = stats_sub.add_parser(
        "cox",
        help="Cox proportional-hazards model: coef, HR, 95%% CI, Wald p, concordance",
        description="Cox proportional-hazards model, as R's summary(coxph(Surv(time, event) ~ covariates)).",
        epilog=_COMMON_EPILOG,
    )
    _add_common(cox)
    cox.add_argument(
        "--covariates",
        required=True,
        type=_covariate_list,
        metavar="A,B,C",
        help="comma-separated numeric covariate columns (dummy-code categories as 0/1 columns)",
    )
    cox.add_argument("--ties", choices=("efron", "breslow"), default="efron", help="tie handling (default efron, as R)")
    cox.set_defaults(handler=cmd_stats_cox)

    km = stats_sub.add_parser(
        "km",
        help="Kaplan-Meier median survival with its 95%% CI, per group",
        description="Kaplan-Meier median survival and 95% CI, as R's print(survfit(Surv(time, event) ~ group)).",
        epilog=_COMMON_EPILOG,
    )
    _add_common(km)
    km.add_argument("--group", metavar="COL", help="grouping column (default: one group named 'all')")
    km.set_defaults(handler=cmd_stats_km)

    lr = stats_sub.add_parser(
        "logrank",
        help="log-rank test between groups",
        description="Log-rank test, as R's survdiff(Surv(time, event) ~ group).",
        epilog=_COMMON_EPILOG,
    )
    _add_common(lr)
    lr.add_argument("--group", required=True, metavar="COL", help="grouping column")
    lr.set_defaults(handler=cmd_stats_logrank)
    return stats
