"""Optuna plumbing: storage, sampler, pruner and objective factories, the study, and the claim lock.

* Storage: by default a :class:`~optuna.storages.JournalStorage` file in the
  working directory named after the study (``<study>.journal``; safe for several
  processes on one machine, where Optuna's FAQ advises against SQLite). Any
  Optuna URL works: ``postgresql://...`` (and other RDBs) get
  :class:`~optuna.storages.RDBStorage` with heartbeats, so a trial whose worker
  died is failed and retried (``RetryHeartbeatStaleTrialCallback``, the Optuna 5
  name of ``RetryFailedTrialCallback``); ``redis://`` gets a journal on Redis.
* Samplers: ``tpe`` (default; multivariate, grouped for conditional spaces,
  constant liar for parallel workers), ``random``, ``gp``, ``cmaes``, ``grid``,
  ``nsga2``; each seeded. Pruners: ``median`` (default), ``hyperband``,
  ``successive_halving``, ``none``.
* The claim lock makes "start a trial only while fewer than ``n_trials`` are
  finished or running" atomic across workers: a file lock for file storages, a
  PostgreSQL advisory lock for PostgreSQL; other URLs run unlocked (workers may
  then overshoot ``n_trials`` by up to ``workers - 1`` trials).
"""

from __future__ import annotations

import os
import uuid
import warnings
import zlib
from collections.abc import Sequence
from typing import Any, Optional

import optuna
from optuna.exceptions import ExperimentalWarning

from rnnsearch.errors import ConfigError

from .settings import SweepSettings
from .space import Param, grid_values

MINIMIZED = ("params", "loss", "mse", "nll", "seconds", "epoch_seconds", "steps", "epochs", "error", "bpc")
MAXIMIZED = ("accuracy", "acc", "tokens_per_s", "solved", "f1", "auc")


def storage_spec(storage: Optional[str], study_name: str) -> str:
    """The storage as a URL or an absolute journal-file path (``None`` → ``./<study>.journal``)."""
    if storage is None or storage == "":
        return os.path.abspath(f"{study_name}.journal")
    storage = str(storage)
    if "://" in storage:
        return storage
    return os.path.abspath(storage)


def is_url(spec: str) -> bool:
    return "://" in spec


