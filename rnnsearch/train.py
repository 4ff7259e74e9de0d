"""One training run: ``train(cfg) -> metrics``.

``train`` builds the task and the model from the config, then ``fit`` runs the
loop: seeded, on ``cfg.device`` (``auto|cpu|cuda|cuda:N``), Adam or SGD with
gradient clipping, an epoch and optional step budget, validation each epoch,
and a stop with a clear message when the loss becomes non-finite. Losses and
metric sums accumulate on the device and are read once per epoch (no
host–device sync per step; the fused path packs with the batch's CPU copy of
its lengths). ``train.amp=bf16`` runs forward and loss under bfloat16
autocast; ``model.compile`` is decided here, from the run's budget
(:func:`rnnsearch.compile.prepare`). Side effects go only through callbacks
(:mod:`rnnsearch.callbacks`): progress, pruning and tracking plug in there.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from rnnsearch import compile as compiling
from rnnsearch.callbacks import Callback, StopTraining, TrainingDiverged
from rnnsearch.errors import ConfigError, check_known_keys, check_positive_int, check_positive_number, choice_error
from rnnsearch.fused import keep_folds_out_of_weight_decay
from rnnsearch.model import build_model, count_parameters
from rnnsearch.tasks import Task, create_task
from rnnsearch.tasks.base import Batch, check_direction

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
AMP_MODES = ("false", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else CPU; otherwise validate the name."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N.") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"device={name!r} is not available: this machine has {n} CUDA device(s). Use device=auto or cpu.")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={name!r} is not available: this PyTorch or machine has no MPS (Apple GPU). "
                              f"Use device=auto or cpu.")
    elif dev.type != "cpu":
        raise ConfigError(f"device={name!r} is not supported; valid: auto, cpu, cuda, cuda:N, mps.")
    return dev


def make_optimizer(cfg: Mapping[str, Any], params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD / RMSprop from ``cfg.optim`` (``name``, ``lr`` and the optimizer's own options)."""
    opts = dict(cfg)
    name = opts.pop("name", "adam")
    lr = opts.pop("lr", None)
    lr = check_positive_number("optim.lr", lr)
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
               "rmsprop": torch.optim.RMSprop}
    if name not in classes:
        raise choice_error("optimizer", name, OPTIMIZERS)
    try:
        return classes[name](params, lr=lr, **opts)
    except (TypeError, ValueError) as exc:  # an unknown option, or a value torch.optim rejects
        raise ConfigError(f"optim: {exc} (options of {name}: see torch.optim.{classes[name].__name__}).") from None


