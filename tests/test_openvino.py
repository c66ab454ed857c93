"""The openvino backend: its sessions against ONNX Runtime's, LoRA by constants, the compiled-shape
bound and model cache, the CLI's --precision, and the quality gate of bf16 against diffusers fp32.

The parity suites (test_pipeline, test_image_pipelines, test_lora) run on openvino at fp32 too,
with the same bounds as ort-cpu; the demo model's semantic tests (test_trained_model) run on it at
its default precision (bf16 where the CPU has native bf16).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from image_gate import BF16_MAX_LEVELS, BF16_MIN_PSNR, final_image_error

from sdtrt.cli import main
from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.openvino_ir import ir_problem
from sdtrt.engine.openvino_session import MAX_COMPILED_SHAPES

FP32_TOLERANCE = 1e-4  # per network, max |openvino - ort| / max |ort| (measured: ~2e-6)


def _feeds(artifact, network: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    dims = {"batch": 2, "latent_height": 16, "latent_width": 16, "height": 128, "width": 128}
    feeds = {}
    for name, spec in artifact.inputs(network).items():
        shape = spec.bind(dims)
        if spec.dtype == "int32":
            feeds[name] = rng.integers(0, 49408, shape, dtype=np.int32)
        elif name == "timestep":
            feeds[name] = np.full(shape, 500.0, np.float32)
        else:
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


@pytest.mark.parametrize("network", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_fp32_sessions_match_ort_cpu(tiny_export: Path, network: str) -> None:
    with open_artifact(tiny_export, "openvino", "fp32") as ov, open_artifact(tiny_export, "ort-cpu") as ort:
        feeds = _feeds(ort, network, np.random.default_rng(3))
        ours, reference = ov.session(network).run(feeds), ort.session(network).run(feeds)
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape
        assert np.abs(ours[name] - expected).max() / np.abs(expected).max() < FP32_TOLERANCE, name


def test_compiled_shapes_are_bounded_and_weights_swap(tiny_export: Path) -> None:
    """Each shape compiles once; at most MAX_COMPILED_SHAPES stay; new weights recompile, {} restores."""
    with open_artifact(tiny_export, "openvino", "fp32") as artifact:
        session = artifact.session("vae_decoder")
        for side in (8, 16, 24, 8):
            image = session.run({"latent": np.zeros((1, 4, side, side), np.float32)})["image"]
            assert image.shape == (1, 3, 8 * side, 8 * side)
        assert len(session._compiled) == MAX_COMPILED_SHAPES

        unet, weight_map = artifact.session("unet"), artifact.weight_map("unet")
        feeds = _feeds(artifact, "unet", np.random.default_rng(0))
        base = unet.run(feeds)["noise_pred"]
        name = next(iter(weight_map.weights))
        unet.set_weights({name: weight_map.base(name) + np.float32(0.5)})
        assert np.abs(unet.run(feeds)["noise_pred"] - base).max() > 1e-2
        unet.set_weights({})
        np.testing.assert_array_equal(unet.run(feeds)["noise_pred"], base)


def test_model_cache_dir(tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled models are cached per precision: a bf16 start after an fp32 one compiles its own (a shared
    cache gave NaN in OpenVINO 2026.4), and a second start loads the cached one; bf16 compiles from the
    fp16 IR made once beside them."""
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", str(tmp_path / "cache"))
    outputs = {}
    for precision in ("fp32", "bf16", "bf16"):
        with open_artifact(tiny_export, "openvino", precision) as artifact:
            feeds = _feeds(artifact, "unet", np.random.default_rng(1))
            outputs.setdefault(precision, []).append(artifact.session("unet").run(feeds)["noise_pred"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["bf16", "fp32", "ir"]
    assert all(any(folder.iterdir()) for folder in (tmp_path / "cache").iterdir())
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "ir").iterdir()] == ["unet"]
    assert np.isfinite(outputs["bf16"][0]).all() and not np.array_equal(outputs["bf16"][0], outputs["fp32"][0])
    np.testing.assert_array_equal(outputs["bf16"][1], outputs["bf16"][0])  # the cached model computes the same


