"""Step caching beside the rest: one copy of the UNet per process (the plain UNet's calls run on unet_cache on the
CPU), LoRA adapters on unet_cache too (the plain UNet where its graphs have no weight maps), server batching on such
an export, and OpenVINO bf16's cached
loop against its fp32 one."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_gate import BF16_MAX_LEVELS, BF16_MIN_PSNR, image_error
from image_gate import OPTIONS as GATE_OPTIONS
from image_gate import PROMPT as GATE_PROMPT
from test_lora import _factors, _reference, _write_peft

from sdtrt.runtime.batching import BatchCall, run_batch
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import Request

PROMPT = "a red circle on a blue background"
GENERATION = {"negative_prompt": "blurry", "num_inference_steps": 6, "guidance_scale": 7.5, "height": 128}
GENERATION |= {"width": 128}
# unet and unet_cache are one graph up to the extra output: the same float32 arithmetic (tests/test_pipeline.py's
# parity tolerance)
SAME_UNET_TOLERANCE = 1e-5
# OpenVINO bf16 runs the matrix work in bfloat16 (8 mantissa bits): as tests/test_lora.py's bf16 tolerance on the
# tiny model's latents. Measured on an AMD EPYC (Zen 4, AVX-512 BF16), gate options, seeds 0, 1, 7, interval 3:
# bf16 against fp32 2.8-3.1e-2 cached (1.4-1.6e-2 uncached), 47.8-48.1 dB and 6 levels on the image; caching
# itself moves fp32's latents by 7.8-9.3e-2 and its image by 39.2-39.3 dB, 17-20 levels
BF16_TOLERANCE = 5e-2


def _latents(seed: int = 0, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, side, side), dtype=np.float32)


def _relative(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def test_one_unet_copy_for_cached_and_uncached_requests(
    cache_export: Path, tiny_export: Path, cpu_backend: dict
) -> None:
    with Pipeline.load(tiny_export, **cpu_backend) as plain:
        expected = plain.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
    with Pipeline.load(cache_export, **cpu_backend) as pipe:
        assert pipe.artifact.is_open("unet_cache") and not pipe.artifact.is_open("unet")  # what load opened
        uncached = pipe.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
        cached = pipe.txt2img(PROMPT, latents=_latents(), cache_interval=3, **GENERATION).latents
        assert not pipe.artifact.is_open("unet")  # no second copy of the UNet's weights
    assert _relative(uncached, expected) < SAME_UNET_TOLERANCE
    assert _relative(cached, expected) > 1e-3  # and caching still caches


def test_lora_adapters_run_on_unet_cache_or_the_plain_unet(
    cache_export: Path, tiny_export: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """unet_cache has a weight map: an adapter changes it as it changes the UNet, and the plain UNet stays closed; on
    step-cache graphs attached without weight maps (an older sdtrt) the plain UNet opens with the adapter."""
    from dataclasses import replace

    from sdtrt.engine.manifest import Component, load_manifest

    lora = _write_peft(_factors(_reference(tiny_model_dir), seed=1), tmp_path / "style.safetensors", alpha=8)
    with Pipeline.load(tiny_export, backend="ort-cpu") as plain:
        base = plain.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
        plain.load_lora(lora)
        styled = plain.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
    old = tmp_path / "no-maps"
    shutil.copytree(cache_export, old)
    manifest = load_manifest(old)
    components = dict(manifest.components)
    for graph in ("unet_cache", "unet_shallow"):
        components[graph] = Component(files={p: replace(f, weights=None) for p, f in components[graph].files.items()})
    replace(manifest, components=components).save(old)
    for export, opens_unet in ((cache_export, False), (old, True)):
        with Pipeline.load(export, backend="ort-cpu") as pipe:
            pipe.load_lora(lora)
            ours = pipe.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
            assert pipe.artifact.is_open("unet") is opens_unet
            pipe.unload_lora()
            again = pipe.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
            assert pipe.sessions.serving("unet") == "unet_cache"
        assert _relative(ours, styled) < SAME_UNET_TOLERANCE
        assert _relative(again, base) < SAME_UNET_TOLERANCE
    assert _relative(styled, base) > 1e-2  # the adapter matters


def test_batched_requests_share_unet_cache(cache_export: Path) -> None:
    with Pipeline.load(cache_export, backend="ort-cpu") as pipe:
        plans = [
            pipe.plan("txt2img", Request(prompt=PROMPT, seed=seed, scheduler="ddim", **GENERATION)) for seed in (1, 2)
        ]
        alone = [pipe.execute(plan).latents for plan in plans]
        results, batches = run_batch(pipe, [BatchCall(plan) for plan in plans])
        assert not pipe.artifact.is_open("unet")
    assert batches == [4] * GENERATION["num_inference_steps"]  # two CFG pairs in every UNet call
    for result, expected in zip(results, alone, strict=True):
        assert _relative(result.latents, expected) < SAME_UNET_TOLERANCE


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_bf16_cached_txt2img_against_fp32(cache_export: Path) -> None:
    """bf16's own gate (tests/image_gate.py) on the cached loop against the fp32 cached loop: the final image
    within BF16_MIN_PSNR and BF16_MAX_LEVELS, the latents within BF16_TOLERANCE; caching itself moves the fp32
    image further than the gate allows, so the gate sees bf16's error, not caching's."""
    options = {"latents": _latents(7, side=32), "cache_interval": 3, **GATE_OPTIONS}
    with Pipeline.load(cache_export, backend="openvino", precision="fp32") as pipe:
        fp32 = pipe.txt2img(GATE_PROMPT, **options)
        uncached = pipe.txt2img(GATE_PROMPT, **{**options, "cache_interval": 1})
    with Pipeline.load(cache_export, backend="openvino", precision="bf16") as pipe:
        bf16 = pipe.txt2img(GATE_PROMPT, **options)
    psnr, levels = image_error(bf16.images[0], fp32.images[0])
    assert psnr >= BF16_MIN_PSNR and levels <= BF16_MAX_LEVELS, f"bf16 cached: {psnr:.1f} dB, {levels:.0f} levels"
    assert _relative(bf16.latents, fp32.latents) < BF16_TOLERANCE
    assert image_error(fp32.images[0], uncached.images[0])[1] > BF16_MAX_LEVELS  # what caching changes


def test_an_int8_unet_keeps_the_plain_unet(tiny_int8_export: Path, tmp_path: Path) -> None:
    """`sdtrt quantize` makes no IR of unet_cache: the int8 UNet's requests keep to the plain UNet's int8 IR."""
    from sdtrt.export.step_cache import attach_step_cache

    export = tmp_path / "int8"
    shutil.copytree(tiny_int8_export, export)
    attach_step_cache(export)
    with Pipeline.load(export, backend="openvino", precision="int8") as pipe:
        assert pipe.sessions.serving("unet") == "unet"
        assert pipe.session("unet").precision == "int8" and not pipe.artifact.is_open("unet_cache")
