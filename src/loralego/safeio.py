"""Guarded file access: every write lora-lego makes and every small file it reads goes through here.

Writes (adapter folders, single files, HTML reports, JSON, copied recipes) are atomic: the content is
written into a temporary folder beside the destination, each file and the folder are fsynced, the folder
(or the file inside it) is renamed into place and the parent folder fsynced. Temporaries are named
``.loralego-tmp-<pid>-<token>-<name>``: on any failure (an exception, ENOSPC while aborting, Ctrl-C, or
SIGTERM/SIGHUP, which are turned into :class:`Terminated` while a write is open) they are removed; after a
SIGKILL they stay, and the next write into the same folder removes those whose process is gone and says so.

An existing destination is replaced only with ``force``, and only when it is lora-lego's own earlier output
(recognised by its ``loralego.*`` provenance), an empty folder, or a single file of the kind being written.
Every destination is checked against every input, resolved file by file (symlinks followed, as in the
Hugging Face cache where ``snapshots/`` links to ``blobs/``): it may not be, contain or lie inside one.

Reads of configs, recipes, metadata and headers open only regular files (a FIFO or a device is refused at
once, without blocking: ``O_NONBLOCK`` then ``fstat``) and stop at a size cap.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import stat
import struct
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import LoraLegoError

TMP_PREFIX = ".loralego-tmp-"
MAX_CONFIG_BYTES = 16 << 20  # adapter_config.json, verify JSON: real ones are a few KB
MAX_RECIPE_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for a header
MAX_METADATA_VALUE_BYTES = 16 << 20
MAX_JSON_DEPTH = 64

# What lora-lego writes into a PEFT output folder; a folder holding anything else is not (only) its output.
OWN_FOLDER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml"})
PROVENANCE_KEY = "loralego.version"

# Kinds of single files and the suffixes an existing file must have to be replaced with --force.
FILE_KINDS = {
    "safetensors": (".safetensors",),
    "html": (".html", ".htm"),
    "json": (".json",),
    "yaml": (".yaml", ".yml"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a write was open: raised so that cleanup runs (exit 143)."""


# ------------------------------------------------------------------------------------------------ reading


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd of ``path`` opened read-only without blocking, refused unless it is a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.EISDIR:
            raise LoraLegoError(f"{path}: expected a file, found a folder") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _kind_of(info.st_mode)
        if kind == "a folder":
            raise LoraLegoError(f"{path}: expected a file, found a folder")
        raise LoraLegoError(f"{path}: expected a regular file, found {kind}; refused without reading it")
    return fd, info


def require_regular(path: str | Path) -> int:
    """Refuse ``path`` unless it is a regular file (checked without blocking on a FIFO); its size."""
    path = Path(path)
    try:
        fd, info = _open_regular(path)
    except OSError as error:
        raise LoraLegoError(f"{path}: cannot read: {error.strerror or error}") from None
    os.close(fd)
    return info.st_size


def read_bytes(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. Raises OSError for a missing file."""
    path = Path(path)
    fd, info = _open_regular(path)
    try:
        if info.st_size > limit:
            raise LoraLegoError(f"{path}: {what} is {info.st_size} bytes, more than the {limit}-byte limit")
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            data = handle.read(limit + 1)  # the file may grow after fstat
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise LoraLegoError(f"{path}: {what} is more than the {limit}-byte limit")
    return data


def read_text(path: str | Path, limit: int, what: str = "file") -> str:
    """UTF-8 text of a regular file, bounded; one-line errors naming the file."""
    path = Path(path)
    try:
        data = read_bytes(path, limit, what)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise LoraLegoError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LoraLegoError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests at most ``limit`` deep (iteratively: no recursion to overflow)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def parse_json(text: str, where: str) -> Any:
    """JSON from an untrusted file or metadata string: one-line errors, nesting bounded."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        place = f"line {error.lineno} column {error.colno}"
        raise LoraLegoError(f"{where}: not valid JSON ({error.msg}: {place})") from None
    except RecursionError:
        raise LoraLegoError(f"{where}: JSON nested too deeply") from None
    except ValueError as error:  # e.g. an integer with too many digits
        raise LoraLegoError(f"{where}: not valid JSON ({error})") from None
    if not json_depth_ok(value):
        raise LoraLegoError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} deep")
    return value


def safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """The ``__metadata__`` of a safetensors file from its header (bounded), or None if it is not one."""
    try:
        fd, info = _open_regular(path)
    except (OSError, LoraLegoError):
        return None
    with os.fdopen(fd, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, info.st_size - 8):
            return None
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            return None
    if not isinstance(header, dict):
        return None
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else None


# --------------------------------------------------------------------------------------- inputs vs outputs


