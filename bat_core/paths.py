"""Where bat-sampling keeps what it builds once per machine (compiled helper, converted model folders)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$BAT_CACHE, default ~/.cache/bat-sampling."""
    return Path(os.environ.get("BAT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bat-sampling")))
