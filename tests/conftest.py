"""Shared fixtures: the real config directory, config composition, a CLI runner, seeding.

Everything runs on CPU with tiny sizes; tests that need CUDA skip themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and stall on a busy machine)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

#: Overrides that shrink the default composition to a few-second CPU run.
TINY = ["train.epochs=1", "task.train_size=256", "task.val_size=64", "task.test_size=64", "task.seq_len=10",
        "model.hidden_size=8", "device=cpu"]
if (CONF_DIR / "tracking" / "none.yaml").exists():  # no MLflow store: tests check training, not tracking
    TINY.append("tracking=none")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(params=["1-thread", "2-threads", "2-threads-rows-apart"])
def kernel_threads(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a kernel test three ways: on one thread; on two, a step's GEMMs split between them; and on two, each
    thread taking its own batch rows through the whole sequence (which the kernels do from 12 rows a thread; lowered
    to 1 here, so the tests' small batches take that route too; AVX-512 builds only)."""
    from rnnsearch.cells import ln_lstm_kernel

    ext = ln_lstm_kernel.load()
    if request.param == "2-threads-rows-apart" and (ext is None or ln_lstm_kernel.capability() != "AVX512"):
        pytest.skip("rows apart: the micro-kernel's (AVX-512) route only")
    threads = torch.get_num_threads()
    before = ext.set_rows_apart_min(1 if request.param.endswith("apart") else 10**9) if ext is not None else None
    torch.set_num_threads(1 if request.param == "1-thread" else 2)
    try:
        yield request.param
    finally:
        torch.set_num_threads(threads)
        if ext is not None:
            ext.set_rows_apart_min(before)


def assert_as_close_as_float32(exact: tuple, generic: tuple, kernel: tuple, slack: float = 1e-6) -> None:
    """A kernel test's check: every tensor of the kernel's run (outputs, final h and c, then a dict of gradients)
    within 3x the float32 cell's worst relative error of the float64 run (+slack)."""

    def error(run: tuple, i: int, name: Optional[str] = None) -> float:
        a, b = (run[i], exact[i]) if name is None else (run[i][name], exact[i][name])
        return ((a.double() - b).abs().max() / max(1.0, b.abs().max().item())).item()

    checks = [(i, None, what) for i, what in enumerate(("outputs", "final h", "final c"))]
    checks += [(3, name, f"grad {name}") for name in exact[3]]
    bound = 3 * max(error(generic, i, name) for i, name, _ in checks) + slack  # float32's own rounding, 3 times
    assert bound < 1e-3
    for i, name, what in checks:
        assert error(kernel, i, name) <= bound, f"{what}: kernel error {error(kernel, i, name):.3g} > {bound:.3g}"


#: (batch, hidden, threads, input width or None for the test file's) for the kernels' uneven-tile tests: part-filled
#: tiles and panels, panel counts the threads do not divide, full tiles, and a wide input.
UNEVEN_TILES = pytest.mark.parametrize(
    "batch,hidden,threads,inputs",
    [(13, 40, 2, None), (64, 80, 2, None), (13, 40, 3, None), (7, 16, 1, None), (13, 24, 2, 70), (50, 40, 3, None)],
    ids=["3-panels", "5-panels-64-rows", "3-threads", "1-thread", "wide-input", "50-rows-3-threads"])


def check_uneven_tiles(make_cell: Callable[..., Any], run: Callable[..., tuple], kernel_calls: Callable[[Any], int],
                       batch: int, hidden: int, threads: int, inputs: int) -> None:
    """The body of the kernels' uneven-tile tests: a float64 cell, the float32 cell and the kernel on ``threads``
    threads, 10 steps (an even length: the gradients' double buffers end where they started; the other tests' 23
    steps end on the other one) from a given state, compared by :func:`assert_as_close_as_float32`."""
    from rnnsearch.compile import ChunkRunner

    x = torch.randn(batch, 10, inputs, generator=torch.Generator().manual_seed(3))
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exact = run(make_cell(hidden, inputs).double(), x, None, True)
        generic = run(make_cell(hidden, inputs), x, None, True)
        cell = make_cell(hidden, inputs)
        cell.sequence_runner = ChunkRunner(4)
        kernel = run(cell, x, None, True)
    finally:
        torch.set_num_threads(kept)
    assert kernel_calls(cell) == 1
    # a broken tile or panel is off by 0.1 or more; the AVX2 build's rounding (the exp_u20 of its own vector
    # width, other summation orders) came to 7.5e-6 where the float32 cell's came to 1.6e-6 on these small shapes
    assert_as_close_as_float32(exact, generic, kernel, slack=2e-5)


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF_DIR


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``python -m rnnsearch <overrides>`` would run, composed from the real ``conf/``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def compose_cfg():
    return compose_config


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rnnsearch ARGS`` in a fresh interpreter (cwd: a temp dir, so Hydra's outputs stay there)."""
    full_env = dict(os.environ)
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "rnnsearch", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path: Path):
    """``cli(*args, env=None)`` runs the CLI in a subprocess inside ``tmp_path``."""

    def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), tmp_path, env)

    return _run


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run the test with ``tmp_path`` as the working directory."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5, what: Any = "") -> None:
    """``max|a - b| < tol`` with a readable failure message."""
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert diff < tol, f"{what}: max|diff| = {diff:.3g} >= {tol:g}"
