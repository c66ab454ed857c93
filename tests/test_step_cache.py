"""Step caching (DeepCache): attaching its graphs to an export, and cached txt2img / img2img against the DeepCache
package's own DeepCacheSDHelper patching diffusers' pipeline, with the same interval and branch."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_noise import TorchNoise

from sdtrt.cli import main
from sdtrt.engine.errors import ExportError, InvalidInputError
from sdtrt.engine.manifest import load_manifest
from sdtrt.engine.profiles import component_dims, dynamic_profile
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.step_cache import full_steps

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
LATENT_TOLERANCE = 1e-5  # as the plain txt2img parity test (tests/test_pipeline.py)
IMAGE_LATENT_TOLERANCE = 5e-5  # img2img: the VAE encoder too, as tests/test_image_pipelines.py
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "lms": "LMSDiscreteScheduler"}


def _deepcache_latents(
    pipeline_class: str, model: Path, scheduler: str, interval: int, branch: int, lora: Path | None = None, **call
):
    """diffusers' final latents with DeepCacheSDHelper patching its UNet (interval 1: the helper off), with
    ``lora`` loaded by diffusers' own load_lora_weights."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    pipe = getattr(diffusers, pipeline_class).from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return pipe(PROMPT, output_type="latent", **call).images.numpy()
    finally:
        helper.disable()


def _relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


# --------------------------------------------------------------------------------------------------
# Export


def test_the_graphs_share_the_unets_weights(cache_export: Path, tiny_export: Path) -> None:
    """The two graphs add their structure, not weights: every weight of the UNet's data file they use, they read
    from it; what they hold inline is the small constants the UNet's graph holds inline too."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    manifest = load_manifest(cache_export)
    assert manifest.step_cache == {"branch": 0}
    for precision, base in manifest.components["unet"].files.items():
        unet = onnx.load(str(cache_export / base.path), load_external_data=False)
        unet_inline = sum(len(t.raw_data) for t in unet.graph.initializer if not uses_external_data(t))
        for name in ("unet_cache", "unet_shallow"):
            file = manifest.components[name].files[precision]
            assert file.data_size is None  # no weights file of its own
            graph = onnx.load(str(cache_export / file.path), load_external_data=False).graph
            external = [t for t in graph.initializer if uses_external_data(t)]
            assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
                base.data_path
            }
            assert sum(len(t.raw_data) for t in graph.initializer if not uses_external_data(t)) <= unet_inline
    grown = sum(p.stat().st_size for p in cache_export.iterdir() if p.is_file())
    grown -= sum(p.stat().st_size for p in tiny_export.iterdir() if p.is_file())
    graphs = sum((tiny_export / f.path).stat().st_size for f in manifest.components["unet"].files.values())
    assert grown < 1.5 * graphs  # the full graph's structure once more, and the shallow one's
    cache = manifest.components["unet_cache"].files["fp32"]
    shallow = manifest.components["unet_shallow"].files["fp32"]
    assert [s.name for s in cache.outputs] == ["noise_pred", "feature"]
    assert shallow.inputs[-1] == cache.outputs[-1]
    dims = component_dims(manifest, "unet_shallow", dynamic_profile(manifest))
    assert dims["batch"] == component_dims(manifest, "unet", dynamic_profile(manifest))["batch"]


def test_deepcache_split_of_the_tiny_unet(tiny_model_dir: Path) -> None:
    """Branch 0 keeps the last up block's first layer (DeepCache: the layers past the branch); branch 1 the
    first up block's output; DeepCache numbers 3 branches per up block, so this UNet has 0 to 5."""
    from diffusers import UNet2DConditionModel

    from sdtrt.export.step_cache import split

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    _, feature = split(unet, 0)
    assert feature.module is unet.up_blocks[1].attentions[0]
    _, feature = split(unet, 1)
    assert feature.module is unet.up_blocks[0]
    with pytest.raises(ExportError, match="from 0 to 5"):
        split(unet, 6)


