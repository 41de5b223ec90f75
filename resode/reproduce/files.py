"""Result files of the experiments: JSON and CSV, written atomically (temp file + rename), so an
interrupted run never leaves half a file that a rerun would trust."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def nan_to_none(o: Any) -> Any:
    """``o`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [nan_to_none(v) for v in o]
    return o


def to_jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, NaN ``None``, arrays lists)."""
    return json.loads(json.dumps(nan_to_none(obj), default=_default))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically; NaN/inf are written as ``null``."""
    text = json.dumps(nan_to_none(obj), indent=2, default=_default, allow_nan=False)
    return write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object at ``path``, or ``None`` if it is missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_complete(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON at ``path`` if it exists, parses and says ``"complete": true``; else ``None``."""
    data = read_json(path)
    return data if data is not None and data.get("complete") is True else None


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows (dicts; the columns are the union of their keys, in first-seen order) as CSV."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())