def database_url(url: str) -> str:
    """``postgresql://`` → ``postgresql+psycopg2://`` when only psycopg2 is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the ``postgres``
    extra installs psycopg2-binary. An explicit ``+driver`` is left alone.
    """
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def make_storage(spec: str, settings: SweepSettings) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``spec`` (a journal file path or a URL)."""
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    if not is_url(spec):
        try:
            os.makedirs(os.path.dirname(spec) or ".", exist_ok=True)
            return JournalStorage(JournalFileBackend(spec))
        except OSError as exc:
            raise ConfigError(f"sweep.storage={spec!r} cannot be used as a journal file ({exc.strerror or exc}); "
                              f"give a file path (default: <study>.journal here) or a database URL such as "
                              f"postgresql://user@host/db.") from None
    if spec.startswith("redis"):
        return JournalStorage(JournalRedisBackend(spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        kwargs: dict[str, Any] = {}
        if not spec.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"pool_pre_ping": True}
        try:
            return RDBStorage(database_url(spec), heartbeat_interval=settings.heartbeat_interval,
                              grace_period=settings.grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(settings.max_retry),
                              **kwargs)
        except ImportError as exc:
            raise ConfigError(f"sweep.storage={spec!r} needs a database driver: {exc}. For PostgreSQL: "
                              f"pip install 'rnnsearch[postgres]' (psycopg2-binary).") from None
        except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors for a bad URL or an unreachable server
            raise ConfigError(f"sweep.storage={spec!r} cannot be opened: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''} (a journal file path, or a URL "
                              f"such as sqlite:///sweep.db or postgresql://user@host/db).") from None


def make_sampler(settings: SweepSettings, space: Sequence[Param], seed: int, n_trials: int,
                 max_layers: int) -> optuna.samplers.BaseSampler:
    """The sampler ``settings.sampler`` with ``settings.sampler_options``, seeded with ``seed``."""
    s = optuna.samplers
    opts = dict(settings.sampler_options)
    name = settings.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            if name == "tpe":
                opts.setdefault("n_startup_trials", min(10, max(3, n_trials // 4)))
                opts.setdefault("group", True)  # conditional spaces: model each group of co-occurring params
                opts.setdefault("multivariate", bool(opts["group"]) or None)
                return s.TPESampler(seed=seed, **opts)
            if name == "random":
                return TrialSeededRandomSampler(seed=seed, **opts)
            if name == "gp":
                opts.setdefault("warn_independent_sampling", False)
                return s.GPSampler(seed=seed, **opts)
            if name == "cmaes":
                try:
                    import cmaes  # noqa: F401
                except ImportError:
                    raise ConfigError("sweep.sampler=cmaes needs the 'cmaes' package: pip install cmaes.") from None
                opts.setdefault("warn_independent_sampling", False)
                return s.CmaEsSampler(seed=seed, **opts)
            if name == "nsga2":
                opts.setdefault("population_size", max(4, min(50, n_trials // 4)))
                return s.NSGAIISampler(seed=seed, **opts)
            if name == "grid":
                return s.GridSampler(grid_space(space, max_layers), seed=seed, **opts)
        except (TypeError, ValueError) as exc:  # an unknown option, or a value the sampler rejects
            raise ConfigError(f"sweep.sampler_options for sampler {name!r}: {exc}.") from None
    raise ConfigError(f"Unknown sampler {name!r}.")  # unreachable: settings are checked


class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
    """Random search whose draws depend only on the seed and the trial number.

    Optuna's RandomSampler draws from one stream per sampler object, so with
    several workers which trial gets which draw depends on timing. Reseeding
    from ``(seed, trial.number)`` when each trial starts makes a random search
    reproducible with any number of workers or resumes, and gives trial *n* the
    same draw in every study with the same seed and search space (experiments
    use that to compare variants on identical hyperparameters).
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        super().__init__(seed=seed)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._base_seed is not None:
            self._rng.rng.seed([self._base_seed % 2**32, trial.number])
        super().before_trial(study, trial)


def grid_space(space: Sequence[Param], max_layers: int) -> dict[str, list[Any]]:
    """Every sampled key (``{k}`` expanded to ``max_layers``) with all its values."""
    out: dict[str, list[Any]] = {}
    for p in space:
        if p.fixed:
            continue
        keys = [p.key.replace("{k}", str(k)) for k in range(max_layers)] if "{k}" in p.key else [p.key]
        for key in keys:
            out[key] = grid_values(p.dist, p.key)
    if not out:
        raise ConfigError("sampler=grid: sweep.params has nothing to search.")
    return out


