"""A quiet HiGHS instance. HiGHS prints a copyright banner on stdout when the first instance of a
process is built, before any option can switch output off; that corrupts a caller's machine-readable
stdout (e.g. `bat generate --json`). The first construction runs with file descriptor 1 sent to
/dev/null."""

from __future__ import annotations

import os
import sys
import threading

import highspy

_lock = threading.Lock()
_banner_done = False


def new_highs() -> highspy.Highs:
    """A `highspy.Highs` with output off and no banner on stdout."""
    global _banner_done
    with _lock:
        if _banner_done:
            h = highspy.Highs()
        else:
            sys.stdout.flush()
            saved = os.dup(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                h = highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(devnull)
            _banner_done = True
    h.setOptionValue("output_flag", False)
    return h
