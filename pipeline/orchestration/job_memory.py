"""Give a job's memory back before the next job of the same process starts.

A sweep run by Hydra's basic launcher is one process running every job in turn. A finished job's model,
optimiser and caches are unreachable, but the models sit in reference cycles that only the cyclic garbage
collector frees (a test saw a finished job's two models still alive until ``gc.collect()``), and it runs
rarely; and memory freed to glibc's allocator stays in its heaps unless it is asked to return it. Without both, each job
added to the process's peak (a sweep of SmolLM2 jobs reached 8.3-8.6 GB); with them, a sweep's peak is
one job's (BENCHMARKS.md, "Memory across the jobs of a sweep").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_job_memory() -> None:
    """Free what no one references any more (cycles included) and hand the freed pages back to the OS."""
    gc.collect()
    torch = sys.modules.get("torch")  # a job that never imported torch has no CUDA cache to empty
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()  # cached blocks of freed tensors, so the next job (or another process) gets them
    trim_heap()


def trim_heap() -> bool:
    """``malloc_trim(0)``: glibc returns its heaps' free pages to the OS; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return False