def input_locations(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """``(as given, resolved)`` for each input and, for a folder, for each entry in it (symlinks followed:
    a Hugging Face snapshot's files resolve into ``blobs/``)."""
    found: list[tuple[Path, Path]] = []
    for given in paths:
        given = Path(given)
        with contextlib.suppress(OSError, RuntimeError):
            found.append((given, given.resolve()))
            if given.is_dir():
                for entry in given.iterdir():
                    found.append((given, entry.resolve()))
    return found


def refuse_overlap(target: str | Path, inputs: Iterable[str | Path], what: str = "output") -> None:
    """Refuse a write to ``target`` that is, contains or lies inside any input file or folder."""
    target = Path(target)
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise LoraLegoError(f"{target}: cannot resolve the {what} path: {reason}") from None
    for given, location in input_locations(inputs):
        if resolved == location or resolved.is_relative_to(location) or location.is_relative_to(resolved):
            raise LoraLegoError(f"{target}: {what} overlaps input {given}; choose another path")


# -------------------------------------------------------------------------------------- replacing outputs


def _entries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def check_replaceable_folder(out: Path) -> None:
    """With --force, an existing folder may be replaced only if empty or lora-lego's own earlier output."""
    names = _entries(out)
    if not names:
        return
    weights = out / "adapter_model.safetensors"
    metadata = safetensors_metadata(weights) if weights.name in names else None
    if metadata is None or PROVENANCE_KEY not in metadata:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise LoraLegoError(
            f"{out}: --force replaces only an empty folder or an earlier lora-lego output, and this folder "
            f"({shown}) has no lora-lego provenance; remove it yourself or choose another path"
        )
    foreign = [name for name in names if name not in OWN_FOLDER_FILES]
    if foreign:
        raise LoraLegoError(
            f"{out}: --force would delete {foreign[0]}, which lora-lego did not write; move it or choose another path"
        )


def check_replaceable_file(out: Path, kind: str) -> None:
    """With --force, an existing file may be replaced only if it is a regular file of the kind being written."""
    suffixes = FILE_KINDS[kind]
    try:
        fd, _ = _open_regular(out)
    except OSError as error:
        raise LoraLegoError(f"{out}: cannot check the existing file: {error.strerror or error}") from None
    os.close(fd)
    if out.suffix.lower() not in suffixes:
        raise LoraLegoError(f"{out}: --force replaces only a {kind} file ({'/'.join(suffixes)}); refused")
    if out.is_symlink():
        raise LoraLegoError(f"{out}: is a symbolic link; --force does not replace links, choose another path")
    if kind == "safetensors":
        if safetensors_metadata(out) is None:
            raise LoraLegoError(f"{out}: --force replaces only a safetensors file, and this one is not; refused")
    elif kind == "html":
        fd, _ = _open_regular(out)
        with os.fdopen(fd, "rb") as handle:
            head = handle.read(512).lstrip().lower()
        if not head.startswith((b"<!doctype html", b"<html")):
            raise LoraLegoError(f"{out}: --force replaces only an HTML file, and this one is not; refused")
    elif kind == "json":
        try:
            parse_json(read_bytes(out, MAX_CONFIG_BYTES, "JSON file").decode("utf-8"), str(out))
        except (LoraLegoError, UnicodeDecodeError):
            raise LoraLegoError(f"{out}: --force replaces only a JSON file, and this one is not; refused") from None
    elif kind == "yaml":
        try:
            read_bytes(out, MAX_RECIPE_BYTES, "recipe").decode("utf-8")
        except (LoraLegoError, UnicodeDecodeError):
            raise LoraLegoError(f"{out}: --force replaces only a recipe (YAML text); refused") from None


def _existing(out: Path) -> str | None:
    """``None``, ``"folder"`` or ``"file"`` (anything not a folder) at ``out``; OSErrors become refusals."""
    try:
        info = os.stat(out)
    except FileNotFoundError:
        return "file" if os.path.islink(out) else None  # a dangling link is a file in the way
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            return None  # a parent is a file: reported when the folder is created
        raise LoraLegoError(f"{out}: cannot use this path: {error.strerror or error}") from None
    return "folder" if stat.S_ISDIR(info.st_mode) else "file"


def check_destination(out: Path, *, folder: bool, force: bool, kind: str = "safetensors") -> None:
    """Refuse before any work is done what the write would refuse at the end."""
    state = _existing(out)
    if state is None:
        return
    if folder:
        if state != "folder":
            raise LoraLegoError(f"{out}: output path exists and is not a folder")
        if not force:
            raise LoraLegoError(f"{out}: output folder already exists (use --force to replace it)")
        check_replaceable_folder(out)
        return
    if state == "folder":
        raise LoraLegoError(f"{out}: output path is a folder, expected a file")
    if not force:
        raise LoraLegoError(f"{out}: output file already exists (use --force to replace it)")
    check_replaceable_file(out, kind)


# ------------------------------------------------------------------------------------ temporaries, signals


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def sweep_stale(parent: Path) -> list[Path]:
    """Remove this program's temporaries in ``parent`` left by a process that is gone (e.g. SIGKILLed); say so
    on stderr. Those of running processes are left alone."""
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        pid_text = name[len(TMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        path = parent / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not os.path.lexists(path):
            removed.append(path)
            print(f"loralego: note: removed {path}, left by an interrupted run (pid {pid_text})", file=sys.stderr)
    return removed


def _temp_name(out_name: str, tag: str = "") -> str:
    stem = out_name[:40].lstrip(".") or "out"
    return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{tag}-{stem}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While a write is open, SIGTERM and SIGHUP raise :class:`Terminated` (so cleanup runs) instead of killing
    the process. Only in the main thread, and only where the program left the default action in place."""
    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) == signal.SIG_DFL:
                installed[number] = signal.signal(number, _raise_terminated)
    try:
        yield
    finally:
        for number, previous in installed.items():
            signal.signal(number, previous)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Cleanup is not interrupted by a second Ctrl-C or SIGTERM; a pending one arrives afterwards."""
    mask = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    blocked = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)


def _fsync_path(path: Path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync_path(path)
    _fsync_path(folder, folder=True)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the data is already synced
        _fsync_path(folder, folder=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) if they are empty; leave anything that holds files."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _staging(out: Path, what: str) -> Iterator[tuple[Path, list[Path]]]:
    """Create the parents of ``out`` and a temporary folder beside it (usual permissions); sweep stale ones."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        created = [folder for folder in (parent, *parent.parents) if not os.path.lexists(folder)]
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(parent)
        tmp = parent / _temp_name(out.name)
        tmp.mkdir(mode=0o777 & ~_umask())
    except OSError as error:
        _remove_empty(created if "created" in locals() else [])
        raise LoraLegoError(f"{out}: cannot create the {what}: {error.strerror or error}") from None
    yield tmp, created


@contextlib.contextmanager
def atomic_folder(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by a rename.

    On any exception (KeyboardInterrupt and :class:`Terminated` included) the temporary folder is removed,
    parents created for it are removed again, and ``out`` is left as it was (a replaced output is put back).
    """
    out = Path(out)
    check_destination(out, folder=True, force=force)
    with signals_as_exceptions(), _staging(out, "output folder") as (tmp, created):
        old: Path | None = None
        try:
            yield tmp
            _fsync_tree(tmp)
            if _existing(out) is not None:
                check_destination(out, folder=True, force=force)  # it may have appeared during the merge
                old = out.parent / _temp_name(out.name, "-old")
                out.rename(old)
                tmp.rename(out)
                moved, old = old, None
                _fsync_folder(out.parent)
                shutil.rmtree(moved, ignore_errors=True)
            else:
                tmp.rename(out)
                _fsync_folder(out.parent)
        except BaseException as error:
            with _signals_blocked():
                _remove(tmp)
                if old is not None and os.path.lexists(old) and not os.path.lexists(out):
                    with contextlib.suppress(OSError):
                        old.rename(out)  # the old output was moved aside but the new one never arrived
                _remove_empty(created)
            if isinstance(error, OSError):
                raise LoraLegoError(f"{out}: writing the output failed: {error.strerror or error}") from None
            raise


@contextlib.contextmanager
def atomic_file(out: str | Path, *, force: bool = False, kind: str = "safetensors") -> Iterator[Path]:
    """Yield a path in a temporary folder beside ``out``; on success it replaces ``out`` (``os.replace``).

    Whatever the writer puts beside that path (e.g. the stream writer's data file) is inside the temporary
    folder too, so one removal cleans everything. Same failure rules as :func:`atomic_folder`.
    """
    out = Path(out)
    check_destination(out, folder=False, force=force, kind=kind)
    with signals_as_exceptions(), _staging(out, "output file") as (tmp, created):
        try:
            staged = tmp / (out.name[:200] or "out")
            yield staged
            _fsync_path(staged)
            if _existing(out) is not None:
                check_destination(out, folder=False, force=force, kind=kind)
            os.replace(staged, out)
            _fsync_folder(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException as error:
            with _signals_blocked():
                _remove(tmp)
                _remove_empty(created)
            if isinstance(error, OSError):
                raise LoraLegoError(f"{out}: writing the output failed: {error.strerror or error}") from None
            raise


@contextlib.contextmanager
def scratch_folder(out: str | Path) -> Iterator[Path]:
    """A temporary working folder beside ``out`` (same filesystem), removed when the block ends, however it ends."""
    out = Path(out)
    with signals_as_exceptions(), _staging(out, "scratch folder") as (tmp, created):
        try:
            yield tmp
        finally:
            with _signals_blocked():
                _remove(tmp)
                _remove_empty(created)


def write_text(
    out: str | Path, text: str, *, force: bool = False, kind: str, inputs: Iterable[str | Path] = ()
) -> Path:
    """A small text file (report, JSON, recipe copy), checked against the inputs and written atomically."""
    out = Path(out)
    refuse_overlap(out, inputs, "output file")
    with atomic_file(out, force=force, kind=kind) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