def amp_dtype(value: Any, device: torch.device) -> Optional[torch.dtype]:
    """``train.amp``: false (float32) or bf16 (bfloat16 autocast, on CUDA or CPU)."""
    name = "false" if value in (None, False) else str(value).lower()
    if name not in AMP_MODES:
        raise choice_error("train.amp", value, AMP_MODES)
    if name == "false":
        return None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.amp={value!r} needs a cpu or cuda device, not {device}; use train.amp=false.")
    return torch.bfloat16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _lengths(model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
    """The lengths to pass: the CPU copy for the fused path (packing without a device sync), else on device."""
    if batch.cpu_lengths is not None and getattr(model, "fused", False):
        return batch.cpu_lengths
    return batch.lengths


def evaluate(model: nn.Module, task: Task, split: str, batch_size: int, device: torch.device,
             amp: Optional[torch.dtype] = None) -> dict[str, float]:
    """Metrics of ``model`` on a whole split, as ``{"<split>/<name>": value}``."""
    model.eval()
    sums: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in task.batches(split, batch_size, device):
            with _autocast(device, amp):
                out = model(batch.x, _lengths(model, batch))
            out = out.float()  # metrics in float32 (a no-op without amp)
            for k, (s, n) in task.metric_sums(out, batch).items():
                acc = sums.setdefault(k, [torch.zeros((), device=device), torch.zeros((), device=device)])
                acc[0] += s.detach()
                acc[1] += n
    values = torch.stack([torch.stack([s, n]) for s, n in sums.values()]).tolist()  # one sync
    return {f"{split}/{k}": (s / n if n else float("nan")) for k, (s, n) in zip(sums, values)}


def _is_better(a: float, b: Optional[float], direction: str) -> bool:
    if b is None or math.isnan(b):
        return not math.isnan(a)
    return a < b if direction == "minimize" else a > b


#: The ``train`` section's settings (conf/config.yaml); any other key is refused, not ignored.
TRAIN_KEYS = ("epochs", "batch_size", "eval_batch_size", "max_steps", "grad_clip", "amp")


def fit(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any],
        device: torch.device, callbacks: Sequence[Callback] = (), info: Optional[dict[str, Any]] = None,
        seed: int = 0) -> dict[str, Any]:
    """Train ``model`` on ``task``; returns the final metrics (see :func:`train`)."""
    check_known_keys("train", cfg.keys(), TRAIN_KEYS)
    epochs = check_positive_int("train.epochs", cfg.get("epochs", 10))
    batch_size = check_positive_int("train.batch_size", cfg.get("batch_size", 64))
    eval_bs = cfg.get("eval_batch_size")
    eval_bs = 4 * batch_size if eval_bs is None else check_positive_int("train.eval_batch_size", eval_bs)
    max_steps = cfg.get("max_steps")
    if max_steps is not None:
        check_positive_int("train.max_steps", max_steps)
    clip = cfg.get("grad_clip")
    if clip is not None:
        clip = check_positive_number("train.grad_clip", clip, " (the largest gradient norm) or null (no clipping)")
    amp = amp_dtype(cfg.get("amp", False), device)
    shuffle_gen = torch.Generator().manual_seed(seed)
    decision = _prepare_compile(model, task, epochs, batch_size, max_steps, device, amp)
    info = dict(info or {}, model=model, task=task, device=str(device), epochs=epochs,
                params=count_parameters(model), compile=decision.reason, compiled=decision.compile)
    for cb in callbacks:
        cb.on_train_begin(info)

    try:
        result = _loop(model, task, optimizer, device, callbacks, epochs, batch_size, eval_bs, max_steps, clip,
                       shuffle_gen, info["params"], amp)
    except BaseException as exc:
        for cb in callbacks:
            cb.on_train_abort(exc)
        raise
    for cb in callbacks:
        cb.on_train_end(result)
    return result


