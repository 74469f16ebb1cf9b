"""The export directory: written beside the target and renamed into place only when complete.

An export writes four files (search.export.exporter); a failure or an interrupt midway must
leave no half-written directory, and a failed --force export must leave the old one as it was.
So the files go into a hidden staging directory next to `--out` (same file system, so the final
rename is atomic on POSIX) and replace the target only on success (staged_dir).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from search.errors import UserError


def check_target(out_dir: Path, force: bool) -> None:
    """UserError when `out_dir` holds anything and force is False (an empty directory is fine)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"output directory {out_dir} already exists and is not empty; pass --force to overwrite it or choose another --out")


def prepare_dir(out_dir: Path, force: bool) -> None:
    """Make an empty export directory now, removing what is there with force (UserError
    without). export_plan does not use it: it stages the export and replaces only on success."""
    check_target(out_dir, force)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        _remove(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def staged_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """A new hidden directory beside `out_dir` to write an export into; renamed to `out_dir`
    when the block succeeds (an existing `out_dir`, allowed by check_target, is replaced only
    then), removed when it fails, so a failed export leaves `out_dir` as it was and a retry
    needs no --force. A symlinked `out_dir` is staged beside the directory it points to."""
    target = out_dir.resolve()
    if not target.name:
        raise UserError(f"output directory {out_dir} is the file system root; choose a folder for --out")
    check_target(target, force)
    work = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        work.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the export beside {out_dir} ({e.strerror or e}); choose a writable --out") from None
    try:
        yield work
        _swap_in(work, target, force)
    except BaseException:  # a failure or an interrupt: nothing half-written stays behind
        shutil.rmtree(work, ignore_errors=True)
        raise


def _swap_in(work: Path, target: Path, force: bool) -> None:
    """Rename the finished `work` to `target`; what was at `target` is moved aside first and
    removed after, or put back when the rename fails."""
    old = None
    if target.exists() or target.is_symlink():
        check_target(target, force)  # again: another process may have written there meanwhile
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(work, target)
    except OSError as e:
        if old is not None:
            os.rename(old, target)
        raise UserError(f"cannot move the finished export to {target} ({e.strerror or e}); choose another --out") from None
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
