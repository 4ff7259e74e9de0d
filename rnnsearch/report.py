"""Compare tracked runs without the UI: ``python -m rnnsearch.report``.

Reads the runs back from MLflow (``mlflow.search_runs``), prints a table of the
headline metric grouped by cell type, depth and direction (one row per group:
how many runs, best, median and mean value, the best run's name), lists the
best runs, and saves a plot of the metric against each of those choices.
Examples::

    python -m rnnsearch.report                                  # ./mlflow.db, every experiment
    python -m rnnsearch.report --experiment my-study --metric best/val/mse --plot study.png
    python -m rnnsearch.report --tracking-uri http://mlflow.example:5000 --by cell,hidden_size
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

# Short param name → the flattened config key it comes from (runs logged before the short names existed).
FALLBACK = {"cell": "cell.name", "num_layers": "model.num_layers", "bidirectional": "model.bidirectional",
            "hidden_size": "model.hidden_size", "lr": "optim.lr"}
LABELS = {"num_layers": "layers", "bidirectional": "direction"}


class ReportError(Exception):
    """A problem with the arguments or the store; printed as one line."""


def load_runs(uri: str, experiments: Sequence[str] = (), include_all: bool = False) -> Any:
    """The runs (a pandas DataFrame) of ``experiments`` (default: all), sweep parent runs left out."""
    import mlflow

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ReportError(f"no MLflow store at {uri} (train first: python -m rnnsearch; or pass --tracking-uri)")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    for name in experiments:
        if client.get_experiment_by_name(name) is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "(none)"
            raise ReportError(f"no experiment {name!r} at {uri}; experiments: {known}")
    runs = mlflow.search_runs(experiment_names=list(experiments) or None, search_all_experiments=not experiments,
                              filter_string="" if include_all else "attributes.status = 'FINISHED'",
                              max_results=50000)
    if "tags.rnnsearch.role" in runs:
        runs = runs[runs["tags.rnnsearch.role"].fillna("") != "sweep"]
    return runs


def choose_metric(runs: Any, metric: Optional[str]) -> tuple[str, str]:
    """``(metric column name, direction)``: the given metric, else ``best/<the runs' headline metric>``."""
    if metric is None:
        tags = runs["tags.metric"].dropna() if "tags.metric" in runs else []
        headline = tags.mode().iloc[0] if len(tags) else "val/loss"
        metric = f"best/{headline}" if f"metrics.best/{headline}" in runs else headline
    if f"metrics.{metric}" not in runs:
        known = sorted(c[len("metrics."):] for c in runs.columns if c.startswith("metrics."))
        raise ReportError(f"no metric {metric!r} in these runs; metrics: {', '.join(known) or '(none)'}")
    directions = runs["tags.direction"].dropna() if "tags.direction" in runs else []
    direction = directions.mode().iloc[0] if len(directions) else "minimize"
    return metric, direction


def choice_column(runs: Any, key: str) -> Any:
    """The param ``key`` of each run (falling back to its flattened config key), as strings."""
    col = runs.get(f"params.{key}")
    fallback = runs.get(f"params.{FALLBACK.get(key, key)}")
    if col is None and fallback is None:
        known = sorted(c[len("params."):] for c in runs.columns if c.startswith("params."))
        raise ReportError(f"no param {key!r} in these runs; params: {', '.join(known) or '(none)'}")
    col = fallback if col is None else (col if fallback is None else col.fillna(fallback))
    if key == "bidirectional":
        col = col.map({"true": "bi", "True": "bi", "false": "uni", "False": "uni"}).fillna(col)
    return col.fillna("?").astype(str)


