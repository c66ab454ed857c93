"""Damaged exports: each is one error naming the file and the command that rebuilds the export, never a traceback.

The CLI rows run `sdtrt generate` on a copy of the tiny export with one thing broken; the engine rows
open such copies directly, on each CPU backend, with manifests of today and of before sizes were recorded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_input import BadInput, assert_one_clear_error

from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.backends import BACKENDS
from sdtrt.engine.errors import ManifestError, SdtrtError
from sdtrt.engine.manifest import load_manifest, read_manifest, rebuild_command

Damage = Callable[[Path], None]


def _edit_manifest(edit: Callable[[dict], None]) -> Damage:
    def damage(folder: Path) -> None:
        path = folder / "manifest.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return damage


def _truncate(name: str, keep: int = 1000) -> Damage:
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def _empty(folder: Path) -> None:
    (folder / "unet.onnx").write_bytes(b"")


def _swap(folder: Path) -> None:  # another network's valid ONNX file under the UNet's name
    shutil.copy(folder / "vae_decoder.onnx", folder / "unet.onnx")


def _remove_data(folder: Path) -> None:
    (folder / "unet.onnx.data").unlink()


def _garbage(folder: Path) -> None:
    (folder / "unet.onnx").write_bytes(b"not a model " * 100)


def _forget_sizes(data: dict) -> None:
    """The manifest as sdtrt wrote it before it recorded sizes."""
    for component in data["components"].values():
        for file in component["files"].values():
            del file["size"], file["data_size"]


def _set(**values: object) -> Damage:
    return _edit_manifest(lambda data: data.update(values))


def _damaged_copy(tiny_export: Path, tmp_path: Path, *damages: Damage) -> Path:
    """A full copy of the tiny export (no links: damaging it must not touch the shared one), damaged."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    for damage in damages:
        damage(folder)
    return folder


def _names(path: str, folder: Path, tiny_export: Path, says: str = "") -> str:
    """The regex the one line must match: the file's full path, ``says`` (a regex), then the command that
    rebuilds the export."""
    hint = f"; rebuild the export with: {rebuild_command(folder, load_manifest(tiny_export).source['path'])}"
    return re.escape(str(folder / path)) + says + ".*" + re.escape(hint) + "$"


# --- the CLI: `sdtrt generate` on a damaged export --------------------------------------------------

# Where loading fails after the backend is chosen, -q keeps its INFO line ("backend ort-cpu ...") off stderr.
ORT = ("-q", "--backend", "ort-cpu")  # the message is ONNX Runtime's own
OLDER = (_edit_manifest(_forget_sizes),)  # a manifest written before sizes were recorded
SIZE = r" is \d+ bytes, not the \d+ the export wrote"
# name, damages, extra arguments, the file the error names, a regex for what follows its name
CLI_CASES = [
    ("truncated unet.onnx", (_truncate("unet.onnx"),), (), "unet.onnx", SIZE),
    ("empty unet.onnx", (_empty,), (), "unet.onnx", " is empty"),
    ("swapped unet.onnx", (_swap,), (), "unet.onnx", SIZE),
    ("truncated unet.onnx.data", (_truncate("unet.onnx.data"),), (), "unet.onnx.data", SIZE),
    ("missing unet.onnx.data", (_remove_data,), (), "unet.onnx.data", " named in the manifest is missing"),
    ("size_multiple 0", (_set(size_multiple=0),), (), "manifest.json", ": size_multiple is 0, not a positive number"),
    # an older manifest: the backend's own refusal, or the session's input names, catch what sizes would have
    ("older, truncated unet.onnx", (*OLDER, _truncate("unet.onnx")), ORT, "unet.onnx", ": .*Protobuf parsing failed"),
    ("older, swapped unet.onnx", (*OLDER, _swap), ("-q",), "unet.onnx", r" has inputs \['latent'\]"),
]


@pytest.mark.parametrize(("name", "damages", "extra", "file", "says"), CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_generate_on_a_damaged_export_is_one_error(
    tiny_export: Path,
    tmp_path: Path,
    name: str,
    damages: tuple[Damage, ...],
    extra: tuple[str, ...],
    file: str,
    says: str,
) -> None:
    folder = _damaged_copy(tiny_export, tmp_path, *damages)
    out = tmp_path / "out" / "cat.png"
    size = ("--height", "128", "--width", "128")
    argv = ("generate", str(folder), "a cat", "--steps", "1", *size, "-o", str(out), *extra)
    message = "^sdtrt: error: .*" + _names(file, folder, tiny_export, says)
    assert_one_clear_error(BadInput(name, argv, message), tmp_path, watch=[tmp_path])
    assert not out.exists()


# --- the engine: open_artifact and its sessions -----------------------------------------------------

# name, damages, the file the error names, a regex for what it says (empty and garbage: a look at load finds them)
OLD_MANIFEST_CASES = [
    ("truncated unet.onnx", (_truncate("unet.onnx"),), "unet.onnx", "cannot load"),
    ("empty unet.onnx", (_empty,), "unet.onnx", "is empty"),
    ("garbage unet.onnx", (_garbage,), "unet.onnx", "is not an ONNX model"),
    ("swapped unet.onnx", (_swap,), "unet.onnx", r"has inputs \['latent'\]"),
    ("truncated unet.onnx.data", (_truncate("unet.onnx.data"),), "unet.onnx", "cannot load"),
    ("missing unet.onnx.data", (_remove_data,), "unet.onnx", "cannot load"),
]


@pytest.mark.parametrize(
    ("name", "damages", "file", "says"), OLD_MANIFEST_CASES, ids=[case[0] for case in OLD_MANIFEST_CASES]
)
def test_a_damaged_file_of_an_older_manifest_fails_when_its_session_opens(
    tiny_export: Path,
    tmp_path: Path,
    cpu_backend: dict[str, str | None],
    name: str,
    damages: tuple[Damage, ...],
    file: str,
    says: str,
) -> None:
    folder = _damaged_copy(tiny_export, tmp_path, *OLDER, *damages)
    backend, precision = cpu_backend["backend"], cpu_backend["precision"]
    with (
        pytest.raises(ManifestError, match=_names(file, folder, tiny_export)) as info,
        open_artifact(folder, backend, precision) as artifact,  # empty or garbage: fails here already
    ):
        artifact.session("unet")
    assert re.search(says, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)
    if "cannot load" in says:  # the backend's own exception, kept for --debug
        assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, ManifestError)


