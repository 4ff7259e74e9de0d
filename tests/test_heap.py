"""rnnsearch.heap: freed memory stays in the process, so reallocating it costs no page faults."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rnnsearch import cli, heap
from rnnsearch.search import workers

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

PROBE = """
import resource, sys, torch
from rnnsearch.heap import keep_freed_memory
print(keep_freed_memory())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # the heap settles in two rounds
    x = torch.ones(16 * 2**20)  # 64 MiB, written
    del x
f0 = faults()
for _ in range(5):
    x = torch.ones(16 * 2**20)
    del x
print(faults() - f0)
"""


def probe(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_freed_memory_is_reused_without_page_faults() -> None:
    changed, kept = probe({heap.ENV: "1"})
    assert changed == "True"
    unchanged, default = probe({heap.ENV: "0"})
    assert unchanged == "False"
    # five 64 MiB tensors: 5 x 16,384 pages faulted in again under glibc's defaults; kept, none, or at
    # most one tensor's worth (some runs' heap layout settles a round later)
    assert default > 70_000, default
    assert kept < 20_000, kept


def test_the_cli_and_the_sweep_workers_keep_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("cli") or True)
    monkeypatch.setattr(cli, "_hydra_main", lambda: None)
    cli.main([])
    monkeypatch.setattr(workers, "keep_freed_memory", lambda: calls.append("worker") or True)
    monkeypatch.setattr(workers, "work", lambda job, index: None)
    workers._worker_main(SimpleNamespace(threads=0), 0)  # type: ignore[arg-type]  (reads .threads only)
    assert calls == ["cli", "worker"]
