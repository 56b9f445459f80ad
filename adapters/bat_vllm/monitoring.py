"""What an operator of a vLLM engine with BAT watches: BAT's share of the steps, the process's memory, and
the processor's statistics written to a file (BAT_VLLM_STATS_FILE)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("bat_vllm.processor")


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StepTimes:
    """BAT's share of the engine's steps with BAT rows: `apply` against the forward pass before it."""

    steps: int = 0
    bat_seconds: float = 0.0
    forward_seconds: float = 0.0  # from update_state to apply: the model's forward pass of the step
    max_bat_seconds: float = 0.0  # the largest single step of BAT

    def add(self, forward: float, bat: float) -> None:
        self.steps += 1
        self.bat_seconds += bat
        self.forward_seconds += forward
        self.max_bat_seconds = max(self.max_bat_seconds, bat)

    def as_dict(self) -> dict[str, float]:
        total = self.bat_seconds + self.forward_seconds
        return {
            "steps": self.steps,
            "bat_seconds": self.bat_seconds,
            "forward_seconds": self.forward_seconds,
            "max_bat_seconds": self.max_bat_seconds,
            "bat_share": self.bat_seconds / total if total else 0.0,
        }


class StatsFile:
    """The processor's stats() as JSON in a file, replaced atomically, at most twice a second (and whenever
    the caller forces it); a file that cannot be written is said once and given up."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._written = 0.0

    def due(self, force: bool = False) -> bool:
        """Whether a write now would happen (a path, and force or half a second since the last one)."""
        return bool(self.path) and (force or time.monotonic() - self._written >= 0.5)

    def write(self, stats: dict[str, Any]) -> None:
        self._written = time.monotonic()
        try:
            partial = f"{self.path}.{os.getpid()}.partial"
            with open(partial, "w") as handle:
                json.dump(stats, handle)
            os.replace(partial, self.path)
        except OSError as exc:
            logger.warning("BAT could not write its statistics to %s (%s); it stops trying", self.path, exc)
            self.path = None
