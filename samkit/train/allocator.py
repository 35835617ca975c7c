"""CPU memory reuse between steps.

On Linux, glibc's malloc returns freed memory to the operating system: blocks above its mmap
threshold are unmapped when freed, and the top of the heap is trimmed. A training step allocates
and frees the same large activation and gradient tensors every time, so with those defaults it
pays page faults to get the memory back. It hurts most when a step holds two graphs' worth of
tensors at once: the backward of a graph kept for a second backward (``retain_graph=True``, the
clean and ascent terms of ImbSAM, Focal-SAM and SSE-SAM) took 1.5x a plain backward on ResNet-32
at batch 128, and every pass was 5-15% slower (docs/BENCHMARKS.md). GPUs are unaffected (CUDA has
its own caching allocator).

:func:`keep_freed_memory` tells glibc to keep what it frees for reuse, as jemalloc and tcmalloc (the
allocators PyTorch's CPU performance guide suggests preloading) do by design. It is opt-in: the
process then keeps more memory (peak RSS of a two-epoch small-CNN run of samkit train: 0.61-0.97
GB in six of seven runs, the seventh 4.0 GB, unexplained, against 0.65-0.77 GB in four without).
Call it once at the start of a training script, or set SAMKIT_KEEP_FREED_MEMORY=1 for the samkit
command line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap, which keeps them when freed (glibc's maximum)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free memory at the top of the heap is returned to the system only beyond this (2 GiB - 1)
TRIM_THRESHOLD = 2**31 - 1
#: the environment variables with which a user has chosen the allocator's behaviour already
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "LD_PRELOAD")
#: set to 1 to have the samkit command line call keep_freed_memory()
OPT_IN = "SAMKIT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide, until exit).

    Returns True when applied; False where it does not apply or was not wanted: not Linux with
    glibc, or an allocator chosen through the environment (``MALLOC_*`` variables, or one
    preloaded with ``LD_PRELOAD``). The process keeps its peak CPU memory reserved instead of
    returning it between steps."""
    if sys.platform != "linux":
        return False
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
