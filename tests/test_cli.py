"""The command line: export, info, generate, demo and their errors, run as a user runs them."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.cli import main


def _sdtrt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtrt", *args], capture_output=True, text=True, cwd=cwd)


def test_help_names_every_command() -> None:
    result = _sdtrt("--help")
    assert result.returncode == 0
    for command in ("export", "generate", "info", "verify", "demo"):
        assert command in result.stdout
    assert "--debug" in result.stdout
    generate_help = _sdtrt("generate", "--help").stdout
    for option in ("--steps", "--seed", "--scheduler", "--guidance", "--negative", "--height", "--num-images"):
        assert option in generate_help


def test_generate_writes_pngs(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pics" / "cat.png"
    code = main(
        [
            "-q",
            "generate",
            str(tiny_export),
            "a cat",
            "-o",
            str(out),
            "--steps",
            "3",
            "--seed",
            "9",
            "--num-images",
            "2",
            "--height",
            "128",
            "--width",
            "64",
            "--scheduler",
            "euler",
        ]
    )
    assert code == 0
    paths = [tmp_path / "pics" / "cat-0.png", tmp_path / "pics" / "cat-1.png"]
    assert sorted(p for p in (tmp_path / "pics").iterdir()) == paths
    assert Image.open(paths[0]).size == (64, 128)
    printed = capsys.readouterr().out
    assert "seed 9" in printed and "unet" in printed and "vae_decode" in printed

    single = tmp_path / "one.png"
    assert (
        main(
            [
                "-q",
                "generate",
                str(tiny_export),
                "a cat",
                "-o",
                str(single),
                "--steps",
                "3",
                "--seed",
                "9",
                "--num-images",
                "2",
                "--height",
                "128",
                "--width",
                "64",
                "--scheduler",
                "euler",
            ]
        )
        == 0
    )
    assert not single.exists()  # two images are numbered
    assert (
        main(
            [
                "-q",
                "generate",
                str(tiny_export),
                "a cat",
                "-o",
                str(single),
                "--steps",
                "3",
                "--seed",
                "9",
                "--height",
                "128",
                "--width",
                "64",
                "--scheduler",
                "euler",
            ]
        )
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(paths[0])))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "100"], "height 100 is not divisible by 8"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--guidance", "-2"], "guidance_scale must be a finite number >= 0"),
    ],
)
def test_generate_bad_input_is_one_line(tiny_export: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "x.png"
    result = _sdtrt("-q", "generate", str(tiny_export), "a cat", "-o", str(out), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdtrt: error: {message}")
    assert not out.exists()


def test_bad_options_are_refused_before_the_model_loads(tiny_export: Path, tmp_path: Path) -> None:
    """Without -q too: options every task shares are checked before the backend is chosen (whose INFO line would
    come first), and no progress bar starts before the model's own checks (sizes) pass."""
    shared = _sdtrt("generate", str(tiny_export), "a cat", "-o", str(tmp_path / "x.png"), "--steps", "0")
    assert shared.returncode == 2
    assert shared.stderr.strip().splitlines() == ["sdtrt: error: num_inference_steps must be an integer >= 1, got 0"]
    size = _sdtrt("generate", str(tiny_export), "a cat", "-o", str(tmp_path / "x.png"), "--height", "100")
    assert size.returncode == 2 and "denoise" not in size.stderr
    assert size.stderr.strip().splitlines()[-1] == "sdtrt: error: height 100 is not divisible by 8"


def test_unknown_scheduler_and_missing_folder(tmp_path: Path) -> None:
    result = _sdtrt("generate", str(tmp_path / "nothing"), "a cat", "--scheduler", "heun++")
    assert result.returncode == 2 and "invalid choice: 'heun++'" in result.stderr
    result = _sdtrt("generate", str(tmp_path / "nothing"), "a cat")
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"sdtrt: error: no artifact folder at {tmp_path / 'nothing'} "
        f"(create one with: sdtrt export MODEL --out {tmp_path / 'nothing'})"
    )


