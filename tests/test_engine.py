"""The engine's ground floor: manifest validation, feed checks, atomic writes, backend choice, ORT CPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from sdtrt.engine import fsutil
from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.backends import choose_backend
from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.fsutil import onnx_digest
from sdtrt.engine.manifest import FORMAT_VERSION, ComponentFile, load_manifest
from sdtrt.engine.session import Session, TensorSpec, check_feeds
from sdtrt.engine.verify import verify_export


@pytest.fixture
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    """A copy of the tiny export whose manifest a test may break (ONNX files linked, not copied)."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    (folder / "manifest.json").unlink()
    shutil.copy(tiny_export / "manifest.json", folder / "manifest.json")
    return folder


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_folder_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no artifact folder"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        load_manifest(tmp_path)


def test_corrupt_manifest(export_copy: Path) -> None:
    (export_copy / "manifest.json").write_text('{"format_version": 1, "family": ')
    with pytest.raises(ManifestError, match="corrupt manifest"):
        load_manifest(export_copy)


def test_manifest_missing_key(export_copy: Path) -> None:
    _edit_manifest(export_copy, lambda d: d.pop("vae_scaling_factor"))
    with pytest.raises(ManifestError, match="missing key 'vae_scaling_factor'"):
        load_manifest(export_copy)


def test_unsupported_format_version(export_copy: Path) -> None:
    _edit_manifest(export_copy, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ManifestError, match=f"format_version {FORMAT_VERSION + 1}.*rebuild the export with"):
        load_manifest(export_copy)


def test_unknown_family(export_copy: Path) -> None:
    _edit_manifest(export_copy, lambda d: d.update(family="sd9"))
    with pytest.raises(ManifestError, match="family 'sd9' is not supported"):
        load_manifest(export_copy)


def test_missing_onnx_file(export_copy: Path) -> None:
    (export_copy / "unet.onnx").unlink()
    with pytest.raises(ManifestError, match=r"unet\.onnx named in the manifest is missing"):
        load_manifest(export_copy)


def test_manifest_round_trip(tiny_export: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_export)
    manifest.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest.to_dict()
    with pytest.raises(ManifestError, match="no lora"):
        manifest.component_file("lora", "fp32")
    with pytest.raises(ManifestError, match="not exported at int8"):
        manifest.component_file("unet", "int8")


def test_check_feeds() -> None:
    specs = {
        "sample": TensorSpec("sample", "float32", ("batch", 4, "h", "w")),
        "timestep": TensorSpec("timestep", "float32", ("batch",)),
    }
    good = {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32)}
    check_feeds("unet", specs, good)
    cases = [
        ({"sample": good["sample"]}, r"\['timestep'\] missing"),
        ({**good, "extra": good["timestep"]}, r"\['extra'\] unknown"),
        ({**good, "timestep": np.zeros(2, np.float64)}, "'timestep' is float64, expected float32"),
        ({**good, "sample": np.zeros((2, 4, 8), np.float32)}, "expected rank 4"),
        ({**good, "sample": np.zeros((2, 3, 8, 8), np.float32)}, "axis 1 must be 4"),
        ({**good, "timestep": np.zeros(3, np.float32)}, "'batch' is 2 in one input and 3"),
    ]
    for feeds, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            check_feeds("unet", specs, feeds)