def make_pruner(settings: SweepSettings, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner ``settings.pruner`` with ``settings.pruner_options`` (``epochs`` = max resource)."""
    p = optuna.pruners
    opts = dict(settings.pruner_options)
    try:
        if settings.pruner == "median":
            opts.setdefault("n_startup_trials", 5)
            opts.setdefault("n_warmup_steps", 2)
            return p.MedianPruner(**opts)
        if settings.pruner == "hyperband":
            opts.setdefault("min_resource", 1)
            opts.setdefault("max_resource", max(epochs, 1))
            opts.setdefault("reduction_factor", 3)
            return p.HyperbandPruner(**opts)
        if settings.pruner == "successive_halving":
            opts.setdefault("min_resource", 1)
            opts.setdefault("reduction_factor", 3)
            return p.SuccessiveHalvingPruner(**opts)
        return p.NopPruner(**opts)
    except (TypeError, ValueError) as exc:  # an unknown option, or a value the pruner rejects
        raise ConfigError(f"sweep.pruner_options for pruner {settings.pruner!r}: {exc}.") from None


def objectives_and_directions(settings: SweepSettings, metric: str, direction: str) -> tuple[list[str], list[str]]:
    """The metrics a trial returns (keys of ``train()``'s result) and whether each is minimised or maximised."""
    names = list(settings.objectives or [f"best/val/{metric}"])
    if settings.directions is not None:
        if len(settings.directions) != len(names):
            raise ConfigError(f"sweep.directions has {len(settings.directions)} entries but sweep.objectives has "
                              f"{len(names)} ({names}); give one direction per objective.")
        return names, list(settings.directions)
    dirs = []
    for name in names:
        last = str(name).split("/")[-1]
        if last == metric:
            dirs.append(direction)
        elif last in MINIMIZED or "loss" in last:
            dirs.append("minimize")
        elif last in MAXIMIZED:
            dirs.append("maximize")
        else:
            raise ConfigError(f"Cannot tell whether sweep objective {name!r} should be minimised or maximised; "
                              f"set sweep.directions (one of minimize/maximize per objective).")
    return names, dirs


def study_identity(study: optuna.Study, spec: str) -> tuple[str, bool]:
    """A random id stored with the study at its first run (tells it from a later study under the same name).

    Returns ``(id, created)``; ``created`` is True when this call stored it. Workers on several machines
    starting together take the study's claim lock, so they all read the one id the first of them wrote.
    """
    lock = ClaimLock(spec, study.study_name)
    lock.acquire()
    try:
        value = study.user_attrs.get("rnnsearch_id")  # read from the storage, under the lock
        if value is not None:
            return str(value), False
        value = uuid.uuid4().hex
        study.set_user_attr("rnnsearch_id", value)
        return value, True
    finally:
        lock.release()


def open_study(study_name: str, storage: optuna.storages.BaseStorage, directions: list[str],
               sampler: Optional[optuna.samplers.BaseSampler] = None,
               pruner: Optional[optuna.pruners.BasePruner] = None) -> optuna.Study:
    """Create the study or load it (resume); a study with other directions is an error."""
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                directions=directions, load_if_exists=True)
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise ConfigError(f"The study {study_name!r} in this storage optimises {have}, not {directions}. "
                          f"Pick another sweep.study_name (or objectives) for a different study.")
    return study


class ClaimLock:
    """Serialises "check the trial count, then start a trial" across worker processes."""

    def __init__(self, spec: str, study_name: str) -> None:
        self.spec = spec
        self.key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        self._fd: Optional[int] = None
        self._conn: Any = None
        self._engine: Any = None
        self.kind = "none"
        if not is_url(spec):
            self.path = spec + ".claim"
            self.kind = "file"
        elif spec.startswith("sqlite:///") and ":memory:" not in spec:
            self.path = spec[len("sqlite:///"):] + ".claim"
            self.kind = "file"
        elif spec.startswith(("postgresql", "postgres")):
            self.kind = "postgres"
        self.held = False

    def acquire(self) -> None:
        if self.held:
            return
        if self.kind == "file":
            import fcntl

            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.kind == "postgres":
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(database_url(self.spec), poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.kind == "file" and self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self.kind == "postgres" and self._conn is not None:
            import sqlalchemy

            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            finally:
                self._conn.close()
                self._conn = None


def space_fingerprint(space: Sequence[Param], objectives: Sequence[str]) -> dict[str, Any]:
    """What the study searches, stored on the study to warn when a resume changes it."""
    return {"params": {p.key: p.text for p in space}, "objectives": list(objectives)}


def counted_states() -> tuple[optuna.trial.TrialState, ...]:
    """Trial states that count toward ``n_trials`` (FAIL does not: a failed trial is replaced)."""
    S = optuna.trial.TrialState
    return (S.COMPLETE, S.PRUNED)
