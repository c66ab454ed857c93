"""`sdtrt export` onto what is already at --out, beside stale staging folders, and of models that torch chokes on.

One table, one row per case, each run through the CLI in a fresh interpreter (cwd: a scratch folder;
--out is "out" in it). A row with an ``error`` is a bad input (bad_input.py: one clear line, no
traceback, nothing new on disk), and every file that was there before is still there, byte for byte.
A row without one exports (the text encoder only: the network with external data and a vocabulary),
and the export must load, leave nothing hidden beside it, and give every file and folder the
permissions of a plain one created under the umask the command ran with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from bad_input import BadInput, assert_one_clear_error, run_cli

from sdtrt.engine.manifest import load_manifest

SMALL_VOCAB = 64  # below the 100 token ids the trace once drew whatever the model: IndexError inside torch


@dataclass
class Scene:
    """What a row works with: the scratch folder (cwd), --out in it, the model, an earlier export, cleanups."""

    root: Path
    model: Path
    earlier_export: Path
    stack: contextlib.ExitStack
    kept: set[str] = field(default_factory=set)  # hidden names beside --out that must survive the export

    @property
    def out(self) -> Path:
        return self.root / "out"


@dataclass(frozen=True)
class Row:
    name: str
    prepare: Callable[[Scene], None]
    error: str | None = None  # the one error line's regex; None: the export succeeds
    check: Callable[[Scene], None] | None = None  # after a successful export
    overwrite: bool = True
    model: Callable[[Path, Path], Path] | None = None  # (the tiny model, a folder) -> the model; None: the tiny
    component: str = "text_encoder"


def _user_files(scene: Scene) -> None:
    (scene.out / "photos").mkdir(parents=True)
    (scene.out / "notes.txt").write_text("my notes\n")
    (scene.out / "photos" / "cat.png").write_bytes(bytes(range(256)))


def _a_file(scene: Scene) -> None:
    scene.out.write_bytes(b"a file the user keeps\n")


def _a_foreign_manifest(scene: Scene) -> None:
    scene.out.mkdir()
    (scene.out / "manifest.json").write_text('{"name": "my web app", "icons": []}\n')


def _an_earlier_export(scene: Scene) -> None:
    shutil.copytree(scene.earlier_export, scene.out)
    (scene.out / "trt").mkdir()  # the engines' cache: sdtrt's, stale once the ONNX changes
    (scene.out / "trt" / "unet.plan").write_bytes(b"plan")


def _an_earlier_export_and_user_files(scene: Scene) -> None:
    _an_earlier_export(scene)
    (scene.out / "my-notes.txt").write_text("which prompts worked\n")


def _an_empty_folder(scene: Scene) -> None:
    scene.out.mkdir()


HOLDER = """import sys
from sdtrt.engine.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as staging:
    print(staging, flush=True)
    sys.stdin.read()  # until the test closes it
    raise SystemExit(1)  # unfinished: atomic_dir removes the staging folder
"""


def _staging_of_an_export(scene: Scene) -> tuple[subprocess.Popen, Path]:
    """An export to the same --out that is still running: a process inside atomic_dir."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(scene.out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    scene.stack.callback(holder.wait, timeout=60)
    scene.stack.callback(holder.stdin.close)
    return holder, Path(holder.stdout.readline().strip())


def _a_killed_and_a_running_export(scene: Scene) -> None:
    _, live = _staging_of_an_export(scene)
    killed, dead = _staging_of_an_export(scene)
    killed.kill()  # kill -9: no cleanup runs
    killed.wait()
    (dead / "unet.onnx").write_bytes(b"half an export")
    assert live.is_dir() and dead.is_dir()
    scene.kept.add(live.name)


def _umask_002(scene: Scene) -> None:
    scene.stack.callback(os.umask, os.umask(0o002))  # the CLI inherits it; restored after the row


def _nothing(scene: Scene) -> None:
    pass


def _small_vocab_model(tiny: Path, folder: Path) -> Path:
    """The tiny SD 1.x model with a custom tokenizer: CLIP's cut to SMALL_VOCAB ids, and a text encoder to match."""
    from sdtrt.export.tiny import build_tiny_sd1

    return build_tiny_sd1(folder, vocab_size=SMALL_VOCAB)


