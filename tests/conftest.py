"""Shared fixtures: tiny models and their exports are built once per test session."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

# The CPU backends the parity suites run on, each with its exact arithmetic (openvino's bf16 has its
# own quality gate in tests/test_openvino.py): (backend, precision)
CPU_BACKENDS = [("ort-cpu", None), ("openvino", "fp32")]
# LoRA runs on every CPU backend x precision: openvino bf16 compiles from the fp16 IR (engine/openvino_ir.py),
# whose constants are named otherwise than the ONNX file's
LORA_BACKENDS = [*CPU_BACKENDS, ("openvino", "bf16")]


@pytest.fixture(scope="session", params=CPU_BACKENDS, ids=[backend for backend, _ in CPU_BACKENDS])
def cpu_backend(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """Pipeline.load's backend and precision, for each CPU backend installed here."""
    backend, precision = request.param
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install 'sdtrt[cpu]')")
    return {"backend": backend, "precision": precision}


@pytest.fixture(scope="session", params=LORA_BACKENDS, ids=[f"{b}-{p or 'fp32'}" for b, p in LORA_BACKENDS])
def lora_backend(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """Pipeline.load's backend and precision, for each CPU backend x precision installed here."""
    backend, precision = request.param
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install 'sdtrt[cpu]')")
    return {"backend": backend, "precision": precision}


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CLIP BPE tokenizer folder (vocab.json + merges.txt, 49408 ids)."""
    from sdtrt.export.clip_vocab import write_clip_tokenizer

    out = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x diffusers folder (random weights, seed 0)."""
    from sdtrt.export.tiny import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported once per test session, fp32 and fp16."""
    from sdtrt.export.exporter import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1"
    export_model(tiny_model_dir, out, precisions=("fp32", "fp16"), progress=False)
    return out


@pytest.fixture(scope="session")
def taesd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight diffusers AutoencoderTiny (TAESD's design, tiny widths), seed 3."""
    from sdtrt.export.tiny import build_tiny_taesd

    return build_tiny_taesd(tmp_path_factory.mktemp("tiny-vaes") / "taesd", seed=3)


@pytest.fixture(scope="session")
def tiny_vae_export(tiny_export: Path, taesd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x export (fp32 + fp16) with the tiny VAE attached."""
    from sdtrt.export.tiny_vae import attach_tiny_vae

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1-taesd"
    shutil.copytree(tiny_export, out)
    attach_tiny_vae(out, taesd_dir)
    return out


@pytest.fixture(scope="session")
def cache_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x export (fp32 + fp16) with the step-cache graphs of branch 0."""
    from sdtrt.export.step_cache import attach_step_cache

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1-step-cache"
    shutil.copytree(tiny_export, out)
    attach_step_cache(out)
    return out


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x inpainting model: its UNet takes 9 channels (latents, mask, masked-image latents)."""
    from sdtrt.export.tiny import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1-inpaint", inpainting=True)


@pytest.fixture(scope="session")
def tiny_inpaint_export(tiny_inpaint_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdtrt.export.exporter import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1-inpaint"
    export_model(tiny_inpaint_model_dir, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny x4 upscaler: 7-channel UNet with noise-level class labels, 4x VAE, v-prediction DDIM."""
    from sdtrt.export.tiny import build_tiny_upscaler

    return build_tiny_upscaler(tmp_path_factory.mktemp("models") / "tiny-upscaler")


@pytest.fixture(scope="session")
def tiny_upscaler_export(tiny_upscaler_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdtrt.export.exporter import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-upscaler"
    export_model(tiny_upscaler_dir, out, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model exported once per session, fp32 and fp16: the trained-model and serving tests' model
    (tests copy it before changing it)."""
    from sdtrt.demo import demo_model_dir
    from sdtrt.export.exporter import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-sd"
    export_model(demo_model_dir(), out, precisions=("fp32", "fp16"), progress=False)
    return out


# the tiny int8 export's calibration: three prompts, 8 steps each at the native size (24 UNet inputs, batch 2)
INT8_CALIBRATION = {
    "prompts": ["a red circle on a blue background", "a cat", "a photograph of an astronaut riding a horse"],
    "steps": 8,
}


@pytest.fixture(scope="session")
def tiny_int8_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny export with `sdtrt quantize --int8`'s IRs (tests copy it before changing it)."""
    pytest.importorskip("nncf")
    from sdtrt.quantize import quantize

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1-int8"
    shutil.copytree(tiny_export, out)
    quantize(out, **INT8_CALIBRATION)
    return out
