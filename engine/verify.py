"""`sdtrt verify`: every file of an export read in full against the sha256 and sizes its manifest records.

Loading takes only a cheap look (engine/manifest.py: file_problems); this reads every byte, so it
also finds a file changed in place: a flipped bit, a partial copy padded to the right size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdtrt.engine.fsutil import onnx_digest, onnx_files
from sdtrt.engine.manifest import file_problems, read_manifest


@dataclass(frozen=True)
class Verification:
    folder: Path
    files: int  # files read in full: each .onnx and its external data
    problems: tuple[str, ...]  # one line each, naming the file and the command that rebuilds the export

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_export(folder: str | os.PathLike[str]) -> Verification:
    """Check every file the manifest in ``folder`` names: present, of its recorded size, of its recorded sha256.

    A manifest that cannot be read is a ManifestError; a file that fails is a problem in the result.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[str] = []
    count = 0
    for component in manifest.components.values():
        for file in component.all_files():  # the plain graphs, then ONNX Runtime's fused ones
            if found := file_problems(folder, file):  # missing, empty or of another size: no hash to compare
                problems.extend(found)
                continue
            paths = onnx_files(folder / file.path)
            count += len(paths)
            if onnx_digest(folder / file.path) != file.sha256:
                which = " or ".join(map(str, paths))  # one sha256 covers both: either may have changed
                its = "their" if len(paths) > 1 else "its"
                problems.append(f"{which} changed since the export ({its} sha256 is not the manifest's)")
    return Verification(folder, count, tuple(str(manifest.damaged(folder, problem)) for problem in problems))
