"""One training run as one MLflow run: :class:`MlflowRun`, a training callback.

At ``on_train_begin`` it creates the run (a child of the sweep's parent run
when there is one) with the flattened config and the short choice names as
params, the source tags, and the resolved ``config.yaml``; at each
``on_epoch_end`` it logs the epoch's metrics in one ``MlflowClient.log_batch``
with ``step=epoch`` (REFERENCE.md: batching is ~60x faster than one metric per
call); at the end it logs the final metrics, the learning curve, the weights
and ends the run with the status that matches how training ended (FINISHED,
KILLED for a pruned trial, FAILED), tagged with the Optuna trial state.
Every MLflow call runs on the tracking thread (:mod:`.worker`).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from rnnsearch.callbacks import Callback, TrainingDiverged
from rnnsearch.tracking import worker
from rnnsearch.tracking.settings import TrackingSettings, choice_params, flatten, format_value, run_config, run_label, to_dict

RERUN_HINT = ("# The resolved config of this run. Rerun it with\n"
              "#   mlflow artifacts download --run-id RUN_ID --artifact-path config.yaml --dst-path DIR\n"
              "#   python -m rnnsearch --config-path \"$(realpath DIR)\" --config-name config [key=value ...]\n")


def classify_abort(exc: BaseException, trial: bool = False) -> tuple[str, str, Optional[str]]:
    """``(run status, trial state, reason)`` of a training that ended with ``exc``.

    A sweep trial whose loss diverged counts as pruned, as the sweep records it in Optuna
    (rnnsearch/search/objective.py); a single run that diverged failed.
    """
    optuna = sys.modules.get("optuna")
    if (optuna is not None and isinstance(exc, optuna.TrialPruned)) or type(exc).__name__ == "TrialPruned":
        return "KILLED", "PRUNED", str(exc) or None
    if trial and isinstance(exc, TrainingDiverged):
        return "KILLED", "PRUNED", f"diverged: {exc}"[:2000]
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "FAIL", "interrupted (KeyboardInterrupt)"
    return "FAILED", "FAIL", f"{type(exc).__name__}: {exc}".strip()[:2000]


class MlflowRun(Callback):
    """Records one training run in MLflow (see the module docstring)."""

    def __init__(self, settings: TrackingSettings, cfg: Any, *, parent_run_id: Optional[str] = None,
                 run_name: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
                 params: Optional[dict[str, Any]] = None) -> None:
        self.settings = settings
        self.cfg = run_config(cfg)  # what defines the run: params
        self.saved_cfg = {k: v for k, v in to_dict(cfg).items() if k not in ("hydra", "sweep")}  # config.yaml
        self.parent_run_id = parent_run_id
        self.run_name = run_name or run_label(self.cfg)
        self.extra_tags = dict(tags or {})
        self.extra_params = {k: format_value(v) for k, v in (params or {}).items()}
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self.stats = worker.Stats()
        self._model: Any = None
        self._metric = "val/loss"
        self._t0 = 0.0

    # -- training thread: copy what is needed and hand the MLflow work to the tracking thread --

    def _submit(self, fn: Any, *args: Any, what: str) -> None:
        worker.submit(fn, *args, background=self.settings.background, stats=self.stats, what=what)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        t0 = self._t0 = time.perf_counter()
        task, device = info.get("task"), str(info.get("device", "cpu"))
        self._model = info.get("model")
        self._metric = f"val/{getattr(task, 'metric', 'loss')}"
        params = {**flatten(self.cfg), **choice_params(self.cfg, info.get("params")), **self.extra_params}
        tags = {"device": device, "task": (self.cfg.get("task") or {}).get("name", ""), "metric": self._metric,
                "direction": getattr(task, "direction", "minimize"), **self.extra_tags}
        if info.get("compile"):  # how the cell path ran (compiled, a fused CPU kernel, eager), and why
            tags["compile"] = str(info["compile"])[:5000]
            tags["compiled"] = str(bool(info.get("compiled"))).lower()
        for name, attr in (("baseline", "baseline"), ("solved_at", "solved")):  # the task's reference values
            if getattr(task, attr, None) is not None:
                tags[name] = repr(float(getattr(task, attr)))
        if device.startswith("cuda"):
            import torch

            tags["device_name"] = torch.cuda.get_device_name(torch.device(device))
        self._submit(self._start, params, tags, what="creating the MLflow run")
        self.stats.caller_s += time.perf_counter() - t0

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.history.append((epoch, metrics))
        self._submit(self._log_metrics, metrics, epoch, int(time.time() * 1000), what=f"logging epoch {epoch}")
        self.stats.caller_s += time.perf_counter() - t0

    def on_train_end(self, result: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        state = None
        if self.settings.log_weights and self._model is not None:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()}
        per_epoch = set(self.history[-1][1]) if self.history else set()
        final = {k: float(v) for k, v in result.items()
                 if isinstance(v, (int, float)) and k not in per_epoch and k != "params"}
        final["train_seconds"] = time.perf_counter() - self._t0
        tags = {"trial_state": "COMPLETE", "stopped_by": result.get("stopped_by", "")}
        model = self._model if self.settings.log_model else None
        self._model = None
        self._submit(self._finish, "FINISHED", tags, final, state, model, what="ending the MLflow run")
        self.stats.caller_s += time.perf_counter() - t0

    def on_train_abort(self, exc: BaseException) -> None:
        t0 = time.perf_counter()
        status, state, reason = classify_abort(exc, trial=self.parent_run_id is not None)
        tags = {"trial_state": state}
        if state == "PRUNED":
            tags["pruned_at_epoch"] = str(self.history[-1][0] if self.history else 0)
        if reason:
            tags["pruned_reason" if state == "PRUNED" else "failure_reason"] = reason
        self._model = None
        final = {"train_seconds": time.perf_counter() - self._t0}
        self._submit(self._finish, status, tags, final, None, None, what="ending the MLflow run")
        self.stats.caller_s += time.perf_counter() - t0

    # -- tracking thread --

    def _start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        uri = self.settings.uri
        client = worker.client(uri)
        if self.parent_run_id:
            self.experiment_id = client.get_run(self.parent_run_id).info.experiment_id
            tags = {"mlflow.parentRunId": self.parent_run_id, **tags}
        else:
            self.experiment_id = worker.experiment_id(uri, self.settings.experiment)
        run = client.create_run(self.experiment_id, run_name=self.run_name, tags=worker.run_tags(tags))
        self.run_id = run.info.run_id
        worker.log_params(uri, self.run_id, params)
        import yaml

        client.log_text(self.run_id, RERUN_HINT + yaml.safe_dump(self.saved_cfg, sort_keys=False), "config.yaml")

    def _log_metrics(self, metrics: dict[str, float], step: int, timestamp: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        batch = [Metric(k, v, timestamp, step) for k, v in metrics.items() if math.isfinite(v)]
        worker.client(self.settings.uri).log_batch(self.run_id, metrics=batch)

    def _finish(self, status: str, tags: dict[str, str], final: dict[str, float], state: Optional[dict[str, Any]],
                model: Any) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        client = worker.client(self.settings.uri)
        try:
            now = int(time.time() * 1000)
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
                             metrics=[Metric(k, v, now, 0) for k, v in final.items() if math.isfinite(v)])
            self._log_files(client, tags["trial_state"], state)
            if model is not None:
                self._log_model(model)
        finally:  # an artifact that fails must not leave the run RUNNING or change its status
            client.set_terminated(self.run_id, status)
        if self.parent_run_id is None:
            print(f"mlflow: run '{self.run_name}' ({status.lower()}) in experiment '{self.settings.experiment}' "
                  f"at {self.settings.uri}; see it with: mlflow ui --backend-store-uri {self.settings.uri}",
                  flush=True)

    def _log_files(self, client: Any, trial_state: str, state: Optional[dict[str, Any]]) -> None:
        """The learning curve and the weights, in one ``log_artifacts`` call."""
        with tempfile.TemporaryDirectory(prefix="rnnsearch-") as tmp:
            if self.settings.log_curve and self.history:
                from rnnsearch.tracking.plots import learning_curve

                learning_curve(self.history, self._metric, f"{self.run_name} ({trial_state.lower()})",
                               Path(tmp) / "learning_curve.png")
            if state is not None:
                import torch

                torch.save(state, Path(tmp) / "state_dict.pt")
            if any(Path(tmp).iterdir()):
                client.log_artifacts(self.run_id, tmp)

    def _log_model(self, model: Any) -> None:
        """``mlflow.pytorch.log_model`` (pickled module; needs rnnsearch to load) on our run, resumed on this thread.

        The fluent API needs an active run; leaving the ``with`` block marks it FINISHED (or FAILED),
        and :meth:`_finish` then sets the status that matches the training.
        """
        import mlflow
        import torch

        mlflow.set_tracking_uri(self.settings.uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "rnnsearch"])
