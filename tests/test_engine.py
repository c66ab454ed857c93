"""The engine's ground floor: manifest validation, feed checks, atomic writes, backend choice, ORT CPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdtrt.engine import fsutil
from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.backends import choose_backend
from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.manifest import FORMAT_VERSION, load_manifest
from sdtrt.engine.session import Session, TensorSpec, check_feeds


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
    with pytest.raises(ManifestError, match=f"format_version {FORMAT_VERSION + 1}.*re-export"):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden .out.old-PID or staging folder
