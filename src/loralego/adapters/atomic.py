"""Atomic output folders: the output appears complete or not at all, even on an error or Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LoraLegoError


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_folder(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by a rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out`` is left as
    it was. An existing ``out`` is refused unless ``force``; a file at ``out`` is always refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoraLegoError(f"{out}: output path exists and is not a folder")
    if out.exists() and not force:
        raise LoraLegoError(f"{out}: output folder already exists (use --force to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    # Parent folders this call creates are removed again on failure: a failed merge leaves nothing behind.
    created = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        # mkdtemp makes the folder 0700; the output should get the usual permissions (umask).
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    except OSError as error:
        _remove_empty(created)
        raise LoraLegoError(f"{out}: cannot create the output folder: {error.strerror or error}") from None
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            moved, old = old, None
            shutil.rmtree(moved, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            old.rename(out)  # the replaced output was moved aside but the new one never arrived: put it back
        _remove_empty(created)
        if isinstance(error, OSError):
            raise LoraLegoError(f"{out}: writing the output failed: {error.strerror or error}") from None
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) if they are empty; leave anything that holds files."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