def test_info(tiny_export: Path) -> None:
    result = _sdtrt("info", str(tiny_export))
    assert result.returncode == 0, result.stderr
    assert "sd1" in result.stdout and "multiples of 16" in result.stdout
    assert "unet: fp16: unet.fp16.onnx" in result.stdout and "batch 1/2/8" in result.stdout


@pytest.mark.parametrize(
    ("command", "summary"),
    [
        ("export", "Export a diffusers model"),
        ("generate", "Draw a prompt"),
        ("img2img", "Transform an image"),
        ("inpaint", "Repaint the white part"),
        ("outpaint", "Extend an image"),
        ("upscale", "4x super-resolution"),
        ("info", "Describe an artifact folder"),
        ("verify", "Check an artifact folder's files"),
        ("build", "Build TensorRT engines"),
        ("demo", "Export the embedded demo model"),
    ],
)
def test_each_command_help_says_what_it_does(command: str, summary: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert summary in text and "--quiet" in text and "--debug" in text
    positionals = text.partition("positional arguments:\n")[2].split("\n\n")[0]  # demo: none
    for line in positionals.splitlines():  # each positional has its help on its line: "  NAME   help"
        assert len(line.split(maxsplit=1)) == 2, line


def test_quiet_and_verbose_before_or_after_the_command(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    logger = logging.getLogger("sdtrt")
    for args, level in [
        (["info", str(tiny_export)], logging.INFO),
        (["-q", "info", str(tiny_export)], logging.WARNING),
        (["info", str(tiny_export), "-q"], logging.WARNING),
        (["info", "--quiet", str(tiny_export)], logging.WARNING),
        (["-v", "info", str(tiny_export)], logging.DEBUG),
        (["info", str(tiny_export), "--verbose"], logging.DEBUG),
        (["-q", "info", str(tiny_export), "-v"], logging.DEBUG),
    ]:
        assert main(args) == 0, args
        assert logger.level == level, args
    capsys.readouterr()
    out = tmp_path / "quiet.png"
    assert main(["generate", str(tiny_export), "a cat", "--steps", "2", "--seed", "1", "-o", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "seed 1" in captured.out
    assert "denoise" not in captured.err  # no progress bar


def test_info_prints_the_default_tensorrt_profile_of_an_fp16_export(
    tiny_export: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["info", str(tiny_export)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the tiny model is 256 px: `sdtrt build` defaults to half to twice that, 1-4 images, CFG doubling the UNet batch
    profile = f"TensorRT default profile (sdtrt build {tiny_export}): dynamic 128-512 x 128-512 px, batch 1-4"
    assert profile in lines
    after = lines[lines.index(profile) + 1 :]
    assert "  unet: min/opt/max batch 1/2/8, latent_height 16/32/64, latent_width 16/32/64" in after
    assert "  text_encoder: min/opt/max batch 1/1/8" in after
    assert "  vae_decoder: min/opt/max batch 1/1/4, latent_height 16/32/64, latent_width 16/32/64" in after
    assert "  vae_encoder: min/opt/max batch 1/1/4, height 128/256/512, width 128/256/512" in after


def test_info_of_an_fp32_export_prints_tensorrt_lines_only_with_engines(
    tiny_upscaler_export: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["info", str(tiny_upscaler_export)]) == 0
    printed = capsys.readouterr().out
    assert "upscaler" in printed and "unet: fp32: unet.onnx" in printed
    assert "TensorRT" not in printed and "min/opt/max" not in printed
    assert main(["info", str(tiny_upscaler_export), "--engines"]) == 0
    with_engines = capsys.readouterr().out
    assert with_engines.startswith(printed)  # the same lines, then the profile
    assert (
        f"TensorRT default profile (sdtrt build {tiny_upscaler_export} --precision fp32; no fp16 variants here): "
        "dynamic 64-256 x 64-256 px, batch 1-4\n  text_encoder: min/opt/max batch 1/1/8\n"
    ) in with_engines
    assert "  unet: min/opt/max batch 1/2/8, latent_height 16/32/64, latent_width 16/32/64" in with_engines


def test_export_command(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = _sdtrt("-q", "export", str(tiny_model_dir), "--out", str(out), "--components", "vae_decoder")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer", "vae_decoder.onnx"]
    again = _sdtrt("-q", "export", str(tiny_model_dir), "--out", str(out))
    assert again.returncode == 2 and "already exists (use --overwrite" in again.stderr


def test_demo(tmp_path: Path) -> None:
    result = _sdtrt("demo", "--root", str(tmp_path / "demo"), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "demo.png").is_file()
    assert f"wrote {tmp_path / 'demo' / 'demo.png'}" in result.stdout
    assert "text_encoder" in result.stdout and "total" in result.stdout


def _picture(path: Path, size: tuple[int, int] = (128, 128), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def test_image_commands(tiny_export: Path, tiny_upscaler_export: Path, tmp_path: Path) -> None:
    image = _picture(tmp_path / "in.png")
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((64, 64), 255, np.uint8), 32)).save(mask)
    common = ["--steps", "2", "--seed", "1"]
    runs = {
        "img2img": (["img2img", str(tiny_export), str(image), "a cat", "--strength", "0.5"], (128, 128)),
        "inpaint": (["inpaint", str(tiny_export), str(image), str(mask), "a cat", "--mask-blur", "4"], (128, 128)),
        "outpaint": (["outpaint", str(tiny_export), str(image), "a cat", "--left", "32", "--bottom", "16"], (160, 144)),
        "upscale": (
            ["upscale", str(tiny_upscaler_export), _picture(tmp_path / "small.png", (24, 16)), "a cat"],
            (96, 64),
        ),
    }
    for name, (args, size) in runs.items():
        out = tmp_path / f"{name}.png"
        assert main(["-q", *map(str, args), "-o", str(out), *common]) == 0, name
        assert Image.open(out).size == size, name


def test_image_command_errors(tiny_export: Path, tmp_path: Path) -> None:
    small = _picture(tmp_path / "small.png", size=(8, 8))  # (RGBA is drawn: composited over white)
    result = _sdtrt("img2img", str(tiny_export), str(small), "a cat", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "image 8x8 is smaller than this model's size step" in result.stderr
    result = _sdtrt("img2img", str(tiny_export), str(tmp_path / "missing.png"), "a cat")
    assert result.returncode == 2 and "cannot read image" in result.stderr
    result = _sdtrt("outpaint", str(tiny_export), str(_picture(tmp_path / "in.png")), "a cat")
    assert result.returncode == 2 and "needs an extension > 0" in result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out.png").exists()


def test_output_path_errors_are_one_line(tiny_export: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file")
    runs = [
        ("generate", str(tiny_export), "a cat", "--steps", "2", "-o", str(tmp_path)),  # a folder
        ("generate", str(tiny_export), "a cat", "--steps", "2", "-o", str(tmp_path / "file" / "x.png")),
        ("export", str(tiny_model_dir), "--out", "/proc/sdtrt-test", "--components", "vae_decoder"),
    ]
    for args in runs:
        result = _sdtrt("-q", *args)
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sdtrt: error: "), (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_demo_re_exports_a_manifest_of_another_format(tmp_path: Path) -> None:
    from sdtrt.engine.manifest import load_manifest

    export_dir = tmp_path / "demo" / "tiny-sd-onnx"
    export_dir.mkdir(parents=True)
    # an sdtrt manifest (--overwrite replaces only those) of a format this sdtrt does not read
    (export_dir / "manifest.json").write_text('{"format_version": 999, "family": "sd1", "components": {}}')
    assert main(["-q", "demo", "--root", str(tmp_path / "demo"), "--steps", "2"]) == 0
    assert load_manifest(export_dir).components  # the current format again
    assert (tmp_path / "demo" / "demo.png").is_file()


def test_demo_map_draws_where_the_map_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sdtrt demo --map`: the demo ControlNet is attached once, and the shape lands on the map's region."""
    from sdtrt.demo import demo_maps
    from sdtrt.engine.manifest import load_manifest
    from train import shapes

    root = tmp_path / "demo"
    for name in ("square-bottom-right", "circle-top-left"):
        assert main(["-q", "demo", "--root", str(root), "--map", name]) == 0
        drawn = np.asarray(Image.open(root / "demo-map.png").convert("RGB"))
        _, region = shapes.read_map(np.asarray(Image.open(demo_maps()[name]).convert("RGB")))
        ys, xs = np.nonzero(region)
        centroid = shapes.shape_centroid(drawn)
        assert centroid is not None and np.hypot(centroid[0] - xs.mean() - 0.5, centroid[1] - ys.mean() - 0.5) <= 6
    assert list(load_manifest(root / "tiny-sd-onnx").controlnets) == ["map"]
    assert main(["-q", "demo", "--root", str(root), "--map", "nosuch"]) == 2
    assert "--map nosuch: no such file, and no example map of that name" in capsys.readouterr().err
    assert main(["-q", "demo", "--root", str(root), "--map", "examples", "--grid"]) == 2


def test_demo_tiny_vae_attaches_it_once_and_draws_the_prompt(demo_export: Path, tmp_path: Path) -> None:
    """`sdtrt demo --tiny-vae`: the shipped tiny VAE is attached to the demo's current export (once), and its picture
    is the demo prompt's, read as the full VAE's picture of the same seed is."""
    import shutil

    from sdtrt.demo import DEMO_PROMPT, demo_tiny_vae_dir
    from sdtrt.engine.fsutil import sha256_tree
    from sdtrt.engine.manifest import load_manifest
    from train import shapes

    root = tmp_path / "demo"
    export = shutil.copytree(demo_export, root / "tiny-sd-onnx")  # the demo's own export, up to date
    assert main(["-q", "demo", "--root", str(root), "--tiny-vae"]) == 0
    tiny = np.asarray(Image.open(root / "demo.png").convert("RGB"))
    assert load_manifest(export).tiny_vae["source"]["sha256"] == sha256_tree(demo_tiny_vae_dir())
    attached_at = (export / "manifest.json").stat().st_mtime_ns
    assert main(["-q", "demo", "--root", str(root), "--tiny-vae"]) == 0  # attached already: not again
    assert np.array_equal(np.asarray(Image.open(root / "demo.png").convert("RGB")), tiny)
    (root / "demo.png").unlink()
    assert main(["-q", "demo", "--root", str(root)]) == 0  # without the flag: the full VAE
    assert (export / "manifest.json").stat().st_mtime_ns == attached_at
    full = np.asarray(Image.open(root / "demo.png").convert("RGB"))
    assert tiny.shape == full.shape == (64, 64, 3) and not np.array_equal(tiny, full)
    assert shapes.dominant_colours(tiny) == shapes.dominant_colours(full) == ("yellow", "blue"), DEMO_PROMPT
    assert shapes.shape_position(tiny) == shapes.shape_position(full) == "top left"


def test_an_unexpected_error_is_one_line_and_debug_adds_its_traceback(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(folder: object) -> None:
        try:
            {}["key"]
        except KeyError as exc:
            raise RuntimeError("something inside broke") from exc

    monkeypatch.setattr("sdtrt.engine.manifest.load_manifest", broken)
    assert main(["info", str(tiny_export)]) == 1
    err = capsys.readouterr().err
    bug = "(a bug in sdtrt: run with --debug for details)"
    assert err == f"sdtrt: error: unexpected RuntimeError: something inside broke {bug}\n"
    for args in (["--debug", "info", str(tiny_export)], ["info", str(tiny_export), "--debug"]):
        assert main(args) == 1
        first, *traceback = capsys.readouterr().err.splitlines()
        assert first == err.strip()
        assert traceback[0] == "Traceback (most recent call last):" and "KeyError: 'key'" in traceback
        assert "The above exception was the direct cause of the following exception:" in traceback
        assert traceback[-1] == "RuntimeError: something inside broke"


def test_verify_and_debug_in_process(tiny_export: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tiny_export), "--debug"]) == 0
    assert capsys.readouterr().out == f"{tiny_export}: ok (20 files)\n"