def _prepare_compile(model: nn.Module, task: Task, epochs: int, batch_size: int, max_steps: Optional[int],
                     device: torch.device, amp: Optional[torch.dtype]) -> compiling.Decision:
    """Apply ``model.compile`` for this run's budget (epochs × steps per epoch, capped by max_steps)."""
    mode = getattr(model, "compile_mode", "false")
    if compiling.compile_mode(mode) == "false" or not compiling.step_cells(model):  # nothing to decide
        return compiling.prepare(model, mode, optimizer_steps=0, seq_len=0, batch_size=batch_size,
                                 masked=False, device=device, amp=amp)
    train = task.split("train")  # generated once and cached: the loop uses it next
    steps = epochs * math.ceil(len(train) / batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    return compiling.prepare(model, mode, optimizer_steps=steps, seq_len=train.x.shape[1],
                             batch_size=min(batch_size, len(train)), masked=train.lengths is not None,
                             device=device, amp=amp)


def _loop(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, device: torch.device,
          callbacks: Sequence[Callback], epochs: int, batch_size: int, eval_bs: int, max_steps: Optional[int],
          clip: Optional[float], shuffle_gen: torch.Generator, params: int,
          amp: Optional[torch.dtype] = None) -> dict[str, Any]:
    key = f"val/{task.metric}"
    history: list[dict[str, float]] = []
    best: Optional[float] = None
    best_epoch = 0
    best_state: Optional[dict[str, torch.Tensor]] = None
    steps = 0
    stopped = "epochs"
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # Σ batch loss × its weight (task.loss_weight): a per-example mean
        weight = torch.zeros((), device=device)
        host_weight = 0
        tokens = torch.zeros((), device=device, dtype=torch.long)  # counted on the device only without CPU lengths
        host_tokens = 0
        for batch in task.batches("train", batch_size, device, shuffle=True, generator=shuffle_gen):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                out = model(batch.x, _lengths(model, batch))
            loss = task.loss(out.float(), batch)  # the loss in float32 (out.float() is a no-op without amp)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            w = task.loss_weight(batch)
            loss_sum += loss.detach() * w
            if isinstance(w, torch.Tensor):
                weight += w
            else:
                host_weight += w
            if batch.lengths is None:
                host_tokens += batch.x.shape[0] * batch.x.shape[1]  # no device op (torch.tensor(n, device) would sync)
            elif batch.cpu_lengths is not None:
                host_tokens += int(batch.cpu_lengths.sum())
            else:
                tokens += batch.tokens()
            del out, loss  # the step's graph goes now: a fused CPU kernel's buffers return before the next forward
            steps += 1
            if max_steps is not None and steps >= max_steps:
                stopped = "max_steps"
                break
        total, weight_sum, n_tokens = torch.stack([loss_sum, weight, tokens.to(loss_sum.dtype)]).tolist()
        train_loss = total / max(weight_sum + host_weight, 1.0)
        n_tokens += host_tokens
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"Training diverged at epoch {epoch}: the mean training loss is {train_loss}. "
                f"Try a lower optim.lr (now {optimizer.param_groups[0]['lr']:g}) or set train.grad_clip.")
        metrics = {"train/loss": train_loss, **evaluate(model, task, "val", eval_bs, device, amp)}
        metrics.update(epoch_seconds=time.perf_counter() - t0, tokens_per_s=n_tokens / max(train_seconds, 1e-9))
        history.append(metrics)
        if _is_better(metrics[key], best, task.direction):
            best, best_epoch = metrics[key], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            for cb in callbacks:
                cb.on_epoch_end(epoch, metrics)
        except StopTraining:
            stopped = "callback"
            break
        if stopped == "max_steps":
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    result: dict[str, Any] = dict(history[-1])
    result.update({f"best/{key}": best, "best_epoch": best_epoch, "epochs": len(history), "steps": steps,
                   "params": params, "stopped_by": stopped})
    result.update(evaluate(model, task, "test", eval_bs, device, amp))
    if task.solved is not None:
        test = result[f"test/{task.metric}"]
        result["solved"] = bool(test < task.solved if task.direction == "minimize" else test > task.solved)
    return result


def train(cfg: Any, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train the model ``cfg`` describes on ``cfg.task`` once and return its metrics.

    Returns the last epoch's metrics (``train/loss``, ``val/loss``, ``val/<metric>``,
    ``epoch_seconds``, ``tokens_per_s``) plus ``best/val/<metric>``, ``best_epoch``,
    ``epochs``, ``steps``, ``params`` and the test metrics of the best-validation
    weights (``test/...``, ``solved``). Raises :class:`ConfigError` on bad input
    before training and :class:`TrainingDiverged` on a non-finite loss.
    """
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    seed = int(seed)
    device = resolve_device(cfg.get("device", "auto"))
    task = create_task(cfg["task"])
    check_direction(task, cfg.get("model"))
    torch.manual_seed(seed)
    model = build_model(cfg, task.input_size, task.output_size, per_step=task.per_step,
                        token_input=task.token_input).to(device)
    optimizer = make_optimizer(cfg.get("optim", {"name": "adam", "lr": 1e-3}), model.parameters())
    keep_folds_out_of_weight_decay(model, optimizer)  # a fused LSTM decays like the cell path
    return fit(model, task, optimizer, cfg.get("train", {}), device, callbacks, info={"cfg": cfg}, seed=seed)


def result_keys(cfg: Any) -> set[str]:
    """The numeric keys :func:`train` returns for ``cfg``, without training (for checking sweep objectives).

    The task's metric names come from one forward pass of the untrained model on two validation examples.
    """
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    task = create_task(cfg["task"])
    model = build_model(cfg, task.input_size, task.output_size, per_step=task.per_step,
                        token_input=task.token_input).eval()
    batch = next(iter(task.batches("val", 2, "cpu")))
    with torch.no_grad():
        names = task.metric_sums(model(batch.x, _lengths(model, batch)).float(), batch)
    keys = {"train/loss", "epoch_seconds", "tokens_per_s", f"best/val/{task.metric}", "best_epoch", "epochs",
            "steps", "params", *(f"{split}/{k}" for split in ("val", "test") for k in names)}
    return keys | ({"solved"} if task.solved is not None else set())
