"""``python -m rnnsearch.report``: the comparison table and plot from runs read back from MLflow."""

from __future__ import annotations

import pytest

from rnnsearch import report

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's SQL store

# (cell, layers, bidirectional, best/val/mse): two lstm-1-uni runs, one of everything else.
RUNS = [("lstm", 1, False, 0.020), ("lstm", 1, False, 0.040), ("lstm", 2, True, 0.005), ("gru", 1, False, 0.010),
        ("gru", 2, False, 0.008), ("rnn", 1, False, 0.160)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Runs logged the way rnnsearch logs them, plus a sweep parent run and a failed run (both left out)."""
    from mlflow.entities import Metric, Param, RunTag

    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    eid = client.create_experiment("study-a", artifact_location=str(root / "artifacts"))
    parent = client.create_run(eid, run_name="study-a", tags={"rnnsearch.role": "sweep", "study": "study-a"})
    client.set_terminated(parent.info.run_id)
    for i, (cell, layers, bi, mse) in enumerate(RUNS):
        run = client.create_run(eid, run_name=f"t{i:03d}-{cell}-{layers}x8{'-bi' if bi else ''}",
                                tags={"mlflow.parentRunId": parent.info.run_id})
        params = {"cell": cell, "num_layers": str(layers), "bidirectional": str(bi).lower(), "num_params": str(100 * (i + 1))}
        client.log_batch(run.info.run_id, metrics=[Metric("best/val/mse", mse, 0, 0), Metric("val/mse", mse * 2, 0, 2)],
                         params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag("metric", "val/mse"), RunTag("direction", "minimize")])
        client.set_terminated(run.info.run_id)
    failed = client.create_run(eid, run_name="t099-lstm-1x8")
    client.log_batch(failed.info.run_id, metrics=[Metric("best/val/mse", 0.0001, 0, 0)], params=[Param("cell", "lstm")])
    client.set_terminated(failed.info.run_id, "FAILED")
    # A single run in another experiment, logged before the short param names existed.
    other = client.create_experiment("rnnsearch", artifact_location=str(root / "artifacts2"))
    old = client.create_run(other, run_name="ln_lstm-1x8")
    client.log_batch(old.info.run_id, metrics=[Metric("best/val/mse", 0.03, 0, 0)],
                     params=[Param("cell.name", "ln_lstm"), Param("model.num_layers", "1"),
                             Param("model.bidirectional", "false")], tags=[RunTag("metric", "val/mse")])
    client.set_terminated(old.info.run_id)
    return uri, root


def test_report_table_and_plot(store, capsys):
    uri, root = store
    png = root / "report.png"
    assert report.main(["--tracking-uri", uri, "--experiment", "study-a", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"best/val/mse (lower is better) of 6 runs in study-a at {uri}")
    table = out.split("\n\n")[1].splitlines()
    assert table[0].split() == ["cell", "layers", "direction", "runs", "best", "median", "mean", "best", "run"]
    rows = [line.split() for line in table[2:]]
    assert rows[0] == ["lstm", "2", "bi", "1", "0.005", "0.005", "0.005", "t002-lstm-2x8-bi"]  # best group first
    assert ["lstm", "1", "uni", "2", "0.02", "0.03", "0.03", "t000-lstm-1x8"] in rows
    assert rows[-1][0] == "rnn" and len(rows) == 5
    assert "study-a" not in [r[-1] for r in rows] and "t099-lstm-1x8" not in out  # parent and failed runs left out
    assert "best 5 runs:" in out and png.read_bytes()[:4] == b"\x89PNG"


def test_report_all_experiments_metric_and_fallback_params(store, capsys):
    uri, root = store
    assert report.main(["--tracking-uri", uri, "--metric", "val/mse", "--by", "cell", "--plot", "", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("val/mse (lower is better) of 6 runs in all experiments")  # the old run has no val/mse
    assert report.main(["--tracking-uri", uri, "--by", "cell", "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert "of 7 runs in all experiments" in out and "ln_lstm" in out  # cell.name used when `cell` is missing


def test_report_errors(store, capsys, tmp_path):
    uri, _ = store
    assert report.main(["--tracking-uri", uri, "--experiment", "nope", "--plot", ""]) == 2
    assert "no experiment 'nope' at" in (err := capsys.readouterr().err) and "experiments: Default, rnnsearch, study-a" in err
    assert report.main(["--tracking-uri", uri, "--metric", "val/acc", "--plot", ""]) == 2
    assert "no metric 'val/acc' in these runs; metrics: best/val/mse, val/mse" in capsys.readouterr().err
    assert report.main(["--tracking-uri", uri, "--by", "dropout", "--plot", ""]) == 2
    assert "no param 'dropout'" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path}/none.db"
    assert report.main(["--tracking-uri", missing]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_report_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: python -m rnnsearch.report")
    assert "--tracking-uri" in out and "--experiment" in out and "--metric" in out and "--by" in out
