"""ControlNet: attaching to an export, and txt2img / img2img / inpaint (one or several ControlNets, scales, guidance
window, guess mode, SDXL) against diffusers' ControlNet pipelines on tiny models with the same noise."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_noise import TorchNoise

from sdtrt.engine.errors import ExportError
from sdtrt.engine.manifest import load_manifest
from sdtrt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
LATENT_TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers| (the bound)
IMAGE_LATENT_TOLERANCE = 5e-5  # img2img / inpaint: the VAE encoder too, as tests/test_image_pipelines.py
PIXEL_TOLERANCE = 1  # levels of 255
PIXELS_OFF_BY_ONE = 1e-3


def control_image(kind: int, height: int = 128, width: int = 128) -> Image.Image:
    """A deterministic map: discs and bars in a few flat colours (kind picks the layout)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[(x - 0.3 - 0.3 * kind) ** 2 + (y - 0.4) ** 2 < 0.04] = (255, 255, 255)
    rgb[(np.abs(y - 0.75) < 0.05) & (x > 0.2 * kind)] = (255, 0, 0)
    return Image.fromarray(rgb)


def source_image(height: int = 128, width: int = 128) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.8 - 0.6 * ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08)], axis=-1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def box_mask(height: int = 128, width: int = 128) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[32:88, 48:104] = 255
    return Image.fromarray(mask)


