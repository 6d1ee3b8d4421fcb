"""Checkpoints: the only module that reads or writes them.

Layout under `<run_dir>/ckpt/`:
    step-N/            DeepSpeed's sharded engine state (each rank its own shards; frozen target excluded),
                       trainer_state.json (step, data position, counters, world size), rng/rank-R.pt,
                       config.yaml, vocab.safetensors, manifest.json (size + sha256 of every file,
                       written last)
    latest             name of the newest complete step dir, replaced atomically after it is complete

A step dir is assembled as `.tmp-step-N` and renamed once every rank has written, so a
crash leaves either a complete checkpoint or a hidden temporary one.  On resume a step dir
is used only when every file matches its manifest entry, trainer_state.json parses and every
.pt file loads with torch's weights-only unpickler (plain data and tensors, plus the few
DeepSpeed data classes in `DEEPSPEED_SAFE_GLOBALS`): a checkpoint cannot run code.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from data.io import atomic_write_text
from trainer.distributed import barrier, broadcast_object

if TYPE_CHECKING:
    from models.draft.base import DraftModel

MANIFEST = "manifest.json"


def _deepspeed_safe_globals() -> List[type]:
    """DeepSpeed's plain data classes found in its optimizer shards (allowed to the weights-only
    unpickler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location="cpu", mmap: bool = False):
    """torch.load with the weights-only unpickler (tensors, plain containers, DeepSpeed's data classes)."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def unloadable_pt_file(directory: Path) -> Optional[str]:
    """Why some .pt file under `directory` does not load as weights only (code or a broken pickle), else
    None."""
    for file in sorted(Path(directory).rglob("*.pt")):
        try:
            load_weights_only(file, mmap=zipfile.is_zipfile(file))  # mmap: tensors are checksummed, not read
        except Exception as err:  # UnpicklingError, RuntimeError (zip), EOFError ...: all mean "do not load"
            text = " ".join(str(err).split()) or type(err).__name__
            code = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
            why = f"it calls {code.group(1)}, not plain data" if code else text[:200]
            return f"{file.relative_to(directory)} does not load as weights only ({why})"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """manifest.json (size + sha256 of every file under `directory`), written last: it marks the dir
    complete."""
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
               for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": entries}, indent=2))


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a step dir cannot be resumed from, or None when it is complete and intact."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (incomplete write)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest.json ({err})"
    for name, entry in entries.items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256"))
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, manifest says {size}"
        if digest is not None and file_sha256(file) != digest:
            return f"{name} does not match its sha256 in manifest.json (corrupted)"
    try:
        json.loads((path / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"trainer_state.json does not parse ({type(err).__name__}: {err})"
    return unloadable_pt_file(path)


def rng_state() -> Dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save / find / load checkpoints of one run; every rank calls save and load together."""

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int = 2):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last

    # ---- writing -------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: Dict[str, Any], files: Dict[str, bytes]) -> Path:
        """Write step-N: engine shards, per-rank RNG, trainer state and `files` (rank 0), then publish it.

        A failed write (disk full, quota) removes the partial step dir and says which checkpoint survives."""
        tmp = self.root / f".tmp-step-{step}"
        try:
            return self._save(step, tmp, engine, trainer_state, files)
        except (OSError, RuntimeError) as err:
            code = _write_errno(err, tmp if tmp.is_dir() else self.root)
            if code is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            latest = self.root / "latest"
            previous = latest.read_text().strip() if latest.is_file() else ""
            kept = (f"the previous checkpoint {previous} is intact" if previous
                    else "there is no earlier checkpoint")
            raise RuntimeError(f"{os.strerror(code).lower()} while writing checkpoint step-{step} at {tmp}; "
                               f"{kept}") from None

    def _save(self, step: int, tmp: Path, engine, trainer_state: Dict[str, Any],
              files: Dict[str, bytes]) -> Path:
        final = self.root / f"step-{step}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False,
                               exclude_frozen_parameters=True)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank}.pt")
        barrier()
        if self.rank == 0:
            state = {**trainer_state, "step": step, "world_size": self.world_size}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            for name, payload in files.items():
                (tmp / name).write_bytes(payload)
            write_manifest(tmp, step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_steps()[: -self.keep_last]:
            shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)

    # ---- finding -------------------------------------------------------------------------------
    def complete_steps(self) -> list:
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.glob("step-*"):
            suffix = path.name[len("step-"):]
            if path.is_dir() and suffix.isdigit():
                steps.append(int(suffix))
        return sorted(steps)

    def problem(self, path: Path) -> Optional[str]:
        return checkpoint_problem(path)

    def find_resumable(self) -> Optional[Path]:
        """Newest complete checkpoint; newer broken ones are skipped with a warning naming them."""
        found = None
        if self.rank == 0:
            for step in reversed(self.complete_steps()):
                path = self.root / f"step-{step}"
                why = self.problem(path)
                if why is None:
                    found = str(path)
                    break
                warnings.warn(f"skipping checkpoint {path}: {why}")
        found = broadcast_object(found)
        return Path(found) if found else None

    # ---- loading -------------------------------------------------------------------------------
    def load(self, path: Path, engine) -> Dict[str, Any]:
        """Restore engine (and, with the same world size, optimizer + RNG) from `path`; returns trainer
        state."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        same_world = state["world_size"] == self.world_size
        if same_world:
            engine.checkpoint_engine.load = load_weights_only  # DeepSpeed's own loader unpickles everything
            engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
            set_rng_state(load_weights_only(path / "rng" / f"rank-{self.rank}.pt"))
        else:
            self._load_resharded(path, engine)
        state["resharded"] = not same_world
        return state

    def _load_resharded(self, path: Path, engine) -> None:
        """Different world size: rebuild the consolidated fp32 draft from the shards and re-partition it."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        module = engine.module
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        unknown = [name for name in consolidated if name not in params and name not in buffers]
        assert not unknown, f"checkpoint has tensors the model lacks: {unknown[:5]}"
        import deepspeed

        for name, value in consolidated.items():
            if name in buffers:
                buffers[name].copy_(value.to(buffers[name].dtype))
                continue
            param = params[name]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0 or not hasattr(param, "ds_id"):
                    param.data.copy_(value.to(param.dtype))
        # the optimizer keeps its own fp32 master copy of the (now overwritten) weights
        engine.optimizer.refresh_fp32_params()


