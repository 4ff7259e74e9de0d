#!/usr/bin/env python
"""Tables, parameter importances and figures of an experiment, from its MLflow runs.

    python scripts/experiment_report.py long_lags                  # the small setting, ./mlflow.db
    python scripts/experiment_report.py lstm_odyssey --setting full --uri http://127.0.0.1:5000

Writes experiments/NAME/results-SETTING.md and SETTING-*.png, and refreshes the
results block of experiments/NAME/README.md (between its results markers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="experiment name (experiments/NAME/config.yaml)")
    parser.add_argument("--setting", default="small", help="budget the runs used (small | full)")
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI of the runs")
    parser.add_argument("--out", type=Path, default=None, help="folder for the report (default experiments/NAME)")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the experiment's README")
    args = parser.parse_args(argv)
    from rnnsearch.errors import ConfigError
    from rnnsearch.experiment.report import write_report

    try:
        md = write_report(args.name, args.setting, args.uri, args.out, readme=not args.no_readme)
    except (ConfigError, ValueError) as exc:
        print(f"experiment_report: error: {exc}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(f"written: {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
