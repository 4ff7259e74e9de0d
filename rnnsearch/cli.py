"""The command line: ``python -m rnnsearch [overrides]``.

A thin ``@hydra.main`` around :func:`rnnsearch.train.train` (with ``+sweep``,
:func:`rnnsearch.search.run_sweep`; with ``+experiment=NAME``,
:func:`rnnsearch.experiment.run_experiment`). Hydra rejects a bare ``+sweep``
("missing EQUAL"), so :func:`main` rewrites it to ``+sweep=default`` first.
Bad input ends with one clear message on stderr and exit status 2; a diverged
run with status 3.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from rnnsearch.callbacks import EpochPrinter, TrainingDiverged
from rnnsearch.errors import ConfigError, config_composition_message
from rnnsearch.heap import keep_freed_memory
from rnnsearch.search.errors import SweepFailed

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def rewrite_argv(argv: list[str]) -> list[str]:
    """Turn Hydra-invalid shorthands into valid overrides.

    ``+sweep`` → ``+sweep=default``; ``sweep.params.X=choice(a,b)`` → ``sweep.params.X='choice(a,b)'``
    (Hydra would otherwise read the sweep syntax as a ``--multirun`` sweep; the search reads it).
    """
    return ["+sweep=default" if a == "+sweep" else _quote_search_space(a) for a in argv]


def _quote_search_space(arg: str) -> str:
    key, eq, value = arg.partition("=")
    if not eq or not key.lstrip("+~").startswith("sweep.params.") or not value or value[0] in "'\"[{":
        return arg
    quote = "'" if "'" not in value else '"'
    return f"{key}={quote}{value}{quote}"


def format_metrics(result: dict[str, Any]) -> str:
    """The final metrics as aligned ``key value`` lines."""
    keys = [k for k in result if isinstance(result[k], (int, float, bool))]
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"  {k:<{width}}  {result[k]:.6g}" if isinstance(result[k], float) else f"  {k:<{width}}  {result[k]}"
                     for k in keys)


def run(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """Do what the composed config asks: an experiment, a sweep, or else one training run."""
    if "experiment" in cfg and cfg.experiment is not None:
        from rnnsearch.experiment import run_experiment

        run_experiment(cfg)
        return None
    if "sweep" in cfg and cfg.sweep is not None:
        from rnnsearch.search import run_sweep

        return run_sweep(cfg)
    from rnnsearch.train import train
    from rnnsearch.tracking import tracking_callbacks

    callbacks = [EpochPrinter(), *tracking_callbacks(cfg)]
    result = train(cfg, callbacks=callbacks)
    print("final metrics (test/* use the best-validation weights):")
    print(format_metrics(result))
    return result


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as exc:
        print(f"rnnsearch: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as exc:
        print(f"rnnsearch: {exc}", file=sys.stderr)
        sys.exit(3)
    except SweepFailed as exc:
        print(f"rnnsearch: {exc}", file=sys.stderr)
        sys.exit(4)
    except KeyboardInterrupt:
        print("rnnsearch: interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``python -m rnnsearch`` and the ``rnnsearch`` script."""
    keep_freed_memory()  # CPU steps reuse freed memory instead of page-faulting it back in (rnnsearch.heap)
    args = rewrite_argv(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [sys.argv[0], *args]
    # Hydra reports composition errors (e.g. cell=foo) itself, with exit status 1; let them reach
    # us instead, so that every bad input is one paragraph and exit status 2 (HYDRA_FULL_ERROR=1 still
    # shows Hydra's full trace).
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except CompactHydraException as exc:
        if user_full_error == "1":
            raise
        print(f"rnnsearch: error: {config_composition_message(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if user_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full_error