# --------------------------------------------------------------------------------------------------
# Parity with DeepCache's helper


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_cached_txt2img_matches_deepcache(
    cache_export: Path, tiny_model_dir: Path, cpu_backend: dict, scheduler: str
) -> None:
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16), dtype=np.float32)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 8, "guidance_scale": 7.5}
    expected = _deepcache_latents(
        "StableDiffusionPipeline",
        tiny_model_dir,
        scheduler,
        3,
        0,
        latents=torch.from_numpy(latents),
        height=128,
        width=128,
        **options,
    )
    with Pipeline.load(cache_export, **cpu_backend) as pipe:
        size = {"height": 128, "width": 128}
        ours = pipe.txt2img(PROMPT, latents=latents, scheduler=scheduler, cache_interval=3, **size, **options)
        plain = pipe.txt2img(PROMPT, latents=latents, scheduler=scheduler, **size, **options)
    assert _relative_error(ours.latents, expected) < LATENT_TOLERANCE
    assert _relative_error(plain.latents, expected) > 1e-3  # caching changed the result, as DeepCache's does


def test_cached_img2img_matches_deepcache(cache_export: Path, tiny_model_dir: Path) -> None:
    from PIL import Image

    y, x = np.mgrid[0:128, 0:128] / 128
    source = Image.fromarray((np.stack([x, y, 1 - x], axis=-1) * 255).astype(np.uint8))
    options = {"num_inference_steps": 10, "guidance_scale": 7.5, "strength": 0.7}
    expected = _deepcache_latents(
        "StableDiffusionImg2ImgPipeline",
        tiny_model_dir,
        "ddim",
        2,
        0,
        image=source,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    with Pipeline.load(cache_export, backend="ort-cpu") as pipe:
        ours = pipe.img2img(PROMPT, source, rng=TorchNoise(3), scheduler="ddim", cache_interval=2, **options)
    assert _relative_error(ours.latents, expected) < IMAGE_LATENT_TOLERANCE


def test_cached_sdxl_matches_deepcache(tmp_path_factory: pytest.TempPathFactory) -> None:
    from sdtrt.export.exporter import export_model
    from sdtrt.export.step_cache import attach_step_cache
    from sdtrt.export.tiny import build_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl-step-cache")
    model = build_tiny_sdxl(root / "sdxl")
    export_model(model, root / "export", progress=False)
    attach_step_cache(root / "export")
    latents = np.random.default_rng(4).standard_normal((1, 4, 16, 16), dtype=np.float32)
    options = {"num_inference_steps": 7, "guidance_scale": 5.0, "height": 128, "width": 128}
    expected = _deepcache_latents(
        "StableDiffusionXLPipeline", model, "euler", 3, 0, latents=torch.from_numpy(latents), **options
    )
    with Pipeline.load(root / "export", backend="ort-cpu") as pipe:
        ours = pipe.txt2img(PROMPT, latents=latents, scheduler="euler", cache_interval=3, **options)
    assert _relative_error(ours.latents, expected) < LATENT_TOLERANCE


def test_cached_inpaint_runs_the_nine_channel_unet(tiny_inpaint_export: Path, tmp_path: Path) -> None:
    from PIL import Image

    from sdtrt.export.step_cache import attach_step_cache

    export = tmp_path / "export"
    shutil.copytree(tiny_inpaint_export, export)
    attach_step_cache(export)
    image = Image.fromarray(np.full((128, 128, 3), 90, np.uint8))
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    options = {"num_inference_steps": 6, "seed": 2}
    with Pipeline.load(export, backend="ort-cpu") as pipe:
        plain = pipe.inpaint(PROMPT, image, Image.fromarray(mask), **options)
        cached = pipe.inpaint(PROMPT, image, Image.fromarray(mask), cache_interval=3, **options)
    assert np.isfinite(cached.latents).all()
    assert 1e-4 < _relative_error(cached.latents, plain.latents) < 1.0


def test_without_guidance_and_with_the_nonuniform_schedule(cache_export: Path) -> None:
    latents = np.random.default_rng(1).standard_normal((2, 4, 16, 16), dtype=np.float32)
    options = {"num_inference_steps": 6, "guidance_scale": 1.0, "latents": latents, "prompt": [PROMPT, NEGATIVE]}
    options |= {"height": 128, "width": 128}
    with Pipeline.load(cache_export, backend="ort-cpu") as pipe:
        uncached = pipe.txt2img(**options)
        cached = pipe.txt2img(**options, cache_interval=10)  # above the steps: the first one only is full
        spread = pipe.txt2img(**options, cache_interval=3, cache_schedule="nonuniform")
    assert np.isfinite(cached.latents).all() and np.isfinite(spread.latents).all()
    assert 1e-4 < _relative_error(cached.latents, uncached.latents) < 1.0


def test_full_steps() -> None:
    assert sorted(full_steps(10, 3, "uniform")) == [0, 3, 6, 9]
    assert sorted(full_steps(5, 1, "uniform")) == [0, 1, 2, 3, 4]
    spread = sorted(full_steps(50, 5, "nonuniform"))
    assert len(spread) == 10 and spread[0] == 0
    gaps = np.diff(spread)
    assert gaps.min() < 5 < gaps.max()  # denser around the centre than the uniform schedule


def test_cli_cache_interval(cache_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "cached.png"
    argv = ["generate", str(cache_export), PROMPT, "--steps", "4", "--height", "128", "--width", "128"]
    assert main([*argv, "--cache-interval", "2", "-o", str(out), "-q", "--backend", "ort-cpu"]) == 0
    assert out.is_file()


def test_export_step_cache_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    argv = ["export", str(tiny_model_dir), "--out", str(out), "--step-cache", "--components", "text_encoder", "unet"]
    assert main([*argv, "--quiet"]) == 0
    manifest = load_manifest(out)
    assert manifest.step_cache == {"branch": 0}
    assert sorted(manifest.components) == ["text_encoder", "unet", "unet_cache", "unet_shallow"]


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line each, before any network runs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache_interval": 0}, "cache_interval must be an integer from 1 .* to 1000, got 0"),
        ({"cache_interval": -2}, "cache_interval must be an integer from 1"),
        ({"cache_interval": 10**9}, "cache_interval must be an integer from 1"),
        ({"cache_interval": 2.0}, "cache_interval must be an integer from 1"),
        ({"cache_branch": -1}, "cache_branch must be an integer >= 0"),
        ({"cache_schedule": "random"}, "cache_schedule must be one of 'uniform', 'nonuniform'"),
        ({"cache_interval": 2, "cache_branch": 3}, "are for branch 0; attach them for branch 3"),
    ],
)
def test_bad_cache_options(cache_export: Path, options: dict, message: str) -> None:
    with Pipeline.load(cache_export, backend="ort-cpu") as pipe, pytest.raises(InvalidInputError, match=message):
        pipe.txt2img(PROMPT, num_inference_steps=4, **options)


