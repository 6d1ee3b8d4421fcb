"""`aerie export`: one `Exporter` interface, registered per format in EXPORTS, and the entry points over it.

A format (tools/export/vllm.py, sglang.py, speculators.py) declares the draft architectures it serves and, for
each, the layout module that writes it (tools/export/eagle3.py, dflash.py).  A layout offers
`write(fmt, draft, out_dir, target, num_speculative_tokens, dtype, include_embed)`, `detect(raw config)`,
`load(path, fmt, embed_weight)`, `validate(path, fmt, target, draft_config)` and `VLLM_METHOD` (vLLM's
speculative_config method); `write` checks names and shapes and reloads the export before writing
(tools/export/validate.py).  Every write is atomic.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from torch import Tensor

from data.io import read_json
from data.registry import Registry
from models.draft.io import CONFIG_NAME, WEIGHTS_NAME, aerie_metadata
from models.targets.base import DTYPES
from models.targets.meta import load_target_embedding
from trainer.checkpoint import load_draft

EXPORT_DTYPES = DTYPES
EXPORTS = Registry("export format", {name: f"tools.export.{name}"
                                     for name in ("vllm", "sglang", "speculators")})


@dataclass
class ExportConfig:
    format: str = "vllm"  # vllm | sglang | speculators
    draft: str = ""  # an Aerie draft dir (<run_dir>/final) or a checkpoint step dir (<run_dir>/ckpt/step-N)
    out_dir: str = ""
    num_speculative_tokens: int = 3
    include_embed: bool = False  # also write embed_tokens.weight (engines take the target's when absent)
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32 for the floating-point tensors
    verifier: str = ""  # the target's name in config.json (hub id);
                        # "" -> target.path, a local dir by its name


class Exporter:
    """One engine format.  `layouts`: draft architecture -> module writing that architecture in this
    format."""

    name: str = ""
    layouts: Dict[str, str] = {}

    @property
    def archs(self):
        return tuple(self.layouts)

    def layout(self, arch: str):
        if arch not in self.layouts:
            serving = [fmt for fmt in EXPORTS.names() if arch in EXPORTS.get(fmt).layouts]
            raise ValueError(f"export.format={self.name!r}: "
                             f"a {arch} draft exports only to {', '.join(serving)}")
        return importlib.import_module(self.layouts[arch])

    def refusal(self, arch: str, model_config) -> Optional[str]:
        """Why this engine cannot serve a draft of `arch` with this model config (None: it can): the
        architecture, or a setting such as the EAGLE 3.1 switches for SGLang (the layout's
        check_servable)."""
        try:
            layout = self.layout(arch)
            if hasattr(layout, "check_servable"):
                layout.check_servable(self.name, model_config)
        except ValueError as err:
            return str(err)
        return None

    def __call__(self, draft_or_path, out_dir, **kwargs) -> Path:
        return export(draft_or_path, out_dir, self.name, **kwargs)


def target_info(target) -> dict:
    """{name_or_path, model_type, architectures} from a TargetSpec, a dict, or a model path / hub id."""
    if target is None:
        return {}
    if isinstance(target, dict):
        return dict(target)
    if isinstance(target, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(target))
        return {"name_or_path": str(target), "model_type": config.model_type,
                "architectures": list(getattr(config, "architectures", None) or [])}
    return {"name_or_path": target.name_or_path, "model_type": target.model_type,
            "architectures": list(target.architectures)}


def export(draft_or_path, out_dir: Union[str, Path], format: str, target=None,
           num_speculative_tokens: int = 3, include_embed: bool = False, dtype: str = "bfloat16",
           embed_weight: Optional[Tensor] = None) -> Path:
    """Write an engine export of a draft (object, Aerie dir or checkpoint step dir) to out_dir.

    target: TargetSpec, {name_or_path, model_type, architectures}, or a model path; None -> the draft's
    metadata.
    embed_weight: the target's (V, H) embedding; needed with include_embed when the draft comes from a path.
    """
    if format not in EXPORTS:
        raise ValueError(f"unknown export format {format!r}; available: {', '.join(EXPORTS.names())}")
    exporter = EXPORTS.get(format)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} not one of {sorted(EXPORT_DTYPES)}")
    if int(num_speculative_tokens) < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if isinstance(draft_or_path, (str, Path)):
        if target is None and (Path(draft_or_path) / CONFIG_NAME).is_file():
            target = aerie_metadata(draft_or_path).get("target")
        if include_embed and embed_weight is None:
            raise ValueError("include_embed with a draft path needs the target's embedding (embed_weight)")
        draft = load_draft(draft_or_path, embed_weight)
    else:
        draft = draft_or_path
    info = target_info(target)
    if not info:
        raise ValueError("export needs the target (TargetSpec, dict or path): "
                         "its name, model_type, architectures")
    return exporter.layout(draft.architecture).write(format, draft, out_dir, info,
                                                     int(num_speculative_tokens), dtype, include_embed)


# ---- exports on disk ---------------------------------------------------------------------------------------
def is_engine_export(path: Union[str, Path]) -> bool:
    """A directory holding an engine export (config.json with `architectures`), not an Aerie draft."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    raw = read_json(config)
    return "architectures" in raw and "aerie_format" not in raw