def test_bf16_without_ir(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the fp16 IR cannot be made (here: a file stands where its folder goes), bf16 compiles from the
    ONNX file, with a warning, and computes what it computes from the IR."""
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", str(tmp_path / "cache"))
    with open_artifact(tiny_export, "openvino", "bf16") as artifact:
        feeds = _feeds(artifact, "unet", np.random.default_rng(2))
        from_ir = artifact.session("unet").run(feeds)["noise_pred"]
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ir").write_text("not a folder")
    with open_artifact(tiny_export, "openvino", "bf16") as artifact:
        from_onnx = artifact.session("unet").run(feeds)["noise_pred"]
    assert "could not convert to OpenVINO's format" in caplog.text
    np.testing.assert_allclose(from_onnx, from_ir, rtol=0, atol=1e-3 * np.abs(from_ir).max())


@pytest.mark.parametrize(
    ("where", "says"),
    [("file/cache", "Not a directory"), ("/proc", "")],  # a file stands in the way; a folder that takes no files
    ids=["under a file", "a folder that takes no files"],
)
def test_unusable_cache_variable(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, says: str
) -> None:
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / where  # an absolute ``where`` stays itself
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", str(cache))
    with open_artifact(tiny_export, "openvino", "bf16") as artifact, pytest.raises(InvalidInputError) as error:
        artifact.session("unet")
    assert str(error.value).startswith(f"SDTRT_OPENVINO_CACHE={cache}: cannot make files in that folder ({says}")
    assert str(error.value).endswith("name a writable folder, or set it to '' to compile without a cache")


def _truncate_bin(ir: Path) -> None:
    (ir / "model.bin").write_bytes((ir / "model.bin").read_bytes()[:1000])


def _garbage_xml_of_its_size(ir: Path) -> None:  # the cheap look at sizes passes: reading it fails
    (ir / "model.xml").write_bytes(b"x" * (ir / "model.xml").stat().st_size)


IR_DAMAGES = {
    "model.bin truncated": _truncate_bin,
    "model.bin missing": lambda ir: (ir / "model.bin").unlink(),
    "model.xml garbage": lambda ir: (ir / "model.xml").write_text("<garbage"),
    "model.xml garbage of its size": _garbage_xml_of_its_size,
}


@pytest.mark.parametrize("damage", IR_DAMAGES)
def test_a_damaged_ir_in_the_cache_is_made_again(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", str(tmp_path / "cache"))
    with open_artifact(tiny_export, "openvino", "bf16") as artifact:
        feeds = _feeds(artifact, "unet", np.random.default_rng(2))
        expected = artifact.session("unet").run(feeds)["noise_pred"]
    (ir,) = (tmp_path / "cache" / "ir").iterdir()
    IR_DAMAGES[damage](ir)
    shutil.rmtree(tmp_path / "cache" / "bf16")  # the compiled-model cache: else nothing reads the IR again
    with caplog.at_level(logging.WARNING), open_artifact(tiny_export, "openvino", "bf16") as artifact:
        again = artifact.session("unet").run(feeds)["noise_pred"]
    assert re.search(r"is damaged \(.*\): (converting it again|compiling from the ONNX file)", caplog.text)
    np.testing.assert_allclose(again, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    with open_artifact(tiny_export, "openvino", "bf16") as artifact:  # and the IR is whole again
        artifact.session("unet").run(feeds)
    assert ir_problem(next((tmp_path / "cache" / "ir").iterdir())) is None


def test_cli_precision(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat.png"
    args = ["generate", str(tiny_export), "a cat", "-o", str(out), "--steps", "2", "--seed", "1", "-q"]
    assert main([*args, "--backend", "openvino", "--precision", "fp32"]) == 0
    assert out.is_file() and "backend openvino" in capsys.readouterr().out
    assert main([*args, "--backend", "ort-cpu", "--precision", "bf16"]) == 2
    assert "backend ort-cpu runs at fp32 or int8, not 'bf16'" in capsys.readouterr().err


def test_bf16_quality_gate(tiny_export: Path, tiny_model_dir: Path) -> None:
    """The final image of bf16 against diffusers fp32: within BF16_MIN_PSNR and BF16_MAX_LEVELS."""
    psnr, levels, spread = final_image_error(tiny_export, tiny_model_dir, "bf16")
    assert psnr >= BF16_MIN_PSNR, f"bf16 PSNR {psnr:.1f} dB"
    assert levels <= BF16_MAX_LEVELS
    assert spread > 10  # a real picture