def test_cache_options_on_an_export_without_the_graphs(tiny_export: Path, tmp_path: Path, capsys) -> None:
    message = "has none of: attach them with `sdtrt add-step-cache"
    with Pipeline.load(tiny_export, backend="ort-cpu") as pipe, pytest.raises(InvalidInputError, match=message):
        pipe.txt2img(PROMPT, num_inference_steps=4, cache_interval=2)
    argv = ["generate", str(tiny_export), PROMPT, "--steps", "4", "--cache-interval", "2", "-q"]
    assert main([*argv, "-o", str(tmp_path / "no.png")]) == 2
    assert "add-step-cache" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


def test_attach_refuses_a_branch_the_unet_has_not(tiny_export: Path, tmp_path: Path) -> None:
    from sdtrt.export.step_cache import attach_step_cache

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    with pytest.raises(ExportError, match="cache branch must be an integer from 0 to 5"):
        attach_step_cache(out, branch=9)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before


def test_controlnets_with_caching_are_one_clear_error(cache_export: Path) -> None:
    from types import SimpleNamespace

    from sdtrt.runtime.step_cache import check_cache_options

    manifest = load_manifest(cache_export)
    plain = SimpleNamespace(artifact=SimpleNamespace(folder=cache_export), loras={})
    check_cache_options(3, None, manifest, plain, controlled=False)  # what the parity tests run
    with pytest.raises(InvalidInputError, match="does not take ControlNets yet"):
        check_cache_options(3, None, manifest, plain, controlled=True)
    check_cache_options(1, None, manifest, plain, controlled=True)  # caching off: nothing to refuse


# --------------------------------------------------------------------------------------------------
# LoRA: the step-cache graphs have weight maps pointing into the UNet's data file


