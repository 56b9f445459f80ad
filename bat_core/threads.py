"""Threads for BAT's numpy work, chosen so that BAT does not take the cores an engine decodes on.

- The product W y over the vocabulary is split by rows over a small pool of worker threads that
  sleep between products (`set_matvec_threads`).
- numpy's BLAS (OpenBLAS) keeps its threads spinning after each call; next to an engine on few cores
  that spinning steals the engine's cores (`limit_blas_threads`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_matvec_threads = max(1, min(int(os.environ.get("BAT_MATVEC_THREADS", "0")) or usable_cores(), 8))
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_blas_limited = False


def matvec_threads() -> int:
    return _matvec_threads


def matvec_pool() -> ThreadPoolExecutor:
    """The worker threads of the product over the vocabulary (built on first use)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_matvec_threads, thread_name_prefix="bat-matvec")
        return _pool


def set_matvec_threads(threads: int) -> None:
    """Threads for the products over the vocabulary (default: BAT_MATVEC_THREADS, else the usable cores).

    An engine that keeps cores for its own work should give BAT the same share as its own compute:
    inside vLLM's CPU backend on 2 cores (torch on 1 thread), 2 product threads made BAT 0.70x of
    plain eta at 32 requests, 1 thread 0.92x. BAT_MATVEC_THREADS, when set, wins."""
    global _matvec_threads, _pool
    if os.environ.get("BAT_MATVEC_THREADS"):
        return
    threads = max(1, min(int(threads), 8))
    with _lock:
        if threads != _matvec_threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # products running now finish on the old workers
            _matvec_threads, _pool = threads, None


def limit_blas_threads() -> None:
    """One BLAS thread for BAT's numpy work (process-wide). OpenBLAS threads keep spinning after each
    product and take the cores the engine decodes on: on 2 cores this made llama.cpp decode 3x slower
    and vLLM's CPU backend about 2x slower (with a logits processor that calls numpy every step).
    BAT_BLAS_THREADS=n sets another count; BAT_BLAS_THREADS=0 leaves numpy's thread pool alone."""
    global _blas_limited
    if _blas_limited or os.environ.get("BAT_BLAS_THREADS", "1") == "0":
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(int(os.environ.get("BAT_BLAS_THREADS", "1")), user_api="blas")
    _blas_limited = True
