"""runtime/batching.py: requests run as one UNet batch give each request exactly what it gets alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime.batching import BatchCall, run_batch
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import Request

STEPS = 3
SIZE = {"height": 64, "width": 64}  # a quarter of the tiny model's native side: quick, same code


@pytest.fixture(scope="module")
def pipe(tiny_export: Path, cpu_backend: dict[str, str | None]) -> Iterator[Pipeline]:
    with Pipeline.load(tiny_export, **cpu_backend) as pipeline:
        yield pipeline


def _requests(scheduler: str) -> list[Request]:
    """Different prompts, seeds, negative prompts, guidance scales and image counts; one size, steps, scheduler."""
    return [
        Request("a red circle", seed=1, guidance_scale=5.0, num_inference_steps=STEPS, scheduler=scheduler, **SIZE),
        Request(
            ["a green square", "a cat"],
            negative_prompt=["blue", ""],
            seed=2,
            guidance_scale=3.0,
            num_images=2,
            num_inference_steps=STEPS,
            scheduler=scheduler,
            **SIZE,
        ),
        Request("a black triangle", seed=3, guidance_scale=9.0, num_inference_steps=STEPS, scheduler=scheduler, **SIZE),
    ]


@pytest.mark.parametrize(
    ("scheduler", "pad_to"), [("ddim", None), ("euler_a", None), ("dpmpp_2m", 16)]
)  # plain, stochastic, multistep; padded to 16 samples as on OpenVINO
def test_batched_requests_are_bit_identical_to_running_alone(
    pipe: Pipeline, scheduler: str, pad_to: int | None
) -> None:
    requests = _requests(scheduler)
    alone = [pipe.run("txt2img", r) for r in requests]
    results, unet_batches = run_batch(pipe, [BatchCall(pipe.plan("txt2img", r)) for r in requests], pad_to)
    assert unet_batches == [2 * (1 + 4 + 1)] * STEPS  # every step one UNet call: 6 images, doubled by guidance
    for want, got in zip(alone, results, strict=True):
        assert not isinstance(got, Exception), got
        assert got.seed == want.seed
        np.testing.assert_array_equal(got.latents, want.latents)
        for a, b in zip(want.images, got.images, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_member_that_stops_or_fails_leaves_the_others_untouched(pipe: Pipeline) -> None:
    requests = _requests("ddim")

    def stop_after_one(done: int, total: int) -> None:
        raise RuntimeError("client went away")

    calls = [
        BatchCall(pipe.plan("txt2img", requests[0])),
        BatchCall(pipe.plan("txt2img", requests[1]), progress=stop_after_one),
        BatchCall(
            pipe.plan("txt2img", Request("x", scheduler="no-such", num_inference_steps=STEPS, **SIZE))
        ),  # fails before the UNet
        BatchCall(pipe.plan("txt2img", requests[2])),
    ]
    samples: list[tuple[int, ...]] = []
    calls[0].on_sample = lambda sample, runner: samples.append(sample.shape)
    results, unet_batches = run_batch(pipe, calls)
    assert isinstance(results[1], RuntimeError) and "went away" in str(results[1])
    assert "no-such" in str(results[2])
    assert unet_batches == [12, 4, 4]  # the stopped member took part in the first step only
    latent = (2, pipe.manifest.latent_channels, 8, 8)
    assert samples == [latent] * STEPS  # its own (2B, C, h, w) UNet inputs, for previews
    for index, request in ((0, requests[0]), (3, requests[2])):
        np.testing.assert_array_equal(results[index].latents, pipe.run("txt2img", request).latents)


def test_a_model_that_draws_nothing_from_a_prompt_alone_still_serves(tiny_inpaint_export: Path) -> None:
    """An inpainting model cannot txt2img: the server's warm-up skips it (no previews) instead of failing."""
    from sdtrt.serve.config import ServeConfig
    from sdtrt.serve.metrics import Metrics
    from sdtrt.serve.worker import ModelWorker

    config = ServeConfig((tiny_inpaint_export,), backend="ort-cpu")
    worker = ModelWorker(tiny_inpaint_export, "inpaint", config, Metrics())
    worker.start()
    try:
        assert worker.ready.wait(120) and worker.failure is None
        assert worker.previews is not None and worker.previews.linear is None and worker.pipeline is not None
    finally:
        worker.stop()


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


IMAGE_TASKS = {  # each task's own inputs for two requests that may share a batch
    "img2img": ({"image": _image(1), "strength": 0.7}, {"image": _image(2), "strength": 0.7}),
    "inpaint": ({"image": _image(1), "mask": _mask()}, {"image": _image(2), "mask": _mask(), "strength": 1.0}),
    "outpaint": ({"image": _image(1), "right": 16}, {"image": _image(2), "right": 16, "mask_blur": 8.0}),
}


@pytest.mark.parametrize("task", list(IMAGE_TASKS))
def test_image_tasks_batch_bit_identically_where_requests_agree(pipe: Pipeline, task: str) -> None:
    first, second = IMAGE_TASKS[task]
    requests = [
        Request("a red circle", seed=1, guidance_scale=5.0, num_inference_steps=STEPS),
        Request(["a green square", "a cat"], seed=2, guidance_scale=3.0, num_inference_steps=STEPS),
    ]
    plans = [pipe.plan(task, requests[0], first), pipe.plan(task, requests[1], second)]
    assert plans[0].batch_key is not None and plans[0].batch_key == plans[1].batch_key
    alone = [pipe.execute(plan) for plan in plans]
    results, unet_batches = run_batch(pipe, [BatchCall(plan) for plan in plans])
    assert unet_batches and all(size == 2 * (1 + 2) for size in unet_batches)  # one UNet call a step, both inside
    for want, got in zip(alone, results, strict=True):
        assert not isinstance(got, Exception), got
        np.testing.assert_array_equal(got.latents, want.latents)
        for a, b in zip(want.images, got.images, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_keys_part_requests_that_differ_where_it_matters(pipe: Pipeline) -> None:
    request = Request("a red circle", num_inference_steps=STEPS)
    key = pipe.plan("img2img", request, {"image": _image(1)}).batch_key
    assert pipe.plan("img2img", request, {"image": _image(2)}).batch_key == key  # other pixels, same shapes
    assert pipe.plan("img2img", request, {"image": _image(1), "strength": 0.5}).batch_key != key  # other steps
    assert pipe.plan("img2img", request, {"image": _image(1, (64, 96))}).batch_key != key  # another size
    assert pipe.plan("img2img", request, {"image": str(Path("a.png"))}).batch_key is None  # size not known yet
    assert pipe.plan("upscale", request, {"image": _image(1)}).batch_key is None  # tiles: never batched
    lcm_like = Request("a red circle", num_inference_steps=STEPS, guidance_scale=1.0)
    assert pipe.plan("txt2img", lcm_like).batch_key != pipe.plan("txt2img", request).batch_key  # CFG off vs on


def test_cached_steps_run_alone(pipe: Pipeline) -> None:
    """A request with step caching never calls the plain UNet that a batch shares: it is not batched."""
    from sdtrt.runtime.plan import batch_key
    from sdtrt.runtime.tasks import TASKS

    task, plain = TASKS["txt2img"], pipe.plan("txt2img", Request("a red circle", num_inference_steps=STEPS))
    cached = dataclasses.replace(plain.request, cache_interval=2)
    assert batch_key(task, plain.request, plain.arguments, plain.cfg, pipe.manifest) == plain.batch_key is not None
    assert batch_key(task, cached, plain.arguments, plain.cfg, pipe.manifest) is None
