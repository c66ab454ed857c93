"""engine/pageout: the resident pages of a read-only file mapping are given back, and read again from the
file when touched (the contents never change)."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from sdtrt.engine.pageout import paged_out

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")


def _resident_kib(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5 and ":" not in line.split()[0]:
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_paged_out_gives_back_a_read_only_mapping(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)  # 16 MiB
    path.write_bytes(data.tobytes())
    other = tmp_path / "weights.bin.other"  # a name that starts like it: left alone
    other.write_bytes(data.tobytes())
    with open(path, "rb") as f, open(other, "rb") as g:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        kept = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) >= 0  # touch every page
        assert sum(kept[i] for i in range(0, len(kept), 4096)) >= 0
        before = _resident_kib(path)
        with paged_out([path]):
            pass
        after = _resident_kib(path)
        if after == before:
            pytest.skip("this kernel keeps the pages (no MADV_PAGEOUT)")
        assert before >= 15 << 10 and after < before // 4
        assert _resident_kib(other) >= 15 << 10
        assert np.array_equal(np.frombuffer(mapped, np.uint8), data)  # read back from the file
        mapped.close()
        kept.close()


def test_paged_out_of_nothing_is_a_no_op() -> None:
    with paged_out([]):
        pass