@pytest.fixture(scope="module")
def cache_lora(cache_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random kohya LoRA on the UNet's attention, feed-forward, 1x1 and 3x3 convolutions (folded)."""
    from benchmarks.lora_swap import write_kohya
    from sdtrt.engine.artifact import open_artifact

    with open_artifact(cache_export, backend="ort-cpu") as artifact:
        maps = artifact.weight_maps()
    targets = {"unet": ("to_q", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2")}  # text encoders: test_lora.py
    return write_kohya(tmp_path_factory.mktemp("cache-lora") / "style.safetensors", maps, 4, 3, targets, std=0.1)


def test_the_graphs_weight_maps_point_into_the_unets_data(cache_export: Path) -> None:
    from sdtrt.engine.weights import load_weight_map

    manifest = load_manifest(cache_export)
    for precision in ("fp32", "fp16"):
        unet = load_weight_map(cache_export / manifest.components["unet"].files[precision].weights)
        for graph in ("unet_cache", "unet_shallow"):
            graph_map = load_weight_map(cache_export / manifest.components[graph].files[precision].weights)
            assert graph_map.data_path == unet.data_path
            assert not graph_map.unmapped
            for name, weight in graph_map.weights.items():  # each one the UNet's own bytes, at the UNet's offset
                (held,) = unet.by_param[weight.param]
                assert (weight.offset, weight.length, weight.transposed) == (held.offset, held.length, held.transposed)
                np.testing.assert_array_equal(graph_map.base(name), unet.base(held.name))
            covered = {*graph_map.by_param, *graph_map.unused}
            assert covered == {*unet.by_param, *unet.unused}, graph  # every UNet weight: used and mapped, or unused
        assert not load_weight_map(
            cache_export / manifest.components["unet_cache"].files[precision].weights
        ).unused  # the cache graph runs the whole UNet
        shallow = load_weight_map(cache_export / manifest.components["unet_shallow"].files[precision].weights)
        assert any(p.startswith("mid_block.") for p in shallow.unused) and shallow.weights


def test_cached_txt2img_with_lora_matches_deepcache(
    cache_export: Path, tiny_model_dir: Path, cache_lora: Path, lora_backend: dict
) -> None:
    """LoRA on a cached run: the adapter changes the shallow graph's weights too, loaded before or after the
    step-cache graphs open; against diffusers' load_lora_weights under DeepCacheSDHelper."""
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16), dtype=np.float32)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 8, "guidance_scale": 7.5, "height": 128}
    options |= {"width": 128}
    call = {"latents": torch.from_numpy(latents), **options}
    expected = _deepcache_latents("StableDiffusionPipeline", tiny_model_dir, "ddim", 3, 0, cache_lora, **call)
    base = _deepcache_latents("StableDiffusionPipeline", tiny_model_dir, "ddim", 3, 0, **call)
    tolerance = 5e-2 if lora_backend["precision"] == "bf16" else LATENT_TOLERANCE  # as tests/test_lora.py
    assert _relative_error(base, expected) > 4 * tolerance  # the LoRA matters far beyond the tolerance
    with Pipeline.load(cache_export, **lora_backend) as pipe:
        cached = {"scheduler": "ddim", "cache_interval": 3, **options}
        before = pipe.txt2img(PROMPT, latents=latents, **cached).latents  # the step-cache graphs open unadapted
        pipe.load_lora(cache_lora)
        ours = pipe.txt2img(PROMPT, latents=latents, **cached).latents
        pipe.unload_lora()
        unloaded = pipe.txt2img(PROMPT, latents=latents, **cached).latents
    assert _relative_error(before, base) < tolerance
    assert _relative_error(ours, expected) < tolerance
    assert _relative_error(unloaded, base) < tolerance


def test_lora_with_graphs_attached_before_weight_maps_is_one_clear_error(
    cache_export: Path, cache_lora: Path, tmp_path: Path
) -> None:
    """Step-cache graphs attached by an sdtrt without their weight maps would run a cached step without the LoRA:
    refused, with the command that attaches them again."""
    from sdtrt.engine.manifest import Component

    old = tmp_path / "old"
    shutil.copytree(cache_export, old)
    manifest = load_manifest(old)
    components = dict(manifest.components)
    for graph in ("unet_cache", "unet_shallow"):
        files = {p: replace(f, weights=None) for p, f in components[graph].files.items()}
        components[graph] = Component(files=files)
    replace(manifest, components=components).save(old)
    with Pipeline.load(old, backend="ort-cpu") as pipe:
        pipe.load_lora(cache_lora)
        with pytest.raises(InvalidInputError, match="have no weight maps, which LoRA needs") as error:
            pipe.txt2img(PROMPT, num_inference_steps=4, cache_interval=2, height=64, width=64)
        assert "add-step-cache" in str(error.value) and "\n" not in str(error.value)
        pipe.txt2img(PROMPT, num_inference_steps=2, height=64, width=64)  # uncached: the UNet's own map