def test_atomic_path_keeps_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    with pytest.raises(RuntimeError), fsutil.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    fsutil.write_bytes_atomic(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert target.stat().st_mode & 0o644 == 0o644


def test_atomic_path_never_replaces_a_device_or_a_pipe(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "pipe")
    for target, kind in ((Path("/dev/null"), "character device"), (tmp_path / "pipe", "named pipe")):
        with pytest.raises(FileExistsError, match=f"refusing to replace {target}: it is a {kind}, not a regular file"):
            fsutil.write_bytes_atomic(target, b"a report")
    with pytest.raises(FileExistsError, match="it is a named pipe"):
        fsutil.write_bytes_atomic(tmp_path / "link", b"a report")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe"]


def test_atomic_dir_replaces_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "artifacts"
    with fsutil.atomic_dir(final) as staging:
        (staging / "a").write_text("first")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(final, overwrite=True) as staging:
        (staging / "a").write_text("second, unfinished")
        raise RuntimeError("boom")
    assert (final / "a").read_text() == "first"
    with fsutil.atomic_dir(final, overwrite=True) as staging:
        (staging / "a").write_text("second")
    assert (final / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]
    with pytest.raises(FileExistsError):
        fsutil.atomic_dir(final).__enter__()


def test_backend_choice() -> None:
    assert choose_backend("auto").kind == ("openvino" if importlib.util.find_spec("openvino") else "ort-cpu")
    assert choose_backend("ort-cpu").reason == "requested"
    with pytest.raises(InvalidInputError, match="unknown backend 'cuda'"):
        choose_backend("cuda")


def test_ort_cpu_session(tiny_export: Path) -> None:
    session = open_artifact(tiny_export, "ort-cpu").session("vae_decoder")
    assert isinstance(session, Session)
    assert session.inputs["latent"] == TensorSpec("latent", "float32", ("batch", 4, "latent_height", "latent_width"))
    latent = np.zeros((1, 4, 16, 16), np.float32)
    first = session.run({"latent": latent})["image"]
    second = session.run({"latent": latent + 1})["image"]
    assert first.shape == (1, 3, 128, 128)
    assert not np.shares_memory(first, second)
    with pytest.raises(InvalidInputError, match="float16, expected float32"):
        session.run({"latent": latent.astype(np.float16)})
    session.close()


def test_atomic_dir_refuses_to_overwrite_a_file(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.write_text("a file")
    with pytest.raises(FileExistsError, match="is not a folder"), fsutil.atomic_dir(final, overwrite=True):
        pytest.fail("atomic_dir yielded for a file")
    assert final.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden staging folder


def test_replace_refusal(tmp_path: Path) -> None:
    final = tmp_path / "out"
    assert fsutil.replace_refusal(final, overwrite=False) is None  # nothing there
    final.mkdir()
    assert fsutil.replace_refusal(final, overwrite=False) is None  # an empty folder is written into
    (final / "mine.txt").write_text("the user's")
    assert fsutil.replace_refusal(final, overwrite=False) == f"{final} already exists (use --overwrite to replace it)"
    assert fsutil.replace_refusal(final, overwrite=True) is None  # no judge of what is there: any folder
    judged = fsutil.replace_refusal(final, overwrite=True, replaceable=lambda folder: f"{folder.name} is the user's")
    assert judged == f"refusing to overwrite {final}: out is the user's"
    (tmp_path / "file").write_text("a file")
    assert (
        fsutil.replace_refusal(tmp_path / "file", overwrite=True)
        == f"refusing to overwrite {tmp_path / 'file'}: it is not a folder"
    )
    (tmp_path / "link").symlink_to(final)
    assert "it is a symbolic link" in fsutil.replace_refusal(tmp_path / "link", overwrite=True)


def test_atomic_dir_writes_into_an_empty_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    with fsutil.atomic_dir(final) as staging:  # no overwrite needed: nothing is lost
        (staging / "a").write_text("new")
    assert (final / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_asks_again_before_the_swap(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("an earlier export")

    def replaceable(folder: Path) -> str | None:
        return "it holds mine.txt" if (folder / "mine.txt").exists() else None

    refused = pytest.raises(FileExistsError, match=r"it holds mine\.txt")
    with refused, fsutil.atomic_dir(final, overwrite=True, replaceable=replaceable) as staging:
        (staging / "new").write_text("unfinished")
        (final / "mine.txt").write_text("written while the export ran")
    assert sorted(p.name for p in final.iterdir()) == ["mine.txt", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_gives_every_file_the_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        (tmp_path / "plain-file").touch()
        (tmp_path / "plain-folder").mkdir()
        with fsutil.atomic_dir(tmp_path / "out") as staging:
            os.close(os.open(staging / "data", os.O_CREAT | os.O_WRONLY, 0o600))  # as onnx writes external data
            (staging / "sub").mkdir(mode=0o700)
            os.close(os.open(staging / "sub" / "tool", os.O_CREAT | os.O_WRONLY, 0o700))
        fsutil.write_bytes_atomic(tmp_path / "atomic-file", b"x")  # mkstemp's 0600
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    file_mode, folder_mode = mode(tmp_path / "plain-file"), mode(tmp_path / "plain-folder")
    assert (file_mode, folder_mode) == (0o640, 0o750)
    out = tmp_path / "out"
    assert {p.name: mode(p) for p in out.rglob("*")} == {"data": file_mode, "sub": folder_mode, "tool": folder_mode}
    assert mode(out) == folder_mode and mode(tmp_path / "atomic-file") == file_mode


def test_stale_staging_folders_are_removed_live_ones_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    final = tmp_path / "out"
    dead, lock = fsutil._new_staging(final)
    fsutil._release(lock)  # as when its process dies, however: the kernel drops the lock
    (dead / "unet.onnx").write_bytes(b"half")
    reused, lock = fsutil._new_staging(final)  # records this (running) process's PID, but nobody holds its lock:
    fsutil._release(lock)  # a PID reused by another process does not keep a dead export's folder
    live, live_lock = fsutil._new_staging(final)
    unowned = tmp_path / ".out.abcd1234.partial"  # an older sdtrt's, or one created this instant: no lock file
    unowned.mkdir()
    others = [tmp_path / ".out.b.abcd1234.partial", tmp_path / ".other.abcd1234.partial", tmp_path / ".out.x.tmp"]
    for other in others:  # another export's (out.b, other), or no staging folder at all
        other.mkdir()
    assert json.loads((live / fsutil.LOCK_NAME).read_text())["pid"] == os.getpid()
    try:
        with caplog.at_level(logging.INFO, logger="sdtrt.engine.fsutil"):
            assert fsutil.remove_stale_staging(final) == sorted([dead, reused])
        assert live.is_dir() and unowned.is_dir() and all(other.is_dir() for other in others)
        assert f"leaving {unowned} alone" in caplog.text
        assert f"removed {reused.name}, left by an export that no longer runs (pid {os.getpid()} on " in caplog.text
        with fsutil.atomic_dir(final) as staging:  # and atomic_dir cleans up first
            (staging / "a").write_text("done")
        assert live.is_dir()
    finally:
        fsutil._release(live_lock)
    assert fsutil.remove_stale_staging(final) == [live]
    assert not (final / fsutil.LOCK_NAME).exists() and (final / "a").read_text() == "done"


def test_scratch_folders_are_owner_locked_and_cleaned_up_like_staging(tmp_path: Path) -> None:
    """A checkpoint converted on the way to an export (gigabytes) works in a scratch folder: a killed run's is
    removed by the next run, another kind's is left alone, and its own is gone when the work ends."""
    final = tmp_path / "out"
    killed, lock = fsutil._new_staging(final, ".convert")
    fsutil._release(lock)
    (killed / "model.safetensors").write_bytes(b"gigabytes")
    staging, lock = fsutil._new_staging(final)  # an export's staging folder, not a scratch folder: not this kind
    fsutil._release(lock)
    with fsutil.scratch_dir(final, ".convert") as work:
        assert not killed.exists() and staging.is_dir()
        assert work.name.startswith(".out.") and work.name.endswith(".convert") and (work / fsutil.LOCK_NAME).is_file()
        assert fsutil.remove_stale_staging(final, ".convert") == []  # held while the work runs
    assert not work.exists()


def test_the_manifest_records_file_sizes(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    for component in manifest.components.values():
        for file in component.files.values():
            assert file.size == (tiny_export / file.path).stat().st_size
            data = tiny_export / file.data_path
            assert file.data_size == (data.stat().st_size if data.exists() else None)
    unet = manifest.components["unet"].files["fp32"]
    assert unet.expected_files() == {
        "unet.onnx": unet.size,
        "unet.onnx.data": unet.data_size,
        "unet.weights.json": None,
    }
    older = {key: value for key, value in unet.to_dict().items() if key not in ("size", "data_size")}
    assert ComponentFile.from_dict(older).expected_files() == {"unet.onnx": None, "unet.weights.json": None}


def test_verify_export_reads_every_file(tiny_export: Path) -> None:
    result = verify_export(tiny_export)
    assert (
        result.ok and result.problems == () and result.files == 20
    )  # 12 ONNX files and data, 4 tokenizer files, 4 weight maps
    unet = load_manifest(tiny_export).components["unet"].files["fp32"]
    assert onnx_digest(tiny_export / unet.path) == unet.sha256  # the exporter's digest, recomputed
