"""A two-worker sweep backed by a real PostgreSQL server (``RNNSEARCH_TEST_POSTGRES_URL``).

Start one with ``export RNNSEARCH_TEST_POSTGRES_URL="$(scripts/ci_postgres.sh)"`` and run
``pytest -m postgres``; without the variable these tests skip.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from rnnsearch.search.study import database_url
from test_search_sweep import sweep, sweep_cfg

URL = os.environ.get("RNNSEARCH_TEST_POSTGRES_URL")
DB = database_url(URL) if URL else ""  # the URL as SQLAlchemy needs it with the installed driver
pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not URL, reason="set RNNSEARCH_TEST_POSTGRES_URL (scripts/ci_postgres.sh)")]


@pytest.fixture
def study_name() -> str:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=DB)
    except KeyError:
        pass


def test_two_workers_share_a_postgres_study(tmp_path: Path, study_name: str) -> None:
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=6", "sweep.workers=2", "sweep.pruner=none",
                    f"sweep.study_name={study_name}", f"sweep.storage='{URL}'")
    summary, text = sweep(cfg)
    trials = optuna.load_study(study_name=study_name, storage=DB).trials
    assert len(trials) == 6 and summary["trials"] == 6  # the advisory lock keeps the count exact
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len(Counter(t.user_attrs["worker"] for t in trials)) == 2
    assert f"storage: {URL}" in text


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_without_heartbeat_is_failed_and_retried(tmp_path: Path, study_name: str) -> None:
    from rnnsearch.search.settings import SweepSettings
    from rnnsearch.search.study import make_storage, open_study

    settings = SweepSettings(heartbeat_interval=1, grace_period=3)
    storage = make_storage(URL, settings)
    study = open_study(study_name, storage, ["minimize"])
    orphan = study.ask()  # a worker on another machine that died mid-trial
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(4)
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=2", "sweep.pruner=none", "sweep.heartbeat_interval=1",
                    "sweep.grace_period=3", f"sweep.study_name={study_name}", f"sweep.storage='{URL}'")
    summary, _ = sweep(cfg)
    trials = optuna.load_study(study_name=study_name, storage=DB).trials
    assert trials[orphan.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert summary["trials"] == 2
