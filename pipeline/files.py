"""The small files the stages write and read beside models: config.json, summary.json, model.json, reports.

Every write is atomic (a temporary file, fsynced, renamed into place), so a crash leaves
the old file or the new one, never half of one; a full disk or a read-only directory is
the one-line ``WriteError`` every command gives.
"""

from __future__ import annotations

import json
from typing import Any

from distill.storage.fs import write_atomic

__all__ = ["write_json", "write_text", "read_json"]


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (values JSON cannot hold are written as text)."""
    write_atomic(path, json.dumps(obj, indent=1, default=str))


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomic(path, text)


def read_json(path: str) -> Any:
    """The JSON value in ``path``, or None when the file is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