def assert_parity(ours, reference_latents: np.ndarray, reference_image: Image.Image, tolerance: float) -> None:
    error = np.abs(ours.latents - reference_latents).max() / np.abs(reference_latents).max()
    assert error < tolerance, f"latent relative error {error:.2e}"
    got, expected = np.asarray(ours.images[0], np.int16), np.asarray(reference_image, np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= PIXEL_TOLERANCE
    assert (got != expected).mean() <= PIXELS_OFF_BY_ONE


def reference_outputs(run, reference) -> tuple[np.ndarray, Image.Image]:
    """diffusers' final latents, and its PIL image decoded from them as its pipelines do."""
    latents = run("latent").images
    with torch.no_grad():
        decoded = reference.vae.decode(latents / reference.vae.config.scaling_factor, return_dict=False)[0]
    return latents.numpy(), reference.image_processor.postprocess(decoded, output_type="pil")[0]


# --------------------------------------------------------------------------------------------------
# Fixtures: two tiny ControlNets for the tiny SD 1.x model, attached to a copy of its export


@pytest.fixture(scope="session")
def tiny_controlnet_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sdtrt.export.tiny import build_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {
        "edges": build_tiny_controlnet(root / "edges", seed=1),
        "depth": build_tiny_controlnet(root / "depth", seed=2),
    }


@pytest.fixture(scope="session")
def controlnet_export(
    tiny_export: Path, tiny_controlnet_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny SD 1.x export (fp32 + fp16) with both ControlNets attached."""
    from sdtrt.export.controlnet import attach_controlnet

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1-controlnet"
    shutil.copytree(tiny_export, out)
    for name, folder in tiny_controlnet_dirs.items():
        attach_controlnet(out, folder, name=name)
    return out


@pytest.fixture(scope="module")
def pipe(controlnet_export: Path) -> Pipeline:
    """ORT CPU; the first parity test also runs on OpenVINO fp32 (each new shape compiles there: slow on 2 cores)."""
    with Pipeline.load(controlnet_export, backend="ort-cpu") as pipeline:
        yield pipeline


def diffusers_controlnet(pipeline_class: str, base: Path, controlnets: list[Path], scheduler: str | None = None):
    import diffusers

    nets = [diffusers.ControlNetModel.from_pretrained(folder) for folder in controlnets]
    pipe = getattr(diffusers, pipeline_class).from_pretrained(
        base, controlnet=nets[0] if len(nets) == 1 else nets, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    if scheduler == "euler_a":
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


# --------------------------------------------------------------------------------------------------
# Export


def test_attach_writes_the_networks_beside_the_base(controlnet_export: Path, tiny_export: Path) -> None:
    manifest = load_manifest(controlnet_export)
    assert list(manifest.controlnets) == ["edges", "depth"]
    base = load_manifest(tiny_export)
    assert set(manifest.components) == {*base.components, "unet_controlnet", "controlnet.edges", "controlnet.depth"}
    for name in ("unet_controlnet", "controlnet.edges"):
        assert sorted(manifest.components[name].files) == ["fp16", "fp32"]  # the base UNet's precisions
    unet = manifest.components["unet_controlnet"].files["fp32"]
    assert unet.weights is not None  # LoRA reaches the UNet that takes residuals too
    residuals = [s for s in unet.inputs if "residual" in s.name]
    outputs = manifest.components["controlnet.edges"].files["fp32"].outputs
    assert [s.shape for s in residuals] == [s.shape for s in outputs]
    assert residuals[-1].shape == ("batch", 64, "latent_height_2", "latent_width_2")
    # the base's own files are untouched: a model without ControlNet pays nothing
    assert {k: v.files["fp32"].sha256 for k, v in base.components.items()} == {
        k: manifest.components[k].files["fp32"].sha256 for k in base.components
    }


def test_attach_refuses_what_does_not_fit(controlnet_export: Path, tmp_path: Path) -> None:
    from sdtrt.export.controlnet import attach_controlnet
    from sdtrt.export.tiny import build_tiny_controlnet

    before = sorted(p.name for p in controlnet_export.iterdir())
    sdxl_net = build_tiny_controlnet(tmp_path / "sdxl-net", sdxl=True)
    with pytest.raises(
        ExportError, match=r"cross-attention width is 64, the base UNet's 32 \(a ControlNet for another base model"
    ):
        attach_controlnet(controlnet_export, sdxl_net, name="xl")
    with pytest.raises(ExportError, match="has a ControlNet named 'edges' already"):
        attach_controlnet(controlnet_export, sdxl_net, name="edges")
    with pytest.raises(ExportError, match="letters, digits"):
        attach_controlnet(controlnet_export, sdxl_net, name="a=b")
    assert sorted(p.name for p in controlnet_export.iterdir()) == before  # nothing written


# --------------------------------------------------------------------------------------------------
# Parity


def test_txt2img_one_controlnet_matches_diffusers(
    controlnet_export: Path, tiny_model_dir: Path, tiny_controlnet_dirs: dict[str, Path], cpu_backend: dict
) -> None:
    reference = diffusers_controlnet(
        "StableDiffusionControlNetPipeline", tiny_model_dir, [tiny_controlnet_dirs["edges"]]
    )
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16), dtype=np.float32)
    hint = control_image(0)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 6, "guidance_scale": 7.5}

    def run(output_type: str):
        return reference(
            PROMPT,
            image=hint,
            latents=torch.from_numpy(latents),
            output_type=output_type,
            controlnet_conditioning_scale=0.8,
            height=128,
            width=128,
            **options,
        )

    with Pipeline.load(controlnet_export, **cpu_backend) as pipe:
        ours = pipe.txt2img(
            PROMPT,
            controlnet="edges",
            control_image=hint,
            controlnet_conditioning_scale=0.8,
            latents=latents,
            **options,
        )
        plain = pipe.txt2img(PROMPT, latents=latents, height=128, width=128, **options)
    assert_parity(ours, *reference_outputs(run, reference), LATENT_TOLERANCE)
    assert np.abs(plain.latents - ours.latents).max() > 1e-2  # the ControlNet changed the picture


@pytest.mark.parametrize("guess_mode", [False, True], ids=["cfg", "guess-mode"])
def test_txt2img_two_controlnets_with_windows_match_diffusers(
    pipe: Pipeline, tiny_model_dir: Path, tiny_controlnet_dirs: dict[str, Path], guess_mode: bool
) -> None:
    nets = [tiny_controlnet_dirs["edges"], tiny_controlnet_dirs["depth"]]
    reference = diffusers_controlnet("StableDiffusionControlNetPipeline", tiny_model_dir, nets, "ddim")
    latents = np.random.default_rng(11).standard_normal((1, 4, 16, 24), dtype=np.float32)
    hints = [control_image(0, 128, 192), control_image(1, 64, 64)]  # the second is resized (stretched)
    control = {
        "controlnet_conditioning_scale": [0.7, 1.3],
        "control_guidance_start": [0.0, 0.25],
        "control_guidance_end": [0.75, 1.0],
        "guess_mode": guess_mode,
    }
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 6, "guidance_scale": 6.0, **control}

    def run(output_type: str):
        return reference(
            PROMPT,
            image=hints,
            latents=torch.from_numpy(latents),
            height=128,
            width=192,
            output_type=output_type,
            **options,
        )

    ours = pipe.txt2img(
        PROMPT,
        controlnet=["edges", "depth"],
        control_image=hints,
        latents=latents,
        scheduler="ddim",
        height=128,
        width=192,
        **options,
    )
    assert_parity(ours, *reference_outputs(run, reference), LATENT_TOLERANCE)
    assert ours.timings["controlnet"] > 0


def test_img2img_with_controlnet_matches_diffusers(
    pipe: Pipeline, tiny_model_dir: Path, tiny_controlnet_dirs: dict[str, Path]
) -> None:
    reference = diffusers_controlnet(
        "StableDiffusionControlNetImg2ImgPipeline", tiny_model_dir, [tiny_controlnet_dirs["depth"]], "euler_a"
    )
    hint = control_image(1)
    # no scale given: both default to diffusers' img2img 0.8
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 8, "guidance_scale": 7.5}

    def run(output_type: str):
        return reference(
            PROMPT,
            image=source_image(),
            control_image=hint,
            strength=0.6,
            output_type=output_type,
            generator=torch.Generator().manual_seed(3),
            control_guidance_end=0.5,
            **options,
        )

    ours = pipe.img2img(
        PROMPT,
        source_image(),
        strength=0.6,
        controlnet="depth",
        control_image=hint,
        control_guidance_end=0.5,
        scheduler="euler_a",
        rng=TorchNoise(3),
        **options,
    )
    assert_parity(ours, *reference_outputs(run, reference), IMAGE_LATENT_TOLERANCE)


def test_inpaint_with_controlnet_matches_diffusers(
    pipe: Pipeline, tiny_model_dir: Path, tiny_controlnet_dirs: dict[str, Path]
) -> None:
    reference = diffusers_controlnet(
        "StableDiffusionControlNetInpaintPipeline", tiny_model_dir, [tiny_controlnet_dirs["edges"]], "ddim"
    )
    hint = control_image(0)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 6, "guidance_scale": 7.5}  # default scale: 0.5

    def run(output_type: str):
        return reference(
            PROMPT,
            image=source_image(),
            mask_image=box_mask(),
            control_image=hint,
            strength=0.9,
            output_type=output_type,
            generator=torch.Generator().manual_seed(5),
            **options,
        )

    ours = pipe.inpaint(
        PROMPT,
        source_image(),
        box_mask(),
        strength=0.9,
        controlnet="edges",
        control_image=hint,
        scheduler="ddim",
        rng=TorchNoise(5),
        **options,
    )
    assert_parity(ours, *reference_outputs(run, reference), IMAGE_LATENT_TOLERANCE)


def test_sdxl_controlnet_matches_diffusers(tmp_path_factory: pytest.TempPathFactory) -> None:
    from sdtrt.export.controlnet import attach_controlnet
    from sdtrt.export.exporter import export_model
    from sdtrt.export.tiny import build_tiny_controlnet, build_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl-controlnet")
    model, net = build_tiny_sdxl(root / "sdxl"), build_tiny_controlnet(root / "net", seed=3, sdxl=True)
    export_model(model, root / "export", progress=False)
    attach_controlnet(root / "export", net, name="map")
    reference = diffusers_controlnet("StableDiffusionXLControlNetPipeline", model, [net])
    latents = np.random.default_rng(5).standard_normal((1, 4, 16, 16), dtype=np.float32)
    hint = control_image(1)
    options = {"num_inference_steps": 4, "guidance_scale": 5.0, "controlnet_conditioning_scale": 0.9}

    def run(output_type: str):
        return reference(
            PROMPT,
            image=hint,
            latents=torch.from_numpy(latents),
            height=128,
            width=128,
            output_type=output_type,
            control_guidance_start=0.2,
            **options,
        )

    with Pipeline.load(root / "export", backend="ort-cpu") as pipe:
        ours = pipe.txt2img(PROMPT, control_image=hint, latents=latents, control_guidance_start=0.2, **options)
    assert_parity(ours, *reference_outputs(run, reference), LATENT_TOLERANCE)


def test_controlnet_with_lora_matches_diffusers(
    controlnet_export: Path, tiny_model_dir: Path, tiny_controlnet_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from test_lora import _factors, _reference, _write_peft

    lora = _write_peft(_factors(_reference(tiny_model_dir), seed=1), tmp_path / "style.safetensors", alpha=8)
    reference = diffusers_controlnet(
        "StableDiffusionControlNetPipeline", tiny_model_dir, [tiny_controlnet_dirs["edges"]]
    )
    reference.load_lora_weights(str(lora), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.6])
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 5, "guidance_scale": 7.5, "height": 128}
    options |= {"width": 128, "control_image": control_image(0, 128, 128)}
    expected = reference(
        PROMPT, latents=torch.from_numpy(latents), output_type="latent", image=options.pop("control_image"), **options
    ).images.numpy()
    with Pipeline.load(controlnet_export, backend="ort-cpu") as pipe:
        pipe.load_lora(lora, scale=0.6)
        ours = pipe.txt2img(
            PROMPT, controlnet="edges", control_image=control_image(0, 128, 128), latents=latents, **options
        )
    error = np.abs(ours.latents - expected).max() / np.abs(expected).max()
    assert error < LATENT_TOLERANCE, f"latent relative error {error:.2e}"


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error line each, before any network runs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"controlnet": ["edges", "depth"], "control_image": [control_image(0)]},
            r"2 ControlNet\(s\) \(edges, depth\) take 2 control image\(s\), got 1",
        ),
        ({"controlnet": "edges", "control_image": "/no/such.png"}, r"cannot read control image for edges /no/such.png"),
        ({"controlnet": "edges"}, r"ControlNet edges needs a control_image"),
        (
            {"controlnet": "canny", "control_image": control_image(0)},
            r"no ControlNet named 'canny' is attached \(attached: edges, depth\)",
        ),
        (
            {"controlnet": "edges", "control_image": control_image(0), "controlnet_conditioning_scale": float("nan")},
            r"controlnet_conditioning_scale must be a finite number",
        ),
        (
            {
                "controlnet": ["edges", "depth"],
                "control_image": [control_image(0)] * 2,
                "controlnet_conditioning_scale": [1.0],
            },
            r"controlnet_conditioning_scale has 1 values for 2 ControlNet",
        ),
        (
            {"controlnet": "edges", "control_image": control_image(0), "control_guidance_end": 1.5},
            r"window must lie in \[0, 1\] with start < end, got 0.0 to 1.5",
        ),
        (
            {
                "controlnet": "edges",
                "control_image": control_image(0),
                "control_guidance_start": 0.6,
                "control_guidance_end": 0.4,
            },
            r"start < end, got 0.6 to 0.4",
        ),
        (
            {"controlnet": "edges", "control_image": control_image(0), "guess_mode": "yes"},
            r"guess_mode must be True or False",
        ),
    ],
    ids=[
        "count",
        "unreadable",
        "no-image",
        "unknown",
        "nan-scale",
        "scale-count",
        "window-outside",
        "window-reversed",
        "guess",
    ],
)
def test_bad_control_options_are_one_clear_error_before_any_network(
    controlnet_export: Path, options: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdtrt.engine.errors import InvalidInputError
    from sdtrt.runtime.sessions import Sessions

    def no_network(*args, **kwargs):
        raise AssertionError("a network ran")

    with Pipeline.load(controlnet_export, backend="ort-cpu") as pipe:
        monkeypatch.setattr(Sessions, "run_all", no_network)
        with pytest.raises(InvalidInputError, match=message) as caught:
            pipe.txt2img(PROMPT, num_inference_steps=2, **options)
        assert "\n" not in str(caught.value)


def test_controlnets_only_where_they_apply(controlnet_export: Path, tiny_export: Path) -> None:
    from sdtrt.engine.errors import InvalidInputError

    with (
        Pipeline.load(controlnet_export, backend="ort-cpu") as pipe,
        pytest.raises(InvalidInputError, match="outpaint takes no ControlNet"),
    ):
        pipe.outpaint(PROMPT, source_image(), left=64, control_image=control_image(0))
    with (
        Pipeline.load(tiny_export, backend="ort-cpu") as pipe,
        pytest.raises(InvalidInputError, match="has no ControlNet: attach one with `sdtrt add-controlnet"),
    ):
        pipe.txt2img(PROMPT, control_image=control_image(0))


def test_a_controlnet_for_another_base_is_refused_at_load(controlnet_export: Path, tmp_path: Path) -> None:
    """A manifest edited to pair a ControlNet with a UNet whose residuals differ: one error before any network."""
    import json

    from sdtrt.engine.errors import InvalidInputError

    folder = tmp_path / "export"
    shutil.copytree(controlnet_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for file in manifest["components"]["controlnet.depth"]["files"].values():
        file["outputs"][-1]["shape"][1] = 128
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with (
        Pipeline.load(folder, backend="ort-cpu") as pipe,
        pytest.raises(InvalidInputError, match="ControlNet 'depth' does not fit this export's UNet"),
    ):
        pipe.txt2img(PROMPT, controlnet="depth", control_image=control_image(0))


# --------------------------------------------------------------------------------------------------
# Engine facts, CLI


def test_profiles_of_the_controlnet_networks(controlnet_export: Path) -> None:
    from sdtrt.engine.profiles import component_dims, dynamic_profile, static_profile

    manifest = load_manifest(controlnet_export)
    spec = dynamic_profile(manifest)  # 128-512 px around the native 256, batch 1-4, CFG
    unet = component_dims(manifest, "unet_controlnet", spec)
    assert unet["batch"] == (1, 2, 8)
    assert unet["latent_height_2"] == (8, 16, 32)
    net = component_dims(manifest, "controlnet.edges", spec)
    assert net["batch"] == (1, 2, 8)  # guess mode runs the conditional half only
    assert net["height"] == (128, 256, 512) and net["latent_width"] == (16, 32, 64)
    static = component_dims(manifest, "controlnet.edges", static_profile(manifest, (256, 256), 2))
    assert static["batch"] == (2, 4, 4)  # B in guess mode, 2B under CFG


def test_cli_control_option(controlnet_export: Path, tmp_path: Path) -> None:
    from sdtrt.cli import main
    from sdtrt.task_cli import control_option as _control_option

    assert _control_option("edges=map.png:0.5") == ("edges", Path("map.png"), 0.5)
    assert _control_option("edges=C:/maps/a.png") == ("edges", Path("C:/maps/a.png"), 1.0)
    control_image(0).save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    argv = ["generate", str(controlnet_export), PROMPT, "-o", str(out), "--steps", "2", "--backend", "ort-cpu"]
    argv += ["--control", f"edges={tmp_path / 'map.png'}:0.7", "--control", f"depth={tmp_path / 'map.png'}"]
    assert main([*argv, "--control-end", "0.5", "-q"]) == 0
    assert Image.open(out).size == (128, 128)  # the control image's size
    assert main(["generate", str(controlnet_export), PROMPT, "--guess-mode", "-o", str(out), "-q"]) == 2


def test_canny_control_image() -> None:
    pytest.importorskip("cv2")
    from sdtrt.runtime.control_images import canny

    edges = np.asarray(canny(source_image()))
    assert edges.shape == (128, 128, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[64, 20:108].max() == 255  # the disc's rim
