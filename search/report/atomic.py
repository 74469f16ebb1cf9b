"""Writing a report file so that no reader sees half of it: into a hidden file beside it, then
renamed over it (os.replace, atomic on POSIX and Windows). Two processes writing the same
report at once (a search and `hwcompress report`, or two workers) each replace whole files; a
reader, a browser reloading report.html, sees one whole version or the other."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a hidden file beside `path`, then rename it to `path`; the hidden file
    is removed when write raises. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
