"""The tiny VAE (diffusers AutoencoderTiny, TAESD's design): attaching it to an export, and txt2img / img2img that
decode (and encode) with it against diffusers' pipelines built with the same random-weight tiny AutoencoderTiny."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_noise import TorchNoise

from sdtrt.cli import main
from sdtrt.engine.errors import ExportError, InvalidInputError
from sdtrt.engine.manifest import load_manifest
from sdtrt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
LATENT_TOLERANCE = 1e-5  # txt2img: as the plain parity test (the UNet is the same)
IMAGE_LATENT_TOLERANCE = 5e-5  # img2img: the (tiny) encoder too, as tests/test_image_pipelines.py
PIXEL_TOLERANCE = 1  # levels of 255
PIXELS_OFF_BY_ONE = 1e-3


def _diffusers(pipeline_class: str, model: Path, taesd: Path):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(
        model, vae=diffusers.AutoencoderTiny.from_pretrained(taesd), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_parity(ours, reference, run, tolerance: float) -> None:
    latents = run("latent").images.numpy()
    image = np.asarray(run("pil").images[0], np.int16)
    error = np.abs(ours.latents - latents).max() / np.abs(latents).max()
    assert error < tolerance, f"latent relative error {error:.2e}"
    got = np.asarray(ours.images[0], np.int16)
    assert got.shape == image.shape
    assert np.abs(got - image).max() <= PIXEL_TOLERANCE
    assert (got != image).mean() <= PIXELS_OFF_BY_ONE


def test_attach_writes_both_halves_at_the_vae_precisions(tiny_vae_export: Path, tiny_export: Path) -> None:
    manifest = load_manifest(tiny_vae_export)
    for name in ("vae_decoder_tiny", "vae_encoder_tiny"):
        assert sorted(manifest.components[name].files) == ["fp16", "fp32"]
    assert manifest.tiny_vae is not None and manifest.tiny_vae["source"]["sha256"]
    assert load_manifest(tiny_export).tiny_vae is None  # the copy, not the fixture's export


def test_txt2img_with_the_tiny_vae_matches_diffusers(
    tiny_vae_export: Path, tiny_model_dir: Path, taesd_dir: Path, cpu_backend: dict
) -> None:
    reference = _diffusers("StableDiffusionPipeline", tiny_model_dir, taesd_dir)
    latents = np.random.default_rng(5).standard_normal((1, 4, 16, 16), dtype=np.float32)
    options = {"negative_prompt": "blurry", "num_inference_steps": 4, "guidance_scale": 7.5, "height": 128}
    options["width"] = 128

    def run(output_type: str):
        return reference(PROMPT, latents=torch.from_numpy(latents), output_type=output_type, **options)

    with Pipeline.load(tiny_vae_export, **cpu_backend) as pipe:
        ours = pipe.txt2img(PROMPT, latents=latents, vae="tiny", **options)
        full = pipe.txt2img(PROMPT, latents=latents, **options)
    _assert_parity(ours, reference, run, LATENT_TOLERANCE)
    np.testing.assert_array_equal(ours.latents, full.latents)  # only the decode differs
    assert np.abs(np.asarray(ours.images[0], float) - np.asarray(full.images[0], float)).mean() > 1


def test_img2img_encodes_with_the_tiny_vae_as_diffusers(
    tiny_vae_export: Path, tiny_model_dir: Path, taesd_dir: Path
) -> None:
    from PIL import Image

    reference = _diffusers("StableDiffusionImg2ImgPipeline", tiny_model_dir, taesd_dir)
    y, x = np.mgrid[0:128, 0:128] / 128
    source = Image.fromarray((np.stack([x, y, 1 - x], axis=-1) * 255).astype(np.uint8))
    options = {"num_inference_steps": 5, "guidance_scale": 7.5, "strength": 0.6}

    def run(output_type: str):
        generator = torch.Generator().manual_seed(11)
        return reference(PROMPT, image=source, generator=generator, output_type=output_type, **options)

    with Pipeline.load(tiny_vae_export, backend="ort-cpu") as pipe:
        ours = pipe.img2img(PROMPT, source, rng=TorchNoise(11), vae="tiny", **options)
    _assert_parity(ours, reference, run, IMAGE_LATENT_TOLERANCE)


def test_cli_tiny_vae_flag(tiny_vae_export: Path, tiny_export: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny.png"
    argv = ["generate", str(tiny_vae_export), PROMPT, "--steps", "2", "--height", "128", "--width", "128"]
    assert main([*argv, "--tiny-vae", "-o", str(out), "-q", "--backend", "ort-cpu"]) == 0
    assert out.is_file()
    argv[1] = str(tiny_export)
    assert main([*argv, "--tiny-vae", "-o", str(tmp_path / "no.png"), "-q", "--backend", "ort-cpu"]) == 2
    assert "add-tiny-vae" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line each, the export left as it was


@pytest.fixture
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    return out


def _listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def test_a_tiny_vae_of_another_family_is_refused(export_copy: Path, taesd_dir: Path, tmp_path: Path) -> None:
    from sdtrt.export.tiny import build_tiny_taesd
    from sdtrt.export.tiny_vae import attach_tiny_vae

    before = _listing(export_copy)
    wide = build_tiny_taesd(tmp_path / "taesd3", latent_channels=16)  # SD3's / FLUX's latent space
    with pytest.raises(ExportError, match=r"16 channels.*TAESD for SD 1.x/2.x, TAESDXL for SDXL"):
        attach_tiny_vae(export_copy, wide)
    xl = tmp_path / "taesdxl"
    shutil.copytree(taesd_dir, xl)  # the same config: only its name tells TAESDXL from TAESD
    with pytest.raises(ExportError, match=r"taesdxl is a tiny VAE for SDXL models; .* holds an SD 1.x model"):
        attach_tiny_vae(export_copy, xl)
    assert _listing(export_copy) == before


def test_pickles_and_other_folders_are_refused(export_copy: Path, taesd_dir: Path, tmp_path: Path) -> None:
    from sdtrt.export.tiny_vae import attach_tiny_vae

    before = _listing(export_copy)
    pickled = tmp_path / "pickled"
    shutil.copytree(taesd_dir, pickled)
    (pickled / "diffusion_pytorch_model.safetensors").rename(pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(ExportError, match="no pickled weights"):
        attach_tiny_vae(export_copy, pickled)
    with pytest.raises(ExportError, match="config names 'AutoencoderKL'"):
        attach_tiny_vae(export_copy, Path(load_manifest(export_copy).source["path"]) / "vae")
    with pytest.raises(ExportError, match="not a diffusers AutoencoderTiny folder"):
        attach_tiny_vae(export_copy, tmp_path / "nothing")
    assert _listing(export_copy) == before


def test_attaching_twice_needs_overwrite(tiny_vae_export: Path, taesd_dir: Path) -> None:
    from sdtrt.export.tiny_vae import attach_tiny_vae

    manifest = json.loads((tiny_vae_export / "manifest.json").read_text())
    with pytest.raises(ExportError, match="has a tiny VAE already"):
        attach_tiny_vae(tiny_vae_export, taesd_dir)
    assert json.loads((tiny_vae_export / "manifest.json").read_text()) == manifest


def test_bad_vae_option_is_one_clear_error(tiny_export: Path) -> None:
    with Pipeline.load(tiny_export, backend="ort-cpu") as pipe:
        with pytest.raises(InvalidInputError, match="vae must be one of 'full', 'tiny', got 'small'"):
            pipe.txt2img(PROMPT, vae="small", num_inference_steps=1)
        with pytest.raises(InvalidInputError, match="has none of: attach one with `sdtrt add-tiny-vae"):
            pipe.txt2img(PROMPT, vae="tiny", num_inference_steps=1)
