"""Preemption notices (SIGTERM, Slurm's SIGUSR1 before the time limit): a flag, set from process start on.

`aerie train` installs the handler first thing (tools/cli.py), so a notice during start-up (imports, Hydra,
tokenisation, loading the target) is not fatal: the training loop sees the flag at its first check, writes a
checkpoint when it has state to save, and exits cleanly.  Standard library only, so it is cheap to import.
"""
from __future__ import annotations

import signal
from typing import List

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: List[int] = []


def _handle(signum, frame) -> None:
    _received.append(signum)


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def requested() -> bool:
    return bool(_received)


def describe() -> str:
    return ", ".join(signal.Signals(s).name for s in dict.fromkeys(_received)) or "none"
