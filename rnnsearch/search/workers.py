"""Worker processes that pull trials from the shared storage until the study has ``n_trials``.

``sweep.workers=N`` starts N processes (multiprocessing *spawn*); each loads
the study from the storage and loops: under the claim lock, stop if the study
already has ``n_trials`` finished (complete + pruned) or running trials, or if
this run's last ``max_failures`` trials all failed; else start one trial. There
is no batch barrier: a worker takes the next trial the moment its last one ends.
``n_trials`` is the study's total, so a rerun resumes and redoes nothing.

``auto`` means one worker per visible GPU, each pinned with
``CUDA_VISIBLE_DEVICES``; without GPUs, one single-threaded worker per core
(at most 8): small recurrent models gain little from intra-op threads, and on a
busy 2-core machine one two-threaded process ran 4-15x slower than one
single-threaded one (``scripts/bench_sweep.py``). On CPU the workers split the
cores (``torch.set_num_threads(cores // workers)``).

A worker that dies does not take the sweep down: its running trial is marked
FAIL ("worker process died"), re-enqueued once with the same params, and a
replacement worker is started. Trials left RUNNING by a killed earlier run on
this machine are treated the same way when the sweep starts. On RDB storages
Optuna's heartbeats do this across machines.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from rnnsearch.heap import keep_freed_memory

from .objective import TrialObjective  # noqa: F401  (WorkerJob field type)
from .settings import SweepSettings
from .study import ClaimLock, counted_states, make_pruner, make_sampler, make_storage


MAX_AUTO_CPU_WORKERS = 8


@dataclass
class WorkerJob:
    """What every worker needs (picklable)."""

    settings: SweepSettings
    storage: str  # a journal path or a URL
    study_name: str
    objective: TrialObjective
    n_trials: int
    start_number: int  # first trial number of this run (failure streaks count from here)
    epochs: int  # max resource for hyperband
    max_layers: int  # for the grid sampler's {k} keys
    threads: Optional[int] = None  # torch threads per worker (None: leave as is)


def resolve_workers(workers: int | str) -> tuple[int, list[Optional[str]]]:
    """``(N, [device per worker])``: ``auto`` = one per visible GPU, else one per CPU core (at most 8)."""
    gpus = visible_gpus()
    if workers == "auto":
        n = len(gpus) if gpus else max(1, min(cpu_count(), MAX_AUTO_CPU_WORKERS))
    else:
        n = int(workers)
    return n, [gpus[i % len(gpus)] if gpus else None for i in range(n)]


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use (honours CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA: CPU only
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def failure_streak(trials: list[FrozenTrial], start_number: int, limit: int) -> Optional[str]:
    """A message if this run's last ``limit`` finished trials all failed, else None."""
    done = [t for t in trials if t.number >= start_number and t.state.is_finished()
            and not t.user_attrs.get("interrupted")]
    done.sort(key=lambda t: (t.datetime_complete or t.datetime_start, t.number))
    last = done[-limit:]
    if len(last) < limit or any(t.state != TrialState.FAIL for t in last):
        return None
    reasons: dict[str, int] = {}
    for t in last:
        r = str(t.user_attrs.get("reason") or t.system_attrs.get("fail_reason") or "unknown error")
        reasons[r] = reasons.get(r, 0) + 1
    common = max(reasons, key=lambda r: reasons[r])
    return (f"stopped: the last {limit} trials all failed (sweep.max_failures={limit}); "
            f"most common reason ({reasons[common]}x): {common}")


def should_stop(study: optuna.Study, job: WorkerJob) -> Optional[str]:
    """Why this worker should start no more trials (None: go on)."""
    trials = study.get_trials(deepcopy=False)
    states = (*counted_states(), TrialState.RUNNING)
    if sum(t.state in states for t in trials) >= job.n_trials:
        return "done"
    streak = failure_streak(trials, job.start_number, job.settings.max_failures)
    if streak:
        return streak
    if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
        return "grid exhausted"
    return None