def _damaged_model(tiny: Path, folder: Path) -> Path:
    """The tiny model (linked) whose UNet weights file is cut short, as by an interrupted download."""
    shutil.copytree(tiny, folder, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    head = weights.read_bytes()[:4096]
    weights.unlink()
    weights.write_bytes(head)
    return folder


def _replaced_the_earlier_export(scene: Scene) -> None:
    assert sorted(p.name for p in scene.out.iterdir()) == [
        "manifest.json",
        "text_encoder.onnx",
        "text_encoder.onnx.data",
        "text_encoder.weights.json",
        "tokenizer",
    ]


def _runs_on_its_vocabulary(scene: Scene) -> None:
    import onnxruntime as ort
    import torch
    from transformers import CLIPTextModel

    session = ort.InferenceSession(str(scene.out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, SMALL_VOCAB, (2, 77)).astype(np.int32)
    ids[:, 0], ids[:, -1] = SMALL_VOCAB - 2, SMALL_VOCAB - 1  # bos ... eos
    (got,) = session.run(None, {"input_ids": ids})
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(scene.model / "text_encoder")(torch.from_numpy(ids).long())
    expected = expected.last_hidden_state.numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


OUT = r"^sdtrt: error: refusing to overwrite out: "
ROWS = [
    Row(
        "--overwrite onto a folder of user files",
        _user_files,
        OUT + r"it is not empty and not an sdtrt export \(no manifest\.json\)$",
    ),
    Row(
        "onto a folder of user files",
        _user_files,
        r"^sdtrt: error: out already exists \(use --overwrite to replace it\)$",
        overwrite=False,
    ),
    Row("--overwrite onto a file", _a_file, OUT + r"it is not a folder$"),
    Row(
        "--overwrite onto a named pipe", lambda scene: os.mkfifo(scene.out), OUT + r"it is a named pipe, not a folder$"
    ),
    Row(
        "--overwrite onto another program's manifest.json",
        _a_foreign_manifest,
        OUT + r"its manifest\.json is not an sdtrt manifest$",
    ),
    Row(
        "--overwrite onto an export holding user files",
        _an_earlier_export_and_user_files,
        OUT + r"it is an sdtrt export but also holds files sdtrt did not write \(my-notes\.txt\); move them out first$",
    ),
    Row(
        "a damaged weights file",
        _nothing,
        r"^sdtrt: error: exporting unet failed: \w+: \S",
        model=_damaged_model,
        component="unet",
    ),
    Row("--overwrite onto an empty folder", _an_empty_folder),
    Row("--overwrite onto an earlier sdtrt export", _an_earlier_export, check=_replaced_the_earlier_export),
    Row("beside a killed export's staging folder and a running one's", _a_killed_and_a_running_export),
    Row("under umask 002", _umask_002),
    Row(f"a text encoder of {SMALL_VOCAB} tokens", _nothing, model=_small_vocab_model, check=_runs_on_its_vocabulary),
]


def _contents(root: Path) -> dict[str, bytes | int | None]:
    """Every path below ``root`` and its bytes (None: a folder; a named pipe or device: its mode, never read)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() if p.is_file() else p.lstat().st_mode
        for p in sorted(root.rglob("*"))
    }


def _plain_modes(scratch: Path) -> tuple[int, int]:
    """The permissions of a file and a folder created now, under the current umask."""
    scratch.mkdir()
    (scratch / "file").touch()
    return (scratch / "file").stat().st_mode & 0o777, scratch.stat().st_mode & 0o777


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_export_out(row: Row, tiny_model_dir: Path, tiny_export: Path, tmp_path: Path) -> None:
    model = tiny_model_dir if row.model is None else row.model(tiny_model_dir, tmp_path / "model")
    argv = ("export", str(model), "--out", "out", "--components", row.component)
    argv += ("--overwrite",) if row.overwrite else ()
    with contextlib.ExitStack() as stack:
        scene = Scene(tmp_path / "work", model, tiny_export, stack)
        scene.root.mkdir()
        row.prepare(scene)
        if row.error is not None:
            before = _contents(scene.root)
            assert_one_clear_error(BadInput(row.name, argv, row.error), scene.root, watch=[scene.root])
            assert _contents(scene.root) == before  # the user's files, byte for byte
            return
        file_mode, folder_mode = _plain_modes(tmp_path / "plain")
        result = run_cli(argv, scene.root)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert set(load_manifest(scene.out).components) == {row.component}
        assert {p.name for p in scene.root.iterdir() if p.name != "out"} == scene.kept
        modes = {str(p.relative_to(scene.out)): p.stat().st_mode & 0o777 for p in scene.out.rglob("*")}
        expected = {name: folder_mode if (scene.out / name).is_dir() else file_mode for name in modes}
        assert modes == expected and "text_encoder.onnx.data" in modes
        assert scene.out.stat().st_mode & 0o777 == folder_mode
        if row.check is not None:
            row.check(scene)
