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


PAGE_OUT_A_NON_ASCII_PATH = """
import mmap, sys
from pathlib import Path
from sdtrt.engine.pageout import page_out
folder = Path(sys.argv[1])
folder.mkdir()
(folder / "w.bin").write_bytes(bytes(1 << 16))
with open(folder / "w.bin", "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    page_out((str(folder) + "/",))
print("ok")
"""


def test_a_folder_of_spaces_accents_and_emoji_under_the_c_locale(tmp_path: Path) -> None:
    """/proc/self/maps names the folder in its bytes: read as Python reads file names, not in the locale's
    ASCII (a traceback from the sdtrt-pageout thread, once)."""
    import os
    import subprocess

    folder = tmp_path / "my exports ü 🙂"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", PAGE_OUT_A_NON_ASCII_PATH, str(folder)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
