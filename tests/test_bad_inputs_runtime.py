"""The runtime's bad inputs: each is refused up front in one line, or converted as a user expects.

CASES is the Python API's table: one row per case, the call and a regex for the one-line error
(InvalidInputError unless the row says otherwise). CLI_CASES run the command line in a fresh interpreter
(tests/bad_input.py). The rest check what is now accepted (NumPy scalars, image modes, big photos) and
what no table row can reach: the environment, allocation failures, a network's non-finite output.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bad_input import BadInput, assert_one_clear_error
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
from PIL import Image

from sdtrt.engine.errors import InvalidInputError, SdtrtError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import Request

PROMPT = "a red circle"
FAST = {"num_inference_steps": 1, "height": 128, "width": 128}  # the tiny model's cheapest request
QUIET = ("-q", "--backend", "ort-cpu")  # -q: no INFO line ("backend ort-cpu ...") beside the one under test
NAN = float("nan")


@dataclass(frozen=True)
class Pipes:
    """The module's pipelines, each loaded once: the tiny SD 1.x model and the tiny x4 upscaler."""

    sd: Pipeline
    upscaler: Pipeline


@pytest.fixture(scope="module")
def pipes(tiny_export: Path, tiny_upscaler_export: Path) -> Pipes:
    with Pipeline.load(tiny_export, backend="ort-cpu") as sd, Pipeline.load(tiny_upscaler_export, "ort-cpu") as up:
        yield Pipes(sd, up)