def _export_layout(path: Path):
    """(format, layout module) of an export on disk, told by its config.json."""
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path}: not an engine export (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    raw = read_json(path / CONFIG_NAME)
    for fmt in EXPORTS.names():
        for module in dict.fromkeys(EXPORTS.get(fmt).layouts.values()):
            layout = importlib.import_module(module)
            if layout.detect(raw) == fmt:
                return fmt, layout
    raise ValueError(f"{path / CONFIG_NAME}: architectures {sorted(raw.get('architectures') or [])} "
                     f"is no export format Aerie knows ({', '.join(EXPORTS.names())})")


def export_format(path: Union[str, Path]) -> str:
    """vllm | sglang | speculators, read from an export's config.json."""
    return _export_layout(Path(path))[0]


def vllm_method(path: Union[str, Path]) -> str:
    """vLLM's speculative_config method serving the export at `path` (its layout's VLLM_METHOD)."""
    return _export_layout(Path(path))[1].VLLM_METHOD


def load_export(path: Union[str, Path], fmt: str, embed_weight: Optional[Tensor] = None):
    """Rebuild an Aerie draft from an engine export alone."""
    found, layout = _export_layout(Path(path))
    if found != fmt:
        raise ValueError(f"{path}: a {found} export, not {fmt}")
    return layout.load(Path(path), fmt, embed_weight)


def validate_export(path: Union[str, Path], target=None, draft_config=None) -> str:
    """Refuse an export an engine would reject or serve at low acceptance; returns its format.

    Checks the tensor names and shapes against the engine's loader, the aux layer ids and rope_theta against
    what the draft was trained with (the export's `aerie` record and/or `draft_config`), and, with `target`
    (TargetSpec, or a target config / dict with `path`), its hidden size, vocabulary, layers and rope_theta.
    """
    fmt, layout = _export_layout(Path(path))
    layout.validate(Path(path), fmt, target, draft_config)
    return fmt


# ---- aerie export ------------------------------------------------------------------------------------------
def verifier_name(target_path: str, verifier: str = "") -> str:
    """The target's name written into exports: `export.verifier`, else target.path when it is a hub id, else
    the local dir's `_name_or_path` (when a hub id) or folder name: no machine path leaves the trainer."""
    if verifier or not os.path.isdir(target_path):
        return verifier or target_path
    saved = str(read_json(Path(target_path) / "config.json").get("_name_or_path") or "")
    return saved if saved and not os.path.isabs(saved) and not os.path.exists(saved) \
        else Path(target_path).name


def run_export(cfg) -> Path:
    """`aerie export`: cfg.export (ExportConfig fields) and cfg.target (target.path) of the composed
    config."""
    ecfg = cfg.export
    if not ecfg.draft or not ecfg.out_dir:
        raise ValueError("export.draft and export.out_dir are required")
    target_path = cfg.target.path if "target" in cfg and cfg.target.path else None
    embed = load_target_embedding(target_path) if ecfg.include_embed and target_path else None
    target = None
    if target_path:
        target = {**target_info(target_path),
                  "name_or_path": verifier_name(target_path, ecfg.get("verifier", ""))}
    out = EXPORTS.get(ecfg.format)(ecfg.draft, ecfg.out_dir, target=target,
                                   num_speculative_tokens=int(ecfg.num_speculative_tokens),
                                   include_embed=bool(ecfg.include_embed), dtype=ecfg.dtype,
                                   embed_weight=embed)
    print(f"{ecfg.format} export written to {out}", flush=True)
    return out
