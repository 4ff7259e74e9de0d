"""Pictures and tables tracking attaches to runs (matplotlib, Agg; no display needed).

:func:`learning_curve` draws one run's per-epoch losses and headline metric;
:func:`study_plots` saves Optuna's optimization history, parameter importances,
parallel coordinates and (multi-objective) Pareto front, as PNG through
``optuna.visualization.matplotlib`` and also as interactive HTML when plotly is
installed; :func:`top_trials` is the sweep's leaderboard as CSV and Markdown.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("rnnsearch.tracking")


def learning_curve(history: list[tuple[int, dict[str, float]]], metric: str, title: str, path: Path) -> Path:
    """Save train/val loss and, if different, ``metric`` per epoch to ``path`` (PNG, ~0.1 s).

    Log scale with plain tick labels and fixed margins: mathtext labels and automatic layout
    would cost 4x more, on the tracking thread of every trial.
    """
    from matplotlib.figure import Figure  # the object API: thread-safe, no pyplot state
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    epochs = [e for e, _ in history]
    panels = [("loss", ["train/loss", "val/loss"])]
    if any(m.get(metric) != m.get("val/loss") for _, m in history):  # e.g. val/acc; not val/mse == val/loss
        panels.append((metric, [metric]))
    fig = Figure(figsize=(4.2 * len(panels), 3.2))
    fig.subplots_adjust(left=0.2 / len(panels), right=0.98, bottom=0.15, top=0.84, wspace=0.3)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, (ylabel, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            ax.plot(epochs, [m.get(key, math.nan) for _, m in history], marker="o", ms=3, label=key)
        values = [m.get(k, math.nan) for _, m in history for k in keys]
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) >= 10:  # spans a decade or more
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            if max(finite) / min(finite) < 100:  # under two decades: label 2x and 5x too
                ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
                ax.yaxis.set_minor_formatter(plain)
            else:
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def _objective_names(study: Any) -> list[str]:
    names = getattr(study, "metric_names", None)
    return list(names) if names else [f"objective {i}" if len(study.directions) > 1 else "value"
                                      for i in range(len(study.directions))]


def study_plots(study: Any, outdir: Path) -> list[Path]:
    """Save the study's Optuna plots into ``outdir``; plots that cannot be drawn yet are skipped."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    names = _objective_names(study)
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    if len(names) == 1:
        jobs += [("optimization_history", "plot_optimization_history", {}),
                 ("param_importances", "plot_param_importances", {}),
                 ("parallel_coordinate", "plot_parallel_coordinate", {})]
    else:
        jobs.append(("pareto_front", "plot_pareto_front", {"target_names": names}))
        jobs.append(("param_importances", "plot_param_importances", {}))
        for i, name in enumerate(names):
            target = {"target": (lambda t, i=i: t.values[i]), "target_name": name}
            slug = "".join(c if c.isalnum() else "_" for c in name)
            jobs += [(f"optimization_history_{slug}", "plot_optimization_history", target),
                     (f"parallel_coordinate_{slug}", "plot_parallel_coordinate", target)]
    html = importlib.util.find_spec("plotly") is not None
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        for stem, fn, kwargs in jobs:
            try:
                ax = getattr(vis_mpl, fn)(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                fig.set_size_inches(8, 5)
                fig.savefig(outdir / f"{stem}.png", dpi=100, bbox_inches="tight")
                plt.close(fig)
                saved.append(outdir / f"{stem}.png")
                if html:
                    getattr(vis, fn)(study, **kwargs).write_html(outdir / f"{stem}.html", include_plotlyjs=True)
                    saved.append(outdir / f"{stem}.html")
            except Exception as exc:  # e.g. importances need two finished trials with varying params
                log.info("rnnsearch tracking: skipped %s: %s", stem, exc)
    return saved


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def top_trials(study: Any, n: int, run_names: Optional[dict[int, str]] = None) -> tuple[list[str], list[list[str]]]:
    """The ``n`` best finished trials (by the first objective): header and rows of strings."""
    import optuna

    names = _objective_names(study)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    done.sort(key=lambda t: sign * t.values[0])
    keys = sorted({k for t in done for k in t.params})
    header = ["rank", "trial", "run", *names, "duration_s", *keys]
    rows = []
    for rank, t in enumerate(done[:n], 1):
        seconds = t.duration.total_seconds() if t.duration else None
        rows.append([str(rank), str(t.number), (run_names or {}).get(t.number, ""), *(_fmt(v) for v in t.values),
                     _fmt(seconds), *(_fmt(t.params.get(k)) for k in keys)])
    return header, rows


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