def test_an_older_manifest_without_sizes_still_loads(tiny_export: Path, tmp_path: Path) -> None:
    folder = _damaged_copy(tiny_export, tmp_path, *OLDER)
    manifest = load_manifest(folder)
    assert manifest.components["unet"].files["fp32"].size is None
    with open_artifact(folder, "ort-cpu") as artifact:
        assert set(artifact.session("unet").inputs) == {"sample", "timestep", "encoder_hidden_states"}


# name, manifest edit, what the one line says
NUMBER_CASES = [
    ("size_multiple 0", _set(size_multiple=0), "size_multiple is 0"),
    ("vae_scale_factor 0", _set(vae_scale_factor=0), "vae_scale_factor is 0"),
    ("negative default height", _set(default_height=-256), "default_height is -256"),
    ("default width off the latent grid", _set(default_width=250), "default_width 250 is not a multiple"),
    ("latent_channels 0", _set(latent_channels=0), "latent_channels is 0"),
    ("text_max_length 0", _set(text_max_length=0), "text_max_length is 0"),
    ("size_multiple not a multiple", _set(size_multiple=12), "size_multiple 12 is not a multiple of vae_scale_factor"),
    ("vae_scaling_factor 0", _set(vae_scaling_factor=0.0), r"vae_scaling_factor is 0\.0"),
    ("a zero in a shape", _edit_manifest(lambda d: _zero_dim(d)), r"unet: sample has shape \['batch', 0"),
]


def _zero_dim(data: dict) -> None:
    data["components"]["unet"]["files"]["fp32"]["inputs"][0]["shape"][1] = 0


@pytest.mark.parametrize(("name", "edit", "says"), NUMBER_CASES, ids=[case[0] for case in NUMBER_CASES])
def test_the_manifests_numbers_are_checked(
    tiny_export: Path, tmp_path: Path, name: str, edit: Damage, says: str
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(tiny_export / "manifest.json", folder / "manifest.json")  # read_manifest reads no other file
    edit(folder)
    with pytest.raises(ManifestError, match=_names("manifest.json", folder, tiny_export)) as info:
        read_manifest(folder)
    assert re.search(says, str(info.value)), str(info.value)


def test_a_damaged_weight_map_names_the_rebuild_command(tiny_export: Path, tmp_path: Path) -> None:
    folder = _damaged_copy(tiny_export, tmp_path, lambda f: (f / "unet.weights.json").write_text("{"))
    with open_artifact(folder, "ort-cpu") as artifact, pytest.raises(ManifestError) as info:
        artifact.weight_map("unet")
    assert re.search(r"weight map .*unet\.weights\.json.*rebuild the export with: sdtrt export", str(info.value))


class OrtLikeError(Exception):
    """As ONNX Runtime's exception types are: no RuntimeError, from the backend's own module."""


OrtLikeError.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"


@pytest.mark.parametrize(
    ("raised", "error", "says"),
    [
        (OrtLikeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF"), ManifestError, "cannot load .*: .*INVALID_PROTO"),
        (RuntimeError("core.cpp:84:\nModel can't be parsed\n"), ManifestError, ": Model can't be parsed; rebuild"),
        (RuntimeError("std::bad_alloc"), SdtrtError, "not enough memory to load .*: std::bad_alloc$"),
        (ValueError("a bug of ours"), ValueError, "^a bug of ours$"),  # not the backend's: passed on as it is
    ],
)
def test_what_a_backend_raises_while_opening_becomes_one_line(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception, error: type, says: str
) -> None:
    def refuse(choice: object, target: object) -> None:
        raise raised

    monkeypatch.setitem(BACKENDS, "ort-cpu", dataclasses.replace(BACKENDS["ort-cpu"], open=refuse))
    with open_artifact(tiny_export, "ort-cpu") as artifact, pytest.raises(error, match=says) as info:
        artifact.session("vae_decoder")
    assert "\n" not in str(info.value)
    assert (error is ManifestError) == isinstance(info.value, ManifestError)
    if error is not ValueError:
        assert info.value.__cause__ is raised
