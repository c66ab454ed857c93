"""The command line's own bad inputs: `sdtrt verify`, an -o that cannot be written, and --debug.

Each row runs the CLI in a fresh interpreter (tests/bad_input.py). An -o that cannot be written
must fail before the pipeline loads: no denoising step runs, and the error names the user's path.
Tests run as root, where permission bits stop no write: the unwritable cases fail for root too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import bad_input
import pytest
from bad_input import BadInput, assert_one_clear_error, flip_a_byte, run_cli

GENERATE = ("--steps", "1", "--height", "128", "--width", "128")


@pytest.fixture
def export(tiny_export: Path, tmp_path: Path) -> Path:
    """A full copy of the tiny export that a test may damage."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    return folder


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.CompletedProcess]:
    """Every CLI run assert_one_clear_error makes, for what it does not check itself (stderr beyond its line)."""
    done: list[subprocess.CompletedProcess] = []

    def spy(*args: object, **kwargs: object) -> subprocess.CompletedProcess:
        done.append(run_cli(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(bad_input, "run_cli", spy)
    return done


# --- sdtrt verify -------------------------------------------------------------------------------------


def test_verify_a_good_export(export: Path, tmp_path: Path) -> None:
    result = run_cli(["verify", str(export)], tmp_path)
    assert result.returncode == 0, result.stderr
    # 8 .onnx, 4 with external data; the tokenizer's 4 files, the weight maps of text encoder and UNet at 2 precisions
    assert result.stdout.strip() == f"{export}: ok (20 files)"
    assert result.stderr == ""


def test_verify_finds_a_flipped_byte(export: Path, tmp_path: Path) -> None:
    flip_a_byte(export / "unet.onnx.data")  # same size: loading cannot see it, a full read can
    named = re.escape(f"{export / 'unet.onnx.data'} changed since the export")
    message = named + r".*; rebuild the export with: sdtrt export \S+ --out " + re.escape(f"{export} --overwrite")
    case = BadInput("verify, flipped byte", ("verify", str(export)), message)
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])


def _swap_two_words(path: Path) -> None:  # the ids of two words swapped: same size, other tokens
    ids = {"100": "101", "101": "100"}
    text = re.sub(r'(":\s*)(100|101)(?=[,}\s])', lambda m: m[1] + ids[m[2]], path.read_text(encoding="utf-8"))
    path.write_text(text, encoding="utf-8")


def _shift_an_offset(path: Path) -> None:  # LoRA would write its weights in the wrong place
    text = path.read_text(encoding="utf-8")
    path.write_text(re.sub(r'"offset": (\d+)', lambda m: f'"offset": {int(m[1]) + 4}', text, count=1), encoding="utf-8")


def _forget_the_checksums(export: Path) -> None:  # an export by an sdtrt from before they were recorded
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["checksums"]
    (export / "manifest.json").write_text(json.dumps(manifest))


# name, what is done to the export, the file the line names, what it says
VERIFY_CASES = [
    ("two words of the vocabulary swapped", "tokenizer/vocab.json", _swap_two_words, "changed since the export"),
    ("a weight map's offset changed", "unet.weights.json", _shift_an_offset, "changed since the export"),
    ("a tokenizer file removed", "tokenizer/merges.txt", Path.unlink, "named in the manifest is missing"),
    ("a tokenizer config replaced", "tokenizer/tokenizer_config.json", lambda p: p.write_text("{}"), "2 bytes, not"),
]


@pytest.mark.parametrize(("name", "file", "damage", "says"), VERIFY_CASES, ids=[case[0] for case in VERIFY_CASES])
def test_verify_covers_every_file_the_runtime_reads(
    export: Path, tmp_path: Path, name: str, file: str, damage, says: str
) -> None:
    damage(export / file)
    message = re.escape(f"{export / file} ") + ".*" + says + r".*; rebuild the export with: sdtrt export"
    assert_one_clear_error(BadInput(name, ("verify", str(export)), message), tmp_path, watch=[tmp_path])


def test_verify_of_an_export_without_checksums_says_so(export: Path, tmp_path: Path) -> None:
    _forget_the_checksums(export)
    result = run_cli(["verify", str(export)], tmp_path)
    assert result.returncode == 2
    assert all("records no sha256" in line for line in result.stderr.splitlines()), result.stderr


