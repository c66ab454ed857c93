"""Atomic file and folder writes: nothing half written is ever left under the final name.

A folder is built in a staging folder beside its final name, ``.NAME.XXXXXXXX.partial``, that holds
an owner lock (LOCK_NAME): its process keeps an exclusive ``flock`` on that file for as long as it
runs, and the kernel drops the lock when the process ends, however it ends (``kill -9`` too). The
next atomic_dir for the same name removes staging folders whose lock is free. The file also records
the owner's PID and host, for people and log lines only: a PID can be reused by another process
after the owner died, a lock cannot outlive it, so the lock is what decides.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no owner locks, so stale staging folders are left alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STAGING_SUFFIX = ".partial"
LOCK_NAME = ".sdtrt-owner.lock"  # in a staging folder; removed before the folder takes its final name
SPECIAL_FILES = (
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``, else delete it.

    A device, a named pipe or a socket at ``final`` (or behind a link there) is never replaced: FileExistsError.
    """
    final = Path(final)
    if (kind := special_file(final)) is not None:
        raise FileExistsError(f"refusing to replace {final}: it is a {kind}, not a regular file")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        give_ordinary_permissions(tmp)  # mkstemp creates 0600
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when no new file may take its place ("character device", "named pipe", ...: the user's,
    and nothing sdtrt writes belongs there); None for a regular file, a folder, or nothing there."""
    try:
        mode = os.stat(path).st_mode  # follows links: the node a link names is what a write would hit
    except (OSError, ValueError):
        return None
    return next((name for test, name in SPECIAL_FILES if test(mode)), None)


def folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why ``folder`` cannot hold new files and folders (one phrase), or None: it is made where missing, and a
    folder is made and removed in it to find out (permission bits say nothing to root, an immutable folder or a
    read-only mount say no to root too)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".sdtrt-probe.", dir=folder))
    except OSError as exc:
        return f"cannot make files in that folder ({exc.strerror or exc})"
    return None


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (other threads may be creating files)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # for this instant the strictest mask: a file created meanwhile is private, never open
    os.umask(mask)
    return mask


def give_ordinary_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the permissions the umask gives a new file or folder (e.g. 0644 / 0755 under umask 022).

    Temporary files (mkstemp, mkdtemp, ONNX's external data writer) are created 0600 / 0700, unreadable by
    anyone else. Executable files stay executable; symbolic links are left alone.
    """
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return
    full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
    os.chmod(path, full & ~_umask())