def work(job: WorkerJob, index: int) -> Optional[str]:
    """Run trials until the study is done; returns why it stopped."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = make_storage(job.storage, job.settings)
    seed = job.settings.seed + 1009 * index + job.start_number
    if job.settings.sampler in ("grid", "random"):
        # GridSampler gives trial n the n-th point of its grid, shuffled by the seed: every worker, and every
        # resumed run, must shuffle alike, or two workers run one point twice and another never. The random
        # sampler reseeds per trial number (TrialSeededRandomSampler): one seed makes its draws worker-free.
        seed = job.settings.seed
    study = optuna.load_study(study_name=job.study_name, storage=storage,
                              sampler=make_sampler(job.settings, job.objective.space, seed, job.n_trials,
                                                   job.max_layers),
                              pruner=make_pruner(job.settings, job.epochs))
    claim = ClaimLock(job.storage, job.study_name)
    objective = dataclasses.replace(job.objective, on_start=claim.release)
    while True:
        claim.acquire()
        try:
            reason = should_stop(study, job)
            if reason:
                return reason
            study.optimize(objective, n_trials=1, catch=(Exception,))
        finally:
            claim.release()


def _worker_main(job: WorkerJob, index: int) -> None:
    """Entry point of a spawned worker process."""
    keep_freed_memory()  # as the parent did (rnnsearch.heap); a spawned process starts with glibc's defaults
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    try:
        work(job, index)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_orphans(study: optuna.Study, max_retry: int, is_dead: Optional[Callable[[int], bool]] = None) -> list[int]:
    """Fail (and re-enqueue once) RUNNING trials whose worker process on this machine is gone."""
    is_dead = is_dead or (lambda pid: not pid_alive(pid))
    host = socket.gethostname()
    storage = study._storage  # public methods of BaseStorage; the Study has no public accessor
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        w_host, _, w_pid = worker.rpartition(":")
        if w_host != host or not w_pid.isdigit() or not is_dead(int(w_pid)):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "reason", f"worker process {w_pid} died")
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        recovered.append(t.number)
        retries = int(t.user_attrs.get("retries", 0))
        if retries < max_retry and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retries": retries + 1})
    return recovered


def run_workers(job: WorkerJob, devices: list[Optional[str]], poll: Callable[[], None],
                log: Callable[[str], None] = print, poll_seconds: float = 1.0) -> Optional[str]:
    """Run ``len(devices)`` workers to the end of the study, calling ``poll()`` about every second.

    One worker runs in this process (``poll`` then runs on a thread); more run as
    spawned processes, replaced if they die (at most ``2 x N`` replacements).
    Returns the first stop reason other than "done" a worker reported, if any.
    """
    n = len(devices)
    if n == 1 and devices[0] is None:
        import threading

        stop = threading.Event()

        def ticker() -> None:
            while not stop.wait(poll_seconds):
                poll()

        thread = threading.Thread(target=ticker, daemon=True)
        thread.start()
        try:
            reason = work(job, 0)
        finally:
            stop.set()
            thread.join()
        return None if reason == "done" else reason

    ctx = mp.get_context("spawn")
    procs: dict[int, Any] = {}
    restarts = 0
    exit_codes: list[int] = []

    def start(i: int) -> None:
        saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if devices[i] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[i]
        if job.threads:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(job.threads)
        try:
            p = ctx.Process(target=_worker_main, args=(job, i), name=f"rnnsearch-worker-{i}", daemon=False)
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        procs[i] = p

    for i in range(n):
        start(i)
    study = optuna.load_study(study_name=job.study_name, storage=make_storage(job.storage, job.settings))
    try:
        while procs:
            time.sleep(poll_seconds)
            poll()
            for i, p in list(procs.items()):
                if p.is_alive():
                    continue
                p.join()
                del procs[i]
                if p.exitcode == 0:
                    continue
                exit_codes.append(p.exitcode)
                lost = recover_orphans(study, job.settings.max_retry, is_dead=lambda pid: pid == p.pid)
                log(f"worker {i} (pid {p.pid}) exited with status {p.exitcode}"
                    + (f"; trial(s) {lost} marked FAIL and re-queued" if lost else ""))
                if restarts < 2 * n and should_stop(study, job) is None:
                    restarts += 1
                    start(i)
    except KeyboardInterrupt:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        raise
    reason = should_stop(study, job)
    if reason is None and exit_codes:
        return (f"stopped: worker processes keep exiting (status {exit_codes[-1]}; {len(exit_codes)} exits, "
                f"{restarts} restarts); see their errors above")
    return None if reason == "done" else reason

