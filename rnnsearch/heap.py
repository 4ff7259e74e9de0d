"""Keep the C heap's freed memory in the process, so CPU training steps stop page-faulting it back in.

A CPU training step allocates its activations and gradients afresh (PyTorch's CPU allocator does not
cache), and glibc's ``free`` hands large blocks back to the kernel: every block above the mmap threshold
(32 MiB at most) is unmapped, and the heap's free top is trimmed. The next step faults every page of
them back in. For a ``torch.nn.LSTM`` of hidden 256 (batch 64, length 100) that was 16,400 minor faults
and about a quarter of each training step on the project's CPU (docs/performance.md), and it fell on
whichever path happened to free its memory, so it skewed comparisons between paths as well.

:func:`keep_freed_memory` switches both off with ``mallopt``: no mmap'd blocks, and up to 2 GiB of free
heap top kept. The process then holds on to its peak, which a training loop reaches every step anyway.
``python -m rnnsearch`` and its sweep workers call it at start; ``scripts/bench.py`` calls it for every
path alike. Set ``RNNSEARCH_KEEP_HEAP=0`` to leave the allocator as it is. On a C library other than
glibc (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: Set to ``0`` to leave glibc's defaults.
ENV = "RNNSEARCH_KEEP_HEAP"
# glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free heap top kept before glibc trims it (mallopt takes an int).
TRIM_THRESHOLD = 2**31 - 1

_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (once per process); True when the allocator was changed."""
    global _done
    if _done:
        return True
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt as a stub that ignores these
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