def _give_tree_ordinary_permissions(root: Path) -> None:
    give_ordinary_permissions(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            give_ordinary_permissions(Path(folder) / name)


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def replace_refusal(
    final: str | os.PathLike[str], overwrite: bool, replaceable: Callable[[Path], str | None] | None = None
) -> str | None:
    """Why a new folder may not take the place of ``final`` (one line naming it), or None when it may.

    Nothing or an empty folder may always be written; a non-empty folder only with ``overwrite`` and, where
    ``replaceable`` is given, only when it returns None for it (else it says why not); a file, never.
    """
    final = Path(final)
    if final.is_symlink():
        return f"refusing to overwrite {final}: it is a symbolic link (give the folder it points to)"
    if not final.exists():
        return None
    if not final.is_dir():
        kind = special_file(final)  # a device or a pipe: named, since it is surely the user's
        return f"refusing to overwrite {final}: it is " + (f"a {kind}, not a folder" if kind else "not a folder")
    if next(final.iterdir(), None) is None:
        return None
    if not overwrite:
        return f"{final} already exists (use --overwrite to replace it)"
    why = None if replaceable is None else replaceable(final)
    return None if why is None else f"refusing to overwrite {final}: {why}"


@contextlib.contextmanager
def atomic_dir(
    final: str | os.PathLike[str],
    overwrite: bool = False,
    replaceable: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield a staging folder beside ``final``; on success it becomes ``final``, else it is removed.

    What may be at ``final`` is replace_refusal's to say, asked before staging and again just before the
    swap (the work in between may take long). An existing folder is replaced only once the new one is
    complete. Every file and folder of the result gets the umask's permissions. Staging folders that
    earlier runs for the same name left behind when they were killed are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    if (why := replace_refusal(final, overwrite, replaceable)) is not None:
        raise FileExistsError(why)
    staging, lock = _new_staging(final)
    try:
        yield staging
        _give_tree_ordinary_permissions(staging)
        if (why := replace_refusal(final, overwrite, replaceable)) is not None:
            raise FileExistsError(why)
        (staging / LOCK_NAME).unlink(missing_ok=True)  # still held through ``lock`` until the folder is renamed
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _release(lock)


def _swap_in(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; a folder there moves aside into a locked staging folder first."""
    if not final.is_dir() or next(final.iterdir(), None) is None:
        try:  # nothing there, or an empty folder, which rename replaces in one step
            os.replace(staging, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"refusing to overwrite {final}: files appeared in it meanwhile") from None
        return
    retired, lock = _new_staging(final)  # should this process die now, the next run removes it
    try:
        os.replace(final, retired / "old")
        try:
            os.replace(staging, final)
        except OSError:
            os.replace(retired / "old", final)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)
        _release(lock)


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike[str], suffix: str) -> Iterator[Path]:
    """Yield a new work folder ``.NAME.XXXXXXXX<suffix>`` beside ``beside`` (e.g. a checkpoint converted on the
    way to an export: gigabytes), owner-locked as staging folders are, and removed on exit. Folders of the same
    name and suffix that killed runs left behind are removed first."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(beside, suffix)
    folder, lock = _new_staging(beside, suffix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _release(lock)


def _new_staging(final: Path, suffix: str = STAGING_SUFFIX) -> tuple[Path, int | None]:
    """A new staging folder beside ``final`` and its owner lock's descriptor (held until _release)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    if fcntl is None:
        return staging, None
    lock = staging / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:  # a file system without locks: without a lock file the folder is never taken as stale
        log.debug("no owner lock for %s (%s)", staging, exc)
        os.close(fd)
        lock.unlink()
        return staging, None
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return staging, fd


def _release(lock: int | None) -> None:
    if lock is not None:
        os.close(lock)  # closing drops the flock


def remove_stale_staging(final: str | os.PathLike[str], suffix: str = STAGING_SUFFIX) -> list[Path]:
    """Remove the staging folders (or ``suffix``'s scratch folders) beside ``final`` whose owner is gone; returns
    those removed.

    A folder is stale when nobody holds its owner lock (see the module's docstring). Folders without a lock
    file (an older sdtrt's, or one being created or renamed this instant) and those whose lock cannot be
    tried are left alone.
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        candidates = sorted(p for p in final.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []
    removed = []
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue
        if fcntl is None or not (folder / LOCK_NAME).exists():
            log.warning("leaving %s alone: no owner recorded (remove it if no export is writing it)", folder)
            continue
        if _remove_if_unowned(folder):
            removed.append(folder)
    return removed


def _remove_if_unowned(folder: Path) -> bool:
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:  # gone this instant (renamed into place), or not ours to open
        log.debug("leaving %s alone: %s", folder, exc)
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its export is running (or locks do not work here)
            log.debug("leaving %s alone: its export is running", folder)
            return False
        if not _still_at(fd, lock):  # unlinked: its owner finished and renamed the folder into place
            return False
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by an export that no longer runs (%s)", folder.name, _owner(fd))
        return True
    finally:
        os.close(fd)


def _owner(fd: int) -> str:
    """Who wrote the lock file ``fd``, for people: "pid 1234 on host"."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(owner['pid'])} on {owner['host']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "owner unknown"


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    held = os.fstat(fd)
    try:
        current = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return held.st_nlink > 0 and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: str | os.PathLike[str]) -> str:
    """One hash over every file below ``root``: relative paths and contents, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def data_file_name(name: str) -> str:
    """The weights file beside a model file: an .onnx's external data ``<name>.onnx.data``, an OpenVINO IR's
    ``<stem>.bin`` beside its ``<stem>.xml``."""
    return name.removesuffix(".xml") + ".bin" if name.endswith(".xml") else name + ".data"


def onnx_files(path: str | os.PathLike[str]) -> list[Path]:
    """A model file (.onnx, or an OpenVINO IR's .xml) and its weights file (data_file_name), if it has one."""
    path = Path(path)
    data = path.with_name(data_file_name(path.name))
    return [path, data] if data.exists() else [path]


def onnx_digest(path: str | os.PathLike[str]) -> str:
    """sha256 over the hex sha256 of an .onnx file and of its external data, in that order: the manifest's
    ComponentFile.sha256, and the key of everything built from the file."""
    digest = hashlib.sha256()
    for file in onnx_files(path):
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
