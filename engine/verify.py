"""`sdtrt verify`: every file of an export read in full against the sha256 and sizes its manifest records.

Loading takes only a cheap look (engine/manifest.py: file_problems); this reads every byte, so it
also finds a file changed in place: a flipped bit, a partial copy padded to the right size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sdtrt.engine.fsutil import onnx_digest, onnx_files, sha256_file
from sdtrt.engine.manifest import MANIFEST_NAME, file_problems, read_manifest

log = logging.getLogger(__name__)

CACHE_FOLDERS = ("trt", "openvino")  # what the engines build from the export: caches, keyed by its sha256


@dataclass(frozen=True)
class Verification:
    folder: Path
    files: int  # files read in full: each .onnx and its external data, tokenizer files, weight maps
    problems: tuple[str, ...]  # one line each, naming the file and the command that rebuilds the export

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_export(folder: str | os.PathLike[str]) -> Verification:
    """Check every file the runtime reads in ``folder``: the networks the manifest names and the tokenizers' files
    and weight maps (Manifest.read_files): present, of the recorded size and sha256. A file the runtime reads
    that the manifest records no hash for is a problem too; files it does not know at all are logged as
    warnings (the engines' caches, trt/ and openvino/, are not looked at).

    A manifest that cannot be read is a ManifestError; a file that fails is a problem in the result.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[str] = []
    count = 0
    known = {MANIFEST_NAME, *manifest.read_files(), *manifest.checksums}
    for component in manifest.components.values():
        for file in component.all_files():  # the plain graphs, then ONNX Runtime's fused ones
            known.update(p.relative_to(folder).as_posix() for p in onnx_files(folder / file.path))
            if found := file_problems(folder, file):  # missing, empty or of another size: no hash to compare
                problems.extend(found)
                continue
            paths = onnx_files(folder / file.path)
            count += len(paths)
            if onnx_digest(folder / file.path) != file.sha256:
                which = " or ".join(map(str, paths))  # one sha256 covers both: either may have changed
                its = "their" if len(paths) > 1 else "its"
                problems.append(f"{which} changed since the export ({its} sha256 is not the manifest's)")
    for name in manifest.read_files():
        if problem := _read_file_problem(folder / name, manifest.checksums.get(name)):
            problems.append(problem)
        elif (folder / name).is_file():
            count += 1
    for name in _unknown_files(folder, known):
        log.warning("%s: %s is not a file sdtrt export wrote (the runtime does not read it)", folder, name)
    return Verification(folder, count, tuple(str(manifest.damaged(folder, problem)) for problem in problems))


def _read_file_problem(path: Path, record: dict | None) -> str | None:
    """What is wrong with a tokenizer file or weight map against its ``checksums`` record, or None."""
    if record is None:
        if not path.is_file():
            return None  # an optional tokenizer config the export did not have
        return f"{path} is read by the runtime but the manifest records no sha256 for it (an older sdtrt's export)"
    if not path.is_file():
        return f"{path} named in the manifest is missing"
    if (size := path.stat().st_size) != record["size"]:
        return f"{path} is {size} bytes, not the {record['size']} the export wrote (truncated or replaced)"
    if sha256_file(path) != record["sha256"]:
        return f"{path} changed since the export (its sha256 is not the manifest's)"
    return None


def _unknown_files(folder: Path, known: set[str]) -> list[str]:
    """The files below ``folder`` (relative) that neither the manifest nor the engines' caches account for."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name.split("/")[0] in CACHE_FOLDERS or path.is_dir() or name in known:
            continue
        found.append(name)
    return found
