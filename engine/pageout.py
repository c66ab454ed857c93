"""Keep a compiled model's source weights out of the resident set, on Linux.

OpenVINO maps its source weights (an IR's .bin, an ONNX file's external data, a cached blob) into
memory and, while it compiles, copies each constant into a layout of its own; the compiled model
keeps the mapping but never reads it again. Those pages are clean and read-only, so the kernel may
drop them at any time and read them back from the file if they are ever touched: asking it to do so
(``madvise(MADV_PAGEOUT)``, Linux 5.4+) while and after a model compiles keeps the source from
adding its whole size to the peak (an SD-1.5 UNet at bf16: 3.4 -> 1.8 GiB). Elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # linux/mman.h
PERIOD_S = 0.05  # while compiling: how often the mapped pages read so far are given back


@contextlib.contextmanager
def paged_out(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """While the block runs and once it is done, give back the resident pages of these files' mappings
    (a folder stands for every file under it)."""
    prefixes = tuple(_prefix(Path(p).resolve()) for p in paths)
    if not prefixes or not sys.platform.startswith("linux"):
        yield
        return
    done = threading.Event()

    def keep_paging_out() -> None:
        while not done.wait(PERIOD_S):
            page_out(prefixes)

    thread = threading.Thread(target=keep_paging_out, name="sdtrt-pageout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        page_out(prefixes)


def _prefix(path: Path) -> str:
    """What the mapped files' names start with: the file's own name, or the folder's with a separator."""
    return str(path) + os.sep if path.is_dir() else str(path)


def page_out(prefixes: tuple[str, ...]) -> None:
    """Ask the kernel to drop the resident pages of this process's read-only mappings of the files named
    ``prefixes`` (or under them, for a folder's, which ends with a separator)."""
    try:
        # the kernel writes the paths' bytes as they are: decoded as Python decodes file names (str(path))
        with open("/proc/self/maps", encoding=sys.getfilesystemencoding(), errors="surrogateescape") as maps:
            ranges = [_range(line) for line in maps if _maps_file(line, prefixes)]
    except OSError:
        return
    for start, end in ranges:
        if _madvise(start, end - start, MADV_PAGEOUT) != 0:  # an old kernel: nothing to gain, nothing lost
            log.debug("madvise(MADV_PAGEOUT) refused: errno %d", ctypes.get_errno())
            return


def _maps_file(line: str, prefixes: tuple[str, ...]) -> bool:
    """A line of /proc/self/maps ("start-end perms offset dev inode path") of a read-only mapping of one of them."""
    fields = line.split(maxsplit=5)
    if len(fields) < 6 or "w" in fields[1]:
        return False
    name = fields[5].rstrip("\n")
    return any(name == p or (p.endswith(os.sep) and name.startswith(p)) for p in prefixes)


def _range(line: str) -> tuple[int, int]:
    start, end = line.split(maxsplit=1)[0].split("-")
    return int(start, 16), int(end, 16)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _madvise(start: int, length: int, advice: int) -> int:
    return _libc().madvise(start, length, advice)