def _write_errno(err: BaseException, directory: Path) -> Optional[int]:
    """errno of a failed write: from the exception chain, else from a probe write in `directory` (torch.save
    reports a full disk as "unexpected pos" without one); None when writing works, i.e. not a write
    failure."""
    cause: Optional[BaseException] = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                                                          errno.EROFS):
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    probe = Path(directory) / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe_err:
        return probe_err.errno
    finally:
        probe.unlink(missing_ok=True)
    return None


# ---- the draft of a step dir ------------------------------------------------------------------------------
def load_draft_from_checkpoint(step_dir: Union[str, Path],
                               embed_weight: Optional[Tensor] = None) -> "DraftModel":
    """Draft from `<run_dir>/ckpt/step-N/`: ZeRO shards (any stage) consolidated, `draft.` prefix stripped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from models.draft.io import build_draft
    from models.registry import DRAFTS
    from models.targets.meta import target_spec_from_config

    step_dir = Path(step_dir).resolve()
    for name in ("config.yaml", "vocab.safetensors"):
        if not (step_dir / name).is_file():
            raise ValueError(f"{step_dir}: not an Aerie checkpoint step dir (no {name})")
    why = checkpoint_problem(step_dir)  # checksums, and weights-only unpickling before DeepSpeed's full one
    if why is not None:
        raise ValueError(f"{step_dir}: refusing to load this checkpoint: {why}")
    cfg = OmegaConf.to_container(OmegaConf.load(step_dir / "config.yaml"), resolve=True)
    if "draft" not in cfg or "target" not in cfg:
        raise ValueError(f"{step_dir / 'config.yaml'}: needs 'draft' and 'target' sections")
    arch = cfg["draft"].get("arch")  # the architecture the run trained (every draft schema saves it)
    if not arch:
        raise ValueError(f"{step_dir / 'config.yaml'}: draft.arch is missing; the draft cannot be rebuilt")
    draft_cls = DRAFTS.get(arch)
    schema = draft_cls.config_class
    known = {f.name for f in dataclasses.fields(schema)}
    draft_cfg = schema(**{k: v for k, v in cfg["draft"].items() if k in known})
    config = draft_cls.from_target(draft_cfg, target_spec_from_config(cfg["target"])).config
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    state = {n[len("draft."):]: t for n, t in consolidated.items() if n.startswith("draft.")}
    # buffers come back as float from zero_to_fp32: the vocabulary is taken from vocab.safetensors instead
    state.update({k: v for k, v in load_file(str(step_dir / "vocab.safetensors")).items()
                  if k in ("d2t", "t2d")})
    return build_draft(arch, config, state, embed_weight, str(step_dir))


def load_draft(path: Union[str, Path], embed_weight: Optional[Tensor] = None) -> "DraftModel":
    """An Aerie draft dir or a checkpoint step dir."""
    from models.draft.io import CONFIG_NAME, load_aerie_draft

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return load_aerie_draft(path, embed_weight)
    if (path / "config.yaml").is_file():
        return load_draft_from_checkpoint(path, embed_weight)
    raise ValueError(f"{path}: neither an Aerie draft dir (config.json) nor a checkpoint step dir "
                     "(config.yaml)")
