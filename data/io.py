"""Atomic file writes shared by every stage: write a sibling temp file, fsync, then rename over the target.

Outputs get the modes the user's umask gives new files and folders (readable by a serving engine running as
another user), including those made through `tempfile` (0600 / 0700 whatever the umask)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def umask_mode(directory: bool = False) -> int:
    """0666 (files) or 0777 (folders) less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
