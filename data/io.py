"""Atomic file and folder writes shared by every stage (write a sibling temp, fsync, rename over the target),
and JSON reading with an error naming the file.

Outputs get the modes the user's umask gives new files and folders (readable by a serving engine running as
another user), including those made through `tempfile` (0600 / 0700 whatever the umask)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Union

if TYPE_CHECKING:
    import torch


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


def write_dir_atomically(out_dir: Union[str, Path], files: Dict[str, bytes]) -> Path:
    """Write `files` into a hidden sibling tmp dir, then swap it in place of out_dir (an older one is
    replaced)."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes it 0700: unreadable to a serving engine's user
    try:
        for name, payload in files.items():
            (tmp / name).write_bytes(payload)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def safetensors_bytes(tensors: Dict[str, "torch.Tensor"], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def read_json(path: Union[str, Path]) -> dict:
    """A JSON file's object; ValueError naming the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None


def read_jsonl(path: Union[str, Path]) -> List[dict]:
    """Every row of a JSONL file (.gz too); ValueError naming file:line at the first line that is not JSON."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON ({err})") from None
    return rows
