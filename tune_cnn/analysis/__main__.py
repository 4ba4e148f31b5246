"""python -m tune_cnn.analysis EXPERIMENT: write the analysis folder of a finished or interrupted sweep."""
from __future__ import annotations

import argparse
import sys

from tune_cnn.analysis.load import AnalysisError, load
from tune_cnn.analysis.report import analyse_into
from tune_cnn.errors import CommandParser, exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m tune_cnn.analysis", description="Analyse a sweep: tables, findings, plots and report.md.")
    parser.add_argument("experiment", help="the experiment folder (STORAGE/NAME), local or a URI such as s3://bucket/path/name")
    parser.add_argument("--by", nargs="+", default=None, metavar="SETTING", help="settings to group by (default: the swept settings but seed)")
    parser.add_argument("--epochs", nargs="+", type=int, default=None, metavar="EPOCH", help="snapshot epochs (default: the sweep's checkpoint epochs)")
    parser.add_argument("--out", default=None, help="output folder, local or a URI such as s3://bucket/path (default: EXPERIMENT/analysis)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.experiment.strip():
        raise AnalysisError("the experiment path is empty; pass an experiment folder (STORAGE/NAME), such as ./tune_results/seed")
    sweep = load(args.experiment)
    folder = analyse_into(sweep, args.out, args.by, args.epochs)
    incomplete = sweep.context.incomplete
    if incomplete:
        listed = ", ".join(f"{t} ({s})" for t, s in incomplete.items())
        print(f"warning: {len(incomplete)} trial(s) incomplete: {listed}", file=sys.stderr)
    print(f"analysis: {folder}")


if __name__ == "__main__":
    main()
