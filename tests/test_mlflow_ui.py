"""End to end in a real browser: a tiny sweep, ``mlflow server`` over its store, headless Chromium.

Opens the study's runs table (``#/experiments/<id>/runs``), expands the parent
run, reads the trial run names from the page, selects the trials, opens
Compare, and finds the parallel-coordinates plot and the searched params.
Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/ci_browser.sh) and
``selenium``; run with ``pytest -m browser``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")]

STUDY = "ui-study"
TRIALS = [("lstm", 1), ("gru", 2), ("rnn", 1)]
TINY = ["device=cpu", "task.seq_len=8", "task.train_size=96", "task.val_size=32", "task.test_size=32",
        "model.hidden_size=8", "train.epochs=2", "train.batch_size=32"]


def fill_store(uri: str) -> tuple[str, str]:
    """Run a real 3-trial Optuna sweep with tracking into ``uri``; returns (experiment id, parent run id)."""
    import mlflow
    import optuna
    from hydra import compose, initialize_config_dir

    from rnnsearch.cli import CONF_DIR
    from rnnsearch.tracking import finish_sweep_run, run_label, start_sweep_run, tracking_callbacks
    from rnnsearch.train import train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose("config", overrides=[*TINY, f"tracking.uri={uri}"])
        parent = start_sweep_run(base, STUDY)
        study = optuna.create_study(study_name=STUDY)
        for cell, layers in TRIALS:
            study.enqueue_trial({"cell": cell, "num_layers": layers})

        def objective(trial):
            p = {"cell": trial.suggest_categorical("cell", ["lstm", "gru", "rnn"]),
                 "num_layers": trial.suggest_int("num_layers", 1, 2)}
            cfg = compose("config", overrides=[*TINY, f"tracking.uri={uri}", f"cell={p['cell']}",
                                               f"model.num_layers={p['num_layers']}"])
            cbs = tracking_callbacks(cfg, parent_run_id=parent, run_name=f"t{trial.number:03d}-{run_label(cfg)}",
                                     tags={"study": STUDY, "trial": trial.number}, params=p)
            return train(cfg, cbs)["best/val/mse"]

        study.optimize(objective, n_trials=len(TRIALS))
        finish_sweep_run(base, parent, study)
    return mlflow.MlflowClient(uri).get_experiment_by_name(STUDY).experiment_id, parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` (one worker, no job execution) over a store a real tiny sweep filled."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        experiment_id, parent = fill_store(uri)
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield base, experiment_id, parent
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group we started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/ci_browser.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def test_compare_sweep_trials_in_mlflow_ui(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, experiment_id, parent = server
    wait = WebDriverWait(browser, 120)
    try:
        browser.get(f"{base}/#/experiments/{experiment_id}/runs")
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "Training runs"))
        parent_row = wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, f'.ag-pinned-left-cols-container div.ag-row[row-id="{parent}"]')))
        assert STUDY in parent_row.text
        # Expand the parent: its expander is the button in the run-name cell.
        parent_row.find_element(By.CSS_SELECTOR, '[col-id="attributes.`Run Name`"] button').click()
        rows_css = ".ag-pinned-left-cols-container div.ag-row"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, rows_css)) == 1 + len(TRIALS))
        names = {}
        for row in browser.find_elements(By.CSS_SELECTOR, rows_css):
            name = row.find_element(By.CSS_SELECTOR, 'a[href*="/runs/"]').text
            if name != STUDY:
                names[name] = row
        expected = {f"t{i:03d}-{cell}-{layers}x8" for i, (cell, layers) in enumerate(TRIALS)}
        assert set(names) == expected
        for row in names.values():
            row.find_element(By.CSS_SELECTOR, ".ag-selection-checkbox input").click()
        compare = wait.until(lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button")
                                             if b.text.strip() == "Compare" and b.is_enabled()), False))
        compare.click()
        wait.until(EC.url_contains("compare-runs"))
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "Parallel Coordinates Plot"))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot .parcoords")))
        text = browser.find_element(By.TAG_NAME, "body").text
        assert f"Comparing {len(TRIALS)} Runs" in text
        lines = text.splitlines()
        for name in expected:
            assert name in text
        # The searched params, one value per run, in the compare page's Parameters table.
        row = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("cell ", "num_layers "))}
        assert sorted(row["cell"]) == ["gru", "lstm", "rnn"] and sorted(row["num_layers"]) == ["1", "1", "2"]
    except Exception:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        print(f"screenshot: {tmp_path / 'failure.png'}")
        raise