def _photo(height: int = 128, width: int = 128, mode: str = "RGB") -> Image.Image:
    """A smooth gradient picture of ``mode``."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 96)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


def _nan_image(height: int = 64, width: int = 64) -> np.ndarray:
    array = np.full((height, width, 3), 0.5, np.float32)
    array[3, 5, 1] = NAN
    return array


class WrongShape:
    def standard_normal(self, size: Any, dtype: Any) -> np.ndarray:
        return np.zeros((1, 4), np.float32)


class Integers:
    def standard_normal(self, size: Any, dtype: Any) -> np.ndarray:
        return np.zeros(size, np.int64)


class NotFinite:
    def standard_normal(self, size: Any, dtype: Any) -> np.ndarray:
        return np.full(size, np.inf, np.float32)


def _latents(value: float = 0.0, shape: tuple[int, ...] = (1, 4, 16, 16)) -> np.ndarray:
    latents = np.zeros(shape, np.float32)
    latents[0, 0, 0, 0] = value
    return latents


Call = Callable[[Pipes], object]
CASES: list[tuple[str, Call, str]] = [
    # 3. the step range: 1 ... num_train_timesteps
    (
        "1001 steps",
        lambda p: p.sd.txt2img(PROMPT, **{**FAST, "num_inference_steps": 1001}),
        r"from 1 to 1000, got 1001$",
    ),
    # 4. sizes and counts above the ceiling (2 x the tiny model's native 256 px; 16 images)
    (
        "height 65536",
        lambda p: p.sd.txt2img(PROMPT, num_inference_steps=1, height=65536),
        r"^height 65536 is above the ceiling of 512 pixels per side \(the default: twice this model's native 256 px\): "
        r"ask for less, or raise it with Pipeline.load\(..., max_side=N\) or SDTRT_MAX_SIDE=N if memory allows$",
    ),
    (
        "10**6 images",
        lambda p: p.sd.txt2img(PROMPT, **FAST, num_images=10**6),
        r"^1000000 images in one request \(1 prompt\(s\) x num_images 1000000\) is above the ceiling of 16 "
        r"\(the default\): ask for fewer, or raise it with Pipeline.load\(..., max_images=N\) or SDTRT_MAX_IMAGES=N",
    ),
    ("17 prompts", lambda p: p.sd.txt2img([PROMPT] * 17, **FAST), r"^17 images in one request \(17 prompt"),
    (
        "img2img width 4096",
        lambda p: p.sd.img2img(PROMPT, _photo(), width=4096, num_inference_steps=1),
        r"^width 4096 is above the ceiling of 512",
    ),
    (
        "outpaint past the ceiling",
        lambda p: p.sd.outpaint(PROMPT, _photo(480, 480), left=128, num_inference_steps=1),
        r"^width 608 is above the ceiling of 512",
    ),
    (
        "upscale 4096 px out",
        lambda p: p.upscaler.upscale(PROMPT, _photo(1024, 1024), num_inference_steps=1),
        r"^upscale output height 4096 is above the ceiling of 1024 pixels per side "
        r"\(the default: inputs up to twice its native 128 px\)",
    ),
    (
        "max_side 0",
        lambda p: Pipeline.load(p.sd.artifact.folder, "ort-cpu", max_side=0),
        r"^max_side must be an integer >= 1, got 0$",
    ),
    (
        "max_images True",
        lambda p: Pipeline.load(p.sd.artifact.folder, "ort-cpu", max_images=True),
        r"^max_images must be an integer >= 1, got True$",
    ),
    # 5. non-finite inputs
    (
        "NaN latents",
        lambda p: p.sd.txt2img(PROMPT, **FAST, latents=_latents(NAN)),
        r"^latents hold NaN or inf: pass finite values$",
    ),
    (
        "inf second-stage latents",
        lambda p: p.sd.img2img(PROMPT, _latents(np.inf), denoising_start=0.5, num_inference_steps=2),
        r"^latents hold NaN or inf",
    ),
    (
        "string latents",
        lambda p: p.sd.txt2img(PROMPT, **FAST, latents=np.full((1, 4, 16, 16), "x")),
        r"^latents must hold numbers, not <U1$",
    ),
    (
        "NaN img2img image",
        lambda p: p.sd.img2img(PROMPT, _nan_image(), num_inference_steps=1),
        r"^image array holds NaN or inf: pass finite values in \[0, 1\]$",
    ),
    (
        "NaN inpaint image",
        lambda p: p.sd.inpaint(PROMPT, _nan_image(), np.ones((64, 64), bool), num_inference_steps=1),
        r"^image array holds NaN",
    ),
    (
        "NaN mask",
        lambda p: p.sd.inpaint(PROMPT, _photo(64, 64), _nan_image()[..., 1], num_inference_steps=1),
        r"^mask array holds NaN or inf",
    ),
    (
        "NaN upscale image",
        lambda p: p.upscaler.upscale(PROMPT, _nan_image(32, 32), num_inference_steps=1),
        r"^image array holds NaN",
    ),
    (
        "NaN outpaint image",
        lambda p: p.sd.outpaint(PROMPT, _nan_image(), left=16, num_inference_steps=1),
        r"^image array holds NaN",
    ),
    # 10. the smaller ones
    (
        "dict prompt",
        lambda p: p.sd.txt2img({"a": 1}, **FAST),
        r"^prompt must be a string or a non-empty list of strings, got \{'a': 1\}$",
    ),
    (
        "set of prompts",
        lambda p: p.sd.txt2img({"a cat"}, **FAST),
        r"^prompt must be a string or a non-empty list of strings",
    ),
    (
        "outpaint left=True",
        lambda p: p.sd.outpaint(PROMPT, _photo(), left=True, num_inference_steps=1),
        r"^left must be an integer >= 0, got True$",
    ),
    (
        "upscale noise_level=True",
        lambda p: p.upscaler.upscale(PROMPT, _photo(32, 32), noise_level=True),
        r"^noise_level must be an integer from 0 to 350, got True$",
    ),
    (
        "seed=True",
        lambda p: p.sd.txt2img(PROMPT, **FAST, seed=True),
        r"^seed must be an integer in \[0, 2\*\*64\), got True$",
    ),
    (
        "steps np.bool_",
        lambda p: p.sd.txt2img(PROMPT, **{**FAST, "num_inference_steps": np.True_}),
        r"^num_inference_steps must be an integer >= 1",
    ),
    (
        "guidance np.float32 NaN",
        lambda p: p.sd.txt2img(PROMPT, **FAST, guidance_scale=np.float32(NAN)),
        r"^guidance_scale must be a finite number >= 0",
    ),
    (
        "strength np.float32 1.5",
        lambda p: p.sd.img2img(PROMPT, _photo(), strength=np.float32(1.5)),
        r"^strength must be a number from 0 to 1",
    ),
    (
        "rng without standard_normal",
        lambda p: p.sd.txt2img(PROMPT, **FAST, rng=object()),
        r"^rng must have NumPy's standard_normal\(size, dtype\), as numpy.random.default_rng\(\) does; got object$",
    ),
    (
        "rng of the wrong shape",
        lambda p: p.sd.txt2img(PROMPT, **FAST, rng=WrongShape()),
        r"^rng.standard_normal\(\(1, 4, 16, 16\), dtype=float32\) returned float32 \(1, 4\): "
        r"it must return finite floats of that shape$",
    ),
    ("rng of integers", lambda p: p.sd.txt2img(PROMPT, **FAST, rng=Integers()), r"returned int64 \(1, 4, 16, 16\)"),
    ("rng of inf", lambda p: p.sd.txt2img(PROMPT, **FAST, rng=NotFinite()), r"returned NaN or inf"),
    ("rng not a generator", lambda p: p.sd.txt2img(PROMPT, **FAST, rng=np.random), r"rng.standard_normal\(.*\) failed"),
    (
        "Pipeline.load(None)",
        lambda p: Pipeline.load(None),
        r"^Pipeline.load takes an artifact folder's path, got None$",
    ),
    (
        "Pipeline.load keyword",
        lambda p: Pipeline.load(p.sd.artifact.folder, bakend="ort-cpu"),
        r"^Pipeline.load has no option 'bakend' \(options: backend, precision, max_side, max_images\)$",
    ),
    ("task keyword", lambda p: p.sd.txt2img(PROMPT, **FAST, sed=1), r"^txt2img has no option 'sed'"),
    (
        "run without a Request",
        lambda p: p.sd.run("txt2img", PROMPT),
        r"^run takes a Request \(sdtrt.runtime.request\), got str$",
    ),
    (
        "scheduler list",
        lambda p: p.sd.txt2img(PROMPT, **FAST, scheduler=["ddim"]),
        r"^scheduler must be a scheduler's name, got \['ddim'\]$",
    ),
    (
        "lcm on a non-LCM model",
        lambda p: p.sd.txt2img(PROMPT, **FAST, scheduler="lcm"),
        r"^scheduler 'lcm' needs an LCM-distilled model, whose UNet takes the guidance scale as its timestep_cond "
        r"input; this model's UNet has none: pick another scheduler$",
    ),
    # 7. per-image levers: step caching and the tiny VAE (tests/test_step_cache.py, tests/test_tiny_vae.py)
    (
        "cache_interval 0",
        lambda p: p.sd.txt2img(PROMPT, **FAST, cache_interval=0),
        r"^cache_interval must be an integer from 1 \(no caching\) to 1000, got 0$",
    ),
    ("cache_interval -3", lambda p: p.sd.txt2img(PROMPT, **FAST, cache_interval=-3), r"^cache_interval must be"),
    ("cache_interval 2**64", lambda p: p.sd.txt2img(PROMPT, **FAST, cache_interval=2**64), r"got 1844674\d+$"),
    ("cache_interval '3'", lambda p: p.sd.txt2img(PROMPT, **FAST, cache_interval="3"), r"^cache_interval must be"),
    (
        "cache_interval without the graphs",
        lambda p: p.sd.txt2img(PROMPT, num_inference_steps=2, cache_interval=2),
        r"^cache_interval 2 needs the step-cache graphs, which .* has none of: attach them with `sdtrt add-step-cache ",
    ),
    ("vae 'TINY'", lambda p: p.sd.txt2img(PROMPT, **FAST, vae="TINY"), r"^vae must be one of 'full', 'tiny', got 'TIN"),
    (
        "tiny vae without one",
        lambda p: p.sd.txt2img(PROMPT, **FAST, vae="tiny"),
        r"^vae='tiny' needs a tiny VAE, which .* has none of: attach one with `sdtrt add-tiny-vae ",
    ),
    (
        "a lone surrogate in the prompt",
        lambda p: p.sd.txt2img("a \ud800 cat", **FAST),
        r"^a prompt is not valid text: it holds '\\ud800' at character 2 \(a lone UTF-16 surrogate",
    ),
    (
        "a lone surrogate in the negative prompt",
        lambda p: p.sd.txt2img(PROMPT, **FAST, negative_prompt="\udcff"),
        r"^a prompt is not valid text: it holds '\\udcff' at character 0",
    ),
    (
        "RGBA array",
        lambda p: p.sd.img2img(PROMPT, np.zeros((64, 64, 4), np.uint8)),
        r"^image array must be \(H, W\) or \(H, W, 3\) of uint8, bool or floats in \[0, 1\]; got uint8 \(64, 64, 4\)$",
    ),
]


@pytest.mark.parametrize(("name", "call", "message"), CASES, ids=[case[0] for case in CASES])
def test_python_api_refuses_in_one_line(pipes: Pipes, name: str, call: Call, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as error:
        call(pipes)
    assert "\n" not in str(error.value), name


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An RGBA PNG (half transparent) and a 16-bit greyscale PNG."""
    folder = tmp_path_factory.mktemp("images")
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, np.linspace(0, 255, 128, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode == "I;16"
    return {"rgba": folder / "rgba.png", "grey16": folder / "grey16.png"}


GENERATE = ("--steps", "1", "--height", "128", "--width", "128", *QUIET)
IMG2IMG = ("--steps", "2", "--strength", "0.5", *QUIET)
CLI_CASES = [  # name, argv after the export folder (IMAGE: the named image), exit code, the one line's regex
    (
        "--height 65536",
        ("generate", "a cat", "--steps", "1", "--height", "65536", *QUIET),
        2,
        r"^sdtrt: error: height 65536 is above the ceiling of 512 pixels per side",
    ),
    (
        "--num-images 10**6",
        ("generate", "a cat", *GENERATE, "--num-images", "1000000"),
        2,
        r"^sdtrt: error: 1000000 images in one request",
    ),
    (
        "--steps 1001",
        ("generate", "a cat", *GENERATE, "--steps", "1001"),
        2,
        r"^sdtrt: error: num_inference_steps must be an integer from 1 to 1000, got 1001$",
    ),
    (
        "SDTRT_MAX_SIDE=128",
        ("generate", "a cat", "--steps", "1", *QUIET),
        2,
        r"^sdtrt: error: height 256 is above the ceiling of 128 pixels per side \(SDTRT_MAX_SIDE=128\)",
    ),
    (
        "SDTRT_MAX_IMAGES=x",
        ("generate", "a cat", *GENERATE),
        2,
        r"^sdtrt: error: SDTRT_MAX_IMAGES must be an integer >= 1, got 'x'$",
    ),
    (
        "--scheduler lcm",
        ("generate", "a cat", *GENERATE, "--scheduler", "lcm"),
        2,
        r"^sdtrt: error: scheduler 'lcm' needs an LCM-distilled model",
    ),
    (
        "SDTRT_NUM_THREADS=abc",
        ("generate", "a cat", *GENERATE),
        2,
        r"^sdtrt: error: SDTRT_NUM_THREADS must be an integer >= 1 \(the CPU threads to use\), got 'abc'$",
    ),
    (
        "a prompt of bytes that are not UTF-8",
        ("generate", os.fsdecode(b"a \xff cat"), *GENERATE),
        2,
        r"^sdtrt: error: a prompt is not valid text: it holds '\\udcff' at character 2",
    ),
    (
        "--cache-interval 0",
        ("generate", "a cat", *GENERATE, "--cache-interval", "0"),
        2,
        r"^sdtrt: error: cache_interval must be an integer from 1 \(no caching\) to 1000, got 0$",
    ),
    (
        "--tiny-vae without one",
        ("generate", "a cat", *GENERATE, "--tiny-vae"),
        2,
        r"^sdtrt: error: vae='tiny' needs a tiny VAE, which .* has none of: attach one with `sdtrt add-tiny-vae ",
    ),
    (
        "RGBA PNG",
        ("img2img", "rgba", "a cat", *IMG2IMG),
        0,
        r"^sdtrt.runtime.image: image rgba.png is RGBA: its transparent pixels are composited over white$",
    ),
    (
        "16-bit grey PNG",
        ("img2img", "grey16", "a cat", *IMG2IMG),
        0,
        r"^sdtrt.runtime.image: image grey16.png is I;16: converted to 8-bit RGB$",
    ),
]
CLI_ENV = {
    "SDTRT_MAX_SIDE=128": {"SDTRT_MAX_SIDE": "128"},
    "SDTRT_MAX_IMAGES=x": {"SDTRT_MAX_IMAGES": "x"},
    "SDTRT_NUM_THREADS=abc": {"SDTRT_NUM_THREADS": "abc"},
}


@pytest.mark.parametrize(("name", "argv", "code", "message"), CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_one_line(
    tiny_export: Path, images: dict[str, Path], tmp_path: Path, name: str, argv: tuple, code: int, message: str
) -> None:
    command, *rest = (str(images.get(arg, arg)) for arg in argv)
    out = tmp_path / "out" / "cat.png"
    out.parent.mkdir()
    case = BadInput(name, (command, str(tiny_export), *rest, "-o", str(out)), message, code, CLI_ENV.get(name, {}))
    watch = [tmp_path / "out"] if code else [images["rgba"].parent]  # a refusal writes nothing; a success no input
    assert_one_clear_error(case, tmp_path, watch=watch)
    assert out.exists() == (code == 0)


# --- what is accepted now -----------------------------------------------------------------------------


def test_numpy_scalars_are_numbers(pipes: Pipes) -> None:
    plain = pipes.sd.txt2img(PROMPT, num_inference_steps=2, seed=3, height=128, width=128, guidance_scale=7.5)
    numpy = pipes.sd.txt2img(
        PROMPT,
        num_inference_steps=np.int64(2),
        seed=np.uint64(3),
        height=np.int32(128),
        width=np.int64(128),
        num_images=np.int8(1),
        guidance_scale=np.float32(7.5),
    )
    np.testing.assert_array_equal(numpy.latents, plain.latents)
    photo = _photo()
    a = pipes.sd.img2img(PROMPT, photo, strength=0.5, num_inference_steps=np.int64(2), seed=1)
    b = pipes.sd.img2img(PROMPT, photo, strength=np.float32(0.5), num_inference_steps=2, seed=np.int64(1))
    np.testing.assert_array_equal(a.latents, b.latents)
    extended = pipes.sd.outpaint(PROMPT, _photo(64, 64), left=np.int64(16), overlap=np.int32(8), num_inference_steps=1)
    assert extended.images[0].size == (80, 64)
    checked = Request(PROMPT, num_inference_steps=np.int64(4), guidance_scale=np.float32(2)).checked("txt2img")
    assert type(checked.num_inference_steps) is int and type(checked.guidance_scale) is float


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK"])
def test_image_modes_are_converted(pipes: Pipes, mode: str) -> None:
    """Any mode a file or PIL image may have becomes RGB: transparency composited over white."""
    photo = _photo()
    if mode in ("RGBA", "LA"):
        image = photo.convert(mode)
        image.putalpha(Image.linear_gradient("L").resize(photo.size))
        white = Image.new("RGBA", photo.size, "white")
        expected = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    elif mode == "I;16":
        grey = np.asarray(photo.convert("L"), np.uint16) * 257
        image, expected = Image.fromarray(grey), photo.convert("L").convert("RGB")
    else:
        image = photo.convert(mode)
        expected = image.convert("RGB")
    result = pipes.sd.img2img(PROMPT, image, strength=0.0, num_inference_steps=1, seed=0)
    reference = pipes.sd.img2img(PROMPT, expected, strength=0.0, num_inference_steps=1, seed=0)
    np.testing.assert_array_equal(result.latents, reference.latents)
    mask = pipes.sd.inpaint(PROMPT, photo, image if mode != "CMYK" else image.convert("L"), num_inference_steps=1)
    assert mask.images[0].size == photo.size


@pytest.mark.parametrize(("size", "expected"), [((4000, 4000), (256, 256)), ((4000, 2000), (352, 176))])
def test_big_photo_defaults_to_the_native_area(pipes: Pipes, size: tuple[int, int], expected: tuple) -> None:
    """A photo's default size keeps its aspect ratio within the model's native area (256 x 256 here), rounded
    down to the size multiple (16): 4000x2000 -> 362x181 -> 352x176."""
    photo = Image.new("RGB", size, (200, 120, 40))
    result = pipes.sd.img2img(PROMPT, photo, strength=1.0, num_inference_steps=1, seed=0)
    assert result.images[0].size == expected
    masked = pipes.sd.inpaint(PROMPT, photo, Image.new("L", size, 255), num_inference_steps=1, seed=0)
    assert masked.images[0].size == expected
    assert (
        pipes.sd.img2img(PROMPT, photo, height=128, num_inference_steps=1).images[0].size[0] == 128 * size[0] // size[1]
    )


# --- what only the Python API reaches -----------------------------------------------------------------


def test_limits_from_arguments_and_environment(tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDTRT_MAX_SIDE", "128")
    monkeypatch.setenv("SDTRT_MAX_IMAGES", "2")
    with Pipeline.load(tiny_export, "ort-cpu") as pipe:
        assert (pipe.limits.max_side, pipe.limits.max_images) == (128, 2)
        with pytest.raises(InvalidInputError, match=r"^height 256 .* ceiling of 128 .*\(SDTRT_MAX_SIDE=128\)"):
            pipe.txt2img(PROMPT, num_inference_steps=1)
        with pytest.raises(InvalidInputError, match=r"^3 images .* ceiling of 2 \(SDTRT_MAX_IMAGES=2\)"):
            pipe.txt2img(PROMPT, num_inference_steps=1, height=128, width=128, num_images=3)
    with Pipeline.load(tiny_export, "ort-cpu", max_side=np.int64(1024), max_images=4) as pipe:  # arguments win
        assert (pipe.limits.max_side, pipe.limits.max_images) == (1024, 4)
        assert pipe.txt2img(PROMPT, num_inference_steps=1, height=768, width=64).images[0].size == (64, 768)
    monkeypatch.setenv("SDTRT_MAX_SIDE", "-5")
    with pytest.raises(InvalidInputError, match=r"^SDTRT_MAX_SIDE must be an integer >= 1, got '-5'$"):
        Pipeline.load(tiny_export, "ort-cpu")


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError("Unable to allocate 64.0 GiB for an array with shape (65536, 65536, 4)"),
        RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while\nrunning "
                         "Conv node. Status Message: bfc_arena.cc:376 Failed to allocate memory for requested buffer"),
        RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223: std::bad_alloc"),
    ],
    ids=["numpy", "onnxruntime", "openvino"],
)  # fmt: skip
def test_allocation_failure_is_one_error(pipes: Pipes, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    def run(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(pipes.sd.sessions, "run_all", run)
    with pytest.raises(SdtrtError, match=r"^txt2img ran out of memory on ort-cpu \(.+\): ask for fewer") as error:
        pipes.sd.txt2img(PROMPT, **FAST)
    assert "\n" not in str(error.value)
    assert re.search(r"Unable to allocate|Failed to allocate memory|bad_alloc", str(error.value))


def test_other_errors_stay_what_they_are(pipes: Pipes, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something else broke")

    monkeypatch.setattr(pipes.sd.sessions, "run_all", run)
    with pytest.raises(RuntimeError, match="something else broke"):
        pipes.sd.txt2img(PROMPT, **FAST)


@pytest.mark.parametrize("network", ["text_encoder", "unet", "vae_decoder"])
def test_non_finite_network_output_is_an_error(pipes: Pipes, monkeypatch: pytest.MonkeyPatch, network: str) -> None:
    """On the CPU a network that returns NaN/inf is an error naming it, never a saved image."""
    session = pipes.sd.session(network)
    real = session.run

    def poisoned(feeds: dict) -> dict:
        outputs = real(feeds)
        first = next(iter(outputs))
        outputs[first] = np.full_like(outputs[first], NAN)
        return outputs

    monkeypatch.setattr(session, "run", poisoned)
    message = rf"^{network} produced NaN/inf in '\w+': its inputs are finite: the export's weights overflow"
    with pytest.raises(InvalidInputError, match=message):
        pipes.sd.txt2img(PROMPT, **FAST)
