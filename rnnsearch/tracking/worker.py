"""Where MLflow calls run: one background thread per process, and the MLflow client.

Training never waits on the tracking store: callbacks hand each MLflow call
(import, run creation, the epoch's metric batch, artifacts) to one worker
thread, which runs them in order. The interpreter waits for the queue at exit
(``concurrent.futures`` joins its threads), :func:`flush` waits explicitly. A
failed call is reported as a warning and never stops training. ``mlflow`` is
imported here, lazily, on the worker: it costs ~3 s (REFERENCE.md), which then
overlaps the first epoch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

log = logging.getLogger("rnnsearch.tracking")

# Experiment tag the MLflow 3 UI reads to decide what an experiment is; "custom_model_development"
# makes it a training experiment (runs table), not a GenAI one (overview/traces). The UI sets the
# same tag when a user picks "Machine learning" (mlflow/server/js: ExperimentKind, mlflow PR #20744).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_lock = threading.Lock()
_executor: Optional[ThreadPoolExecutor] = None
_clients: dict[str, Any] = {}
_experiments: dict[tuple[str, str], str] = {}


def _reset_after_fork() -> None:
    """A forked child has no worker thread and must not share the parent's database connections."""
    global _executor
    _executor = None
    _clients.clear()
    _experiments.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


class Stats:
    """Time a run's tracking took: on the training thread (``caller_s``) and on the worker (``worker_s``)."""

    def __init__(self) -> None:
        self.caller_s = 0.0
        self.worker_s = 0.0
        self.worker_cpu_s = 0.0
        self.calls = 0

    def as_dict(self) -> dict[str, float]:
        return {"caller_s": self.caller_s, "worker_s": self.worker_s, "worker_cpu_s": self.worker_cpu_s,
                "calls": self.calls}


def submit(fn: Callable[..., Any], *args: Any, background: bool = True, stats: Optional[Stats] = None,
           what: str = "MLflow call") -> Future:
    """Run ``fn(*args)`` on the tracking thread (or now, when ``background`` is false); errors become warnings."""

    def call() -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        except Exception as exc:  # tracking must never end a training run
            log.warning("rnnsearch tracking: %s failed: %s: %s", what, type(exc).__name__, exc)
            raise
        finally:
            if stats is not None:
                stats.worker_s += time.perf_counter() - t0
                stats.worker_cpu_s += time.thread_time() - c0
                stats.calls += 1

    if not background:
        fut: Future = Future()
        try:
            fut.set_result(call())
        except Exception as exc:
            fut.set_exception(exc)
        return fut
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnsearch-tracking")
        return _executor.submit(call)


def flush(timeout: Optional[float] = None) -> None:
    """Wait until every MLflow call handed to the tracking thread so far has run."""
    with _lock:
        executor = _executor
    if executor is not None:
        executor.submit(lambda: None).result(timeout)


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (one per process and URI; imports mlflow on first use)."""
    if uri not in _clients:
        from mlflow import MlflowClient

        _clients[uri] = MlflowClient(tracking_uri=uri)
    return _clients[uri]


def experiment_id(uri: str, name: str, tags: Optional[dict[str, str]] = None) -> str:
    """The id of experiment ``name`` (created, or restored if deleted), marked as a training experiment."""
    key = (uri, name)
    if key in _experiments:
        return _experiments[key]
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            eid = c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **(tags or {})})
        except MlflowException:  # another worker process created it first
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            eid = exp.experiment_id
    else:
        eid = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(eid)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            c.set_experiment_tag(eid, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    _experiments[key] = eid
    return eid


def run_tags(extra: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """MLflow's standard source tags (what ``mlflow.start_run`` would add) plus ``extra``."""
    import getpass

    from rnnsearch.tracking.settings import git_commit

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "rnnsearch"}  # the UI shows its basename
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in some containers
        pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches of 100 (MLflow's limit per ``log_batch``)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[i:i + 100])
