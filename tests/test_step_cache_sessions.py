"""Step caching beside the rest: one copy of the UNet per process (the plain UNet's calls run on unet_cache on the
CPU), LoRA adapters still reaching the plain UNet, and server batching on such an export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def _latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)


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


def test_lora_adapters_run_on_the_plain_unet(
    cache_export: Path, tiny_export: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """unet_cache has no weight map: with an adapter loaded the plain UNet opens with it, unloaded it is left."""
    lora = _write_peft(_factors(_reference(tiny_model_dir), seed=1), tmp_path / "style.safetensors", alpha=8)
    with Pipeline.load(tiny_export, backend="ort-cpu") as plain:
        base = plain.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
        plain.load_lora(lora)
        styled = plain.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
    with Pipeline.load(cache_export, backend="ort-cpu") as pipe:
        pipe.load_lora(lora)
        ours = pipe.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
        assert pipe.artifact.is_open("unet")
        pipe.unload_lora()
        again = pipe.txt2img(PROMPT, latents=_latents(), **GENERATION).latents
        assert pipe.sessions.serving("unet") == "unet_cache"
    assert _relative(styled, base) > 1e-2  # the adapter matters
    assert _relative(ours, styled) < SAME_UNET_TOLERANCE
    assert _relative(again, base) < SAME_UNET_TOLERANCE


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
