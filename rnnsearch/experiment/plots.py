"""The figures of an experiment report, drawn with matplotlib from :class:`~.results.Trial` records.

* :func:`box_plot` — the test metric of every trial, per level of a factor, one panel per task (Greff's Fig. 3).
* :func:`curves_plot` — validation metric per epoch of every trial, one colour per arm, one panel per task.
* :func:`length_plot` — test metric against sequence length, one line per cell (median, seeds as dots).
* :func:`importance_plot` — fANOVA and PED-ANOVA importances side by side, one panel per task.

Each returns the path it wrote (PNG), or None when there is nothing to draw. Threshold and baseline are dashed/dotted lines.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from .results import Trial


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_lines(ax: Any, t: Trial) -> None:
    if t.baseline is not None:
        ax.axhline(t.baseline, color="grey", linestyle=":", linewidth=1, label=f"baseline {t.baseline:.3g}")
    if t.solved_at is not None:
        ax.axhline(t.solved_at, color="green", linestyle="--", linewidth=1, label=f"solved {t.solved_at:.3g}")


def _figure(n_panels: int, height: float = 4.0) -> tuple[Any, Any]:
    """A row of ``n_panels`` axes (``axes[i]``)."""
    fig, axes = _plt().subplots(1, n_panels, figsize=(5.5 * n_panels, height), squeeze=False)
    return fig, axes[0]


def _save(fig: Any, path: Path, title: str = "") -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _panels(trials: Sequence[Trial], by: str) -> dict[str, list[Trial]]:
    out: dict[str, list[Trial]] = {}
    for t in trials:
        out.setdefault(t.levels.get(by, ""), []).append(t)
    return out


def _log_scale(trials: Sequence[Trial]) -> bool:
    return trials[0].metric in ("mse", "loss", "ce")


def box_plot(trials: Sequence[Trial], factor: str, panel: str, path: Path, title: str = "") -> Optional[Path]:
    """Box plot of the test metric per level of ``factor``; one panel per level of ``panel``."""
    panels = _panels([t for t in trials if t.state == "COMPLETE" and t.test is not None], panel)
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (name, group) in zip(axes, panels.items()):
        levels = list(dict.fromkeys(t.levels.get(factor, "") for t in group))
        data = [[t.test for t in group if t.levels.get(factor) == lv] for lv in levels]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(levels) + 1), levels)
        for i, values in enumerate(data, 1):
            ax.scatter([i] * len(values), values, s=10, alpha=0.5, color="tab:blue")
        _reference_lines(ax, group[0])
        ax.set_title(f"{name}: test {group[0].metric} per trial")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=7)
    return _save(fig, path, title)


def curves_plot(trials: Sequence[Trial], arm_factor: str, panel: str, path: Path, title: str = "") -> Optional[Path]:
    """Validation metric per epoch; one colour per level of ``arm_factor``, one panel per level of ``panel``."""
    plt = _plt()
    panels = _panels([t for t in trials if t.curve()], panel)
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, group) in zip(axes, panels.items()):
        levels = list(dict.fromkeys(t.levels.get(arm_factor, "") for t in group))
        for i, lv in enumerate(levels):
            for j, t in enumerate(t for t in group if t.levels.get(arm_factor) == lv):
                epochs, values = zip(*t.curve())
                ax.plot(epochs, values, color=colours[i % len(colours)], alpha=0.7,
                        linewidth=1.2, label=lv if j == 0 else None)
        _reference_lines(ax, group[0])
        if _log_scale(group):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {group[0].metric}")
        ax.set_title(f"{name}: one line per seed")
        ax.legend(fontsize=7)
    return _save(fig, path, title)


def length_plot(trials: Sequence[Trial], line_factor: str, x_key: str, path: Path, title: str = "") -> Optional[Path]:
    """Test metric against the config value ``x_key`` (e.g. ``task.seq_len``); one line per ``line_factor`` level."""
    plt = _plt()
    done = [t for t in trials if t.state == "COMPLETE" and t.test is not None]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lv in enumerate(dict.fromkeys(t.levels.get(line_factor, "") for t in done)):
        group = [t for t in done if t.levels.get(line_factor) == lv]
        xs = sorted({float(t.lookup(x_key)) for t in group})
        med = [statistics.median(t.test for t in group if float(t.lookup(x_key)) == x) for x in xs]
        ax.plot(xs, med, marker="o", color=colours[i % len(colours)], label=f"{lv} (median)")
        ax.scatter([float(t.lookup(x_key)) for t in group], [t.test for t in group], s=12, alpha=0.5,
                   color=colours[i % len(colours)])
    if done:
        _reference_lines(ax, done[0])
        if _log_scale(done):
            ax.set_yscale("log")
        ax.set_ylabel(f"test {done[0].metric}")
    ax.set_xscale("log", base=2)
    ticks = sorted({float(t.lookup(x_key)) for t in done})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(x_key)
    ax.legend(fontsize=7)
    ax.set_title(title or f"test metric against {x_key}", fontsize=9)
    return _save(fig, path)


def importance_plot(importances: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path,
                    title: str = "") -> Optional[Path]:
    """Bars of each evaluator's importances; ``importances`` is {panel: {evaluator: {param: value}}}."""
    panels = {k: v for k, v in importances.items() if v}
    if not panels:
        return None
    fig, axes = _figure(len(panels), 3.8)
    for ax, (name, by_eval) in zip(axes, panels.items()):
        params = list(dict.fromkeys(p for imp in by_eval.values() for p in imp))
        width = 0.8 / max(len(by_eval), 1)
        for j, (ev, imp) in enumerate(by_eval.items()):
            ax.barh([i + j * width for i in range(len(params))], [imp.get(p, 0.0) for p in params], height=width,
                    label=ev)
        ax.set_yticks([i + width * (len(by_eval) - 1) / 2 for i in range(len(params))], params)
        ax.invert_yaxis()
        ax.set_xlabel("importance (share)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    return _save(fig, path, title)
