"""Where the engine keeps the K it measured (plans per vmapped step), per machine, backend
and task: a JSON file in a results directory's cache/, so a study measures K once per machine."""
from __future__ import annotations

import json
import os
from pathlib import Path

K_FILE_NAME = "engine_k.json"  # in a results directory's cache/: K per machine, backend and task


def k_file_in(results_dir: str | os.PathLike) -> Path:
    """Where a results directory keeps the measured K (beside the baseline cache)."""
    return Path(results_dir, "cache", K_FILE_NAME)


def read_k_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_k_file(path: Path | None, data: dict) -> None:
    """Best effort: a read-only results/ only means measuring again next time."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
