"""The research commands: ``train``, ``simulate-cohort`` and ``stats``.

    sclc-node train ...            (node/cli.py hands the command line here, importing this module
    sclc-node simulate-cohort ...   only then: the service never imports the research side)
    sclc-node stats cox|km|logrank ...
    python -m sclc_risk_node.research.cli train ...   (the same, without node/cli.py)

Bad input: one line on stderr, exit status 2; the statuses are ``sclc-node``'s (node/exit_status.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sclc_risk_node.node.exit_status import EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_TRY_AGAIN
from sclc_risk_node.research.stats_cli import add_stats_parser
from sclc_risk_node.research.training_cli import add_training_parsers
from sclc_risk_node.scoring.errors import SclcNodeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sclc-node",
        description="sclc-risk-node's research commands: train a model on a cohort, simulate a cohort, "
        "survival statistics (docs/training.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_training_parsers(sub)
    add_stats_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
        return result
    except SclcNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRY_AGAIN if exc.retryable else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one readable line
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