def test_verify_warns_of_files_it_did_not_write(export: Path, tmp_path: Path) -> None:
    (export / "tokenizer" / "added_tokens.json").write_text("{}")
    (export / "trt").mkdir()
    (export / "trt" / "unet.plan").write_bytes(b"a cache")  # the engines' caches are not the export's
    result = run_cli(["verify", str(export)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"sdtrt.engine.verify: {export}: tokenizer/added_tokens.json is not a file sdtrt export wrote "
        "(the runtime does not read it)"
    ]


def test_verify_names_each_problem_on_its_own_line(export: Path, tmp_path: Path) -> None:
    flip_a_byte(export / "unet.onnx.data")
    (export / "text_encoder.fp16.onnx.data").unlink()
    result = run_cli(["verify", str(export)], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert "text_encoder.fp16.onnx.data named in the manifest is missing" in lines[0]
    assert "unet.onnx.data changed since the export" in lines[1]


# --- an -o that cannot be written ---------------------------------------------------------------------

# name, -o relative to tmp_path (or absolute), the path the error names (the same unless given), what it says
OUT_CASES = [
    ("a folder", "pictures", None, "it is a folder"),
    ("under a file", "notes.txt/cat.png", None, r"notes\.txt is a file, not a folder"),
    ("deep under a file", "notes.txt/a/b/cat.png", None, r"notes\.txt is a file, not a folder"),
    ("a folder that takes no files", "/proc/sdtrt-test/cat.png", None, "/proc takes no new files"),
    ("one of several images is a folder", "cat.png --num-images 2", "cat-1.png", "it is a folder"),
    ("a character device", "/dev/null", None, "it is a character device, not a regular file"),
    ("a named pipe", "pipe.png", None, "it is a named pipe, not a regular file"),
    ("a link to a named pipe", "link.png", None, "it is a named pipe, not a regular file"),
]


@pytest.mark.parametrize(("name", "out", "names", "says"), OUT_CASES, ids=[case[0] for case in OUT_CASES])
def test_an_unwritable_out_fails_before_any_step(
    export: Path,
    tmp_path: Path,
    runs: list[subprocess.CompletedProcess],
    name: str,
    out: str,
    names: str | None,
    says: str,
) -> None:
    work = tmp_path / "work"
    (work / "pictures").mkdir(parents=True)
    (work / "cat-1.png").mkdir()
    (work / "notes.txt").write_text("a file")
    os.mkfifo(work / "pipe.png")
    (work / "link.png").symlink_to(work / "pipe.png")
    path, *more = out.split()
    named = work / (names or path)  # an absolute path stays itself
    argv = ("generate", str(export), "a cat", *GENERATE, "-o", str(work / path), *more)
    message = "^sdtrt: error: " + re.escape(f"cannot write {named}: ") + ".*" + says
    assert_one_clear_error(BadInput(name, argv, message), tmp_path, watch=[tmp_path])
    assert "denoise" not in runs[-1].stderr  # the check came before the pipeline, not after every step
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(work / "pipe.png").st_mode)
    assert (work / "link.png").is_symlink()


# --- sdtrt serve: where it listens and what the environment says, before any model loads -------------


SERVE_CASES = [  # name, arguments after the export folder, environment, the one line's regex
    ("a port above 65535", ("--port", "99999"), {}, r"^sdtrt: error: --port 99999 is not a TCP port \(1 to 65535\)$"),
    ("port 0", ("--port", "0"), {}, r"^sdtrt: error: --port 0 is not a TCP port"),
    ("a host that is no address", ("--host", "256.1.1.1"), {}, r"^sdtrt: error: --host 256\.1\.1\.1: not an address"),
    ("a host of another machine", ("--host", "192.0.2.1"), {}, r"^sdtrt: error: cannot listen on 192\.0\.2\.1:7860: "),
    (
        "an API key with a newline",
        (),
        {"SDTRT_API_KEY": "abc\ndef"},
        r"^sdtrt: error: SDTRT_API_KEY must be printable ASCII without spaces",
    ),
]


@pytest.mark.parametrize(("name", "args", "env", "message"), SERVE_CASES, ids=[case[0] for case in SERVE_CASES])
def test_serve_refuses_where_it_cannot_listen_in_one_line(
    export: Path, tmp_path: Path, name: str, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    assert_one_clear_error(BadInput(name, ("serve", str(export), *args), message, env=env), tmp_path, watch=[tmp_path])


def test_serve_refuses_a_port_in_use(export: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = rf"^sdtrt: error: cannot listen on 127\.0\.0\.1:{port}: Address already in use$"
        case = BadInput("a port in use", ("serve", str(export), "--port", str(port)), message)
        assert_one_clear_error(case, tmp_path, watch=[tmp_path])


# --- paths with spaces, accents and emoji ---------------------------------------------------------------


def test_a_folder_of_spaces_accents_and_emoji_exports_and_draws_on_openvino(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Export, generate on OpenVINO (its IR and compiled-model caches in the export, the page-out thread reading
    /proc/self/maps) and verify, in a folder whose name is not ASCII: no traceback from any thread.
    (tests/test_pageout.py reads such a name under the C locale too.)"""
    folder = tmp_path / "my exports ü 🙂" / "tiny sd"
    picture = folder.parent / "cät 🐈.png"
    steps = [
        ["export", str(tiny_model_dir), "--out", str(folder), "-q"],
        ["generate", str(folder), "a cat", *GENERATE, "--backend", "openvino", "-q", "-o", str(picture)],
        ["verify", str(folder)],
    ]
    for argv in steps:
        done = run_cli(argv, tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"{argv[0]}: {done.stderr}"
    assert picture.is_file() and (folder / "openvino").is_dir()


def test_an_openvino_cache_that_takes_no_files_is_one_line_naming_the_variable(export: Path, tmp_path: Path) -> None:
    message = r"^sdtrt: error: SDTRT_OPENVINO_CACHE=/proc: cannot make files in that folder \(.*\); name a writable"
    argv = ("generate", str(export), "a cat", *GENERATE, "--backend", "openvino", "-q", "-o", str(tmp_path / "cat.png"))
    case = BadInput("SDTRT_OPENVINO_CACHE=/proc", argv, message, env={"SDTRT_OPENVINO_CACHE": "/proc"})
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])


# --- sdtrt demo: what it is given is checked before it exports -----------------------------------------


@pytest.mark.parametrize(
    ("name", "given", "says"), [("missing", "missing.png", "no such file"), ("no image", "notes.txt", "not an image")]
)
def test_demo_checks_its_map_before_exporting(tmp_path: Path, name: str, given: str, says: str) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    root = tmp_path / "demo"
    message = rf"^sdtrt: error: --map {re.escape(given)}: {says}"
    case = BadInput(f"--map {name}", ("demo", "--root", str(root), "--map", given), message)
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])
    assert not root.exists()  # nothing exported first


# --- --debug ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_chained_traceback(export: Path, tmp_path: Path, where: str) -> None:
    truncated = export / "unet.onnx"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    manifest = json.loads((export / "manifest.json").read_text())
    for component in manifest["components"].values():
        for file in component["files"].values():
            del file["size"], file["data_size"]  # a manifest of before sizes were recorded: the session finds it
    (export / "manifest.json").write_text(json.dumps(manifest))
    argv = ["generate", str(export), "a cat", *GENERATE, "-q", "--backend", "ort-cpu"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    result = run_cli(argv, tmp_path)
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first.startswith(f"sdtrt: error: ort-cpu cannot load {truncated}: ")
    traceback = "\n".join(rest)
    assert traceback.startswith("Traceback (most recent call last):")
    assert "InvalidProtobuf" in traceback  # ONNX Runtime's own exception, the cause
    assert "The above exception was the direct cause of the following exception" in traceback
    assert traceback.rstrip().splitlines()[-1].startswith("sdtrt.engine.errors.ManifestError: ")

    without = run_cli([a for a in argv if a != "--debug"], tmp_path)
    assert without.returncode == 2 and without.stderr == first + "\n"  # the same line, no traceback