def _natural(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def comparison(runs: Any, metric: str, direction: str, by: Sequence[str]) -> Any:
    """One row per combination of the ``by`` choices: runs, best, median, mean, best run."""
    import pandas as pd

    df = pd.DataFrame({LABELS.get(k, k): choice_column(runs, k) for k in by})
    df["value"] = runs[f"metrics.{metric}"].astype(float)
    df["run"] = runs.get("tags.mlflow.runName", runs["run_id"]).fillna(runs["run_id"])
    df = df.dropna(subset=["value"])
    keys = [LABELS.get(k, k) for k in by]
    ascending = direction != "maximize"
    rows = []
    for group, part in df.groupby(keys, sort=False):
        part = part.sort_values("value", ascending=ascending)
        rows.append({**dict(zip(keys, group if isinstance(group, tuple) else (group,))), "runs": len(part),
                     "best": part["value"].iloc[0], "median": part["value"].median(), "mean": part["value"].mean(),
                     "best run": part["run"].iloc[0]})
    table = pd.DataFrame(rows, columns=[*keys, "runs", "best", "median", "mean", "best run"])
    return table.sort_values("best", ascending=ascending, ignore_index=True)


def format_table(table: Any) -> str:
    """Aligned plain text; numbers with 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    header = list(table.columns)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.rjust(w) if c[:1].isdigit() or c[:1] == "-" else c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def plot(runs: Any, metric: str, by: Sequence[str], path: Path, title: str) -> Path:
    """Save the metric of every run against each choice in ``by`` (one panel each) as PNG."""
    from matplotlib.figure import Figure

    values = runs[f"metrics.{metric}"].astype(float)
    fig = Figure(figsize=(3.6 * len(by), 3.6), layout="constrained")
    axes = fig.subplots(1, len(by), sharey=True, squeeze=False)[0]
    positive = bool((values.dropna() > 0).all()) and len(values.dropna()) > 0
    for ax, key in zip(axes, by):
        col = choice_column(runs, key)
        levels = sorted(col.unique(), key=_natural)
        for i, level in enumerate(levels):
            ys = values[col == level].dropna().to_numpy()
            xs = [i + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(ys))]  # deterministic jitter
            ax.scatter(xs, ys, s=18, alpha=0.7)
            if len(ys):
                ax.hlines(float(sorted(ys)[len(ys) // 2]), i - 0.3, i + 0.3, colors="k", lw=1.5)
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlabel(LABELS.get(key, key))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(metric)
    if positive and values.max() / max(values.min(), 1e-300) > 20:
        axes[0].set_yscale("log")
    fig.suptitle(f"{title} (black bar: median)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnsearch.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment", action="append", default=[],
                        help="experiment name, e.g. the study name (repeatable; default: all)")
    parser.add_argument("--metric", default=None, help="metric to compare (default: best/<the runs' headline metric>)")
    parser.add_argument("--by", default="cell,num_layers,bidirectional",
                        help="comma-separated params to group by (default: cell,num_layers,bidirectional)")
    parser.add_argument("--plot", default="rnnsearch_report.png", help="where to save the plot ('' for none)")
    parser.add_argument("--top", type=int, default=5, help="list this many best runs (default 5)")
    parser.add_argument("--all", action="store_true", help="include unfinished, pruned and failed runs")
    args = parser.parse_args(argv)
    by = [k.strip() for k in args.by.split(",") if k.strip()]
    try:
        runs = load_runs(args.tracking_uri, args.experiment, args.all)
        if runs.empty:
            raise ReportError(f"no finished runs at {args.tracking_uri}"
                              + (f" in {', '.join(args.experiment)}" if args.experiment else ""))
        metric, direction = choose_metric(runs, args.metric)
        table = comparison(runs, metric, direction, by)
    except ReportError as exc:
        print(f"rnnsearch.report: error: {exc}", file=sys.stderr)
        return 2
    where = ", ".join(args.experiment) or "all experiments"
    better = "lower" if direction != "maximize" else "higher"
    print(f"{metric} ({better} is better) of {int(table['runs'].sum())} runs in {where} at {args.tracking_uri}\n")
    print(format_table(table))
    ranked = runs.dropna(subset=[f"metrics.{metric}"]).sort_values(f"metrics.{metric}", ascending=direction != "maximize")
    if args.top > 0:
        import pandas as pd

        top = pd.DataFrame({"run": ranked.get("tags.mlflow.runName", ranked["run_id"]),
                            metric: ranked[f"metrics.{metric}"].astype(float),
                            "params": ranked["params.num_params"] if "params.num_params" in ranked else "",
                            "run id": ranked["run_id"]}).head(args.top)
        print(f"\nbest {len(top)} runs:\n" + format_table(top))
    if args.plot:
        path = plot(runs, metric, by, Path(args.plot), f"{metric} — {where}")
        print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
